//! CPU execution: how many threads a rank computes with, and the weight products that run on
//! them.
//!
//! libtorch parallelises a matrix product over its rows of *input* (tokens), so a decode step's
//! one-token products run on one core however many intra-op threads it has (measured in
//! docs/BENCHMARKS.md, "Decode profile"). [`packed`] instead splits the *weight's* rows across
//! our own thread team, as llama.cpp does, reads each weight once per 48 tokens of a step, and reuses
//! every weight load for up to six of them. Where the CPU has AVX-512, bf16 weights run on
//! AVX-512 BF16 (`x86_bf16`, four times the multiply-adds per instruction) and f32/f16 products of
//! several rows on AVX-512F (`x86_avx512`, the same bits as AVX2). [`quantized`] does the same with weights quantized to
//! 8 or 4 bits (`--quantization int8|q4`). [`attention`] attends decoding tokens over the paged KV cache
//! where it lies.

pub mod attention;
mod kernels;
pub mod packed;
pub mod quantized;
pub mod rows;
mod team;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;
#[cfg(target_arch = "x86_64")]
mod x86_bf16;
#[cfg(target_arch = "x86_64")]
mod x86_quantized;

use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use tch::{Device, Kind, Tensor};

pub use kernels::{cpu_kernel_path, cpu_kernels, set_cpu_kernels, CpuKernels};

static TEAM: Mutex<Option<Arc<team::Team>>> = Mutex::new(None);

/// Whether the kernels here run: not switched off ([`set_cpu_kernels`]) and this CPU has what
/// they need (x86-64 with AVX2, FMA and F16C; detected once).
fn kernels_run_here() -> bool {
    kernels::enabled() && cpu_has_kernel_features()
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_kernel_features() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(x86::available)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_kernel_features() -> bool {
    false
}

/// Whether bf16 weights are packed for the AVX-512 BF16 loop: the kernels run, `--cpu-kernels`
/// allows loops wider than AVX2, and this CPU has AVX-512F and AVX-512 BF16.
fn avx512_bf16_runs_here() -> bool {
    kernels_run_here() && kernels::wider_than_avx2() && cpu_has_avx512_bf16()
}

/// Whether f32 and f16 products of several rows take the AVX-512F loop: as above, for AVX-512F.
fn avx512_runs_here() -> bool {
    kernels_run_here() && kernels::wider_than_avx2() && cpu_has_avx512()
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512_bf16() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(x86_bf16::available)
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(x86_avx512::available)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512_bf16() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512() -> bool {
    false
}

/// Sets the threads this process computes with: libtorch's intra-op threads and the team the
/// products split their rows over. Process-wide, as libtorch's own setting is.
pub fn set_threads(threads: usize) -> crate::Result<()> {
    let threads = threads.max(1);
    tch::set_num_threads(threads as i32);
    // The thread that calls a product computes its share, so the team spawns the others.
    let team = if threads > 1 {
        let team = team::Team::new(threads).map_err(|e| crate::Error::Threads {
            threads,
            reason: e.to_string(),
        })?;
        Some(Arc::new(team))
    } else {
        None
    };
    *TEAM.lock().unwrap_or_else(|e| e.into_inner()) = team;
    Ok(())
}

/// Restarts this process (same pid, image, arguments and environment) with `OMP_WAIT_POLICY=PASSIVE`
/// unless the variable is already set. Call first thing in `main`, before any thread starts.
///
/// libtorch's OpenMP threads otherwise spin for a while after each parallel region, on the cores
/// the decode pool needs: on two cores that cost a third of decode speed (33.7 against 46.3
/// tok/s, docs/BENCHMARKS.md). libgomp reads the variable once, when the process loads it, so
/// setting it from `main` is too late; hence the `exec`. Returns only when no restart was needed
/// or it failed (the error says why; the process still works, only slower).
pub fn restart_with_passive_openmp() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return Ok(());
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // /proc/self/exe is this process's image even if its file was replaced or deleted since.
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    Err(error)
}

/// The team set by [`set_threads`], or `None` for one thread (the caller's).
fn team() -> Option<Arc<team::Team>> {
    TEAM.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// An element type CPU tensors hold that the kernels here read and write through f32.
pub trait Scalar: Copy + Send + Sync + 'static {
    const KIND: Kind;
    fn to_f32(self) -> f32;
    fn from_f32(value: f32) -> Self;
}

impl Scalar for f32 {
    const KIND: Kind = Kind::Float;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        value
    }
}

impl Scalar for bf16 {
    const KIND: Kind = Kind::BFloat16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    /// Round to nearest even, as libtorch converts.
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl Scalar for f16 {
    const KIND: Kind = Kind::Half;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(value: f32) -> Self {
        f16::from_f32(value)
    }
}

/// Whether `t` is a contiguous CPU tensor that [`elements`] can read as `kind`.
fn is_plain(t: &Tensor, kind: Kind) -> bool {
    t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous()
}

/// The elements of `t`, which must be a contiguous CPU tensor of `T::KIND` (panics otherwise).
fn elements<T: Scalar>(t: &Tensor) -> &[T] {
    assert!(
        is_plain(t, T::KIND),
        "not a contiguous CPU {:?} tensor",
        T::KIND
    );
    if t.numel() == 0 {
        return &[]; // an empty tensor's data pointer may be null
    }
    // SAFETY: `t` is contiguous on the CPU and holds `numel` values of `T`'s layout (f32, bf16
    // and f16 are plain 4- and 2-byte values), alive for the borrow. Callers only pass tensors
    // nothing writes meanwhile: weights after loading, and a step's own activations.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// The elements of `t`, mutably: `t` must be a contiguous CPU tensor of `T::KIND` that nothing
/// else references (a fresh output).
fn elements_mut<T: Scalar>(t: &mut Tensor) -> &mut [T] {
    assert!(
        is_plain(t, T::KIND),
        "not a contiguous CPU {:?} tensor",
        T::KIND
    );
    if t.numel() == 0 {
        return &mut [];
    }
    // SAFETY: as in `elements`; the exclusive borrow of a tensor the caller just allocated means
    // no other view reads or writes its storage meanwhile.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

#[cfg(test)]
pub(crate) mod tests {
    use tch::{Device, Kind, Tensor};

    /// Held by every test that changes the thread count (a process-wide setting), so that tests
    /// running in parallel measure with the threads they set.
    pub static THREADS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Whether this CPU runs the kernels; a test that needs them says it skipped when not.
    pub fn kernels_run_here() -> bool {
        let runs = super::kernels_run_here();
        if !runs {
            eprintln!("skipped: this CPU has no AVX2/FMA/F16C");
        }
        runs
    }

    /// A standard-normal CPU tensor of `shape`, drawn in f32 and converted to `kind`.
    pub fn random(shape: &[i64], kind: Kind) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind)
    }
}
