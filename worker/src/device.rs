//! The device a rank computes on: `--device` parsed, its memory, and checked against what this
//! binary and this machine can use, so that a rank that cannot use it refuses at start-up with one line
//! (exit status [`caravan_proto::WORKER_EXIT_REFUSED`]) instead of failing inside libtorch at
//! the first tensor.

use caravan_ops::MemoryInfo;
use tch::Device;

/// Parses `cpu`, `cuda` (`None`: a GPU the caller picks, e.g. rank % count) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Option<Device>, String> {
    match s {
        "cpu" => Ok(Some(Device::Cpu)),
        "cuda" => Ok(None),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(|n| Some(Device::Cuda(n)))
            .ok_or_else(|| format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
    }
}

/// Checks that this process can compute on `device`; the error is one line for the operator.
pub fn check_usable(device: Device) -> Result<(), String> {
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "--device cuda:{index}: this binary was built without GPU support; build it with \
             `cargo build --release --features cuda` (see the README's GPU section)"
        ));
    }
    let count = tch::Cuda::device_count();
    if count <= 0 {
        return Err(format!(
            "--device cuda:{index}: libtorch sees no GPU on this machine (check the NVIDIA \
             driver, `nvidia-smi` and CUDA_VISIBLE_DEVICES)"
        ));
    }
    if index as i64 >= count {
        return Err(format!(
            "--device cuda:{index}: out of range, libtorch sees {count} GPU(s) (cuda:0 to \
             cuda:{})",
            count - 1
        ));
    }
    Ok(())
}

/// How registration and status name `device`: `cpu` or `cuda:N`.
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".into(),
    }
}

/// The memory of `device` now: the GPU's own on CUDA, the host's (cgroup-capped) on CPU.
pub fn memory(device: Device) -> Result<MemoryInfo, String> {
    match device {
        Device::Cuda(index) => {
            caravan_ops::device_memory::cuda_memory(index).map_err(|e| e.to_string())
        }
        _ => Ok(crate::host::memory()),
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::{check_usable, parse_device};

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu"), Ok(Some(Device::Cpu)));
        assert_eq!(parse_device("cuda"), Ok(None));
        assert_eq!(parse_device("cuda:3"), Ok(Some(Device::Cuda(3))));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CPU"] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cpu_is_always_usable() {
        assert_eq!(check_usable(Device::Cpu), Ok(()));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_refuses_gpus_with_one_line() {
        for index in [0, 7] {
            let why = check_usable(Device::Cuda(index)).unwrap_err();
            assert!(why.contains(&format!("cuda:{index}")), "{why}");
            assert!(why.contains("--features cuda"), "{why}");
            assert!(!why.contains('\n'), "{why}");
        }
    }
}
