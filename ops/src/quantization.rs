//! `--quantization` (vLLM's flag name): the width weights are stored and multiplied in.

use std::{fmt, str::FromStr};

use crate::cpu::quantized::Format;

/// How a rank stores its weights, quantized from the checkpoint's f32/f16/bf16 at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Symmetric 8-bit integers with one f32 scale per block of 32 inputs (llama.cpp's Q8_0
    /// with a wider scale): [`crate::cpu::quantized`].
    Int8,
    /// Symmetric 4-bit integers with one f32 scale per block of 32 inputs (llama.cpp's Q4_0 with
    /// a wider scale). The LM head stays at 8 bits, as llama.cpp keeps its output matrix wider:
    /// at 4 bits it alone raises SmolLM2's perplexity by a tenth.
    Q4,
}

impl Quantization {
    /// How the products of the attention and MLP layers store their weights.
    pub fn layers(self) -> Format {
        match self {
            Quantization::Int8 => Format::Int8,
            Quantization::Q4 => Format::Q4,
        }
    }

    /// How the LM head stores its weight.
    pub fn lm_head(self) -> Format {
        Format::Int8
    }
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(Quantization::Int8),
            "q4" => Ok(Quantization::Q4),
            other => Err(format!(
                "{other:?} is not a quantization Caravan serves (int8, q4)"
            )),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantization::Int8 => "int8",
            Quantization::Q4 => "q4",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Quantization;

    #[test]
    fn parses_and_prints() {
        assert_eq!("INT8".parse::<Quantization>(), Ok(Quantization::Int8));
        assert_eq!(Quantization::Int8.to_string(), "int8");
        assert_eq!("q4".parse::<Quantization>(), Ok(Quantization::Q4));
        assert_eq!(Quantization::Q4.to_string(), "q4");
        let err = "q3".parse::<Quantization>().unwrap_err();
        assert!(err.contains("\"q3\"") && err.contains("int8, q4"), "{err}");
    }
}
