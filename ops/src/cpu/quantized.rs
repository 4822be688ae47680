//! Quantized weights (`--quantization int8|q4`): symmetric integers in blocks of 32 inputs with
//! one f16 scale per block, in 8 bits as llama.cpp's Q8_0 or in 4 bits as its Q4_0. A product
//! quantizes its activations to 8 bits the same way (with f32 scales), row by row, so each
//! block's dot product is exact in integers (AVX-VNNI `dpbusd` where the CPU has it, else AVX2
//! `maddubs`/`madd`: the same integers either way, [`super::x86_quantized`]) and only its scaling
//! and the sum over blocks are in f32, as llama.cpp's Q8_0 × Q8_0 and Q4_0 × Q8_0 products.
//! A weight takes 1.0625 bytes (int8) or 0.5625 bytes (q4) against bf16's 2, and single-stream
//! decode, which streams every weight once per token, is bound by those bytes.
//!
//! Weights are quantized at load, each rank its own slice, and stored in panels of [`ROWS`]
//! output rows, block-major (`[n / ROWS][k / BLOCK][ROWS × block bytes]`), so a thread reads its
//! panels as one stream. A q4 panel block holds its four rows' 32 values in two 32-byte halves,
//! rows 0 and 1 then rows 2 and 3: byte `t` of a half has the first row's value `t` in its low
//! nibble and the second row's in its high one, so one load and two masks give two rows. Every
//! output is one chain over its blocks in order, whatever the batch: a row's result does not
//! depend on what it is batched with (tests below).

use half::f16;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Inputs per block (one scale each).
pub const BLOCK: usize = 32;
/// Output rows per panel.
pub const ROWS: usize = 4;

/// How a weight's integers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 8 bits, −127..=127, a block's largest magnitude at ±127 (Q8_0).
    Int8,
    /// 4 bits, −8..=7, a block's largest magnitude at −8 (Q4_0).
    Q4,
}

impl Format {
    /// Bytes of one block's integers.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Format::Int8 => BLOCK,
            Format::Q4 => BLOCK / 2,
        }
    }

    /// What is added to an integer to store it unsigned (offset binary), which `dpbusd` and
    /// `maddubs` take as their unsigned operand.
    pub(crate) fn offset(self) -> i32 {
        match self {
            Format::Int8 => 128,
            Format::Q4 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Int8 => "int8",
            Format::Q4 => "q4",
        }
    }

    /// Rows of weights `values` (`[rows, k]`) in this format's blocks: the integers
    /// (`[rows][blocks][BLOCK]`, signed) and each block's scale (`[rows][blocks]`) as it is stored,
    /// in f16 (the integers are found with the f32 scale, as llama.cpp's reference does).
    pub fn quantize_rows(self, values: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f16>) {
        let (quants, scales) = match self {
            Format::Int8 => quantize_rows(values, rows, k),
            Format::Q4 => quantize_rows_q4(values, rows, k),
        };
        (quants, scales.into_iter().map(f16::from_f32).collect())
    }
}

/// How a block's integer dot product is computed; every way gives the same integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dot {
    /// `maddubs` and `madd` (AVX2).
    Avx2,
    /// `dpbusd` (AVX-VNNI), one instruction for what takes the others three.
    AvxVnni,
    /// `dpbusd` on 512-bit registers (AVX-512 VNNI): two weight rows' lanes an instruction.
    Avx512Vnni,
}

impl Dot {
    /// The way in words, for logs and `caravanctl status`.
    pub fn name(self) -> &'static str {
        match self {
            Dot::Avx2 => "AVX2",
            Dot::AvxVnni => "AVX-VNNI",
            Dot::Avx512Vnni => "AVX-512 VNNI",
        }
    }
}

pub(crate) use imp::best_dot;

/// A `[n, k]` weight quantized to 8 or 4 bits; the dense tensor it came from is not kept.
pub struct QuantizedWeight {
    /// `[panels][blocks][ROWS][block bytes]` in offset binary (the integer plus
    /// [`Format::offset`]), rows past `n` and inputs past `k` zero.
    quants: Vec<u8>,
    /// `[panels][blocks][ROWS]`.
    scales: Vec<f16>,
    n: usize,
    k: usize,
    format: Format,
    /// The activations' dtype, which products take and return.
    kind: Kind,
}

