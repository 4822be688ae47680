//! The scheduler: one task that owns every in-flight request and drives the worker group step by
//! step with continuous batching (iteration-level scheduling, as in Orca, vLLM and
//! text-generation-inference).
//!
//! Each step has a token budget. Running sequences that decode take one token each first; then
//! sequences still prefilling, then newly admitted ones, take chunks of their prompts from what is
//! left (chunked prefill: a long prompt is spread over several steps instead of stalling every
//! stream). KV blocks are taken as tokens arrive; a new sequence first reuses cached blocks of
//! an identical prompt prefix. When blocks run out, the most recently admitted sequence is
//! preempted: its blocks are freed and it goes back to the head of the queue, to be recomputed
//! (its prompt and generated tokens prefilled again) when room returns. Workers keep its
//! sampling state meanwhile, so a seeded request samples the same tokens either way.
//!
//! Between steps, requests whose client went away are dropped and their blocks freed. A failed
//! step fails every in-flight request explicitly and marks the group unhealthy; nothing is
//! dropped silently.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use caravan_proto as pb;
use tokio::sync::{mpsc, watch};

use crate::{
    blocks::{BlockManager, HashChain},
    group::{SharedHealth, WorkerGroup},
    model_info::ModelInfo,
    stats::EngineStats,
    tokenizer::{Detokenizer, Tokenizer},
};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the model's context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token, as the API reports it.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: i64,
    /// The text this token added (empty while a multi-byte character is incomplete).
    pub piece: String,
    pub logprob: f32,
    /// Most likely alternatives as (text, logprob), most likely first.
    pub top_logprobs: Vec<(String, f32)>,
}

/// What a request's stream receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// New text (after stop-string hold-back) and the token that produced it.
    Token { text: String, token: TokenOut },
    /// The end: the remaining text, why, and the usage counts.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed; no more events follow.
    Error(String),
}

/// A validated generation request.
pub struct GenerationRequest {
    pub prompt: Vec<i64>,
    pub max_tokens: usize,
    pub sampling: pb::SamplingParams,
    pub stop: Vec<String>,
    /// Generate past end-of-sequence until `max_tokens` or a stop string.
    pub ignore_eos: bool,
    pub events: mpsc::UnboundedSender<Event>,
    /// The request's trace span: queueing and steps become its children.
    pub span: tracing::Span,
}

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_batch_size: usize,
    /// Most tokens computed in one step (decodes plus prefill chunks).
    pub max_batched_tokens: usize,
    /// Most requests waiting for a batch slot; beyond it, submissions are refused.
    pub max_waiting: usize,
}

/// Submits requests to the scheduler.
#[derive(Clone)]
pub struct EngineHandle {
    requests: mpsc::UnboundedSender<GenerationRequest>,
    retire: Arc<watch::Sender<bool>>,
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

/// A request in the scheduler: waiting, running, or preempted (waiting again).
struct Sequence {
    id: u64,
    request: GenerationRequest,
    /// Prompt followed by the generated tokens.
    tokens: Vec<i64>,
    /// Leading tokens whose keys and values are in the workers' caches.
    computed: usize,
    blocks: Vec<u32>,
    chain: HashChain,
    /// Still counted against `max_waiting` (never admitted yet).
    queued: bool,
    /// Open while the sequence waits for a batch slot.
    queue_span: Option<tracing::Span>,
    arrived: std::time::Instant,
    last_token_at: Option<std::time::Instant>,
    detokenizer: Detokenizer,
    text: String,
    emitted: usize,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.request.prompt.len()
    }

    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    fn fail(&self, reason: &str) {
        let _ = self.request.events.send(Event::Error(reason.to_string()));
    }
}

/// One sequence's share of a step.
struct Scheduled {
    id: u64,
    tokens: usize,
}

/// The scheduler's state.
pub struct Engine {
    group: WorkerGroup,
    health: SharedHealth,
    tokenizer: Arc<Tokenizer>,
    model: ModelInfo,
    blocks: BlockManager,
    config: SchedulerConfig,
    queued: Arc<AtomicUsize>,
    stats: Arc<EngineStats>,
    /// Turns true when the handle's owner retires this engine.
    retired: watch::Receiver<bool>,
    waiting: VecDeque<Sequence>,
    /// In admission order: preemption takes from the back.
    running: Vec<Sequence>,
    next_id: u64,
}

