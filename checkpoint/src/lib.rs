//! What a Llama 2 checkpoint is, without libtorch: its hyper-parameters ([`config`]), its
//! safetensors files and where each tensor's bytes lie ([`files`]), and which slices of it a
//! tensor-parallel rank owns ([`layout`]).
//!
//! The model crate (`caravan-ops`) loads weights through it; the coordinator, `caravanctl plan`
//! and `caravanctl convert` read the same facts through it without linking libtorch, so a
//! checkpoint is parsed and validated one way everywhere.

pub mod config;
pub mod dtype;
pub mod error;
pub mod files;
pub mod layout;

pub use config::LlamaConfig;
pub use dtype::DType;
pub use error::{Error, Result};
pub use files::{SafetensorsFolder, TensorEntry};
pub use layout::{ShardLayout, VocabSharding};
