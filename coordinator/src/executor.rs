//! What runs a step: the [`StepExecutor`] trait the engine drives, what a step returns, and how
//! a step fails. The worker group over gRPC ([`crate::group::WorkerGroup`]) is the executor in
//! production; the kind of a failure decides what happens to the group ([`StepErrorKind`]).

use std::{future::Future, time::Duration};

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

/// Runs planned steps. One step at a time: the engine awaits each before planning the next.
pub trait StepExecutor: Send + 'static {
    /// Computes `plan` (its context traced under `span`) and samples what it asks for.
    fn step(
        &mut self,
        plan: &StepPlan,
        span: &tracing::Span,
    ) -> impl Future<Output = Result<StepOutput, StepError>> + Send;
}
