//! The loop behind [`super::quantized`]: up to two activation rows times one panel of four weight
//! rows, a block of 32 inputs at a time. A block's dot product is exact in integers, summed in
//! eight 32-bit lanes of four products each, two ways that give the same lanes:
//! - AVX-VNNI: `dpbusd` multiplies the weights in offset binary (unsigned) by x and adds each four
//!   into a lane that starts at −offset × the four x's sum, leaving Σ w x;
//! - AVX2: `maddubs` multiplies pairs into 16 bits, `madd` adds pairs of those. For int8 it takes
//!   |w| and x carrying w's sign (at most 2 × 127 × 127, no saturation); for q4 the unsigned
//!   nibbles (at most 2 × 15 × 127) and x, the lanes then starting where `dpbusd`'s start.
//!
//! A q4 panel block's two 32-byte halves are unpacked with one load and two masks each (two
//! weight rows a half), once per block, for every activation row of the tile. The lanes are scaled
//! by the weight block's scale (the panel block's four f16 scales widened together), then
//! multiplied by the activation block's and added to eight f32 sums (one fused multiply-add), so
//! the results do not depend on which way ran. Both scales are broadcast once per block, not once
//! per output and row.
//!
//! With AVX-512 VNNI the same lanes are computed two weight rows at a time: one 512-bit `dpbusd`
//! holds a pair of rows' eight lanes each (the activations' block broadcast to both halves), and
//! up to four activation rows share each load. Lane for lane it is the AVX-VNNI loop, so the
//! results are the same bits.

use std::arch::x86_64::*;

use half::f16;

use super::{
    quantized::{Activations, Dot, Format, BLOCK, ROWS},
    x86::Out,
    Scalar,
};

/// Rows of activations per sweep over a run's panels: their integers stay in L2 while each panel
/// is read once per sweep.
const SWEEP: usize = 48;

/// `y[i][c] = Σ_b scale_w[c][b] scale_x[i][b] (w[c][b] · x[i][b])` for every row `i` of the
/// quantized activations and every output `c` of the panels in `quants` / `scales`
/// (`[panels][blocks][ROWS × block bytes]` / `[..][ROWS]`, in `format`), of which the first
/// `columns` are written to `y`, the block dots computed as `x.dot` says.
///
/// Every output is one chain over its blocks in order, whatever `m` and whichever rows share its
/// tile: a row's result does not depend on what it is batched with.
///
/// # Safety
/// The CPU must have AVX2 and FMA, AVX-VNNI for [`Dot::AvxVnni`] and AVX-512F, AVX-512BW and
/// AVX-512 VNNI for [`Dot::Avx512Vnni`]; `y` must be valid for
/// writes of rows `0..m`, columns `0..columns`, and no one else may access them meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn panels<O: Scalar>(
    format: Format,
    quants: &[u8],
    scales: &[f16],
    blocks: usize,
    x: &Activations,
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    let panel = blocks * ROWS;
    let corrected = x.dot != Dot::Avx2 || format == Format::Q4;
    assert!(
        scales.len().is_multiple_of(panel)
            && quants.len() == scales.len() * format.block_bytes()
            && x.quants.len() == m * blocks * BLOCK
            && x.scales.len() == m * blocks
            && (!corrected || x.corrections.len() == m * blocks * 8)
            && columns <= scales.len() / blocks
    );
    let w = Panels {
        quants,
        scales,
        blocks,
    };
    // SAFETY: the caller vouches for the CPU and for `y`.
    unsafe {
        match (format, x.dot) {
            (Format::Int8, Dot::Avx2) => with_avx2::<O, false>(w, x, m, y, columns),
            (Format::Q4, Dot::Avx2) => with_avx2::<O, true>(w, x, m, y, columns),
            (Format::Int8, Dot::AvxVnni) => with_vnni::<O, false>(w, x, m, y, columns),
            (Format::Q4, Dot::AvxVnni) => with_vnni::<O, true>(w, x, m, y, columns),
            (Format::Int8, Dot::Avx512Vnni) => with_avx512_vnni::<O, false>(w, x, m, y, columns),
            (Format::Q4, Dot::Avx512Vnni) => with_avx512_vnni::<O, true>(w, x, m, y, columns),
        }
    }
}

