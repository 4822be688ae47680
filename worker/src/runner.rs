//! The model runner: a worker's model shard, KV cache and per-sequence state ([`Sequences`]),
//! and the two things done with them, loading a shard and running a step.
//!
//! tch tensors are `Send` but not `Sync`, and a rank's collectives must run in order, so one
//! caller at a time holds the runner ([`SharedRunner`], a mutex). The gRPC step handler runs the
//! step itself, on the async thread that decoded the request, and answers from there: a step is
//! then no thread hand-off away from its request and its answer (the hand-offs to and from a
//! dedicated model thread cost 0.1-0.2 ms each on two cores, docs/BENCHMARKS.md). Blocking that
//! async thread for a step is the point; the step first hands the thread's other tasks to
//! another thread (`block_in_place`), so `Health` is answered meanwhile.
//! A load takes seconds to minutes, so it runs on a blocking thread.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use caravan_ops::{
    comm::RingListener, Checkpoint, Communicator, DType, KvCache, Llama, LlamaConfig, LoadOptions,
    LogitsSelection, Quantization, ShardLayout, VocabSharding,
};
use caravan_proto as pb;
use tch::Device;
use tonic::Status;

use crate::{
    cache_sizing::{cache_blocks, CacheRequest, LoadedShard},
    faults::{Fault, FaultKind},
    sequences::Sequences,
    step_sampling::{self, SamplingPlace},
};

/// State shared with the gRPC handlers (read-only for them).
#[derive(Debug, Clone, Default)]
pub struct RunnerStatus {
    pub rank: Option<u32>,
    pub ready: bool,
    pub detail: String,
}

/// Shared view of the runner's health.
pub type SharedStatus = Arc<Mutex<RunnerStatus>>;

/// The runner, held by whoever loads or steps.
pub type SharedRunner = Arc<Mutex<ModelRunner>>;

struct Loaded {
    model: Llama,
    comm: Arc<Communicator>,
    cache: KvCache,
    sequences: Sequences,
    rank: u32,
    /// libtorch's intra-op threads for this shard. OpenMP keeps the count per thread, and steps
    /// run on whichever async thread received them, so each step sets it where it runs.
    threads: i32,
    next_step: u64,
}

/// A worker's model state: the device, the ring listener, and the loaded shard if any.
pub struct ModelRunner {
    device: Device,
    /// Kept for the worker's lifetime: every formation of a group joins the ring through it.
    listener: RingListener,
    loaded: Option<Loaded>,
    status: SharedStatus,
    /// A fault to inject, for recovery tests ([`crate::faults`]).
    fault: Option<Fault>,
}

impl ModelRunner {
    pub fn new(
        device: Device,
        listener: RingListener,
        status: SharedStatus,
        fault: Option<Fault>,
    ) -> Self {
        ModelRunner {
            device,
            listener,
            loaded: None,
            status,
            fault,
        }
    }

    /// The step this runner runs next (`u64::MAX` without a shard: a step waiting for its turn
    /// goes on to be refused).
    pub fn next_step(&self) -> u64 {
        self.loaded.as_ref().map_or(u64::MAX, |l| l.next_step)
    }

