//! How many KV-cache blocks a rank allocates once its weights are loaded: the count the
//! coordinator gives, as many as a byte budget holds, or (on GPUs, as vLLM's
//! `--gpu-memory-utilization`) as many as the rank's share of its device's memory leaves beside
//! its weights and one step's scratch tensors.

use caravan_ops::MemoryInfo;
use tonic::Status;

/// What the coordinator asked for, from `LoadShard`.
#[derive(Debug, Clone, Copy)]
pub struct CacheRequest {
    /// Blocks to allocate; with a budget or a utilization, the most to allocate (0: no limit).
    pub blocks: u64,
    /// Bytes the cache may take (0: none given).
    pub budget_bytes: u64,
    /// Without a budget: the share of the device's total memory this rank's process may fill
    /// (0: none given).
    pub memory_utilization: f32,
    /// Ranks the device's share is divided among (0 is read as 1).
    pub device_sharers: u32,
}

/// What the rank knows once its weights are loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadedShard {
    pub weight_bytes: u64,
    /// An upper estimate of one step's transient tensors.
    pub scratch_bytes: u64,
    pub bytes_per_block: u64,
}

/// The number of blocks to allocate. `memory` is asked only when the size comes from the
/// device's memory.
pub fn cache_blocks(
    request: &CacheRequest,
    shard: &LoadedShard,
    memory: impl FnOnce() -> Result<MemoryInfo, String>,
) -> Result<u64, Status> {
    let per_block = shard.bytes_per_block.max(1);
    let budget = if request.budget_bytes > 0 {
        request.budget_bytes
    } else if request.memory_utilization != 0.0 {
        let utilization = request.memory_utilization;
        if !(utilization > 0.0 && utilization <= 1.0) {
            return Err(Status::invalid_argument(format!(
                "memory_utilization {utilization} is outside (0, 1]"
            )));
        }
        let memory = memory().map_err(Status::internal)?;
        device_share(memory, utilization, request.device_sharers, shard)?
    } else if request.blocks > 0 {
        return Ok(request.blocks);
    } else {
        return Err(Status::invalid_argument(
            "no KV-cache size given: kv_cache_blocks, kv_cache_memory_bytes or \
             memory_utilization must be set",
        ));
    };
    let fit = budget / per_block;
    if fit == 0 {
        return Err(Status::resource_exhausted(format!(
            "a KV-cache budget of {budget} bytes holds no block of {per_block} bytes"
        )));
    }
    Ok(match request.blocks {
        0 => fit,
        cap => fit.min(cap),
    })
}

/// Bytes the cache may take: `utilization` of the device's total memory, divided among
/// `sharers` ranks, less this rank's weights and scratch; and no more than is free now (the
/// weights already loaded) less the scratch, since other processes may hold some of the device.
fn device_share(
    memory: MemoryInfo,
    utilization: f32,
    sharers: u32,
    shard: &LoadedShard,
) -> Result<u64, Status> {
    let sharers = sharers.max(1) as u64;
    let share = (memory.total as f64 * utilization as f64) as u64 / sharers;
    let needed = shard.weight_bytes + shard.scratch_bytes + shard.bytes_per_block;
    if share < needed {
        return Err(Status::resource_exhausted(format!(
            "{utilization} of the device's {} shared by {sharers} rank(s) is {}: less than the \
             weights ({}), one step's scratch ({}) and a KV-cache block ({}) need; raise \
             --gpu-memory-utilization, shard the model over more ranks, or lower \
             --max-num-batched-tokens, --max-num-seqs or --max-model-len",
            gib(memory.total),
            gib(share),
            gib(shard.weight_bytes),
            gib(shard.scratch_bytes),
            gib(shard.bytes_per_block),
        )));
    }
    let wanted = share - shard.weight_bytes - shard.scratch_bytes;
    let free = memory.free.saturating_sub(shard.scratch_bytes);
    if free < wanted {
        tracing::warn!(
            wanted,
            free = memory.free,
            "less device memory is free than the utilization allows (another process holds \
             some); the KV cache takes what is free"
        );
    }
    Ok(wanted.min(free))
}

