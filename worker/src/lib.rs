//! A Caravan tensor-parallel rank: one shard of every layer and of the KV cache, joined to its
//! peers by a collective.
//!
//! The served path: [`service`] (gRPC, `caravan.v1.Worker`) runs each step on the thread that
//! received it, through [`runner`] (the model, the cache and each sequence's [`sequences`] state:
//! block table and [`sampling`] stream, behind one lock), its cache sized by [`cache_sizing`];
//! [`step_sampling`] chooses a step's tokens on the host or, through [`device_sampling`], where
//! the logits lie. [`faults`] injects step failures for recovery tests. The offline path:
//! [`generate`] runs a rank of a fixed generation job and [`local_group`] starts a group as local
//! processes. Both check `--device` with [`device`].

pub mod cache_sizing;
pub mod device;
pub mod device_sampling;
pub mod faults;
/// The checkers of the `cargo fuzz` targets (`fuzz/`): built for them (feature `fuzzing`) and
/// for the tests that replay their seeds and regressions, not part of the library otherwise.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod generate;
pub mod host;
pub mod local_group;
pub mod membership;
pub mod nccl_group;
pub mod runner;
pub mod sampling;
pub mod sequences;
pub mod service;
pub mod step_order;
pub mod step_sampling;
pub mod telemetry;
