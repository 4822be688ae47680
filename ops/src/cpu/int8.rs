//! Weights in 8 bits (`--quantization int8`): symmetric integers with one f32 scale per block of
//! 32 inputs, as llama.cpp's Q8_0 (whose scale is an f16). A product quantizes its activations
//! the same way, row by row, so each block's dot product is exact in integers (AVX-VNNI `dpbusd`
//! where the CPU has it, else AVX2 `maddubs`/`madd`: the same integers either way,
//! [`super::x86_int8`]) and only its scaling and the sum over blocks are in f32.
//! A weight takes 1.125 bytes per value against bf16's 2, and single-stream decode, which streams
//! every weight once per token, is bound by those bytes.
//!
//! Weights are quantized at load, each rank its own slice, and stored in panels of [`ROWS`]
//! output rows, block-major (`[n / ROWS][k / BLOCK][ROWS][BLOCK]`), so a thread reads its panels
//! as one stream. Every output is one chain over its blocks in order, whatever the batch: a row's
//! result does not depend on what it is batched with (tests below).

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Inputs per block (one scale each).
pub const BLOCK: usize = 32;
/// Output rows per panel.
pub const ROWS: usize = 4;

/// How a block's integer dot product is computed; every way gives the same integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dot {
    /// `maddubs` and `madd` (AVX2).
    Avx2,
    /// `dpbusd` (AVX-VNNI), one instruction for what takes the others three.
    AvxVnni,
}

/// A `[n, k]` weight quantized to 8 bits; the dense tensor it came from is not kept.
pub struct Int8Weight {
    /// `[panels][blocks][ROWS][BLOCK]` in offset binary (the integer plus 128, which `dpbusd`
    /// takes as unsigned), rows past `n` and inputs past `k` zero (128).
    quants: Vec<u8>,
    /// `[panels][blocks][ROWS]`.
    scales: Vec<f32>,
    n: usize,
    k: usize,
    /// The activations' dtype, which products take and return.
    kind: Kind,
}

impl Int8Weight {
    /// Quantizes `weight` (`[n, k]`, any float dtype) for products with activations of `kind`
    /// (f32, bf16 or f16). Runs on Caravan's CPU kernels only: an error says so elsewhere.
    pub fn quantize(weight: &Tensor, kind: Kind) -> Result<Int8Weight> {
        if weight.device() != Device::Cpu {
            return Err(Error::Unsupported(format!(
                "int8 weights run on Caravan's CPU kernels only, and this rank computes on {:?}",
                weight.device()
            )));
        }
        if !super::kernels_run_here() {
            return Err(Error::Unsupported(format!(
                "int8 weights run on Caravan's CPU kernels only, and this rank's products run on {}",
                super::cpu_kernel_path()
            )));
        }
        let size = weight.size();
        if size.len() != 2 || size.iter().any(|&d| d <= 0) {
            return Err(Error::InvalidBatch(format!(
                "cannot quantize a weight of shape {size:?}"
            )));
        }
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return Err(Error::Unsupported(format!(
                "int8 products with {kind:?} activations"
            )));
        }
        let (n, k) = (size[0] as usize, size[1] as usize);
        let dense = weight.f_to_kind(Kind::Float)?.f_contiguous()?;
        let (row_quants, row_scales) = quantize_rows(super::elements::<f32>(&dense), n, k);
        let blocks = k.div_ceil(BLOCK);
        let panels = n.div_ceil(ROWS);
        let mut quants = vec![0x80u8; panels * blocks * ROWS * BLOCK];
        let mut scales = vec![0f32; panels * blocks * ROWS];
        for row in 0..n {
            let (p, j) = (row / ROWS, row % ROWS);
            for b in 0..blocks {
                let at = (p * blocks + b) * ROWS + j;
                scales[at] = row_scales[row * blocks + b];
                let from = (row * blocks + b) * BLOCK;
                for (q, &v) in quants[at * BLOCK..(at + 1) * BLOCK]
                    .iter_mut()
                    .zip(&row_quants[from..from + BLOCK])
                {
                    *q = (v as u8) ^ 0x80;
                }
            }
        }
        Ok(Int8Weight {
            quants,
            scales,
            n,
            k,
            kind,
        })
    }

    /// `[n, k]`, the dense weight's shape.
    pub fn size(&self) -> [i64; 2] {
        [self.n as i64, self.k as i64]
    }

    /// Bytes held (quantized values and scales).
    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * self.scales.len()
    }

    /// The activations' dtype, which [`Int8Weight::linear`] takes and returns.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `x W^T` for `x` of shape `[m, k]` (any `m`, on the CPU, of [`Int8Weight::kind`]), with `x`
    /// quantized per row and block, accumulated in f32 and rounded once to the activations' dtype.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_with(x, imp::best_dot())
    }

    /// [`Int8Weight::linear`] with the block dots computed as `dot` says (which this CPU must
    /// run).
    pub(crate) fn linear_with(&self, x: &Tensor, dot: Dot) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 2 || size[1] != self.k as i64 || x.kind() != self.kind {
            return Err(Error::InvalidBatch(format!(
                "x {:?} {:?} against an int8 {:?} weight for {:?}",
                size,
                x.kind(),
                self.size(),
                self.kind
            )));
        }
        let m = size[0] as usize;
        let x = x
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let (quants, scales) = quantize_rows(super::elements::<f32>(&x), m, self.k);
        let corrections = match dot {
            Dot::Avx2 => Vec::new(),
            Dot::AvxVnni => corrections(&quants),
        };
        let x = Activations {
            quants,
            scales,
            corrections,
            dot,
        };
        let mut y = Tensor::f_empty([m as i64, self.n as i64], (self.kind, Device::Cpu))?;
        match self.kind {
            Kind::Float => imp::product::<f32>(self, &x, m, &mut y),
            Kind::BFloat16 => imp::product::<half::bf16>(self, &x, m, &mut y),
            _ => imp::product::<half::f16>(self, &x, m, &mut y),
        }
        Ok(y)
    }
}

