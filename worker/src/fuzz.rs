//! What the `step_plan` fuzz target (`fuzz/`) checks, also replayed by the regression test below:
//! a step request from the wire, decoded and checked against a cache's limits, either is refused
//! as an invalid batch or yields a plan that cannot index outside the vocabulary, the positions
//! or the cache.

use caravan_ops::{
    batch::{LogitsSelection, SequenceStep, StepLimits, StepPlan},
    Error,
};
use caravan_proto as pb;
use prost::Message;

use crate::sequences::Sequences;

/// Bytes 0..3 pick the limits (so the fuzzer explores small caches and short contexts); the rest
/// is a protobuf `StepRequest`. Returns whether the batch was accepted.
pub fn step_plan(data: &[u8]) -> bool {
    let [a, b, c, rest @ ..] = data else {
        return false;
    };
    let limits = StepLimits {
        vocab_size: 32_000,
        max_positions: 1 + *a as usize * 16,
        block_size: *b as usize % 33,
        num_blocks: *c as usize,
    };
    let Ok(request) = pb::StepRequest::decode(rest) else {
        return false;
    };
    // A rank that has not seen the sequences yet: only admitted ones make a batch.
    let Ok(batch) = Sequences::default().prepare(&request) else {
        return false;
    };
    let mut accepted = false;
    for selection in [LogitsSelection::LastTokens, LogitsSelection::AllTokens] {
        match StepPlan::new(&batch, selection, &limits) {
            Ok(plan) => {
                check(&plan, &batch, selection, &limits);
                accepted = true;
            }
            Err(Error::InvalidBatch(_)) => {}
            Err(other) => panic!("a bad batch must be refused as invalid, not with: {other}"),
        }
    }
    accepted
}

fn check(plan: &StepPlan, batch: &[SequenceStep], selection: LogitsSelection, limits: &StepLimits) {
    let n = plan.tokens.len();
    assert_eq!(n, batch.iter().map(|s| s.tokens.len()).sum::<usize>());
    assert_eq!(plan.positions.len(), n);
    assert_eq!(plan.slots.len(), n);
    assert_eq!(plan.sequences.len(), batch.len());
    let cache_slots = (limits.num_blocks * limits.block_size) as i64;
    assert!(plan
        .tokens
        .iter()
        .all(|&t| (0..limits.vocab_size as i64).contains(&t)));
    assert!(plan
        .positions
        .iter()
        .all(|&p| (0..limits.max_positions as i64).contains(&p)));
    assert!(plan.slots.iter().all(|&s| (0..cache_slots).contains(&s)));
    let rows = match selection {
        LogitsSelection::LastTokens => batch
            .iter()
            .map(|s| if s.all_logits { s.tokens.len() } else { 1 })
            .sum(),
        LogitsSelection::AllTokens => n,
    };
    assert_eq!(plan.logit_rows.len(), rows);
    assert!(plan.logit_rows.windows(2).all(|w| w[0] < w[1]));
    assert!(plan.logit_rows.iter().all(|&r| (0..n as i64).contains(&r)));
    for (seq, step) in plan.sequences.iter().zip(batch) {
        let context = &seq.context_slots;
        assert_eq!(context.len(), step.start_position + step.tokens.len());
        assert!(context.iter().all(|&s| (0..cache_slots).contains(&s)));
        // A sequence's new tokens are written where its context says they are.
        assert_eq!(
            &context[seq.start_position..],
            &plan.slots[seq.offset..seq.offset + seq.len]
        );
        // No two positions of one sequence share a slot.
        let mut sorted = context.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), context.len());
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn inputs(dir: &str) -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz")
            .join(dir);
        std::fs::read_dir(&dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// The seeds are valid steps (fuzz/scripts/make_seeds.py); each must pass the checks.
    #[test]
    fn step_plan_seeds_are_accepted() {
        let seeds = inputs("seeds/step_plan");
        assert!(
            !seeds.is_empty(),
            "no seeds: run fuzz/scripts/make_seeds.py"
        );
        for seed in seeds {
            assert!(
                super::step_plan(&std::fs::read(&seed).unwrap()),
                "{} refused",
                seed.display()
            );
        }
    }

    /// Every input the fuzzer ever crashed on, kept in fuzz/regressions/step_plan.
    #[test]
    fn step_plan_regressions() {
        for input in inputs("regressions/step_plan") {
            super::step_plan(&std::fs::read(&input).unwrap());
        }
    }
}
