//! A tensor-parallel group of workers as the coordinator sees it: one gRPC client per rank, the
//! bring-up (load shards, warm up), and the lockstep step fan-out.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use caravan_proto::{self as pb, worker_client::WorkerClient};
use futures::{future::join_all, stream::FuturesUnordered, StreamExt};
use tonic::transport::Channel;

use crate::registry::RegisteredWorker;

/// How to load the group's shards.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    pub model_path: String,
    pub dtype: String,
    pub vocab_sharding: String,
    pub kv_cache: KvCacheSize,
    pub block_size: u32,
    pub collective_timeout: Duration,
    pub threads_per_worker: u32,
    /// Mutual TLS towards the workers, when the cluster uses it.
    pub tls: Option<caravan_proto::tls::ClusterTls>,
}

/// How big each rank's KV cache is.
#[derive(Debug, Clone)]
pub enum KvCacheSize {
    /// Exactly this many blocks.
    Blocks(u32),
    /// As many blocks as fit in a memory budget, at most `max_blocks`.
    Memory {
        /// Bytes per rank; `None`: `fraction` of the memory the worker's host had available at
        /// registration, shared among the group's workers on that host.
        per_rank_bytes: Option<u64>,
        fraction: f64,
        max_blocks: u32,
    },
}

impl KvCacheSize {
    /// (kv_cache_blocks, kv_cache_memory_bytes) for one rank's LoadShard.
    fn for_worker(&self, worker: &RegisteredWorker, all: &[RegisteredWorker]) -> (u32, u64) {
        match *self {
            KvCacheSize::Blocks(n) => (n, 0),
            KvCacheSize::Memory {
                per_rank_bytes: Some(bytes),
                max_blocks,
                ..
            } => (max_blocks, bytes.max(1)),
            KvCacheSize::Memory {
                per_rank_bytes: None,
                fraction,
                max_blocks,
            } => {
                let same_host = all.iter().filter(|w| w.host == worker.host).count().max(1);
                let bytes = (worker.memory_bytes as f64 * fraction / same_host as f64) as u64;
                (max_blocks, bytes.max(1))
            }
        }
    }
}

/// Whether the group can serve, and why not.
#[derive(Debug, Default)]
pub struct GroupHealth {
    ready: AtomicBool,
    reason: Mutex<String>,
}

impl GroupHealth {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> String {
        self.reason.lock().expect("health lock").clone()
    }

    pub fn set_ready(&self) {
        self.reason.lock().expect("health lock").clear();
        self.ready.store(true, Ordering::Release);
    }

    /// Marks the group stopped on purpose (a normal shutdown: nothing to log as an error).
    pub fn shut_down(&self) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = "shut down".into();
        self.ready.store(false, Ordering::Release);
    }

    /// Not ready for a reason that is not a failure of the group (standby, campaigning): the
    /// reason replaces whatever was there.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
        self.ready.store(false, Ordering::Release);
    }

    /// Marks the group unusable (keeps the first reason).
    pub fn fail(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().expect("health lock");
        if self.ready.swap(false, Ordering::AcqRel) || r.is_empty() {
            *r = reason.into();
            tracing::error!(reason = %r, "worker group is not ready");
        }
    }
}

/// Where a rank's time went in one step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimings {
    /// Forward pass and sampling.
    pub compute: Duration,
    /// Of which inside collectives.
    pub collectives: Duration,
}

