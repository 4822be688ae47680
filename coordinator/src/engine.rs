//! The engine: one task that owns every in-flight request and drives a [`StepExecutor`] step by
//! step with continuous batching (iteration-level scheduling, as in Orca, vLLM and
//! text-generation-inference).
//!
//! Each turn of its loop takes new requests, drops those whose client went away, asks the
//! [`Scheduler`] for a plan, runs it on the executor, feeds what it sampled back to the
//! scheduler and to each request's [`RequestOutput`] (text, stop strings, the end), and ends the
//! requests that are done. The policy lives in the scheduler and the text in the output
//! processor; this loop only moves data between them and the executor.
//!
//! A failed step ends the requests it touched with an explicit error; nothing is dropped
//! silently. A step every rank refused ([`StepErrorKind::Rejected`]) leaves the group serving;
//! any other failure marks the group unhealthy, ends every request in flight, and tells the
//! owner (through [`EngineHandle::failed`]) to form the group again.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

use caravan_proto as pb;
use tokio::sync::{mpsc, watch};

use crate::{
    blocks::BlockManager,
    executor::{StepError, StepExecutor},
    group::SharedHealth,
    model_info::ModelInfo,
    output::{Event, FinishReason, RequestOutput, StopLimits, Stops},
    scheduler::{Scheduler, SchedulerConfig, SequenceId, StepPlan},
    stats::EngineStats,
    structured::Constraint,
    tokenizer::Tokenizer,
};

/// A validated generation request.
pub struct GenerationRequest {
    pub prompt: Vec<i64>,
    pub max_tokens: usize,
    pub sampling: pb::SamplingParams,
    pub stop: Vec<String>,
    /// Tokens that end the request like end-of-sequence (not shown).
    pub stop_token_ids: Vec<i64>,
    /// Generate past end-of-sequence until `max_tokens` or a stop string.
    pub ignore_eos: bool,
    pub events: mpsc::UnboundedSender<Event>,
    /// The request's trace span: queueing and steps become its children.
    pub span: tracing::Span,
    /// Requests with the same key and prompt (the choices of one API request, `n` > 1) share
    /// the prompt's KV blocks: the first submitted computes it, the others reuse it.
    pub prompt_group: Option<u64>,
    /// Structured outputs: what the sampled tokens must spell.
    pub constraint: Option<Constraint>,
}

/// Submits requests to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    requests: mpsc::UnboundedSender<GenerationRequest>,
    retire: Arc<watch::Sender<bool>>,
    failed: watch::Receiver<Option<StepError>>,
    queued: Arc<AtomicUsize>,
    max_waiting: usize,
    stats: Arc<EngineStats>,
}

/// Why a request was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Stopped,
}

impl EngineHandle {
    /// Stops the engine for good (its group failed or was replaced, or this coordinator stepped
    /// down): a step in flight is abandoned, every request ends with an error, and the engine
    /// no longer touches the shared health, which belongs to the next group.
    pub fn retire(&self) {
        let _ = self.retire.send(true);
    }

    /// Resolves once a step has failed in a way the group cannot survive (it must be formed
    /// again); never while the engine serves.
    pub async fn failed(&self) -> StepError {
        let mut failed = self.failed.clone();
        let error = match failed.wait_for(Option::is_some).await {
            Ok(error) => error.clone(),
            // The engine stopped without a step failure (retired): nothing to report.
            Err(_) => None,
        };
        match error {
            Some(error) => error,
            None => std::future::pending().await,
        }
    }

    pub fn submit(&self, request: GenerationRequest) -> Result<(), SubmitError> {
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_waiting).then_some(n + 1)
            });
        if admitted.is_err() {
            EngineStats::add(&self.stats.requests_rejected_queue_full, 1);
            return Err(SubmitError::QueueFull);
        }
        EngineStats::add(&self.stats.in_flight, 1);
        self.requests.send(request).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            EngineStats::sub(&self.stats.in_flight, 1);
            SubmitError::Stopped
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

/// A request the engine is serving.
struct Active {
    output: RequestOutput,
    span: tracing::Span,
    /// Still counted against `max_waiting` (never admitted yet).
    queued: bool,
    /// Open while the request waits for a batch slot.
    queue_span: Option<tracing::Span>,
    arrived: Instant,
    last_token_at: Option<Instant>,
    prompt_group: Option<u64>,
    constraint: Option<Constraint>,
}

