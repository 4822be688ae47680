//! What a rank keeps per sequence between steps: its sampling parameters, its random stream and
//! its KV block table. The step protocol sends each once (when the coordinator admits the
//! sequence) and later only new blocks, so every rank's table must stay exactly the
//! coordinator's; [`Sequences::prepare`] checks a step against it before changing anything.

use std::collections::{HashMap, HashSet};

use caravan_ops::SequenceStep;
use caravan_proto as pb;

use crate::sampling::{SamplingParams, SequenceSampler};

/// One sequence's state on this rank.
#[derive(Debug, Clone)]
pub struct SequenceState {
    pub params: SamplingParams,
    pub sampler: SequenceSampler,
    pub blocks: Vec<u32>,
    /// The token this rank answered for the sequence in its last sampling step since its
    /// admission: the input of a step that `feeds_sampled` (asynchronous scheduling).
    pub last_sampled: Option<i64>,
}

/// Every sequence this rank knows, by id.
#[derive(Debug, Default)]
pub struct Sequences {
    by_id: HashMap<u64, SequenceState>,
}

impl Sequences {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut SequenceState> {
        self.by_id.get_mut(&id)
    }

    /// Forgets the sequences a step says have ended (unknown ids are ignored: the coordinator
    /// reports cancelled ones the rank may never have seen).
    pub fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            self.by_id.remove(id);
        }
    }

    /// Applies a step's admissions and new blocks and returns the batch for the model. A step
    /// that names a sequence this rank does not know (and does not admit it), or one sequence
    /// twice, is refused before anything changes: the rank and the coordinator disagree.
    pub fn prepare(&mut self, req: &pb::StepRequest) -> Result<Vec<SequenceStep>, String> {
        let mut seen = HashSet::with_capacity(req.sequences.len());
        for s in &req.sequences {
            if !seen.insert(s.sequence_id) {
                return Err(format!(
                    "sequence {} appears twice in the step",
                    s.sequence_id
                ));
            }
            if s.admitted.is_none() && !self.by_id.contains_key(&s.sequence_id) {
                return Err(format!(
                    "sequence {} is not known to this rank and the step does not admit it",
                    s.sequence_id
                ));
            }
            if let Some(sampling) = &s.admitted {
                to_params(sampling).map_err(|e| format!("sequence {}: {e}", s.sequence_id))?;
            }
            if s.feeds_sampled {
                let id = s.sequence_id;
                if !s.tokens.is_empty() {
                    return Err(format!(
                        "sequence {id} feeds its sampled token and sends tokens too"
                    ));
                }
                let sampled = match s.admitted {
                    // Admission starts it afresh: nothing sampled yet.
                    Some(_) => None,
                    None => self.by_id.get(&id).and_then(|state| state.last_sampled),
                };
                if sampled.is_none() {
                    return Err(format!(
                        "sequence {id} feeds its sampled token, but this rank has sampled none \
                         for it since its admission"
                    ));
                }
            }
        }
        let mut batch = Vec::with_capacity(req.sequences.len());
        for s in &req.sequences {
            let state = match &s.admitted {
                Some(sampling) => {
                    let params = to_params(sampling)?;
                    let state = self
                        .by_id
                        .entry(s.sequence_id)
                        .or_insert_with(|| SequenceState {
                            sampler: SequenceSampler::new(params.seed, s.prompt_len as usize),
                            params: params.clone(),
                            blocks: Vec::new(),
                            last_sampled: None,
                        });
                    // Back after a preemption: the same random stream, a new table.
                    state.params = params;
                    state.blocks.clear();
                    state.last_sampled = None;
                    state
                }
                None => self.by_id.get_mut(&s.sequence_id).expect("checked above"),
            };
            state.blocks.extend_from_slice(&s.new_blocks);
            let tokens = match (s.feeds_sampled, state.last_sampled) {
                (true, Some(token)) => vec![token],
                _ => s.tokens.clone(),
            };
            batch.push(SequenceStep {
                tokens,
                start_position: s.start_position as usize,
                block_table: state.blocks.clone(),
                // Rows beyond the sampled one score known tokens: the step's own after the
                // first, and the one the coordinator says comes next.
                all_logits: state.params.prompt_logprobs.is_some()
                    && (s.tokens.len() > 1 || s.next_token.is_some()),
            });
        }
        Ok(batch)
    }
}

