//! Rotary position embeddings (Su et al., arXiv 2104.09864) in the "rotate half" form.
//!
//! Hugging Face permutes the rows of q_proj and k_proj so that RoPE pairs dimension i with
//! i + d/2; this module applies that form. The cos/sin tables are computed once in f32 for every
//! position up to the model's context and cast to the compute dtype per step, as transformers does.

use tch::{Device, Kind, Tensor};

use crate::Result;

pub struct RotaryEmbedding {
    /// `[max_positions, head_dim]`, f32.
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: Device) -> Result<Self> {
        let half = head_dim as i64 / 2;
        let exponents =
            Tensor::f_arange(half, (Kind::Float, device))?.f_mul_scalar(2.0 / head_dim as f64)?;
        let inv_freq = Tensor::f_from_slice(&[theta as f32])?
            .f_to_device(device)?
            .f_pow(&exponents)?
            .f_reciprocal()?;
        let positions = Tensor::f_arange(max_positions as i64, (Kind::Float, device))?;
        let freqs = positions.f_outer(&inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        Ok(RotaryEmbedding {
            cos: emb.f_cos()?,
            sin: emb.f_sin()?,
        })
    }

    /// The largest position (exclusive) the tables cover.
    pub fn max_positions(&self) -> i64 {
        self.cos.size()[0]
    }

    /// cos and sin rows for `positions` (`[n]`, int64), as `[n, 1, head_dim]` in `kind`, ready to
    /// broadcast over heads. Compute once per step and share across layers.
    pub fn tables(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let cos = self
            .cos
            .f_index_select(0, positions)?
            .f_unsqueeze(1)?
            .f_to_kind(kind)?;
        let sin = self
            .sin
            .f_index_select(0, positions)?
            .f_unsqueeze(1)?
            .f_to_kind(kind)?;
        Ok((cos, sin))
    }

    /// Rotates `x` (`[n, heads, head_dim]`) by the tables from [`RotaryEmbedding::tables`].
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::cpu::rows::rotary(x, cos, sin)? {
            return Ok(y);
        }
        let half = x.size()[2] / 2;
        let x1 = x.f_narrow(2, 0, half)?;
        let x2 = x.f_narrow(2, half, half)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], 2)?;
        Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
    }
}
