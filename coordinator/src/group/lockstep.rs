//! The lockstep step: one step's plan sent to every rank of a group at once, the answers awaited
//! within the step timeout and the stragglers' lag and compared, and each failure sorted into a
//! [`StepErrorKind`]. This is the engine's [`StepExecutor`] in production.

use std::{future::Future, sync::Arc, time::Duration};

use caravan_proto::{self as pb, worker_client::WorkerClient};
use futures::{stream::FuturesUnordered, StreamExt};
use tonic::transport::Channel;

use super::WorkerGroup;
use crate::{
    executor::{StepAnswer, StepError, StepErrorKind, StepExecutor, StepOutput, StepTimings},
    scheduler::StepPlan,
};

/// How long the other ranks get to refuse a step one rank refused (refusals come before any
/// collective, within moments).
const REFUSAL_GRACE: Duration = Duration::from_secs(2);

impl WorkerGroup {
    /// The wire form of `plan`, as step `step_id`.
    pub fn step_request(plan: &StepPlan, step_id: u64, finished: Vec<u64>) -> pb::StepRequest {
        pb::StepRequest {
            step_id,
            sequences: plan
                .sequences
                .iter()
                .map(|p| pb::SequenceStep {
                    sequence_id: p.id,
                    tokens: p.tokens.clone(),
                    start_position: p.start_position as u32,
                    new_blocks: p.new_blocks.clone(),
                    admitted: p.admitted.clone(),
                    prompt_len: if p.admitted.is_some() {
                        p.prompt_len as u32
                    } else {
                        0
                    },
                    sample: p.sample,
                    next_token: p.next_token,
                    allowed_tokens: p.allowed_tokens.clone().unwrap_or_default(),
                    feeds_sampled: p.feeds_sampled,
                })
                .collect(),
            finished,
        }
    }

    /// Sends `plan` to every rank as the group's next step; the future answers once every rank
    /// has (see [`Lockstep::run`]) and borrows nothing, so the next step may be sent before it
    /// does. `span`'s context travels to the workers in the requests' metadata.
    pub(super) fn send_step(
        &mut self,
        plan: &StepPlan,
        span: &tracing::Span,
    ) -> impl Future<Output = Result<StepOutput, StepError>> + Send + 'static {
        let mut finished = std::mem::take(&mut self.pending_finished);
        finished.extend_from_slice(&plan.finished);
        let request = Self::step_request(plan, self.next_step, finished);
        self.next_step += 1;
        let lockstep = Lockstep {
            ranks: self.ranks.clone(),
            names: self.rank_names.clone(),
            timeout: self.step_timeout,
            lag: self.straggler_timeout,
            asked: plan
                .sequences
                .iter()
                .filter(|p| p.sample)
                .map(|p| p.id)
                .collect(),
        };
        lockstep.run(request, span.clone())
    }
}

/// One step's calls to every rank of a group. It owns what it needs, so a step may be sent
/// while the one before it runs.
struct Lockstep {
    ranks: Vec<WorkerClient<Channel>>,
    /// Per rank, "rank R (ID at ADDR)", for messages.
    names: Arc<[String]>,
    timeout: Duration,
    /// How long the other ranks may lag the first to answer.
    lag: Duration,
    /// The sequences that sample in the step, in plan order.
    asked: Vec<u64>,
}

