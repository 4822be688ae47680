//! Llama 2 on libtorch, sharded by Megatron-style tensor parallelism across processes.
//!
//! What a checkpoint is (its config, files and the slices a rank owns) lives in the libtorch-free
//! `caravan-checkpoint` crate, re-exported here. The pieces, in the order data meets them:
//! [`weights`] (mmap and slice safetensors), [`comm`] (collectives: single, TCP ring), [`cpu`]
//! (threads and decode products), [`device_memory`] (what a GPU has free), [`layers`] (one file per block), [`kv_cache`] and [`batch`]
//! (what a step reads and writes), and [`llama`] (the model).

pub mod batch;
pub mod comm;
pub mod cpu;
pub mod device_memory;
pub mod dtype;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod quantization;
pub mod weights;

pub use batch::{LogitsSelection, SequenceStep};
pub use caravan_checkpoint::{DType, LlamaConfig, ShardLayout, VocabSharding};
pub use comm::Communicator;
pub use device_memory::MemoryInfo;
pub use dtype::TorchKind;
pub use error::{Error, Result};
pub use kv_cache::{BlockAllocator, KvCache};
pub use llama::{Llama, LlamaWeights, LoadOptions};
pub use quantization::Quantization;
pub use weights::Checkpoint;