impl QuantizedWeight {
    /// Quantizes `weight` (`[n, k]`, any float dtype) to `format` for products with activations
    /// of `kind` (f32, bf16 or f16). Runs on Caravan's CPU kernels only: an error says so
    /// elsewhere.
    pub fn quantize(weight: &Tensor, format: Format, kind: Kind) -> Result<QuantizedWeight> {
        let name = format.name();
        if weight.device() != Device::Cpu {
            return Err(Error::Unsupported(format!(
                "{name} weights run on Caravan's CPU kernels only, and this rank computes on {:?}",
                weight.device()
            )));
        }
        if !super::kernels_run_here() {
            return Err(Error::Unsupported(format!(
                "{name} weights run on Caravan's CPU kernels only, and this rank's products run \
                 on {}",
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
                "{name} products with {kind:?} activations"
            )));
        }
        let (n, k) = (size[0] as usize, size[1] as usize);
        let dense = weight.f_to_kind(Kind::Float)?.f_contiguous()?;
        let (row_quants, row_scales) = format.quantize_rows(super::elements::<f32>(&dense), n, k);
        let blocks = k.div_ceil(BLOCK);
        let panels = n.div_ceil(ROWS);
        let block_bytes = format.block_bytes();
        let offset = format.offset();
        let zero = match format {
            Format::Int8 => offset as u8,
            Format::Q4 => (offset | offset << 4) as u8,
        };
        let mut quants = vec![zero; panels * blocks * ROWS * block_bytes];
        let mut scales = vec![f16::ZERO; panels * blocks * ROWS];
        for row in 0..n {
            let (p, j) = (row / ROWS, row % ROWS);
            for b in 0..blocks {
                let at = (p * blocks + b) * ROWS + j;
                scales[at] = row_scales[row * blocks + b];
                let from = (row * blocks + b) * BLOCK;
                let values = &row_quants[from..from + BLOCK];
                let unsigned = |v: i8| (v as i32 + offset) as u8;
                match format {
                    Format::Int8 => {
                        let stored = &mut quants[at * BLOCK..(at + 1) * BLOCK];
                        for (q, &v) in stored.iter_mut().zip(values) {
                            *q = unsigned(v);
                        }
                    }
                    Format::Q4 => {
                        // Rows 2h and 2h + 1 share half h of the panel block, low and high.
                        let half = ((p * blocks + b) * 2 + j / 2) * BLOCK;
                        let shift = 4 * (j % 2);
                        let mask = 0x0Fu8 << shift;
                        for (q, &v) in quants[half..half + BLOCK].iter_mut().zip(values) {
                            *q = (*q & !mask) | unsigned(v) << shift;
                        }
                    }
                }
            }
        }
        Ok(QuantizedWeight {
            quants,
            scales,
            n,
            k,
            format,
            kind,
        })
    }

    /// `[n, k]`, the dense weight's shape.
    pub fn size(&self) -> [i64; 2] {
        [self.n as i64, self.k as i64]
    }

    /// Bytes held (quantized values and scales).
    pub fn bytes(&self) -> usize {
        self.quants.len() + 2 * self.scales.len()
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The activations' dtype, which [`QuantizedWeight::linear`] takes and returns.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `x W^T` for `x` of shape `[m, k]` (any `m`, on the CPU, of [`QuantizedWeight::kind`]), with
    /// `x` quantized to 8 bits per row and block, accumulated in f32 and rounded once to the
    /// activations' dtype.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_with(x, imp::best_dot())
    }

    /// The loop [`QuantizedWeight::linear`] runs on, in words: its format and block dot.
    pub fn kernel(&self) -> String {
        format!("{} {}", self.format.name(), imp::best_dot().name())
    }

    /// [`QuantizedWeight::linear`] with the block dots computed as `dot` says (which this CPU
    /// must run).
    pub(crate) fn linear_with(&self, x: &Tensor, dot: Dot) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 2 || size[1] != self.k as i64 || x.kind() != self.kind {
            return Err(Error::InvalidBatch(format!(
                "x {:?} {:?} against a {} {:?} weight for {:?}",
                size,
                x.kind(),
                self.format.name(),
                self.size(),
                self.kind
            )));
        }
        let m = size[0] as usize;
        let x = x
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        // The weights' offset comes back out of the unsigned products through the lanes' start,
        // except for int8 on AVX2, which multiplies signed integers directly.
        let offset = match (self.format, dot) {
            (Format::Int8, Dot::Avx2) => None,
            (format, _) => Some(format.offset()),
        };
        let x = imp::quantize_activations(super::elements::<f32>(&x), m, self.k, offset, dot);
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
    /// `[m][blocks][8]`: −offset × the sum of each lane's four integers, which takes the weights'
    /// offset back out of the lanes' sums of unsigned products. Empty for int8 on AVX2.
    pub corrections: Vec<i32>,
    pub dot: Dot,
}

