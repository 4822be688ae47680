//! Wiring the coordinator together: configuration, start-up order, health monitoring, shutdown.

use std::{
    future::IntoFuture,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use caravan_proto::coordinator_server::CoordinatorServer;
use clap::Args;

use crate::{
    api::{self, AppState},
    blocks::BlockManager,
    engine::{Engine, SchedulerConfig},
    group::{GroupHealth, KvCacheSize, ShardPlan, WorkerGroup},
    local_workers::LocalWorkers,
    model_info::ModelInfo,
    registry::{CoordinatorService, Registry, HEARTBEAT_INTERVAL},
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
    /// Device for local workers: cpu or cuda:N.
    #[arg(long, env = "CARAVAN_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, env = "CARAVAN_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Embedding and LM head placement: auto, replicated or parallel.
    #[arg(long, env = "CARAVAN_VOCAB_SHARDING", default_value = "auto")]
    pub vocab_sharding: String,
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
    /// Seconds a collective waits for a peer before the step fails.
    #[arg(long, env = "CARAVAN_COLLECTIVE_TIMEOUT", default_value_t = 30)]
    pub collective_timeout: u64,
    /// libtorch threads per worker (0: cores / tp for local workers, libtorch's default otherwise).
    #[arg(long, env = "CARAVAN_THREADS_PER_WORKER", default_value_t = 0)]
    pub threads_per_worker: u32,
}

/// Runs the coordinator until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    if args.tp == 0 {
        bail!("--tensor-parallel-size must be at least 1");
    }
    let model_dir = std::fs::canonicalize(&args.model)
        .with_context(|| format!("model folder {}", args.model.display()))?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        model_dir
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let mut model = ModelInfo::load(&model_dir, name)?;
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
    if args.block_size == 0 || args.max_batch_size == 0 {
        bail!("--block-size and --max-batch-size must be positive");
    }
    if args.max_num_batched_tokens < args.max_batch_size {
        bail!(
            "--max-num-batched-tokens ({}) must be at least --max-batch-size ({}): every running \
             sequence decodes one token per step",
            args.max_num_batched_tokens,
            args.max_batch_size
        );
    }
    if !(args.kv_cache_memory_fraction > 0.0 && args.kv_cache_memory_fraction <= 1.0) {
        bail!("--kv-cache-memory-fraction must be in (0, 1]");
    }
    let block_size = args.block_size;
    let kv_cache = match args.kv_cache_tokens {
        Some(tokens) => KvCacheSize::Blocks(tokens.div_ceil(block_size) as u32),
        None => KvCacheSize::Memory {
            per_rank_bytes: args.kv_cache_memory,
            fraction: args.kv_cache_memory_fraction,
            // More than every batch slot at full context is never used.
            max_blocks: (args.max_batch_size * model.max_context).div_ceil(block_size) as u32,
        },
    };

    let health = Arc::new(GroupHealth::default());
    let state = Arc::new(AppState {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        health: health.clone(),
        engine: OnceLock::new(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let http = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding HTTP on {}:{}", args.host, args.port))?;
    let http_addr = http.local_addr()?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    // Graceful drain is the engine's job; the listener just stops with the process.
    let http_server = tokio::spawn(axum::serve(http, api::router(state.clone())).into_future());

    let registry = Arc::new(Registry::default());
    let grpc_addr = if args.local_workers {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        args.grpc_addr
    };
    let grpc = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("binding the registration service on {grpc_addr}"))?;
    let grpc_addr = grpc.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(CoordinatorService::new(
                registry.clone(),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    tracing::info!(%http_addr, %grpc_addr, tp = args.tp, "coordinator listening");

    let mut local = if args.local_workers {
        Some(LocalWorkers::spawn(
            args.tp,
            &format!("http://{grpc_addr}"),
            &args.device,
        )?)
    } else {
        eprintln!("waiting for {} workers to register at {grpc_addr}", args.tp);
        None
    };
    let threads = match (args.threads_per_worker, args.local_workers) {
        (0, true) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / args.tp).max(1) as u32
        }
        (n, _) => n,
    };
    let plan = ShardPlan {
        model_path: model_dir.display().to_string(),
        dtype: args.dtype.clone(),
        vocab_sharding: args.vocab_sharding.clone(),
        kv_cache: kv_cache.clone(),
        block_size: block_size as u32,
        collective_timeout: Duration::from_secs(args.collective_timeout.max(1)),
        threads_per_worker: threads,
    };
    let bring_up = async {
        let workers = registry.wait_for(args.tp).await;
        WorkerGroup::form(workers, &plan).await
    };
    let group = tokio::select! {
        group = bring_up => group.context("forming the worker group")?,
        reason = async { match &mut local { Some(l) => l.any_exit().await, None => std::future::pending().await } } => {
            bail!("{reason} before the group was formed");
        }
        _ = &mut shutdown => return Ok(()),
    };
    let kv_blocks = group.kv_cache_blocks();
    let kv_tokens = kv_blocks * block_size;
    if kv_tokens < model.max_context {
        bail!(
            "the KV cache holds {kv_tokens} tokens, less than one full-context sequence ({}): \
             give it more memory (--kv-cache-memory) or lower --max-model-len",
            model.max_context
        );
    }
    eprintln!(
        "KV cache: {kv_blocks} blocks of {block_size} tokens ({kv_tokens} tokens, {:.1} MiB per rank)",
        (kv_tokens as u64 * group.cache_bytes_per_token()) as f64 / (1u64 << 20) as f64
    );
    health.set_ready();
    let probe = group.health_probe();
    let worker_ids: Vec<String> = group.workers().iter().map(|w| w.id.clone()).collect();
    let engine = Engine::start(
        group,
        health.clone(),
        tokenizer,
        model.clone(),
        BlockManager::new(kv_blocks, block_size, !args.no_prefix_caching),
        SchedulerConfig {
            max_batch_size: args.max_batch_size,
            max_batched_tokens: args.max_num_batched_tokens,
            max_waiting: args.max_waiting.max(1),
        },
    );
    let _ = state.engine.set(engine);
    println!("ready: serving {} on http://{http_addr}", model.name);
    tracing::info!(kv_cache_tokens = kv_blocks * block_size, "ready");

    // Health: poll every rank, watch heartbeats and local processes.
    let monitor = {
        let health = health.clone();
        let registry = registry.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Some(problem) = probe.check().await {
                    health.fail(problem);
                }
                let seen = registry.last_seen();
                for id in &worker_ids {
                    if seen
                        .get(id)
                        .is_some_and(|t| t.elapsed() > HEARTBEAT_INTERVAL * 6)
                    {
                        health.fail(format!("{id} stopped sending heartbeats"));
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = monitor => {}
        reason = async { match &mut local { Some(l) => l.any_exit().await, None => std::future::pending().await } } => {
            health.fail(reason);
            // Keep serving errors (503) rather than vanishing; wait for shutdown.
            (&mut shutdown).await;
        }
        _ = &mut shutdown => {}
    }
    tracing::info!("shutting down");
    if let Some(local) = local {
        local.shutdown().await;
    }
    http_server.abort();
    Ok(())
}

/// Parses a byte size: a number with an optional unit (B, KiB, MiB, GiB, TiB, or KB/MB/GB/TB
/// as powers of 1000).
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 4GiB or 512MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let bytes = number * scale;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is not a positive size"));
    }
    Ok(bytes as u64)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
