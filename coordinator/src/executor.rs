//! What runs a step: the [`StepExecutor`] trait the engine drives, the answer to a step sent
//! ([`StepAnswer`]), what a step returns, and how a step fails. The worker group over gRPC
//! ([`crate::group::WorkerGroup`]) is the executor in production; the kind of a failure decides
//! what happens to the group ([`StepErrorKind`]).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use caravan_proto as pb;

use crate::scheduler::StepPlan;

/// Where a rank's time went in one step.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimings {
    /// Forward pass and sampling.
    pub compute: Duration,
    /// Of which inside collectives.
    pub collectives: Duration,
}

/// What a step produced.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// One token for each planned sequence that asked to sample, in plan order.
    pub tokens: Vec<pb::SampledToken>,
    /// Prompt log-probabilities of the sequences that asked for them.
    pub prompt_logprobs: Vec<pb::PromptLogprobs>,
    /// Rank 0's timings.
    pub timings: StepTimings,
}

/// How a step failed, which decides what becomes of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepErrorKind {
    /// A rank did not answer in time (a stalled process, a collective that never completed,
    /// a rank cut off from the coordinator).
    Timeout,
    /// A rank could not be reached or its collective failed (a dead process, a broken link).
    Unreachable,
    /// Every rank refused the step before computing it (an invalid batch): the ranks are still
    /// in step with each other and with the coordinator, so the group goes on serving.
    Rejected,
    /// The ranks answered differently (different tokens, or some refused what others ran): their
    /// states can no longer be trusted to agree.
    Diverged,
}

impl StepErrorKind {
    /// A short stable name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StepErrorKind::Timeout => "timeout",
            StepErrorKind::Unreachable => "unreachable",
            StepErrorKind::Rejected => "rejected",
            StepErrorKind::Diverged => "diverged",
        }
    }

    /// Whether the group can take the next step as it is; if not, it must be formed again.
    pub fn group_survives(self) -> bool {
        self == StepErrorKind::Rejected
    }
}

/// A failed step.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub kind: StepErrorKind,
    pub message: String,
}

impl StepError {
    pub fn new(kind: StepErrorKind, message: impl Into<String>) -> Self {
        StepError {
            kind,
            message: message.into(),
        }
    }
}

/// Runs planned steps, in the order they are sent.
pub trait StepExecutor: Send + 'static {
    /// Sends `plan` to be computed (its context traced under `span`) and sampled. The answer
    /// borrows nothing: the engine may send the next step before it arrives (asynchronous
    /// scheduling), and the steps must run in the order sent.
    fn launch(&mut self, plan: &StepPlan, span: &tracing::Span) -> StepAnswer;
}

/// The answer to a sent step. The step runs on a task of its own from the moment it is sent,
/// whether or not anyone waits for the answer yet; dropping the answer abandons the step.
pub struct StepAnswer(tokio::task::JoinHandle<Result<StepOutput, StepError>>);

impl StepAnswer {
    /// Starts `step` now.
    pub fn spawn(
        step: impl Future<Output = Result<StepOutput, StepError>> + Send + 'static,
    ) -> Self {
        StepAnswer(tokio::spawn(step))
    }
}

impl Future for StepAnswer {
    type Output = Result<StepOutput, StepError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| {
            joined.unwrap_or_else(|e| {
                Err(StepError::new(
                    StepErrorKind::Unreachable,
                    format!("the step's task ended without an answer: {e}"),
                ))
            })
        })
    }
}

impl Drop for StepAnswer {
    fn drop(&mut self) {
        self.0.abort();
    }
}