/// The parameters as the coordinator sent them, complete: this rank adds no defaults of its own,
/// and refuses values no sampler can apply (the coordinator validated the request already).
fn to_params(p: &pb::SamplingParams) -> Result<SamplingParams, String> {
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        return Err(format!(
            "temperature {} is not a finite value >= 0",
            p.temperature
        ));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(format!("top_p {} is outside (0, 1]", p.top_p));
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
        return Err(format!(
            "repetition_penalty {} is not a finite value > 0",
            p.repetition_penalty
        ));
    }
    let finite = |name: &str, v: f32| {
        v.is_finite()
            .then_some(v)
            .ok_or_else(|| format!("{name} {v} is not finite"))
    };
    Ok(SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as usize,
        seed: p.seed,
        presence_penalty: finite("presence_penalty", p.presence_penalty)?,
        frequency_penalty: finite("frequency_penalty", p.frequency_penalty)?,
        top_logprobs: p.top_logprobs as usize,
        prompt_logprobs: p.prompt_logprobs.map(|n| n as usize),
        logit_bias: p.logit_bias.iter().map(|b| (b.token_id, b.bias)).collect(),
        repetition_penalty: p.repetition_penalty,
        min_tokens: p.min_tokens as usize,
        min_tokens_banned: p.min_tokens_banned.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(
        id: u64,
        tokens: Vec<i64>,
        start: u32,
        blocks: Vec<u32>,
        admit: bool,
    ) -> pb::SequenceStep {
        let tokens_len = tokens.len() as u32;
        pb::SequenceStep {
            sequence_id: id,
            tokens,
            start_position: start,
            new_blocks: blocks,
            admitted: admit.then(|| pb::SamplingParams {
                seed: 7,
                top_p: 1.0,
                repetition_penalty: 1.0,
                ..Default::default()
            }),
            sample: true,
            next_token: None,
            allowed_tokens: Vec::new(),
            prompt_len: if admit { tokens_len } else { 0 },
            feeds_sampled: false,
        }
    }

    fn step(sequences: Vec<pb::SequenceStep>, finished: Vec<u64>) -> pb::StepRequest {
        pb::StepRequest {
            step_id: 0,
            sequences,
            finished,
        }
    }

    #[test]
    fn tables_grow_by_new_blocks_and_restart_on_admission() {
        let mut s = Sequences::default();
        let batch = s
            .prepare(&step(
                vec![seq(1, vec![5, 6, 7], 0, vec![3, 4], true)],
                vec![],
            ))
            .unwrap();
        assert_eq!(batch[0].block_table, vec![3, 4]);
        let batch = s
            .prepare(&step(vec![seq(1, vec![8], 3, vec![], false)], vec![]))
            .unwrap();
        assert_eq!(batch[0].block_table, vec![3, 4]);
        assert_eq!(batch[0].start_position, 3);
        let batch = s
            .prepare(&step(vec![seq(1, vec![9], 4, vec![9], false)], vec![]))
            .unwrap();
        assert_eq!(batch[0].block_table, vec![3, 4, 9]);
        // Preempted and admitted again: a new table, the same sampler.
        s.get_mut(1).unwrap().sampler = SequenceSampler::new(99, 3);
        let batch = s
            .prepare(&step(
                vec![seq(1, vec![5, 6, 7, 8, 9], 0, vec![0, 1, 2], true)],
                vec![],
            ))
            .unwrap();
        assert_eq!(batch[0].block_table, vec![0, 1, 2]);
        let kept = format!("{:?}", s.get_mut(1).unwrap().sampler);
        assert_eq!(kept, format!("{:?}", SequenceSampler::new(99, 3)));
    }

    #[test]
    fn unknown_or_repeated_sequences_are_refused_without_changing_anything() {
        let mut s = Sequences::default();
        s.prepare(&step(vec![seq(1, vec![5], 0, vec![3], true)], vec![]))
            .unwrap();
        let err = s
            .prepare(&step(
                vec![
                    seq(1, vec![6], 1, vec![4], false),
                    seq(2, vec![1], 0, vec![], false),
                ],
                vec![],
            ))
            .unwrap_err();
        assert!(err.contains("sequence 2 is not known"), "{err}");
        assert_eq!(s.get_mut(1).unwrap().blocks, vec![3], "nothing applied");
        let err = s
            .prepare(&step(
                vec![
                    seq(1, vec![6], 1, vec![], false),
                    seq(1, vec![6], 1, vec![], false),
                ],
                vec![],
            ))
            .unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn parameters_no_sampler_can_apply_are_refused_without_changing_anything() {
        let mut s = Sequences::default();
        s.prepare(&step(vec![seq(1, vec![5], 0, vec![3], true)], vec![]))
            .unwrap();
        for (field, bad) in [
            (
                "top_p",
                pb::SamplingParams {
                    top_p: 0.0,
                    repetition_penalty: 1.0,
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                pb::SamplingParams {
                    top_p: 1.0,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                pb::SamplingParams {
                    temperature: f32::NAN,
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    ..Default::default()
                },
            ),
            (
                "frequency_penalty",
                pb::SamplingParams {
                    top_p: 1.0,
                    repetition_penalty: 1.0,
                    frequency_penalty: f32::INFINITY,
                    ..Default::default()
                },
            ),
        ] {
            let mut admit = seq(2, vec![1], 0, vec![4], true);
            admit.admitted = Some(bad);
            let err = s
                .prepare(&step(
                    vec![seq(1, vec![6], 1, vec![9], false), admit],
                    vec![],
                ))
                .unwrap_err();
            assert!(err.contains("sequence 2") && err.contains(field), "{err}");
            assert_eq!(s.get_mut(1).unwrap().blocks, vec![3], "nothing applied");
            assert!(s.get_mut(2).is_none());
        }
    }

    /// A step that feeds sequence 1's sampled token.
    fn feeding(id: u64, start: u32, blocks: Vec<u32>) -> pb::SequenceStep {
        pb::SequenceStep {
            feeds_sampled: true,
            ..seq(id, vec![], start, blocks, false)
        }
    }

    #[test]
    fn a_fed_step_takes_the_token_the_rank_sampled_last() {
        let mut s = Sequences::default();
        s.prepare(&step(vec![seq(1, vec![5, 6], 0, vec![3], true)], vec![]))
            .unwrap();
        let err = s
            .prepare(&step(vec![feeding(1, 2, vec![])], vec![]))
            .unwrap_err();
        assert!(err.contains("has sampled none"), "{err}");
        s.get_mut(1).unwrap().last_sampled = Some(42);
        let batch = s
            .prepare(&step(vec![feeding(1, 2, vec![4])], vec![]))
            .unwrap();
        assert_eq!(batch[0].tokens, vec![42]);
        assert_eq!(batch[0].start_position, 2);
        assert_eq!(batch[0].block_table, vec![3, 4]);
        // Tokens beside the fed one, or a feed on admission, are refused before anything changes.
        let mut both = feeding(1, 3, vec![9]);
        both.tokens = vec![7];
        let err = s.prepare(&step(vec![both], vec![])).unwrap_err();
        assert!(err.contains("sends tokens too"), "{err}");
        let mut admitted = feeding(1, 0, vec![9]);
        admitted.admitted = seq(1, vec![], 0, vec![], true).admitted;
        let err = s.prepare(&step(vec![admitted], vec![])).unwrap_err();
        assert!(err.contains("has sampled none"), "{err}");
        assert_eq!(s.get_mut(1).unwrap().blocks, vec![3, 4], "nothing applied");
        // Admitted again (a preemption): the coordinator sends every token, nothing is fed.
        s.prepare(&step(
            vec![seq(1, vec![5, 6, 42], 0, vec![8], true)],
            vec![],
        ))
        .unwrap();
        assert_eq!(s.get_mut(1).unwrap().last_sampled, None);
    }

    #[test]
    fn finished_sequences_are_forgotten() {
        let mut s = Sequences::default();
        s.prepare(&step(vec![seq(1, vec![5], 0, vec![3], true)], vec![]))
            .unwrap();
        s.forget(&[1, 42]);
        assert!(s.is_empty());
        assert!(s
            .prepare(&step(vec![seq(1, vec![6], 1, vec![], false)], vec![]))
            .is_err());
    }
}
