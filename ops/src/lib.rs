//! Llama 2 on libtorch, sharded by Megatron-style tensor parallelism across processes.
//!
//! The pieces, in the order data meets them: [`config`] (what the checkpoint says),
//! [`parallel`] (which slices a rank owns), [`weights`] (mmap and slice safetensors), [`comm`]
//! (collectives: single, TCP ring), [`cpu`] (threads and decode products), [`layers`] (one file per block), [`kv_cache`] and [`batch`]
//! (what a step reads and writes), and [`llama`] (the model).

pub mod batch;
pub mod comm;
pub mod config;
pub mod cpu;
pub mod dtype;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod parallel;
pub mod weights;

pub use batch::{LogitsSelection, SequenceStep};
pub use comm::Communicator;
pub use config::LlamaConfig;
pub use dtype::DType;
pub use error::{Error, Result};
pub use kv_cache::{BlockAllocator, KvCache};
pub use llama::{Llama, LlamaWeights, LoadOptions};
pub use parallel::{ShardLayout, VocabSharding};
pub use weights::Checkpoint;