/// Bytes for an operator: GiB, or MiB below one GiB.
fn gib(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    match bytes as f64 / MIB {
        mib if mib < 1024.0 => format!("{mib:.1} MiB"),
        mib => format!("{:.2} GiB", mib / 1024.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn shard() -> LoadedShard {
        LoadedShard {
            weight_bytes: 14 * GIB,
            scratch_bytes: 2 * GIB,
            bytes_per_block: 8 * MIB,
        }
    }

    fn utilization(u: f32, sharers: u32, cap: u64) -> CacheRequest {
        CacheRequest {
            blocks: cap,
            budget_bytes: 0,
            memory_utilization: u,
            device_sharers: sharers,
        }
    }

    fn gpu(free: u64, total: u64) -> impl FnOnce() -> Result<MemoryInfo, String> {
        move || Ok(MemoryInfo { free, total })
    }

    #[test]
    fn the_share_less_weights_and_scratch_holds_the_cache() {
        // 80 GiB at 0.75 is 60 GiB; less 14 GiB of weights and 2 of scratch: 44 GiB of blocks.
        let blocks =
            cache_blocks(&utilization(0.75, 1, 0), &shard(), gpu(65 * GIB, 80 * GIB)).unwrap();
        assert_eq!(blocks, 44 * GIB / (8 * MIB));
    }

    #[test]
    fn ranks_sharing_a_device_share_its_memory() {
        // Two ranks on one 80 GiB device: 30 GiB each, 14 GiB for this one's blocks.
        let blocks =
            cache_blocks(&utilization(0.75, 2, 0), &shard(), gpu(65 * GIB, 80 * GIB)).unwrap();
        assert_eq!(blocks, 14 * GIB / (8 * MIB));
    }

    #[test]
    fn what_is_free_bounds_the_cache_when_another_process_holds_memory() {
        // 30 GiB free after the weights: 28 GiB for blocks after the scratch, not 44.
        let blocks =
            cache_blocks(&utilization(0.75, 1, 0), &shard(), gpu(30 * GIB, 80 * GIB)).unwrap();
        assert_eq!(blocks, 28 * GIB / (8 * MIB));
    }

    #[test]
    fn a_cap_on_blocks_still_holds() {
        let blocks =
            cache_blocks(&utilization(0.9, 1, 100), &shard(), gpu(65 * GIB, 80 * GIB)).unwrap();
        assert_eq!(blocks, 100);
    }

    #[test]
    fn a_share_smaller_than_the_weights_is_refused_with_the_figures() {
        let e =
            cache_blocks(&utilization(0.125, 1, 0), &shard(), gpu(65 * GIB, 80 * GIB)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        for figure in ["80.00 GiB", "10.00 GiB", "14.00 GiB", "2.00 GiB", "8.0 MiB"] {
            assert!(e.message().contains(figure), "{figure}: {}", e.message());
        }
        assert!(
            e.message().contains("--gpu-memory-utilization"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn utilization_outside_zero_to_one_is_refused() {
        for u in [-0.5, 1.5, f32::NAN] {
            let e = cache_blocks(&utilization(u, 1, 0), &shard(), gpu(GIB, GIB)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{u}");
        }
    }

    #[test]
    fn memory_is_asked_only_for_a_utilization() {
        let never = || -> Result<MemoryInfo, String> { panic!("memory asked") };
        let exact = CacheRequest {
            blocks: 7,
            budget_bytes: 0,
            memory_utilization: 0.0,
            device_sharers: 1,
        };
        assert_eq!(cache_blocks(&exact, &shard(), never).unwrap(), 7);
        let budget = CacheRequest {
            budget_bytes: 80 * MIB,
            ..exact
        };
        // The budget holds ten blocks; the count caps it at seven.
        assert_eq!(cache_blocks(&budget, &shard(), never).unwrap(), 7);
        let unbounded = CacheRequest {
            blocks: 0,
            ..budget
        };
        assert_eq!(cache_blocks(&unbounded, &shard(), never).unwrap(), 10);
    }

    #[test]
    fn a_failed_memory_query_is_an_error_not_a_guess() {
        let e = cache_blocks(&utilization(0.9, 1, 0), &shard(), || {
            Err("cuda:0: driver gone".into())
        })
        .unwrap_err();
        assert!(e.message().contains("driver gone"), "{}", e.message());
    }

    #[test]
    fn no_size_at_all_is_refused() {
        let e = cache_blocks(&utilization(0.0, 1, 0), &shard(), gpu(GIB, GIB)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