/// A run of panels.
#[derive(Clone, Copy)]
struct Panels<'a> {
    quants: &'a [u8],
    scales: &'a [f16],
    blocks: usize,
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn with_avx2<O: Scalar, const Q4: bool>(
    w: Panels,
    x: &Activations,
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    // SAFETY: the caller's.
    unsafe {
        sweep(w, x, m, y, columns, 2, |at, r| match r {
            2 => tile::<O, 2, false, Q4>(at),
            _ => tile::<O, 1, false, Q4>(at),
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn with_vnni<O: Scalar, const Q4: bool>(
    w: Panels,
    x: &Activations,
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    // SAFETY: the caller's.
    unsafe {
        sweep(w, x, m, y, columns, 2, |at, r| match r {
            2 => tile::<O, 2, true, Q4>(at),
            _ => tile::<O, 1, true, Q4>(at),
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
unsafe fn with_avx512_vnni<O: Scalar, const Q4: bool>(
    w: Panels,
    x: &Activations,
    m: usize,
    y: &Out<O>,
    columns: usize,
) {
    // SAFETY: the caller's.
    unsafe {
        sweep(w, x, m, y, columns, 4, |at, r| match r {
            4 => tile512::<O, 4, Q4>(at),
            3 => tile512::<O, 3, Q4>(at),
            2 => tile512::<O, 2, Q4>(at),
            _ => tile512::<O, 1, Q4>(at),
        })
    }
}

/// The rows in sweeps of [`SWEEP`], each sweep over every panel, `group` rows at a time:
/// `tile(at, r)` computes one panel for `r` rows.
///
/// # Safety
/// As for [`panels`], whose checks have passed; `tile` must be sound for every [`Tile`] given.
#[inline(always)]
unsafe fn sweep<O: Scalar>(
    w: Panels,
    x: &Activations,
    m: usize,
    y: &Out<O>,
    columns: usize,
    group: usize,
    tile: impl Fn(Tile<O>, usize),
) {
    let blocks = w.blocks;
    let panel = blocks * ROWS;
    // Bytes per block: 32, or 16 in q4.
    let panel_bytes = panel * w.quants.len().checked_div(w.scales.len()).unwrap_or(0);
    for first in (0..m).step_by(SWEEP) {
        let rows = (m - first).min(SWEEP);
        for p in 0..w.scales.len() / panel {
            let width = columns.saturating_sub(p * ROWS).min(ROWS);
            if width == 0 {
                break;
            }
            let mut i = first;
            while i < first + rows {
                let r = (first + rows - i).min(group);
                // SAFETY: rows i..i + r of the activations and panel p are in bounds; the caller
                // vouches for `y`.
                unsafe {
                    let at = Tile {
                        weights: (
                            w.quants.as_ptr().add(p * panel_bytes),
                            w.scales.as_ptr().add(p * panel),
                        ),
                        blocks,
                        x: Rows {
                            quants: x.quants.as_ptr().add(i * blocks * BLOCK),
                            scales: x.scales.as_ptr().add(i * blocks),
                            corrections: x.corrections.as_ptr().wrapping_add(i * blocks * 8),
                        },
                        out: y.ptr.add(i * y.stride + p * ROWS),
                        stride: y.stride,
                        width,
                    };
                    tile(at, r);
                }
                i += r;
            }
        }
    }
}

/// Where one tile (a panel for some rows) reads and writes.
struct Tile<O> {
    /// The panel's integers and scales.
    weights: (*const u8, *const f16),
    blocks: usize,
    x: Rows,
    /// Row 0's first output.
    out: *mut O,
    stride: usize,
    /// Outputs of the panel that are written (the rest are padding).
    width: usize,
}

/// Where a tile's rows of activations start.
#[derive(Clone, Copy)]
struct Rows {
    quants: *const i8,
    scales: *const f32,
    /// Read with VNNI or q4 only.
    corrections: *const i32,
}

/// The four outputs of one panel for `R` consecutive rows, written to `out`.
///
/// # Safety
/// The panel (`blocks * ROWS` blocks of integers, 32 bytes each or 16 when `Q4`, and
/// `blocks * ROWS` scales) and `R` rows of activations (with their corrections when `VNNI` or
/// `Q4`) must be readable; `out[i * stride + c]` writable for `i < R`, `c < width`; AVX2, FMA and
/// F16C, and AVX-VNNI when `VNNI`.
// `j` and `i` address the panel's weight rows and the activation rows as well as the sums.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile<O: Scalar, const R: usize, const VNNI: bool, const Q4: bool>(at: Tile<O>) {
    let Tile {
        weights: (wq, ws),
        blocks,
        x,
        out,
        stride,
        width,
    } = at;
    let mut acc = [[_mm256_setzero_ps(); ROWS]; R];
    // SAFETY: every offset below is inside the panel or the rows, as the caller vouches.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let offset = _mm256_set1_epi8(-128);
        let nibble = _mm256_set1_epi8(0x0F);
        let lane = [
            _mm256_set1_epi32(0),
            _mm256_set1_epi32(1),
            _mm256_set1_epi32(2),
            _mm256_set1_epi32(3),
        ];
        for b in 0..blocks {
            let mut xq = [_mm256_setzero_si256(); R];
            let mut start = [_mm256_setzero_si256(); R];
            let mut xs = [_mm256_setzero_ps(); R];
            for i in 0..R {
                xq[i] = _mm256_loadu_si256(x.quants.add((i * blocks + b) * BLOCK).cast());
                xs[i] = _mm256_broadcast_ss(&*x.scales.add(i * blocks + b));
                if VNNI || Q4 {
                    start[i] = _mm256_loadu_si256(x.corrections.add((i * blocks + b) * 8).cast());
                }
            }
            // The panel block's four weight scales, widened from f16 together.
            let scales =
                _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(ws.add(b * ROWS).cast())));
            let mut weights = [_mm256_setzero_si256(); ROWS];
            if Q4 {
                for half in 0..ROWS / 2 {
                    let both = _mm256_loadu_si256(wq.add((b * 2 + half) * BLOCK).cast());
                    weights[2 * half] = _mm256_and_si256(both, nibble);
                    weights[2 * half + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(both), nibble);
                }
            } else {
                for j in 0..ROWS {
                    weights[j] = _mm256_loadu_si256(wq.add((b * ROWS + j) * BLOCK).cast());
                }
            }
            for j in 0..ROWS {
                let w = weights[j];
                let scale = _mm256_permutevar8x32_ps(scales, lane[j]);
                // int8 on AVX2 multiplies signed integers: w's sign moved onto x.
                let (signed, magnitude) = if VNNI || Q4 {
                    (w, w)
                } else {
                    let signed = _mm256_xor_si256(w, offset);
                    (signed, _mm256_sign_epi8(signed, signed))
                };
                for i in 0..R {
                    let lanes = if VNNI {
                        _mm256_dpbusd_avx_epi32(start[i], w, xq[i])
                    } else if Q4 {
                        let pairs = _mm256_maddubs_epi16(w, xq[i]);
                        _mm256_add_epi32(start[i], _mm256_madd_epi16(pairs, ones))
                    } else {
                        let pairs =
                            _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xq[i], signed));
                        _mm256_madd_epi16(pairs, ones)
                    };
                    let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), scale);
                    acc[i][j] = _mm256_fmadd_ps(scaled, xs[i], acc[i][j]);
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

/// [`tile`] with AVX-512 VNNI for `R` rows (up to four): each 512-bit register holds two weight
/// rows' eight lanes, int8's rows 0 and 1, then 2 and 3 (adjacent in the panel), q4's 0 and 2,
/// then 1 and 3 (the low and the high nibbles of the panel block's two halves), and the
/// activations' block, start and scale are broadcast to both halves. Every lane is computed as
/// [`tile`] computes it with AVX-VNNI, and summed in the same order.
///
/// # Safety
/// As for [`tile`], with AVX-512F, AVX-512BW and AVX-512 VNNI; the rows' corrections must be
/// there.
// `i` addresses the activation rows' registers as well as the sums.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn tile512<O: Scalar, const R: usize, const Q4: bool>(at: Tile<O>) {
    let Tile {
        weights: (wq, ws),
        blocks,
        x,
        out,
        stride,
        width,
    } = at;
    // Which panel rows each register's halves hold.
    let pairs: [[usize; 2]; 2] = if Q4 {
        [[0, 2], [1, 3]]
    } else {
        [[0, 1], [2, 3]]
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY: every offset below is inside the panel or the rows, as the caller vouches.
    unsafe {
        let nibble = _mm512_set1_epi8(0x0F);
        // Lanes 0..8 take a pair's first row's scale, lanes 8..16 its second's.
        let pick = pairs.map(|[a, b]| {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi32(a as i32)),
                _mm256_set1_epi32(b as i32),
            )
        });
        for b in 0..blocks {
            let mut xq = [_mm512_setzero_si512(); R];
            let mut start = [_mm512_setzero_si512(); R];
            let mut xs = [_mm512_setzero_ps(); R];
            for i in 0..R {
                let quants = _mm256_loadu_si256(x.quants.add((i * blocks + b) * BLOCK).cast());
                xq[i] = _mm512_broadcast_i64x4(quants);
                xs[i] = _mm512_set1_ps(*x.scales.add(i * blocks + b));
                let lanes = _mm256_loadu_si256(x.corrections.add((i * blocks + b) * 8).cast());
                start[i] = _mm512_broadcast_i64x4(lanes);
            }
            let four =
                _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadl_epi64(ws.add(b * ROWS).cast())));
            let scale = pick.map(|pick| _mm512_permutexvar_ps(pick, four));
            let weights = if Q4 {
                let both = _mm512_loadu_si512(wq.add(b * 2 * BLOCK).cast());
                [
                    _mm512_and_si512(both, nibble),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(both), nibble),
                ]
            } else {
                [
                    _mm512_loadu_si512(wq.add(b * ROWS * BLOCK).cast()),
                    _mm512_loadu_si512(wq.add((b * ROWS + 2) * BLOCK).cast()),
                ]
            };
            for (h, (&w, &scale)) in weights.iter().zip(&scale).enumerate() {
                for i in 0..R {
                    let lanes = _mm512_dpbusd_epi32(start[i], w, xq[i]);
                    let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(lanes), scale);
                    acc[i][h] = _mm512_fmadd_ps(scaled, xs[i], acc[i][h]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (&acc, pair) in acc.iter().zip(pairs) {
                let halves = [
                    _mm512_castps512_ps256(acc),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
                ];
                for (half, j) in halves.into_iter().zip(pair) {
                    if j < width {
                        *out.add(i * stride + j) = O::from_f32(sum(half));
                    }
                }
            }
        }
    }
}

/// Rows of activations quantized as [`super::quantized::quantize_rows`] quantizes them, with the
/// same integers and scales, eight values at a time: `values` is `[rows, k]` with `k` a multiple
/// of [`BLOCK`], `quants` and `scales` its `[rows][blocks][BLOCK]` and `[rows][blocks]`. With
/// `offset`, `corrections` (`[rows][blocks][8]`) gets −offset × the sum of every four integers.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_rows(
    values: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    corrections: &mut [i32],
    offset: Option<i32>,
) {
    assert!(
        values.len() == quants.len()
            && values.len() == scales.len() * BLOCK
            && (offset.is_none() || corrections.len() == scales.len() * 8)
    );
    let sign = _mm256_set1_ps(-0.0);
    let (low, high) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    for (b, block) in values.chunks_exact(BLOCK).enumerate() {
        // SAFETY: `block` holds 32 values; `quants` and `corrections` hold this block's 32 and 8
        // (checked above).
        unsafe {
            let v = [0, 8, 16, 24].map(|at| _mm256_loadu_ps(block.as_ptr().add(at)));
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let max = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let quad = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
            let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
            let max = _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps::<1>(pair, pair)));
            let scale = max / 127.0;
            let inverse = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            scales[b] = scale;
            let ints = v.map(|v| {
                let rounded = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v, inverse),
                );
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(rounded, low), high))
            });
            // Packing works within 128-bit lanes; the permutation puts the dwords back in order.
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(ints[0], ints[1]),
                _mm256_packs_epi32(ints[2], ints[3]),
            );
            let q = _mm256_permutevar8x32_epi32(packed, order);
            _mm256_storeu_si256(quants.as_mut_ptr().add(b * BLOCK).cast(), q);
            if let Some(offset) = offset {
                let fours = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
                let c = _mm256_mullo_epi32(fours, _mm256_set1_epi32(-offset));
                _mm256_storeu_si256(corrections.as_mut_ptr().add(b * 8).cast(), c);
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
