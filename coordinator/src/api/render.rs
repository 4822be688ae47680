//! The JSON of each endpoint: a response's identity, choices, log-probabilities (OpenAI's
//! completions and chat shapes, vLLM's `prompt_logprobs`) and usage.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::{
    validate::{Endpoint, ValidRequest},
    SharedState,
};
use crate::output::{Alternative, FinishReason, PromptTokenOut, TokenOut};

/// Identity and options shared by every chunk of one response.
pub(super) struct ResponseMeta {
    pub(super) endpoint: Endpoint,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) logprobs: Option<u32>,
    pub(super) include_usage: bool,
    /// Name tokens `token_id:N` in `logprobs`.
    pub(super) token_ids: bool,
    pub(super) prompt_logprobs: Option<u32>,
}

impl ResponseMeta {
    pub(super) fn new(state: &SharedState, p: &ValidRequest) -> Self {
        let prefix = match p.endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        ResponseMeta {
            id: format!(
                "{prefix}-{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: state.model.name.clone(),
            endpoint: p.endpoint,
            logprobs: p.logprobs,
            include_usage: p.include_usage,
            token_ids: p.token_ids,
            prompt_logprobs: p.prompt_logprobs,
        }
    }

    pub(super) fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The `logprobs` field for `tokens` (`text_offset` in characters, counted from `offset`).
    pub(super) fn logprobs_json(&self, tokens: &[TokenOut], offset: usize) -> Value {
        let entries: Vec<LogprobEntry> = tokens.iter().map(LogprobEntry::from).collect();
        self.entries_json(&entries, offset)
    }

    /// The `logprobs` field for prompt and generated tokens alike.
    pub(super) fn entries_json(&self, tokens: &[LogprobEntry], offset: usize) -> Value {
        let Some(shown) = self.logprobs else {
            return Value::Null;
        };
        // The prompt's alternatives may be more, for vLLM's `prompt_logprobs`.
        let shown = shown as usize;
        match self.endpoint {
            Endpoint::Completions => {
                let mut text_offset = Vec::with_capacity(tokens.len());
                let mut at = offset;
                for t in tokens {
                    text_offset.push(at);
                    at += t.piece.chars().count();
                }
                json!({
                    "tokens": tokens.iter().map(|t| self.label(t.id, t.piece)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| t.top.map(|top| {
                        top.iter()
                            .take(shown)
                            .map(|a| (self.label(a.id, &a.text), json!(a.logprob)))
                            .collect::<Map<_, _>>()
                    })).collect::<Vec<_>>(),
                    "text_offset": text_offset,
                })
            }
            Endpoint::Chat => json!({
                "content": tokens.iter().map(|t| json!({
                    "token": self.label(t.id, t.piece),
                    "logprob": t.logprob,
                    "bytes": t.piece.as_bytes(),
                    "top_logprobs": t.top.unwrap_or_default().iter().take(shown).map(|a| json!({
                        "token": self.label(a.id, &a.text),
                        "logprob": a.logprob,
                        "bytes": a.text.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }

    /// How a token is named in `logprobs`: its text, or (vLLM's `return_tokens_as_token_ids`)
    /// `token_id:N`, which names tokens whose bytes are no text of their own.
    pub(super) fn label(&self, id: i64, text: &str) -> String {
        if self.token_ids {
            format!("token_id:{id}")
        } else {
            text.to_owned()
        }
    }

    /// vLLM's `prompt_logprobs`: `null` for the first token, then per position a map from token
    /// id to its log-probability, rank and text, for the prompt's own token and the most likely
    /// alternatives.
    pub(super) fn prompt_logprobs_json(&self, prompt: &[PromptTokenOut]) -> Value {
        let Some(shown) = self.prompt_logprobs else {
            return Value::Null;
        };
        let entry = |logprob: f32, rank: u32, text: &str| json!({"logprob": logprob, "rank": rank, "decoded_token": text});
        prompt
            .iter()
            .map(|t| {
                let (Some(logprob), Some(rank)) = (t.logprob, t.rank) else {
                    return Value::Null;
                };
                let mut map = Map::new();
                map.insert(t.id.to_string(), entry(logprob, rank, &t.token_text));
                for (i, a) in t.top_logprobs.iter().take(shown as usize).enumerate() {
                    map.entry(a.id.to_string())
                        .or_insert_with(|| entry(a.logprob, i as u32 + 1, &a.text));
                }
                Value::Object(map)
            })
            .collect()
    }

    pub(super) fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// One choice of a streamed chunk.
    pub(super) fn chunk(
        &self,
        index: usize,
        text: &str,
        tokens: &[TokenOut],
        offset: usize,
        finish: Option<FinishReason>,
        first: bool,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": index,
                "text": text,
                "logprobs": self.logprobs_json(tokens, offset),
                "finish_reason": finish.map(FinishReason::as_str),
            }),
            Endpoint::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": self.logprobs_json(tokens, offset),
                    "finish_reason": finish.map(FinishReason::as_str),
                })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    /// The last chunk of a stream with `include_usage`: no choices, the request's usage.
    pub(super) fn usage_chunk(&self, prompt: usize, completion: usize) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": ResponseMeta::usage(prompt, completion),
        })
    }
}

/// One token's entry in a `logprobs` object: generated, or (with `echo`) from the prompt, whose
/// first token has no log-probability.
pub(super) struct LogprobEntry<'a> {
    pub(super) id: i64,
    piece: &'a str,
    logprob: Option<f32>,
    top: Option<&'a [Alternative]>,
}

impl<'a> From<&'a TokenOut> for LogprobEntry<'a> {
    fn from(t: &'a TokenOut) -> Self {
        LogprobEntry {
            id: t.id,
            piece: &t.piece,
            logprob: Some(t.logprob),
            top: Some(&t.top_logprobs),
        }
    }
}

impl<'a> From<&'a PromptTokenOut> for LogprobEntry<'a> {
    fn from(t: &'a PromptTokenOut) -> Self {
        LogprobEntry {
            id: t.id,
            piece: &t.text,
            logprob: t.logprob,
            top: t.logprob.map(|_| t.top_logprobs.as_slice()),
        }
    }
}
