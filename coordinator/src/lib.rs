//! The coordinator: owns the public API, the tokenizer, the scheduler and the worker group.
//!
//! Start-up ([`serve`]): bind HTTP (answering 503 until ready) and the registration service,
//! start local workers if asked, wait for `tp` registrations, form the group (load every shard,
//! warm up), then start the scheduler and report ready.
//!
//! A request's path: [`api`] (HTTP) validates it and submits it to the [`engine`], the task that
//! owns every request in flight. Each step the engine asks the [`scheduler`] (pure policy over
//! the [`blocks`] of the KV cache) for a plan, runs it on a [`executor::StepExecutor`] (the
//! [`group`] of workers over gRPC), and hands the sampled tokens to each request's [`output`]
//! processor (text, stop strings, the end), which streams them back to the API.
//!
//! Around it: [`registry`] (workers join), [`etcd`] (membership and leadership), [`server`]
//! (start-up, forming the group again after a failure, draining), [`tokenizer`], [`stats`]
//! (metrics), [`chat_template`] (the checkpoint's own chat template). The operator CLI, `caravanctl`, is its own crate (`ctl/`).

pub mod api;
pub mod blocks;
pub mod chat_template;
pub mod config;
pub mod engine;
pub mod etcd;
pub mod executor;
/// The checkers of the `cargo fuzz` targets (`fuzz/`): built for them (feature `fuzzing`) and
/// for the tests that replay their seeds and regressions, not part of the library otherwise.
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod group;
pub mod health;
pub mod local_workers;
pub mod model_info;
pub mod output;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod stats;
pub mod structured;
pub mod supervisor;
pub mod tokenizer;

pub use caravan_proto::PROTOCOL_VERSION;
