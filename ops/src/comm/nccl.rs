//! NCCL collectives for GPU ranks, through cudarc's bindings (libnccl is loaded at run time from the
//! torch wheel's `nvidia-nccl-cu13`, so CPU-only machines build and run without it).
//!
//! Collectives are enqueued on the legacy default stream, the one libtorch uses unless told
//! otherwise, so they are ordered after the kernels that produced their inputs. A watchdog then
//! waits for the stream with a deadline: a dead or stalled peer makes NCCL spin forever, so on
//! timeout (or an asynchronous NCCL error) the communicator is aborted and the call returns an
//! error. After that the group must be formed again, as with the TCP ring.

use std::{
    ffi::c_void,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use cudarc::{
    driver::sys as cu,
    nccl::{result, sys},
};
use tch::{Device, Kind, Tensor};

use super::nccl_id::{NcclId, NCCL_ID_BYTES};
use crate::{Error, Result};

/// Creates a fresh group id (loads libnccl): rank 0's part of forming a group.
pub fn new_id() -> Result<NcclId> {
    let raw = result::get_uniqueid().map_err(|e| nccl_error("get_unique_id", e))?;
    let mut id = [0u8; NCCL_ID_BYTES];
    for (out, &b) in id.iter_mut().zip(raw.internal.iter()) {
        *out = b as u8;
    }
    Ok(NcclId(id))
}

fn raw_id(id: &NcclId) -> sys::ncclUniqueId {
    let mut raw = sys::ncclUniqueId {
        internal: [0; NCCL_ID_BYTES],
    };
    for (out, &b) in raw.internal.iter_mut().zip(id.0.iter()) {
        *out = b as core::ffi::c_char;
    }
    raw
}

fn nccl_error(op: &'static str, e: result::NcclError) -> Error {
    Error::Collective {
        op,
        reason: format!("NCCL: {e:?}"),
    }
}

/// A rank of an NCCL communicator on the current CUDA device.
pub struct Nccl {
    comm: sys::ncclComm_t,
    device: Device,
    rank: usize,
    world: usize,
    timeout: Duration,
    broken: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; Caravan's rank thread is its only user and the `Communicator` is never shared across
// threads for concurrent calls (the model that owns it is single-threaded).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the group `id` as `rank` of `world` on `device`, which must be a CUDA device.
    pub fn new(
        rank: usize,
        world: usize,
        id: &NcclId,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        // Any CUDA op makes libtorch set the device's context current on this thread, which NCCL
        // and the watchdog's stream queries use.
        let _ = Tensor::f_zeros([1], (Kind::Float, device))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; NCCL fills it on success.
        unsafe { result::comm_init_rank(&mut comm, world as i32, raw_id(id), rank as i32) }
            .map_err(|e| nccl_error("init", e))?;
        Ok(Nccl {
            comm,
            device,
            rank,
            world,
            timeout,
            broken: AtomicBool::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The GPU this rank's tensors live on.
    pub fn device(&self) -> Device {
        self.device
    }

    fn dtype(kind: Kind, op: &'static str) -> Result<sys::ncclDataType_t> {
        match kind {
            Kind::Float => Ok(sys::ncclDataType_t::ncclFloat32),
            Kind::Half => Ok(sys::ncclDataType_t::ncclFloat16),
            Kind::BFloat16 => Ok(sys::ncclDataType_t::ncclBfloat16),
            other => Err(Error::Collective {
                op,
                reason: format!("NCCL path does not handle {other:?}"),
            }),
        }
    }

    /// Enqueues a collective with `launch`, then waits for it under the watchdog.
    fn run(
        &self,
        op: &'static str,
        launch: impl FnOnce() -> std::result::Result<result::NcclStatus, result::NcclError>,
    ) -> Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Collective {
                op,
                reason: "the NCCL group failed earlier; the group must be formed again".into(),
            });
        }
        if let Err(e) = launch() {
            self.abort();
            return Err(nccl_error(op, e));
        }
        self.wait(op)
    }

    fn wait(&self, op: &'static str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let spin_until = Instant::now() + Duration::from_micros(500);
        loop {
            // SAFETY: querying the legacy default stream of the current context.
            let status = unsafe { cu::cuStreamQuery(std::ptr::null_mut()) };
            match status {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    self.abort();
                    return Err(Error::Collective {
                        op,
                        reason: format!("CUDA: {other:?}"),
                    });
                }
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is a live communicator; `async_error` a valid out-pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_error) };
            if async_error != sys::ncclResult_t::ncclSuccess
                && async_error != sys::ncclResult_t::ncclInProgress
            {
                self.abort();
                return Err(Error::Collective {
                    op,
                    reason: format!("NCCL: {async_error:?}"),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                self.abort();
                return Err(Error::CollectiveTimeout {
                    op,
                    peer: (self.rank + 1) % self.world,
                    timeout_ms: self.timeout.as_millis(),
                });
            }
            if now < spin_until {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn abort(&self) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            // SAFETY: aborting a live communicator once; it is not used afterwards.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }

    /// Sums a contiguous CUDA tensor over all ranks, in place.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        let dtype = Self::dtype(tensor.kind(), "all_reduce")?;
        let ptr = tensor.data_ptr();
        let count = tensor.numel();
        self.run("all_reduce", || unsafe {
            // SAFETY: `ptr` addresses `count` elements of a contiguous device tensor kept alive
            // by the caller until `wait` returns.
            result::all_reduce(
                ptr as *const c_void,
                ptr,
                count,
                dtype,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        })
    }

    /// Gathers `local` from every rank into `out` (`world * local.numel()` elements, rank order).
    pub fn all_gather(&self, local: &Tensor, out: &Tensor) -> Result<()> {
        let dtype = Self::dtype(local.kind(), "all_gather")?;
        let (src, dst, count) = (local.data_ptr(), out.data_ptr(), local.numel());
        self.run("all_gather", || unsafe {
            // SAFETY: both are contiguous device tensors of the stated sizes, alive until `wait`.
            result::all_gather(
                src as *const c_void,
                dst,
                count,
                dtype,
                self.comm,
                std::ptr::null_mut(),
            )
        })
    }

    /// Copies rank `root`'s tensor to every rank, in place.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        let dtype = Self::dtype(tensor.kind(), "broadcast")?;
        let ptr = tensor.data_ptr();
        let count = tensor.numel();
        self.run("broadcast", || unsafe {
            // SAFETY: as in `all_reduce_sum`.
            result::broadcast(
                ptr as *const c_void,
                ptr,
                count,
                dtype,
                root as i32,
                self.comm,
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if !self.broken.load(Ordering::Acquire) {
            // SAFETY: the communicator is live and no collective is in flight (calls wait).
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_convert_to_nccls_bytes_and_back_without_a_gpu() {
        let mut bytes = [0u8; NCCL_ID_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37);
        }
        let raw = raw_id(&NcclId(bytes));
        assert!(raw
            .internal
            .iter()
            .zip(bytes.iter())
            .all(|(&r, &b)| r as u8 == b));
    }
}
