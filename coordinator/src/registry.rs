//! Worker registration: the coordinator's gRPC service (`caravan.v1.Coordinator`) and the pool of
//! registered workers that groups are formed from. Workers beyond the group's size are spares:
//! when a rank fails, the next group keeps the survivors at their ranks and gives the failed
//! rank's place to a spare ([`choose_group`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caravan_proto::{self as pb, coordinator_server::Coordinator};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

/// How often workers are asked to send heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);

/// A worker that registered.
#[derive(Debug, Clone)]
pub struct RegisteredWorker {
    pub id: String,
    pub worker_addr: String,
    pub ring_addr: String,
    pub host: String,
    pub device: String,
    pub memory_bytes: u64,
    pub last_seen: Instant,
}

/// How long a directly registered worker may stay silent before it counts as gone.
pub const STALE_AFTER: Duration = Duration::from_millis(3000);

/// Registered workers, in registration order. Fed by direct registration (the gRPC service
/// below, with heartbeats) or by the etcd watch (leases), and read when groups are formed.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<Vec<RegisteredWorker>>,
    changed: Notify,
    next_id: Mutex<u64>,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, Default)]
pub struct WorkerInfo {
    pub worker_addr: String,
    pub ring_addr: String,
    pub host: String,
    pub device: String,
    pub memory_bytes: u64,
}

impl Registry {
    /// Adds a worker under `id` (or a fresh id); returns the id.
    pub fn add(&self, info: WorkerInfo, id: Option<String>) -> String {
        let id = id.unwrap_or_else(|| {
            let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            format!("worker-{}", *next)
        });
        tracing::info!(%id, addr = %info.worker_addr, ring = %info.ring_addr, host = %info.host, "worker registered");
        let mut workers = self.lock();
        workers.retain(|w| w.id != id);
        workers.push(RegisteredWorker {
            id: id.clone(),
            worker_addr: info.worker_addr,
            ring_addr: info.ring_addr,
            host: info.host,
            device: info.device,
            memory_bytes: info.memory_bytes,
            last_seen: Instant::now(),
        });
        drop(workers);
        self.changed.notify_waiters();
        id
    }

    /// Forgets a worker (it died, its lease expired, or it failed its group).
    pub fn remove(&self, id: &str) -> bool {
        let mut workers = self.lock();
        let before = workers.len();
        workers.retain(|w| w.id != id);
        let removed = workers.len() != before;
        drop(workers);
        if removed {
            tracing::info!(%id, "worker removed from the registry");
            self.changed.notify_waiters();
        }
        removed
    }

    /// Makes the registry hold exactly `present` (by id), keeping the order of those it has.
    pub fn replace_all(&self, present: Vec<(String, WorkerInfo)>) {
        let known: Vec<String> = self.lock().iter().map(|w| w.id.clone()).collect();
        for id in &known {
            if !present.iter().any(|(p, _)| p == id) {
                self.remove(id);
            }
        }
        for (id, info) in present {
            if !known.contains(&id) {
                self.add(info, Some(id));
            }
        }
    }

