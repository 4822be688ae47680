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
//! With asynchronous scheduling (`--async-scheduling`, as vLLM v1's), the step after the one in
//! flight is planned and sent before its answer arrives, whenever every running sequence simply
//! decodes on ([`Scheduler::schedule_ahead`]): the ranks run steps in the order sent and feed each
//! sequence the token they sampled for it, so the coordinator's round trip overlaps the workers'
//! compute. A sequence found finished from the earlier answer has its extra token dropped, never
//! shown; admissions, prefill, preemption and structured outputs wait for the answer, as before.
//!
//! The engine outlives its worker groups. A step every rank refused ([`StepErrorKind::Rejected`])
//! ends that step's requests with an explicit error and leaves the group serving. Any other
//! failure, or the owner's word that the group is gone ([`EngineControl::detach`]), loses the
//! group: the owner hears of it ([`EngineControl::failed`]) and forms one again, while every
//! request stays where it is, its stream open. Once the new group is attached
//! ([`EngineControl::attach`]), the sequences that were running are recomputed from the tokens
//! the coordinator holds (prompt and generated, exactly as after a preemption) and go on; the
//! workers' sampler resumes each random stream at the same position, so no token is sent twice,
//! skipped, or drawn differently. A request that waits for a group longer than the recovery
//! timeout, or was in too many failed steps, ends with an explicit error; nothing is dropped
//! silently.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use caravan_proto as pb;
use tokio::sync::{mpsc, watch};

use crate::{
    blocks::BlockManager,
    executor::{StepAnswer, StepError, StepErrorKind, StepExecutor},
    health::SharedHealth,
    model_info::ModelInfo,
    output::{Event, FinishReason, RequestOutput, StopCriteria},
    scheduler::{Scheduler, SchedulerConfig, SequenceId, StepPlan},
    stats::EngineStats,
    structured::Constraint,
    tokenizer::Tokenizer,
};

/// A validated generation request.
pub struct GenerationRequest {
    pub prompt: Vec<i64>,
    /// Complete, as the workers apply them.
    pub sampling: pb::SamplingParams,
    /// When the completion ends.
    pub stop: StopCriteria,
    pub events: mpsc::UnboundedSender<Event>,
    /// The request's trace span: queueing and steps become its children.
    pub span: tracing::Span,
    /// Requests with the same key and prompt (the choices of one API request, `n` > 1) share
    /// the prompt's KV blocks: the first submitted computes it, the others reuse it.
    pub prompt_group: Option<u64>,
    /// Structured outputs: what the sampled tokens must spell.
    pub constraint: Option<Constraint>,
}

/// The engine's limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// How long a request waits for a failed group's successor before it ends with an error;
    /// zero ends the requests in flight as soon as their group fails.
    pub recovery_timeout: Duration,
    /// Plan and send the next decode step while the one before it runs (see [`Engine`]).
    pub async_scheduling: bool,
}

/// A request that was in this many steps that failed their group is not recomputed again: it
/// may be what brings the ranks down.
const MAX_FAILED_STEPS: u32 = 3;

/// How often a request waiting for a group is checked for its deadline and its client.
const RECOVERY_TICK: Duration = Duration::from_millis(100);

/// Submits requests to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    requests: mpsc::UnboundedSender<GenerationRequest>,
    retire: Arc<watch::Sender<bool>>,
    queued: Arc<AtomicUsize>,
    max_waiting: usize,
    stats: Arc<EngineStats>,
}

/// What the owner tells the engine about its group.
enum GroupChange<E> {
    /// Serve on this newly formed group, whose KV-cache pool `blocks` describes.
    Attach(E, BlockManager),
    /// The group can no longer serve (the owner saw a rank fail): stop stepping on it.
    Detach(String),
}

/// The owner's side of an engine: hands it each group formed, and hears when one is lost.
pub struct EngineControl<E> {
    changes: mpsc::UnboundedSender<GroupChange<E>>,
    failed: Arc<watch::Sender<Option<StepError>>>,
}

