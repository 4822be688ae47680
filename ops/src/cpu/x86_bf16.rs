//! The AVX-512 BF16 loop behind [`super::packed`]'s bf16 weights, where the CPU has it:
//! `vdpbf16ps` multiplies sixteen pairs of bf16 values and adds both products to sixteen f32
//! accumulators, four times the multiply-adds per instruction of the AVX2 loop's f32 FMA
//! ([`super::x86`]), which widens every bf16 weight to f32 first.
//!
//! The weight of a panel of sixteen outputs is stored pair-major (`[k / 2][16][2]`): one 64-byte
//! load gives sixteen outputs' weights for two consecutive `k`, and the activations' matching
//! pair, read as one 32-bit value, is broadcast to all sixteen lanes. Measured on an AMD EPYC
//! with AVX-512 BF16 (no AMX): 125 G multiply-adds a second per core against 39 for the AVX2 FMA
//! loop, and prefill through it in docs/BENCHMARKS.md.

use std::arch::x86_64::*;

use half::bf16;

use super::{
    x86::{store_block, wide_blocks, Block, Out, WideBlock, PANEL},
    Scalar,
};

/// bf16 values per panel and pair of `k`: sixteen outputs' two weights.
pub const PAIR_PANEL: usize = 2 * PANEL;

/// Whether this CPU runs [`panels`].
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// `[n, k]` (row-major) to `[n / PANEL][k2][PANEL][2]` with `k2 = k.div_ceil(2)`, the last
/// panel padded with zero rows and an odd `k` with a zero column.
pub fn pack(dense: &[bf16], n: usize, k: usize) -> Vec<bf16> {
    let k2 = k.div_ceil(2);
    let panels = n.div_ceil(PANEL);
    let mut packed = vec![bf16::ZERO; panels * k2 * PAIR_PANEL];
    for (p, panel) in packed.chunks_exact_mut(k2 * PAIR_PANEL).enumerate() {
        for column in 0..PANEL {
            let row = p * PANEL + column;
            if row >= n {
                break;
            }
            for (kk, &v) in dense[row * k..(row + 1) * k].iter().enumerate() {
                panel[(kk / 2) * PAIR_PANEL + 2 * column + kk % 2] = v;
            }
        }
    }
    packed
}

/// `y[i][c] = sum_k x[i][k] w[c][k]` for every row `i` of `x` (`[m, 2 * k2]` bf16, an odd `k`
/// padded with a zero column) and every column `c` of the panels in `w` (packed by [`pack`]), of
/// which the first `columns` are written to `y`.
///
/// Every output is one chain of `vdpbf16ps` over the pairs of `k` in order, whatever `m`, whatever
/// rows or panels share its block and whichever thread runs its panel: a sequence's result does
/// not depend on what it is batched with.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16 ([`available`]); `y` must be valid for writes of
/// rows `0..m`, columns `0..columns`, and no one else may access them meanwhile.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn panels<O: Scalar>(
    w: &[bf16],
    k2: usize,
    x: &[bf16],
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    let panel_len = k2 * PAIR_PANEL;
    assert!(
        k2 > 0
            && w.len().is_multiple_of(panel_len)
            && x.len() == m * 2 * k2
            && columns <= w.len() / panel_len * PANEL
    );
    // SAFETY: the caller's; every row of `x` holds its `k2` pairs (checked above).
    unsafe { wide_blocks::<PairDot, _, _, _>(w, panel_len, k2, x, m, y, columns) }
}

/// The block: per pair of `k`, one load per panel and one broadcast pair per row feed `R * P`
/// `vdpbf16ps`.
struct PairDot;

impl<O: Scalar> WideBlock<bf16, bf16, O> for PairDot {
    #[inline(always)]
    unsafe fn block<const R: usize, const P: usize>(at: &Block<bf16, bf16, O>) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for q in 0..at.depth {
            // SAFETY: q < k2, so each panel's pair q and each row's pair q are in bounds (the
            // caller's).
            unsafe {
                let mut weights = [bf16x32(_mm512_setzero_si512()); P];
                for (p, weights) in weights.iter_mut().enumerate() {
                    let at = at.w.add(p * at.panel_len + q * PAIR_PANEL);
                    *weights = bf16x32(_mm512_loadu_si512(at.cast()));
                }
                let x = at.x.add(2 * q);
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pair = x.add(i * at.x_stride).cast::<i32>().read_unaligned();
                    let pair = bf16x32(_mm512_set1_epi32(pair));
                    for (acc, &weights) in acc.iter_mut().zip(&weights) {
                        *acc = _mm512_dpbf16_ps(*acc, weights, pair);
                    }
                }
            }
        }
        // SAFETY: the caller's.
        unsafe { store_block(&acc, at) }
    }
}

/// The 32 bf16 values in `v`'s bits, as `vdpbf16ps` takes them.
#[inline(always)]
fn bf16x32(v: __m512i) -> __m512bh {
    // SAFETY: both are 64 bytes of plain lanes; every bit pattern is a valid bf16.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