/// The engine's state: the scheduler, the executor and the requests.
pub struct Engine<E: StepExecutor> {
    executor: E,
    scheduler: Scheduler,
    requests: HashMap<SequenceId, Active>,
    /// The first request of each live prompt group, which computes the shared prompt.
    group_leaders: HashMap<u64, SequenceId>,
    health: SharedHealth,
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Arc<[i64]>,
    max_context: usize,
    queued: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    /// Turns true when the handle's owner retires this engine.
    retired: watch::Receiver<bool>,
    failed: watch::Sender<Option<StepError>>,
}

impl<E: StepExecutor> Engine<E> {
    /// Starts the engine task; returns the handle to submit to.
    pub fn start(
        executor: E,
        health: SharedHealth,
        tokenizer: Arc<Tokenizer>,
        model: ModelInfo,
        blocks: BlockManager,
        config: SchedulerConfig,
        stats: Arc<EngineStats>,
    ) -> EngineHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let (retire, retired) = watch::channel(false);
        let (failed, failed_rx) = watch::channel(None);
        let queued = Arc::new(AtomicUsize::new(0));
        EngineStats::set(&stats.kv_blocks_total, blocks.total_blocks());
        EngineStats::set(&stats.block_size, blocks.block_size());
        let handle = EngineHandle {
            requests: tx,
            retire: Arc::new(retire),
            failed: failed_rx,
            queued: queued.clone(),
            max_waiting: config.max_waiting.max(1),
            stats: stats.clone(),
        };
        let engine = Engine {
            executor,
            scheduler: Scheduler::new(config, blocks),
            requests: HashMap::new(),
            group_leaders: HashMap::new(),
            health,
            tokenizer,
            eos_token_ids: model.eos_token_ids.into(),
            max_context: model.max_context,
            queued,
            stats,
            retired,
            failed,
        };
        tokio::spawn(engine.run(rx));
        handle
    }

    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<GenerationRequest>) {
        loop {
            if *self.retired.borrow() {
                // Nothing submitted is dropped unanswered: what is queued fails too.
                requests.close();
                while let Ok(r) = requests.try_recv() {
                    self.enqueue(r);
                }
                self.fail_all(&self.retired_reason());
                return;
            }
            if self.scheduler.is_idle() {
                self.publish_stats();
                let mut retired = self.retired.clone();
                tokio::select! {
                    biased;
                    _ = retired.wait_for(|r| *r) => continue,
                    next = requests.recv() => match next {
                        Some(r) => self.enqueue(r),
                        None => return,
                    },
                }
            }
            while let Ok(r) = requests.try_recv() {
                self.enqueue(r);
            }
            if !self.health.is_ready() {
                let reason = format!("the worker group is not ready: {}", self.health.reason());
                self.fail_all(&reason);
                continue;
            }
            self.drop_cancelled();
            let plan = self.scheduler.schedule();
            self.account_plan(&plan);
            self.publish_stats();
            if plan.is_empty() {
                if self.scheduler.running() == 0 && self.scheduler.waiting() > 0 {
                    // Cannot happen while the pool holds a full context (checked at start-up);
                    // never spin on it.
                    self.fail_all("the KV cache cannot hold the waiting request");
                }
                continue;
            }
            self.step(plan).await;
        }
    }

    fn enqueue(&mut self, mut request: GenerationRequest) {
        let queue_span = tracing::info_span!(parent: &request.span, "queue");
        if request.sampling.min_tokens > 0 {
            // The workers hold back whatever would end the request early.
            let eos = (!request.ignore_eos).then_some(&self.eos_token_ids[..]);
            request.sampling.min_tokens_banned = eos
                .into_iter()
                .flatten()
                .chain(&request.stop_token_ids)
                .copied()
                .collect();
        }
        let output = RequestOutput::new(
            self.tokenizer.clone(),
            self.eos_token_ids.clone(),
            &request.prompt,
            Stops {
                strings: request.stop,
                token_ids: request.stop_token_ids,
            },
            StopLimits {
                max_tokens: request.max_tokens,
                max_context: self.max_context,
                ignore_eos: request.ignore_eos,
                min_tokens: request.sampling.min_tokens as usize,
            },
            request.events,
            request.sampling.prompt_logprobs.is_some(),
        );
        let leader = request
            .prompt_group
            .and_then(|g| self.group_leaders.get(&g).copied());
        let id = self
            .scheduler
            .add_after(request.prompt, request.sampling, leader);
        if let (Some(group), None) = (request.prompt_group, leader) {
            self.group_leaders.insert(group, id);
        }
        self.requests.insert(
            id,
            Active {
                output,
                span: request.span,
                queued: true,
                queue_span: Some(queue_span),
                arrived: Instant::now(),
                last_token_at: None,
                prompt_group: request.prompt_group,
                constraint: request.constraint,
            },
        );
    }

    /// Ends request `id` (its scheduler state too); returns what it was, if it was there.
    fn end(&mut self, id: SequenceId) -> Option<Active> {
        self.scheduler.finish(id);
        let mut active = self.requests.remove(&id)?;
        if let Some(group) = active.prompt_group {
            if self.group_leaders.get(&group) == Some(&id) {
                self.group_leaders.remove(&group);
            }
        }
        if std::mem::take(&mut active.queued) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        EngineStats::sub(&self.stats.in_flight, 1);
        Some(active)
    }

    /// Counts what making `plan` did: admissions, preemptions, prefix-cache lookups.
    fn account_plan(&mut self, plan: &StepPlan) {
        let s = &self.stats;
        EngineStats::add(&s.preemptions, plan.preempted.len());
        EngineStats::add(&s.prefix_cache_queried_tokens, plan.prefix_queried_tokens);
        EngineStats::add(&s.prefix_cache_hit_tokens, plan.prefix_hit_tokens);
        for id in &plan.first_admitted {
            let Some(active) = self.requests.get_mut(id) else {
                continue;
            };
            if std::mem::take(&mut active.queued) {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
            active.queue_span = None;
            if let Some(tokens) = self.scheduler.tokens(*id) {
                EngineStats::add(&s.prompt_tokens, tokens.len());
            }
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        EngineStats::set(&s.waiting, self.scheduler.waiting());
        EngineStats::set(&s.running, self.scheduler.running());
        EngineStats::set(&s.kv_blocks_used, self.scheduler.blocks().used_blocks());
        EngineStats::set(&s.kv_blocks_cached, self.scheduler.blocks().cached_blocks());
    }

    fn retired_reason(&self) -> String {
        format!("the worker group stopped: {}", self.health.reason())
    }

    /// Ends `ids` with an explicit error.
    fn fail(&mut self, ids: &[SequenceId], reason: &str) {
        let mut failed = 0;
        for &id in ids {
            if let Some(active) = self.end(id) {
                active.output.fail(reason);
                failed += 1;
            }
        }
        EngineStats::add(&self.stats.requests_failed, failed);
        self.publish_stats();
    }

    fn fail_all(&mut self, reason: &str) {
        let ids = self.scheduler.ids();
        self.fail(&ids, reason);
    }

    /// Drops requests whose client went away, running or waiting; the workers hear of it with
    /// the next plan.
    fn drop_cancelled(&mut self) {
        let cancelled: Vec<SequenceId> = self
            .requests
            .iter()
            .filter(|(_, a)| a.output.is_cancelled())
            .map(|(&id, _)| id)
            .collect();
        EngineStats::add(&self.stats.requests_cancelled, cancelled.len());
        for id in cancelled {
            tracing::debug!(id, "request cancelled by the client");
            self.end(id);
        }
    }

    /// The step's trace span: a child of the first request's trace, linked from the others'.
    fn step_span(&self, plan: &StepPlan) -> tracing::Span {
        let mut members = plan
            .sequences
            .iter()
            .filter_map(|p| self.requests.get(&p.id));
        let Some(first) = members.next() else {
            return tracing::Span::none();
        };
        let span = tracing::info_span!(
            parent: &first.span,
            "step",
            sequences = plan.sequences.len(),
            tokens = plan.tokens()
        );
        for other in members {
            span.follows_from(&other.span);
        }
        span
    }

    /// Puts each constrained sequence's allowed tokens on the plan; returns those whose
    /// constraint failed, with why.
    fn attach_masks(&mut self, plan: &mut StepPlan) -> Vec<(SequenceId, String)> {
        let started = Instant::now();
        let mut masked = false;
        let mut failed = Vec::new();
        for p in plan.sequences.iter_mut().filter(|p| p.sample) {
            let Some(constraint) = self
                .requests
                .get_mut(&p.id)
                .and_then(|a| a.constraint.as_mut())
            else {
                continue;
            };
            masked = true;
            match constraint.mask() {
                Ok(mask) => p.allowed_tokens = Some(mask),
                Err(why) => failed.push((p.id, why)),
            }
        }
        if masked {
            EngineStats::add(
                &self.stats.mask_micros,
                started.elapsed().as_micros() as usize,
            );
        }
        failed
    }

    async fn step(&mut self, mut plan: StepPlan) {
        let mut broken = self.attach_masks(&mut plan);
        let span = self.step_span(&plan);
        let started = Instant::now();
        let mut retired = self.retired.clone();
        let result = tokio::select! {
            biased;
            _ = retired.wait_for(|r| *r) => None,
            result = self.executor.step(&plan, &span) => Some(result),
        };
        let Some(result) = result else {
            // Abandoned: the step's answers would no longer mean anything.
            self.fail_all(&self.retired_reason());
            return;
        };
        let output = match result {
            Ok(output) => output,
            Err(e) => return self.step_failed(&plan, e),
        };
        let s = &self.stats;
        let wall = started.elapsed();
        EngineStats::add(&s.step_micros, wall.as_micros() as usize);
        EngineStats::add(
            &s.outside_worker_micros,
            wall.saturating_sub(output.timings.compute).as_micros() as usize,
        );
        EngineStats::add(
            &s.worker_compute_micros,
            output.timings.compute.as_micros() as usize,
        );
        EngineStats::add(
            &s.collective_micros,
            output.timings.collectives.as_micros() as usize,
        );
        EngineStats::add(&s.steps, 1);
        EngineStats::add(&s.step_tokens, plan.tokens());
        EngineStats::add(&s.generation_tokens, output.tokens.len());
        let sampled: Vec<(SequenceId, i64)> = output
            .tokens
            .iter()
            .map(|t| (t.sequence_id, t.token_id))
            .collect();
        self.scheduler.apply(&plan, &sampled);
        for scores in output.prompt_logprobs {
            if let Some(active) = self.requests.get_mut(&scores.sequence_id) {
                active.output.push_prompt_logprobs(scores);
            }
        }
        let now = Instant::now();
        for token in &output.tokens {
            let Some(active) = self.requests.get_mut(&token.sequence_id) else {
                continue;
            };
            if broken.iter().any(|(id, _)| *id == token.sequence_id) {
                continue;
            }
            match active.last_token_at.replace(now) {
                None => self.stats.time_to_first_token.observe(now - active.arrived),
                Some(last) => self.stats.inter_token_latency.observe(now - last),
            }
            let eos = self.eos_token_ids.contains(&token.token_id);
            let complete = match active
                .constraint
                .as_mut()
                .map(|c| c.accept(token.token_id, eos))
            {
                None => false,
                Some(Ok(complete)) => complete,
                Some(Err(why)) => {
                    broken.push((token.sequence_id, why));
                    continue;
                }
            };
            let Some(reason) = active.output.push(token, complete) else {
                continue;
            };
            self.stats.end_to_end_latency.observe(now - active.arrived);
            EngineStats::add(
                match reason {
                    FinishReason::Stop => &self.stats.requests_stopped,
                    FinishReason::Length => &self.stats.requests_length,
                },
                1,
            );
            self.end(token.sequence_id);
        }
        for (id, why) in broken {
            self.fail(&[id], &format!("structured output: {why}"));
        }
    }

    /// Ends what a failed step touched: only its own requests when the group survives, every
    /// request otherwise (and the group is reported failed).
    fn step_failed(&mut self, plan: &StepPlan, error: StepError) {
        let reason = format!("step failed: {error}");
        tracing::warn!(kind = error.kind.as_str(), %reason, "step failed");
        EngineStats::add(self.stats.step_failures(error.kind), 1);
        if error.kind.group_survives() {
            let ids: Vec<SequenceId> = plan.sequences.iter().map(|p| p.id).collect();
            self.fail(&ids, &reason);
            return;
        }
        // A retired engine's failure is not the current group's.
        if !*self.retired.borrow() {
            self.health.fail(reason.clone());
            let _ = self.failed.send(Some(error));
        }
        self.fail_all(&reason);
    }
}
