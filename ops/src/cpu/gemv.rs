//! `x W^T` for a few rows of `x` (a decode step's tokens), the weight's rows split across the
//! pool so every core streams its own part of the weight.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// The most rows of `x` this path takes with f32 weights: up to here it beats libtorch's GEMM,
/// beyond it (prefill) libtorch's tiling wins. With bf16 and f16 weights it takes any number:
/// libtorch converts them on the fly on CPUs without AVX-512 BF16/FP16 and is 3-5x slower at
/// every size measured (1 to 128 rows). Measured with
/// `cargo run --release -p caravan-ops --example gemv_bench -- 2 f32` (and `bf16`).
pub const MAX_F32_ROWS: i64 = 32;

/// Rows of `x` per pass over the weight: bounds the activations a pass re-reads (32 rows of
/// Llama-2-70B's 28672-wide MLP input are 3.7 MB) at the cost of one weight read per 32 rows.
const ROW_TILE: usize = 32;

/// `x W^T` (`x`: `[m, k]`, `weight`: `[n, k]`, no bias) when this path applies: CPU tensors of one
/// dtype, f32 (at most [`MAX_F32_ROWS`] rows of `x`), bf16 or f16, and a CPU with AVX2. `None`
/// otherwise, for libtorch. Products accumulate in f32.
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
        && xs[0] >= 1
        && (xs[0] <= MAX_F32_ROWS || weight.kind() != Kind::Float)
        && xs[1] == ws[1]
        && ws[0] > 0
        && ws[1] > 0
        && weight.is_contiguous()
        && is_float(weight.kind())
        && x.kind() == weight.kind()
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half)
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use half::{bf16, f16};
    use tch::{Device, Kind, Tensor};

    use crate::{
        cpu::gemv::ROW_TILE,
        cpu::{elements, elements_mut, pool, x86, Scalar},
        Result,
    };

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(x86::available)
    }

    /// Reads `x` and `weight` in place and writes the result straight into a fresh tensor: one
    /// libtorch call per product (the allocation), where `x.linear(w)` plus conversions took six.
    pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let x = x.f_contiguous()?;
        let (m, n) = (x.size()[0], weight.size()[0]);
        let mut y = Tensor::f_empty([m, n], (x.kind(), Device::Cpu))?;
        match weight.kind() {
            Kind::Float => product::<f32>(weight, &x, &mut y),
            Kind::BFloat16 => product::<bf16>(weight, &x, &mut y),
            _ => product::<f16>(weight, &x, &mut y),
        }
        Ok(y)
    }

    /// `y = x W^T`, all three in `W`, [`ROW_TILE`] rows of `x` at a time, so the activations
    /// the kernel re-reads for every block of weight rows stay in cache.
    fn product<W: x86::Element>(weight: &Tensor, x: &Tensor, y: &mut Tensor) {
        let (n, k) = (weight.size()[0] as usize, weight.size()[1] as usize);
        let w = elements::<W>(weight);
        let tiles = elements::<W>(x).chunks(ROW_TILE * k);
        for (x, y) in tiles.zip(elements_mut::<W>(y).chunks_mut(ROW_TILE * n)) {
            split(w, k, &x86::arrange::<W, W>(x, k), x.len() / k, y);
        }
    }

    /// `out` (`[m, n]`) from the kernel, which writes `[n, m]`: the same thing for one row of
    /// `x`, else through an f32 buffer (each value is rounded to `O` once either way).
    fn split<W: x86::Element, O: Scalar>(w: &[W], k: usize, x: &[f32], m: usize, out: &mut [O]) {
        if m == 1 {
            return run_rows(w, k, x, 1, out);
        }
        let n = w.len() / k;
        let mut transposed = vec![0f32; n * m];
        run_rows(w, k, x, m, &mut transposed);
        for (r, row) in transposed.chunks(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * n + r] = O::from_f32(v);
            }
        }
    }

    /// The kernel over `w`'s rows, one contiguous block of rows per thread: the calling thread
    /// takes the first block and the pool's threads the others, so a product wakes one thread
    /// fewer than it uses.
    fn run_rows<W: x86::Element, O: Scalar>(w: &[W], k: usize, x: &[f32], m: usize, y: &mut [O]) {
        // SAFETY (every call below): `available()` was checked by `applies`.
        let Some(pool) = pool() else {
            return unsafe { x86::rows(w, k, x, m, y) };
        };
        let n = w.len() / k;
        let rows = n
            .div_ceil(pool.current_num_threads() + 1)
            .next_multiple_of(4);
        let mut blocks = y.chunks_mut(rows * m).zip(w.chunks(rows * k));
        let first = blocks.next();
        pool.in_place_scope(|scope| {
            for (y, w) in blocks {
                scope.spawn(move |_| unsafe { x86::rows(w, k, x, m, y) });
            }
            if let Some((y, w)) = first {
                unsafe { x86::rows(w, k, x, m, y) }
            }
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

    use crate::cpu::tests::random;

    /// Whether this CPU runs the kernel; a test that needs it says it skipped when not.
    fn kernel_runs_here() -> bool {
        let runs = imp::available();
        if !runs {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
        }
        runs
    }

    /// Our product against libtorch's, for every dtype, row count and ragged shape.
    #[test]
    fn matches_libtorch() {
        if !kernel_runs_here() {
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
                    (32, 261, 19),
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
        if !kernel_runs_here() {
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

    /// 16-bit weights take any number of rows (prefill too); f32 stops at MAX_F32_ROWS.
    #[test]
    fn sixteen_bit_weights_take_prefill_sizes() {
        if !kernel_runs_here() {
            return;
        }
        tch::manual_seed(4);
        let (x, w) = (
            random(&[100, 48], Kind::BFloat16),
            random(&[40, 48], Kind::BFloat16),
        );
        let ours = linear(&x, &w)
            .unwrap()
            .expect("applies to bf16 at 100 rows");
        let want = x
            .to_kind(Kind::Float)
            .linear::<Tensor>(&w.to_kind(Kind::Float), None);
        let diff = (ours.to_kind(Kind::Float) - &want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 2e-2 * want.abs().max().double_value(&[]).max(1.0));
        let x32 = x.to_kind(Kind::Float);
        assert!(linear(&x32, &w.to_kind(Kind::Float)).unwrap().is_none());
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu));
        let many = Tensor::zeros([MAX_F32_ROWS + 1, 8], (Kind::Float, Device::Cpu));
        assert!(linear(&many, &w).unwrap().is_none());
        let wrong_width = Tensor::zeros([1, 7], (Kind::Float, Device::Cpu));
        assert!(linear(&wrong_width, &w).unwrap().is_none());
        let strided = Tensor::zeros([8, 4], (Kind::Float, Device::Cpu)).t_();
        assert!(
            linear(&Tensor::zeros([1, 8], (Kind::Float, Device::Cpu)), &strided)
                .unwrap()
                .is_none()
        );
        let one_row = Tensor::zeros([1, 8], (Kind::Float, Device::Cpu));
        let no_rows = Tensor::zeros([0, 8], (Kind::Float, Device::Cpu));
        assert!(linear(&one_row, &no_rows).unwrap().is_none());
        let mixed = Tensor::zeros([4, 8], (Kind::BFloat16, Device::Cpu));
        assert!(linear(&one_row, &mixed).unwrap().is_none());
        let ints = Tensor::zeros([4, 8], (Kind::Int, Device::Cpu));
        assert!(
            linear(&Tensor::zeros([1, 8], (Kind::Int, Device::Cpu)), &ints)
                .unwrap()
                .is_none()
        );
    }
}
