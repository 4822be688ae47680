//! The AVX2 loop behind [`super::int8`]: up to two activation rows times one panel of four
//! weight rows, a block of 32 inputs at a time. A block's dot product is exact in integers:
//! `maddubs` multiplies |w| (unsigned) by x carrying w's sign and adds pairs into 16 bits (at most
//! 2 × 127 × 127, no saturation), `madd` adds pairs of those into eight 32-bit lanes; the lanes
//! are scaled by the two blocks' scales and added to eight f32 sums with one rounding each.

use std::arch::x86_64::*;

use super::{
    int8::{BLOCK, ROWS},
    x86::Out,
    Scalar,
};

/// Rows of activations per sweep over a run's panels: their integers stay in L2 while each panel
/// is read once per sweep.
const SWEEP: usize = 48;

/// `y[i][c] = Σ_b scale_w[c][b] scale_x[i][b] (w[c][b] · x[i][b])` for every row `i` of the
/// quantized activations (`xq`: `[m][blocks][BLOCK]`, `xs`: `[m][blocks]`) and every output `c`
/// of the panels in `quants` / `scales` (`[panels][blocks][ROWS][BLOCK]` / `[..][ROWS]`), of
/// which the first `columns` are written to `y`.
///
/// Every output is one chain over its blocks in order, whatever `m` and whichever rows share its
/// tile: a row's result does not depend on what it is batched with.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `y` must be valid for writes of rows `0..m`, columns
/// `0..columns`, and no one else may access them meanwhile.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn panels<O: Scalar>(
    quants: &[i8],
    scales: &[f32],
    blocks: usize,
    xq: &[i8],
    xs: &[f32],
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    let panel = blocks * ROWS;
    assert!(
        scales.len().is_multiple_of(panel)
            && quants.len() == scales.len() * BLOCK
            && xq.len() == m * blocks * BLOCK
            && xs.len() == m * blocks
            && columns <= scales.len() / blocks
    );
    for first in (0..m).step_by(SWEEP) {
        let rows = (m - first).min(SWEEP);
        for p in 0..scales.len() / panel {
            let width = columns.saturating_sub(p * ROWS).min(ROWS);
            if width == 0 {
                break;
            }
            let (wq, ws) = (
                quants[p * panel * BLOCK..].as_ptr(),
                scales[p * panel..].as_ptr(),
            );
            let mut i = first;
            while i < first + rows {
                let r = (first + rows - i).min(2);
                // SAFETY: rows i..i + r of the activations and panel p are in bounds; the caller
                // vouches for `y`.
                unsafe {
                    let x = (
                        xq.as_ptr().add(i * blocks * BLOCK),
                        xs.as_ptr().add(i * blocks),
                    );
                    let out = y.ptr.add(i * y.stride + p * ROWS);
                    if r == 2 {
                        tile::<O, 2>(wq, ws, blocks, x, out, y.stride, width);
                    } else {
                        tile::<O, 1>(wq, ws, blocks, x, out, y.stride, width);
                    }
                }
                i += r;
            }
        }
    }
}

/// The four outputs of one panel for `R` consecutive rows, written to `out`.
///
/// # Safety
/// The panel (`blocks * ROWS * BLOCK` integers and `blocks * ROWS` scales) and `R` rows of
/// activations must be readable; `out[i * stride + c]` writable for `i < R`, `c < width`; AVX2
/// and FMA.
// `j` and `i` address the panel's weight rows and the activation rows as well as the sums.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<O: Scalar, const R: usize>(
    wq: *const i8,
    ws: *const f32,
    blocks: usize,
    (xq, xs): (*const i8, *const f32),
    out: *mut O,
    stride: usize,
    width: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); ROWS]; R];
    // SAFETY: every offset below is inside the panel or the rows, as the caller vouches.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        for b in 0..blocks {
            let mut x = [_mm256_setzero_si256(); R];
            for (i, x) in x.iter_mut().enumerate() {
                *x = _mm256_loadu_si256(xq.add((i * blocks + b) * BLOCK).cast());
            }
            for j in 0..ROWS {
                let w = _mm256_loadu_si256(wq.add((b * ROWS + j) * BLOCK).cast());
                let magnitude = _mm256_sign_epi8(w, w);
                let scale = *ws.add(b * ROWS + j);
                for i in 0..R {
                    let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x[i], w));
                    let lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    let d = _mm256_set1_ps(scale * *xs.add(i * blocks + b));
                    acc[i][j] = _mm256_fmadd_ps(lanes, d, acc[i][j]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &acc) in acc[..width].iter().enumerate() {
                *out.add(i * stride + j) = O::from_f32(sum(acc));
            }
        }
    }
}

/// The eight lanes added as `(l0 + l4) + (l2 + l6)`, `(l1 + l5) + (l3 + l7)`, then those two.
#[inline(always)]
unsafe fn sum(v: __m256) -> f32 {
    // SAFETY: AVX, which the callers' target features include.
    unsafe {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<1>(pair, pair)))
    }
}
