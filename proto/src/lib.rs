//! The wire contract between coordinator and workers, package `caravan.v1`.
//!
//! The gRPC services (worker: info, load shard, step, release, health; coordinator: registration and
//! heartbeat) land here with the serving path; until then the crate only holds the version string
//! both sides will check at registration.

/// Protocol version a coordinator and its workers must agree on.
pub const PROTOCOL_VERSION: &str = "caravan.v1";
