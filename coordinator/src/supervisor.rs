//! The coordinator's serving loop: with etcd, campaign for the leadership and follow the workers
//! registered there; form the worker group, serve until it fails, form it again (survivors keep
//! their ranks, a spare takes a dead rank's place); on shutdown, drain and hand the leadership
//! over.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{bail, Result};

use crate::{
    api::{forward::Forwarder, AppState},
    blocks::BlockManager,
    engine::{Engine, EngineConfig, EngineControl},
    etcd::{Etcd, Leadership},
    group::{HealthProbe, ShardPlan, WorkerGroup},
    registry::{Registry, HEARTBEAT_INTERVAL, STALE_AFTER},
    stats::EngineStats,
};

/// What the serving loop needs besides the shared state.
pub struct Supervisor {
    pub state: Arc<AppState>,
    /// With etcd: the cluster whose leadership this coordinator campaigns for.
    pub etcd: Option<Etcd>,
    pub etcd_prefix: String,
    /// The URL announced while leading.
    pub advertise_url: String,
    pub plan: ShardPlan,
    pub engine_config: EngineConfig,
    pub block_size: usize,
    pub prefix_caching: bool,
    pub drain_timeout: Duration,
    pub http_addr: SocketAddr,
}

impl Supervisor {
    /// Serves until `shutdown` resolves, then drains. Fails only when a formed group cannot hold
    /// one full-context sequence (a configuration error, not a fault to retry).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Supervisor {
            state,
            etcd,
            etcd_prefix,
            advertise_url,
            plan,
            engine_config,
            block_size,
            prefix_caching,
            drain_timeout,
            http_addr,
        } = self;
        let (health, stats, registry, control) = (
            state.health.clone(),
            state.stats.clone(),
            state.registry.clone(),
            state.control.clone(),
        );
        let (model, tokenizer, forward, tp) = (
            state.model.clone(),
            state.tokenizer.clone(),
            state.forward.clone(),
            state.tp,
        );
        tokio::pin!(shutdown);
        // A forwarding standby follows who leads.
        let _leader_watch = match (&etcd, &forward) {
            (Some(etcd), Some(forward)) => Some(AbortOnDrop(tokio::spawn(follow_leader(
                etcd.clone(),
                forward.clone(),
            )))),
            _ => None,
        };
        // Workers registered directly heartbeat; those in etcd live as long as their lease.
        let stale_after = etcd.is_none().then_some(STALE_AFTER);

        // Held until the drain below is over: a standby must not take the workers while requests
        // still finish here.
        let mut leadership: Option<Leadership> = None;
        let mut mirror: Option<AbortOnDrop> = None;
        // One engine per leadership: it outlives the groups, and its requests wait through a
        // group's failure for the next. Kept through the drain (dropping it ends the engine).
        let mut engine: Option<EngineControl<WorkerGroup>> = None;
        'leading: loop {
            if let Some(etcd) = &etcd {
                let leader = etcd.leader().await;
                health.set_not_ready(match &leader {
                    Some(l) => format!("standby: the leader is {l}"),
                    None => "standby: electing a leader".to_string(),
                });
                eprintln!(
                    "campaigning for leadership of {} (current leader: {})",
                    etcd_prefix,
                    leader.as_deref().unwrap_or("none")
                );
                let won = tokio::select! {
                    won = etcd.lead(&advertise_url) => won,
                    _ = &mut shutdown => break 'leading,
                };
                match won {
                    Ok(won) => leadership = Some(won),
                    Err(e) => {
                        let reason = format!("standby: campaigning failed: {e:#}");
                        tracing::warn!(%reason, "campaigning again");
                        health.set_not_ready(reason);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'leading,
                            _ = &mut shutdown => break 'leading,
                        }
                    }
                }
                eprintln!("leading {} as {advertise_url}", etcd_prefix);
                if let Some(forward) = &forward {
                    forward.set_leading(true);
                }
                mirror = Some(AbortOnDrop(tokio::spawn(
                    etcd.clone().mirror_workers(registry.clone()),
                )));
            }
            let mut leadership_lost = leadership.as_ref().map(|l| l.lost.clone());
            let lost_leadership = async move {
                match &mut leadership_lost {
                    Some(lost) => {
                        let _ = lost.wait_for(|l| *l).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(lost_leadership);

            // Form a group, serve until it fails, form it again: until shutdown or, with etcd,
            // until the leadership is lost. Survivors keep their ranks in the next group; a spare
            // takes a dead rank's place, ahead of workers found dead that are still registered
            // (`avoid`: in etcd until their leases expire).
            let mut previous: Vec<String> = Vec::new();
            let mut avoid: Vec<String> = Vec::new();
            'serving: loop {
                // Unique across coordinators, so a new leader's ring never meets an old one's.
                let epoch = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let group = tokio::select! {
                    group = form_group(&registry, &plan, tp, epoch, stale_after, &previous, &avoid) => group,
                    _ = &mut shutdown => break 'leading,
                    _ = &mut lost_leadership => break 'serving,
                };
                let group = match group {
                    Ok(group) => group,
                    Err(e) => {
                        let reason = format!("forming the worker group failed: {e:#}");
                        tracing::warn!(%reason, "retrying");
                        eprintln!("{reason}; retrying");
                        // While recovering, /health goes on saying so.
                        health.fail(reason);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'serving,
                            _ = &mut shutdown => break 'leading,
                            _ = &mut lost_leadership => break 'serving,
                        }
                    }
                };
                EngineStats::add(&stats.group_formations, 1);
                let kv_blocks = group.kv_cache_blocks();
                let kv_tokens = kv_blocks * block_size;
                if kv_tokens < model.max_context {
                    bail!(
                        "the KV cache holds {kv_tokens} tokens, less than one full-context sequence ({}): \
                         give it more memory (--kv-cache-memory, or on GPUs --gpu-memory-utilization) \
                         or lower --max-model-len",
                        model.max_context
                    );
                }
                eprintln!(
                    "KV cache: {kv_blocks} blocks of {block_size} tokens ({kv_tokens} tokens, {:.1} MiB per rank)",
                    (kv_tokens as u64 * group.cache_bytes_per_token()) as f64 / (1u64 << 20) as f64
                );
                let probe = group.health_probe();
                let group_members = group.members();
                let members: Vec<String> =
                    group_members.iter().map(|m| m.worker.id.clone()).collect();
                avoid.clear();
                let most_weights = group_members
                    .iter()
                    .map(|m| m.memory.weight_bytes)
                    .max()
                    .unwrap_or(0);
                eprintln!(
                    "weights: {:.1} MiB on the largest shard{}",
                    most_weights as f64 / (1u64 << 20) as f64,
                    plan.quantization
                        .map(|q| format!(" ({})", q.as_str()))
                        .unwrap_or_default()
                );
                *state.workers.write().unwrap_or_else(|e| e.into_inner()) = group_members;
                *state.probe.write().unwrap_or_else(|e| e.into_inner()) = Some(probe.clone());
                let blocks = BlockManager::new(kv_blocks, block_size, prefix_caching);
                let engine = match engine.take() {
                    Some(control) => {
                        control.attach(group, blocks);
                        engine.insert(control)
                    }
                    None => {
                        let (handle, control) = Engine::start(
                            group,
                            blocks,
                            health.clone(),
                            tokenizer.clone(),
                            model.clone(),
                            engine_config.clone(),
                            stats.clone(),
                        );
                        *state.engine.write().unwrap_or_else(|e| e.into_inner()) = Some(handle);
                        engine.insert(control)
                    }
                };
                health.set_ready();
                println!("ready: serving {} on http://{http_addr}", model.name);
                tracing::info!(epoch, kv_cache_tokens = kv_tokens, "ready");

                let problem = tokio::select! {
                    error = engine.failed() => {
                        // The engine has already marked the group failed.
                        format!("a step failed ({}): {error}", error.kind.as_str())
                    }
                    problem = watch_group(&probe, &registry, &members, stale_after) => {
                        health.set_lost(problem.clone(), !engine_config.recovery_timeout.is_zero());
                        engine.detach(problem.clone());
                        problem
                    }
                    _ = &mut shutdown => break 'leading,
                    _ = &mut lost_leadership => break 'serving,
                };
                eprintln!("worker group failed: {problem}; forming it again");
                // The requests in flight wait for the next group (up to --recovery-timeout).
                // Workers that do not answer leave the pool (in etcd, their registrations stay
                // until their leases expire: they are avoided meanwhile); the rest join the next
                // group.
                for (id, alive) in probe.liveness(&members).await {
                    if !alive {
                        if stale_after.is_some() {
                            registry.remove(&id);
                        } else {
                            avoid.push(id);
                        }
                    }
                }
                previous = members;
            }
            // The leadership is lost: a standby may lead (and drive the workers) by now, so stop
            // stepping at once; what is in flight ends with an error.
            let reason =
                "standby: lost the leadership (the etcd lease could not be renewed in time)";
            eprintln!("{reason}");
            tracing::error!(reason, "stepping down");
            health.set_not_ready(reason);
            retire_engine(&state);
            engine = None;
            state
                .workers
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            state
                .probe
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            mirror = None;
            leadership = None;
            if let Some(forward) = &forward {
                forward.set_leading(false);
            }
        }

        drain(&state, drain_timeout).await;
        health.shut_down();
        control.drained.store(true, Ordering::Release);
        // Hand the leadership over now rather than when the lease runs out.
        drop(mirror);
        if let Some(leadership) = leadership {
            leadership.resign().await;
        }
        Ok(())
    }
}

