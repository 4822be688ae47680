//! A rank's part in an NCCL group: rank 0 makes the group's id (served: `NewNcclId`), and every
//! rank joins with it (served: in `LoadShard`), within the collective timeout. `caravan-generate`'s
//! local groups use the same two steps. Built without the `cuda`
//! feature, a worker refuses both with FAILED_PRECONDITION; a damaged id is INVALID_ARGUMENT
//! whatever the build.

use std::time::Duration;

use caravan_ops::{comm::NcclId, Communicator};
use tch::Device;
use tonic::Status;

/// A fresh NCCL id, as hex.
pub fn new_id() -> Result<String, Status> {
    #[cfg(feature = "cuda")]
    {
        caravan_ops::comm::nccl::new_id()
            .map(|id| id.to_hex())
            .map_err(|e| Status::unavailable(format!("making an NCCL id: {e}")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(without_cuda())
    }
}

/// Joins the NCCL group `id_hex` as `rank` of `world` on `device`, whose collectives then fail
/// after `timeout` rather than hang.
///
/// NCCL's initialisation blocks until every rank has joined and cannot be cancelled, so it runs
/// on a thread of its own: past `timeout` (a peer that never joined), the load fails with
/// DEADLINE_EXCEEDED and the coordinator forms the group again; the abandoned thread ends when
/// NCCL gives up on its bootstrap.
pub fn join(
    rank: usize,
    world: usize,
    id_hex: &str,
    device: Device,
    timeout: Duration,
) -> Result<Communicator, Status> {
    let id = NcclId::from_hex(id_hex).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if !device.is_cuda() {
        return Err(Status::failed_precondition(format!(
            "an NCCL group needs CUDA ranks; this worker computes on {device:?}"
        )));
    }
    connect(rank, world, id, device, timeout)
}

#[cfg(feature = "cuda")]
fn connect(
    rank: usize,
    world: usize,
    id: NcclId,
    device: Device,
    timeout: Duration,
) -> Result<Communicator, Status> {
    use caravan_ops::comm::nccl::Nccl;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nccl-init".into())
        .spawn(move || {
            let _ = tx.send(Nccl::new(rank, world, &id, device, timeout));
        })
        .map_err(|e| Status::internal(format!("starting the NCCL init thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(nccl)) => Ok(Communicator::Nccl(nccl)),
        Ok(Err(e)) => Err(Status::unavailable(format!("joining the NCCL group: {e}"))),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "joining the NCCL group as rank {rank} of {world}: not every rank joined within \
             {timeout:?}"
        ))),
    }
}

#[cfg(not(feature = "cuda"))]
fn connect(_: usize, _: usize, _: NcclId, _: Device, _: Duration) -> Result<Communicator, Status> {
    Err(without_cuda())
}

#[cfg(not(feature = "cuda"))]
fn without_cuda() -> Status {
    Status::failed_precondition(
        "this worker was built without --features cuda: it cannot take part in an NCCL group",
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Device;
    use tonic::{Code, Status};

    use super::join;

    /// Joins with a one-second deadline, expecting a refusal.
    fn refused(id: &str, device: Device) -> Status {
        match join(0, 2, id, device, Duration::from_secs(1)) {
            Ok(_) => panic!("joined an NCCL group with {id:?} on {device:?}"),
            Err(status) => status,
        }
    }

    #[test]
    fn a_damaged_id_is_an_invalid_argument_on_any_build() {
        for bad in ["", "zz", &"é".repeat(128), &"0".repeat(255)] {
            let status = refused(bad, Device::Cuda(0));
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status}");
        }
    }

    #[test]
    fn a_cpu_rank_refuses_an_nccl_group() {
        let id = "00".repeat(128);
        let status = refused(&id, Device::Cpu);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("CUDA"), "{status}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_refuses_to_make_or_join_a_group() {
        let id = "00".repeat(128);
        for status in [super::new_id().unwrap_err(), refused(&id, Device::Cuda(0))] {
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert!(status.message().contains("--features cuda"), "{status}");
        }
    }
}
