//! The AVX2/FMA loop behind [`super::packed`]: up to six activation rows times one panel of
//! sixteen weight rows stored k-major, so every weight vector loaded feeds six rows.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::Scalar;

/// Weight rows per panel: two AVX registers of f32 outputs.
pub const PANEL: usize = 16;

/// Activation rows per call of [`block`]: twelve accumulators, two weight vectors and one
/// broadcast fill fifteen of the sixteen AVX registers.
const GROUP: usize = 6;

/// A weight element type the kernel can widen to f32, sixteen at a time.
pub trait Element: Scalar {
    /// Where [`super::packed`] stores output column `ORDER[j]` among a panel's sixteen values for
    /// one `k` (at position `j`), so that [`Element::load16`] returns columns 0..8 and 8..16.
    const ORDER: [usize; PANEL];
    /// The sixteen values at `p`, widened to f32: output columns 0..8 and 8..16.
    ///
    /// # Safety
    /// `p..p + 16` must be readable, and the CPU must have AVX2 and F16C.
    unsafe fn load16(p: *const Self) -> (__m256, __m256);
    /// The eight values at `p`, widened to f32, in order.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the CPU must have AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

const IN_ORDER: [usize; PANEL] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

impl Element for f32 {
    const ORDER: [usize; PANEL] = IN_ORDER;
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> (__m256, __m256) {
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Element for bf16 {
    /// `unpack` works within 128-bit lanes, so columns 4..8 and 8..12 are stored swapped.
    const ORDER: [usize; PANEL] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];
    /// bf16 is the top half of an f32: interleaving zeros below each value widens eight of them
    /// in one instruction.
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> (__m256, __m256) {
        unsafe {
            let v = _mm256_loadu_si256(p.cast());
            let zero = _mm256_setzero_si256();
            (
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)),
            )
        }
    }
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> __m256 {
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
        }
    }
}

impl Element for f16 {
    const ORDER: [usize; PANEL] = IN_ORDER;
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> (__m256, __m256) {
        unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast())),
            )
        }
    }
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Whether this CPU runs [`panels`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Where [`panels`] writes: row `i`, column `c` of the output is `ptr[i * stride + c]`.
pub struct Out<O> {
    pub ptr: *mut O,
    pub stride: usize,
}

// SAFETY: an `Out` is only shared between the threads of one product, which write disjoint
// columns of it (`super::packed`).
unsafe impl<O> Send for Out<O> {}
unsafe impl<O> Sync for Out<O> {}

/// `y[i][c] = sum_k x[i][k] w[c][k]` for every row `i` of `x` (`[m, k]`, f32) and every column `c`
/// of the panels in `w` (`[panels][k][PANEL]`, packed by [`super::packed`]), of which the first
/// `columns` are written to `y`.
///
/// Every output is one fused multiply-add chain over `k` in order, whatever `m`, whatever rows
/// share its group and whichever thread runs its panel: a sequence's result does not depend on
/// what it is batched with, prefill chunks included.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]); `y` must be valid for writes of rows
/// `0..m`, columns `0..columns`, and no one else may access them meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panels<W: Element, O: Scalar>(
    w: &[W],
    k: usize,
    x: &[f32],
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    let panel_len = k * PANEL;
    assert!(w.len().is_multiple_of(panel_len) && x.len() == m * k && columns <= w.len() / k);
    // Rows of `x` per sweep over this run's panels: their activations (up to 48 * k f32) stay in
    // L2 while each panel is read once from memory per sweep.
    const SWEEP: usize = 8 * GROUP;
    if m == 1 {
        return unsafe { one_row(w, k, x, y, columns) };
    }
    for first in (0..m).step_by(SWEEP) {
        let rows = (m - first).min(SWEEP);
        for (p, panel) in w.chunks_exact(panel_len).enumerate() {
            let width = panel_width(columns, p);
            if width == 0 {
                break;
            }
            // The next panel, which this panel's groups pull towards the cache while they
            // compute, each its share, so the next panel does not start with a wait on memory
            // and the memory bus does not idle while a later group runs from cache. With one
            // group (a sweep of 6 rows or fewer) the hardware prefetcher alone does better.
            let next = w.get((p + 1) * panel_len..(p + 2) * panel_len);
            // The sweep's rows in groups as even as they can be (32 rows: 6, 6, 5, 5, 5, 5, not
            // five of 6 and one of 2): a group of R rows keeps 2R accumulator chains going, and
            // under eight of them the multiply-add latency shows.
            let groups = rows.div_ceil(GROUP);
            let mut i = first;
            for g in 0..groups {
                let group = rows / groups + usize::from(g < rows % groups);
                let ahead = next.filter(|_| groups > 1).map(|next| {
                    let share = |g: usize| g * (next.len() / 16) / groups * 16;
                    &next[share(g)..share(g + 1)]
                });
                // SAFETY: rows i..i + group of `x` and the panel are in bounds; the caller
                // vouches for `y`.
                unsafe {
                    let out = y.ptr.add(i * y.stride + p * PANEL);
                    let x = x.as_ptr().add(i * k);
                    match group {
                        6 => rows_of::<W, O, 6>(panel, k, x, ahead, out, y.stride, width),
                        5 => rows_of::<W, O, 5>(panel, k, x, ahead, out, y.stride, width),
                        4 => rows_of::<W, O, 4>(panel, k, x, ahead, out, y.stride, width),
                        3 => rows_of::<W, O, 3>(panel, k, x, ahead, out, y.stride, width),
                        2 => rows_of::<W, O, 2>(panel, k, x, ahead, out, y.stride, width),
                        _ => rows_of::<W, O, 1>(panel, k, x, ahead, out, y.stride, width),
                    }
                }
                i += group;
            }
        }
    }
}

