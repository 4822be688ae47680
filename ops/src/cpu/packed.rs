//! Weights repacked at load time for Caravan's own CPU matrix product: `x W^T` for any number of
//! rows of `x`, the weight's rows split across the team so every core streams its own part.
//!
//! A `[n, k]` weight is stored as panels of sixteen rows, k-major (`[n / 16][k][16]`): one load
//! gives sixteen outputs' weights for one `k`, and each such load feeds up to six activation
//! rows (see `x86::panels`). With one row (a single-stream decode) each thread reads its panels
//! two at a time, front to back; with many, the product is bound by arithmetic, not memory.
//!
//! On a CPU with AVX-512 BF16, bf16 weights are stored pair-major instead (`[n / 16][k / 2][16][2]`,
//! see `x86_bf16`) and every product of them, one row or many, runs on that loop: one loop per
//! weight keeps a row's result independent of its batch.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// The loop a packed weight's products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// f32 fused multiply-adds on 256-bit vectors, 16-bit weights widened first (`x86`).
    Avx2Fma,
    /// f32 fused multiply-adds on 512-bit vectors for products of several rows, for f32 and f16
    /// weights (`x86_avx512`); one row stays on the AVX2 loop, which gives the same bits.
    Avx512Fma,
    /// `vdpbf16ps` on 512-bit vectors, for bf16 weights (`x86_bf16`).
    Avx512Bf16,
}

impl Loop {
    /// The loop in words, for logs and `caravanctl status`.
    pub fn name(self) -> &'static str {
        match self {
            Loop::Avx2Fma => "AVX2/FMA",
            Loop::Avx512Fma => "AVX-512F",
            Loop::Avx512Bf16 => "AVX-512 BF16",
        }
    }
}

/// A weight in the panel layout; the dense tensor it came from is not kept.
pub struct PackedWeight {
    values: Values,
    /// Output features (rows of the dense weight).
    n: usize,
    /// Input features.
    k: usize,
    kernel_loop: Loop,
}

enum Values {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
    /// bf16 in `x86_bf16`'s pair-major panels.
    Bf16Pairs(Vec<half::bf16>),
}

impl PackedWeight {
    /// `weight` (`[n, k]`) repacked, when Caravan's kernel runs it: a CPU tensor of f32, bf16 or
    /// f16 on a CPU with AVX2, FMA and F16C. `None` otherwise, for libtorch. It runs on the widest
    /// loop this CPU has for its dtype ([`PackedWeight::kernel_loop`]).
    pub fn pack(weight: &Tensor) -> Result<Option<PackedWeight>> {
        let kernel_loop = match weight.kind() {
            Kind::BFloat16 if super::avx512_bf16_runs_here() => Loop::Avx512Bf16,
            Kind::Float | Kind::Half if super::avx512_runs_here() => Loop::Avx512Fma,
            _ => Loop::Avx2Fma,
        };
        Self::pack_for(weight, kernel_loop)
    }

    /// [`PackedWeight::pack`] for `kernel_loop`, which the caller has checked this CPU runs and
    /// covers the weight's dtype (bf16 for [`Loop::Avx512Bf16`], f32 or f16 for
    /// [`Loop::Avx512Fma`]).
    pub(crate) fn pack_for(weight: &Tensor, kernel_loop: Loop) -> Result<Option<PackedWeight>> {
        let size = weight.size();
        let applies = super::kernels_run_here()
            && weight.device() == Device::Cpu
            && size.len() == 2
            && size.iter().all(|&d| d > 0)
            && matches!(weight.kind(), Kind::Float | Kind::BFloat16 | Kind::Half);
        if !applies {
            return Ok(None);
        }
        let weight = weight.f_contiguous()?;
        let (n, k) = (size[0] as usize, size[1] as usize);
        let values = match (weight.kind(), kernel_loop) {
            (Kind::BFloat16, Loop::Avx512Bf16) => Values::Bf16Pairs(imp::pack_pairs(&weight, n, k)),
            (Kind::BFloat16, Loop::Avx2Fma) => Values::Bf16(imp::pack(&weight, n, k)),
            (Kind::Float, Loop::Avx2Fma | Loop::Avx512Fma) => Values::F32(imp::pack(&weight, n, k)),
            (Kind::Half, Loop::Avx2Fma | Loop::Avx512Fma) => Values::F16(imp::pack(&weight, n, k)),
            (kind, kernel_loop) => {
                return Err(crate::Error::InvalidBatch(format!(
                    "the {} loop does not take {kind:?} weights",
                    kernel_loop.name()
                )))
            }
        };
        Ok(Some(PackedWeight {
            values,
            n,
            k,
            kernel_loop,
        }))
    }