/// −`offset` × the sum of every four consecutive integers of `quants`.
fn corrections(quants: &[i8], offset: i32) -> Vec<i32> {
    quants
        .chunks_exact(4)
        .map(|four| -offset * four.iter().map(|&q| q as i32).sum::<i32>())
        .collect()
}

/// Rows of `values` (`[rows, k]`) in blocks of [`BLOCK`] (the last padded with zeros): each block's
/// largest magnitude maps to ±127. Returns the integers (`[rows][blocks][BLOCK]`) and each block's
/// scale (`[rows][blocks]`), value ≈ integer × scale.
pub fn quantize_rows(values: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    quantize_blocks(
        values,
        rows,
        k,
        |block| block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
        |x| x.round_ties_even().clamp(-127.0, 127.0) as i8,
    )
}

/// Rows of `values` (`[rows, k]`) in 4-bit blocks as llama.cpp's Q4_0: the block's value of
/// largest magnitude (the first, on a tie) maps to −8, so its scale is that value / −8, and every
/// value to `floor(value / scale + 8.5)` clamped to 0..=15, less 8. Returns the integers
/// (`[rows][blocks][BLOCK]`, −8..=7) and each block's scale (`[rows][blocks]`).
pub fn quantize_rows_q4(values: &[f32], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    quantize_blocks(
        values,
        rows,
        k,
        |block| {
            let extreme = block
                .iter()
                .fold(0f32, |e, &v| if v.abs() > e.abs() { v } else { e });
            extreme / -8.0
        },
        |x| ((x + 8.5).floor().clamp(0.0, 15.0) - 8.0) as i8,
    )
}

/// Rows of `values` (`[rows, k]`) in blocks of [`BLOCK`] (the last padded with zeros), each
/// block's scale chosen by `scale` and each value, divided by it (times its inverse; 0 for a zero
/// scale), made an integer by `integer`. Returns the integers (`[rows][blocks][BLOCK]`) and the
/// scales (`[rows][blocks]`).
fn quantize_blocks(
    values: &[f32],
    rows: usize,
    k: usize,
    scale: impl Fn(&[f32]) -> f32,
    integer: impl Fn(f32) -> i8,
) -> (Vec<i8>, Vec<f32>) {
    let blocks = k.div_ceil(BLOCK);
    let mut quants = vec![0i8; rows * blocks * BLOCK];
    let mut scales = vec![0f32; rows * blocks];
    for r in 0..rows {
        let row = &values[r * k..(r + 1) * k];
        for (b, block) in row.chunks(BLOCK).enumerate() {
            let at = r * blocks + b;
            scales[at] = scale(block);
            let inverse = if scales[at] != 0.0 {
                1.0 / scales[at]
            } else {
                0.0
            };
            for (q, &v) in quants[at * BLOCK..].iter_mut().zip(block) {
                *q = integer(v * inverse);
            }
        }
    }
    (quants, scales)
}