impl Lockstep {
    /// Runs the step on every rank in lockstep; fails if any rank fails or the ranks disagree.
    async fn run(
        self,
        request: pb::StepRequest,
        span: tracing::Span,
    ) -> Result<StepOutput, StepError> {
        let (timeout, lag) = (self.timeout, self.lag);
        let mut calls: FuturesUnordered<_> = self
            .ranks
            .iter()
            .enumerate()
            .map(|(rank, client)| {
                let mut client = client.clone();
                let mut request = tonic::Request::new(request.clone());
                caravan_common::telemetry::inject(&span, request.metadata_mut());
                async move {
                    let answer = tokio::time::timeout(timeout, client.step(request)).await;
                    (rank, answer.map(|a| a.map(tonic::Response::into_inner)))
                }
            })
            .collect();
        // A rank that fails fails the step at once, unless it refused the step as invalid:
        // then the others are heard too, since only a refusal by every rank leaves the group in
        // step. A rank cut off from the network never answers, but its peers' collectives time
        // out and say so. If the cut comes after the step's last collective, the peers answer
        // and only the cut-off rank's answer is lost; ranks finish a step together, so once one
        // has answered the others get one collective timeout.
        let mut answers: Vec<Option<Result<pb::StepResponse, String>>> =
            vec![None; self.ranks.len()];
        let mut first_answer: Option<(usize, tokio::time::Instant)> = None;
        loop {
            // Ranks refuse a step before its first collective, so a refusal by every rank comes
            // within moments; a rank that has not refused by then is running the step.
            let refused = answers.iter().flatten().any(Result::is_err);
            let wait = if refused { lag.min(REFUSAL_GRACE) } else { lag };
            let next = match first_answer {
                None => calls.next().await,
                Some((first, at)) => match tokio::time::timeout_at(at + wait, calls.next()).await {
                    Ok(next) => next,
                    Err(_) if refused => {
                        let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                        return Err(StepError::new(
                            StepErrorKind::Diverged,
                            format!(
                                "a rank refused the step the others ran ({} did not refuse it \
                                 within {wait:?} of rank {first}'s refusal)",
                                self.names[missing]
                            ),
                        ));
                    }
                    Err(_) => {
                        let missing = answers.iter().position(Option::is_none).unwrap_or(0);
                        return Err(StepError::new(
                            StepErrorKind::Timeout,
                            format!(
                                "{} timed out: no answer to the step within {lag:?} of rank \
                                 {first}'s (cut off from the coordinator?)",
                                self.names[missing]
                            ),
                        ));
                    }
                },
            };
            let Some((rank, answer)) = next else { break };
            let who = &self.names[rank];
            let fail =
                |kind, message: String| Err(after_refusal(refused, StepError::new(kind, message)));
            let answer = match answer {
                Err(_) => fail(
                    StepErrorKind::Timeout,
                    format!("{who} timed out: no answer to the step within {timeout:?}"),
                ),
                Ok(Err(status)) => match status.code() {
                    tonic::Code::InvalidArgument => Ok(Err(format!("{who}: {}", status.message()))),
                    tonic::Code::Unavailable => fail(
                        StepErrorKind::Unreachable,
                        format!("{who} is unreachable: {}", status.message()),
                    ),
                    // Out of order, a sequence it does not know, no shard: its state is not the
                    // coordinator's.
                    tonic::Code::FailedPrecondition => fail(
                        StepErrorKind::Diverged,
                        format!("{who}: {}", status.message()),
                    ),
                    // Its collective failed (a peer died or the link broke).
                    _ => fail(
                        StepErrorKind::Unreachable,
                        format!("{who}: {}", status.message()),
                    ),
                },
                Ok(Ok(response)) => Ok(Ok(response)),
            };
            answers[rank] = Some(answer?);
            first_answer.get_or_insert((rank, tokio::time::Instant::now()));
        }
        let answers: Vec<Result<pb::StepResponse, String>> =
            answers.into_iter().flatten().collect();
        let refused = answers.iter().filter(|a| a.is_err()).count();
        if refused > 0 && refused == answers.len() {
            let message = answers
                .into_iter()
                .find_map(Result::err)
                .unwrap_or_default();
            return Err(StepError::new(StepErrorKind::Rejected, message));
        }
        if refused > 0 {
            let (ran, refusal) = (
                answers.iter().position(Result::is_ok).unwrap_or(0),
                answers.iter().position(Result::is_err).unwrap_or(0),
            );
            let why = answers[refusal].as_ref().err().cloned().unwrap_or_default();
            return Err(StepError::new(
                StepErrorKind::Diverged,
                format!(
                    "a rank refused the step the others ran (rank {ran} ran it, rank {refusal} \
                     refused: {why})"
                ),
            ));
        }
        let mut answers = answers.into_iter().flatten();
        let first = answers
            .next()
            .ok_or_else(|| StepError::new(StepErrorKind::Unreachable, "the group has no rank"))?;
        let ids = |r: &pb::StepResponse| r.tokens.iter().map(|t| t.token_id).collect::<Vec<_>>();
        let asked = &self.asked;
        let answered: Vec<u64> = first.tokens.iter().map(|t| t.sequence_id).collect();
        if answered != *asked {
            return Err(StepError::new(
                StepErrorKind::Diverged,
                format!("rank 0 sampled for sequences {answered:?}, the plan asked for {asked:?}"),
            ));
        }
        for (i, other) in answers.enumerate() {
            if ids(&other) != ids(&first) {
                return Err(StepError::new(
                    StepErrorKind::Diverged,
                    format!(
                        "ranks 0 and {} sampled different tokens: the group is out of step",
                        i + 1
                    ),
                ));
            }
        }
        Ok(StepOutput {
            timings: StepTimings {
                compute: Duration::from_micros(first.compute_us),
                collectives: Duration::from_micros(first.collective_us),
            },
            tokens: first.tokens,
            prompt_logprobs: first.prompt_logprobs,
        })
    }
}

/// A rank's failure after another rank refused the step: the refusal left the others stuck in
/// the step, so the ranks no longer agree whatever this failure says.
fn after_refusal(refused: bool, error: StepError) -> StepError {
    match refused {
        false => error,
        true => StepError::new(
            StepErrorKind::Diverged,
            format!("a rank refused the step the others ran ({error})"),
        ),
    }
}

impl StepExecutor for WorkerGroup {
    fn launch(&mut self, plan: &StepPlan, span: &tracing::Span) -> StepAnswer {
        StepAnswer::spawn(self.send_step(plan, span))
    }
}
