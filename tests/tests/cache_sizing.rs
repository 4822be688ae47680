//! A rank told a memory utilization (what the coordinator sends CUDA ranks) sizes its own KV
//! cache once its weights are loaded: here on CPU, where the device's memory is the host's, with
//! a real checkpoint through the worker's `LoadShard` handling.

use caravan_ops::comm::RingListener;
use caravan_proto::v1 as pb;
use caravan_tests::fixtures;
use caravan_worker::runner::{ModelRunner, SharedStatus};
use tch::Device;

const BLOCK_SIZE: u32 = 16;

fn runner() -> ModelRunner {
    let listener = RingListener::bind("127.0.0.1:0").expect("binding a ring listener");
    ModelRunner::new(Device::Cpu, listener, SharedStatus::default(), None)
}

/// `LoadShard` of the MHA fixture at TP 1 in f32, sized by `utilization` of the host's memory.
fn load(utilization: f32, cap: u32) -> Result<pb::LoadShardResponse, tonic::Status> {
    runner().load(pb::LoadShardRequest {
        model_path: fixtures().join("mha").display().to_string(),
        rank: 0,
        world_size: 1,
        dtype: pb::Dtype::F32.into(),
        block_size: BLOCK_SIZE,
        kv_cache_blocks: cap,
        memory_utilization: utilization,
        device_sharers: 1,
        max_num_batched_tokens: 256,
        max_num_seqs: 8,
        max_model_len: 512,
        collective_timeout_ms: 10_000,
        threads: 1,
        ..Default::default()
    })
}

/// The utilization whose share of `total` is `bytes`.
fn share(bytes: u64, total: u64) -> f32 {
    (bytes as f64 / total as f64) as f32
}

#[test]
fn the_cache_fills_what_the_share_leaves_beside_the_weights() {
    let roomy = load(1.0, 64).expect("loading with the whole host");
    let per_block = roomy.cache_bytes_per_token * BLOCK_SIZE as u64;
    // The host has room for the cap.
    assert_eq!(roomy.kv_cache_blocks, 64);
    assert_eq!(roomy.kv_cache_bytes, 64 * per_block);
    // The memory figures are the host's (its cgroup's) as the worker reads them.
    let host = caravan_worker::host::memory();
    assert_eq!(roomy.memory_total_bytes, host.total);
    assert!(
        0 < roomy.memory_free_bytes && roomy.memory_free_bytes <= host.total,
        "{roomy:?}"
    );

    // A share of the weights and 4000 blocks' bytes: fewer than 4000 blocks (the step's scratch
    // comes out of it) but some, and the weights, the cache and the scratch fit the share.
    let total = roomy.memory_total_bytes;
    let some = roomy.weight_bytes + 4000 * per_block;
    let sized = load(share(some, total), 0).expect("loading with a share");
    assert!(
        0 < sized.kv_cache_blocks && sized.kv_cache_blocks < 4000,
        "{sized:?}"
    );
    assert_eq!(
        sized.kv_cache_bytes,
        sized.kv_cache_blocks as u64 * per_block
    );
    // Ten more blocks' bytes give ten more blocks (give or take one: the utilization crosses
    // the wire as an f32, a few kilobytes of a host's memory).
    let more = load(share(some + 10 * per_block, total), 0).expect("loading with more");
    let grown = more.kv_cache_blocks - sized.kv_cache_blocks;
    assert!((9..=11).contains(&grown), "{sized:?} then {more:?}");
}

#[test]
fn a_share_the_weights_fill_is_refused_with_the_figures() {
    let roomy = load(1.0, 1).expect("loading with the whole host");
    let tight = share(roomy.weight_bytes, roomy.memory_total_bytes);
    let refused = load(tight, 0).expect_err("the weights alone fill the share");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("--gpu-memory-utilization"),
        "{}",
        refused.message()
    );
}

#[test]
fn a_utilization_outside_zero_to_one_is_refused() {
    for bad in [1.5, -0.1] {
        let refused = load(bad, 0).expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}");
    }
}