/// [`block`] for `R` rows and one panel, stored to `out`; with `ahead`, prefetching it.
///
/// # Safety
/// As for [`block`] and [`store`].
#[inline(always)]
unsafe fn rows_of<W: Element, O: Scalar, const R: usize>(
    panel: &[W],
    k: usize,
    x: *const f32,
    ahead: Option<&[W]>,
    out: *mut O,
    stride: usize,
    width: usize,
) {
    // SAFETY: the caller's.
    unsafe {
        let acc = match ahead {
            Some(next) => block::<W, R, true>(panel, k, x, next),
            None => block::<W, R, false>(panel, k, x, &[]),
        };
        store(acc, out, stride, width)
    }
}

/// How many of panel `p`'s sixteen columns are among the first `columns` (0 past the end).
#[inline(always)]
pub(super) fn panel_width(columns: usize, p: usize) -> usize {
    columns.saturating_sub(p * PANEL).min(PANEL)
}

/// Most activation rows per block of the 512-bit loops (`x86_avx512`, `x86_bf16`): with two
/// panels, 24 accumulators, two weight vectors and a broadcast in their 32 registers, and twelve
/// independent chains per panel to hide the multiply-add latency.
const WIDE_GROUP: usize = 12;

/// A 512-bit loop's product: `K`'s blocks over every row of `x` (`m` rows, `depth` steps along
/// `k` each) and every panel of `w` (`panel_len` values each), of which the first `columns`
/// columns are written to `y`. The rows go in sweeps of 48, whose activations stay in L2 while
/// each panel is read once from memory per sweep; in each sweep the panels go two at a time (four
/// for a single row, which is bound by memory) and the rows in groups of at most
/// [`WIDE_GROUP`], as even as they can be so that none runs short of chains.
///
/// # Safety
/// The CPU must have `K`'s features; each row of `x` must hold what `K` reads for `depth` steps;
/// `y` must be valid for writes of rows `0..m`, columns `0..columns`, and no one else may access
/// them meanwhile.
#[inline(always)]
pub(super) unsafe fn wide_blocks<K: WideBlock<W, X, O>, W, X, O>(
    w: &[W],
    panel_len: usize,
    depth: usize,
    x: &[X],
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    if m == 0 {
        return;
    }
    let (count, x_stride) = (w.len() / panel_len, x.len() / m);
    let step = if m == 1 { 4 } else { 2 };
    for first in (0..m).step_by(4 * WIDE_GROUP) {
        let rows = (m - first).min(4 * WIDE_GROUP);
        let groups = rows.div_ceil(WIDE_GROUP);
        let mut p = 0;
        while p < count && panel_width(columns, p) > 0 {
            let wide = (count - p).min(step);
            let mut i = first;
            for g in 0..groups {
                let group = rows / groups + usize::from(g < rows % groups);
                // SAFETY: rows i..i + group of `x` and panels p..p + wide are in bounds; the
                // caller vouches for the rest, and the block writes only columns below `columns`.
                unsafe {
                    let at = Block {
                        w: w.as_ptr().add(p * panel_len),
                        panel_len,
                        depth,
                        x: x.as_ptr().add(i * x_stride),
                        x_stride,
                        out: y.ptr.add(i * y.stride + p * PANEL),
                        stride: y.stride,
                        columns: columns - p * PANEL,
                    };
                    dispatch::<K, W, X, O>(&at, group, wide);
                }
                i += group;
            }
            p += wide;
        }
    }
}

