//! `x W^T` for a few rows of `x` (a decode step's tokens), the weight's rows split across the
//! pool so every core streams its own part of the weight.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// The most rows of `x` this path takes. Beyond it libtorch's GEMM, which tiles over rows of `x`,
/// wins (measured: `cargo test --release -p caravan-ops gemv_speed -- --ignored --nocapture`).
pub const MAX_ROWS: i64 = 8;

/// `x W^T` (`x`: `[m, k]`, `weight`: `[n, k]`, no bias) when this path applies: a CPU weight in
/// f32, bf16 or f16, `m <= MAX_ROWS`, and a CPU with AVX2. `None` otherwise, for libtorch.
/// The result has `x`'s dtype; products accumulate in f32.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Option<Tensor>> {
    if !applies(x, weight) {
        return Ok(None);
    }
    imp::linear(x, weight).map(Some)
}

fn applies(x: &Tensor, weight: &Tensor) -> bool {
    let (xs, ws) = (x.size(), weight.size());
    imp::available()
        && weight.device() == Device::Cpu
        && x.device() == Device::Cpu
        && ws.len() == 2
        && xs.len() == 2
        && (1..=MAX_ROWS).contains(&xs[0])
        && xs[1] == ws[1]
        && ws[1] > 0
        && weight.is_contiguous()
        && matches!(weight.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use half::{bf16, f16};
    use rayon::prelude::*;
    use tch::{Kind, Tensor};

    use crate::{
        cpu::{pool, x86},
        Result,
    };

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(x86::available)
    }

    pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let (m, k) = (x.size()[0] as usize, x.size()[1] as usize);
        let n = weight.size()[0] as usize;
        let xs = Vec::<f32>::try_from(x.f_to_kind(Kind::Float)?.f_contiguous()?.f_view(-1)?)?;
        let mut y = vec![0f32; n * m];
        match weight.kind() {
            Kind::Float => split(weights::<f32>(weight), k, &xs, m, &mut y),
            Kind::BFloat16 => split(weights::<bf16>(weight), k, &xs, m, &mut y),
            _ => split(weights::<f16>(weight), k, &xs, m, &mut y),
        }
        // y is [n, m]; the caller wants [m, n].
        let y = Tensor::from_slice(&y).f_view([n as i64, m as i64])?;
        let y = if m == 1 {
            y.f_view([1, n as i64])?
        } else {
            y.f_transpose(0, 1)?.f_contiguous()?
        };
        Ok(if x.kind() == Kind::Float {
            y
        } else {
            y.f_to_kind(x.kind())?
        })
    }

    /// The elements of a contiguous CPU `weight` whose kind matches `W` (checked by the caller).
    fn weights<W: x86::Element>(weight: &Tensor) -> &[W] {
        debug_assert!(
            weight.is_contiguous() && weight.kind().elt_size_in_bytes() == size_of::<W>()
        );
        // SAFETY: `weight` is a contiguous CPU tensor of `numel` elements of W's layout (f32,
        // bf16 and f16 are plain 4- and 2-byte values), alive for the borrow. Weights are never
        // written after loading, so nothing mutates them while this slice exists.
        unsafe { std::slice::from_raw_parts(weight.data_ptr() as *const W, weight.numel()) }
    }

    /// Runs the kernel over `w`'s rows, one contiguous block of rows per pool thread.
    fn split<W: x86::Element>(w: &[W], k: usize, x: &[f32], m: usize, y: &mut [f32]) {
        let x = &x86::arrange::<W>(x, k);
        // SAFETY (both calls): `available()` was checked by `applies`.
        let Some(pool) = pool() else {
            return unsafe { x86::rows(w, k, x, m, y) };
        };
        let n = w.len() / k;
        let rows = n.div_ceil(pool.current_num_threads()).next_multiple_of(4);
        pool.install(|| {
            y.par_chunks_mut(rows * m)
                .zip(w.par_chunks(rows * k))
                .for_each(|(y, w)| unsafe { x86::rows(w, k, x, m, y) })
        });
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use tch::Tensor;

    pub fn available() -> bool {
        false
    }

    pub fn linear(_: &Tensor, _: &Tensor) -> crate::Result<Tensor> {
        unreachable!("applies() is false without x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[i64], kind: Kind) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind)
    }

    /// Our product against libtorch's, for every dtype, row count and ragged shape.
    #[test]
    fn matches_libtorch() {
        if !imp::available() {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
            return;
        }
        tch::manual_seed(0);
        for threads in [1, 2, 3] {
            crate::cpu::set_threads(threads).unwrap();
            for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
                for (m, n, k) in [
                    (1, 1, 1),
                    (1, 37, 70),
                    (3, 64, 1024),
                    (8, 261, 19),
                    (2, 5, 8),
                ] {
                    let (x, w) = (random(&[m, k], kind), random(&[n, k], kind));
                    let ours = linear(&x, &w).unwrap().expect("the kernel applies");
                    assert_eq!(ours.size(), [m, n]);
                    assert_eq!(ours.kind(), kind);
                    let want = x
                        .to_kind(Kind::Float)
                        .linear::<Tensor>(&w.to_kind(Kind::Float), None);
                    let tolerance = if kind == Kind::Float { 1e-4 } else { 2e-2 };
                    let diff = (ours.to_kind(Kind::Float) - &want)
                        .abs()
                        .max()
                        .double_value(&[]);
                    let scale = want.abs().max().double_value(&[]).max(1.0);
                    assert!(
                        diff <= tolerance * scale,
                        "{kind:?} m={m} n={n} k={k} threads={threads}: off by {diff} (scale {scale})"
                    );
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// A row's result is bit-identical whatever it is batched with and however many threads run.
    #[test]
    fn batch_invariant() {
        if !imp::available() {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
            return;
        }
        tch::manual_seed(1);
        let (x, w) = (
            random(&[8, 300], Kind::Float),
            random(&[203, 300], Kind::Float),
        );
        crate::cpu::set_threads(1).unwrap();
        let alone = linear(&x.narrow(0, 5, 1), &w).unwrap().unwrap();
        crate::cpu::set_threads(2).unwrap();
        let batched = linear(&x, &w).unwrap().unwrap();
        crate::cpu::set_threads(1).unwrap();
        assert!(alone.equal(&batched.narrow(0, 5, 1)));
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu));
        let many = Tensor::zeros([MAX_ROWS + 1, 8], (Kind::Float, Device::Cpu));
        assert!(linear(&many, &w).unwrap().is_none());
        let wrong_width = Tensor::zeros([1, 7], (Kind::Float, Device::Cpu));
        assert!(linear(&wrong_width, &w).unwrap().is_none());
        let strided = Tensor::zeros([8, 4], (Kind::Float, Device::Cpu)).t_();
        assert!(
            linear(&Tensor::zeros([1, 8], (Kind::Float, Device::Cpu)), &strided)
                .unwrap()
                .is_none()
        );
        let ints = Tensor::zeros([4, 8], (Kind::Int, Device::Cpu));
        assert!(
            linear(&Tensor::zeros([1, 8], (Kind::Int, Device::Cpu)), &ints)
                .unwrap()
                .is_none()
        );
    }
}
