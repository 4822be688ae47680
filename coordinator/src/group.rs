//! A tensor-parallel group of workers as the coordinator sees it: one gRPC client per rank, the
//! bring-up (load shards, warm up), and the lockstep step fan-out (the engine's
//! [`StepExecutor`] in production), with each failure sorted into a [`StepErrorKind`].

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};
use caravan_proto::{self as pb, worker_client::WorkerClient};
use futures::{future::join_all, stream::FuturesUnordered, StreamExt};
use tonic::transport::Channel;

use crate::{
    executor::{StepAnswer, StepError, StepErrorKind, StepExecutor, StepOutput, StepTimings},
    registry::RegisteredWorker,
    scheduler::{PlannedSequence, StepPlan},
};

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
fn quantization_to_pb(q: Option<Quantization>) -> pb::Quantization {
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

/// Whether the group can serve, and why not.
#[derive(Debug, Default)]
pub struct GroupHealth {
    ready: AtomicBool,
    /// Not ready because a group failed and the next is being formed: requests still queue.
    recovering: AtomicBool,
    reason: Mutex<String>,
}

impl GroupHealth {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_ready(&self) {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.recovering.store(false, Ordering::Release);
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the group failed and its requests wait for the next one (see
    /// [`GroupHealth::set_recovering`]).
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::Acquire)
    }

    /// The group failed and the next is being formed; the requests in flight wait for it.
    pub fn set_recovering(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        *r = format!("recovering: {}", reason.into());
        self.recovering.store(true, Ordering::Release);
        if self.ready.swap(false, Ordering::AcqRel) {
            tracing::error!(reason = %r, "worker group is not ready");
        }
    }

    /// The group failed: with `requests_wait` (a recovery timeout is set) requests queue for the
    /// next group ([`GroupHealth::set_recovering`]); without, they are refused until it is ready.
    pub fn set_lost(&self, reason: impl Into<String>, requests_wait: bool) {
        if requests_wait {
            self.set_recovering(reason);
        } else {
            self.fail(reason);
        }
    }

    /// Marks the group stopped on purpose (a normal shutdown: nothing to log as an error).
    pub fn shut_down(&self) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = "shut down".into();
        self.recovering.store(false, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }

    /// Not ready for a reason that is not a failure of the group (standby, campaigning): the
    /// reason replaces whatever was there.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
        self.recovering.store(false, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }

    /// Marks the group unusable (keeps the first reason).
    pub fn fail(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if self.ready.swap(false, Ordering::AcqRel) || r.is_empty() {
            *r = reason.into();
            tracing::error!(reason = %r, "worker group is not ready");
        }
    }
}

/// A worker in a formed group, with what its shard holds.
#[derive(Debug, Clone)]
pub struct GroupMember {
    pub worker: RegisteredWorker,
    pub memory: ShardMemory,
    /// What computes its weight products, as the rank said (empty from older workers).
    pub kernels: String,
}

/// What one rank's shard and cache take, and its device's memory once they were in place.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardMemory {
    /// Bytes of weights (quantized ones at their width).
    pub weight_bytes: u64,
    /// Bytes of the KV cache the rank allocated.
    pub kv_cache_bytes: u64,
    pub device_total_bytes: u64,
    pub device_free_bytes: u64,
}

impl From<&pb::LoadShardResponse> for ShardMemory {
    fn from(r: &pb::LoadShardResponse) -> Self {
        ShardMemory {
            weight_bytes: r.weight_bytes,
            kv_cache_bytes: r.kv_cache_bytes,
            device_total_bytes: r.memory_total_bytes,
            device_free_bytes: r.memory_free_bytes,
        }
    }
}

/// The ranks of one group, rank order.
pub struct WorkerGroup {
    ranks: Vec<WorkerClient<Channel>>,
    workers: Vec<RegisteredWorker>,
    /// Per rank.
    memory: Vec<ShardMemory>,
    /// Per rank: what computes its weight products.
    kernels: Vec<String>,
    kv_cache_blocks: usize,
    cache_bytes_per_token: u64,
    step_timeout: Duration,
    /// How long the other ranks may lag the first to answer a step.
    straggler_timeout: Duration,
    next_step: u64,
    /// Sequences to forget with the next step besides the plan's own (the warm-up's).
    pending_finished: Vec<u64>,
    /// Per rank, "rank R (ID at ADDR)", for messages; shared with every step sent.
    rank_names: Arc<[String]>,
}