/// The ranks of one group, rank order.
pub struct WorkerGroup {
    ranks: Vec<WorkerClient<Channel>>,
    workers: Vec<RegisteredWorker>,
    kv_cache_blocks: usize,
    cache_bytes_per_token: u64,
    step_timeout: Duration,
    /// How long the other ranks may lag the first to answer a step.
    straggler_timeout: Duration,
    next_step: u64,
}

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
            let url = caravan_proto::tls::with_scheme(&w.worker_addr, plan.tls.is_some());
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
        let peers: Vec<String> = workers.iter().map(|w| w.ring_addr.clone()).collect();
        tracing::info!(world, ?peers, "forming worker group");
        // Fresh for every formation: only the ranks loaded now can join this ring.
        let ring_secret = rand::random::<[u8; 32]>().to_vec();
        let loads = ranks.iter().enumerate().map(|(rank, client)| {
            let mut client = client.clone();
            let (kv_cache_blocks, kv_cache_memory_bytes) =
                plan.kv_cache.for_worker(&workers[rank], &workers);
            let request = pb::LoadShardRequest {
                model_path: plan.model_path.clone(),
                rank: rank as u32,
                world_size: world as u32,
                ring_peers: peers.clone(),
                nccl_id: String::new(),
                dtype: plan.dtype.clone(),
                vocab_sharding: plan.vocab_sharding.clone(),
                kv_cache_blocks,
                kv_cache_memory_bytes,
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
        for (rank, result) in join_all(loads).await.into_iter().enumerate() {
            let response = result.map_err(|s| anyhow::anyhow!("rank {rank}: {}", s.message()))?;
            let r = response.get_ref();
            tracing::info!(
                rank,
                load_ms = r.load_ms,
                kv_cache_blocks = r.kv_cache_blocks,
                bytes_per_token = r.cache_bytes_per_token,
                "shard loaded"
            );
            // Every rank holds a shard of every block: the group has the smallest pool.
            kv_cache_blocks = kv_cache_blocks.min(r.kv_cache_blocks as usize);
            cache_bytes_per_token = cache_bytes_per_token.max(r.cache_bytes_per_token);
        }
        let mut group = WorkerGroup {
            ranks,
            workers,
            kv_cache_blocks,
            cache_bytes_per_token,
            step_timeout: plan.collective_timeout + Duration::from_secs(30),
            straggler_timeout: plan.collective_timeout,
            next_step: 0,
        };
        group.warm_up().await.context("warm-up step")?;
        Ok(group)
    }

    /// One real step through every rank (embedding, all layers, collectives, sampling).
    async fn warm_up(&mut self) -> Result<()> {
        let seq = pb::SequenceStep {
            sequence_id: u64::MAX,
            tokens: vec![1],
            start_position: 0,
            block_table: vec![0],
            sampling: Some(pb::SamplingParams::default()),
            sample: true,
        };
        let (tokens, _) = self
            .step(vec![seq], &tracing::info_span!("warm_up"))
            .await?;
        if tokens.len() != 1 {
            bail!("warm-up returned {} tokens", tokens.len());
        }
        self.release(vec![u64::MAX]).await;
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

    /// Runs one step on every rank in lockstep; fails if any rank fails or the ranks disagree.
    /// Returns the sampled tokens and rank 0's timings.
    /// `span`'s context travels to the workers in the requests' metadata.
    pub async fn step(
        &mut self,
        sequences: Vec<pb::SequenceStep>,
        span: &tracing::Span,
    ) -> Result<(Vec<pb::SampledToken>, StepTimings)> {
        let request = pb::StepRequest {
            step_id: self.next_step,
            sequences,
        };
        self.next_step += 1;
        let (timeout, lag) = (self.step_timeout, self.straggler_timeout);
        let mut calls: FuturesUnordered<_> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(rank, client)| {
                let mut client = client.clone();
                let worker = &self.workers[rank];
                let who = format!("rank {rank} ({} at {})", worker.id, worker.worker_addr);
                let mut request = tonic::Request::new(request.clone());
                caravan_proto::telemetry::inject(span, request.metadata_mut());
                async move {
                    let answer = match tokio::time::timeout(timeout, client.step(request)).await {
                        Err(_) => Err(anyhow!(
                            "{who} timed out: no answer to the step within {timeout:?}"
                        )),
                        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                            Err(anyhow!("{who} is unreachable: {}", status.message()))
                        }
                        Ok(Err(status)) => Err(anyhow!("{who}: {}", status.message())),
                        Ok(Ok(response)) => Ok(response.into_inner()),
                    };
                    (rank, answer)
                }
            })
            .collect();
        // The first failing rank fails the step: a rank cut off from the network never answers,
        // but its peers' collectives time out and say so. If the cut comes after the step's last
        // collective, the peers answer and only the cut-off rank's answer is lost; ranks finish
        // a step together, so once one has answered the others get one collective timeout.
        let mut answers: Vec<Option<pb::StepResponse>> = vec![None; self.ranks.len()];
        let mut first_answer: Option<(usize, tokio::time::Instant)> = None;
        while let Some((rank, answer)) = match first_answer {
            None => calls.next().await,
            Some((first, at)) => tokio::time::timeout_at(at + lag, calls.next())
                .await
                .map_err(|_| {
                    let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                    let worker = &self.workers[missing];
                    anyhow!(
                        "rank {missing} ({} at {}) timed out: no answer to the step within \
                         {lag:?} of rank {first}'s (cut off from the coordinator?)",
                        worker.id,
                        worker.worker_addr
                    )
                })?,
        } {
            answers[rank] = Some(answer?);
            first_answer.get_or_insert((rank, tokio::time::Instant::now()));
        }
        let mut answers = answers.into_iter().flatten();
        let first = answers.next().context("a group has at least one rank")?;
        let ids = |r: &pb::StepResponse| r.tokens.iter().map(|t| t.token_id).collect::<Vec<_>>();
        for (i, other) in answers.enumerate() {
            if ids(&other) != ids(&first) {
                bail!(
                    "ranks 0 and {} sampled different tokens: the group is out of step",
                    i + 1
                );
            }
        }
        let timings = StepTimings {
            compute: Duration::from_micros(first.compute_us),
            collectives: Duration::from_micros(first.collective_us),
        };
        Ok((first.tokens, timings))
    }

    /// Tells every rank to drop the sampling state of `ids` (best effort: it is only memory).
    pub async fn release(&self, ids: Vec<u64>) {
        let calls = self.ranks.iter().map(|client| {
            let mut client = client.clone();
            let request = pb::ReleaseRequest {
                sequence_ids: ids.clone(),
            };
            async move { client.release(request).await }
        });
        for result in join_all(calls).await {
            if let Err(e) = result {
                tracing::warn!(error = %e.message(), "release failed");
            }
        }
    }

    /// A handle that checks the ranks' health without borrowing the group.
    pub fn health_probe(&self) -> HealthProbe {
        HealthProbe {
            ranks: self.ranks.clone(),
        }
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
