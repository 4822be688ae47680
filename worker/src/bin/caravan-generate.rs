//! `caravan-generate`: greedy generation from token ids, on one process or a tensor-parallel
//! group of local processes joined by a TCP ring (or NCCL on GPUs). Prints the tokens and tokens/s.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Result};
use caravan_ops::{
    cpu::{cpu_kernel_path, set_cpu_kernels, CpuKernels},
    Communicator, DType, Quantization, VocabSharding,
};
use caravan_worker::{
    device,
    generate::{self, GenerateJob},
    local_group::{self, Backend},
    nccl_group, telemetry,
};
use clap::{Parser, ValueEnum};
use tch::Device;

/// Greedy-generate from token ids with a Llama 2 checkpoint, sharded over `--tp` local processes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Hugging Face checkpoint folder (config.json and safetensors).
    #[arg(long, env = "CARAVAN_MODEL")]
    model: PathBuf,
    /// Tensor-parallel size: number of worker processes.
    #[arg(long, alias = "tensor-parallel-size", default_value_t = 1)]
    tp: usize,
    /// Prompt token ids, comma separated (BOS included). Repeat for a batch of prompts.
    #[arg(long = "prompt-ids", required = true, value_parser = parse_ids)]
    prompts: Vec<Vec<i64>>,
    /// Tokens to generate per prompt (end-of-sequence does not stop generation).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Compute dtype (weights are converted on load).
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// cpu, cuda (rank r on GPU r % count) or cuda:N (every rank on GPU N).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Collective backend between ranks (default: nccl on GPUs when built with it, else tcp).
    #[arg(long, value_enum)]
    collective: Option<Collective>,
    /// Placement of the embedding and LM head: auto, replicated or parallel.
    #[arg(long, default_value = "auto")]
    vocab_sharding: VocabSharding,
    /// Store the products' weights quantized: int8 (8-bit integers, one scale per block of 32
    /// inputs) or q4 (4-bit; the LM head in 8 bits); Caravan's CPU kernels only.
    #[arg(long)]
    quantization: Option<Quantization>,
    /// On a CPU: `on` runs Caravan's kernels where the CPU has them (AVX2; AVX-512 BF16 for bf16
    /// weights where present); `avx2` their AVX2 loops only; `off` runs every product, norm and
    /// attention through libtorch, the path a GPU takes.
    #[arg(long, env = "CARAVAN_CPU_KERNELS", default_value_t = CpuKernels::On)]
    cpu_kernels: CpuKernels,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Collective {
    /// TCP ring (any device; GPU tensors are staged through host memory).
    Tcp,
    /// NCCL (GPUs; needs a build with `--features cuda`).
    Nccl,
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
    let restart = caravan_ops::cpu::restart_with_passive_openmp();
    let _telemetry = telemetry::init("warn", caravan_common::telemetry::LogFormat::Text, None);
    if let Err(e) = restart {
        tracing::warn!("running with spinning OpenMP threads (slower decode): cannot restart: {e}");
    }
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
    let rank = args.rank.unwrap_or(0);
    let device = match device::parse_device(&args.device).map_err(anyhow::Error::msg)? {
        Some(device) => device,
        None => Device::Cuda(rank % (tch::Cuda::device_count().max(1) as usize)),
    };
    let collective = match args.collective {
        Some(c) => c,
        None if device.is_cuda() && cfg!(feature = "cuda") => Collective::Nccl,
        None => Collective::Tcp,
    };
    if collective == Collective::Nccl && !cfg!(feature = "cuda") {
        bail!("--collective nccl needs a build with --features cuda");
    }
    let job = GenerateJob {
        model: args.model.clone(),
        prompts: args.prompts.clone(),
        max_new_tokens: args.max_new_tokens,
        dtype: args.dtype,
        device,
        vocab_sharding: args.vocab_sharding,
        quantization: args.quantization,
        force_tokens: (!args.force_tokens.is_empty()).then(|| args.force_tokens.clone()),
        dump_logits: args.dump_logits.clone(),
    };
    set_cpu_kernels(args.cpu_kernels);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or((cores / args.tp.max(1)).max(1));
    let timeout = Duration::from_secs_f64(args.collective_timeout);
    match (args.rank, args.world_size) {
        (Some(rank), Some(world_size)) => {
            let in_rank = |e: anyhow::Error| e.context(format!("rank {rank}"));
            caravan_ops::cpu::set_threads(threads)?;
            let rendezvous =
                local_group::join_from_stdio(&args.ring_host, world_size).map_err(in_rank)?;
            let comm = match &rendezvous.backend {
                Backend::Tcp => {
                    Communicator::TcpRing(rendezvous.into_ring(rank, timeout).map_err(in_rank)?)
                }
                Backend::Nccl(id) => nccl_group::join(rank, world_size, id, device, timeout)
                    .map_err(|s| in_rank(status_error(s)))?,
            };
            let report = generate::run_rank(&job, comm).map_err(in_rank)?;
            if rank == 0 {
                print!("{}", report.render());
                print_compute(device);
            }
            Ok(())
        }
        _ if args.tp > 1 => {
            // Fail fast, once, on what every rank would fail on.
            generate::preflight(&job, args.tp)?;
            let backend = match collective {
                Collective::Tcp => Backend::Tcp,
                Collective::Nccl => Backend::Nccl(nccl_group::new_id().map_err(status_error)?),
            };
            let forwarded: Vec<_> = std::env::args_os().skip(1).collect();
            local_group::run(args.tp, &forwarded, &backend)
        }
        _ => {
            caravan_ops::cpu::set_threads(threads)?;
            let report = generate::run_rank(&job, Communicator::Single)?;
            print!("{}", report.render());
            print_compute(device);
            Ok(())
        }
    }
}

/// Says what computed the run on a CPU (the tests check which path ran).
fn print_compute(device: Device) {
    if device == Device::Cpu {
        println!("cpu kernels: {}", cpu_kernel_path());
    }
}

/// A gRPC status from the served path's NCCL helpers as this tool's error.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}