/// How long the other ranks get to refuse a step one rank refused (refusals come before any
/// collective, within moments).
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

/// The sequence id of the warm-up step (never a request's: those count up from 1).
const WARM_UP_SEQUENCE: u64 = u64::MAX;

impl WorkerGroup {
    /// Connects to `workers` (rank = position), loads every shard concurrently and runs a warm-up
    /// step. Returns only when the group can serve.
    /// `epoch` numbers formations: ranks refuse ring connections from other ones.
    pub async fn form(
        workers: Vec<RegisteredWorker>,
        plan: &ShardPlan,
        epoch: u64,
    ) -> Result<Self> {
        let world = workers.len();
        let mut ranks = Vec::with_capacity(world);
        for w in &workers {
            let url = caravan_common::tls::with_scheme(&w.worker_addr, plan.tls.is_some());
            let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            if let Some(tls) = &plan.tls {
                endpoint = endpoint.tls_config(tls.client_config())?;
            }
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("connecting to worker {} at {url}", w.id))?;
            ranks.push(
                WorkerClient::new(channel)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            );
        }
        // What each rank says of itself, checked before anything is loaded.
        let infos = join_all(ranks.iter().map(|client| {
            let mut client = client.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(5), client.info(pb::InfoRequest {})).await
            }
        }))
        .await
        .into_iter()
        .enumerate()
        .map(|(rank, answer)| match answer {
            Err(_) => bail!("rank {rank} did not answer Info within 5 s"),
            Ok(Err(status)) => bail!("rank {rank}: Info: {}", status.message()),
            Ok(Ok(response)) => Ok(response.into_inner()),
        })
        .collect::<Result<Vec<_>>>()?;
        check_members(&infos)?;
        let all_on_cuda = infos.iter().all(on_cuda);
        if let (Some(q), true) = (plan.quantization, infos.iter().any(on_cuda)) {
            bail!(
                "--quantization {} runs on CPU ranks only for now, and this group has CUDA ranks",
                q.as_str()
            );
        }
        let dtype = plan.dtype.resolve(all_on_cuda);
        // CUDA ranks join one NCCL group (`--collective`), whose id rank 0 makes (this process
        // may have no GPU and no libnccl); CPU ranks join the TCP ring.
        let nccl_id = match plan.collective.uses_nccl(all_on_cuda, world)? {
            true => new_nccl_id(&ranks[0]).await?,
            false => String::new(),
        };
        let peers: Vec<String> = workers.iter().map(|w| w.ring_addr.clone()).collect();
        tracing::info!(
            world,
            ?peers,
            dtype = dtype.as_str_name(),
            collective = if nccl_id.is_empty() {
                "tcp ring"
            } else {
                "nccl"
            },
            "forming worker group"
        );
        // Fresh for every formation: only the ranks loaded now can join this ring.
        let ring_secret = rand::random::<[u8; 32]>().to_vec();
        let loads = ranks.iter().enumerate().map(|(rank, client)| {
            let mut client = client.clone();
            let cache = plan.kv_cache.for_worker(&workers[rank], &workers);
            let request = pb::LoadShardRequest {
                model_path: plan.model_path.clone(),
                rank: rank as u32,
                world_size: world as u32,
                ring_peers: peers.clone(),
                nccl_id: nccl_id.clone(),
                dtype: dtype.into(),
                quantization: quantization_to_pb(plan.quantization).into(),
                vocab_sharding: plan.vocab_sharding.into(),
                kv_cache_blocks: cache.blocks,
                kv_cache_memory_bytes: cache.memory_bytes,
                memory_utilization: cache.memory_utilization,
                device_sharers: cache.device_sharers,
                max_num_batched_tokens: plan.step_limits.max_num_batched_tokens,
                max_num_seqs: plan.step_limits.max_num_seqs,
                max_model_len: plan.step_limits.max_model_len,
                group_epoch: epoch,
                ring_secret: ring_secret.clone(),
                block_size: plan.block_size,
                collective_timeout_ms: plan.collective_timeout.as_millis() as u32,
                threads: plan.threads_per_worker,
            };
            async move { client.load_shard(request).await }
        });
        let mut kv_cache_blocks = usize::MAX;
        let mut cache_bytes_per_token = 0;
        let mut memory = Vec::with_capacity(world);
        let mut kernels = Vec::with_capacity(world);
        for (rank, result) in join_all(loads).await.into_iter().enumerate() {
            let response = result.map_err(|s| anyhow::anyhow!("rank {rank}: {}", s.message()))?;
            let r = response.get_ref();
            tracing::info!(
                rank,
                load_ms = r.load_ms,
                weight_bytes = r.weight_bytes,
                kv_cache_blocks = r.kv_cache_blocks,
                kv_cache_bytes = r.kv_cache_bytes,
                bytes_per_token = r.cache_bytes_per_token,
                device_free_bytes = r.memory_free_bytes,
                kernels = %r.kernels,
                "shard loaded"
            );
            // Every rank holds a shard of every block: the group has the smallest pool.
            kv_cache_blocks = kv_cache_blocks.min(r.kv_cache_blocks as usize);
            cache_bytes_per_token = cache_bytes_per_token.max(r.cache_bytes_per_token);
            memory.push(ShardMemory::from(r));
            kernels.push(r.kernels.clone());
        }
        let rank_names = workers
            .iter()
            .enumerate()
            .map(|(rank, w)| format!("rank {rank} ({} at {})", w.id, w.worker_addr))
            .collect();
        let mut group = WorkerGroup {
            rank_names,
            ranks,
            workers,
            memory,
            kernels,
            kv_cache_blocks,
            cache_bytes_per_token,
            step_timeout: plan.collective_timeout + Duration::from_secs(30),
            straggler_timeout: plan.collective_timeout,
            next_step: 0,
            pending_finished: Vec::new(),
        };
        group.warm_up().await.context("warm-up step")?;
        Ok(group)
    }

    /// One real step through every rank (embedding, all layers, collectives, sampling). The
    /// ranks forget the warm-up sequence with the first real step.
    async fn warm_up(&mut self) -> Result<()> {
        let plan = StepPlan {
            sequences: vec![PlannedSequence {
                id: WARM_UP_SEQUENCE,
                tokens: vec![1],
                start_position: 0,
                admitted: Some(pb::SamplingParams {
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    ..Default::default()
                }),
                prompt_len: 1,
                new_blocks: vec![0],
                sample: true,
                next_token: None,
                allowed_tokens: None,
                feeds_sampled: false,
            }],
            ..StepPlan::default()
        };
        let output = self
            .send_step(&plan, &tracing::info_span!("warm_up"))
            .await?;
        if output.tokens.len() != 1 {
            bail!("warm-up returned {} tokens", output.tokens.len());
        }
        self.pending_finished.push(WARM_UP_SEQUENCE);
        Ok(())
    }

    /// KV-cache blocks every rank holds.
    pub fn kv_cache_blocks(&self) -> usize {
        self.kv_cache_blocks
    }

    /// Bytes one cached token costs on the largest rank.
    pub fn cache_bytes_per_token(&self) -> u64 {
        self.cache_bytes_per_token
    }

    pub fn workers(&self) -> &[RegisteredWorker] {
        &self.workers
    }

    /// The members, rank order, with what each shard holds.
    pub fn members(&self) -> Vec<GroupMember> {
        self.workers
            .iter()
            .zip(&self.memory)
            .zip(&self.kernels)
            .map(|((worker, &memory), kernels)| GroupMember {
                worker: worker.clone(),
                memory,
                kernels: kernels.clone(),
            })
            .collect()
    }

    /// The wire form of `plan`, as step `step_id`.
    pub fn step_request(plan: &StepPlan, step_id: u64, finished: Vec<u64>) -> pb::StepRequest {
        pb::StepRequest {
            step_id,
            sequences: plan
                .sequences
                .iter()
                .map(|p| pb::SequenceStep {
                    sequence_id: p.id,
                    tokens: p.tokens.clone(),
                    start_position: p.start_position as u32,
                    new_blocks: p.new_blocks.clone(),
                    admitted: p.admitted.clone(),
                    prompt_len: if p.admitted.is_some() {
                        p.prompt_len as u32
                    } else {
                        0
                    },
                    sample: p.sample,
                    next_token: p.next_token,
                    allowed_tokens: p.allowed_tokens.clone().unwrap_or_default(),
                    feeds_sampled: p.feeds_sampled,
                })
                .collect(),
            finished,
        }
    }

    /// Sends `plan` to every rank as the group's next step; the future answers once every rank
    /// has (see [`Lockstep::run`]) and borrows nothing, so the next step may be sent before it
    /// does. `span`'s context travels to the workers in the requests' metadata.
    fn send_step(
        &mut self,
        plan: &StepPlan,
        span: &tracing::Span,
    ) -> impl Future<Output = Result<StepOutput, StepError>> + Send + 'static {
        let mut finished = std::mem::take(&mut self.pending_finished);
        finished.extend_from_slice(&plan.finished);
        let request = Self::step_request(plan, self.next_step, finished);
        self.next_step += 1;
        let lockstep = Lockstep {
            ranks: self.ranks.clone(),
            names: self.rank_names.clone(),
            timeout: self.step_timeout,
            lag: self.straggler_timeout,
            asked: plan
                .sequences
                .iter()
                .filter(|p| p.sample)
                .map(|p| p.id)
                .collect(),
        };
        lockstep.run(request, span.clone())
    }

    /// A handle that checks the ranks' health without borrowing the group.
    pub fn health_probe(&self) -> HealthProbe {
        HealthProbe {
            ranks: self.ranks.clone(),
        }
    }
}

