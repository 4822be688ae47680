//! The scheduler: one task that owns every in-flight request and drives the worker group step by
//! step (iteration-level batching, as in Orca and text-generation-inference).
//!
//! Each step: drop cancelled requests, admit waiting ones while KV blocks and batch slots allow
//! (a request reserves blocks for its prompt plus `max_tokens` up front, so a running request
//! never runs out), send one plan with every running sequence (whole prompts for new ones, the
//! last token for the rest), then turn the sampled ids into text, apply stop conditions and
//! stream events. A failed step fails every in-flight request explicitly and marks the group
//! unhealthy; nothing is dropped silently.

use std::{collections::VecDeque, sync::Arc};

use caravan_proto as pb;
use tokio::sync::mpsc;

use crate::{
    blocks::BlockManager,
    group::{SharedHealth, WorkerGroup},
    model_info::ModelInfo,
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
}

/// Scheduler limits.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    pub max_waiting: usize,
}

/// Submits requests to the scheduler.
#[derive(Clone)]
pub struct EngineHandle {
    requests: mpsc::Sender<GenerationRequest>,
}

/// Why a request was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Stopped,
}

impl EngineHandle {
    pub fn submit(&self, request: GenerationRequest) -> Result<(), SubmitError> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Stopped,
        })
    }
}

struct Running {
    id: u64,
    request: GenerationRequest,
    blocks: Vec<u32>,
    generated: Vec<i64>,
    detokenizer: Detokenizer,
    text: String,
    emitted: usize,
    /// Tokens already in the workers' caches.
    cached: usize,
}

/// The scheduler's state.
pub struct Engine {
    group: WorkerGroup,
    health: SharedHealth,
    tokenizer: Arc<Tokenizer>,
    model: ModelInfo,
    blocks: BlockManager,
    config: SchedulerConfig,
    waiting: VecDeque<GenerationRequest>,
    running: Vec<Running>,
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
    ) -> EngineHandle {
        let (tx, rx) = mpsc::channel(config.max_waiting.max(1));
        let engine = Engine {
            group,
            health,
            tokenizer,
            model,
            blocks,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
        };
        tokio::spawn(engine.run(rx));
        EngineHandle { requests: tx }
    }

    async fn run(mut self, mut requests: mpsc::Receiver<GenerationRequest>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match requests.recv().await {
                    Some(r) => self.waiting.push_back(r),
                    None => return,
                }
            }
            while let Ok(r) = requests.try_recv() {
                self.waiting.push_back(r);
            }
            if !self.health.is_ready() {
                let reason = format!("the worker group is not ready: {}", self.health.reason());
                self.fail_all(&reason);
                continue;
            }
            self.drop_cancelled().await;
            self.admit();
            if self.running.is_empty() {
                continue;
            }
            self.step().await;
        }
    }

    fn fail_all(&mut self, reason: &str) {
        for r in self.running.drain(..) {
            let _ = r.request.events.send(Event::Error(reason.to_string()));
            self.blocks.release(r.blocks);
        }
        for r in self.waiting.drain(..) {
            let _ = r.events.send(Event::Error(reason.to_string()));
        }
    }

    async fn drop_cancelled(&mut self) {
        let mut released = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].request.events.is_closed() {
                let r = self.running.swap_remove(i);
                tracing::debug!(id = r.id, "request cancelled by the client");
                released.push(r.id);
                self.blocks.release(r.blocks);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|r| !r.events.is_closed());
        if !released.is_empty() {
            self.group.release(released).await;
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch_size {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = front.prompt.len() + front.max_tokens;
            if self.blocks.blocks_for(need) > self.blocks.total_blocks() {
                let r = self.waiting.pop_front().expect("front exists");
                let _ = r.events.send(Event::Error(format!(
                    "the request needs {need} tokens of KV cache; the server holds {}",
                    self.blocks.total_blocks() * self.blocks.block_size()
                )));
                continue;
            }
            let Some(blocks) = self.blocks.allocate(need) else {
                break;
            };
            let request = self.waiting.pop_front().expect("front exists");
            self.next_id += 1;
            self.running.push(Running {
                id: self.next_id,
                detokenizer: Detokenizer::new(&request.prompt),
                request,
                blocks,
                generated: Vec::new(),
                text: String::new(),
                emitted: 0,
                cached: 0,
            });
        }
    }

    async fn step(&mut self) {
        let plan: Vec<pb::SequenceStep> = self
            .running
            .iter()
            .map(|r| {
                let tokens = if r.cached == 0 {
                    r.request.prompt.clone()
                } else {
                    vec![*r.generated.last().expect("decoding after a sampled token")]
                };
                pb::SequenceStep {
                    sequence_id: r.id,
                    tokens,
                    start_position: r.cached as u32,
                    block_table: r.blocks.clone(),
                    sampling: Some(r.request.sampling),
                    sample: true,
                }
            })
            .collect();
        let sampled = match self.group.step(plan).await {
            Ok(tokens) => tokens,
            Err(e) => {
                let reason = format!("step failed: {e:#}");
                self.health.fail(reason.clone());
                self.fail_all(&reason);
                return;
            }
        };
        let mut finished = Vec::new();
        for token in sampled {
            let Some(index) = self.running.iter().position(|r| r.id == token.sequence_id) else {
                continue;
            };
            let r = &mut self.running[index];
            r.cached += if r.cached == 0 {
                r.request.prompt.len()
            } else {
                1
            };
            if let Some(done) = self.accept(index, token) {
                finished.push((index, done));
            }
        }
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut released = Vec::new();
        for (index, _) in finished {
            let r = self.running.swap_remove(index);
            released.push(r.id);
            self.blocks.release(r.blocks);
        }
        if !released.is_empty() {
            self.group.release(released).await;
        }
    }

    /// Applies one sampled token to running request `index`; returns `Some` when it finished.
    fn accept(&mut self, index: usize, token: pb::SampledToken) -> Option<FinishReason> {
        let tokenizer = self.tokenizer.clone();
        let max_context = self.model.max_context;
        let r = &mut self.running[index];
        let eos = !r.request.ignore_eos && self.model.eos_token_ids.contains(&token.token_id);
        r.generated.push(token.token_id);
        let piece = if eos {
            String::new()
        } else {
            r.detokenizer.push(&tokenizer, token.token_id)
        };
        r.text.push_str(&piece);
        let mut reason = None;
        if eos {
            reason = Some(FinishReason::Stop);
        } else if let Some(at) = find_stop(&r.text, &r.request.stop, r.emitted) {
            r.text.truncate(at);
            reason = Some(FinishReason::Stop);
        } else if r.generated.len() >= r.request.max_tokens
            || r.request.prompt.len() + r.generated.len() >= max_context
        {
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
            r.text.len()
        } else {
            r.text.len() - held_back(&r.text, &r.request.stop)
        };
        let text = r.text[r.emitted.min(safe)..safe].to_string();
        r.emitted = r.emitted.max(safe);
        let _ = r.request.events.send(Event::Token {
            text,
            token: token_out,
        });
        if let Some(reason) = reason {
            let rest = r.text.get(r.emitted..).unwrap_or("").to_string();
            r.emitted = r.text.len();
            let _ = r.request.events.send(Event::Finished {
                text: rest,
                reason,
                prompt_tokens: r.request.prompt.len(),
                completion_tokens: r.generated.len(),
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
