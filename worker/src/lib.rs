//! A Caravan tensor-parallel rank: one shard of every layer and of the KV cache, joined to its
//! peers by a collective.
//!
//! The served path: [`service`] (gRPC, `caravan.v1.Worker`) forwards to [`engine`] (the one thread
//! that owns the model, the cache and [`sampling`] state). The offline path: [`generate`] runs a
//! rank of a fixed generation job and [`local_group`] starts a group as local processes.

pub mod engine;
pub mod fuzz;
pub mod generate;
pub mod host;
pub mod local_group;
pub mod membership;
pub mod sampling;
pub mod service;
pub mod telemetry;
