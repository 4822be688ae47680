//! The coordinator's configuration: every flag of `caravan-coordinator` ([`ServeArgs`]) and the
//! checks that turn them and the checkpoint into what serving needs ([`ServedModel`]), made once
//! before anything starts.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use caravan_common::telemetry::LogFormat;
use caravan_common::units::{parse_bytes, parse_duration, parse_duration_or_zero};
use caravan_proto as pb;
use clap::{Args, ValueEnum};

use crate::{
    chat_template::{self, ChatTemplate},
    engine::EngineConfig,
    group::{Collective, ComputeDtype, KvCacheSize, Quantization},
    model_info::ModelInfo,
    scheduler::SchedulerConfig,
    structured::Grammars,
    tokenizer::Tokenizer,
};

/// Everything `caravan-coordinator` can be told.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Checkpoint folder: config.json, safetensors and tokenizer.json (same path on every worker).
    #[arg(long, env = "CARAVAN_MODEL")]
    pub model: PathBuf,
    /// Name the API serves the model under (default: the folder's name).
    #[arg(long, env = "CARAVAN_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Chat template: a Jinja file, or the template itself (default: the folder's
    /// chat_template.jinja, else tokenizer_config.json's chat_template, else Llama 2's).
    #[arg(long, env = "CARAVAN_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Tensor-parallel size: how many workers form the group.
    #[arg(
        long = "tensor-parallel-size",
        alias = "tp",
        env = "CARAVAN_TP",
        default_value_t = 1
    )]
    pub tp: usize,
    /// HTTP address to listen on (use 0.0.0.0 to serve other hosts).
    #[arg(long, env = "CARAVAN_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port (0 picks a free one; the ready line says which).
    #[arg(long, env = "CARAVAN_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Address of the registration service workers connect to.
    #[arg(long, env = "CARAVAN_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Start the workers as child processes on this machine (the registration service then
    /// listens on a free loopback port).
    #[arg(long, env = "CARAVAN_LOCAL_WORKERS")]
    pub local_workers: bool,
    /// With --local-workers: start this many spare workers too. A spare registers, waits, and
    /// takes a failed rank's place at once (loading that rank's shard); the coordinator restarts
    /// the dead worker, which becomes a spare in turn. Remote workers beyond --tp are spares too.
    #[arg(
        long,
        env = "CARAVAN_LOCAL_SPARES",
        default_value_t = 0,
        requires = "local_workers"
    )]
    pub local_spares: usize,
    /// Device for local workers: cpu or cuda:N.
    #[arg(long, env = "CARAVAN_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype (auto: the checkpoint's torch_dtype, float16 as bfloat16 on CPUs; float32
    /// when the checkpoint names none).
    #[arg(long, env = "CARAVAN_DTYPE", value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// Store the products' weights quantized, each rank its own slice at load: int8 (8-bit
    /// integers with one scale per block of 32 inputs, like llama.cpp's Q8_0) or q4 (4-bit, like
    /// its Q4_0; the LM head in 8 bits). Runs on Caravan's CPU kernels (x86-64 with AVX2), not
    /// yet on GPUs.
    #[arg(long, env = "CARAVAN_QUANTIZATION", value_enum)]
    pub quantization: Option<Quantization>,
    /// Embedding and LM head placement (auto: vocabulary-parallel when it divides evenly).
    #[arg(long, env = "CARAVAN_VOCAB_SHARDING", value_enum, default_value_t = VocabSharding::Auto)]
    pub vocab_sharding: VocabSharding,
    /// Longest sequence (prompt plus completion) served; default: the model's
    /// max_position_embeddings.
    #[arg(long, env = "CARAVAN_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// KV-cache memory per worker, e.g. 4GiB or 512MiB (default: see --kv-cache-memory-fraction).
    #[arg(long, env = "CARAVAN_KV_CACHE_MEMORY", value_parser = parse_bytes)]
    pub kv_cache_memory: Option<u64>,
    /// Without --kv-cache-memory: the share of each host's available memory (at registration)
    /// given to the KV caches of the group's workers on that host.
    #[arg(long, env = "CARAVAN_KV_CACHE_MEMORY_FRACTION", default_value_t = 0.2)]
    pub kv_cache_memory_fraction: f64,
    /// Without --kv-cache-memory, on CUDA ranks: the share of each GPU's memory a rank may fill
    /// with its weights, one step's scratch tensors and its KV cache (shared evenly by the
    /// group's ranks on one GPU); each rank sizes its cache from what is left once its weights
    /// are loaded (as vLLM's --gpu-memory-utilization).
    #[arg(long, env = "CARAVAN_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// Exact KV-cache size in tokens, overriding the memory-based size (e.g. a deliberately
    /// small cache).
    #[arg(long, env = "CARAVAN_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// Tokens per KV-cache block.
    #[arg(long, env = "CARAVAN_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Reuse the KV-cache blocks of identical prompt prefixes (default on).
    #[arg(long, env = "CARAVAN_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Most sequences in the running batch.
    #[arg(
        long,
        alias = "max-num-seqs",
        env = "CARAVAN_MAX_BATCH_SIZE",
        default_value_t = 64
    )]
    pub max_batch_size: usize,
    /// Most tokens computed in one step: decodes plus prefill chunks (a longer prompt is split
    /// across steps).
    #[arg(long, env = "CARAVAN_MAX_NUM_BATCHED_TOKENS", default_value_t = 1024)]
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for a batch slot; beyond it, 429.
    #[arg(long, env = "CARAVAN_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// How long a collective waits for a peer before the step fails (e.g. 30s, 500ms; a bare
    /// number is seconds).
    #[arg(long, env = "CARAVAN_COLLECTIVE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub collective_timeout: Duration,
    /// What the ranks exchange activations over: auto (NCCL when every rank is on a CUDA device
    /// and there are two or more, else the TCP ring), tcp, or nccl (a group of one included).
    #[arg(long, env = "CARAVAN_COLLECTIVE", value_enum, default_value_t = Collective::Auto)]
    pub collective: Collective,
    /// How long a request waits, its stream open, for the worker group to be formed again
    /// after a rank failed, before it ends with an error (the requests in flight are
    /// recomputed on the new group and go on); 0 ends them at once.
    #[arg(long, env = "CARAVAN_RECOVERY_TIMEOUT", default_value = "60s", value_parser = parse_duration_or_zero)]
    pub recovery_timeout: Duration,
    /// Plan and send each decode step while the step before it still runs, so the coordinator's
    /// round trip leaves the critical path (vLLM's async scheduling): each rank feeds the token
    /// it sampled into the next step, and a sequence found finished one step late costs one
    /// wasted token slot, never shown. Off by default while it is proven equal to the synchronous
    /// path.
    #[arg(long, env = "CARAVAN_ASYNC_SCHEDULING")]
    pub async_scheduling: bool,
    /// libtorch threads per worker (0: cores / tp for local workers, libtorch's default otherwise).
    #[arg(long, env = "CARAVAN_THREADS_PER_WORKER", default_value_t = 0)]
    pub threads_per_worker: u32,
    /// Keep cluster state in etcd (comma-separated endpoints): workers register there, and
    /// coordinators sharing it elect a leader (the others answer 503 until they lead).
    #[arg(long, env = "CARAVAN_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "CARAVAN_ETCD_PREFIX", default_value = caravan_proto::etcd::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// Seconds the leadership outlives a dead leader (a standby takes over after it).
    #[arg(long, env = "CARAVAN_ETCD_LEASE_TTL", default_value_t = 5)]
    pub etcd_lease_ttl: i64,
    /// The URL clients reach this coordinator by, announced when it leads (default:
    /// http://HOST:PORT from --host and the bound port).
    #[arg(long, env = "CARAVAN_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// While another coordinator leads, send completions, chat completions, /health and the
    /// status pages on to it (the URL it announced) and stream its answers back, instead of
    /// answering 503 "standby": every coordinator then serves, and is ready, once the leader is.
    #[arg(long, env = "CARAVAN_FORWARD_TO_LEADER", requires = "etcd_endpoints")]
    pub forward_to_leader: bool,
    /// Log format on stderr (local workers get the same).
    #[arg(long, env = "CARAVAN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector (default:
    /// OTEL_EXPORTER_OTLP_ENDPOINT, if set). Local workers get the same endpoint.
    #[arg(long, env = "CARAVAN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub tls: caravan_common::tls::TlsArgs,
    #[command(flatten)]
    pub etcd_tls: caravan_common::tls::EtcdTlsArgs,
    /// Require `Authorization: Bearer KEY` on the HTTP API (repeat, or comma-separate, for
    /// several keys).
    #[arg(
        long,
        env = "CARAVAN_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,
    /// A file of API keys, one per line (`#` comments allowed); combines with --api-key.
    #[arg(long, env = "CARAVAN_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// With API keys, still answer /health and /metrics without one (probes, Prometheus).
    #[arg(long, env = "CARAVAN_PUBLIC_HEALTH_AND_METRICS")]
    pub public_health_and_metrics: bool,
    /// How long a drain (SIGTERM, `caravanctl drain`) lets requests in flight finish before
    /// ending them with an error (e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, env = "CARAVAN_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Compute dtype of the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    Auto,
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// What the group computes in, given the checkpoint's own dtype.
    pub fn choice(self, checkpoint: Option<caravan_checkpoint::DType>) -> ComputeDtype {
        match self {
            Dtype::Auto => ComputeDtype::Auto(checkpoint),
            Dtype::F32 => ComputeDtype::Fixed(pb::Dtype::F32),
            Dtype::F16 => ComputeDtype::Fixed(pb::Dtype::F16),
            Dtype::Bf16 => ComputeDtype::Fixed(pb::Dtype::Bf16),
        }
    }
}

