//! The coordinator: owns the public API, the tokenizer, the scheduler and the worker group.
//!
//! It arrives with the serving path (gRPC to workers, OpenAI-compatible HTTP). The workspace carries
//! the crate now so the layout mirrors the architecture from the start.

pub use caravan_proto::PROTOCOL_VERSION;
