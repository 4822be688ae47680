//! A tensor-parallel group of workers as the coordinator sees it: one gRPC client per rank and
//! the bring-up (check the members, load the shards, warm up). `plan` says how the shards are
//! loaded and sized, `lockstep` runs a step on every rank (the engine's
//! [`crate::executor::StepExecutor`] in production), `probe` asks the ranks how they are.

mod lockstep;
mod plan;
mod probe;

pub use plan::{
    Collective, ComputeDtype, KvCacheSize, Quantization, RankCache, ShardPlan, StepLimits,
};
pub use probe::{HealthProbe, RankHealth};

use plan::quantization_to_pb;

use std::{sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use caravan_proto::{self as pb, worker_client::WorkerClient};
use futures::future::join_all;
use tonic::transport::Channel;

use crate::{
    registry::RegisteredWorker,
    scheduler::{PlannedSequence, StepPlan},
};

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

    /// A handle that checks the ranks' health without borrowing the group.
    pub fn health_probe(&self) -> HealthProbe {
        HealthProbe::new(self.ranks.clone())
    }
}

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

/// Refuses a group whose ranks speak another protocol or mix CPU and CUDA devices (their
/// collectives could not meet: NCCL needs every rank on a GPU, the TCP ring runs on hosts).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(device: &str, protocol: &str) -> pb::InfoResponse {
        pb::InfoResponse {
            protocol_version: protocol.into(),
            host: "h".into(),
            device: device.into(),
            ..Default::default()
        }
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
