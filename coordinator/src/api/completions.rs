//! `POST /v1/completions` and `POST /v1/chat/completions`: validate, submit to the scheduler, and
//! answer with one JSON body or a server-sent-event stream ending in `[DONE]`.

use std::{convert::Infallible, time::SystemTime};

use axum::{
    body::Body,
    extract::State,
    response::{sse::Event as SseEvent, IntoResponse, Response, Sse},
    Json,
};
use futures::{stream, Stream, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{
    error::ApiError,
    types::{
        chat_messages, parse_body, ChatRequest, CompletionRequest, Prompt, ValidSampling,
        MAX_LOGPROBS,
    },
    SharedState, MAX_BODY_BYTES,
};
use crate::{
    chat_template::RenderOptions,
    engine::{GenerationRequest, SubmitError},
    output::{Event, FinishReason, TokenOut},
};

/// Which endpoint is answering: shapes the JSON.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

/// A validated request, ready for the scheduler.
struct Prepared {
    endpoint: Endpoint,
    prompt: Vec<i64>,
    max_tokens: usize,
    sampling: ValidSampling,
    /// Log-probabilities wanted: `None`, or `Some(top alternatives)`.
    logprobs: Option<u32>,
    stream: bool,
    include_usage: bool,
}

/// A conversation's prompt ids: the messages checked, rendered with the served chat template,
/// and tokenized (with the tokenizer's special tokens only if `add_special_tokens`).
pub(super) fn chat_prompt_ids(
    state: &SharedState,
    messages: &[Value],
    options: &RenderOptions,
    add_special_tokens: bool,
) -> Result<Vec<i64>, ApiError> {
    let messages = chat_messages(messages)?;
    let text = state
        .chat_template
        .render(&messages, options)
        .map_err(|e| ApiError::invalid_param("messages", e.0))?;
    state
        .tokenizer
        .encode(&text, add_special_tokens)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))
}

pub(super) async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::too_large(MAX_BODY_BYTES))
}

fn include_usage(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| {
            v.pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
        })
        .unwrap_or(false)
}

pub(super) fn check_model(state: &SharedState, model: &str) -> Result<(), ApiError> {
    if model != state.model.name {
        return Err(ApiError::model_not_found(model));
    }
    Ok(())
}

/// Checks the token budget: `prompt + max_tokens` must fit the context.
fn budget(
    state: &SharedState,
    prompt: usize,
    max_tokens: Option<u32>,
    default: usize,
) -> Result<usize, ApiError> {
    let context = state.model.max_context;
    if prompt == 0 {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    if prompt >= context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the prompt has {prompt}."
        )));
    }
    let max_tokens = match max_tokens {
        Some(0) => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) => n as usize,
        None => default.min(context - prompt),
    };
    if prompt + max_tokens > context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {context} tokens; the prompt has {prompt} and \
             {max_tokens} were requested for the completion. Reduce the prompt or max_tokens."
        )));
    }
    Ok(max_tokens)
}

pub async fn completions(State(state): State<SharedState>, body: Body) -> Response {
    match prepare_completion(&state, body).await {
        Ok(prepared) => run(state, prepared).await,
        Err(e) => e.into_response(),
    }
}

pub async fn chat_completions(State(state): State<SharedState>, body: Body) -> Response {
    match prepare_chat(&state, body).await {
        Ok(prepared) => run(state, prepared).await,
        Err(e) => e.into_response(),
    }
}

