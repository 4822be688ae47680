//! What the coordinator needs to know about the served model, read from its `config.json`
//! (the workers parse and validate the rest).

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

/// Model facts that shape requests: context length and end-of-sequence tokens.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The name the API serves it under.
    pub name: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
}

#[derive(Deserialize)]
struct RawConfig {
    max_position_embeddings: Option<usize>,
    vocab_size: usize,
    bos_token_id: Option<i64>,
    eos_token_id: Option<serde_json::Value>,
}

impl ModelInfo {
    pub fn load(dir: &Path, name: String) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let raw: RawConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let eos_token_ids = match raw.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
            _ => vec![],
        };
        Ok(ModelInfo {
            name,
            max_context: raw.max_position_embeddings.unwrap_or(4096),
            vocab_size: raw.vocab_size,
            eos_token_ids,
            bos_token_id: raw.bos_token_id,
        })
    }
}
