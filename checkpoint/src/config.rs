//! Llama 2 hyper-parameters, parsed and validated from a Hugging Face `config.json`.
//!
//! Accepts the spellings that exist in the wild: `rope_theta` at top level (older files),
//! under `rope_parameters` (transformers 5), or absent (10000); `torch_dtype` or `dtype`;
//! optional `head_dim` and `num_key_value_heads`.

use std::path::Path;

use serde::Deserialize;

use crate::{DType, Error, Result};

/// The shape of a Llama 2 model, validated: every derived size is consistent.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in, when the config says.
    pub dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as written by transformers; only the fields Llama 2 needs.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<EosTokenId>,
}

#[derive(Deserialize)]
struct RawRopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

impl LlamaConfig {
    /// Reads and validates `config.json` (or a folder holding one).
    pub fn from_path(path: &Path) -> Result<Self> {
        let path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json(&text).map_err(|reason| Error::InvalidConfig { path, reason })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if let Some(model_type) = &raw.model_type {
            if model_type != "llama" {
                return Err(format!("model_type is {model_type:?}, expected \"llama\""));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act {act:?} is not supported (Llama uses silu)"
                ));
            }
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err("biased projections are not part of Llama 2".into());
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported (Llama 2 uses plain RoPE)".into());
        }
        let rope_params_theta = match &raw.rope_parameters {
            Some(p) => {
                if let Some(kind) = p.rope_type.as_deref() {
                    if kind != "default" {
                        return Err(format!("rope_type {kind:?} is not supported"));
                    }
                }
                p.rope_theta
            }
            None => None,
        };
        let heads = raw.num_attention_heads;
        if heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 || raw.vocab_size == 0 {
            return Err("sizes must be positive".into());
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads}",
                    raw.hidden_size
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {head_dim} must be even for rotary embeddings"
            ));
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let dtype_name = raw.dtype.as_deref().or(raw.torch_dtype.as_deref());
        let dtype = match dtype_name {
            Some(name) => Some(
                DType::from_hf_name(name).ok_or_else(|| format!("unsupported dtype {name:?}"))?,
            ),
            None => None,
        };
        Ok(LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: raw.rope_theta.or(rope_params_theta).unwrap_or(10_000.0),
            tie_word_embeddings: raw.tie_word_embeddings,
            dtype,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                Some(EosTokenId::One(id)) => vec![id],
                Some(EosTokenId::Many(ids)) => ids,
                None => vec![],
            },
        })
    }

    /// Number of parameters, for logs and capacity estimates.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let layer = h * q * 2 + h * kv * 2 + 3 * h * self.intermediate_size + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + head + self.num_hidden_layers * layer + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "vocab_size": 32000"#;

    fn parse(extra: &str) -> Result<LlamaConfig, String> {
        LlamaConfig::from_json(&format!("{{{BASE}{extra}}}"))
    }

    #[test]
    fn llama2_7b_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rms_norm_eps, 1e-5);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.dtype, None);
        // 6.74B parameters, the published figure for Llama-2-7B.
        assert_eq!(c.num_parameters(), 6_738_415_616);
    }

    #[test]
    fn rope_theta_spellings() {
        assert_eq!(
            parse(r#", "rope_theta": 500000.0"#).unwrap().rope_theta,
            500_000.0
        );
        let nested = r#", "rope_parameters": {"rope_theta": 20000.0, "rope_type": "default"}"#;
        assert_eq!(parse(nested).unwrap().rope_theta, 20_000.0);
        let scaled = r#", "rope_parameters": {"rope_theta": 1.0, "rope_type": "llama3"}"#;
        assert!(parse(scaled).unwrap_err().contains("llama3"));
        assert!(parse(r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#).is_err());
        assert_eq!(
            parse(r#", "rope_scaling": null"#).unwrap().rope_theta,
            10_000.0
        );
    }

    #[test]
    fn dtype_and_optional_fields() {
        let c = parse(
            r#", "torch_dtype": "float16", "head_dim": 64, "num_key_value_heads": 8,
            "tie_word_embeddings": true, "eos_token_id": [2, 3]"#,
        )
        .unwrap();
        assert_eq!(c.dtype, Some(DType::F16));
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_key_value_heads, 8);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(
            parse(r#", "dtype": "bfloat16""#).unwrap().dtype,
            Some(DType::BF16)
        );
        assert!(parse(r#", "dtype": "int8""#).unwrap_err().contains("int8"));
    }

    #[test]
    fn rejects_inconsistent_shapes() {
        assert!(parse(r#", "num_key_value_heads": 5"#)
            .unwrap_err()
            .contains("multiple"));
        assert!(parse(r#", "hidden_act": "gelu""#)
            .unwrap_err()
            .contains("gelu"));
        assert!(LlamaConfig::from_json(r#"{"hidden_size": 1}"#).is_err());
        let err = LlamaConfig::from_json(&format!(r#"{{{BASE}, "model_type": "gpt2"}}"#));
        assert!(err.unwrap_err().contains("gpt2"));
    }
}
