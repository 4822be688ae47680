//! Weights repacked at load time for Caravan's own CPU matrix product: `x W^T` for any number of
//! rows of `x`, the weight's rows split across the team so every core streams its own part.
//!
//! A `[n, k]` weight is stored as panels of sixteen rows, k-major (`[n / 16][k][16]`): one load
//! gives sixteen outputs' weights for one `k`, and each such load feeds up to six activation
//! rows (see `x86::panels`). With one row (a single-stream decode) each thread reads its panels
//! two at a time, front to back; with many, the product is bound by arithmetic, not memory.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// A weight in the panel layout; the dense tensor it came from is not kept.
pub struct PackedWeight {
    values: Values,
    /// Output features (rows of the dense weight).
    n: usize,
    /// Input features.
    k: usize,
}

enum Values {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

impl PackedWeight {
    /// `weight` (`[n, k]`) repacked, when Caravan's kernel runs it: a CPU tensor of f32, bf16 or
    /// f16 on a CPU with AVX2, FMA and F16C. `None` otherwise, for libtorch.
    pub fn pack(weight: &Tensor) -> Result<Option<PackedWeight>> {
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
        let values = match weight.kind() {
            Kind::Float => Values::F32(imp::pack(&weight, n, k)),
            Kind::BFloat16 => Values::Bf16(imp::pack(&weight, n, k)),
            _ => Values::F16(imp::pack(&weight, n, k)),
        };
        Ok(Some(PackedWeight { values, n, k }))
    }

    /// `[n, k]`, the dense weight's shape.
    pub fn size(&self) -> [i64; 2] {
        [self.n as i64, self.k as i64]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => 4 * v.len(),
            Values::Bf16(v) => 2 * v.len(),
            Values::F16(v) => 2 * v.len(),
        }
    }

    /// The dense weight's dtype, which is also what [`PackedWeight::linear`] takes and returns.
    pub fn kind(&self) -> Kind {
        match self.values {
            Values::F32(_) => Kind::Float,
            Values::Bf16(_) => Kind::BFloat16,
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
        match &self.values {
            Values::F32(w) => imp::product(w, self.n, self.k, &x, &mut y),
            Values::Bf16(w) => imp::product(w, self.n, self.k, &x, &mut y),
            Values::F16(w) => imp::product(w, self.n, self.k, &x, &mut y),
        }
        Ok(y)
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use tch::Tensor;

    use crate::cpu::{
        elements, elements_mut, team,
        x86::{self, Element, Out, PANEL},
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

    /// The panels in runs, about four per thread, claimed by whichever thread of the team is
    /// free (the caller's included); a run's thread writes its columns of every row of `y`.
    /// Which thread computes a panel does not change its values.
    pub fn product<W: Element>(w: &[W], n: usize, k: usize, x: &Tensor, y: &mut Tensor) {
        // f32 activations are read in place; 16-bit ones are widened once, not per panel.
        let widened: Vec<f32>;
        let x: &[f32] = match W::KIND {
            tch::Kind::Float => elements::<f32>(x),
            _ => {
                widened = elements::<W>(x).iter().map(|v| v.to_f32()).collect();
                &widened
            }
        };
        let m = x.len() / k;
        if m == 0 {
            return;
        }
        let y = elements_mut::<W>(y);
        let out = Out {
            ptr: y.as_mut_ptr(),
            stride: n,
        };
        let panels = n.div_ceil(PANEL);
        let out = &out; // shared whole (its fields alone would not be Sync)
        let run = |range: std::ops::Range<usize>| {
            let (first, last) = (range.start, range.end);
            let columns = (n - first * PANEL).min((last - first) * PANEL);
            let out = Out {
                // SAFETY: column first * PANEL < n of row 0 of `y`.
                ptr: unsafe { out.ptr.add(first * PANEL) },
                stride: out.stride,
            };
            let w = &w[first * k * PANEL..last * k * PANEL];
            // SAFETY: `kernels_run_here()` was checked when packing; only this run writes
            // columns first * PANEL .. first * PANEL + columns of rows 0..m, inside `y`
            // (`[m, n]`), and runs do not overlap.
            unsafe { x86::panels(w, k, x, m, &out, columns) }
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

    pub fn product<W>(_: &[W], _: usize, _: usize, _: &Tensor, _: &mut Tensor) {
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

    /// Our product against libtorch's, for every dtype, row count (even groups of up to six,
    /// sweeps of 48) and ragged shape (partial panels), on 1-3 threads.
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
                ] {
                    let (x, w) = (random(&[m, k], kind), random(&[n, k], kind));
                    let packed = packed(&w);
                    assert_eq!(packed.size(), [n, k]);
                    let ours = packed.linear(&x).unwrap();
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

    /// A row's result is bit-identical whatever it is batched with (alone, in groups of four,
    /// five or six rows, in a second sweep) and however many threads run.
    #[test]
    fn batch_invariant() {
        if !kernels_run_here() {
            return;
        }
        let _threads = crate::cpu::tests::THREADS.lock();
        tch::manual_seed(1);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let (x, w) = (random(&[64, 300], kind), random(&[203, 300], kind));
            let packed = packed(&w);
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
                            "{kind:?} row {i} of {m}"
                        );
                    }
                }
            }
        }
        crate::cpu::set_threads(1).unwrap();
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
