//! The worker's gRPC service (`caravan.v1.Worker`): steps run on the handler's thread (its queue
//! moved aside) in `step_id` order, loads on a blocking thread, health and identity from shared
//! status without the runner.

use std::sync::{Arc, TryLockError};

use caravan_proto::{self as pb, worker_server::Worker};
use tonic::{Request, Response, Status};

use crate::{
    runner::{SharedRunner, SharedStatus},
    step_order::StepOrder,
};

/// What the service reports about this worker in `Info`.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub host: String,
    pub device: String,
    pub memory_bytes: u64,
    pub ring_addr: String,
}

/// Why a rank whose runner lock is poisoned serves nothing until it is loaded again. A step's
/// panic is caught inside the lock (`ModelRunner::serve_step`), so this is a panic that escaped
/// it: a load's, or one outside the step's own code.
const POISONED: &str = "an earlier call on this rank panicked mid-way while holding its model: \
                        the group must be formed again";

pub struct WorkerService {
    runner: SharedRunner,
    status: SharedStatus,
    identity: WorkerIdentity,
    order: Arc<StepOrder>,
}

impl WorkerService {
    pub fn new(runner: SharedRunner, status: SharedStatus, identity: WorkerIdentity) -> Self {
        WorkerService {
            runner,
            status,
            identity,
            order: Arc::default(),
        }
    }

    /// The order its steps run in (to see which wait).
    pub fn step_order(&self) -> Arc<StepOrder> {
        self.order.clone()
    }

    /// This worker's rank in its group (-1 before it joins one), for trace attributes.
    fn rank(&self) -> i64 {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rank
            .map_or(-1, i64::from)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let rank = self.status.lock().unwrap_or_else(|e| e.into_inner()).rank;
        Ok(Response::new(pb::InfoResponse {
            protocol_version: caravan_proto::PROTOCOL_VERSION.into(),
            host: self.identity.host.clone(),
            device: self.identity.device.clone(),
            memory_bytes: self.identity.memory_bytes,
            ring_addr: self.identity.ring_addr.clone(),
            rank,
        }))
    }

    async fn load_shard(
        &self,
        request: Request<pb::LoadShardRequest>,
    ) -> Result<Response<pb::LoadShardResponse>, Status> {
        let req = request.into_inner();
        let runner = self.runner.clone();
        // The steps waiting belonged to the group this load replaces.
        self.order.restart();
        // A step waits for no load (it is refused meanwhile), so the lock is the load's alone.
        tokio::task::spawn_blocking(move || {
            let result = runner.lock().unwrap_or_else(|e| e.into_inner()).load(req);
            // A load replaces whatever state a panicked step left behind.
            runner.clear_poison();
            result
        })
        .await
        .map_err(|e| Status::internal(format!("loading the shard stopped: {e}")))?
        .map(Response::new)
    }

    async fn step(
        &self,
        request: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let span = tracing::info_span!(
            "worker.step",
            rank = self.rank(),
            sequences = request.get_ref().sequences.len()
        );
        caravan_common::telemetry::set_parent_from(&span, request.metadata());
        let req = request.into_inner();
        // A step sent while its predecessor ran may arrive first.
        self.order
            .wait_for_turn(req.step_id)
            .await
            .map_err(Status::failed_precondition)?;
        // On this thread, blocking it for the step (see `runner`). Never wait for the lock: it
        // is held only by a load, which a step must not queue behind.
        let mut runner = match self.runner.try_lock() {
            Ok(runner) => runner,
            // A panic escaped half-way: the rank's state is unknown until the group is formed
            // again (a load clears the poison).
            Err(TryLockError::Poisoned(_)) => return Err(Status::internal(POISONED)),
            Err(TryLockError::WouldBlock) => {
                return Err(Status::failed_precondition(
                    "a shard is loading: no step until it is loaded",
                ))
            }
        };
        // `block_in_place` hands this thread's queue (its LIFO slot included, which no other
        // thread may steal) to a fresh thread first: without it, a task parked behind a long
        // step, such as the connection that carries `Health`, waits for the step to end, and a
        // prefill of seconds reads as a dead rank.
        let answer = tokio::task::block_in_place(|| runner.serve_step(req, &span));
        let next = runner.next_step();
        drop(runner);
        self.order.advance(next);
        answer.map(Response::new)
    }

    async fn new_nccl_id(
        &self,
        _: Request<pb::NewNcclIdRequest>,
    ) -> Result<Response<pb::NewNcclIdResponse>, Status> {
        crate::nccl_group::new_id().map(|nccl_id| Response::new(pb::NewNcclIdResponse { nccl_id }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        // A panic that escaped while the runner was held poisoned its lock and left the rank's
        // state unknown, whatever the status said before it: not ready until a load clears it.
        if self.runner.is_poisoned() {
            return Ok(Response::new(pb::HealthResponse {
                ready: false,
                detail: POISONED.into(),
            }));
        }
        let s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(Response::new(pb::HealthResponse {
            ready: s.ready,
            detail: s.detail,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use caravan_ops::comm::RingListener;
    use caravan_proto::v1::worker_server::Worker;
    use tch::Device;

    use super::*;
    use crate::runner::ModelRunner;

    fn service() -> (WorkerService, SharedRunner) {
        let status = SharedStatus::default();
        let listener = RingListener::bind("127.0.0.1:0").unwrap();
        let runner: SharedRunner = Arc::new(Mutex::new(ModelRunner::new(
            Device::Cpu,
            listener,
            status.clone(),
            None,
        )));
        let identity = WorkerIdentity {
            host: "h".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            ring_addr: String::new(),
        };
        (WorkerService::new(runner.clone(), status, identity), runner)
    }

    /// A panic that escapes while the runner is held (a load's; a step's own are caught inside)
    /// leaves the rank's state unknown: Health says so, whatever the status said before, until a
    /// load clears the poison.
    #[tokio::test]
    async fn a_panic_holding_the_runner_makes_the_rank_unready_until_it_loads() {
        let (service, runner) = service();
        {
            let mut s = service.status.lock().unwrap();
            s.ready = true;
            s.rank = Some(0);
        }
        let ready = service
            .health(Request::new(pb::HealthRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(ready.ready);
        let holder = runner.clone();
        std::thread::spawn(move || {
            let _guard = holder.lock().unwrap();
            panic!("a load's bug");
        })
        .join()
        .unwrap_err();
        let after = service
            .health(Request::new(pb::HealthRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(!after.ready);
        assert!(after.detail.contains("panicked"), "{}", after.detail);
        runner.clear_poison();
        let loaded = service
            .health(Request::new(pb::HealthRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(
            loaded.ready,
            "ready again once the poison is cleared, as a load does"
        );
    }
}
