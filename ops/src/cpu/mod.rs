//! CPU execution: how many threads a rank computes with, and the decode matrix-vector products
//! that run on them.
//!
//! libtorch parallelises a matrix product over its rows of *input* (tokens), so a decode step's
//! one-token products run on one core however many intra-op threads it has (measured in
//! docs/BENCHMARKS.md, "Decode profile"). [`gemv`] instead splits the *weight's* rows across our
//! own pool, as llama.cpp does, and streams each weight once per step. Larger products (prefill)
//! stay with libtorch.

pub mod gemv;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::{Arc, Mutex};

static POOL: Mutex<Option<Arc<rayon::ThreadPool>>> = Mutex::new(None);

/// Sets the threads this process computes with: libtorch's intra-op threads and the pool the
/// decode products split their rows over. Process-wide, as libtorch's own setting is.
pub fn set_threads(threads: usize) -> crate::Result<()> {
    let threads = threads.max(1);
    tch::set_num_threads(threads as i32);
    let pool = if threads > 1 {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("caravan-gemv-{i}"))
            .build()
            .map_err(|e| crate::Error::Threads {
                threads,
                reason: e.to_string(),
            })?;
        Some(Arc::new(pool))
    } else {
        None
    };
    *POOL.lock().unwrap_or_else(|e| e.into_inner()) = pool;
    Ok(())
}

/// Restarts this process (same pid, arguments and environment) with `OMP_WAIT_POLICY=PASSIVE`
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
    let error = std::process::Command::new(std::env::current_exe()?)
        .arg0(arg0)
        .args(args)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    Err(error)
}

/// The pool set by [`set_threads`], or `None` for one thread (the caller's).
fn pool() -> Option<Arc<rayon::ThreadPool>> {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
