//! Bytes one decode step puts on the wire to each rank, with the stateful step protocol against
//! the stateless one it replaced, at 32 and 256 running sequences.
//!
//! The old `SequenceStep` carried the whole block table (field 4) and the sampling parameters
//! (field 5) in every step; today's carries only new blocks in field 4 and the parameters in
//! field 5 only on admission. The field numbers and types are the same, so the old message is
//! today's with the whole table and the parameters filled in: both sizes are prost's
//! `encoded_len` of real plans from the scheduler.
//!
//! Run: cargo run -p caravan-coordinator --example step_bytes

use caravan_coordinator::{
    blocks::BlockManager,
    group::WorkerGroup,
    scheduler::{Scheduler, SchedulerConfig},
};
use caravan_proto as pb;
use prost::Message;

fn main() {
    let block_size = 16;
    println!("| sequences | context | stateless (before) | stateful (after) | ratio |");
    println!("|---|---|---|---|---|");
    for (sequences, context) in [(32, 512), (32, 2048), (256, 512), (256, 2048)] {
        let mut scheduler = Scheduler::new(
            SchedulerConfig {
                max_batch_size: sequences,
                max_batched_tokens: sequences * context,
                max_waiting: sequences,
            },
            BlockManager::new(
                sequences * (context + 64) / block_size + 1,
                block_size,
                false,
            ),
        );
        let sampling = pb::SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 40,
            seed: 1234,
            ..Default::default()
        };
        for i in 0..sequences {
            let prompt: Vec<i64> = (0..context as i64)
                .map(|t| (t * 7 + i as i64) % 32000)
                .collect();
            scheduler.add(prompt, sampling.clone());
        }
        // The prefill step, then decode steps until the tables have grown a block.
        let mut tables: std::collections::HashMap<u64, Vec<u32>> = Default::default();
        let mut last = None;
        for _ in 0..block_size + 1 {
            let plan = scheduler.schedule();
            for p in &plan.sequences {
                let table = tables.entry(p.id).or_default();
                if p.admitted.is_some() {
                    table.clear();
                }
                table.extend_from_slice(&p.new_blocks);
            }
            let sampled: Vec<_> = plan.sequences.iter().map(|p| (p.id, 29889)).collect();
            scheduler.apply(&plan, &sampled);
            last = Some(plan);
        }
        let plan = last.expect("steps ran");
        let after = WorkerGroup::step_request(&plan, 100, vec![]);
        let mut before = after.clone();
        for s in &mut before.sequences {
            s.new_blocks = tables[&s.sequence_id].clone();
            s.admitted = Some(sampling.clone());
        }
        let (b, a) = (before.encoded_len(), after.encoded_len());
        println!(
            "| {sequences} | {context} | {b} B | {a} B | {:.1}x |",
            b as f64 / a as f64
        );
    }
}
