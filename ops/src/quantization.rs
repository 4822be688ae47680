//! `--quantization` (vLLM's flag name): the width weights are stored and multiplied in.

use std::{fmt, str::FromStr};

/// How a rank stores its weights, quantized from the checkpoint's f32/f16/bf16 at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Symmetric 8-bit integers with one f32 scale per block of 32 inputs (llama.cpp's Q8_0
    /// with a wider scale): [`crate::cpu::int8`].
    Int8,
}

impl FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "int8" => Ok(Quantization::Int8),
            other => Err(format!(
                "{other:?} is not a quantization Caravan serves (int8)"
            )),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Quantization::Int8 => "int8",
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
        let err = "q4".parse::<Quantization>().unwrap_err();
        assert!(err.contains("\"q4\"") && err.contains("int8"), "{err}");
    }
}