async fn prepare_completion(state: &SharedState, body: Body) -> Result<Prepared, ApiError> {
    let bytes = read_body(body).await?;
    let req: CompletionRequest = parse_body(&bytes)?;
    check_model(state, &req.model)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid_param("echo", "echo is not supported"));
    }
    let prompt = match &req.prompt {
        Prompt::Text(text) => state
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?,
        Prompt::Tokens(ids) => {
            let vocab = state.model.vocab_size as i64;
            if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= vocab) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary (0..{vocab})"),
                ));
            }
            ids.clone()
        }
        Prompt::Batch(_) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "prompt must be a string or an array of token ids; batches of prompts are not supported",
            ))
        }
    };
    let logprobs = req.logprobs;
    if logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
        return Err(ApiError::invalid_param(
            "logprobs",
            format!("logprobs must be at most {MAX_LOGPROBS}"),
        ));
    }
    // OpenAI's default for completions.
    let max_tokens = budget(state, prompt.len(), req.max_tokens, 16)?;
    let sampling = req.sampling.validate(logprobs.unwrap_or(0))?;
    Ok(Prepared {
        endpoint: Endpoint::Completions,
        prompt,
        max_tokens,
        sampling,
        logprobs,
        stream: req.stream,
        include_usage: include_usage(&bytes),
    })
}

async fn prepare_chat(state: &SharedState, body: Body) -> Result<Prepared, ApiError> {
    let bytes = read_body(body).await?;
    let req: ChatRequest = parse_body(&bytes)?;
    check_model(state, &req.model)?;
    let options = RenderOptions {
        add_generation_prompt: req.add_generation_prompt.unwrap_or(true),
        continue_final_message: req.continue_final_message.unwrap_or(false),
        kwargs: req.chat_template_kwargs.as_ref(),
    };
    let prompt = chat_prompt_ids(
        state,
        &req.messages,
        &options,
        req.add_special_tokens.unwrap_or(false),
    )?;
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_LOGPROBS {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("top_logprobs must be at most {MAX_LOGPROBS}"),
        ));
    }
    let logprobs = (req.logprobs == Some(true)).then_some(top);
    let max_tokens = budget(
        state,
        prompt.len(),
        req.max_completion_tokens.or(req.max_tokens),
        usize::MAX,
    )?;
    let sampling = req.sampling.validate(top)?;
    Ok(Prepared {
        endpoint: Endpoint::Chat,
        prompt,
        max_tokens,
        sampling,
        logprobs,
        stream: req.stream,
        include_usage: include_usage(&bytes),
    })
}

async fn run(state: SharedState, p: Prepared) -> Response {
    if state
        .control
        .draining
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return ApiError::unavailable("The server is draining and accepts no new requests.")
            .into_response();
    }
    let Some(engine) = state.engine() else {
        return ApiError::unavailable(format!(
            "The worker group is not ready: {}",
            state.not_ready_reason()
        ))
        .into_response();
    };
    if !state.health.is_ready() {
        return ApiError::unavailable(format!(
            "The worker group is not ready: {}",
            state.health.reason()
        ))
        .into_response();
    }
    let (events, receiver) = mpsc::unbounded_channel();
    let request = GenerationRequest {
        prompt: p.prompt.clone(),
        max_tokens: p.max_tokens,
        sampling: p.sampling.params,
        stop: p.sampling.stop.clone(),
        ignore_eos: p.sampling.ignore_eos,
        events,
        // The root of this request's trace; it ends when the scheduler is done with it.
        span: tracing::info_span!(
            "request",
            endpoint = match p.endpoint {
                Endpoint::Completions => "completions",
                Endpoint::Chat => "chat",
            },
            prompt_tokens = p.prompt.len(),
            max_tokens = p.max_tokens,
            stream = p.stream
        ),
    };
    match engine.submit(request) {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => return ApiError::overloaded().into_response(),
        Err(SubmitError::Stopped) => {
            return ApiError::unavailable("The scheduler has stopped.").into_response()
        }
    }
    let meta = ResponseMeta::new(&state, p.endpoint, p.logprobs, p.include_usage);
    if p.stream {
        Sse::new(sse_stream(meta, receiver)).into_response()
    } else {
        collect(meta, receiver).await
    }
}

/// Identity and options shared by every chunk of one response.
struct ResponseMeta {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    logprobs: Option<u32>,
    include_usage: bool,
}

