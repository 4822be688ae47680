//! One rank of a fixed greedy-generation job: load this rank's shard, prefill a batch of prompts
//! together, decode step by step, and (on rank 0) report tokens and speed.
//!
//! This is the single-process runner and, with a TCP ring, the multi-process one; the golden tests
//! drive it with teacher forcing and a logits dump.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Instant};

use anyhow::{bail, Context, Result};
use caravan_ops::{
    BlockAllocator, Checkpoint, Communicator, DType, Llama, LlamaConfig, LlamaWeights, LoadOptions,
    LogitsSelection, Quantization, SequenceStep, ShardLayout, VocabSharding,
};
use tch::{Device, Kind, Tensor};

/// Tokens per KV-cache block.
const BLOCK_SIZE: usize = 16;

/// What to generate, and how.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub model: PathBuf,
    /// Prompts as token ids, run together as one batch.
    pub prompts: Vec<Vec<i64>>,
    /// Tokens to generate per prompt: one from the prefill, the rest from decode steps.
    pub max_new_tokens: usize,
    pub dtype: DType,
    /// Where this rank's weights and cache live.
    pub device: Device,
    pub vocab_sharding: VocabSharding,
    /// How the products' weights are stored (none: in `dtype`).
    pub quantization: Option<Quantization>,
    /// Teacher forcing: feed these tokens (per prompt) instead of the model's own choices.
    pub force_tokens: Option<Vec<Vec<i64>>>,
    /// Rank 0 writes every logit row here (safetensors), for golden comparisons.
    pub dump_logits: Option<PathBuf>,
}

/// What rank 0 saw.
#[derive(Debug, Clone)]
pub struct GenerateReport {
    /// The model's greedy choice at every step, per prompt.
    pub tokens: Vec<Vec<i64>>,
    pub prefill_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
}

impl GenerateReport {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (i, tokens) in self.tokens.iter().enumerate() {
            out += &format!("prompt {i}: generated {tokens:?}\n");
        }
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        out += &format!(
            "prefill: {} tokens in {:.1} ms ({:.1} tok/s); decode: {} tokens in {:.1} ms ({:.1} tok/s)\n",
            self.prefill_tokens,
            self.prefill_seconds * 1e3,
            rate(self.prefill_tokens, self.prefill_seconds),
            self.decode_tokens,
            self.decode_seconds * 1e3,
            rate(self.decode_tokens, self.decode_seconds),
        );
        out
    }
}

/// Checks what can be checked before any process starts: the config, the layout for
/// `world_size` ranks and every weight's presence and shape (headers only).
pub fn preflight(job: &GenerateJob, world_size: usize) -> Result<LlamaConfig> {
    let config = LlamaConfig::from_path(&job.model)?;
    ShardLayout::validate(&config, world_size, job.vocab_sharding)?;
    let checkpoint = Checkpoint::open(&job.model)?;
    LlamaWeights::new(&config).check(&checkpoint)?;
    if job.prompts.is_empty() || job.prompts.iter().any(|p| p.is_empty()) {
        bail!("every prompt needs at least one token");
    }
    crate::device::check_usable(job.device).map_err(anyhow::Error::msg)?;
    if job.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if let Some(forced) = &job.force_tokens {
        if forced.len() != job.prompts.len()
            || forced.iter().any(|f| f.len() + 1 < job.max_new_tokens)
        {
            bail!("--force-tokens needs max-new-tokens - 1 tokens for every prompt");
        }
    }
    Ok(config)
}