/// Where one block of a 512-bit loop reads and writes: `P` panels by `R` rows.
pub(super) struct Block<W, X, O> {
    /// The block's first panel.
    pub w: *const W,
    /// Values from one panel to the next.
    pub panel_len: usize,
    /// Steps along `k` (each `k`, or each pair of them).
    pub depth: usize,
    /// The block's first activation row.
    pub x: *const X,
    /// Values from one activation row to the next.
    pub x_stride: usize,
    /// Row 0, column 0 of the block's outputs.
    pub out: *mut O,
    /// Values from one output row to the next.
    pub stride: usize,
    /// Columns of `out` that may be written (the rest are padding).
    pub columns: usize,
}

/// A 512-bit loop's block: the outputs of `P` panels for `R` rows, stored by [`store_block`].
pub(super) trait WideBlock<W, X, O> {
    /// # Safety
    /// `P` panels from `at.w` and `R` rows from `at.x` must be readable, `at.out` writable for
    /// `R` rows of `at.columns.min(P * PANEL)` columns, and the CPU must have the loop's
    /// features.
    unsafe fn block<const R: usize, const P: usize>(at: &Block<W, X, O>);
}

/// `K`'s block for `rows` rows (1..=12 with one or two panels, 1 with three or four) and `wide`
/// panels (1..=4).
///
/// # Safety
/// As for [`WideBlock::block`].
#[inline(always)]
unsafe fn dispatch<K: WideBlock<W, X, O>, W, X, O>(at: &Block<W, X, O>, rows: usize, wide: usize) {
    macro_rules! by_rows {
        ($p:literal) => {
            match rows {
                1 => K::block::<1, $p>(at),
                2 => K::block::<2, $p>(at),
                3 => K::block::<3, $p>(at),
                4 => K::block::<4, $p>(at),
                5 => K::block::<5, $p>(at),
                6 => K::block::<6, $p>(at),
                7 => K::block::<7, $p>(at),
                8 => K::block::<8, $p>(at),
                9 => K::block::<9, $p>(at),
                10 => K::block::<10, $p>(at),
                11 => K::block::<11, $p>(at),
                _ => K::block::<12, $p>(at),
            }
        };
    }
    debug_assert!(rows <= WIDE_GROUP && (wide <= 2 || rows == 1));
    // SAFETY: the caller's.
    unsafe {
        match wide {
            1 => by_rows!(1),
            2 => by_rows!(2),
            3 => K::block::<1, 3>(at),
            _ => K::block::<1, 4>(at),
        }
    }
}

/// Writes a 512-bit block's accumulators (`acc[i][p]`: row `i`, panel `p`) to its outputs.
///
/// # Safety
/// As for [`WideBlock::block`]; AVX-512F.
#[inline(always)]
pub(super) unsafe fn store_block<W, X, O: Scalar, const R: usize, const P: usize>(
    acc: &[[__m512; P]; R],
    at: &Block<W, X, O>,
) {
    for (i, acc) in acc.iter().enumerate() {
        for (p, acc) in acc.iter().enumerate() {
            let width = panel_width(at.columns, p);
            if width == 0 {
                break;
            }
            let mut lanes = [0f32; PANEL];
            // SAFETY: `lanes` holds sixteen f32; the caller vouches for the outputs.
            unsafe {
                _mm512_storeu_ps(lanes.as_mut_ptr(), *acc);
                store_lanes(&lanes, at.out.add(i * at.stride + p * PANEL), width);
            }
        }
    }
}

/// Writes the first `width` of `lanes` to `row`, rounded to `O`.
///
/// # Safety
/// `row..row + width` must be writable.
#[inline(always)]
unsafe fn store_lanes<O: Scalar>(lanes: &[f32; PANEL], row: *mut O, width: usize) {
    for (c, &v) in lanes[..width].iter().enumerate() {
        // SAFETY: c < width; the caller's.
        unsafe { *row.add(c) = O::from_f32(v) };
    }
}

