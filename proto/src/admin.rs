//! The JSON of the coordinator's admin endpoints, shared by the server (which writes it) and
//! `caravanctl` (which reads it).

use serde::{Deserialize, Serialize};

/// `GET /admin/status`: readiness, load, and the serving group rank by rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub model: String,
    pub tensor_parallel_size: usize,
    pub ready: bool,
    /// Why not ready (empty when ready).
    pub reason: String,
    pub draining: bool,
    /// Everything in flight has ended; the process is stopping.
    pub drained: bool,
    pub in_flight: u64,
    pub running: u64,
    pub waiting: u64,
    pub kv_cache_blocks_used: u64,
    pub kv_cache_blocks_total: u64,
    /// The serving group, rank order (empty while none is formed).
    pub workers: Vec<GroupMember>,
    /// Registered workers outside the group, ready to take a failed rank's place (their ids;
    /// `caravanctl workers` shows them in full).
    #[serde(default)]
    pub spares: Vec<String>,
}

/// One rank of the serving group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMember {
    pub rank: usize,
    /// "R of T", 1-based.
    pub shard: String,
    pub id: String,
    /// gRPC address.
    pub address: String,
    pub ring_address: String,
    pub host: String,
    pub device: String,
    pub memory_bytes: u64,
    /// Bytes of weights its shard holds (quantized ones at their width; 0 from older
    /// coordinators).
    #[serde(default)]
    pub weight_bytes: u64,
    /// Bytes of the KV cache it allocated.
    #[serde(default)]
    pub kv_cache_bytes: u64,
    /// Its device's memory (the GPU's on CUDA, the host's or its cgroup's on CPU) once the shard
    /// and the cache were in place: total and free (0 from older coordinators or when unknown).
    #[serde(default)]
    pub device_total_bytes: u64,
    #[serde(default)]
    pub device_free_bytes: u64,
    /// What computes its weight products: Caravan's CPU loops (e.g. "AVX-512 BF16") or
    /// "libtorch" (empty from older coordinators and workers).
    #[serde(default)]
    pub kernels: String,
    /// "ready", "not ready: ...", "unreachable: ..." or "unknown".
    pub health: String,
}

/// `GET /admin/workers`: every registered worker, in the group or waiting to join one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workers {
    pub workers: Vec<RegisteredWorker>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisteredWorker {
    pub id: String,
    /// Its rank in the serving group, if it is in it.
    pub rank: Option<usize>,
    pub address: String,
    pub ring_address: String,
    pub host: String,
    pub device: String,
    pub memory_bytes: u64,
    /// Since its last heartbeat (or registration).
    pub last_seen_ms: u64,
}

/// `POST /admin/drain` (202): the drain has started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainStarted {
    /// "draining".
    pub status: String,
    pub in_flight: u64,
}
