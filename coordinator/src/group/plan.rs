//! How a group's shards are loaded: the compute dtype, quantization, collective and step limits
//! sent to every rank with its shard, and each rank's KV-cache size.

use std::time::Duration;

use anyhow::{bail, Result};
use caravan_proto as pb;

use crate::registry::RegisteredWorker;

/// How to load the group's shards.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub model_path: String,
    pub dtype: ComputeDtype,
    pub quantization: Option<Quantization>,
    pub vocab_sharding: pb::VocabSharding,
    pub kv_cache: KvCacheSize,
    pub block_size: u32,
    pub collective_timeout: Duration,
    pub collective: Collective,
    pub threads_per_worker: u32,
    pub step_limits: StepLimits,
    /// Mutual TLS towards the workers, when the cluster uses it.
    pub tls: Option<caravan_common::tls::ClusterTls>,
}

/// `--quantization`: how the ranks store their products' weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantization {
    /// 8-bit integers, one f32 scale per block of 32 inputs.
    Int8,
    /// 4-bit integers, one f32 scale per block of 32 inputs (llama.cpp's Q4_0); the LM head in
    /// 8 bits.
    Q4,
}

impl Quantization {
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::Int8 => "int8",
            Quantization::Q4 => "q4",
        }
    }
}

/// What `LoadShard` says for `--quantization` (or its absence).
pub(super) fn quantization_to_pb(q: Option<Quantization>) -> pb::Quantization {
    match q {
        None => pb::Quantization::None,
        Some(Quantization::Int8) => pb::Quantization::Int8,
        Some(Quantization::Q4) => pb::Quantization::Q4,
    }
}

/// `--collective`: what the ranks of a group exchange activations over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Collective {
    /// NCCL when every rank is on a CUDA device and there are two or more; else the TCP ring.
    Auto,
    /// The TCP ring always (e.g. several ranks sharing one GPU, which NCCL refuses).
    Tcp,
    /// NCCL always, a group of one rank included (every rank must be on a CUDA device).
    Nccl,
}

impl Collective {
    /// Whether a group of `world` ranks, all on CUDA devices (`on_cuda`) or not, joins NCCL.
    pub fn uses_nccl(self, on_cuda: bool, world: usize) -> Result<bool> {
        match self {
            Collective::Auto => Ok(on_cuda && world > 1),
            Collective::Tcp => Ok(false),
            Collective::Nccl if on_cuda => Ok(true),
            Collective::Nccl => bail!("--collective nccl needs every rank on a CUDA device"),
        }
    }
}

/// The dtype the ranks compute in: fixed by the operator, or (`--dtype auto`, as vLLM's) the
/// checkpoint's own, chosen when the group's devices are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    Fixed(pb::Dtype),
    /// The checkpoint's `torch_dtype` (none: float32, as transformers loads it).
    Auto(Option<caravan_checkpoint::DType>),
}

impl ComputeDtype {
    /// The dtype for a group on GPUs (`gpu`) or on CPUs: float16 checkpoints compute in
    /// bfloat16 on CPUs, where libtorch's float16 matrix products are far slower.
    pub fn resolve(self, gpu: bool) -> pb::Dtype {
        use caravan_checkpoint::DType;
        match self {
            ComputeDtype::Fixed(dtype) => dtype,
            ComputeDtype::Auto(None | Some(DType::F32)) => pb::Dtype::F32,
            ComputeDtype::Auto(Some(DType::BF16)) => pb::Dtype::Bf16,
            ComputeDtype::Auto(Some(DType::F16)) if gpu => pb::Dtype::F16,
            ComputeDtype::Auto(Some(DType::F16)) => pb::Dtype::Bf16,
        }
    }
}

/// The scheduler's limits on a step, which bound the scratch tensors a GPU rank keeps room for
/// when it sizes its own cache.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    pub max_num_batched_tokens: u32,
    pub max_num_seqs: u32,
    pub max_model_len: u32,
}

/// How big each rank's KV cache is.
#[derive(Debug, Clone)]
pub enum KvCacheSize {
    /// Exactly this many blocks.
    Blocks(u32),
    /// As many blocks as fit in a memory budget, at most `max_blocks`.
    Memory {
        /// Bytes per rank; `None`: on a CPU rank, `fraction` of the memory the worker's host had
        /// available at registration, shared among the group's workers on that host; on a CUDA
        /// rank, what `gpu_memory_utilization` of its GPU leaves once its weights are loaded,
        /// which the rank works out itself.
        per_rank_bytes: Option<u64>,
        fraction: f64,
        gpu_memory_utilization: f32,
        max_blocks: u32,
    },
}

/// The KV-cache size one rank's `LoadShard` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankCache {
    pub blocks: u32,
    pub memory_bytes: u64,
    pub memory_utilization: f32,
    /// The group's ranks on the same device as this one (with a utilization).
    pub device_sharers: u32,
}