impl Engine {
    /// Starts the scheduler task; returns the handle to submit to.
    pub fn start(
        group: WorkerGroup,
        health: SharedHealth,
        tokenizer: Arc<Tokenizer>,
        model: ModelInfo,
        blocks: BlockManager,
        config: SchedulerConfig,
        stats: Arc<EngineStats>,
    ) -> EngineHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let (retire, retired) = watch::channel(false);
        let queued = Arc::new(AtomicUsize::new(0));
        EngineStats::set(&stats.kv_blocks_total, blocks.total_blocks());
        EngineStats::set(&stats.block_size, blocks.block_size());
        let handle = EngineHandle {
            requests: tx,
            retire: Arc::new(retire),
            queued: queued.clone(),
            max_waiting: config.max_waiting.max(1),
            stats: stats.clone(),
        };
        let engine = Engine {
            group,
            health,
            tokenizer,
            model,
            blocks,
            config,
            queued,
            stats,
            retired,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
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
            if self.running.is_empty() && self.waiting.is_empty() {
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
            self.drop_cancelled().await;
            let plan = self.schedule();
            self.publish_stats();
            if plan.is_empty() {
                if self.running.is_empty() && !self.waiting.is_empty() {
                    // Cannot happen while the pool holds a full context (checked at start-up);
                    // never spin on it.
                    self.fail_all("the KV cache cannot hold the waiting request");
                }
                continue;
            }
            self.step(plan).await;
        }
    }

    fn enqueue(&mut self, request: GenerationRequest) {
        self.next_id += 1;
        let queue_span = tracing::info_span!(parent: &request.span, "queue");
        self.waiting.push_back(Sequence {
            id: self.next_id,
            tokens: request.prompt.clone(),
            detokenizer: Detokenizer::new(&request.prompt),
            request,
            computed: 0,
            blocks: Vec::new(),
            chain: HashChain::default(),
            queued: true,
            queue_span: Some(queue_span),
            arrived: std::time::Instant::now(),
            last_token_at: None,
            text: String::new(),
            emitted: 0,
        });
    }

    fn unqueue(&self, seq: &mut Sequence) {
        if std::mem::take(&mut seq.queued) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        EngineStats::set(&s.waiting, self.waiting.len());
        EngineStats::set(&s.running, self.running.len());
        EngineStats::set(&s.kv_blocks_used, self.blocks.used_blocks());
        EngineStats::set(&s.kv_blocks_cached, self.blocks.cached_blocks());
    }

    fn retired_reason(&self) -> String {
        format!("the worker group stopped: {}", self.health.reason())
    }

    fn fail_all(&mut self, reason: &str) {
        let mut all: Vec<Sequence> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        EngineStats::add(&self.stats.requests_failed, all.len());
        for mut seq in all {
            seq.fail(reason);
            self.blocks.release(&seq.blocks);
            self.unqueue(&mut seq);
            EngineStats::sub(&self.stats.in_flight, 1);
        }
        self.publish_stats();
    }

