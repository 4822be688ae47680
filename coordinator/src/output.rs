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

/// A likely token at one position, with its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub id: i64,
    pub text: String,
    pub logprob: f32,
}

/// One generated token, as the API reports it.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub id: i64,
    /// The text this token added (empty while a multi-byte character is incomplete).
    pub piece: String,
    pub logprob: f32,
    /// Most likely alternatives, most likely first.
    pub top_logprobs: Vec<Alternative>,
}

/// One prompt token, as the API reports it with `echo` and prompt log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenOut {
    pub id: i64,
    /// The text this token adds to the decoded prompt.
    pub text: String,
    /// The token alone, decoded (vLLM's `decoded_token`).
    pub token_text: String,
    /// `None` for the first token (nothing precedes it).
    pub logprob: Option<f32>,
    /// Its rank among the vocabulary at its position (1: the most likely).
    pub rank: Option<u32>,
    /// Most likely alternatives at its position, most likely first.
    pub top_logprobs: Vec<Alternative>,
}

/// What a request's stream receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt's log-probabilities (requests that asked for them), before the first token.
    Prompt(Vec<PromptTokenOut>),
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

/// When a completion ends, as validated (see `api::validate`): the output processor applies it
/// as it is.
#[derive(Debug, Clone, Default)]
pub struct StopCriteria {
    /// Strings that end it (finish reason `stop`); the text ends before them.
    pub strings: Vec<String>,
    /// Tokens that end it, not shown: end-of-sequence (unless the client ignores it) and the
    /// client's stop tokens.
    pub token_ids: Vec<i64>,
    pub max_tokens: usize,
    /// Longest sequence (prompt plus completion) served.
    pub max_context: usize,
    /// Stop strings count only from this many generated tokens on (the workers do not sample
    /// the stop tokens before).
    pub min_tokens: usize,
}

/// One request's output state.
pub struct RequestOutput {
    tokenizer: Arc<Tokenizer>,
    events: mpsc::UnboundedSender<Event>,
    stop: StopCriteria,
    prompt_tokens: usize,
    completion_tokens: usize,
    detokenizer: Detokenizer,
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// The prompt's log-probabilities as they arrive (requests that asked for them), until the
    /// first token sends them.
    prompt_scores: Option<PromptScores>,
}

/// A prompt's log-probabilities, filled position by position (a preempted sequence computes
/// its prompt again: positions already known are kept).
struct PromptScores {
    prompt: Vec<i64>,
    /// Index `p` scores `prompt[p]`; index 0 stays `None`.
    positions: Vec<Option<pb::PositionLogprob>>,
}

impl RequestOutput {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt: &[i64],
        stop: StopCriteria,
        events: mpsc::UnboundedSender<Event>,
        prompt_logprobs: bool,
    ) -> Self {
        RequestOutput {
            prompt_scores: prompt_logprobs.then(|| PromptScores {
                prompt: prompt.to_vec(),
                positions: vec![None; prompt.len()],
            }),
            tokenizer,
            events,
            stop,
            prompt_tokens: prompt.len(),
            completion_tokens: 0,
            detokenizer: Detokenizer::new(prompt),
            text: String::new(),
            emitted: 0,
        }
    }

    /// Whether the completion may go on once it has `tokens` tokens: under `max_tokens` and the
    /// context (stop strings and tokens aside, which only its text tells).
    pub fn has_room_after(&self, tokens: usize) -> bool {
        tokens < self.stop.max_tokens && self.prompt_tokens + tokens < self.stop.max_context
    }

    /// Whether the client went away.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Ends the request with an error.
    pub fn fail(&self, reason: &str) {
        let _ = self.events.send(Event::Error(reason.to_string()));
    }

    /// Records prompt log-probabilities from a step (positions past the prompt, from a
    /// recomputation after preemption, are not the prompt's and are dropped).
    pub fn push_prompt_logprobs(&mut self, scores: pb::PromptLogprobs) {
        let Some(known) = &mut self.prompt_scores else {
            return;
        };
        for (i, position) in scores.positions.into_iter().enumerate() {
            let at = scores.first_position as usize + i;
            if let Some(slot @ None) = known.positions.get_mut(at) {
                *slot = Some(position);
            }
        }
    }

    /// The prompt's tokens with their log-probabilities, once: `Err` names a position the
    /// workers never scored.
    fn take_prompt(&mut self) -> Option<Result<Vec<PromptTokenOut>, String>> {
        let known = self.prompt_scores.take()?;
        let alternative = |t: &pb::TokenLogprob| Alternative {
            id: t.token_id,
            text: self.tokenizer.decode(&[t.token_id]),
            logprob: t.logprob,
        };
        // Each prompt token's text is what it adds to the decoded prompt, so the texts
        // concatenate to it (as the generated tokens' pieces concatenate to the completion).
        let mut detokenizer = Detokenizer::new(&[]);
        let mut out = Vec::with_capacity(known.prompt.len());
        for (p, (&id, score)) in known.prompt.iter().zip(known.positions).enumerate() {
            let (logprob, rank, top_logprobs) = match score {
                Some(s) => (
                    Some(s.logprob),
                    Some(s.rank),
                    s.top_logprobs.iter().map(alternative).collect(),
                ),
                None if p == 0 => (None, None, Vec::new()),
                None => {
                    return Some(Err(format!(
                        "the workers returned no log-probability for prompt position {p}"
                    )))
                }
            };
            out.push(PromptTokenOut {
                id,
                text: detokenizer.push(&self.tokenizer, id),
                token_text: self.tokenizer.decode(&[id]),
                logprob,
                rank,
                top_logprobs,
            });
        }
        Some(Ok(out))
    }

    /// Streams one sampled token; returns `Some` when it ends the request (after sending the
    /// final event). `complete`: the request's structured output is complete, so this token
    /// ends it. A request whose prompt log-probabilities are incomplete ends with an error
    /// (`Some(Stop)` too: it is over).
    pub fn push(&mut self, token: &pb::SampledToken, complete: bool) -> Option<FinishReason> {
        match self.take_prompt() {
            Some(Ok(prompt)) => {
                let _ = self.events.send(Event::Prompt(prompt));
            }
            Some(Err(why)) => {
                self.fail(&why);
                return Some(FinishReason::Stop);
            }
            None => {}
        }
        // End-of-sequence and stop tokens end the text without adding to it.
        let eos = self.stop.token_ids.contains(&token.token_id);
        self.completion_tokens += 1;
        let piece = if eos {
            String::new()
        } else {
            self.detokenizer.push(&self.tokenizer, token.token_id)
        };
        self.text.push_str(&piece);
        let mut reason = None;
        if eos || complete {
            reason = Some(FinishReason::Stop);
        } else if let Some(at) = (self.completion_tokens >= self.stop.min_tokens)
            .then(|| find_stop(&self.text, &self.stop.strings, self.emitted))
            .flatten()
        {
            self.text.truncate(at);
            reason = Some(FinishReason::Stop);
        } else if self.completion_tokens >= self.stop.max_tokens
            || self.prompt_tokens + self.completion_tokens >= self.stop.max_context
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
                .map(|t| Alternative {
                    id: t.token_id,
                    text: self.tokenizer.decode(&[t.token_id]),
                    logprob: t.logprob,
                })
                .collect(),
        };
        let safe = if reason.is_some() {
            self.text.len()
        } else {
            self.text.len() - held_back(&self.text, &self.stop.strings)
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