/// One step's calls to every rank of a group. It owns what it needs, so a step may be sent
/// while the one before it runs.
struct Lockstep {
    ranks: Vec<WorkerClient<Channel>>,
    /// Per rank, "rank R (ID at ADDR)", for messages.
    names: Arc<[String]>,
    timeout: Duration,
    /// How long the other ranks may lag the first to answer.
    lag: Duration,
    /// The sequences that sample in the step, in plan order.
    asked: Vec<u64>,
}

impl Lockstep {
    /// Runs the step on every rank in lockstep; fails if any rank fails or the ranks disagree.
    async fn run(
        self,
        request: pb::StepRequest,
        span: tracing::Span,
    ) -> Result<StepOutput, StepError> {
        let (timeout, lag) = (self.timeout, self.lag);
        let mut calls: FuturesUnordered<_> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(rank, client)| {
                let mut client = client.clone();
                let mut request = tonic::Request::new(request.clone());
                caravan_common::telemetry::inject(&span, request.metadata_mut());
                async move {
                    let answer = tokio::time::timeout(timeout, client.step(request)).await;
                    (rank, answer.map(|a| a.map(tonic::Response::into_inner)))
                }
            })
            .collect();
        // A rank that fails fails the step at once, unless it refused the step as invalid:
        // then the others are heard too, since only a refusal by every rank leaves the group in
        // step. A rank cut off from the network never answers, but its peers' collectives time
        // out and say so. If the cut comes after the step's last collective, the peers answer
        // and only the cut-off rank's answer is lost; ranks finish a step together, so once one
        // has answered the others get one collective timeout.
        let mut answers: Vec<Option<Result<pb::StepResponse, String>>> =
            vec![None; self.ranks.len()];
        let mut first_answer: Option<(usize, tokio::time::Instant)> = None;
        loop {
            // Ranks refuse a step before its first collective, so a refusal by every rank comes
            // within moments; a rank that has not refused by then is running the step.
            let refused = answers.iter().flatten().any(Result::is_err);
            let wait = if refused { lag.min(REFUSAL_GRACE) } else { lag };
            let next = match first_answer {
                None => calls.next().await,
                Some((first, at)) => match tokio::time::timeout_at(at + wait, calls.next()).await {
                    Ok(next) => next,
                    Err(_) if refused => {
                        let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                        return Err(StepError::new(
                            StepErrorKind::Diverged,
                            format!(
                                "a rank refused the step the others ran ({} did not refuse it \
                                 within {wait:?} of rank {first}'s refusal)",
                                self.names[missing]
                            ),
                        ));
                    }
                    Err(_) => {
                        let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                        return Err(StepError::new(
                            StepErrorKind::Timeout,
                            format!(
                                "{} timed out: no answer to the step within {lag:?} of rank \
                                 {first}'s (cut off from the coordinator?)",
                                self.names[missing]
                            ),
                        ));
                    }
                },
            };
            let Some((rank, answer)) = next else { break };
            let who = &self.names[rank];
            let fail =
                |kind, message: String| Err(after_refusal(refused, StepError::new(kind, message)));
            let answer = match answer {
                Err(_) => fail(
                    StepErrorKind::Timeout,
                    format!("{who} timed out: no answer to the step within {timeout:?}"),
                ),
                Ok(Err(status)) => match status.code() {
                    tonic::Code::InvalidArgument => Ok(Err(format!("{who}: {}", status.message()))),
                    tonic::Code::Unavailable => fail(
                        StepErrorKind::Unreachable,
                        format!("{who} is unreachable: {}", status.message()),
                    ),
                    // Out of order, a sequence it does not know, no shard: its state is not the
                    // coordinator's.
                    tonic::Code::FailedPrecondition => fail(
                        StepErrorKind::Diverged,
                        format!("{who}: {}", status.message()),
                    ),
                    // Its collective failed (a peer died or the link broke).
                    _ => fail(
                        StepErrorKind::Unreachable,
                        format!("{who}: {}", status.message()),
                    ),
                },
                Ok(Ok(response)) => Ok(Ok(response)),
            };
            answers[rank] = Some(answer?);
            first_answer.get_or_insert((rank, tokio::time::Instant::now()));
        }
        let answers: Vec<Result<pb::StepResponse, String>> =
            answers.into_iter().flatten().collect();
        let refused = answers.iter().filter(|a| a.is_err()).count();
        if refused > 0 && refused == answers.len() {
            let message = answers
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_default();
            return Err(StepError::new(StepErrorKind::Rejected, message));
        }
        if refused > 0 {
            let (ran, refusal) = (
                answers.iter().position(Result::is_ok).unwrap_or(0),
                answers.iter().position(Result::is_err).unwrap_or(0),
            );
            let why = answers[refusal].as_ref().err().cloned().unwrap_or_default();
            return Err(StepError::new(
                StepErrorKind::Diverged,
                format!(
                    "a rank refused the step the others ran (rank {ran} ran it, rank {refusal} \
                     refused: {why})"
                ),
            ));
        }
        let mut answers = answers.into_iter().flatten();
        let first = answers
            .next()
            .ok_or_else(|| StepError::new(StepErrorKind::Unreachable, "the group has no rank"))?;
        let ids = |r: &pb::StepResponse| r.tokens.iter().map(|t| t.token_id).collect::<Vec<_>>();
        let asked = &self.asked;
        let answered: Vec<u64> = first.tokens.iter().map(|t| t.sequence_id).collect();
        if answered != *asked {
            return Err(StepError::new(
                StepErrorKind::Diverged,
                format!("rank 0 sampled for sequences {answered:?}, the plan asked for {asked:?}"),
            ));
        }
        for (i, other) in answers.enumerate() {
            if ids(&other) != ids(&first) {
                return Err(StepError::new(
                    StepErrorKind::Diverged,
                    format!(
                        "ranks 0 and {} sampled different tokens: the group is out of step",
                        i + 1
                    ),
                ));
            }
        }
        Ok(StepOutput {
            timings: StepTimings {
                compute: Duration::from_micros(first.compute_us),
                collectives: Duration::from_micros(first.collective_us),
            },
            tokens: first.tokens,
            prompt_logprobs: first.prompt_logprobs,
        })
    }
}

