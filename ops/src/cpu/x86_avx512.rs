//! The AVX-512F loop behind [`super::packed`]'s f32 and f16 weights in products of several rows,
//! where the CPU has it: the AVX2 loop's panels ([`super::x86`]), sixteen outputs' weights for one
//! `k` in one 512-bit register instead of two 256-bit ones, and 32 registers to hold up to twelve
//! rows by two panels of accumulators.
//!
//! Every output is the same chain of f32 fused multiply-adds over `k` in order as in the AVX2
//! loop, lane for lane, so the two give bit-identical results: a product may take either by its
//! row count (one row stays on the AVX2 loop, which is bound by memory there) and a sequence's
//! result still does not depend on its batch.

use std::arch::x86_64::*;

use half::f16;

use super::{
    x86::{store_block, wide_blocks, Block, Element, Out, WideBlock, PANEL},
    Scalar,
};

/// A weight element type this loop widens to f32, sixteen at a time; its panels must store
/// columns in order (`Element::ORDER` is the identity).
pub trait Wide: Element {
    /// The sixteen values at `p`, widened to f32.
    ///
    /// # Safety
    /// `p..p + 16` must be readable, and the CPU must have AVX-512F.
    unsafe fn load(p: *const Self) -> __m512;
}

impl Wide for f32 {
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller's.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Wide for f16 {
    #[inline(always)]
    unsafe fn load(p: *const f16) -> __m512 {
        // SAFETY: the caller's.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

/// Whether this CPU runs [`panels`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
}

/// [`super::x86::panels`] on 512-bit registers: `y[i][c] = sum_k x[i][k] w[c][k]` for every row
/// `i` of `x` (`[m, k]`, f32) and every column `c` of the panels in `w`, of which the first
/// `columns` are written to `y`; bit-identical to it.
///
/// # Safety
/// The CPU must have AVX-512F ([`available`]); `y` must be valid for writes of rows `0..m`,
/// columns `0..columns`, and no one else may access them meanwhile.
#[target_feature(enable = "avx512f")]
pub unsafe fn panels<W: Wide, O: Scalar>(
    w: &[W],
    k: usize,
    x: &[f32],
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    let panel_len = k * PANEL;
    assert!(
        k > 0 && w.len().is_multiple_of(panel_len) && x.len() == m * k && columns <= w.len() / k
    );
    debug_assert!(W::ORDER.iter().enumerate().all(|(j, &c)| j == c));
    // SAFETY: the caller's; every row of `x` holds its `k` values (checked above).
    unsafe { wide_blocks::<Fma, _, _, _>(w, panel_len, k, x, m, y, columns) }
}

/// The block: per `k`, one load per panel and one broadcast per row feed `R * P` multiply-adds.
struct Fma;

impl<W: Wide, O: Scalar> WideBlock<W, f32, O> for Fma {
    #[inline(always)]
    unsafe fn block<const R: usize, const P: usize>(at: &Block<W, f32, O>) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for kk in 0..at.depth {
            // SAFETY: kk < k, so each panel's values for kk and x[i][kk] for i < R are in
            // bounds (the caller's).
            unsafe {
                let mut weights = [_mm512_setzero_ps(); P];
                for (p, weights) in weights.iter_mut().enumerate() {
                    *weights = W::load(at.w.add(p * at.panel_len + kk * PANEL));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*at.x.add(i * at.x_stride + kk));
                    for (acc, &weights) in acc.iter_mut().zip(&weights) {
                        *acc = _mm512_fmadd_ps(weights, xb, *acc);
                    }
                }
            }
        }
        // SAFETY: the caller's.
        unsafe { store_block(&acc, at) }
    }
}