/// Where the embedding and the LM head live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VocabSharding {
    Auto,
    Replicated,
    Parallel,
}

impl From<VocabSharding> for caravan_checkpoint::VocabSharding {
    fn from(v: VocabSharding) -> Self {
        match v {
            VocabSharding::Auto => Self::Auto,
            VocabSharding::Replicated => Self::Replicated,
            VocabSharding::Parallel => Self::Parallel,
        }
    }
}

impl From<VocabSharding> for pb::VocabSharding {
    fn from(v: VocabSharding) -> Self {
        match v {
            VocabSharding::Auto => pb::VocabSharding::Auto,
            VocabSharding::Replicated => pb::VocabSharding::Replicated,
            VocabSharding::Parallel => pb::VocabSharding::Parallel,
        }
    }
}

/// What the flags say about the model and its limits, checked once before anything starts.
pub struct ServedModel {
    pub model_dir: PathBuf,
    pub model: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Arc<ChatTemplate>,
    pub grammars: Arc<Grammars>,
    pub kv_cache: KvCacheSize,
    pub engine: EngineConfig,
}

impl ServedModel {
    pub fn load(args: &ServeArgs) -> Result<Self> {
        let model_dir = std::fs::canonicalize(&args.model)
            .with_context(|| format!("model folder {}", args.model.display()))?;
        let name = args.served_model_name.clone().unwrap_or_else(|| {
            model_dir
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())
        });
        let mut model = ModelInfo::load(&model_dir, name, args.tp, args.vocab_sharding.into())?;
        if let Some(len) = args.max_model_len {
            if len == 0 || len > model.max_context {
                bail!(
                    "--max-model-len {len} must be between 1 and the model's context, {}",
                    model.max_context
                );
            }
            model.max_context = len;
        }
        let tokenizer = Arc::new(Tokenizer::load(&model_dir)?);
        let known_special_tokens = chat_template::special_tokens_from_ids(
            |id| tokenizer.token(id),
            model.bos_token_id,
            &model.eos_token_ids,
        );
        let chat_template = Arc::new(ChatTemplate::load(
            &model_dir,
            args.chat_template.as_deref(),
            &known_special_tokens,
        )?);
        tracing::info!(origin = %chat_template.origin(), "chat template");
        let grammars = Arc::new(Grammars::load(
            &model_dir,
            model.vocab_size,
            &model.eos_token_ids,
        ));
        if args.local_workers && args.quantization.is_some() && args.device != "cpu" {
            bail!(
                "--quantization {} runs on CPU ranks only for now, but the local workers run on \
                 --device {}",
                args.quantization.map(|q| q.as_str()).unwrap_or_default(),
                args.device
            );
        }
        if args.local_workers && args.collective == Collective::Nccl && args.device == "cpu" {
            bail!("--collective nccl needs CUDA ranks, but the local workers run on --device cpu");
        }
        if args.block_size == 0 || args.max_batch_size == 0 {
            bail!("--block-size and --max-batch-size must be positive");
        }
        if args.max_num_batched_tokens < args.max_batch_size {
            bail!(
                "--max-num-batched-tokens ({}) must be at least --max-batch-size ({}): every \
                 running sequence decodes one token per step",
                args.max_num_batched_tokens,
                args.max_batch_size
            );
        }
        if !(args.kv_cache_memory_fraction > 0.0 && args.kv_cache_memory_fraction <= 1.0) {
            bail!("--kv-cache-memory-fraction must be in (0, 1]");
        }
        if !(args.gpu_memory_utilization > 0.0 && args.gpu_memory_utilization <= 1.0) {
            bail!("--gpu-memory-utilization must be in (0, 1]");
        }
        let block_size = args.block_size;
        let kv_cache = match args.kv_cache_tokens {
            Some(tokens) => KvCacheSize::Blocks(tokens.div_ceil(block_size) as u32),
            None => KvCacheSize::Memory {
                per_rank_bytes: args.kv_cache_memory,
                fraction: args.kv_cache_memory_fraction,
                gpu_memory_utilization: args.gpu_memory_utilization,
                // More than every batch slot at full context is never used.
                max_blocks: (args.max_batch_size * model.max_context).div_ceil(block_size) as u32,
            },
        };
        let engine = EngineConfig {
            scheduler: SchedulerConfig {
                max_batch_size: args.max_batch_size,
                max_batched_tokens: args.max_num_batched_tokens,
                max_waiting: args.max_waiting.max(1),
            },
            recovery_timeout: args.recovery_timeout,
            async_scheduling: args.async_scheduling,
        };
        Ok(ServedModel {
            model_dir,
            model,
            tokenizer,
            chat_template,
            grammars,
            kv_cache,
            engine,
        })
    }
}