/// A rank's failure after another rank refused the step: the refusal left the others stuck in
/// the step, so the ranks no longer agree whatever this failure says.
fn after_refusal(refused: bool, error: StepError) -> StepError {
    match refused {
        false => error,
        true => StepError::new(
            StepErrorKind::Diverged,
            format!("a rank refused the step the others ran ({error})"),
        ),
    }
}

/// Refuses a group whose ranks speak another protocol or mix CPU and CUDA devices (their
/// collectives could not meet: NCCL needs every rank on a GPU, the TCP ring runs on hosts).
/// Asks rank 0 for a fresh NCCL id (hex) for the group being formed.
async fn new_nccl_id(rank0: &WorkerClient<Channel>) -> Result<String> {
    let mut client = rank0.clone();
    match tokio::time::timeout(
        Duration::from_secs(10),
        client.new_nccl_id(pb::NewNcclIdRequest {}),
    )
    .await
    {
        Err(_) => bail!("rank 0 did not make an NCCL id within 10 s"),
        Ok(Err(status)) => bail!("rank 0: making an NCCL id: {}", status.message()),
        Ok(Ok(response)) => Ok(response.into_inner().nccl_id),
    }
}

/// Whether a rank computes on a CUDA device (`cuda` or `cuda:N`).
fn on_cuda(info: &pb::InfoResponse) -> bool {
    info.device.starts_with("cuda")
}