/// [`panels`] for one row of `x` (a single-stream decode): two panels at a time, so four
/// accumulator chains hide the multiply-add latency that one panel's two would expose.
///
/// # Safety
/// As for [`panels`].
#[inline(always)]
unsafe fn one_row<W: Element, O: Scalar>(w: &[W], k: usize, x: &[f32], y: &Out<O>, columns: usize) {
    let panel_len = k * PANEL;
    let mut pairs = w.chunks_exact(2 * panel_len);
    let mut p = 0;
    for pair in pairs.by_ref() {
        let (a, b) = pair.split_at(panel_len);
        let mut acc = [[_mm256_setzero_ps(); 2]; 2];
        for kk in 0..k {
            // SAFETY: kk < k, inside both panels and `x`.
            unsafe {
                let xb = _mm256_broadcast_ss(x.get_unchecked(kk));
                let (a0, a1) = W::load16(a.as_ptr().add(kk * PANEL));
                let (b0, b1) = W::load16(b.as_ptr().add(kk * PANEL));
                acc[0][0] = _mm256_fmadd_ps(a0, xb, acc[0][0]);
                acc[0][1] = _mm256_fmadd_ps(a1, xb, acc[0][1]);
                acc[1][0] = _mm256_fmadd_ps(b0, xb, acc[1][0]);
                acc[1][1] = _mm256_fmadd_ps(b1, xb, acc[1][1]);
            }
        }
        for (j, acc) in acc.into_iter().enumerate() {
            let width = panel_width(columns, p + j);
            if width > 0 {
                // SAFETY: the caller vouches for `y`'s first row.
                unsafe { store([acc], y.ptr.add((p + j) * PANEL), y.stride, width) };
            }
        }
        p += 2;
    }
    let rest = pairs.remainder();
    if !rest.is_empty() {
        let width = panel_width(columns, p);
        // SAFETY: as above.
        unsafe {
            store(
                block::<W, 1, false>(rest, k, x.as_ptr(), &[]),
                y.ptr.add(p * PANEL),
                y.stride,
                width,
            )
        };
    }
}

/// The sixteen outputs of one panel for `R` consecutive rows of `x` (row length `k`). With
/// `AHEAD`, it also prefetches `ahead` (a share of the next panel) meanwhile: each of its 64-byte
/// lines once, at even intervals from the start of the loop.
///
/// # Safety
/// `panel..panel + k * PANEL` and `x..x + R * k` must be readable; AVX2, FMA and F16C.
#[inline(always)]
unsafe fn block<W: Element, const R: usize, const AHEAD: bool>(
    panel: &[W],
    k: usize,
    x: *const f32,
    ahead: &[W],
) -> [[__m256; 2]; R] {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // Prefetch a line every `every` iterations until all `lines` are asked for (`lines <= k`:
    // a share is at most a panel, one line or less per `k`).
    let lines = size_of_val(ahead) / 64;
    let every = k / lines.max(1);
    let (mut line, mut left, mut countdown) = (ahead.as_ptr().cast::<u8>(), lines, 0);
    for kk in 0..k {
        // SAFETY: kk < k, so the panel's values for kk and x[i][kk] for i < R are in bounds; a
        // prefetch of any address is harmless.
        unsafe {
            if AHEAD && left > 0 {
                if countdown == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(line.cast());
                    line = line.wrapping_add(64);
                    left -= 1;
                    countdown = every;
                }
                countdown -= 1;
            }
            let (w0, w1) = W::load16(panel.as_ptr().add(kk * PANEL));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*x.add(i * k + kk));
                acc[0] = _mm256_fmadd_ps(w0, xb, acc[0]);
                acc[1] = _mm256_fmadd_ps(w1, xb, acc[1]);
            }
        }
    }
    acc
}

/// Writes the first `width` of each row's sixteen outputs, rounded to `O`.
///
/// # Safety
/// `out[i * stride + c]` must be writable for `i < R`, `c < width`; AVX.
#[inline(always)]
unsafe fn store<O: Scalar, const R: usize>(
    acc: [[__m256; 2]; R],
    out: *mut O,
    stride: usize,
    width: usize,
) {
    for (i, acc) in acc.iter().enumerate() {
        let mut lanes = [0f32; PANEL];
        // SAFETY: `lanes` holds sixteen f32; the caller vouches for `out`.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
            store_lanes(&lanes, out.add(i * stride), width);
        }
    }
}

