//! A non-streamed answer: every sequence awaited, `best_of`'s ranking, one JSON body.

use axum::{
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    completions::Submitted,
    error::ApiError,
    render::{LogprobEntry, ResponseMeta},
    validate::Endpoint,
};
use crate::output::{Event, FinishReason, PromptTokenOut, TokenOut};

/// One finished sequence of a request.
struct Sequence {
    prompt: usize,
    /// The prompt's text leads `text` (and its scores the logprobs).
    echoed: bool,
    text: String,
    prompt_scores: Vec<PromptTokenOut>,
    tokens: Vec<TokenOut>,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Sequence {
    /// What `best_of` ranks sequences by, as vLLM does.
    fn cumulative_logprob(&self) -> f64 {
        self.tokens.iter().map(|t| f64::from(t.logprob)).sum()
    }
}

/// Waits for one sequence to finish.
async fn finish(
    prompt: usize,
    echo: Option<String>,
    mut receiver: mpsc::UnboundedReceiver<Event>,
) -> Result<Sequence, ApiError> {
    let echoed = echo.is_some();
    let mut text = echo.unwrap_or_default();
    let mut prompt_scores = Vec::new();
    let mut tokens = Vec::new();
    loop {
        match receiver.recv().await {
            Some(Event::Prompt(p)) => prompt_scores = p,
            Some(Event::Token { text: t, token }) => {
                text.push_str(&t);
                tokens.push(token);
            }
            Some(Event::Finished {
                text: rest,
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                text.push_str(&rest);
                return Ok(Sequence {
                    prompt,
                    echoed,
                    text,
                    prompt_scores,
                    tokens,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                });
            }
            Some(Event::Error(message)) => return Err(ApiError::unavailable(message)),
            None => return Err(ApiError::internal("the scheduler dropped the request")),
        }
    }
}

/// Waits for every sequence and answers with one JSON body: per prompt, its `n` most likely
/// sequences, indexed in prompt order. The first failure fails the request (and dropping the
/// other receivers cancels their sequences).
pub(super) async fn collect(
    meta: ResponseMeta,
    echoes: Vec<Option<String>>,
    n: usize,
    submitted: Vec<Submitted>,
) -> Response {
    let finishing = submitted
        .into_iter()
        .map(|s| finish(s.prompt, echoes[s.prompt].clone(), s.receiver));
    let sequences = match futures::future::try_join_all(finishing).await {
        Ok(sequences) => sequences,
        Err(e) => return e.into_response(),
    };
    let mut by_prompt: Vec<Vec<Sequence>> = echoes.iter().map(|_| Vec::new()).collect();
    // Every generated token counts, also those of sequences `best_of` leaves out.
    let completion_tokens = sequences.iter().map(|s| s.completion_tokens).sum();
    for s in sequences {
        by_prompt[s.prompt].push(s);
    }
    let mut prompt_tokens = 0;
    let mut choices = Vec::new();
    // Chat responses carry the (one) prompt's scores once, as vLLM's do.
    let mut prompt_logprobs = Value::Null;
    for mut sequences in by_prompt {
        prompt_tokens += sequences.first().map_or(0, |s| s.prompt_tokens);
        if sequences.len() > n {
            sequences.sort_by(|a, b| b.cumulative_logprob().total_cmp(&a.cumulative_logprob()));
            sequences.truncate(n);
        }
        for s in sequences {
            let echoed = if s.echoed { &s.prompt_scores[..] } else { &[] };
            let entries: Vec<LogprobEntry> = echoed
                .iter()
                .map(LogprobEntry::from)
                .chain(s.tokens.iter().map(LogprobEntry::from))
                .collect();
            let logprobs = meta.entries_json(&entries, 0);
            if prompt_logprobs.is_null() {
                prompt_logprobs = meta.prompt_logprobs_json(&s.prompt_scores);
            }
            let index = choices.len();
            choices.push(match meta.endpoint {
                Endpoint::Completions => {
                    let mut choice = json!({
                        "index": index, "text": s.text, "logprobs": logprobs,
                        "finish_reason": s.reason.as_str(),
                    });
                    if meta.prompt_logprobs.is_some() {
                        choice["prompt_logprobs"] = meta.prompt_logprobs_json(&s.prompt_scores);
                    }
                    choice
                }
                Endpoint::Chat => json!({
                    "index": index,
                    "message": {"role": "assistant", "content": s.text},
                    "logprobs": logprobs,
                    "finish_reason": s.reason.as_str(),
                }),
            });
        }
    }
    let mut body = json!({
        "id": meta.id,
        "object": meta.object(false),
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": ResponseMeta::usage(prompt_tokens, completion_tokens),
    });
    if meta.endpoint == Endpoint::Chat && meta.prompt_logprobs.is_some() {
        body["prompt_logprobs"] = prompt_logprobs;
    }
    Json(body).into_response()
}
