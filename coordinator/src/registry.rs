//! Worker registration: the coordinator's gRPC service (`caravan.v1.Coordinator`) and the pool of
//! registered workers that groups are formed from.

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

/// Registered workers, in registration order.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<Vec<RegisteredWorker>>,
    changed: Notify,
    next_id: Mutex<u64>,
}

impl Registry {
    /// Waits until at least `n` workers have registered and returns the first `n`.
    pub async fn wait_for(&self, n: usize) -> Vec<RegisteredWorker> {
        loop {
            let notified = self.changed.notified();
            {
                let workers = self.workers.lock().expect("registry lock");
                if workers.len() >= n {
                    return workers[..n].to_vec();
                }
            }
            notified.await;
        }
    }

    /// When each worker last sent a heartbeat (or registered).
    pub fn last_seen(&self) -> HashMap<String, Instant> {
        let workers = self.workers.lock().expect("registry lock");
        workers
            .iter()
            .map(|w| (w.id.clone(), w.last_seen))
            .collect()
    }
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
        let id = {
            let mut next = self.registry.next_id.lock().expect("id lock");
            *next += 1;
            format!("worker-{}", *next)
        };
        tracing::info!(%id, addr = %req.worker_addr, ring = %req.ring_addr, host = %req.host, "worker registered");
        self.registry
            .workers
            .lock()
            .expect("registry lock")
            .push(RegisteredWorker {
                id: id.clone(),
                worker_addr: req.worker_addr,
                ring_addr: req.ring_addr,
                host: req.host,
                device: req.device,
                memory_bytes: req.memory_bytes,
                last_seen: Instant::now(),
            });
        self.registry.changed.notify_waiters();
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
        let mut workers = self.registry.workers.lock().expect("registry lock");
        let known = match workers.iter_mut().find(|w| w.id == id) {
            Some(w) => {
                w.last_seen = Instant::now();
                true
            }
            None => false,
        };
        Ok(Response::new(pb::HeartbeatResponse { known }))
    }
}
