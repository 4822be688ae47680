//! Cluster state in etcd (`--etcd-endpoints`): the coordinators' leader election, and the worker
//! registrations the leader forms groups from.
//!
//! Every coordinator campaigns on one election under a lease it keeps alive; the winner serves,
//! the others answer 503 until they win. A leader that dies stops renewing its lease, which
//! expires after `--etcd-lease-ttl` seconds and hands the election to a standby. Workers register
//! as keys on their own leases (see `caravan_proto::etcd`); the leader mirrors that prefix into
//! its [`Registry`] with a watch.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use anyhow::{Context, Result};
use caravan_proto::{self as pb, etcd};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, TlsOptions,
    WatchOptions,
};
use prost::Message;
use tokio::sync::watch;

use crate::registry::{Registry, WorkerInfo};

/// How long a single etcd call (not a campaign or a watch) may take.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    lease_ttl: i64,
}

/// Held while this coordinator leads; `lost` turns true if the lease cannot be renewed.
/// Dropping it stops the renewals (the lease then expires after its TTL); [`Self::resign`]
/// hands the leadership over at once.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    keepalive: tokio::task::JoinHandle<()>,
    client: Client,
    lease: i64,
}

impl Leadership {
    /// Revokes the lease, so a standby leads without waiting for it to expire (best effort).
    pub async fn resign(mut self) {
        self.keepalive.abort();
        match tokio::time::timeout(ETCD_CALL_TIMEOUT, self.client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => tracing::info!(lease = self.lease, "resigned the leadership"),
            Ok(Err(e)) => tracing::warn!(error = %e, "revoking the leadership lease"),
            Err(_) => tracing::warn!("revoking the leadership lease: etcd did not answer"),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

impl Etcd {
    /// A client of `endpoints`, over TLS with `tls` (`--etcd-cacert` and friends).
    pub async fn connect(
        endpoints: &[String],
        tls: Option<TlsOptions>,
        prefix: &str,
        lease_ttl: i64,
    ) -> Result<Self> {
        let options = tls.map(|tls| ConnectOptions::new().with_tls(tls));
        let client = Client::connect(endpoints, options)
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
        let response = tokio::time::timeout(
            ETCD_CALL_TIMEOUT,
            client.leader(etcd::leader_election(&self.prefix)),
        )
        .await
        .ok()?
        .ok()?;
        let kv = response.kv()?;
        Some(String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Campaigns until this coordinator leads, announcing `url`.
    ///
    /// The lease is renewed every third of its TTL. A failed renewal (etcd restarting, a
    /// dropped connection) is retried; the leadership counts as lost only when etcd says the
    /// lease has expired, or when no renewal has succeeded for a whole TTL, counted from when
    /// the last good one was sent, since by then etcd may have expired it and elected a standby.
    pub async fn lead(&self, url: &str) -> Result<Leadership> {
        let mut client = self.client.clone();
        let lease =
            tokio::time::timeout(ETCD_CALL_TIMEOUT, client.lease_grant(self.lease_ttl, None))
                .await
                .context("etcd did not answer the lease grant")??
                .id();
        let ttl = Duration::from_secs(self.lease_ttl as u64);
        let period = Duration::from_millis((self.lease_ttl as u64 * 1000 / 3).max(200));
        let (lost_tx, lost) = watch::channel(false);
        let mut renewer = client.clone();
        // Renew from the start: a standby may campaign for a long time.
        let keepalive = tokio::spawn(async move {
            let mut stream = None;
            let mut valid_until = Instant::now() + ttl;
            loop {
                let sent = Instant::now();
                // Never wait past the lease's possible expiry for an answer.
                let patience = period.min(valid_until.saturating_duration_since(sent));
                let renewed =
                    tokio::time::timeout(patience, renew(&mut renewer, lease, &mut stream))
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {patience:?}")));
                match renewed {
                    Ok(true) => valid_until = sent + ttl,
                    Ok(false) => {
                        tracing::error!(lease, "etcd says the leadership lease expired");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(e) => {
                        stream = None;
                        if Instant::now() >= valid_until {
                            tracing::error!(lease, error = %format!("{e:#}"), "the leadership lease went a whole TTL without renewal");
                            let _ = lost_tx.send(true);
                            return;
                        }
                        tracing::warn!(lease, error = %format!("{e:#}"), "renewing the leadership lease failed; retrying");
                    }
                }
                tokio::time::sleep_until(sent + period).await;
            }
        });
        // From here on, dropping `leadership` (a failed or abandoned campaign) stops the renewals.
        let leadership = Leadership {
            lost,
            keepalive,
            client: client.clone(),
            lease,
        };
        let mut watch_lost = leadership.lost.clone();
        let campaign = tokio::select! {
            result = client.campaign(etcd::leader_election(&self.prefix), url, lease) => {
                result.context("campaigning for leadership")
            }
            _ = watch_lost.wait_for(|l| *l) => Err(anyhow::anyhow!("lost the etcd lease while campaigning")),
        };
        match campaign {
            Ok(_) => Ok(leadership),
            Err(e) => {
                // Revoking also withdraws the candidacy the campaign may have left in etcd.
                leadership.resign().await;
                Err(e)
            }
        }
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

/// One renewal of `lease` on `stream` (opened first if there is none): whether etcd still holds
/// the lease.
async fn renew(
    client: &mut Client,
    lease: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<bool> {
    if stream.is_none() {
        *stream = Some(client.lease_keep_alive(lease).await?);
    }
    let (keeper, responses) = stream.as_mut().expect("opened above");
    keeper.keep_alive().await?;
    match responses.message().await? {
        Some(r) => Ok(r.ttl() > 0),
        None => anyhow::bail!("the keep-alive stream ended"),
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
