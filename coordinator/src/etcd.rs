//! Cluster state in etcd (`--etcd-endpoints`): the coordinators' leader election, and the worker
//! registrations the leader forms groups from.
//!
//! Every coordinator campaigns on one election under a lease it keeps alive; the winner serves,
//! the others answer 503 until they win. A leader that dies stops renewing its lease, which
//! expires after `--etcd-lease-ttl` seconds and hands the election to a standby. Workers register
//! as keys on their own leases (see `caravan_proto::etcd`); the leader mirrors that prefix into
//! its [`Registry`] with a watch.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use caravan_proto::{self as pb, etcd};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use prost::Message;
use tokio::sync::watch;

use crate::registry::{Registry, WorkerInfo};

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    lease_ttl: i64,
}

/// Held while this coordinator leads; `lost` turns true if the lease cannot be renewed.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl Etcd {
    pub async fn connect(endpoints: &[String], prefix: &str, lease_ttl: i64) -> Result<Self> {
        let client = Client::connect(endpoints, None)
            .await
            .with_context(|| format!("connecting to etcd at {endpoints:?}"))?;
        Ok(Etcd {
            client,
            prefix: prefix.to_string(),
            lease_ttl: lease_ttl.max(1),
        })
    }

    /// The current leader's value (its HTTP URL), if there is one.
    pub async fn leader(&self) -> Option<String> {
        let mut client = self.client.clone();
        let response = client
            .leader(etcd::leader_election(&self.prefix))
            .await
            .ok()?;
        let kv = response.kv()?;
        Some(String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Campaigns until this coordinator leads, announcing `url`.
    pub async fn lead(&self, url: &str) -> Result<Leadership> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(self.lease_ttl, None).await?.id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let (lost_tx, lost) = watch::channel(false);
        let period = Duration::from_millis((self.lease_ttl as u64 * 1000 / 3).max(200));
        // Renew from the start: a standby may campaign for a long time.
        let keepalive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let renewed = keeper.keep_alive().await.is_ok()
                    && matches!(responses.message().await, Ok(Some(r)) if r.ttl() > 0);
                if !renewed {
                    let _ = lost_tx.send(true);
                    return;
                }
            }
        });
        let mut watch_lost = lost.clone();
        tokio::select! {
            result = client.campaign(etcd::leader_election(&self.prefix), url, lease) => {
                result.context("campaigning for leadership")?;
            }
            _ = watch_lost.wait_for(|l| *l) => anyhow::bail!("lost the etcd lease while campaigning"),
        }
        Ok(Leadership { lost, keepalive })
    }

    /// Mirrors the workers registered in etcd into `registry`, until the task is dropped.
    pub async fn mirror_workers(self, registry: Arc<Registry>) {
        loop {
            if let Err(e) = self.mirror_once(&registry).await {
                tracing::warn!(error = %format!("{e:#}"), "watching etcd workers; resyncing");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A full read of the workers' prefix, then its changes until the watch ends.
    async fn mirror_once(&self, registry: &Registry) -> Result<()> {
        let mut client = self.client.clone();
        let prefix = etcd::workers_prefix(&self.prefix);
        let snapshot = client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = snapshot.header().map_or(0, |h| h.revision());
        let mut present = Vec::new();
        for kv in snapshot.kvs() {
            if let Some((id, info)) = decode(&prefix, kv.key(), kv.value()) {
                present.push((id, info));
            }
        }
        registry.replace_all(present);
        let mut stream = client
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        while let Some(response) = stream.message().await? {
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        if let Some((id, info)) = decode(&prefix, kv.key(), kv.value()) {
                            registry.add(info, Some(id));
                        }
                    }
                    EventType::Delete => {
                        let key = String::from_utf8_lossy(kv.key());
                        if let Some(id) = key.strip_prefix(&prefix) {
                            registry.remove(id);
                        }
                    }
                }
            }
        }
        anyhow::bail!("the etcd watch ended")
    }
}

fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Option<(String, WorkerInfo)> {
    let key = String::from_utf8_lossy(key);
    let id = key.strip_prefix(prefix)?.to_string();
    match pb::RegisterRequest::decode(value) {
        Ok(r) if r.protocol_version == caravan_proto::PROTOCOL_VERSION => Some((
            id,
            WorkerInfo {
                worker_addr: r.worker_addr,
                ring_addr: r.ring_addr,
                host: r.host,
                device: r.device,
                memory_bytes: r.memory_bytes,
            },
        )),
        Ok(r) => {
            tracing::warn!(%id, version = %r.protocol_version, "ignoring a worker speaking another protocol");
            None
        }
        Err(e) => {
            tracing::warn!(%id, error = %e, "ignoring an undecodable worker registration");
            None
        }
    }
}