/// `values` (`[m, k]`) quantized per row by [`quantize_rows`], with the corrections `offset`
/// asks for: what the vectorised path must equal, and the path where it cannot run.
fn quantize_activations_scalar(
    values: &[f32],
    m: usize,
    k: usize,
    offset: Option<i32>,
    dot: Dot,
) -> Activations {
    let (quants, scales) = quantize_rows(values, m, k);
    let corrections = offset.map_or(Vec::new(), |o| corrections(&quants, o));
    Activations {
        quants,
        scales,
        corrections,
        dot,
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use tch::Tensor;

    use super::{Activations, Dot, QuantizedWeight, BLOCK, ROWS};
    use crate::cpu::{elements_mut, team, x86::Out, x86_quantized, Scalar};

    /// `values` (`[m, k]`) quantized per row as [`super::quantize_rows`] does (vectorised when
    /// `k` is a whole number of blocks), with the corrections `offset` asks for.
    pub fn quantize_activations(
        values: &[f32],
        m: usize,
        k: usize,
        offset: Option<i32>,
        dot: Dot,
    ) -> Activations {
        if !k.is_multiple_of(BLOCK) || !crate::cpu::kernels_run_here() {
            return super::quantize_activations_scalar(values, m, k, offset, dot);
        }
        let blocks = m * k / BLOCK;
        let mut quants = vec![0i8; m * k];
        let mut scales = vec![0f32; blocks];
        let mut corrections = vec![0i32; if offset.is_some() { blocks * 8 } else { 0 }];
        // SAFETY: the kernels run here, so the CPU has AVX2 and FMA; the lengths are as asked.
        unsafe {
            x86_quantized::quantize_rows(values, &mut quants, &mut scales, &mut corrections, offset)
        };
        Activations {
            quants,
            scales,
            corrections,
            dot,
        }
    }

    /// The fastest way this CPU computes a block's dot product that `--cpu-kernels` allows
    /// (512-bit registers only with `on`).
    pub fn best_dot() -> Dot {
        if runs(Dot::Avx512Vnni) && crate::cpu::kernels::wider_than_avx2() {
            Dot::Avx512Vnni
        } else if runs(Dot::AvxVnni) {
            Dot::AvxVnni
        } else {
            Dot::Avx2
        }
    }

    /// Whether this CPU has what `dot` needs (detected once).
    pub fn runs(dot: Dot) -> bool {
        static AVX512_VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        static AVX_VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        match dot {
            Dot::Avx2 => true,
            Dot::AvxVnni => *AVX_VNNI.get_or_init(|| is_x86_feature_detected!("avxvnni")),
            Dot::Avx512Vnni => *AVX512_VNNI.get_or_init(|| {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }),
        }
    }

    /// The panels in runs, about four per thread, claimed by whichever thread of the team is
    /// free; a run's thread writes its columns of every row of `y`.
    pub fn product<O: Scalar>(w: &QuantizedWeight, x: &Activations, m: usize, y: &mut Tensor) {
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
            let panel_bytes = blocks * ROWS * w.format.block_bytes();
            let quants = &w.quants[first * panel_bytes..last * panel_bytes];
            let scales = &w.scales[first * blocks * ROWS..last * blocks * ROWS];
            // SAFETY: `kernels_run_here()` was checked when quantizing; only this run writes
            // columns first * ROWS .. first * ROWS + columns of rows 0..m, inside `y`
            // (`[m, n]`), and runs do not overlap.
            unsafe { x86_quantized::panels(w.format, quants, scales, blocks, x, m, &out, columns) }
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

    use super::{Activations, Dot, QuantizedWeight};

    pub use super::quantize_activations_scalar as quantize_activations;

    pub fn best_dot() -> Dot {
        Dot::Avx2
    }

    #[cfg(test)]
    pub fn runs(dot: Dot) -> bool {
        dot == Dot::Avx2
    }

    pub fn product<O>(_: &QuantizedWeight, _: &Activations, _: usize, _: &mut Tensor) {
        unreachable!("there are no quantized weights without x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::{kernels_run_here, random};

    const FORMATS: [Format; 2] = [Format::Int8, Format::Q4];

    /// Every way of computing block dots this CPU runs; says which it skipped.
    fn dots() -> Vec<Dot> {
        let mut dots = vec![Dot::Avx2];
        for dot in [Dot::AvxVnni, Dot::Avx512Vnni] {
            if imp::runs(dot) {
                dots.push(dot);
            } else {
                eprintln!("{dot:?} not tested: this CPU does not have it");
            }
        }
        dots
    }

    /// What the loop computes, one lane at a time: lane `l` of a block sums the integer
    /// products of inputs `4l..4l + 4` exactly, is multiplied by the weight block's scale, then
    /// by the input block's and added to the lane's running sum with one rounding (a fused
    /// multiply-add); the eight lanes are then added as the loop adds them.
    fn reference(w: &Tensor, x: &Tensor, format: Format) -> Vec<f32> {
        let (n, k) = (w.size()[0] as usize, w.size()[1] as usize);
        let m = x.size()[0] as usize;
        let blocks = k.div_ceil(BLOCK);
        let wf: Vec<f32> = Vec::try_from(w.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let xf: Vec<f32> = Vec::try_from(x.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let (wq, ws) = format.quantize_rows(&wf, n, k);
        let (xq, xs) = quantize_rows(&xf, m, k);
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for c in 0..n {
                let mut lanes = [0f32; 8];
                for b in 0..blocks {
                    let (sw, sx) = (ws[c * blocks + b].to_f32(), xs[i * blocks + b]);
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

    /// The kernel equals its lane-by-lane reference bit for bit, for both formats, every
    /// activation dtype, row count and ragged shape (partial panels and blocks), on 1-3 threads;
    /// and both stay within quantization's error of the f32 product.
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
                for format in FORMATS {
                    for (kind, dot) in [Kind::Float, Kind::BFloat16, Kind::Half]
                        .into_iter()
                        .flat_map(|kind| dots().into_iter().map(move |dot| (kind, dot)))
                    {
                        let x = x32.to_kind(kind);
                        let q = QuantizedWeight::quantize(&w, format, kind).unwrap();
                        assert_eq!(q.size(), [n, k]);
                        let ours = q.linear_with(&x, dot).unwrap();
                        assert_eq!(ours.size(), [m, n]);
                        assert_eq!(ours.kind(), kind);
                        let exact = Tensor::from_slice(&reference(&w, &x, format))
                            .view([m, n])
                            .to_kind(kind);
                        assert!(
                            ours.equal(&exact),
                            "{format:?} {kind:?} {dot:?} m={m} n={n} k={k} threads={threads}: \
                             differs from the reference"
                        );
                        // Each product's error: half a step of the weight's 127 or 8 levels
                        // (of a block's largest magnitude, about 2.5 here) and half of the
                        // activation's 127, over k products.
                        let half_steps = match format {
                            Format::Int8 => 0.02,
                            Format::Q4 => 2.5 / 16.0 + 0.01,
                        };
                        let diff = (ours.to_kind(Kind::Float) - &want)
                            .abs()
                            .max()
                            .double_value(&[]);
                        let bound = half_steps * (k as f64).sqrt() * 3.0 + half_steps;
                        assert!(
                            diff <= bound,
                            "{format:?} {kind:?} m={m} n={n} k={k}: off by {diff} (bound {bound})"
                        );
                    }
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// Each format written independently in libtorch and multiplied back: int8 blocks scaled to
    /// ±127 and rounded half to even; q4 blocks scaled so the value of largest magnitude is −8,
    /// then floor(v / scale + 8.5) clamped to 0..=15, less 8 (llama.cpp's Q4_0 reference). The
    /// integers come from the f32 scale; weights multiply back by it in f16, as stored
    /// (`f16_scales`), activations in f32.
    fn dequantized(t: &Tensor, format: Format, f16_scales: bool) -> Tensor {
        let (n, k) = (t.size()[0], t.size()[1]);
        let blocks = t.to_kind(Kind::Float).view([n, k / 32, 32]);
        let (q, scale) = match format {
            Format::Int8 => {
                let scale = blocks.abs().amax([-1i64].as_slice(), true) / 127.0;
                let safe = scale.where_self(&scale.gt(0.0), &scale.ones_like());
                ((&blocks / &safe).round(), scale)
            }
            Format::Q4 => {
                let at = blocks.abs().argmax(-1, true);
                let scale = blocks.gather(-1, &at, false) / -8.0;
                let safe = scale.where_self(&scale.ne(0.0), &scale.ones_like());
                (
                    ((&blocks / &safe) + 8.5).floor().clamp(0.0, 15.0) - 8.0,
                    scale,
                )
            }
        };
        let scale = match f16_scales {
            true => scale.to_kind(Kind::Half),
            false => scale,
        };
        (q.to_kind(Kind::Double) * scale.to_kind(Kind::Double)).view([n, k])
    }

    #[test]
    fn equals_the_product_of_the_dequantized_values() {
        if !kernels_run_here() {
            return;
        }
        tch::manual_seed(3);
        let (m, n, k) = (5, 24, 256);
        let (x, w) = (random(&[m, k], Kind::Float), random(&[n, k], Kind::Float));
        for format in FORMATS {
            let want =
                dequantized(&x, Format::Int8, false).matmul(&dequantized(&w, format, true).tr());
            let ours = QuantizedWeight::quantize(&w, format, Kind::Float)
                .unwrap()
                .linear(&x)
                .unwrap()
                .to_kind(Kind::Double);
            let diff = (&ours - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{format:?}: off by {diff}");
        }
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
        for format in FORMATS {
            let q = QuantizedWeight::quantize(&w, format, Kind::BFloat16).unwrap();
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
                        assert!(
                            alone.equal(&batched.narrow(0, i, 1)),
                            "{format:?}: row {i} of {m}"
                        );
                    }
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// The vectorised quantization of activations gives the scalar one's integers, scales and
    /// corrections, bit for bit: blocks of zeros, of exact halves (ties), of one spike.
    #[test]
    fn activations_quantize_alike_both_ways() {
        if !kernels_run_here() {
            return;
        }
        tch::manual_seed(4);
        let (m, k) = (3, 4 * BLOCK);
        let mut values: Vec<f32> =
            Vec::try_from(random(&[m as i64, k as i64], Kind::Float).flatten(0, -1)).unwrap();
        values[..BLOCK].fill(0.0);
        // Scale 1 (the block's extreme is 127), every other value halfway between two integers.
        for (i, v) in values[BLOCK..2 * BLOCK].iter_mut().enumerate() {
            *v = i as f32 - 16.0 + 0.5;
        }
        values[BLOCK] = 127.0;
        values[2 * BLOCK + 7] = 1e6;
        for offset in [None, Some(8), Some(128)] {
            let x = imp::quantize_activations(&values, m, k, offset, Dot::AvxVnni);
            let want = quantize_activations_scalar(&values, m, k, offset, Dot::AvxVnni);
            assert_eq!(x.quants, want.quants, "{offset:?}");
            assert_eq!(x.scales, want.scales, "{offset:?}");
            assert_eq!(x.corrections, want.corrections, "{offset:?}");
        }
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
    fn a_q4_block_maps_its_largest_magnitude_to_minus_8() {
        // The extreme is −2.0: scale 0.25; 0.5 → 2, 1.0 → 4, 1.9 → 7.6 + 8.5 floors to 16,
        // clamped to 15: 7; −0.125 → −0.5 + 8.5 = 8: 0 (halves round up, as Q4_0's).
        let (q, s) = quantize_rows_q4(&[0.5, -2.0, 1.9, -0.125], 1, 4);
        assert_eq!(&q[..4], &[2, -8, 7, 0]);
        assert_eq!(s, [0.25]);
        // A positive extreme gets a negative scale, so it too lands on −8.
        let (q, s) = quantize_rows_q4(&[4.0, -1.0], 1, 2);
        assert_eq!(&q[..2], &[-8, 2]);
        assert_eq!(s, [-0.5]);
        let (q, s) = quantize_rows_q4(&[0.0; 3], 1, 3);
        assert_eq!(s[0], 0.0);
        assert!(q.iter().all(|&v| v == 0));
    }

    #[test]
    fn q4_packs_two_rows_a_byte() {
        if !kernels_run_here() {
            return;
        }
        // One row, one block, scale 1 (its extreme is −8, at input 16).
        let values: Vec<f32> = (0..32)
            .map(|j| if j == 16 { -8.0 } else { (j % 8) as f32 })
            .collect();
        let w = Tensor::from_slice(&values).view([1, 32]);
        let q = QuantizedWeight::quantize(&w, Format::Q4, Kind::Float).unwrap();
        assert_eq!(q.bytes(), ROWS * 16 + ROWS * 2);
        assert_eq!(q.scales[0], f16::ONE);
        // Row 0's values (plus 8) in the low nibbles of the first half; row 1, past n, is zeros
        // (8) in the high ones; rows 2 and 3 fill the second half.
        assert_eq!(q.quants[1], (1 + 8) | 8 << 4);
        assert_eq!(q.quants[16], 8 << 4);
        assert!(q.quants[32..64].iter().all(|&b| b == 0x88));
    }

    #[test]
    fn refuses_mismatched_inputs() {
        if !kernels_run_here() {
            return;
        }
        for format in FORMATS {
            let q = QuantizedWeight::quantize(&random(&[4, 8], Kind::Float), format, Kind::Float)
                .unwrap();
            assert!(q.linear(&random(&[1, 7], Kind::Float)).is_err());
            assert!(q.linear(&random(&[1, 8], Kind::BFloat16)).is_err());
            let flat = random(&[8], Kind::Float);
            assert!(QuantizedWeight::quantize(&flat, format, Kind::Float).is_err());
            let weight = random(&[2, 8], Kind::Float);
            assert!(QuantizedWeight::quantize(&weight, format, Kind::Int).is_err());
        }
    }
}