    /// Runs step `req` under `span`; a failure other than a refusal leaves the group unusable
    /// (a collective failed, or the rank's state is lost), and `Health` says so from then on.
    pub fn serve_step(
        &mut self,
        req: pb::StepRequest,
        span: &tracing::Span,
    ) -> Result<pb::StepResponse, Status> {
        let step = req.step_id;
        let result = span
            .in_scope(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(req))));
        // A panic (a bug) may have left the cache, the sequences or the collective half-way:
        // the shard is dropped, so this rank answers nothing but "not ready" until the group is
        // formed again, and the step's answer says why instead of a dropped stream.
        let result = result.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            self.loaded = None;
            tracing::error!(step, %why, "a step panicked; the shard is dropped");
            Err(Status::internal(format!(
                "step {step} panicked ({why}); the rank dropped its shard until the group is \
                 formed again"
            )))
        });
        if let Err(e) = &result {
            if !matches!(
                e.code(),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ) {
                self.set_status(false, e.message().to_string());
            }
        }
        result
    }

    fn set_status(&self, ready: bool, detail: String) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.ready = ready;
        s.detail = detail;
    }

    /// Loads the shard `req` assigns, joining its group's collective (seconds to minutes).
    pub fn load(&mut self, req: pb::LoadShardRequest) -> Result<pb::LoadShardResponse, Status> {
        let started = Instant::now();
        if self.loaded.take().is_some() {
            // A new formation of the group (after a failure): the old shard, cache and ring go.
            tracing::info!("dropping the loaded shard to join a new group");
        }
        self.set_status(false, "loading a shard".into());
        let invalid = |e: String| Status::invalid_argument(e);
        let dtype = match req.dtype() {
            pb::Dtype::Unspecified => return Err(invalid("no dtype given".into())),
            pb::Dtype::F32 => DType::F32,
            pb::Dtype::F16 => DType::F16,
            pb::Dtype::Bf16 => DType::BF16,
        };
        let vocab = match req.vocab_sharding() {
            pb::VocabSharding::Auto => VocabSharding::Auto,
            pb::VocabSharding::Replicated => VocabSharding::Replicated,
            pb::VocabSharding::Parallel => VocabSharding::Parallel,
        };
        let (rank, world) = (req.rank as usize, req.world_size as usize);
        if req.block_size == 0 {
            return Err(invalid("block_size must be positive".into()));
        }
        let path = std::path::Path::new(&req.model_path);
        let config = LlamaConfig::from_path(path).map_err(|e| invalid(e.to_string()))?;
        let layout =
            ShardLayout::new(&config, rank, world, vocab).map_err(|e| invalid(e.to_string()))?;
        let checkpoint = Checkpoint::open(path).map_err(|e| invalid(e.to_string()))?;
        // 0 keeps libtorch's own count (the cores, or OMP_NUM_THREADS); the decode pool follows
        // it either way, or products would run on one thread.
        let threads = match req.threads {
            0 => tch::get_num_threads().max(1) as usize,
            n => n as usize,
        };
        caravan_ops::cpu::set_threads(threads).map_err(|e| invalid(e.to_string()))?;
        let timeout = std::time::Duration::from_millis(req.collective_timeout_ms.max(1) as u64);
        let comm = if !req.nccl_id.is_empty() {
            crate::nccl_group::join(rank, world, &req.nccl_id, self.device, timeout)?
        } else if world == 1 {
            Communicator::Single
        } else {
            // Host names are allowed (e.g. Kubernetes DNS); resolve each to its first address.
            let peers = req
                .ring_peers
                .iter()
                .map(|p| {
                    std::net::ToSocketAddrs::to_socket_addrs(p.as_str())
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| invalid(format!("cannot resolve ring peer address {p:?}")))
                })
                .collect::<Result<Vec<std::net::SocketAddr>, _>>()?;
            if peers.len() != world {
                return Err(invalid(format!(
                    "{} ring peers for world size {world}",
                    peers.len()
                )));
            }
            Communicator::TcpRing(
                self.listener
                    .connect(rank, &peers, timeout, req.group_epoch, &req.ring_secret)
                    .map_err(|e| Status::unavailable(e.to_string()))?,
            )
        };
        let quantization = match req.quantization() {
            pb::Quantization::None => None,
            pb::Quantization::Int8 => Some(Quantization::Int8),
            pb::Quantization::Q4 => Some(Quantization::Q4),
        };
        let options = LoadOptions {
            dtype,
            device: self.device,
            show_progress: false,
            quantization,
        };
        let comm = Arc::new(comm);
        let model = Llama::load(&checkpoint, &config, layout, comm.clone(), options).map_err(
            |e| match e {
                caravan_ops::Error::Unsupported(m) => Status::invalid_argument(m),
                other => Status::internal(format!("loading shard: {other}")),
            },
        )?;
        let bytes_per_block = model.cache_bytes_per_token() as u64 * req.block_size as u64;
        let shard = LoadedShard {
            weight_bytes: model.weight_bytes() as u64,
            scratch_bytes: model.step_scratch_bytes(
                req.max_num_batched_tokens as usize,
                req.max_num_seqs as usize,
                req.max_model_len as usize,
            ) as u64,
            bytes_per_block,
        };
        let request = CacheRequest {
            blocks: req.kv_cache_blocks as u64,
            budget_bytes: req.kv_cache_memory_bytes,
            memory_utilization: req.memory_utilization,
            device_sharers: req.device_sharers,
        };
        let device = self.device;
        let blocks = cache_blocks(&request, &shard, || crate::device::memory(device))?;
        let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
        let cache = model
            .new_cache(blocks as usize, req.block_size as usize)
            .map_err(|e| Status::resource_exhausted(format!("allocating KV cache: {e}")))?;
        // Measured with the shard and the cache in place; a device that cannot say gives 0s.
        let memory =
            crate::device::memory(device).unwrap_or(caravan_ops::MemoryInfo { free: 0, total: 0 });
        let response = pb::LoadShardResponse {
            kv_cache_blocks: blocks,
            cache_bytes_per_token: model.cache_bytes_per_token() as u64,
            load_ms: started.elapsed().as_millis() as u64,
            weight_bytes: shard.weight_bytes,
            kv_cache_bytes: blocks as u64 * bytes_per_block,
            memory_total_bytes: memory.total,
            memory_free_bytes: memory.free,
            kernels: model.kernels(),
        };
        self.loaded = Some(Loaded {
            model,
            comm,
            cache,
            sequences: Sequences::default(),
            rank: req.rank,
            threads: threads as i32,
            next_step: 0,
        });
        {
            let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
            s.rank = Some(req.rank);
            s.ready = true;
            s.detail.clear();
        }
        tracing::info!(
            rank,
            world,
            load_ms = response.load_ms,
            weight_bytes = response.weight_bytes,
            kv_cache_blocks = response.kv_cache_blocks,
            kv_cache_bytes = response.kv_cache_bytes,
            memory_free_bytes = response.memory_free_bytes,
            "shard loaded"
        );
        Ok(response)
    }

    fn step(&mut self, req: pb::StepRequest) -> Result<pb::StepResponse, Status> {
        let started = Instant::now();
        let loaded = self
            .loaded
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("no shard loaded"))?;
        if req.step_id != loaded.next_step {
            // The coordinator's plan and this rank's state no longer agree.
            return Err(Status::failed_precondition(format!(
                "step {} out of order (expected {})",
                req.step_id, loaded.next_step
            )));
        }
        loaded.next_step += 1;
        if tch::get_num_threads() != loaded.threads {
            tch::set_num_threads(loaded.threads);
        }
        loaded.sequences.forget(&req.finished);
        let fault = self
            .fault
            .as_ref()
            .filter(|f| f.fires(req.step_id, loaded.rank))
            .map(|f| f.kind);
        if fault == Some(FaultKind::Reject) {
            return Err(Status::invalid_argument(format!(
                "injected fault: step {} refused",
                req.step_id
            )));
        }
        let batch = loaded
            .sequences
            .prepare(&req)
            .map_err(Status::failed_precondition)?;
        let logits = tracing::info_span!(
            "forward",
            tokens = batch.iter().map(|s| s.tokens.len()).sum::<usize>()
        )
        .in_scope(|| {
            loaded
                .model
                .forward(&batch, LogitsSelection::LastTokens, &mut loaded.cache)
        })
        .map_err(|e| match e {
            caravan_ops::Error::InvalidBatch(m) => Status::invalid_argument(m),
            other => Status::internal(other.to_string()),
        })?;
        if fault == Some(FaultKind::Panic) {
            panic!(
                "injected fault: a panic in the middle of step {}",
                req.step_id
            );
        }
        let choices = tracing::info_span!("sample").in_scope(|| {
            step_sampling::choose(
                &logits,
                &req,
                &batch,
                &mut loaded.sequences,
                SamplingPlace::for_device(self.device),
                fault == Some(FaultKind::Diverge),
            )
        })?;
        if let Some(FaultKind::Stall(pause)) = fault {
            std::thread::sleep(pause);
        }
        Ok(pb::StepResponse {
            tokens: choices.tokens,
            prompt_logprobs: choices.prompt_logprobs,
            compute_us: started.elapsed().as_micros() as u64,
            collective_us: loaded.comm.take_busy_micros(),
        })
    }
}
