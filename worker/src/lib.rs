//! A Caravan tensor-parallel rank: one shard of every layer and of the KV cache, joined to its
//! peers by a collective.
//!
//! [`generate`] runs a rank of a fixed generation job (the seed of the serving path and of the
//! benchmarks); [`local_group`] starts a whole group as processes on this machine and hands them
//! the TCP ring's addresses; [`telemetry`] sets up logging.

pub mod generate;
pub mod local_group;
pub mod telemetry;
