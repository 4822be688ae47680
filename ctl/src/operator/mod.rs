//! Offline operator tools behind `caravanctl`: converting a checkpoint to grouped-query
//! attention ([`convert`]) and planning multi-node layouts ([`plan`]) from the GPU figures in
//! [`hardware`]. Neither talks to a running cluster.

pub mod convert;
pub mod hardware;
pub mod plan;
