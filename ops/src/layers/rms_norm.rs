//! Root-mean-square layer norm (Zhang and Sennrich, arXiv 1910.07467), replicated on every rank.
//!
//! Computed in f32 and cast back before the weight is applied, exactly as transformers'
//! `LlamaRMSNorm` does, so bf16 results round the same way.

use tch::{Kind, Tensor};

use crate::{
    weights::{Slice, WeightLoader, WeightSpec},
    Result,
};

pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.weight.numel() * self.weight.kind().elt_size_in_bytes()
    }

    pub fn load(loader: &WeightLoader, spec: &WeightSpec, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: loader.load(spec, Slice::Full)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::cpu::rows::rms_norm(x, &self.weight, self.eps)? {
            return Ok(y);
        }
        let kind = x.kind();
        let x32 = x.f_to_kind(Kind::Float)?;
        let variance = x32
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        let normed = x32.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }
}
