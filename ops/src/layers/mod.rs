//! The building blocks of a Llama 2 decoder, one concept per file, each sharded for tensor
//! parallelism where the paper's math allows it.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod rms_norm;
pub mod rotary;

pub use attention::Attention;
pub use embedding::{LmHead, ParallelEmbedding};
pub use linear::{ColumnParallelLinear, RowParallelLinear};
pub use mlp::Mlp;
pub use rms_norm::RmsNorm;
pub use rotary::RotaryEmbedding;