/// One query head attending over `keys.len()` positions: `out = softmax(q . k_t * scale) v`,
/// all in f32. `q` and `out` hold `dim` values, `keys[t]` / `values[t]` point at position `t`'s
/// `dim` values for this head, and `scores` is scratch of one f32 per position.
///
/// Both products keep eight independent multiply-add chains going, so neither waits on one
/// chain's latency: scores eight positions at a time, the weighted sum over positions 64 output
/// values at a time (head sizes of 64 and 128, Llama 2's).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `dim` must be a multiple of 8 and every pointer valid
/// for `dim` reads.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_one<W: Element>(
    q: &[f32],
    keys: &[*const W],
    values: &[*const W],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dim = q.len();
    debug_assert!(dim.is_multiple_of(8) && out.len() == dim && scores.len() == keys.len());
    let eights = keys.len() / 8 * 8;
    for (t, score) in scores[..eights].chunks_exact_mut(8).enumerate() {
        let k = &keys[t * 8..t * 8 + 8];
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..dim).step_by(8) {
            // SAFETY: c + 8 <= dim, inside `q` and each caller's key row.
            unsafe {
                let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                for (acc, &k) in acc.iter_mut().zip(k) {
                    *acc = _mm256_fmadd_ps(qc, W::load8(k.add(c)), *acc);
                }
            }
        }
        // SAFETY: `score` holds eight f32.
        unsafe {
            let sums = _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale));
            _mm256_storeu_ps(score.as_mut_ptr(), sums);
        }
    }
    for (score, &k) in scores[eights..].iter_mut().zip(&keys[eights..]) {
        let mut acc = _mm256_setzero_ps();
        for c in (0..dim).step_by(8) {
            // SAFETY: c + 8 <= dim, inside `q` and the caller's key row.
            unsafe {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c)), W::load8(k.add(c)), acc);
            }
        }
        *score = sum8(acc) * scale;
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut total = 0f32;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        total += *score;
    }
    let norm = _mm256_set1_ps(1.0 / total);
    // Runs of 64 output values with eight accumulators (a fixed count, so they stay in
    // registers), then any eight at a time.
    let runs = dim / 64 * 64;
    for first in (0..runs).step_by(64) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for (&p, &v) in scores.iter().zip(values) {
            let p = _mm256_set1_ps(p);
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: first + 8j + 8 <= runs <= dim, inside the caller's value row.
                unsafe { *acc = _mm256_fmadd_ps(p, W::load8(v.add(first + 8 * j)), *acc) };
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            // SAFETY: first + 8j + 8 <= dim = out.len().
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(first + 8 * j),
                    _mm256_mul_ps(*acc, norm),
                )
            };
        }
    }
    for c in (runs..dim).step_by(8) {
        let mut acc = _mm256_setzero_ps();
        for (&p, &v) in scores.iter().zip(values) {
            // SAFETY: c + 8 <= dim, inside the caller's value row.
            unsafe { acc = _mm256_fmadd_ps(_mm256_set1_ps(p), W::load8(v.add(c)), acc) };
        }
        // SAFETY: c + 8 <= dim = out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c), _mm256_mul_ps(acc, norm)) };
    }
}

/// The lane sums of eight vectors, in order.
#[inline]
#[target_feature(enable = "avx")]
fn sum8x8(v: [__m256; 8]) -> __m256 {
    let pair = |i: usize| _mm256_hadd_ps(v[i], v[i + 1]);
    // Lanes 0..4 hold the sums of v[0..4]'s first halves, lanes 4..8 of their second halves.
    let low = _mm256_hadd_ps(pair(0), pair(2));
    let high = _mm256_hadd_ps(pair(4), pair(6));
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(low, high),
        _mm256_permute2f128_ps::<0x31>(low, high),
    )
}

/// The eight lanes of `v` added in [`sum8x8`]'s order, so a score does not depend on whether its
/// position fell in a run of eight.
#[inline]
#[target_feature(enable = "avx")]
fn sum8(v: __m256) -> f32 {
    let pairs = _mm256_hadd_ps(v, v);
    let halves = _mm256_hadd_ps(pairs, pairs);
    _mm_cvtss_f32(_mm_add_ps(
        _mm256_castps256_ps128(halves),
        _mm256_extractf128_ps::<1>(halves),
    ))
}
