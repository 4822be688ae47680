//! Worker membership in etcd (`--etcd-endpoints`): the worker's registration is a key under the
//! cluster's prefix, attached to a lease the worker keeps alive. A worker that dies stops renewing
//! it and its key vanishes after the lease's TTL; the coordinators watch the prefix.

use std::time::Duration;

use anyhow::{Context, Result};
use caravan_proto::{self as pb, etcd};
use etcd_client::{Client, ConnectOptions, PutOptions};
use prost::Message;

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct EtcdRegistration {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Lease time-to-live in seconds: how long a dead worker stays listed.
    pub lease_ttl: i64,
    pub worker_id: String,
    /// TLS to etcd (`--etcd-cacert` and friends), or `None` for plaintext.
    pub tls: Option<etcd_client::TlsOptions>,
}

impl EtcdRegistration {
    /// Registers `request` and keeps the registration alive until the task is dropped. Losing
    /// etcd or the lease is logged and repaired: the worker registers again as soon as it can.
    pub async fn run(self, request: pb::RegisterRequest) -> Result<()> {
        let key = format!("{}{}", etcd::workers_prefix(&self.prefix), self.worker_id);
        let value = request.encode_to_vec();
        let mut first = true;
        loop {
            match self.hold(&key, &value, &mut first).await {
                Ok(()) => {}
                Err(e) if first => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "etcd registration lost; registering again")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One lease: grant, put, renew until renewal fails.
    async fn hold(&self, key: &str, value: &[u8], first: &mut bool) -> Result<()> {
        let options = self
            .tls
            .clone()
            .map(|tls| ConnectOptions::new().with_tls(tls));
        let mut client = Client::connect(&self.endpoints, options)
            .await
            .with_context(|| format!("connecting to etcd at {:?}", self.endpoints))?;
        let lease = client
            .lease_grant(self.lease_ttl, None)
            .await
            .with_context(|| format!("taking a lease from etcd at {:?}", self.endpoints))?
            .id();
        client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .with_context(|| format!("registering under {key}"))?;
        if *first {
            eprintln!(
                "caravan-worker: registered in etcd as {key} (lease ttl {} s)",
                self.lease_ttl
            );
            *first = false;
        } else {
            tracing::info!(%key, "registered in etcd again");
        }
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        let period = Duration::from_millis((self.lease_ttl as u64 * 1000 / 3).max(200));
        loop {
            tokio::time::sleep(period).await;
            keeper.keep_alive().await.context("renewing the lease")?;
            match responses.message().await.context("renewing the lease")? {
                Some(r) if r.ttl() > 0 => {}
                _ => anyhow::bail!("the lease expired"),
            }
        }
    }
}