/// Stops admitting, lets requests in flight finish within `timeout`, then ends the rest
/// explicitly (the engine is retired).
async fn drain(state: &AppState, timeout: Duration) {
    let (control, health, stats) = (&state.control, &state.health, &state.stats);
    control.draining.store(true, Ordering::Release);
    let deadline = tokio::time::Instant::now() + timeout;
    // A standby's forwarded requests finish too.
    let in_flight = || {
        EngineStats::get(&stats.in_flight)
            + state
                .forward
                .as_ref()
                .map_or(0, |f| f.in_flight.load(Ordering::Acquire))
    };
    if in_flight() > 0 {
        eprintln!("draining: {} requests in flight", in_flight());
    }
    while in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if in_flight() > 0 {
        health.set_not_ready(format!(
            "shutting down: the drain timeout ({timeout:?}) passed"
        ));
        retire_engine(state);
        let grace = tokio::time::Instant::now() + Duration::from_secs(2);
        while in_flight() > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How often a forwarding standby asks etcd who leads.
const LEADER_POLL: Duration = Duration::from_secs(1);

/// Keeps `forward` told of the leader's URL.
async fn follow_leader(etcd: Etcd, forward: Arc<Forwarder>) {
    loop {
        forward.set_leader(etcd.leader().await);
        tokio::time::sleep(LEADER_POLL).await;
    }
}

/// Stops the current engine, if any (see [`EngineHandle::retire`]).
fn retire_engine(state: &AppState) {
    if let Some(engine) = state
        .engine
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        engine.retire();
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for `tp` live workers and forms a group of them.
async fn form_group(
    registry: &Registry,
    plan: &ShardPlan,
    tp: usize,
    epoch: u64,
    stale_after: Option<Duration>,
    previous: &[String],
    avoid: &[String],
) -> Result<WorkerGroup> {
    let workers = registry.wait_for(tp, stale_after, previous, avoid).await;
    WorkerGroup::form(workers, plan, epoch).await
}

/// Resolves with a description once the group cannot serve: a rank fails its health check, a
/// member stops sending heartbeats or leaves the registry.
async fn watch_group(
    probe: &HealthProbe,
    registry: &Registry,
    members: &[String],
    stale_after: Option<Duration>,
) -> String {
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        if let Some(problem) = probe.check().await {
            return problem;
        }
        let seen = registry.last_seen();
        for id in members {
            match seen.get(id) {
                None => return format!("{id} left the registry"),
                Some(t) if stale_after.is_some_and(|limit| t.elapsed() > limit) => {
                    return format!("{id} stopped sending heartbeats")
                }
                Some(_) => {}
            }
        }
    }
}
