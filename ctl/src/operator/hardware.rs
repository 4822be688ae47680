//! The GPU and interconnect figures `caravanctl plan` reasons with, in one table.
//!
//! Memory is what `nvidia-smi` reports as total (MiB); bandwidth and peak dense 16-bit tensor
//! throughput are the vendors' datasheet figures (SXM parts where there is a choice). The
//! all-reduce latencies are the small-message (4–32 KB) times of NCCL's `all_reduce_perf` with one
//! process per GPU: about 25–30 µs on 8 NVLink A100s; PCIe and cross-node figures are estimates of
//! the same order, stated as such in docs/SCALING.md. Change a figure here and the whole planner
//! follows.

/// How GPUs inside one node talk to each other.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub name: &'static str,
    /// Bandwidth one GPU can send at, per direction, in GB/s (1e9 bytes).
    pub gbytes_per_s: f64,
    /// Time of one small all-reduce, in microseconds.
    pub allreduce_latency_us: f64,
}

/// NVLink 3 (A100): 12 links, 600 GB/s both directions together.
pub const NVLINK3: Link = Link {
    name: "NVLink 3",
    gbytes_per_s: 300.0,
    allreduce_latency_us: 25.0,
};

/// NVLink 4 (H100, H200): 18 links, 900 GB/s both directions together.
pub const NVLINK4: Link = Link {
    name: "NVLink 4",
    gbytes_per_s: 450.0,
    allreduce_latency_us: 20.0,
};

/// PCIe 4.0 x16, for cards without NVLink.
pub const PCIE4: Link = Link {
    name: "PCIe 4.0 x16",
    gbytes_per_s: 32.0,
    allreduce_latency_us: 30.0,
};

/// All-reduce latency across nodes (InfiniBand or RoCE); bandwidth comes from `--network-gbps`.
pub const NETWORK_ALLREDUCE_LATENCY_US: f64 = 50.0;

/// One GPU model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// The name `--gpu` takes.
    pub name: &'static str,
    /// Total memory as `nvidia-smi` reports it, in MiB.
    pub memory_mib: u64,
    /// Memory bandwidth, GB/s.
    pub hbm_gbytes_per_s: f64,
    /// Peak dense BF16/FP16 tensor throughput, TFLOP/s (FP32 runs as TF32 at half of it).
    pub tflops_16bit: f64,
    /// The link between GPUs of one node.
    pub link: Link,
}

impl Gpu {
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Every GPU the planner knows.
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "a100-40gb",
        memory_mib: 40_960,
        hbm_gbytes_per_s: 1555.0,
        tflops_16bit: 312.0,
        link: NVLINK3,
    },
    Gpu {
        name: "a100-80gb",
        memory_mib: 81_920,
        hbm_gbytes_per_s: 2039.0,
        tflops_16bit: 312.0,
        link: NVLINK3,
    },
    Gpu {
        name: "h100-80gb",
        memory_mib: 81_559,
        hbm_gbytes_per_s: 3350.0,
        tflops_16bit: 989.0,
        link: NVLINK4,
    },
    Gpu {
        name: "h200-141gb",
        memory_mib: 143_771,
        hbm_gbytes_per_s: 4800.0,
        tflops_16bit: 989.0,
        link: NVLINK4,
    },
    Gpu {
        name: "l40s-48gb",
        memory_mib: 46_068,
        hbm_gbytes_per_s: 864.0,
        tflops_16bit: 362.0,
        link: PCIE4,
    },
    Gpu {
        name: "a10-24gb",
        memory_mib: 23_028,
        hbm_gbytes_per_s: 600.0,
        tflops_16bit: 125.0,
        link: PCIE4,
    },
];

/// Looks up `--gpu NAME`, or lists the names it knows.
pub fn gpu(name: &str) -> Result<&'static Gpu, String> {
    GPUS.iter()
        .find(|g| g.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let known: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
            format!("unknown GPU {name:?}; known: {}", known.join(", "))
        })
}