impl<E> EngineControl<E> {
    /// Gives the engine a newly formed group, after the last one was lost: the sequences that
    /// were running are recomputed on it.
    pub fn attach(&self, executor: E, blocks: BlockManager) {
        self.failed.send_replace(None);
        let _ = self.changes.send(GroupChange::Attach(executor, blocks));
    }

    /// Tells the engine its group is gone (a step in flight is abandoned); the requests wait
    /// for the next group.
    pub fn detach(&self, reason: impl Into<String>) {
        let _ = self.changes.send(GroupChange::Detach(reason.into()));
    }

    /// Resolves once a step has failed in a way the group cannot survive (it must be formed
    /// again and attached); never while the group serves.
    pub async fn failed(&self) -> StepError {
        let mut failed = self.failed.subscribe();
        let error = match failed.wait_for(Option::is_some).await {
            Ok(error) => error.clone(),
            Err(_) => None,
        };
        match error {
            Some(error) => error,
            None => std::future::pending().await,
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Stopped,
}

impl EngineHandle {
    /// Stops the engine for good (this coordinator stepped down, or its drain timed out): a
    /// step in flight is abandoned, every request ends with an error, and the engine no longer
    /// touches the shared health, which belongs to whoever serves next.
    pub fn retire(&self) {
        let _ = self.retire.send(true);
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
    /// While it waits for a group (its own failed, or it arrived during a recovery): when it
    /// ends with an error if none has been attached.
    recover_by: Option<Instant>,
    /// Steps it was in that failed their group.
    failed_steps: u32,
}

/// A step sent to the executor whose answer the engine has not taken yet.
struct InFlight {
    plan: StepPlan,
    sent: Instant,
    /// Sequences whose structured-output mask failed: their tokens are not taken.
    broken: Vec<(SequenceId, String)>,
    answer: StepAnswer,
}

/// How a step in flight ended.
enum Interrupted<E, T> {
    /// It did not: its result.
    No(T),
    Retired,
    /// The owner changed the group.
    Changed(Option<GroupChange<E>>),
}

/// The engine's state: the scheduler, the executor and the requests.
pub struct Engine<E: StepExecutor> {
    /// The group stepped on; none while the next is being formed.
    executor: Option<E>,
    changes: mpsc::UnboundedReceiver<GroupChange<E>>,
    /// When the last group was lost, while there is none.
    lost_at: Option<Instant>,
    recovery_timeout: Duration,
    scheduler: Scheduler,
    requests: HashMap<SequenceId, Active>,
    /// The first request of each live prompt group, which computes the shared prompt.
    group_leaders: HashMap<u64, SequenceId>,
    health: SharedHealth,
    tokenizer: Arc<Tokenizer>,
    /// End-of-sequence ends a structured output's grammar.
    eos_token_ids: Arc<[i64]>,
    queued: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    /// Turns true when the handle's owner retires this engine.
    retired: watch::Receiver<bool>,
    /// The owner is gone (its control dropped): nothing will be attached again.
    orphaned: bool,
    failed: Arc<watch::Sender<Option<StepError>>>,
    async_scheduling: bool,
    /// Steps sent whose answers are still to be taken, oldest first: at most two, the second
    /// planned ahead of the first's answer.
    in_flight: VecDeque<InFlight>,
    /// When the last step's answer arrived (a step sent ahead starts running then).
    last_answer: Option<Instant>,
}

impl<E: StepExecutor> Engine<E> {
    /// Starts the engine task serving on `executor`, a group whose KV-cache pool `blocks`
    /// describes; returns the handle to submit to and the owner's control.
    pub fn start(
        executor: E,
        blocks: BlockManager,
        health: SharedHealth,
        tokenizer: Arc<Tokenizer>,
        model: ModelInfo,
        config: EngineConfig,
        stats: Arc<EngineStats>,
    ) -> (EngineHandle, EngineControl<E>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (retire, retired) = watch::channel(false);
        let (changes, changes_rx) = mpsc::unbounded_channel();
        let failed = Arc::new(watch::Sender::new(None));
        let queued = Arc::new(AtomicUsize::new(0));
        EngineStats::set(&stats.kv_blocks_total, blocks.total_blocks());
        EngineStats::set(&stats.block_size, blocks.block_size());
        let handle = EngineHandle {
            requests: tx,
            retire: Arc::new(retire),
            queued: queued.clone(),
            max_waiting: config.scheduler.max_waiting.max(1),
            stats: stats.clone(),
        };
        let control = EngineControl {
            changes,
            failed: failed.clone(),
        };
        let engine = Engine {
            executor: Some(executor),
            changes: changes_rx,
            lost_at: None,
            recovery_timeout: config.recovery_timeout,
            async_scheduling: config.async_scheduling,
            in_flight: VecDeque::new(),
            last_answer: None,
            scheduler: Scheduler::new(config.scheduler, blocks),
            requests: HashMap::new(),
            group_leaders: HashMap::new(),
            health,
            tokenizer,
            eos_token_ids: model.eos_token_ids.into(),
            queued,
            stats,
            retired,
            orphaned: false,
            failed,
        };
        tokio::spawn(engine.run(rx));
        (handle, control)
    }

    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<GenerationRequest>) {
        loop {
            if *self.retired.borrow() || self.orphaned {
                // Nothing submitted is dropped unanswered: what is queued fails too.
                requests.close();
                while let Ok(r) = requests.try_recv() {
                    self.enqueue(r);
                }
                self.fail_all(&self.retired_reason());
                return;
            }
            if self.executor.is_none() {
                if !self.wait_for_group(&mut requests).await {
                    return;
                }
                continue;
            }
            if self.scheduler.is_idle() && self.in_flight.is_empty() {
                self.publish_stats();
                let mut retired = self.retired.clone();
                tokio::select! {
                    biased;
                    _ = retired.wait_for(|r| *r) => continue,
                    change = self.changes.recv() => {
                        self.change_group(change);
                        continue;
                    }
                    next = requests.recv() => match next {
                        Some(r) => self.enqueue(r),
                        None => return,
                    },
                }
            }
            while let Ok(r) = requests.try_recv() {
                self.enqueue(r);
            }
            self.drop_cancelled();
            if self.in_flight.is_empty() {
                let plan = self.scheduler.schedule();
                self.account_plan(&plan);
                self.publish_stats();
                if plan.is_empty() {
                    if self.scheduler.running() == 0 && self.scheduler.waiting() > 0 {
                        // Cannot happen while the pool holds a full context (checked at
                        // start-up); never spin on it.
                        self.fail_all("the KV cache cannot hold the waiting request");
                    }
                    continue;
                }
                self.launch(plan);
            }
            if self.in_flight.len() == 1 {
                if let Some(plan) = self.plan_ahead() {
                    EngineStats::add(&self.stats.steps_planned_ahead, 1);
                    self.launch(plan);
                }
                // Requests that arrived while steps ran ahead are counted as waiting.
                self.publish_stats();
            }
            self.take_answer().await;
        }
    }

    /// Asynchronous scheduling: the step after the one in flight, planned before its answer
    /// arrives, when every running sequence simply decodes on (see
    /// [`Scheduler::schedule_ahead`]). Sequences that cannot run ahead keep the whole batch
    /// waiting for the answer: a structured output (its next mask needs the token) and a
    /// sequence that may end with the token in flight by its length. Asked with one step in
    /// flight.
    fn plan_ahead(&mut self) -> Option<StepPlan> {
        if !self.async_scheduling {
            return None;
        }
        let can_run_ahead = self.scheduler.running_ids().into_iter().all(|id| {
            self.requests.get(&id).is_some_and(|active| {
                active.constraint.is_none()
                    && active
                        .output
                        .has_room_after(self.scheduler.generated(id) + 1)
            })
        });
        if !can_run_ahead {
            return None;
        }
        let in_flight = &self.in_flight.back()?.plan;
        self.scheduler.schedule_ahead(in_flight)
    }

    /// Without a group: queues what arrives and ends requests whose client went away or whose
    /// recovery deadline passed, until a group is attached. False when nothing will be (the
    /// request channel closed); a retired or orphaned engine returns true for `run` to end it.
    async fn wait_for_group(
        &mut self,
        requests: &mut mpsc::UnboundedReceiver<GenerationRequest>,
    ) -> bool {
        let mut retired = self.retired.clone();
        while self.executor.is_none() && !self.orphaned {
            self.drop_cancelled();
            self.expire_recoveries();
            self.publish_stats();
            tokio::select! {
                biased;
                _ = retired.wait_for(|r| *r) => return true,
                change = self.changes.recv() => self.change_group(change),
                next = requests.recv() => match next {
                    Some(r) => self.enqueue(r),
                    None => return false,
                },
                _ = tokio::time::sleep(RECOVERY_TICK) => {}
            }
        }
        true
    }

    /// Applies what the owner said about the group (`None`: the owner is gone).
    fn change_group(&mut self, change: Option<GroupChange<E>>) {
        match change {
            Some(GroupChange::Attach(executor, blocks)) => self.attach(executor, blocks),
            Some(GroupChange::Detach(reason)) => {
                if self.executor.is_some() {
                    self.lose_group(StepError::new(StepErrorKind::Unreachable, reason), &[]);
                }
            }
            None => {
                self.orphaned = true;
                self.executor = None;
                self.in_flight.clear();
            }
        }
    }

    /// Takes a newly formed group: what was running is recomputed on it.
    fn attach(&mut self, executor: E, blocks: BlockManager) {
        if self.executor.is_some() {
            // The owner replaced a group the engine had not seen fail: its caches go with it.
            self.lose_group(
                StepError::new(StepErrorKind::Unreachable, "the group was replaced"),
                &[],
            );
        }
        EngineStats::set(&self.stats.kv_blocks_total, blocks.total_blocks());
        EngineStats::set(&self.stats.block_size, blocks.block_size());
        let resumed = self.scheduler.restart(blocks);
        EngineStats::add(&self.stats.requests_resumed, resumed);
        if let Some(lost) = self.lost_at.take() {
            self.stats.recovery.observe(lost.elapsed());
        }
        for active in self.requests.values_mut() {
            active.recover_by = None;
        }
        tracing::info!(
            resumed,
            "a new worker group took over the requests in flight"
        );
        self.executor = Some(executor);
    }

    /// The group is gone (`error` says why; `failed_plan` holds the sequences of the step that
    /// failed it, if one did): the owner hears of it, and every request waits for the next group
    /// until the recovery timeout.
    fn lose_group(&mut self, error: StepError, failed_plan: &[SequenceId]) {
        self.executor = None;
        // Steps sent after the failed one are abandoned with the group.
        self.in_flight.clear();
        let reason = format!("step failed: {error}");
        let now = Instant::now();
        self.lost_at = Some(now);
        // A retired engine's failure is not the current group's.
        if !*self.retired.borrow() {
            self.health
                .set_lost(reason.clone(), !self.recovery_timeout.is_zero());
            self.failed.send_replace(Some(error));
        }
        if self.recovery_timeout.is_zero() {
            self.fail_all(&reason);
            return;
        }
        let deadline = now + self.recovery_timeout;
        let mut given_up = Vec::new();
        for (&id, active) in &mut self.requests {
            if failed_plan.contains(&id) {
                active.failed_steps += 1;
                if active.failed_steps >= MAX_FAILED_STEPS {
                    given_up.push(id);
                    continue;
                }
            }
            active.recover_by = Some(active.recover_by.map_or(deadline, |d| d.min(deadline)));
        }
        self.fail(
            &given_up,
            &format!("{reason} (the request was in {MAX_FAILED_STEPS} steps that failed their group: it is not retried again)"),
        );
    }

    /// Ends the requests that waited for a group past their deadline.
    fn expire_recoveries(&mut self) {
        let now = Instant::now();
        let expired: Vec<SequenceId> = self
            .requests
            .iter()
            .filter(|(_, a)| a.recover_by.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        if !expired.is_empty() {
            let reason = format!(
                "the worker group is not ready: {} (no group formed within the recovery timeout, {:?})",
                self.health.reason(),
                self.recovery_timeout
            );
            self.fail(&expired, &reason);
        }
    }

    fn enqueue(&mut self, request: GenerationRequest) {
        let queue_span = tracing::info_span!(parent: &request.span, "queue");
        let output = RequestOutput::new(
            self.tokenizer.clone(),
            &request.prompt,
            request.stop,
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
                recover_by: self
                    .executor
                    .is_none()
                    .then(|| Instant::now() + self.recovery_timeout),
                failed_steps: 0,
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

    /// Sends `plan` to the executor.
    fn launch(&mut self, mut plan: StepPlan) {
        let broken = self.attach_masks(&mut plan);
        let span = self.step_span(&plan);
        let Some(executor) = self.executor.as_mut() else {
            return;
        };
        let answer = executor.launch(&plan, &span);
        self.in_flight.push_back(InFlight {
            plan,
            sent: Instant::now(),
            broken,
            answer,
        });
    }

    /// Waits for the oldest step's answer and takes it: the sampled tokens go to the scheduler
    /// and to each request's output, and the requests that are done end.
    async fn take_answer(&mut self) {
        let Some(mut step) = self.in_flight.pop_front() else {
            return;
        };
        let mut retired = self.retired.clone();
        let result = tokio::select! {
            biased;
            _ = retired.wait_for(|r| *r) => Interrupted::Retired,
            change = self.changes.recv() => Interrupted::Changed(change),
            result = &mut step.answer => Interrupted::No(result),
        };
        // Abandoned steps' answers would no longer mean anything.
        let result = match result {
            Interrupted::No(result) => result,
            Interrupted::Retired => {
                self.in_flight.clear();
                return self.fail_all(&self.retired_reason());
            }
            Interrupted::Changed(change) => {
                self.in_flight.clear();
                return self.change_group(change);
            }
        };
        let answered = Instant::now();
        // A step sent ahead started running when the one before it answered.
        let started = self
            .last_answer
            .map_or(step.sent, |last| last.max(step.sent));
        self.last_answer = Some(answered);
        let (plan, mut broken) = (step.plan, step.broken);
        let output = match result {
            Ok(output) => output,
            Err(e) => return self.step_failed(&plan, e),
        };
        let s = &self.stats;
        let wall = answered - started;
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
        // Tokens of sequences that ended meanwhile (sampled in a step sent ahead) are dropped.
        let taken = output
            .tokens
            .iter()
            .filter(|t| self.requests.contains_key(&t.sequence_id))
            .count();
        EngineStats::add(&s.generation_tokens, taken);
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

    /// Ends the requests of a step every rank refused (the group serves on); any other failure
    /// loses the group, and the requests wait for the next.
    fn step_failed(&mut self, plan: &StepPlan, error: StepError) {
        let reason = format!("step failed: {error}");
        tracing::warn!(kind = error.kind.as_str(), %reason, "step failed");
        EngineStats::add(self.stats.step_failures(error.kind), 1);
        let ids: Vec<SequenceId> = plan.sequences.iter().map(|p| p.id).collect();
        if error.kind.group_survives() {
            self.fail(&ids, &reason);
            return;
        }
        self.lose_group(error, &ids);
    }
}