    /// Records a sign of life; false if the worker is unknown.
    pub fn touch(&self, id: &str) -> bool {
        match self.lock().iter_mut().find(|w| w.id == id) {
            Some(w) => {
                w.last_seen = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Waits until at least `n` workers are registered and alive, and chooses `n` of them with
    /// [`choose_group`] (`previous`: the last group's members by rank; `avoid`: workers found
    /// dead whose registrations have not expired yet). Workers silent for longer than
    /// `stale_after` (when given) are removed on the way.
    pub async fn wait_for(
        &self,
        n: usize,
        stale_after: Option<Duration>,
        previous: &[String],
        avoid: &[String],
    ) -> Vec<RegisteredWorker> {
        loop {
            let notified = self.changed.notified();
            if let Some(limit) = stale_after {
                self.prune(limit);
            }
            if let Some(group) = choose_group(&self.lock(), n, previous, avoid) {
                return group;
            }
            // Wake up on a registration, or now and then to prune silent workers.
            let _ = tokio::time::timeout(Duration::from_millis(250), notified).await;
        }
    }

    /// Removes workers silent for longer than `limit`; returns their ids.
    pub fn prune(&self, limit: Duration) -> Vec<String> {
        let stale: Vec<String> = self
            .lock()
            .iter()
            .filter(|w| w.last_seen.elapsed() > limit)
            .map(|w| w.id.clone())
            .collect();
        for id in &stale {
            self.remove(id);
        }
        stale
    }

    /// When each worker last sent a heartbeat (or registered).
    pub fn last_seen(&self) -> HashMap<String, Instant> {
        self.lock()
            .iter()
            .map(|w| (w.id.clone(), w.last_seen))
            .collect()
    }

    /// Every registered worker, in registration order.
    pub fn workers(&self) -> Vec<RegisteredWorker> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RegisteredWorker>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Chooses a group of `n` from `workers` (registration order), or `None` if there are fewer.
/// The previous group's members (`previous`, by rank) keep their ranks, so a survivor loads the
/// shard it had; the other places go to the rest in registration order (spares first, and
/// workers in `avoid`, found dead but still registered, only when nothing else is left).
pub fn choose_group(
    workers: &[RegisteredWorker],
    n: usize,
    previous: &[String],
    avoid: &[String],
) -> Option<Vec<RegisteredWorker>> {
    if workers.len() < n {
        return None;
    }
    let usable = |w: &&RegisteredWorker| !avoid.contains(&w.id);
    let mut slots: Vec<Option<&RegisteredWorker>> = vec![None; n];
    for (slot, id) in slots.iter_mut().zip(previous) {
        *slot = workers.iter().filter(usable).find(|w| w.id == *id);
    }
    let taken = |w: &RegisteredWorker, slots: &[Option<&RegisteredWorker>]| {
        slots.iter().flatten().any(|s| s.id == w.id)
    };
    let (first, last): (Vec<&RegisteredWorker>, Vec<&RegisteredWorker>) =
        workers.iter().partition(|w| usable(w));
    let mut rest = first.into_iter().chain(last);
    for i in 0..n {
        if slots[i].is_none() {
            slots[i] = rest.find(|w| !taken(w, &slots));
        }
    }
    slots.into_iter().map(|s| s.cloned()).collect()
}

/// The gRPC face of the registry.
pub struct CoordinatorService {
    registry: Arc<Registry>,
}

impl CoordinatorService {
    pub fn new(registry: Arc<Registry>) -> Self {
        CoordinatorService { registry }
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = request.into_inner();
        if req.protocol_version != caravan_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks {:?}, coordinator speaks {:?}",
                req.protocol_version,
                caravan_proto::PROTOCOL_VERSION
            )));
        }
        if req.worker_addr.is_empty() || req.ring_addr.is_empty() {
            return Err(Status::invalid_argument(
                "worker_addr and ring_addr are required",
            ));
        }
        let id = self.registry.add(
            WorkerInfo {
                worker_addr: req.worker_addr,
                ring_addr: req.ring_addr,
                host: req.host,
                device: req.device,
                memory_bytes: req.memory_bytes,
            },
            None,
        );
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let id = request.into_inner().worker_id;
        let known = self.registry.touch(&id);
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ids: &[&str]) -> Vec<RegisteredWorker> {
        ids.iter()
            .map(|id| RegisteredWorker {
                id: id.to_string(),
                worker_addr: String::new(),
                ring_addr: String::new(),
                host: String::new(),
                device: "cpu".into(),
                memory_bytes: 0,
                last_seen: Instant::now(),
            })
            .collect()
    }

    fn ids(group: Option<Vec<RegisteredWorker>>) -> Option<Vec<String>> {
        group.map(|g| g.into_iter().map(|w| w.id).collect())
    }

    fn strings(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_first_group_takes_workers_in_registration_order() {
        let workers = pool(&["a", "b", "c"]);
        assert_eq!(
            ids(choose_group(&workers, 2, &[], &[])),
            Some(strings(&["a", "b"]))
        );
        assert_eq!(ids(choose_group(&workers, 4, &[], &[])), None);
    }

    #[test]
    fn survivors_keep_their_ranks_and_a_spare_takes_the_dead_ranks_place() {
        // a (rank 0) died and left the pool; b keeps rank 1, the spare c takes rank 0.
        let workers = pool(&["b", "c", "d"]);
        let previous = strings(&["a", "b"]);
        assert_eq!(
            ids(choose_group(&workers, 2, &previous, &[])),
            Some(strings(&["c", "b"]))
        );
    }

    #[test]
    fn a_worker_found_dead_is_chosen_only_when_no_spare_is_left() {
        // b failed its liveness probe but its etcd lease has not expired yet.
        let previous = strings(&["a", "b"]);
        let avoid = strings(&["b"]);
        assert_eq!(
            ids(choose_group(&pool(&["a", "b", "c"]), 2, &previous, &avoid)),
            Some(strings(&["a", "c"]))
        );
        assert_eq!(
            ids(choose_group(&pool(&["a", "b"]), 2, &previous, &avoid)),
            Some(strings(&["a", "b"])),
            "no spare: the group waits for b (or its lease to expire) as before"
        );
    }
}
