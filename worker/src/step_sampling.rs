//! A step's choices from its logits: each sampled sequence's token (with its log-probabilities)
//! and the prompt log-probabilities asked for, made where the logits lie ([`SamplingPlace`]).
//!
//! On the device path only the chosen ids and the requested log-probabilities cross to the host;
//! rows whose logits change before the choice (penalties, bias, `min_tokens`, a structured-output
//! mask) are copied over alone and sampled there. Both paths choose the same tokens
//! ([`crate::device_sampling`]), so where a rank samples never changes what a request gets.

use std::collections::HashMap;

use caravan_ops::{
    cpu::{cpu_kernels, CpuKernels},
    SequenceStep,
};
use caravan_proto as pb;
use tch::{Device, Kind, TchError, Tensor};
use tonic::Status;

use crate::{
    device_sampling::{self, DeviceDraw},
    sampling::{score, Sampled, Score},
    sequences::Sequences,
};

/// Where a rank chooses its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplingPlace {
    /// From a copy of the logits in host memory, row by row.
    Host,
    /// Where the logits are, in batched libtorch calls.
    Device,
}

impl SamplingPlace {
    /// On a GPU where its logits are; on the CPU through libtorch when the kernels are off (the
    /// device-generic path, tested on CPUs), else on the host.
    pub fn for_device(device: Device) -> Self {
        if device != Device::Cpu || cpu_kernels() == CpuKernels::Off {
            SamplingPlace::Device
        } else {
            SamplingPlace::Host
        }
    }
}

/// What a step answers besides its timings.
#[derive(Debug, Default)]
pub struct StepChoices {
    pub tokens: Vec<pb::SampledToken>,
    pub prompt_logprobs: Vec<pb::PromptLogprobs>,
}

/// A sequence's prompt rows to score.
struct PromptRows {
    sequence_id: u64,
    first_position: u32,
    first_row: usize,
    targets: Vec<i64>,
    top: usize,
}

/// A sequence's row to sample.
struct SampleRow {
    sequence_id: u64,
    row: usize,
    /// Sampled on the host: its logits change before the choice.
    on_host: bool,
}

/// Chooses the tokens of step `req` (whose prepared batch is `batch`) from `logits`, one row per
/// sequence or, for sequences asking for prompt log-probabilities, one per token. `diverge`
/// (fault injection) makes this rank answer a different token than its peers.
pub fn choose(
    logits: &Tensor,
    req: &pb::StepRequest,
    batch: &[SequenceStep],
    sequences: &mut Sequences,
    place: SamplingPlace,
    diverge: bool,
) -> Result<StepChoices, Status> {
    let internal = |e: TchError| Status::internal(format!("sampling: {e}"));
    let (rows, vocab) = logits.size2().map_err(internal)?;
    let mut prompts = Vec::new();
    let mut samples = Vec::new();
    let mut first_row = 0;
    for (seq, step) in req.sequences.iter().zip(batch) {
        let own_rows = if step.all_logits {
            step.tokens.len()
        } else {
            1
        };
        let state = sequences
            .get_mut(seq.sequence_id)
            .ok_or_else(|| Status::internal("a prepared sequence went missing"))?;
        state
            .sampler
            .observe(&step.tokens, step.start_position, &state.params);
        if let (true, Some(top)) = (step.all_logits, state.params.prompt_logprobs) {
            // Row j scores the token after the step's j-th: the next one in the step, then the
            // one the coordinator says follows (none after a final chunk: sampled).
            prompts.push(PromptRows {
                sequence_id: seq.sequence_id,
                first_position: seq.start_position + 1,
                first_row,
                targets: step.tokens[1..]
                    .iter()
                    .copied()
                    .chain(seq.next_token)
                    .collect(),
                top,
            });
        }
        if seq.sample {
            samples.push(SampleRow {
                sequence_id: seq.sequence_id,
                row: first_row + own_rows - 1,
                on_host: place == SamplingPlace::Host
                    || state.params.reshapes_logits()
                    || !seq.allowed_tokens.is_empty(),
            });
        }
        first_row += own_rows;
    }
    if first_row as i64 != rows {
        return Err(Status::internal(format!(
            "the model answered {rows} rows of logits for {first_row}"
        )));
    }
    let log_sum_exp = logits
        .f_to_kind(Kind::Float)
        .and_then(|l| l.f_logsumexp([-1i64].as_slice(), false))
        .map_err(internal)?;

    // The rows read on the host: all of them on the host path, else the masked and reshaped.
    let mut wanted: Vec<usize> = samples
        .iter()
        .filter(|s| s.on_host)
        .map(|s| s.row)
        .collect();
    if place == SamplingPlace::Host {
        wanted.extend(
            prompts
                .iter()
                .flat_map(|p| p.first_row..p.first_row + p.targets.len()),
        );
    }
    let host = HostRows::copy(logits, &log_sum_exp, wanted, vocab as usize).map_err(internal)?;

    let mut choices = StepChoices::default();
    for p in &prompts {
        let rows = p.first_row..p.first_row + p.targets.len();
        let scores: Vec<Score> = match place {
            SamplingPlace::Host => rows
                .zip(&p.targets)
                .map(|(r, &target)| {
                    let (row, lse) = host.row(r)?;
                    Ok(score(row, lse, target, p.top))
                })
                .collect::<Result<_, Status>>()?,
            SamplingPlace::Device => device_sampling::score(
                logits,
                &log_sum_exp,
                &rows.map(|r| r as i64).collect::<Vec<_>>(),
                &p.targets,
                p.top,
            )
            .map_err(internal)?,
        };
        choices.prompt_logprobs.push(pb::PromptLogprobs {
            sequence_id: p.sequence_id,
            first_position: p.first_position,
            positions: scores
                .into_iter()
                .map(|s| pb::PositionLogprob {
                    logprob: s.logprob,
                    rank: s.rank,
                    top_logprobs: to_pb(s.top),
                })
                .collect(),
        });
    }

    // The device's rows first, in one batch, then each host row.
    let mut draws = Vec::new();
    for s in samples.iter().filter(|s| !s.on_host) {
        let state = sequences
            .get_mut(s.sequence_id)
            .ok_or_else(|| Status::internal("a prepared sequence went missing"))?;
        let params = &state.params;
        draws.push(DeviceDraw {
            row: s.row as i64,
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            uniform: if params.temperature > 0.0 {
                state.sampler.next_uniform()
            } else {
                0.0
            },
            top_logprobs: params.top_logprobs,
        });
    }
    let mut on_device = device_sampling::sample(logits, &log_sum_exp, &draws)
        .map_err(internal)?
        .into_iter();
    let allowed: HashMap<u64, &[u8]> = req
        .sequences
        .iter()
        .filter(|s| !s.allowed_tokens.is_empty())
        .map(|s| (s.sequence_id, &s.allowed_tokens[..]))
        .collect();
    for s in &samples {
        let state = sequences
            .get_mut(s.sequence_id)
            .ok_or_else(|| Status::internal("a prepared sequence went missing"))?;
        let sampled: Sampled = if s.on_host {
            let (row, lse) = host.row(s.row)?;
            let allowed = allowed.get(&s.sequence_id).copied();
            state
                .sampler
                .sample_masked(row, lse, &state.params, allowed)
        } else {
            let sampled = on_device
                .next()
                .ok_or_else(|| Status::internal("the device sampled too few rows"))?;
            state.sampler.record(sampled.token);
            sampled
        };
        let token_id = if diverge {
            (sampled.token + 1) % vocab
        } else {
            sampled.token
        };
        // What this rank answered is what a step that feeds it computes next.
        state.last_sampled = Some(token_id);
        choices.tokens.push(pb::SampledToken {
            sequence_id: s.sequence_id,
            token_id,
            logprob: sampled.logprob,
            top_logprobs: to_pb(sampled.top_logprobs),
        });
    }
    Ok(choices)
}