/// A product's activations, quantized.
pub(crate) struct Activations {
    /// `[m][blocks][BLOCK]`.
    pub quants: Vec<i8>,
    /// `[m][blocks]`.
    pub scales: Vec<f32>,
    /// With [`Dot::AvxVnni`], `[m][blocks][8]`: −128 × the sum of each lane's four integers, which
    /// takes the weights' offset of 128 back out of `dpbusd`'s sums. Empty otherwise.
    pub corrections: Vec<i32>,
    pub dot: Dot,
}

/// −128 × the sum of every four consecutive integers of `quants`.
fn corrections(quants: &[i8]) -> Vec<i32> {
    quants
        .chunks_exact(4)
        .map(|four| -128 * four.iter().map(|&q| q as i32).sum::<i32>())
        .collect()
}

/// Rows of `values` (`[rows, k]`) in blocks of [`BLOCK`] (the last padded with zeros): each block's
/// largest magnitude maps to ±127. Returns the integers (`[rows][blocks][BLOCK]`) and each block's
/// scale (`[rows][blocks]`), value ≈ integer × scale.
pub fn quantize_rows(values: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let blocks = k.div_ceil(BLOCK);
    let mut quants = vec![0i8; rows * blocks * BLOCK];
    let mut scales = vec![0f32; rows * blocks];
    for r in 0..rows {
        let row = &values[r * k..(r + 1) * k];
        for (b, block) in row.chunks(BLOCK).enumerate() {
            let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let at = r * blocks + b;
            scales[at] = scale;
            for (q, &v) in quants[at * BLOCK..].iter_mut().zip(block) {
                *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
            }
        }
    }
    (quants, scales)
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use tch::Tensor;

    use super::{Activations, Dot, Int8Weight, BLOCK, ROWS};
    use crate::cpu::{elements_mut, team, x86::Out, x86_int8, Scalar};

    /// The fastest way this CPU computes a block's dot product (detected once).
    pub fn best_dot() -> Dot {
        static BEST: std::sync::OnceLock<Dot> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            if is_x86_feature_detected!("avxvnni") {
                Dot::AvxVnni
            } else {
                Dot::Avx2
            }
        })
    }

    /// The panels in runs, about four per thread, claimed by whichever thread of the team is
    /// free; a run's thread writes its columns of every row of `y`.
    pub fn product<O: Scalar>(w: &Int8Weight, x: &Activations, m: usize, y: &mut Tensor) {
        if m == 0 {
            return;
        }
        let y = elements_mut::<O>(y);
        let out = Out {
            ptr: y.as_mut_ptr(),
            stride: w.n,
        };
        let out = &out;
        let blocks = w.k.div_ceil(BLOCK);
        let panels = w.n.div_ceil(ROWS);
        let run = |range: std::ops::Range<usize>| {
            let (first, last) = (range.start, range.end);
            let columns = (w.n - first * ROWS).min((last - first) * ROWS);
            let out = Out {
                // SAFETY: column first * ROWS < n of row 0 of `y`.
                ptr: unsafe { out.ptr.add(first * ROWS) },
                stride: out.stride,
            };
            let quants = &w.quants[first * blocks * ROWS * BLOCK..last * blocks * ROWS * BLOCK];
            let scales = &w.scales[first * blocks * ROWS..last * blocks * ROWS];
            // SAFETY: `kernels_run_here()` was checked when quantizing; only this run writes
            // columns first * ROWS .. first * ROWS + columns of rows 0..m, inside `y`
            // (`[m, n]`), and runs do not overlap.
            unsafe { x86_int8::panels(quants, scales, blocks, x, m, &out, columns) }
        };
        match team() {
            Some(team) => team.share(panels, panels.div_ceil(4 * team.threads()), &run),
            None => run(0..panels),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use tch::Tensor;

    use super::{Activations, Dot, Int8Weight};

    pub fn best_dot() -> Dot {
        Dot::Avx2
    }

    pub fn product<O>(_: &Int8Weight, _: &Activations, _: usize, _: &mut Tensor) {
        unreachable!("there are no int8 weights without x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::{kernels_run_here, random};

    /// Every way of computing block dots this CPU runs.
    fn dots() -> Vec<Dot> {
        let mut dots = vec![Dot::Avx2];
        if imp::best_dot() == Dot::AvxVnni {
            dots.push(Dot::AvxVnni);
        } else {
            eprintln!("AVX-VNNI not tested: this CPU has none");
        }
        dots
    }

    /// What the loop computes, one lane at a time: lane `l` of a block sums the integer
    /// products of inputs `4l..4l + 4` exactly, is multiplied by the weight block's scale, then
    /// by the input block's and added to the lane's running sum with one rounding (a fused
    /// multiply-add); the eight lanes are then added as the loop adds them.
    fn reference(w: &Tensor, x: &Tensor) -> Vec<f32> {
        let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
        let m = x.size()[0] as usize;
        let blocks = k.div_ceil(BLOCK);
        let wf: Vec<f32> = Vec::try_from(w.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let xf: Vec<f32> = Vec::try_from(x.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let (wq, ws) = quantize_rows(&wf, n, k);
        let (xq, xs) = quantize_rows(&xf, m, k);
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for c in 0..n {
                let mut lanes = [0f32; 8];
                for b in 0..blocks {
                    let (sw, sx) = (ws[c * blocks + b], xs[i * blocks + b]);
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let dot: i32 = (4 * l..4 * l + 4)
                            .map(|t| {
                                wq[(c * blocks + b) * BLOCK + t] as i32
                                    * xq[(i * blocks + b) * BLOCK + t] as i32
                            })
                            .sum();
                        *lane = ((dot as f32) * sw).mul_add(sx, *lane);
                    }
                }
                let t: Vec<f32> = (0..4).map(|j| lanes[j] + lanes[j + 4]).collect();
                y[i * n + c] = (t[0] + t[2]) + (t[1] + t[3]);
            }
        }
        y
    }

    /// The kernel equals its lane-by-lane reference bit for bit, for every activation dtype, row
    /// count and ragged shape (partial panels and blocks), on 1-3 threads; and both stay within
    /// quantization's error of the f32 product.
    #[test]
    fn equals_its_reference_and_approximates_the_dense_product() {
        if !kernels_run_here() {
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
        tch::manual_seed(0);
        for threads in [1, 2, 3] {
            crate::cpu::set_threads(threads).unwrap();
            for (m, n, k) in [
                (1, 1, 1),
                (1, 37, 70),
                (3, 64, 1024),
                (32, 261, 19),
                (2, 5, 64),
                (7, 48, 33),
                (100, 40, 96),
                (1, 20, 256),
            ] {
                let w = random(&[n, k], Kind::Float);
                let x32 = random(&[m, k], Kind::Float);
                let want = x32.linear::<Tensor>(&w, None);
                for (kind, dot) in [Kind::Float, Kind::BFloat16, Kind::Half]
                    .into_iter()
                    .flat_map(|kind| dots().into_iter().map(move |dot| (kind, dot)))
                {
                    let x = x32.to_kind(kind);
                    let q = Int8Weight::quantize(&w, kind).unwrap();
                    assert_eq!(q.size(), [n, k]);
                    let ours = q.linear_with(&x, dot).unwrap();
                    assert_eq!(ours.size(), [m, n]);
                    assert_eq!(ours.kind(), kind);
                    let exact = Tensor::from_slice(&reference(&w, &x))
                        .view([m, n])
                        .to_kind(kind);
                    assert!(
                        ours.equal(&exact),
                        "{kind:?} {dot:?} m={m} n={n} k={k} threads={threads}: differs from the \
                         reference"
                    );
                    // Each product's error: two roundings of at most half a step in 127 each.
                    let diff = (ours.to_kind(Kind::Float) - &want)
                        .abs()
                        .max()
                        .double_value(&[]);
                    let bound = 0.02 * (k as f64).sqrt() * 3.0 + 0.02;
                    assert!(
                        diff <= bound,
                        "{kind:?} m={m} n={n} k={k}: off by {diff} (bound {bound})"
                    );
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// The format written independently in libtorch: blocks of 32 scaled to ±127, rounded half
    /// to even, multiplied back, and the dequantized product in f64.
    fn dequantized(t: &Tensor) -> Tensor {
        let (n, k) = (t.size()[0], t.size()[1]);
        let blocks = t.to_kind(Kind::Double).view([n, k / 32, 32]);
        let scale = blocks.abs().amax([-1i64].as_slice(), true) / 127.0;
        let safe = scale.where_self(&scale.gt(0.0), &scale.ones_like());
        ((&blocks / &safe).round() * &scale).view([n, k])
    }

    #[test]
    fn equals_the_product_of_the_dequantized_values() {
        if !kernels_run_here() {
            return;
        }
        tch::manual_seed(3);
        let (m, n, k) = (5, 24, 256);
        let (x, w) = (random(&[m, k], Kind::Float), random(&[n, k], Kind::Float));
        let want = dequantized(&x).matmul(&dequantized(&w).tr());
        let ours = Int8Weight::quantize(&w, Kind::Float)
            .unwrap()
            .linear(&x)
            .unwrap()
            .to_kind(Kind::Double);
        let diff = (&ours - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "off by {diff}");
    }

    /// A row's result is bit-identical whatever it is batched with and however many threads run.
    #[test]
    fn batch_invariant() {
        if !kernels_run_here() {
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
        tch::manual_seed(1);
        let (x, w) = (
            random(&[64, 300], Kind::BFloat16),
            random(&[203, 300], Kind::Float),
        );
        let q = Int8Weight::quantize(&w, Kind::BFloat16).unwrap();
        crate::cpu::set_threads(1).unwrap();
        let alone: Vec<Tensor> = [5, 50, 63]
            .iter()
            .map(|&i| q.linear(&x.narrow(0, i, 1)).unwrap())
            .collect();
        crate::cpu::set_threads(2).unwrap();
        for m in [8, 32, 53, 64] {
            let batched = q.linear(&x.narrow(0, 0, m)).unwrap();
            for (&i, alone) in [5, 50, 63].iter().zip(&alone) {
                if i < m {
                    assert!(alone.equal(&batched.narrow(0, i, 1)), "row {i} of {m}");
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    #[test]
    fn a_block_maps_its_largest_magnitude_to_127() {
        let (q, s) = quantize_rows(&[0.5, -2.0, 1.0, 0.0, 0.0, 0.0], 2, 3);
        assert_eq!(&q[..3], &[32, -127, 64]);
        assert!((s[0] - 2.0 / 127.0).abs() < 1e-9);
        // An all-zero block has scale 0 and zero integers.
        assert_eq!(s[1], 0.0);
        assert!(q[BLOCK..BLOCK + 3].iter().all(|&v| v == 0));
    }

    #[test]
    fn refuses_mismatched_inputs() {
        if !kernels_run_here() {
            return;
        }
        let q = Int8Weight::quantize(&random(&[4, 8], Kind::Float), Kind::Float).unwrap();
        assert!(q.linear(&random(&[1, 7], Kind::Float)).is_err());
        assert!(q.linear(&random(&[1, 8], Kind::BFloat16)).is_err());
        assert!(Int8Weight::quantize(&random(&[8], Kind::Float), Kind::Float).is_err());
        assert!(Int8Weight::quantize(&random(&[2, 8], Kind::Float), Kind::Int).is_err());
    }
}
