//! Free and total memory of a CUDA device, as its driver reports it (through cudarc): what sizes a
//! GPU rank's KV cache once its weights are loaded.

use crate::{Error, Result};

/// Free and total bytes of one device's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: u64,
    pub total: u64,
}

/// The memory of `cuda:index` now. Every process's allocations count against `free`, libtorch's
/// cached blocks included.
#[cfg(feature = "cuda")]
pub fn cuda_memory(index: usize) -> Result<MemoryInfo> {
    let failed = |e: cudarc::driver::DriverError| Error::DeviceMemory {
        device: format!("cuda:{index}"),
        reason: e.to_string(),
    };
    // The device's primary context: the one libtorch's runtime calls already made current.
    let context = cudarc::driver::CudaContext::new(index).map_err(failed)?;
    let (free, total) = context.mem_get_info().map_err(failed)?;
    Ok(MemoryInfo {
        free: free as u64,
        total: total as u64,
    })
}

/// Without `--features cuda` there is no CUDA device to ask.
#[cfg(not(feature = "cuda"))]
pub fn cuda_memory(index: usize) -> Result<MemoryInfo> {
    Err(Error::DeviceMemory {
        device: format!("cuda:{index}"),
        reason: "this binary was built without --features cuda".into(),
    })
}