    /// `[n, k]`, the dense weight's shape.
    pub fn size(&self) -> [i64; 2] {
        [self.n as i64, self.k as i64]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => 4 * v.len(),
            Values::Bf16(v) | Values::Bf16Pairs(v) => 2 * v.len(),
            Values::F16(v) => 2 * v.len(),
        }
    }

    /// The loop this weight's products run on.
    pub fn kernel_loop(&self) -> Loop {
        self.kernel_loop
    }

    /// The dense weight's dtype, which is also what [`PackedWeight::linear`] takes and returns.
    pub fn kind(&self) -> Kind {
        match self.values {
            Values::F32(_) => Kind::Float,
            Values::Bf16(_) | Values::Bf16Pairs(_) => Kind::BFloat16,
            Values::F16(_) => Kind::Half,
        }
    }

    /// `x W^T` for `x` of shape `[m, k]` (any `m`, on the CPU, of [`PackedWeight::kind`]),
    /// accumulated in f32 and rounded once to the weight's dtype.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        if size.len() != 2 || size[1] != self.k as i64 || x.kind() != self.kind() {
            return Err(crate::Error::InvalidBatch(format!(
                "x {:?} {:?} against a packed {:?} {:?} weight",
                size,
                x.kind(),
                self.size(),
                self.kind()
            )));
        }
        let x = x.f_to_device(Device::Cpu)?.f_contiguous()?;
        let mut y = Tensor::f_empty([size[0], self.n as i64], (self.kind(), Device::Cpu))?;
        let wide = self.kernel_loop == Loop::Avx512Fma;
        match &self.values {
            Values::F32(w) if wide => imp::product_wide(w, self.n, self.k, &x, &mut y),
            Values::F16(w) if wide => imp::product_wide(w, self.n, self.k, &x, &mut y),
            Values::F32(w) => imp::product(w, self.n, self.k, &x, &mut y),
            Values::Bf16(w) => imp::product(w, self.n, self.k, &x, &mut y),
            Values::F16(w) => imp::product(w, self.n, self.k, &x, &mut y),
            Values::Bf16Pairs(w) => imp::product_pairs(w, self.n, self.k, &x, &mut y),
        }
        Ok(y)
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::ops::Range;

    use half::bf16;
    use tch::Tensor;

    use crate::cpu::{
        elements, elements_mut, team,
        x86::{self, Element, Out, PANEL},
        x86_avx512::{self, Wide},
        x86_bf16, Scalar,
    };

    /// `[n, k]` to `[n / PANEL][k][PANEL]`, the last panel padded with zero rows, each panel's
    /// sixteen values in `W::ORDER`.
    pub fn pack<W: Element>(weight: &Tensor, n: usize, k: usize) -> Vec<W> {
        let dense = elements::<W>(weight);
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![W::from_f32(0.0); panels * k * PANEL];
        for (p, panel) in packed.chunks_exact_mut(k * PANEL).enumerate() {
            for (j, &column) in W::ORDER.iter().enumerate() {
                let row = p * PANEL + column;
                if row < n {
                    for (kk, &v) in dense[row * k..(row + 1) * k].iter().enumerate() {
                        panel[kk * PANEL + j] = v;
                    }
                }
            }
        }
        packed
    }

    /// `[n, k]` bf16 in `x86_bf16`'s pair-major panels.
    pub fn pack_pairs(weight: &Tensor, n: usize, k: usize) -> Vec<bf16> {
        x86_bf16::pack(elements::<bf16>(weight), n, k)
    }

    /// The AVX2/FMA loop over every panel of `w` for the rows of `x` into `y`.
    pub fn product<W: Element>(w: &[W], n: usize, k: usize, x: &Tensor, y: &mut Tensor) {
        widened_product(w, n, k, x, y, x86::panels::<W, W>)
    }

    /// [`product`] with the AVX-512F loop for two rows or more (the same bits).
    pub fn product_wide<W: Wide>(w: &[W], n: usize, k: usize, x: &Tensor, y: &mut Tensor) {
        widened_product(w, n, k, x, y, wide_panels::<W>)
    }

    /// One of the f32 loops over a run of panels: `x86::panels`' signature.
    type Panels<W> = unsafe fn(&[W], usize, &[f32], usize, &Out<W>, usize);

    /// `panels` over every panel of `w` for the rows of `x`, widened to f32, into `y`.
    fn widened_product<W: Element>(
        w: &[W],
        n: usize,
        k: usize,
        x: &Tensor,
        y: &mut Tensor,
        panels: Panels<W>,
    ) {
        let widened = widen::<W>(x);
        let x = widened.as_deref().unwrap_or_else(|| elements::<f32>(x));
        let m = x.len() / k;
        let panel_len = k * PANEL;
        share_panels(n, m, elements_mut::<W>(y), &|range, out, columns| {
            let w = &w[range.start * panel_len..range.end * panel_len];
            // SAFETY: the weight was packed for `panels`' loop only where it runs (checked when
            // packing, or by a test); `share_panels` hands this run the columns it alone writes.
            unsafe { panels(w, k, x, m, out, columns) }
        });
    }

    /// The AVX-512F loop, or for one row the AVX2 loop, which is bound by memory there and
    /// gives the same bits.
    ///
    /// # Safety
    /// As for `x86_avx512::panels`.
    unsafe fn wide_panels<W: Wide>(
        w: &[W],
        k: usize,
        x: &[f32],
        m: usize,
        y: &Out<W>,
        columns: usize,
    ) {
        // SAFETY: the caller's; packed weights exist only where AVX2, FMA and F16C run too.
        unsafe {
            if m == 1 {
                x86::panels(w, k, x, m, y, columns)
            } else {
                x86_avx512::panels(w, k, x, m, y, columns)
            }
        }
    }

    /// 16-bit activations widened to f32 once, not per panel; `None` for f32 ones (read in
    /// place).
    fn widen<W: Element>(x: &Tensor) -> Option<Vec<f32>> {
        (W::KIND != tch::Kind::Float).then(|| elements::<W>(x).iter().map(|v| v.to_f32()).collect())
    }

    /// The AVX-512 BF16 loop over every panel of `w` (packed by [`pack_pairs`]) for the rows of
    /// `x` (bf16) into `y`.
    pub fn product_pairs(w: &[bf16], n: usize, k: usize, x: &Tensor, y: &mut Tensor) {
        let k2 = k.div_ceil(2);
        let padded: Vec<bf16>;
        let x: &[bf16] = match elements::<bf16>(x) {
            x if k.is_multiple_of(2) => x,
            x => {
                // An odd row length gets the zero column the weight's pairs were padded with.
                padded = x
                    .chunks_exact(k)
                    .flat_map(|row| row.iter().copied().chain([bf16::ZERO]))
                    .collect();
                &padded
            }
        };
        let m = x.len() / (2 * k2);
        let panel_len = k2 * x86_bf16::PAIR_PANEL;
        share_panels(n, m, elements_mut::<bf16>(y), &|range, out, columns| {
            let w = &w[range.start * panel_len..range.end * panel_len];
            // SAFETY: the weight was packed for this loop only where `avx512_bf16_runs_here()`
            // (or a test checked it); `share_panels` hands this run the columns it alone writes.
            unsafe { x86_bf16::panels(w, k2, x, m, out, columns) }
        });
    }

    /// A loop over one run of panels: the panels, the run's first output column, its columns.
    type RunKernel<'a, O> = dyn Fn(Range<usize>, &Out<O>, usize) + Sync + 'a;

    /// Runs `kernel` over the `n.div_ceil(PANEL)` panels of a product into `y` (`[m, n]`) in runs,
    /// about four per thread, claimed by whichever thread of the team is free (the caller's
    /// included). A run's `kernel` gets its panels, its first output column as `Out` and how
    /// many columns it writes. Which thread computes a panel does not change its values.
    fn share_panels<O: Scalar>(n: usize, m: usize, y: &mut [O], kernel: &RunKernel<'_, O>) {
        if m == 0 {
            return;
        }
        let out = Out {
            ptr: y.as_mut_ptr(),
            stride: n,
        };
        let panels = n.div_ceil(PANEL);
        let out = &out; // shared whole (its fields alone would not be Sync)
        let run = |range: Range<usize>| {
            let columns = (n - range.start * PANEL).min(range.len() * PANEL);
            let run_out = Out {
                // SAFETY: column range.start * PANEL < n of row 0 of `y`.
                ptr: unsafe { out.ptr.add(range.start * PANEL) },
                stride: out.stride,
            };
            // Runs do not overlap, so each writes only its own columns of rows 0..m.
            kernel(range, &run_out, columns)
        };
        match team() {
            // Even runs, so a single row's loop keeps its panels in pairs.
            Some(team) => team.share(
                panels,
                panels.div_ceil(4 * team.threads()).next_multiple_of(2),
                &run,
            ),
            None => run(0..panels),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use tch::Tensor;

    pub fn pack<W>(_: &Tensor, _: usize, _: usize) -> Vec<W> {
        unreachable!("pack() is not called without x86-64")
    }

    pub fn pack_pairs(_: &Tensor, _: usize, _: usize) -> Vec<half::bf16> {
        unreachable!("pack_pairs() is not called without x86-64")
    }

    pub fn product<W>(_: &[W], _: usize, _: usize, _: &Tensor, _: &mut Tensor) {
        unreachable!("there are no packed weights without x86-64")
    }

    pub fn product_wide<W>(_: &[W], _: usize, _: usize, _: &Tensor, _: &mut Tensor) {
        unreachable!("there are no packed weights without x86-64")
    }

    pub fn product_pairs(_: &[half::bf16], _: usize, _: usize, _: &Tensor, _: &mut Tensor) {
        unreachable!("there are no packed weights without x86-64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu::tests::{kernels_run_here, random};

    fn packed(w: &Tensor) -> PackedWeight {
        PackedWeight::pack(w).unwrap().expect("the kernel applies")
    }

    /// The loops this CPU runs for weights of `kind`, each packed for; says which it skipped.
    fn packed_on_each_loop(w: &Tensor) -> Vec<PackedWeight> {
        let mut loops = vec![Loop::Avx2Fma];
        let (wide, has) = match w.kind() {
            Kind::BFloat16 => (Loop::Avx512Bf16, crate::cpu::cpu_has_avx512_bf16()),
            _ => (Loop::Avx512Fma, crate::cpu::cpu_has_avx512()),
        };
        if has {
            loops.push(wide);
        } else {
            eprintln!("skipped: {wide:?} (this CPU does not have it)");
        }
        loops
            .into_iter()
            .map(|kernel_loop| {
                let packed = PackedWeight::pack_for(w, kernel_loop).unwrap().unwrap();
                assert_eq!(packed.kernel_loop(), kernel_loop);
                packed
            })
            .collect()
    }

    /// Our product against libtorch's, for every dtype and loop, row count (even groups of up to
    /// six or twelve, sweeps of 48) and ragged shape (partial panels, odd `k`), on 1-3 threads.
    #[test]
    fn matches_libtorch() {
        if !kernels_run_here() {
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
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
                    (7, 48, 33),
                    (100, 40, 48),
                    (1, 20, 33),
                    (1, 261, 19),
                    (13, 40, 2),
                    (25, 70, 9),
                    (49, 100, 64),
                ] {
                    let (x, w) = (random(&[m, k], kind), random(&[n, k], kind));
                    let want = x
                        .to_kind(Kind::Float)
                        .linear::<Tensor>(&w.to_kind(Kind::Float), None);
                    for packed in packed_on_each_loop(&w) {
                        let kernel_loop = packed.kernel_loop();
                        assert_eq!(packed.size(), [n, k]);
                        let ours = packed.linear(&x).unwrap();
                        assert_eq!(ours.size(), [m, n]);
                        assert_eq!(ours.kind(), kind);
                        let tolerance = if kind == Kind::Float { 1e-4 } else { 2e-2 };
                        let diff = (ours.to_kind(Kind::Float) - &want)
                            .abs()
                            .max()
                            .double_value(&[]);
                        let scale = want.abs().max().double_value(&[]).max(1.0);
                        assert!(
                            diff <= tolerance * scale,
                            "{kind:?} {kernel_loop:?} m={m} n={n} k={k} threads={threads}: off by \
                             {diff} (scale {scale})"
                        );
                    }
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// A row's result is bit-identical whatever it is batched with (alone, in groups of four
    /// to twelve rows, in a second sweep) and however many threads run, on every loop.
    #[test]
    fn batch_invariant() {
        if !kernels_run_here() {
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
        tch::manual_seed(1);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let (x, w) = (random(&[64, 300], kind), random(&[203, 300], kind));
            for packed in packed_on_each_loop(&w) {
                rows_do_not_depend_on_their_batch(&packed, &x);
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// Rows 5, 50 and 63 of `x` alone on one thread, and batched in 8-64 rows on two.
    fn rows_do_not_depend_on_their_batch(packed: &PackedWeight, x: &Tensor) {
        let (kernel_loop, kind) = (packed.kernel_loop(), packed.kind());
        crate::cpu::set_threads(1).unwrap();
        let alone: Vec<Tensor> = [5, 50, 63]
            .iter()
            .map(|&i| packed.linear(&x.narrow(0, i, 1)).unwrap())
            .collect();
        crate::cpu::set_threads(2).unwrap();
        for m in [8, 32, 53, 64] {
            let batched = packed.linear(&x.narrow(0, 0, m)).unwrap();
            for (&i, alone) in [5, 50, 63].iter().zip(&alone) {
                if i < m {
                    assert!(
                        alone.equal(&batched.narrow(0, i, 1)),
                        "{kind:?} {kernel_loop:?} row {i} of {m}"
                    );
                }
            }
        }
    }

    /// The AVX-512F loop gives the AVX2 loop's bits (the same multiply-add chains), for f32 and
    /// f16 weights, every group size and ragged panels, on 1-2 threads.
    #[test]
    fn wide_fma_equals_avx2_bit_for_bit() {
        if !kernels_run_here() {
            return;
        }
        if !crate::cpu::cpu_has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512F");
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
        tch::manual_seed(3);
        for threads in [1, 2] {
            crate::cpu::set_threads(threads).unwrap();
            for kind in [Kind::Float, Kind::Half] {
                for (m, n, k) in [
                    (2, 16, 8),
                    (7, 37, 70),
                    (12, 64, 33),
                    (13, 100, 64),
                    (50, 261, 19),
                ] {
                    let (x, w) = (random(&[m, k], kind), random(&[n, k], kind));
                    let narrow = PackedWeight::pack_for(&w, Loop::Avx2Fma).unwrap().unwrap();
                    let wide = PackedWeight::pack_for(&w, Loop::Avx512Fma)
                        .unwrap()
                        .unwrap();
                    assert_eq!(wide.kernel_loop(), Loop::Avx512Fma);
                    let (a, b) = (narrow.linear(&x).unwrap(), wide.linear(&x).unwrap());
                    assert!(a.equal(&b), "{kind:?} m={m} n={n} k={k} threads={threads}");
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
    }

    /// `pack` takes the AVX-512 BF16 loop for bf16 weights exactly where it runs and
    /// `--cpu-kernels` allows it, and the AVX2 loop for the other dtypes.
    #[test]
    fn pack_takes_the_widest_loop_allowed() {
        if !kernels_run_here() {
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
        let w = |kind| Tensor::ones([20, 8], (kind, Device::Cpu));
        let wide = crate::cpu::cpu_has_avx512_bf16();
        let loop_of = |kind| packed(&w(kind)).kernel_loop();
        assert_eq!(
            loop_of(Kind::BFloat16),
            if wide {
                Loop::Avx512Bf16
            } else {
                Loop::Avx2Fma
            }
        );
        let fma = if crate::cpu::cpu_has_avx512() {
            Loop::Avx512Fma
        } else {
            Loop::Avx2Fma
        };
        assert_eq!(loop_of(Kind::Float), fma);
        assert_eq!(loop_of(Kind::Half), fma);
        crate::cpu::set_cpu_kernels(crate::cpu::CpuKernels::Avx2);
        let limited = [Kind::BFloat16, Kind::Float, Kind::Half].map(loop_of);
        let path = crate::cpu::cpu_kernel_path();
        crate::cpu::set_cpu_kernels(crate::cpu::CpuKernels::On);
        assert_eq!(limited, [Loop::Avx2Fma; 3]);
        assert_eq!(path, "caravan AVX2/FMA (--cpu-kernels avx2)");
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let ints = Tensor::zeros([4, 8], (Kind::Int, Device::Cpu));
        assert!(PackedWeight::pack(&ints).unwrap().is_none());
        let no_rows = Tensor::zeros([0, 8], (Kind::Float, Device::Cpu));
        assert!(PackedWeight::pack(&no_rows).unwrap().is_none());
        let vector = Tensor::zeros([8], (Kind::Float, Device::Cpu));
        assert!(PackedWeight::pack(&vector).unwrap().is_none());
    }

    #[test]
    fn refuses_mismatched_inputs() {
        if !kernels_run_here() {
            return;
        }
        let packed = packed(&Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)));
        let wrong_width = Tensor::zeros([1, 7], (Kind::Float, Device::Cpu));
        assert!(packed.linear(&wrong_width).is_err());
        let wrong_kind = Tensor::zeros([1, 8], (Kind::BFloat16, Device::Cpu));
        assert!(packed.linear(&wrong_kind).is_err());
        tch::manual_seed(5);
        let w = random(&[20, 8], Kind::Float);
        let strided = random(&[8, 3], Kind::Float).t_();
        let y = super::PackedWeight::pack(&w)
            .unwrap()
            .unwrap()
            .linear(&strided)
            .unwrap();
        let want = strided.linear::<Tensor>(&w, None);
        assert!(y.allclose(&want, 1e-5, 1e-5, false));
    }
}