impl ResponseMeta {
    fn new(
        state: &SharedState,
        endpoint: Endpoint,
        logprobs: Option<u32>,
        include_usage: bool,
    ) -> Self {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        ResponseMeta {
            endpoint,
            id: format!(
                "{prefix}-{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ),
            created: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: state.model.name.clone(),
            logprobs,
            include_usage,
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The `logprobs` field for `tokens` (`text_offset` in characters, counted from `offset`).
    fn logprobs_json(&self, tokens: &[TokenOut], offset: usize) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        match self.endpoint {
            Endpoint::Completions => {
                let mut text_offset = Vec::with_capacity(tokens.len());
                let mut at = offset;
                for t in tokens {
                    text_offset.push(at);
                    at += t.piece.chars().count();
                }
                json!({
                    "tokens": tokens.iter().map(|t| t.piece.clone()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        t.top_logprobs.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": text_offset,
                })
            }
            Endpoint::Chat => json!({
                "content": tokens.iter().map(|t| json!({
                    "token": t.piece,
                    "logprob": t.logprob,
                    "bytes": t.piece.as_bytes(),
                    "top_logprobs": t.top_logprobs.iter().map(|(s, lp)| json!({
                        "token": s, "logprob": lp, "bytes": s.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// One choice of a streamed chunk.
    fn chunk(
        &self,
        text: &str,
        tokens: &[TokenOut],
        offset: usize,
        finish: Option<FinishReason>,
        first: bool,
    ) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0,
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
                    "index": 0,
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
}

/// Waits for the whole generation and answers with one JSON body.
async fn collect(meta: ResponseMeta, mut receiver: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    let mut tokens = Vec::new();
    loop {
        match receiver.recv().await {
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
                let logprobs = meta.logprobs_json(&tokens, 0);
                let choice = match meta.endpoint {
                    Endpoint::Completions => json!({
                        "index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason.as_str(),
                    }),
                    Endpoint::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": reason.as_str(),
                    }),
                };
                return Json(json!({
                    "id": meta.id,
                    "object": meta.object(false),
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [choice],
                    "usage": ResponseMeta::usage(prompt_tokens, completion_tokens),
                }))
                .into_response();
            }
            Some(Event::Error(message)) => return ApiError::unavailable(message).into_response(),
            None => return ApiError::internal("the scheduler dropped the request").into_response(),
        }
    }
}

/// Streams chunks as server-sent events, then `[DONE]`. Dropping the stream (client gone) closes
/// the channel, which the scheduler takes as a cancellation.
fn sse_stream(
    meta: ResponseMeta,
    receiver: mpsc::UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct S {
        meta: ResponseMeta,
        receiver: mpsc::UnboundedReceiver<Event>,
        first: bool,
        offset: usize,
        done: bool,
    }
    let state = S {
        meta,
        receiver,
        first: true,
        offset: 0,
        done: false,
    };
    let events = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            let data = match s.receiver.recv().await {
                Some(Event::Token { text, token }) => {
                    if text.is_empty() && s.meta.logprobs.is_none() && !s.first {
                        continue;
                    }
                    let chunk =
                        s.meta
                            .chunk(&text, std::slice::from_ref(&token), s.offset, None, s.first);
                    s.offset += token.piece.chars().count();
                    s.first = false;
                    chunk
                }
                Some(Event::Finished {
                    text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    s.done = true;
                    let mut chunk = s.meta.chunk(&text, &[], s.offset, Some(reason), s.first);
                    if s.meta.include_usage {
                        chunk["usage"] = ResponseMeta::usage(prompt_tokens, completion_tokens);
                    }
                    chunk
                }
                Some(Event::Error(message)) => {
                    s.done = true;
                    ApiError::unavailable(message).body()
                }
                None => {
                    s.done = true;
                    ApiError::internal("the scheduler dropped the request").body()
                }
            };
            return Some((Ok(SseEvent::default().data(data.to_string())), s));
        }
    });
    events.chain(stream::once(async {
        Ok(SseEvent::default().data("[DONE]"))
    }))
}
