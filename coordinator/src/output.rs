//! The output processor: turns a request's sampled tokens into what its client sees (text
//! increments, stop strings, log-probabilities as text) and decides when the request is done
//! (end of sequence, a stop string, `max_tokens`, the model's context), as vLLM v1's output
//! processor does beside its scheduler.

use std::sync::Arc;

use caravan_proto as pb;
use tokio::sync::mpsc;

use crate::tokenizer::{Detokenizer, Tokenizer};

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

/// When a request stops, besides its stop strings.
#[derive(Debug, Clone, Copy)]
pub struct StopLimits {
    pub max_tokens: usize,
    /// Longest sequence (prompt plus completion) served.
    pub max_context: usize,
    /// Generate past end-of-sequence until `max_tokens` or a stop string.
    pub ignore_eos: bool,
}

/// One request's output state.
pub struct RequestOutput {
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Arc<[i64]>,
    events: mpsc::UnboundedSender<Event>,
    stop: Vec<String>,
    limits: StopLimits,
    prompt_tokens: usize,
    completion_tokens: usize,
    detokenizer: Detokenizer,
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
}

impl RequestOutput {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        eos_token_ids: Arc<[i64]>,
        prompt: &[i64],
        stop: Vec<String>,
        limits: StopLimits,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        RequestOutput {
            tokenizer,
            eos_token_ids,
            events,
            stop,
            limits,
            prompt_tokens: prompt.len(),
            completion_tokens: 0,
            detokenizer: Detokenizer::new(prompt),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Whether the client went away.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Ends the request with an error.
    pub fn fail(&self, reason: &str) {
        let _ = self.events.send(Event::Error(reason.to_string()));
    }

    /// Streams one sampled token; returns `Some` when it ends the request (after sending the
    /// final event).
    pub fn push(&mut self, token: &pb::SampledToken) -> Option<FinishReason> {
        let eos = !self.limits.ignore_eos && self.eos_token_ids.contains(&token.token_id);
        self.completion_tokens += 1;
        let piece = if eos {
            String::new()
        } else {
            self.detokenizer.push(&self.tokenizer, token.token_id)
        };
        self.text.push_str(&piece);
        let mut reason = None;
        if eos {
            reason = Some(FinishReason::Stop);
        } else if let Some(at) = find_stop(&self.text, &self.stop, self.emitted) {
            self.text.truncate(at);
            reason = Some(FinishReason::Stop);
        } else if self.completion_tokens >= self.limits.max_tokens
            || self.prompt_tokens + self.completion_tokens >= self.limits.max_context
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
                .map(|t| (self.tokenizer.decode(&[t.token_id]), t.logprob))
                .collect(),
        };
        let safe = if reason.is_some() {
            self.text.len()
        } else {
            self.text.len() - held_back(&self.text, &self.stop)
        };
        let text = self.text[self.emitted.min(safe)..safe].to_string();
        self.emitted = self.emitted.max(safe);
        let _ = self.events.send(Event::Token {
            text,
            token: token_out,
        });
        if let Some(reason) = reason {
            let rest = self.text.get(self.emitted..).unwrap_or("").to_string();
            self.emitted = self.text.len();
            let _ = self.events.send(Event::Finished {
                text: rest,
                reason,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
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
