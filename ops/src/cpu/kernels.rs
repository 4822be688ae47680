//! Whether a CPU rank computes with Caravan's own kernels or with libtorch alone.
//!
//! With the kernels off, every weight product, RMSNorm, rotary embedding and the paged-KV
//! attention run through libtorch (`matmul`, the gathered SDPA), the same calls a GPU rank makes.
//! That path is tested against transformers on CPUs, so a GPU adds only the device. Set once per
//! process, before the model loads (weights are packed for the kernels at load).

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicBool, Ordering},
};

static OFF: AtomicBool = AtomicBool::new(false);

/// `--cpu-kernels`: `on` (the default) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernels {
    /// Caravan's kernels where this CPU runs them (AVX2, FMA, F16C), libtorch elsewhere.
    #[default]
    On,
    /// libtorch for everything: the device-generic path.
    Off,
}

impl FromStr for CpuKernels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "on" => Ok(CpuKernels::On),
            "off" => Ok(CpuKernels::Off),
            other => Err(format!("{other:?} is not a CPU kernel setting (on or off)")),
        }
    }
}

impl fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuKernels::On => "on",
            CpuKernels::Off => "off",
        })
    }
}

/// Sets the kernels for this process; call before loading a model.
pub fn set_cpu_kernels(kernels: CpuKernels) {
    OFF.store(kernels == CpuKernels::Off, Ordering::Relaxed);
}

/// This process's setting ([`set_cpu_kernels`]).
pub fn cpu_kernels() -> CpuKernels {
    if enabled() {
        CpuKernels::On
    } else {
        CpuKernels::Off
    }
}

/// Whether the kernels may run (not switched off); whether this CPU can run them is asked
/// separately.
pub(crate) fn enabled() -> bool {
    !OFF.load(Ordering::Relaxed)
}

/// What computes a CPU rank's products in this process, in words for logs and reports.
pub fn cpu_kernel_path() -> &'static str {
    if !enabled() {
        "libtorch (--cpu-kernels off)"
    } else if super::kernels_run_here() {
        "caravan AVX2/FMA"
    } else {
        "libtorch (this CPU has no AVX2/FMA/F16C)"
    }
}

#[cfg(test)]
mod tests {
    use super::CpuKernels;

    #[test]
    fn settings_parse_and_print() {
        assert_eq!("off".parse::<CpuKernels>(), Ok(CpuKernels::Off));
        assert_eq!("ON".parse::<CpuKernels>(), Ok(CpuKernels::On));
        assert!("auto".parse::<CpuKernels>().is_err());
        assert_eq!(CpuKernels::Off.to_string(), "off");
    }
}
