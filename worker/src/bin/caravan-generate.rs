//! `caravan-generate`: greedy generation from token ids, on one process or a tensor-parallel
//! group of local processes joined by a TCP ring. Prints the tokens and tokens/s.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use caravan_ops::{Communicator, DType, VocabSharding};
use caravan_worker::{
    generate::{self, GenerateJob},
    local_group, telemetry,
};
use clap::Parser;

/// Greedy-generate from token ids with a Llama 2 checkpoint, sharded over `--tp` local processes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Hugging Face checkpoint folder (config.json and safetensors).
    #[arg(long, env = "CARAVAN_MODEL")]
    model: PathBuf,
    /// Tensor-parallel size: number of worker processes, joined by a TCP ring.
    #[arg(long, alias = "tensor-parallel-size", default_value_t = 1)]
    tp: usize,
    /// Prompt token ids, comma separated (BOS included). Repeat for a batch of prompts.
    #[arg(long = "prompt-ids", required = true, value_parser = parse_ids)]
    prompts: Vec<Vec<i64>>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Compute dtype (weights are converted on load).
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Placement of the embedding and LM head: auto, replicated or parallel.
    #[arg(long, default_value = "auto")]
    vocab_sharding: VocabSharding,
    /// libtorch threads per rank (default: available cores / tp).
    #[arg(long, env = "CARAVAN_THREADS")]
    threads: Option<usize>,
    /// Seconds a collective waits for a peer before failing.
    #[arg(long, default_value_t = 60.0)]
    collective_timeout: f64,
    /// Address the ring listens on (the interface peers reach this rank by).
    #[arg(long, default_value = "127.0.0.1")]
    ring_host: String,
    /// Teacher forcing: token ids to feed at each decode step, one list per prompt.
    #[arg(long = "force-tokens", value_parser = parse_ids)]
    force_tokens: Vec<Vec<i64>>,
    /// Write every logit row (prefill and decode) to this safetensors file.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
    /// Internal: this process's rank in a group started by the launcher.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// Internal: the group's size, set with --rank.
    #[arg(long, hide = true)]
    world_size: Option<usize>,
}

fn parse_ids(s: &str) -> Result<Vec<i64>, String> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<i64>()
                .map_err(|e| format!("bad token id {t:?}: {e}"))
        })
        .collect()
}

fn main() -> ExitCode {
    telemetry::init("warn");
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let job = GenerateJob {
        model: args.model.clone(),
        prompts: args.prompts.clone(),
        max_new_tokens: args.max_new_tokens,
        dtype: args.dtype,
        vocab_sharding: args.vocab_sharding,
        force_tokens: (!args.force_tokens.is_empty()).then(|| args.force_tokens.clone()),
        dump_logits: args.dump_logits.clone(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / args.tp.max(1)).max(1));
    match (args.rank, args.world_size) {
        (Some(rank), Some(world_size)) => {
            let rank_prefix = |e: anyhow::Error| e.context(format!("rank {rank}"));
            tch::set_num_threads(threads as i32);
            let timeout = Duration::from_secs_f64(args.collective_timeout);
            let ring = local_group::join_from_stdio(rank, world_size, &args.ring_host, timeout)
                .map_err(rank_prefix)?;
            let report =
                generate::run_rank(&job, Communicator::TcpRing(ring)).map_err(rank_prefix)?;
            if rank == 0 {
                print!("{}", report.render());
            }
            Ok(())
        }
        _ if args.tp > 1 => {
            // Fail fast, once, on what every rank would fail on.
            generate::preflight(&job, args.tp)?;
            let forwarded: Vec<_> = std::env::args_os().skip(1).collect();
            local_group::run(args.tp, &forwarded)
        }
        _ => {
            tch::set_num_threads(threads as i32);
            let report = generate::run_rank(&job, Communicator::Single)?;
            print!("{}", report.render());
            Ok(())
        }
    }
}
