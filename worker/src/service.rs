//! The worker's gRPC service (`caravan.v1.Worker`): a thin async front that forwards every request
//! to the model thread and awaits its answer.

use std::sync::mpsc::Sender;

use caravan_proto::{self as pb, worker_server::Worker};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::runner::{Command, SharedStatus};

/// What the service reports about this worker in `Info`.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub host: String,
    pub device: String,
    pub memory_bytes: u64,
    pub ring_addr: String,
}

pub struct WorkerService {
    commands: Sender<Command>,
    status: SharedStatus,
    identity: WorkerIdentity,
}

impl WorkerService {
    pub fn new(commands: Sender<Command>, status: SharedStatus, identity: WorkerIdentity) -> Self {
        WorkerService {
            commands,
            status,
            identity,
        }
    }

    /// This worker's rank in its group (-1 before it joins one), for trace attributes.
    fn rank(&self) -> i64 {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rank
            .map_or(-1, i64::from)
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> Command,
    ) -> Result<Response<T>, Status> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| Status::unavailable("the model thread has stopped"))?;
        rx.await
            .map_err(|_| Status::internal("the model thread dropped the request"))?
            .map(Response::new)
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
        self.call(|tx| Command::Load(req, tx)).await
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
        self.call(|tx| Command::Step(req, span, tx)).await
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
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