impl KvCacheSize {
    /// What `worker`'s `LoadShard` asks for, given the group's workers `all`.
    pub fn for_worker(&self, worker: &RegisteredWorker, all: &[RegisteredWorker]) -> RankCache {
        let exact = |blocks, memory_bytes| RankCache {
            blocks,
            memory_bytes,
            memory_utilization: 0.0,
            device_sharers: 0,
        };
        match *self {
            KvCacheSize::Blocks(n) => exact(n, 0),
            KvCacheSize::Memory {
                per_rank_bytes: Some(bytes),
                max_blocks,
                ..
            } => exact(max_blocks, bytes.max(1)),
            KvCacheSize::Memory {
                per_rank_bytes: None,
                gpu_memory_utilization,
                max_blocks,
                ..
            } if worker.device.starts_with("cuda") => RankCache {
                blocks: max_blocks,
                memory_bytes: 0,
                memory_utilization: gpu_memory_utilization,
                device_sharers: all
                    .iter()
                    .filter(|w| w.host == worker.host && w.device == worker.device)
                    .count()
                    .max(1) as u32,
            },
            KvCacheSize::Memory {
                per_rank_bytes: None,
                fraction,
                max_blocks,
                ..
            } => {
                let same_host = all.iter().filter(|w| w.host == worker.host).count().max(1);
                let bytes = (worker.memory_bytes as f64 * fraction / same_host as f64) as u64;
                exact(max_blocks, bytes.max(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collective_follows_the_devices_and_the_flag() {
        use Collective::*;
        assert!(!Auto.uses_nccl(false, 4).unwrap());
        assert!(
            !Auto.uses_nccl(true, 1).unwrap(),
            "one rank needs no NCCL group"
        );
        assert!(Auto.uses_nccl(true, 2).unwrap());
        assert!(!Tcp.uses_nccl(true, 2).unwrap());
        assert!(Nccl.uses_nccl(true, 1).unwrap());
        let refused = Nccl.uses_nccl(false, 2).unwrap_err().to_string();
        assert!(refused.contains("CUDA"), "{refused}");
    }

    fn registered(host: &str, device: &str, memory_bytes: u64) -> RegisteredWorker {
        RegisteredWorker {
            id: format!("{host}/{device}"),
            worker_addr: String::new(),
            ring_addr: String::new(),
            host: host.into(),
            device: device.into(),
            memory_bytes,
            last_seen: std::time::Instant::now(),
        }
    }

    #[test]
    fn gpu_ranks_size_their_own_cache_and_cpu_ranks_get_a_budget() {
        const GIB: u64 = 1 << 30;
        let size = KvCacheSize::Memory {
            per_rank_bytes: None,
            fraction: 0.25,
            gpu_memory_utilization: 0.9,
            max_blocks: 500,
        };
        let gpus = [
            registered("a", "cuda:0", 80 * GIB),
            registered("a", "cuda:0", 80 * GIB),
            registered("a", "cuda:1", 80 * GIB),
            registered("b", "cuda:0", 80 * GIB),
        ];
        // Two ranks share a:cuda:0; the others have a GPU each.
        let sharers: Vec<u32> = gpus
            .iter()
            .map(|w| size.for_worker(w, &gpus).device_sharers)
            .collect();
        assert_eq!(sharers, [2, 2, 1, 1]);
        let gpu = size.for_worker(&gpus[2], &gpus);
        assert_eq!((gpu.blocks, gpu.memory_bytes), (500, 0));
        assert_eq!(gpu.memory_utilization, 0.9);
        // CPU ranks: a quarter of what each host had available, shared by its ranks.
        let cpus = [
            registered("a", "cpu", 16 * GIB),
            registered("a", "cpu", 16 * GIB),
            registered("b", "cpu", 16 * GIB),
        ];
        let budgets: Vec<RankCache> = cpus.iter().map(|w| size.for_worker(w, &cpus)).collect();
        assert_eq!(budgets[0].memory_bytes, 2 * GIB);
        assert_eq!(budgets[2].memory_bytes, 4 * GIB);
        assert!(budgets.iter().all(|b| b.memory_utilization == 0.0));
        // An explicit per-rank budget holds on GPUs too.
        let fixed = KvCacheSize::Memory {
            per_rank_bytes: Some(3 * GIB),
            fraction: 0.25,
            gpu_memory_utilization: 0.9,
            max_blocks: 500,
        };
        let gpu = fixed.for_worker(&gpus[0], &gpus);
        assert_eq!((gpu.memory_bytes, gpu.memory_utilization), (3 * GIB, 0.0));
    }

    #[test]
    fn auto_dtype_is_the_checkpoints_with_float16_as_bfloat16_on_cpus() {
        use caravan_checkpoint::DType;
        let auto = |d| ComputeDtype::Auto(d);
        assert_eq!(auto(None).resolve(false), pb::Dtype::F32);
        assert_eq!(auto(Some(DType::F32)).resolve(true), pb::Dtype::F32);
        assert_eq!(auto(Some(DType::BF16)).resolve(false), pb::Dtype::Bf16);
        assert_eq!(auto(Some(DType::F16)).resolve(true), pb::Dtype::F16);
        assert_eq!(auto(Some(DType::F16)).resolve(false), pb::Dtype::Bf16);
        let fixed = ComputeDtype::Fixed(pb::Dtype::F16);
        assert_eq!(
            fixed.resolve(false),
            pb::Dtype::F16,
            "the operator's choice stands"
        );
    }
}
