//! The coordinator: owns the public API, the tokenizer, the scheduler and the worker group.
//!
//! Start-up ([`serve`]): bind HTTP (answering 503 until ready) and the registration service,
//! start local workers if asked, wait for `tp` registrations, form the group (load every shard,
//! warm up), then start the scheduler and report ready.
//!
//! Modules: [`registry`] (workers join), [`group`] (a TP group: bring-up and lockstep steps),
//! [`engine`] (the scheduler), [`blocks`] (KV block manager), [`tokenizer`], [`api`] (HTTP);
//! [`operator`] holds the offline tools of `caravanctl` (checkpoint conversion, capacity planning).

pub mod api;
pub mod blocks;
pub mod engine;
pub mod etcd;
pub mod fuzz;
pub mod group;
pub mod local_workers;
pub mod model_info;
pub mod operator;
pub mod registry;
pub mod server;
pub mod stats;
pub mod tokenizer;

pub use caravan_proto::PROTOCOL_VERSION;
