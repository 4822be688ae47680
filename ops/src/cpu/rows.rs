//! Per-row elementwise steps (RMSNorm, rotary embedding) done in one pass in Rust instead of
//! six or seven libtorch calls each: at decode, those calls' dispatch costs more than their
//! arithmetic. Results round exactly where transformers' versions round, so bf16 matches
//! libtorch's op-by-op path to the bit and f32 to the last ulp of a sum.

use half::{bf16, f16};
use tch::{Device, Kind, Tensor};

use crate::{
    cpu::{elements, elements_mut, is_plain, Scalar},
    Result,
};

/// transformers' `LlamaRMSNorm`: `weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)`, the
/// normalisation in f32. `x`: `[rows, hidden]`; `weight`: `[hidden]`, same kind. `None` where
/// this path does not apply (not a contiguous CPU float tensor), for libtorch.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let kind = x.kind();
    let hidden = weight.numel();
    if !super::kernels::enabled()
        || !is_plain(x, kind)
        || !is_plain(weight, kind)
        || x.dim() != 2
        || x.size()[1] as usize != hidden
    {
        return Ok(None);
    }
    let mut y = Tensor::f_empty(x.size(), (kind, Device::Cpu))?;
    match kind {
        Kind::Float => norm::<f32>(x, weight, eps as f32, &mut y),
        Kind::BFloat16 => norm::<bf16>(x, weight, eps as f32, &mut y),
        Kind::Half => norm::<f16>(x, weight, eps as f32, &mut y),
        _ => return Ok(None),
    }
    Ok(Some(y))
}

fn norm<T: Scalar>(x: &Tensor, weight: &Tensor, eps: f32, y: &mut Tensor) {
    let (x, weight) = (elements::<T>(x), elements::<T>(weight));
    let hidden = weight.len();
    for (x, y) in x
        .chunks(hidden)
        .zip(elements_mut::<T>(y).chunks_mut(hidden))
    {
        let squares: f32 = x.iter().map(|v| v.to_f32() * v.to_f32()).sum();
        let scale = 1.0 / (squares / hidden as f32 + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(weight) {
            let normed = T::from_f32(x.to_f32() * scale).to_f32();
            *y = T::from_f32(w.to_f32() * normed);
        }
    }
}

/// `x * cos + rotate_half(x) * sin` (rotate_half: `[-x2, x1]` of the two halves), each product
/// and the sum rounded to `x`'s kind as libtorch's op-by-op form rounds them. `x`:
/// `[n, heads, head_dim]`; `cos`, `sin`: `[n, 1, head_dim]`, same kind. `None` where this path does
/// not apply.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    let kind = x.kind();
    let (xs, cs) = (x.size(), cos.size());
    if !super::kernels::enabled()
        || !is_plain(x, kind)
        || !is_plain(cos, kind)
        || !is_plain(sin, kind)
        || xs.len() != 3
        || cs != [xs[0], 1, xs[2]]
        || sin.size() != cs
        || xs[2] % 2 != 0
    {
        return Ok(None);
    }
    let mut y = Tensor::f_empty(&xs, (kind, Device::Cpu))?;
    let head_dim = xs[2] as usize;
    match kind {
        Kind::Float => rotate::<f32>(x, cos, sin, head_dim, &mut y),
        Kind::BFloat16 => rotate::<bf16>(x, cos, sin, head_dim, &mut y),
        Kind::Half => rotate::<f16>(x, cos, sin, head_dim, &mut y),
        _ => return Ok(None),
    }
    Ok(Some(y))
}