fn check_members(infos: &[pb::InfoResponse]) -> Result<()> {
    for (rank, info) in infos.iter().enumerate() {
        if info.protocol_version != caravan_proto::PROTOCOL_VERSION {
            bail!(
                "rank {rank} ({}) speaks protocol {:?}, this coordinator {:?}: run the same \
                 Caravan release on every process",
                info.host,
                info.protocol_version,
                caravan_proto::PROTOCOL_VERSION
            );
        }
    }
    if let (Some(cpu), Some(gpu)) = (
        infos.iter().position(|i| !on_cuda(i)),
        infos.iter().position(on_cuda),
    ) {
        bail!(
            "a group cannot mix CPU and CUDA ranks: rank {cpu} is on {}, rank {gpu} on {}",
            infos[cpu].device,
            infos[gpu].device
        );
    }
    Ok(())
}

impl StepExecutor for WorkerGroup {
    fn launch(&mut self, plan: &StepPlan, span: &tracing::Span) -> StepAnswer {
        StepAnswer::spawn(self.send_step(plan, span))
    }
}

/// Asks every rank of a group whether it is ready.
#[derive(Clone)]
pub struct HealthProbe {
    ranks: Vec<WorkerClient<Channel>>,
}

/// One rank's answer to a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankHealth {
    Ready,
    /// Reachable, but its shard cannot serve (loading, or a collective failed).
    NotReady(String),
    /// No answer within the deadline.
    Unreachable(String),
}