fn to_pb(top: Vec<(i64, f32)>) -> Vec<pb::TokenLogprob> {
    top.into_iter()
        .map(|(token_id, logprob)| pb::TokenLogprob { token_id, logprob })
        .collect()
}

/// Some rows of the logits, with their `ln Σ exp`, copied to host memory.
struct HostRows {
    vocab: usize,
    /// A row of the logits -> its place in `logits` / `log_sum_exp`.
    at: HashMap<usize, usize>,
    logits: Vec<f32>,
    log_sum_exp: Vec<f32>,
}

impl HostRows {
    /// Copies `rows` (in any order, repeats allowed); the whole tensor at once when they are all
    /// of its rows (the host path's decode step).
    fn copy(
        logits: &Tensor,
        log_sum_exp: &Tensor,
        mut rows: Vec<usize>,
        vocab: usize,
    ) -> Result<Self, TchError> {
        rows.sort_unstable();
        rows.dedup();
        let all = rows.len() as i64 == logits.size2()?.0;
        let at = rows.iter().enumerate().map(|(i, &r)| (r, i)).collect();
        if rows.is_empty() {
            return Ok(HostRows {
                vocab,
                at,
                logits: Vec::new(),
                log_sum_exp: Vec::new(),
            });
        }
        let (logits, log_sum_exp) = if all {
            (logits.shallow_clone(), log_sum_exp.shallow_clone())
        } else {
            device_sampling::select_rows(logits, log_sum_exp, rows.iter().map(|&r| r as i64))?
        };
        Ok(HostRows {
            vocab,
            at,
            logits: device_sampling::to_host(&logits)?,
            log_sum_exp: device_sampling::to_host(&log_sum_exp)?,
        })
    }

    /// Row `r` of the logits and its `ln Σ exp`, if it was copied.
    fn row(&self, r: usize) -> Result<(&[f32], f32), Status> {
        let i = *self
            .at
            .get(&r)
            .ok_or_else(|| Status::internal(format!("row {r} of the logits was not copied")))?;
        Ok((
            &self.logits[i * self.vocab..(i + 1) * self.vocab],
            self.log_sum_exp[i],
        ))
    }
}
