//! Whether a CPU rank computes with Caravan's own kernels or with libtorch alone, and which of
//! the kernels' loops this CPU runs.
//!
//! With the kernels off, every weight product, RMSNorm, rotary embedding and the paged-KV
//! attention run through libtorch (`matmul`, the gathered SDPA), the same calls a GPU rank makes.
//! That path is tested against transformers on CPUs, so a GPU adds only the device. Set once per
//! process, before the model loads (weights are packed for the kernels at load).

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicU8, Ordering},
};

/// The process's [`CpuKernels`], as its index in [`CpuKernels::ALL`].
static SETTING: AtomicU8 = AtomicU8::new(0);

/// `--cpu-kernels`: `on` (the default), `avx2` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernels {
    /// Caravan's kernels where this CPU runs them (AVX2, FMA, F16C), each product on the fastest
    /// loop the CPU has (AVX-512 BF16 for bf16 weights), libtorch elsewhere.
    #[default]
    On,
    /// Caravan's kernels on their AVX2/FMA loops only, whatever else the CPU has: the baseline
    /// that the wider loops are measured and tested against.
    Avx2,
    /// libtorch for everything: the device-generic path.
    Off,
}

impl CpuKernels {
    const ALL: [CpuKernels; 3] = [CpuKernels::On, CpuKernels::Avx2, CpuKernels::Off];
}

impl FromStr for CpuKernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "on" => Ok(CpuKernels::On),
            "avx2" => Ok(CpuKernels::Avx2),
            "off" => Ok(CpuKernels::Off),
            other => Err(format!(
                "{other:?} is not a CPU kernel setting (on, avx2 or off)"
            )),
        }
    }
}

impl fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuKernels::On => "on",
            CpuKernels::Avx2 => "avx2",
            CpuKernels::Off => "off",
        })
    }
}

/// Sets the kernels for this process; call before loading a model.
pub fn set_cpu_kernels(kernels: CpuKernels) {
    let index = CpuKernels::ALL.iter().position(|&k| k == kernels);
    SETTING.store(index.unwrap_or_default() as u8, Ordering::Relaxed);
}

/// This process's setting ([`set_cpu_kernels`]).
pub fn cpu_kernels() -> CpuKernels {
    CpuKernels::ALL[usize::from(SETTING.load(Ordering::Relaxed)).min(2)]
}

/// Whether the kernels may run (not switched off); whether this CPU can run them is asked
/// separately.
pub(crate) fn enabled() -> bool {
    cpu_kernels() != CpuKernels::Off
}

/// Whether loops wider than AVX2 may run (`on`); whether this CPU has them is asked separately.
pub(crate) fn wider_than_avx2() -> bool {
    cpu_kernels() == CpuKernels::On
}

/// What computes a CPU rank's products in this process, in words for logs and reports: the
/// kernels' loops this CPU runs and the setting allows, widest first, or libtorch.
pub fn cpu_kernel_path() -> String {
    if !enabled() {
        return "libtorch (--cpu-kernels off)".into();
    }
    if !super::kernels_run_here() {
        return "libtorch (this CPU has no AVX2/FMA/F16C)".into();
    }
    if cpu_kernels() == CpuKernels::Avx2 {
        return "caravan AVX2/FMA (--cpu-kernels avx2)".into();
    }
    let mut loops = Vec::new();
    if super::avx512_bf16_runs_here() {
        loops.push("AVX-512 BF16 (bf16)");
    }
    if super::avx512_runs_here() {
        loops.push("AVX-512F (f32/f16 batches)");
    }
    let dot = super::quantized::best_dot();
    let quantized = format!("{} (int8/q4)", dot.name());
    if dot != super::quantized::Dot::Avx2 {
        loops.push(&quantized);
    }
    loops.push("AVX2/FMA");
    format!("caravan {}", loops.join(", "))
}

#[cfg(test)]
mod tests {
    use super::CpuKernels;

    #[test]
    fn settings_parse_and_print() {
        assert_eq!("off".parse::<CpuKernels>(), Ok(CpuKernels::Off));
        assert_eq!("ON".parse::<CpuKernels>(), Ok(CpuKernels::On));
        assert_eq!("avx2".parse::<CpuKernels>(), Ok(CpuKernels::Avx2));
        assert!("auto".parse::<CpuKernels>().is_err());
        assert_eq!(CpuKernels::Off.to_string(), "off");
    }
}
