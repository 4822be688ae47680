//! The contracts between Caravan's processes: the gRPC wire contract between coordinator and
//! workers, package `caravan.v1` (see `proto/caravan/v1/*.proto`, where every RPC and field is
//! documented), the layout of cluster state in [`etcd`], and the [`admin`] JSON that
//! `caravanctl` reads from the coordinator.

/// Protocol version a coordinator and its workers must agree on.
/// The gRPC package stays `caravan.v1`; the version says which revision of it (v1.1: stateful
/// steps, no `Release`, enums for dtype and vocabulary placement; v1.2: prompt log-probabilities;
/// v1.3: NCCL groups on the served path, `NewNcclId`; v1.4: `LoadShard`'s quantization, which a
/// worker that ignored it would silently not apply, and sampling parameters applied as sent:
/// `top_p` and `repetition_penalty` 0 are refused, no longer read as 1; v1.5: `LoadShard`'s
/// `memory_utilization`, the KV cache sized by the rank from its device's memory after the weights
/// load, and the memory figures of its answer; v1.6: `LoadShard`'s quantization q4, which a v1.5
/// worker would read as none; v1.7: steps may arrive before their predecessor has run, and a
/// sequence's input may be the token the rank sampled last, `SequenceStep.feeds_sampled`).
pub const PROTOCOL_VERSION: &str = "caravan.v1.7";

/// The exit status of a `caravan-worker` that refuses to start because of how it was asked to
/// run (a device it cannot use; clap's usage errors exit with the same status). Restarting it
/// cannot help, so a coordinator that started it (`--local-workers`) stops instead of retrying.
pub const WORKER_EXIT_REFUSED: u8 = 2;

/// Generated messages and services.
pub mod v1 {
    tonic::include_proto!("caravan.v1");
}

pub use v1::*;

/// How Caravan lays out its state in etcd (`--etcd-endpoints`). Everything lives under a prefix
/// (`--etcd-prefix`, default `/caravan`), so several clusters can share one etcd.
pub mod etcd {
    /// Default key prefix.
    pub const DEFAULT_PREFIX: &str = "/caravan";

    /// Where workers register: one key per worker, `{prefix}/workers/{worker id}`, whose value is
    /// a protobuf-encoded [`crate::RegisterRequest`], attached to the worker's lease (it vanishes
    /// when the worker stops renewing it).
    pub fn workers_prefix(prefix: &str) -> String {
        format!("{}/workers/", prefix.trim_end_matches('/'))
    }

    /// The election coordinators campaign on; the leader's value is its HTTP URL.
    pub fn leader_election(prefix: &str) -> String {
        format!("{}/coordinator-leader", prefix.trim_end_matches('/'))
    }
}
pub mod admin;
