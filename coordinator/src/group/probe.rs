//! Asking the ranks of a formed group how they are (the worker's health service), without
//! borrowing the group: `/admin/status`, the group watch and re-formation use it.

use std::time::Duration;

use caravan_proto::{self as pb, worker_client::WorkerClient};
use futures::future::join_all;
use tonic::transport::Channel;

/// Asks every rank of a group whether it is ready.
#[derive(Clone)]
pub struct HealthProbe {
    ranks: Vec<WorkerClient<Channel>>,
}

impl HealthProbe {
    pub(super) fn new(ranks: Vec<WorkerClient<Channel>>) -> Self {
        HealthProbe { ranks }
    }
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
