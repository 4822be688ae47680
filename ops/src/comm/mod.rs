//! The communicator a tensor-parallel rank uses for its collectives, chosen at start-up.
//!
//! One enum, as in mistral.rs: `Single` (world size 1, every collective a no-op, so the
//! single-process path runs the same code), `TcpRing` (processes on CPUs, here or across hosts)
//! and, with the `cuda` feature, `Nccl` (GPU ranks). Layers call the tensor-level methods and never know which.

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod nccl_id;
pub mod tcp_ring;

use tch::{Device, Kind, Tensor};

pub use nccl_id::NcclId;
pub use tcp_ring::{ReduceType, RingListener, TcpRing};

use crate::{Error, Result};

/// A rank's view of its tensor-parallel group.
pub enum Communicator {
    /// A group of one: collectives return their input.
    Single,
    /// Processes joined by TCP in a ring.
    TcpRing(TcpRing),
    /// GPU ranks joined by NCCL.
    #[cfg(feature = "cuda")]
    Nccl(nccl::Nccl),
}

impl Communicator {
    /// Microseconds spent in collectives since the last call, and resets the count (TCP ring;
    /// NCCL collectives are asynchronous on the GPU stream and report 0).
    pub fn take_busy_micros(&self) -> u64 {
        match self {
            Communicator::TcpRing(ring) => ring.take_busy_micros(),
            _ => 0,
        }
    }

    pub fn rank(&self) -> usize {
        match self {
            Communicator::Single => 0,
            Communicator::TcpRing(ring) => ring.rank(),
            #[cfg(feature = "cuda")]
            Communicator::Nccl(nccl) => nccl.rank(),
        }
    }

    pub fn world_size(&self) -> usize {
        match self {
            Communicator::Single => 1,
            Communicator::TcpRing(ring) => ring.world_size(),
            #[cfg(feature = "cuda")]
            Communicator::Nccl(nccl) => nccl.world_size(),
        }
    }

    /// Sums `tensor` over all ranks; every rank gets the same result.
    pub fn all_reduce_sum(&self, tensor: Tensor) -> Result<Tensor> {
        match self {
            Communicator::Single => Ok(tensor),
            Communicator::TcpRing(ring) => {
                let ty = reduce_type(tensor.kind())?;
                let mut host = HostBuffer::from_tensor(&tensor)?;
                ring.all_reduce_sum(host.bytes_mut(), ty)?;
                host.into_device(tensor.device())
            }
            #[cfg(feature = "cuda")]
            Communicator::Nccl(nccl) => {
                let tensor = tensor.f_contiguous()?;
                nccl.all_reduce_sum(&tensor)?;
                Ok(tensor)
            }
        }
    }

    /// Concatenates every rank's `tensor` (same shape on all ranks) along a new leading dimension:
    /// the result has shape `[world_size, ..tensor.shape]`, rank order.
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        match self {
            Communicator::Single => Ok(tensor.f_unsqueeze(0)?),
            Communicator::TcpRing(ring) => {
                let mut local = HostBuffer::from_tensor(tensor)?;
                let mut shape = vec![ring.world_size() as i64];
                shape.extend(tensor.size());
                let out = Tensor::f_empty(shape.as_slice(), (tensor.kind(), Device::Cpu))?;
                let mut gathered = HostBuffer::from_tensor(&out)?;
                ring.all_gather(local.bytes_mut(), gathered.bytes_mut())?;
                gathered.into_device(tensor.device())
            }
            #[cfg(feature = "cuda")]
            Communicator::Nccl(nccl) => {
                let local = tensor.f_contiguous()?;
                let mut shape = vec![nccl.world_size() as i64];
                shape.extend(tensor.size());
                let out = Tensor::f_empty(shape.as_slice(), (tensor.kind(), tensor.device()))?;
                nccl.all_gather(&local, &out)?;
                Ok(out)
            }
        }
    }

    /// Makes every rank's `tensor` equal to rank `root`'s.
    pub fn broadcast(&self, tensor: Tensor, root: usize) -> Result<Tensor> {
        match self {
            Communicator::Single => Ok(tensor),
            Communicator::TcpRing(ring) => {
                let mut host = HostBuffer::from_tensor(&tensor)?;
                ring.broadcast(host.bytes_mut(), root)?;
                host.into_device(tensor.device())
            }
            #[cfg(feature = "cuda")]
            Communicator::Nccl(nccl) => {
                let tensor = tensor.f_contiguous()?;
                nccl.broadcast(&tensor, root)?;
                Ok(tensor)
            }
        }
    }

    /// Returns once every rank has arrived.
    pub fn barrier(&self) -> Result<()> {
        match self {
            Communicator::Single => Ok(()),
            Communicator::TcpRing(ring) => ring.barrier(),
            #[cfg(feature = "cuda")]
            Communicator::Nccl(nccl) => {
                let flag = Tensor::f_zeros([1], (Kind::Float, nccl.device()))?;
                nccl.all_reduce_sum(&flag)
            }
        }
    }
}

fn reduce_type(kind: Kind) -> Result<ReduceType> {
    match kind {
        Kind::Float => Ok(ReduceType::F32),
        Kind::Half => Ok(ReduceType::F16),
        Kind::BFloat16 => Ok(ReduceType::BF16),
        other => Err(Error::Collective {
            op: "all_reduce",
            reason: format!("cannot sum tensors of kind {other:?}"),
        }),
    }
}

/// A contiguous CPU tensor whose bytes the TCP ring reads and writes in place.
struct HostBuffer {
    tensor: Tensor,
}

impl HostBuffer {
    /// A contiguous CPU copy of `tensor`, or `tensor` itself when it already is one.
    fn from_tensor(tensor: &Tensor) -> Result<Self> {
        let tensor = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
        Ok(HostBuffer { tensor })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.tensor.numel() * self.tensor.kind().elt_size_in_bytes();
        if len == 0 {
            return &mut [];
        }
        // SAFETY: the tensor is contiguous, on the CPU and owned by `self` for the borrow's
        // lifetime; `data_ptr` points at its first element (storage offset included) and the
        // storage holds `numel * element size` bytes from there.
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr() as *mut u8, len) }
    }

    fn into_device(self, device: Device) -> Result<Tensor> {
        Ok(self.tensor.f_to_device(device)?)
    }
}
