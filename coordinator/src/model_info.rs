//! What the coordinator needs to know about the served model: its `config.json`, parsed and
//! checked by `caravan-checkpoint` exactly as the workers parse it.

use std::path::Path;

use anyhow::{Context, Result};
use caravan_checkpoint::{LlamaConfig, ShardLayout, VocabSharding};

/// Model facts that shape requests: context length and end-of-sequence tokens.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name the API serves it under.
    pub name: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
    /// The checkpoint's `torch_dtype`.
    pub dtype: Option<caravan_checkpoint::DType>,
}

impl ModelInfo {
    /// Reads `dir/config.json` and checks that it splits `tp` ways as the workers would split it
    /// (a group that cannot form is refused at start, not retried forever).
    pub fn load(dir: &Path, name: String, tp: usize, vocab: VocabSharding) -> Result<Self> {
        let config = LlamaConfig::from_path(&dir.join("config.json"))?;
        ShardLayout::validate(&config, tp, vocab).with_context(|| dir.display().to_string())?;
        Ok(ModelInfo {
            name,
            max_context: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            eos_token_ids: config
                .eos_token_ids
                .iter()
                .map(|&id| i64::from(id))
                .collect(),
            bos_token_id: config.bos_token_id.map(i64::from),
            dtype: config.dtype,
        })
    }
}
