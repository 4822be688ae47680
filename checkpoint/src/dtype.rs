//! Floating-point formats a checkpoint stores and Caravan computes in.

use std::{fmt, str::FromStr};

/// A floating-point format Caravan loads or computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Parses the names Hugging Face uses in `config.json` (`torch_dtype` / `dtype`).
    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The format of a safetensors tensor, if it is one of ours.
    pub fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::BF16 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => Err(format!(
                "unknown dtype {other:?} (expected f32, f16 or bf16)"
            )),
        }
    }
}