impl RankHealth {
    /// For tables and JSON: "ready", "not ready: ...", "unreachable: ...".
    pub fn describe(&self) -> String {
        match self {
            RankHealth::Ready => "ready".into(),
            RankHealth::NotReady(d) => format!("not ready: {d}"),
            RankHealth::Unreachable(d) => format!("unreachable: {d}"),
        }
    }
}

impl HealthProbe {
    /// Every rank's health, rank order (each asked concurrently, 2 s deadline).
    pub async fn statuses(&self) -> Vec<RankHealth> {
        let calls = self.ranks.iter().map(|client| {
            let mut client = client.clone();
            async move {
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    client.health(pb::HealthRequest {}),
                )
                .await
                {
                    Err(_) => RankHealth::Unreachable("no answer within 2 s".into()),
                    Ok(Err(s)) => RankHealth::Unreachable(s.message().to_string()),
                    Ok(Ok(r)) if !r.get_ref().ready => RankHealth::NotReady(r.into_inner().detail),
                    Ok(Ok(_)) => RankHealth::Ready,
                }
            }
        });
        join_all(calls).await
    }

    /// Whether each rank (named by `ids`, rank order) answers at all, ready or not.
    pub async fn liveness(&self, ids: &[String]) -> Vec<(String, bool)> {
        let statuses = self.statuses().await;
        ids.iter()
            .cloned()
            .zip(
                statuses
                    .iter()
                    .map(|h| !matches!(h, RankHealth::Unreachable(_))),
            )
            .collect()
    }

    /// The first problem found, if any.
    pub async fn check(&self) -> Option<String> {
        self.statuses()
            .await
            .into_iter()
            .enumerate()
            .find(|(_, h)| *h != RankHealth::Ready)
            .map(|(rank, h)| format!("rank {rank} {}", h.describe()))
    }
}

/// Shared handle used by the health monitor.
pub type SharedHealth = Arc<GroupHealth>;

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

    fn info(device: &str, protocol: &str) -> pb::InfoResponse {
        pb::InfoResponse {
            protocol_version: protocol.into(),
            host: "h".into(),
            device: device.into(),
            ..Default::default()
        }
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

    #[test]
    fn groups_of_one_device_kind_and_protocol_are_accepted_others_refused() {
        let v1 = caravan_proto::PROTOCOL_VERSION;
        assert!(check_members(&[info("cpu", v1), info("cpu", v1)]).is_ok());
        assert!(check_members(&[info("cuda:0", v1), info("cuda:1", v1)]).is_ok());
        let mixed = check_members(&[info("cpu", v1), info("cuda:0", v1)]).unwrap_err();
        assert!(
            mixed.to_string().contains("cannot mix CPU and CUDA"),
            "{mixed}"
        );
        let old = check_members(&[info("cpu", v1), info("cpu", "caravan.v0")]).unwrap_err();
        assert!(old.to_string().contains("rank 1"), "{old}");
    }
}
