//! The AVX2/FMA loops behind [`super::gemv`]: dot products of weight rows with a few activation
//! rows, reading each weight row from memory once.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::Scalar;

/// A weight element type the kernel can widen to f32, sixteen at a time.
pub trait Element: Scalar {
    /// Whether [`Element::load16`] returns the elements interleaved (see [`arrange`]).
    const INTERLEAVED: bool;
    /// Sixteen consecutive elements at `p`, widened to f32: elements 0..8 and 8..16, or, when
    /// `INTERLEAVED`, elements 0..4 ++ 8..12 and 4..8 ++ 12..16.
    ///
    /// # Safety
    /// `p..p + 16` must be readable, and the CPU must have AVX2 and F16C.
    unsafe fn load16(p: *const Self) -> (__m256, __m256);
}

impl Element for f32 {
    const INTERLEAVED: bool = false;
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> (__m256, __m256) {
        unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) }
    }
}

impl Element for bf16 {
    const INTERLEAVED: bool = true;
    /// bf16 is the top half of an f32: interleaving zeros below each element widens it in one
    /// instruction per eight, at the price of the lane order `unpack` gives.
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
}

impl Element for f16 {
    const INTERLEAVED: bool = false;
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> (__m256, __m256) {
        unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast())),
            )
        }
    }
}

/// The activation rows (`[m, k]`) as f32, in the order `W::load16` returns weights: unchanged,
/// or each full block of sixteen interleaved as 0..4, 8..12, 4..8, 12..16.
pub fn arrange<W: Element, X: Scalar>(x: &[X], k: usize) -> Vec<f32> {
    let mut out: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    if W::INTERLEAVED {
        let body = k - k % 16;
        for (row, out) in x.chunks(k).zip(out.chunks_mut(k)) {
            for (block, out) in row[..body].chunks(16).zip(out[..body].chunks_mut(16)) {
                for (i, &j) in [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
                    .iter()
                    .enumerate()
                {
                    out[i] = block[j].to_f32();
                }
            }
        }
    }
    out
}

/// Whether this CPU runs [`rows`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `y[r * m + i] = w[r] · x[i]` for every row `r` of `w` (`[rows, k]`) and row `i` of `x`
/// (`[m, k]`, laid out by [`arrange`]); `y` is `[rows, m]`, rounded to `O`.
///
/// Four weight rows at a time, except 16-bit weights with one or two activation rows, which go
/// row by row: one memory stream per thread read them at 26-29 GB/s against 22 for four rows
/// interleaved (bench-150m, `gemv_bench`: 11.0 to 8.4-9.4 ms per bf16 token).
///
/// Each output is computed the same way whatever `m` and whatever rows share its block (two
/// eight-lane sums over `k` in order, a fixed horizontal sum, then the tail in order), so a
/// sequence's result does not depend on what it is batched with, as long as its step's products
/// run here: always for bf16/f16, and for f32 in steps of at most `MAX_F32_ROWS` tokens (a larger
/// step, e.g. one with a prefill chunk, goes to libtorch, whose last bits differ).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C ([`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows<W: Element, O: Scalar>(w: &[W], k: usize, x: &[f32], m: usize, y: &mut [O]) {
    let n = w.len() / k;
    assert!(w.len() == n * k && x.len() == m * k && y.len() == n * m);
    let body = k - k % 16;
    let mut r = 0;
    // Four weight rows at a time: each activation load feeds four rows. The block (4 * k
    // elements) stays in L1/L2 while the activation rows after the first reuse it. 16-bit
    // weights for one or two activation rows skip this and go row by row (below), one memory
    // stream per thread.
    let blocked = size_of::<W>() == 4 || m > 2;
    while blocked && r + 4 <= n {
        let p = [0, 1, 2, 3].map(|j| w[(r + j) * k..].as_ptr());
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut c = 0;
            while c < body {
                // SAFETY: c + 16 <= body <= k, inside row r + j of `w` and row i of `x`.
                unsafe {
                    let x0 = _mm256_loadu_ps(xi.as_ptr().add(c));
                    let x1 = _mm256_loadu_ps(xi.as_ptr().add(c + 8));
                    for j in 0..4 {
                        let (w0, w1) = W::load16(p[j].add(c));
                        acc[j][0] = _mm256_fmadd_ps(w0, x0, acc[j][0]);
                        acc[j][1] = _mm256_fmadd_ps(w1, x1, acc[j][1]);
                    }
                }
                c += 16;
            }
            for j in 0..4 {
                let row = &w[(r + j) * k..(r + j + 1) * k];
                y[(r + j) * m + i] = O::from_f32(finish(acc[j], &row[body..], &xi[body..]));
            }
        }
        r += 4;
    }
    while r < n {
        let row = &w[r * k..(r + 1) * k];
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut c = 0;
            while c < body {
                // SAFETY: as above.
                unsafe {
                    let (w0, w1) = W::load16(row.as_ptr().add(c));
                    acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xi.as_ptr().add(c)), acc[0]);
                    acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xi.as_ptr().add(c + 8)), acc[1]);
                }
                c += 16;
            }
            y[r * m + i] = O::from_f32(finish(acc, &row[body..], &xi[body..]));
        }
        r += 1;
    }
}

/// The two accumulators' lanes summed in a fixed order, then the `k % 16` trailing products.
#[inline(always)]
fn finish<W: Element>(acc: [__m256; 2], w_tail: &[W], x_tail: &[f32]) -> f32 {
    // SAFETY: only called from `rows`, whose CPU has AVX.
    let mut sum = unsafe {
        let acc = _mm256_add_ps(acc[0], acc[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(_mm_hadd_ps(s, s))
    };
    for (w, x) in w_tail.iter().zip(x_tail) {
        sum += w.to_f32() * x;
    }
    sum
}