    /// Drops requests whose client went away, running or waiting, and frees what they held.
    async fn drop_cancelled(&mut self) {
        let mut released = Vec::new();
        let mut cancelled = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].request.events.is_closed() {
                cancelled.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].request.events.is_closed() {
                cancelled.extend(self.waiting.remove(i));
            } else {
                i += 1;
            }
        }
        EngineStats::add(&self.stats.requests_cancelled, cancelled.len());
        for mut seq in cancelled {
            tracing::debug!(id = seq.id, "request cancelled by the client");
            self.blocks.release(&seq.blocks);
            self.unqueue(&mut seq);
            EngineStats::sub(&self.stats.in_flight, 1);
            released.push(seq.id);
        }
        if !released.is_empty() {
            self.group.release(released).await;
        }
    }

    /// Chooses this step's work: decodes first, then prefill chunks, under the token budget.
    fn schedule(&mut self) -> Vec<Scheduled> {
        let mut budget = self.config.max_batched_tokens.max(1);
        let mut plan: Vec<Scheduled> = Vec::new();
        let mut preempted = false;
        let (decoding, prefilling): (Vec<&Sequence>, Vec<&Sequence>) =
            self.running.iter().partition(|s| s.remaining() == 1);
        let order: Vec<u64> = decoding.iter().chain(&prefilling).map(|s| s.id).collect();
        for id in order {
            if budget == 0 {
                break;
            }
            // Gone if an earlier sequence preempted it.
            let Some(mut i) = self.running.iter().position(|s| s.id == id) else {
                continue;
            };
            let n = self.running[i].remaining().min(budget);
            let need = self.running[i].computed + n;
            let placed = loop {
                if self.blocks.grow(&mut self.running[i].blocks, need) {
                    break true;
                }
                // Preempt the most recently admitted sequence not yet in this step's plan, or
                // this one if there is none.
                preempted = true;
                let victim = self
                    .running
                    .iter()
                    .rposition(|s| s.id != id && !plan.iter().any(|p| p.id == s.id));
                match victim {
                    Some(v) => {
                        self.preempt(v);
                        if v < i {
                            i -= 1;
                        }
                    }
                    None => {
                        self.preempt(i);
                        break false;
                    }
                }
            };
            if placed {
                plan.push(Scheduled { id, tokens: n });
                budget -= n;
            }
        }
        if preempted {
            // Blocks are short: admit nothing new this step.
            return plan;
        }
        // New and preempted sequences, in queue order, while there is room.
        while budget > 0 && self.running.len() < self.config.max_batch_size.max(1) {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.blocks.is_empty() {
                // Reuse cached blocks of an identical prefix; at least one token is computed so
                // the step yields logits.
                let hit = self.blocks.lookup_prefix(&seq.tokens, seq.tokens.len() - 1);
                EngineStats::add(&self.stats.prefix_cache_queried_tokens, seq.tokens.len());
                EngineStats::add(&self.stats.prefix_cache_hit_tokens, hit.tokens);
                seq.blocks = hit.blocks;
                seq.chain = hit.chain;
                seq.computed = hit.tokens;
            }
            let n = seq.remaining().min(budget);
            if !self.blocks.grow(&mut seq.blocks, seq.computed + n) {
                // Wait for running sequences to finish; keep nothing meanwhile.
                self.requeue_for_recompute(seq);
                break;
            }
            if seq.queued {
                EngineStats::add(&self.stats.prompt_tokens, seq.request.prompt.len());
            }
            self.unqueue(&mut seq);
            seq.queue_span = None;
            plan.push(Scheduled {
                id: seq.id,
                tokens: n,
            });
            budget -= n;
            self.running.push(seq);
        }
        plan
    }

    /// Frees running sequence `index`'s blocks and puts it back at the head of the queue.
    fn preempt(&mut self, index: usize) {
        let seq = self.running.remove(index);
        tracing::debug!(
            id = seq.id,
            tokens = seq.tokens.len(),
            "preempted for KV-cache room"
        );
        EngineStats::add(&self.stats.preemptions, 1);
        self.requeue_for_recompute(seq);
    }

    /// Frees `seq`'s blocks and puts it at the head of the queue, to be prefilled from scratch
    /// (prompt and generated tokens) when it is admitted again.
    fn requeue_for_recompute(&mut self, mut seq: Sequence) {
        self.blocks.release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        seq.chain = HashChain::default();
        self.waiting.push_front(seq);
    }

    async fn step(&mut self, plan: Vec<Scheduled>) {
        let mut sequences = Vec::with_capacity(plan.len());
        for item in &plan {
            let Some(seq) = self.running.iter().find(|s| s.id == item.id) else {
                continue;
            };
            let end = seq.computed + item.tokens;
            sequences.push(pb::SequenceStep {
                sequence_id: seq.id,
                tokens: seq.tokens[seq.computed..end].to_vec(),
                start_position: seq.computed as u32,
                block_table: seq.blocks.clone(),
                sampling: Some(seq.request.sampling),
                sample: end == seq.tokens.len(),
            });
        }
        let step_tokens: usize = plan.iter().map(|p| p.tokens).sum();
        // A step serves many requests: it is a child of the first one's trace and linked from
        // the others'.
        let mut members = self
            .running
            .iter()
            .filter(|s| plan.iter().any(|p| p.id == s.id));
        let span = match members.next() {
            Some(first) => tracing::info_span!(
                parent: &first.request.span,
                "step",
                sequences = plan.len(),
                tokens = step_tokens
            ),
            None => tracing::Span::none(),
        };
        for other in members {
            span.follows_from(&other.request.span);
        }
        let started = std::time::Instant::now();
        let mut retired = self.retired.clone();
        let result = tokio::select! {
            biased;
            _ = retired.wait_for(|r| *r) => None,
            result = self.group.step(sequences, &span) => Some(result),
        };
        let Some(result) = result else {
            // Abandoned: the step's answers would no longer mean anything.
            self.fail_all(&self.retired_reason());
            return;
        };
        let sampled = match result {
            Ok((tokens, timings)) => {
                let s = &self.stats;
                EngineStats::add(&s.step_micros, started.elapsed().as_micros() as usize);
                EngineStats::add(
                    &s.worker_compute_micros,
                    timings.compute.as_micros() as usize,
                );
                EngineStats::add(
                    &s.collective_micros,
                    timings.collectives.as_micros() as usize,
                );
                tokens
            }
            Err(e) => {
                let reason = format!("step failed: {e:#}");
                // A retired engine's failure is not the current group's.
                if !*self.retired.borrow() {
                    self.health.fail(reason.clone());
                }
                self.fail_all(&reason);
                return;
            }
        };
        EngineStats::add(&self.stats.steps, 1);
        EngineStats::add(&self.stats.step_tokens, step_tokens);
        for item in &plan {
            if let Some(seq) = self.running.iter_mut().find(|s| s.id == item.id) {
                seq.computed += item.tokens;
                self.blocks.register_full_blocks(
                    &seq.blocks,
                    &seq.tokens[..seq.computed],
                    &mut seq.chain,
                );
            }
        }
        let mut finished = Vec::new();
        for token in sampled {
            let Some(index) = self.running.iter().position(|s| s.id == token.sequence_id) else {
                continue;
            };
            EngineStats::add(&self.stats.generation_tokens, 1);
            if self.accept(index, token).is_some() {
                finished.push(self.running[index].id);
            }
        }
        if finished.is_empty() {
            return;
        }
        for id in &finished {
            if let Some(index) = self.running.iter().position(|s| s.id == *id) {
                let seq = self.running.remove(index);
                self.blocks.release(&seq.blocks);
                EngineStats::sub(&self.stats.in_flight, 1);
            }
        }
        self.group.release(finished).await;
    }

    /// Applies one sampled token to running sequence `index`; returns `Some` when it finished.
    fn accept(&mut self, index: usize, token: pb::SampledToken) -> Option<FinishReason> {
        let tokenizer = self.tokenizer.clone();
        let max_context = self.model.max_context;
        let seq = &mut self.running[index];
        let eos = !seq.request.ignore_eos && self.model.eos_token_ids.contains(&token.token_id);
        seq.tokens.push(token.token_id);
        let now = std::time::Instant::now();
        match seq.last_token_at.replace(now) {
            None => self.stats.time_to_first_token.observe(now - seq.arrived),
            Some(last) => self.stats.inter_token_latency.observe(now - last),
        }
        let piece = if eos {
            String::new()
        } else {
            seq.detokenizer.push(&tokenizer, token.token_id)
        };
        seq.text.push_str(&piece);
        let mut reason = None;
        if eos {
            reason = Some(FinishReason::Stop);
        } else if let Some(at) = find_stop(&seq.text, &seq.request.stop, seq.emitted) {
            seq.text.truncate(at);
            reason = Some(FinishReason::Stop);
        } else if seq.generated() >= seq.request.max_tokens || seq.tokens.len() >= max_context {
            reason = Some(FinishReason::Length);
        }
        let token_out = TokenOut {
            id: token.token_id,
            piece,
            logprob: token.logprob,
            top_logprobs: token
                .top_logprobs
                .iter()
                .map(|t| (tokenizer.decode(&[t.token_id]), t.logprob))
                .collect(),
        };
        let safe = if reason.is_some() {
            seq.text.len()
        } else {
            seq.text.len() - held_back(&seq.text, &seq.request.stop)
        };
        let text = seq.text[seq.emitted.min(safe)..safe].to_string();
        seq.emitted = seq.emitted.max(safe);
        let _ = seq.request.events.send(Event::Token {
            text,
            token: token_out,
        });
        if let Some(reason) = reason {
            self.stats.end_to_end_latency.observe(now - seq.arrived);
            EngineStats::add(
                match reason {
                    FinishReason::Stop => &self.stats.requests_stopped,
                    FinishReason::Length => &self.stats.requests_length,
                },
                1,
            );
            let rest = seq.text.get(seq.emitted..).unwrap_or("").to_string();
            seq.emitted = seq.text.len();
            let _ = seq.request.events.send(Event::Finished {
                text: rest,
                reason,
                prompt_tokens: seq.request.prompt.len(),
                completion_tokens: seq.generated(),
            });
        }
        reason
    }
}

/// Byte offset of the earliest stop string in `text` that ends after `emitted`.
fn find_stop(text: &str, stops: &[String], emitted: usize) -> Option<usize> {
    stops
        .iter()
        .filter_map(|s| {
            let from = emitted.saturating_sub(s.len());
            let from = (0..=from)
                .rev()
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(0);
            text[from..].find(s.as_str()).map(|i| from + i)
        })
        .min()
}

/// Bytes at the end of `text` that could be the start of a stop string, and so must not be
/// streamed yet.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .map(|s| {
            (1..s.len())
                .rev()
                .find(|&n| {
                    n <= text.len()
                        && text.is_char_boundary(text.len() - n)
                        && s.is_char_boundary(n)
                        && text.ends_with(&s[..n])
                })
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_partial_ones_held_back() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(find_stop("abc EN", &stops, 0), None);
        assert_eq!(find_stop("abc END x", &stops, 0), Some(4));
        assert_eq!(
            find_stop("abc END x", &stops, 6),
            Some(4),
            "straddles the emitted mark"
        );
        assert_eq!(held_back("abc EN", &stops), 2);
        assert_eq!(held_back("abc E", &stops), 1);
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("ü", &["üx".to_string()]), 2);
    }
}