/// Runs this rank's part of `job`. Every rank returns the same report (logits are identical
/// across ranks after the last collective); rank 0 also writes the dump.
pub fn run_rank(job: &GenerateJob, comm: Communicator) -> Result<GenerateReport> {
    let (rank, world_size) = (comm.rank(), comm.world_size());
    let config = preflight(job, world_size)?;
    let layout = ShardLayout::new(&config, rank, world_size, job.vocab_sharding)?;
    let checkpoint = Checkpoint::open(&job.model)?;
    let options = LoadOptions {
        dtype: job.dtype,
        device: job.device,
        show_progress: rank == 0,
        quantization: job.quantization,
    };
    let model = Llama::load(&checkpoint, &config, layout, Arc::new(comm), options)
        .with_context(|| format!("loading shard {rank}/{world_size}"))?;

    let total_tokens: usize = job
        .prompts
        .iter()
        .map(|p| p.len() + job.max_new_tokens)
        .sum();
    let num_blocks = job
        .prompts
        .iter()
        .map(|p| (p.len() + job.max_new_tokens).div_ceil(BLOCK_SIZE))
        .sum();
    let mut cache = model.new_cache(num_blocks, BLOCK_SIZE)?;
    let mut allocator = BlockAllocator::new(num_blocks, BLOCK_SIZE);
    tracing::debug!(total_tokens, num_blocks, "allocated KV cache");

    // Every rank must run the same collectives, so all select the same rows; only rank 0 writes.
    let dump = job.dump_logits.is_some();
    let selection = if dump {
        LogitsSelection::AllTokens
    } else {
        LogitsSelection::LastTokens
    };
    let mut dumped: HashMap<String, Tensor> = HashMap::new();
    let mut steps: Vec<SequenceStep> = job
        .prompts
        .iter()
        .map(|p| {
            let mut table = Vec::new();
            allocator.grow(&mut table, p.len());
            SequenceStep {
                tokens: p.clone(),
                start_position: 0,
                block_table: table,
                all_logits: false,
            }
        })
        .collect();

    let started = Instant::now();
    let logits = model.forward(&steps, selection, &mut cache)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let mut last_rows = Vec::with_capacity(steps.len());
    let mut offset = 0i64;
    for (i, p) in job.prompts.iter().enumerate() {
        let rows = if dump { p.len() as i64 } else { 1 };
        if dump {
            dumped.insert(
                format!("p{i}.prefill_logits"),
                logits.narrow(0, offset, rows),
            );
        }
        last_rows.push(logits.get(offset + rows - 1));
        offset += rows;
    }
    let mut chosen: Vec<Vec<i64>> = last_rows
        .iter()
        .map(|r| vec![r.argmax(-1, false).int64_value(&[])])
        .collect();
    let mut decode_logits: Vec<Vec<Tensor>> = (0..steps.len()).map(|_| Vec::new()).collect();

    let decode_started = Instant::now();
    for step in 0..job.max_new_tokens - 1 {
        for (i, seq) in steps.iter_mut().enumerate() {
            let fed = match &job.force_tokens {
                Some(forced) => forced[i][step],
                None => *chosen[i].last().expect("one token per step"),
            };
            seq.start_position += seq.tokens.len();
            seq.tokens = vec![fed];
            let needed = seq.start_position + 1;
            if !allocator.grow(&mut seq.block_table, needed) {
                bail!("KV cache exhausted");
            }
        }
        let logits = model.forward(&steps, LogitsSelection::LastTokens, &mut cache)?;
        let next = logits.argmax(-1, false);
        for i in 0..steps.len() {
            chosen[i].push(next.int64_value(&[i as i64]));
            if dump {
                decode_logits[i].push(logits.get(i as i64));
            }
        }
    }
    let decode_seconds = decode_started.elapsed().as_secs_f64();

    if let (Some(path), 0) = (&job.dump_logits, rank) {
        for (i, rows) in decode_logits.into_iter().enumerate() {
            if !rows.is_empty() {
                dumped.insert(format!("p{i}.decode_logits"), Tensor::stack(&rows, 0));
            }
            dumped.insert(format!("p{i}.tokens"), Tensor::from_slice(&chosen[i]));
        }
        write_safetensors(path, &dumped)?;
    }
    Ok(GenerateReport {
        tokens: chosen,
        prefill_tokens: job.prompts.iter().map(Vec::len).sum(),
        prefill_seconds,
        decode_tokens: (job.max_new_tokens - 1) * job.prompts.len(),
        decode_seconds,
    })
}

fn write_safetensors(path: &std::path::Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut owned = Vec::new();
    for (name, t) in tensors {
        let t = t.contiguous();
        let (dtype, kind) = match t.kind() {
            Kind::Int64 => (safetensors::Dtype::I64, Kind::Int64),
            _ => (safetensors::Dtype::F32, Kind::Float),
        };
        let t = t.to_kind(kind);
        let mut bytes = vec![0u8; t.numel() * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype, shape, bytes));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            Ok((
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