fn rotate<T: Scalar>(x: &Tensor, cos: &Tensor, sin: &Tensor, head_dim: usize, y: &mut Tensor) {
    let (cos, sin) = (elements::<T>(cos), elements::<T>(sin));
    let x = elements::<T>(x);
    let y = elements_mut::<T>(y);
    let heads = x.len() / cos.len();
    let half = head_dim / 2;
    let round = |v: f32| T::from_f32(v).to_f32();
    for (token, (x, y)) in x
        .chunks(heads * head_dim)
        .zip(y.chunks_mut(heads * head_dim))
        .enumerate()
    {
        let cos = &cos[token * head_dim..(token + 1) * head_dim];
        let sin = &sin[token * head_dim..(token + 1) * head_dim];
        for (x, y) in x.chunks(head_dim).zip(y.chunks_mut(head_dim)) {
            for i in 0..head_dim {
                let rotated = if i < half {
                    -x[i + half].to_f32()
                } else {
                    x[i - half].to_f32()
                };
                let sum = round(x[i].to_f32() * cos[i].to_f32()) + round(rotated * sin[i].to_f32());
                y[i] = T::from_f32(sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::tests::random;

    /// The largest difference from `want`, in f32 epsilons at `want`'s largest magnitude.
    fn ulps(got: &Tensor, want: &Tensor) -> f64 {
        let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
        let eps = f32::EPSILON as f64;
        let scale = want.abs().max().double_value(&[]).max(1e-30);
        (got - &want).abs().max().double_value(&[]) / (scale * eps)
    }

    /// libtorch's op-by-op form, as the layers run it when this path does not apply.
    fn reference_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let var = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        w * (x32 * (var + eps).rsqrt()).to_kind(x.kind())
    }

    fn reference_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.size()[2] / 2;
        let rotated = Tensor::cat(&[&x.narrow(2, half, half).neg(), &x.narrow(2, 0, half)], 2);
        x * cos + rotated * sin
    }

    #[test]
    fn rms_norm_matches_libtorch() {
        tch::manual_seed(2);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let (x, w) = (random(&[5, 1024], kind), random(&[1024], kind));
            let got = rms_norm(&x, &w, 1e-5).unwrap().expect("applies");
            let want = reference_norm(&x, &w, 1e-5);
            if kind == Kind::Float {
                // The mean's sum runs in another order: a few ulps.
                assert!(
                    ulps(&got, &want) < 16.0,
                    "f32 off by {} ulps",
                    ulps(&got, &want)
                );
            } else {
                // Rounded at the same two places, so values differ only where the f32 scale's
                // last bit tips a rounding: rarely, and by a unit of the 16-bit kind in each of
                // the two roundings (plus f16's fixed steps near zero).
                let differ = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
                assert!(differ <= 50, "{kind:?}: {differ} of 5120 values differ");
                let unit = if kind == Kind::BFloat16 {
                    1.0 / 128.0
                } else {
                    1.0 / 1024.0
                };
                let (g, w) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
                let off = ((g - &w).abs() - w.abs() * (2.0 * unit))
                    .max()
                    .double_value(&[]);
                assert!(
                    off <= 1e-4,
                    "{kind:?}: a value is off by more than two units"
                );
            }
        }
    }

    #[test]
    fn rotary_matches_libtorch() {
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let x = random(&[3, 4, 64], kind);
            let (cos, sin) = (random(&[3, 1, 64], kind), random(&[3, 1, 64], kind));
            let got = rotary(&x, &cos, &sin).unwrap().expect("applies");
            assert!(
                got.equal(&reference_rotary(&x, &cos, &sin)),
                "{kind:?} differs"
            );
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let x = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        let w16 = Tensor::zeros([8], (Kind::BFloat16, Device::Cpu));
        assert!(rms_norm(&x, &w16, 1e-5).unwrap().is_none());
        let strided = Tensor::zeros([8, 2], (Kind::Float, Device::Cpu)).t_();
        assert!(rms_norm(
            &strided,
            &Tensor::zeros([8], (Kind::Float, Device::Cpu)),
            1e-5
        )
        .unwrap()
        .is_none());
        let x = Tensor::zeros([2, 4, 6], (Kind::Float, Device::Cpu));
        let wrong = Tensor::zeros([1, 1, 6], (Kind::Float, Device::Cpu));
        assert!(rotary(&x, &wrong, &wrong).unwrap().is_none());
    }
}
