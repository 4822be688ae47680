//! `POST /v1/completions` and `POST /v1/chat/completions`: validated requests (see
//! [`validate`]) submitted to the engine, answered with one JSON body or a server-sent-event
//! stream ending in `[DONE]`.

use std::{
    convert::Infallible,
    time::{Duration, SystemTime},
};

use axum::{
    body::Body,
    extract::State,
    response::{
        sse::{Event as SseEvent, KeepAlive},
        IntoResponse, Response, Sse,
    },
    Json,
};
use futures::{stream, Stream, StreamExt};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{
    error::ApiError,
    validate::{self, Endpoint, ValidRequest},
    SharedState, MAX_BODY_BYTES,
};
use crate::{
    engine::{GenerationRequest, SubmitError},
    output::{Alternative, Event, FinishReason, PromptTokenOut, TokenOut},
};

/// How often an idle stream gets an SSE comment line.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(5);

pub(super) async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::too_large(MAX_BODY_BYTES))
}

pub async fn completions(State(state): State<SharedState>, body: Body) -> Response {
    serve(state, body, validate::completion).await
}

pub async fn chat_completions(State(state): State<SharedState>, body: Body) -> Response {
    serve(state, body, validate::chat).await
}

/// Reads and validates the body, then runs the request.
async fn serve(
    state: SharedState,
    body: Body,
    validate: fn(&SharedState, &[u8]) -> Result<ValidRequest, ApiError>,
) -> Response {
    let request = match read_body(body).await {
        Ok(bytes) => validate(&state, &bytes),
        Err(e) => Err(e),
    };
    match request {
        Ok(request) => run(state, request).await,
        Err(e) => e.into_response(),
    }
}

/// One generated sequence of a request: which prompt, and where its events arrive.
struct Submitted {
    prompt: usize,
    receiver: mpsc::UnboundedReceiver<Event>,
}

async fn run(state: SharedState, p: ValidRequest) -> Response {
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
    // While the group is formed again, requests queue for it (up to --recovery-timeout).
    if !state.health.is_ready() && !state.health.is_recovering() {
        return ApiError::unavailable(format!(
            "The worker group is not ready: {}",
            state.health.reason()
        ))
        .into_response();
    }
    let endpoint = match p.endpoint {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat",
    };
    // One constraint per sequence, compiled before anything is submitted.
    let best_of = p.best_of();
    let sequences = p.prompts.len() * best_of;
    let mut constraints = Vec::with_capacity(sequences);
    for _ in 0..sequences {
        constraints.push(match &p.constraint {
            None => None,
            Some((field, spec)) => match state.grammars.constrain(spec) {
                Ok(constraint) => Some(constraint),
                Err(why) => return ApiError::invalid_param(field, why).into_response(),
            },
        });
    }
    let mut constraints = constraints.into_iter();
    // If a submission fails, dropping the receivers of those already made cancels them.
    let mut submitted = Vec::with_capacity(sequences);
    for (index, job) in p.prompts.iter().enumerate() {
        // The sequences of one prompt share its KV blocks: the first computes them.
        let prompt_group = (best_of > 1).then(rand::random::<u64>);
        for (j, sampling) in p.choices.iter().enumerate() {
            let (events, receiver) = mpsc::unbounded_channel();
            let request = GenerationRequest {
                prompt: job.ids.clone(),
                sampling: sampling.clone(),
                stop: job.stop.clone(),
                events,
                // The root of this sequence's trace; it ends when the scheduler is done with it.
                span: tracing::info_span!(
                    "request",
                    endpoint,
                    prompt_tokens = job.ids.len(),
                    max_tokens = job.stop.max_tokens,
                    stream = p.stream,
                    prompt = index,
                    sequence = j,
                ),
                prompt_group,
                constraint: constraints.next().flatten(),
            };
            match engine.submit(request) {
                Ok(()) => {}
                Err(SubmitError::QueueFull) => return ApiError::overloaded().into_response(),
                Err(SubmitError::Stopped) => {
                    return ApiError::unavailable("The scheduler has stopped.").into_response()
                }
            }
            submitted.push(Submitted {
                prompt: index,
                receiver,
            });
        }
    }
    let meta = ResponseMeta::new(&state, &p);
    let echoes: Vec<Option<String>> = p.prompts.into_iter().map(|job| job.echo).collect();
    if p.stream {
        // Comment lines keep an idle stream open through proxies while a failed group is
        // formed again (or a long prefill runs); clients skip them.
        Sse::new(sse_stream(meta, echoes, p.n, submitted))
            .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE).text("keep-alive"))
            .into_response()
    } else {
        collect(meta, echoes, p.n, submitted).await
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
    /// Name tokens `token_id:N` in `logprobs`.
    token_ids: bool,
    prompt_logprobs: Option<u32>,
}

impl ResponseMeta {
    fn new(state: &SharedState, p: &ValidRequest) -> Self {
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

    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    /// The `logprobs` field for `tokens` (`text_offset` in characters, counted from `offset`).
    fn logprobs_json(&self, tokens: &[TokenOut], offset: usize) -> Value {
        let entries: Vec<LogprobEntry> = tokens.iter().map(LogprobEntry::from).collect();
        self.entries_json(&entries, offset)
    }

    /// The `logprobs` field for prompt and generated tokens alike.
    fn entries_json(&self, tokens: &[LogprobEntry], offset: usize) -> Value {
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
    fn label(&self, id: i64, text: &str) -> String {
        if self.token_ids {
            format!("token_id:{id}")
        } else {
            text.to_owned()
        }
    }

    /// vLLM's `prompt_logprobs`: `null` for the first token, then per position a map from token
    /// id to its log-probability, rank and text, for the prompt's own token and the most likely
    /// alternatives.
    fn prompt_logprobs_json(&self, prompt: &[PromptTokenOut]) -> Value {
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

    fn usage(prompt: usize, completion: usize) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
    }

    /// One choice of a streamed chunk.
    fn chunk(
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
    fn usage_chunk(&self, prompt: usize, completion: usize) -> Value {
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
struct LogprobEntry<'a> {
    id: i64,
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
async fn collect(
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

/// One choice of a streamed response.
struct ChoiceStream {
    index: usize,
    first: bool,
    /// Characters sent so far (for `text_offset`).
    offset: usize,
    /// `echo`'s text, sent as the first chunk (with the prompt's log-probabilities).
    echo: Option<String>,
    done: bool,
    /// The first choice of its prompt: its prompt tokens count in the usage.
    counts_prompt: bool,
}

/// What one event of a choice sends.
enum Sent {
    Nothing,
    Chunk(Value),
    Last {
        chunk: Value,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(Value),
}

impl ChoiceStream {
    fn on(&mut self, meta: &ResponseMeta, event: Event) -> Sent {
        let index = self.index;
        match event {
            Event::Prompt(prompt) => {
                let Some(text) = self.echo.take() else {
                    return Sent::Nothing;
                };
                let entries: Vec<LogprobEntry> = prompt.iter().map(LogprobEntry::from).collect();
                let mut chunk = meta.chunk(index, &text, &[], 0, None, self.first);
                chunk["choices"][0]["logprobs"] = meta.entries_json(&entries, 0);
                self.offset = text.chars().count();
                self.first = false;
                Sent::Chunk(chunk)
            }
            Event::Token { text, token } => {
                if let Some(echo) = self.echo.take() {
                    // No prompt log-probabilities were asked for: the text alone.
                    let echoed = echo.chars().count();
                    let mut chunk = meta.chunk(
                        index,
                        &(echo + &text),
                        std::slice::from_ref(&token),
                        echoed,
                        None,
                        self.first,
                    );
                    if meta.logprobs.is_none() {
                        chunk["choices"][0]["logprobs"] = Value::Null;
                    }
                    self.offset = echoed + token.piece.chars().count();
                    self.first = false;
                    return Sent::Chunk(chunk);
                }
                if text.is_empty() && meta.logprobs.is_none() && !self.first {
                    return Sent::Nothing;
                }
                let chunk = meta.chunk(
                    index,
                    &text,
                    std::slice::from_ref(&token),
                    self.offset,
                    None,
                    self.first,
                );
                self.offset += token.piece.chars().count();
                self.first = false;
                Sent::Chunk(chunk)
            }
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                self.done = true;
                Sent::Last {
                    chunk: meta.chunk(index, &text, &[], self.offset, Some(reason), self.first),
                    prompt_tokens,
                    completion_tokens,
                }
            }
            Event::Error(message) => Sent::Failed(ApiError::unavailable(message).body()),
        }
    }
}

/// Streams every choice's chunks as server-sent events as they come, then (with
/// `include_usage`) a chunk with the usage and no choices, then `[DONE]`. A failed choice ends
/// the stream with the error. Dropping the stream (client gone) closes the channels, which the
/// scheduler takes as cancellations.
fn sse_stream(
    meta: ResponseMeta,
    echoes: Vec<Option<String>>,
    n: usize,
    submitted: Vec<Submitted>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    struct S<E> {
        meta: ResponseMeta,
        events: E,
        choices: Vec<ChoiceStream>,
        open: usize,
        prompt_tokens: usize,
        completion_tokens: usize,
        done: bool,
    }
    // Streamed requests have `best_of == n`: the sequences are the choices, in order.
    let choices: Vec<ChoiceStream> = submitted
        .iter()
        .enumerate()
        .map(|(index, s)| ChoiceStream {
            index,
            first: true,
            offset: 0,
            echo: echoes[s.prompt].clone(),
            done: false,
            counts_prompt: index % n == 0,
        })
        .collect();
    // Each choice's events, tagged with its index; `None` once its channel closes.
    let events = stream::select_all(submitted.into_iter().enumerate().map(|(index, s)| {
        Box::pin(stream::unfold(
            Some(s.receiver),
            move |receiver| async move {
                let mut receiver = receiver?;
                match receiver.recv().await {
                    Some(event) => Some(((index, Some(event)), Some(receiver))),
                    None => Some(((index, None), None)),
                }
            },
        ))
    }));
    let state = S {
        meta,
        events,
        open: choices.len(),
        choices,
        prompt_tokens: 0,
        completion_tokens: 0,
        done: false,
    };
    let data = stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if s.open == 0 {
                s.done = true;
                if !s.meta.include_usage {
                    return None;
                }
                let usage = s.meta.usage_chunk(s.prompt_tokens, s.completion_tokens);
                return Some((usage, s));
            }
            let dropped = || ApiError::internal("the scheduler dropped the request").body();
            let Some((index, event)) = s.events.next().await else {
                s.done = true;
                return Some((dropped(), s));
            };
            let choice = &mut s.choices[index];
            let Some(event) = event else {
                if choice.done {
                    continue;
                }
                s.done = true;
                return Some((dropped(), s));
            };
            match choice.on(&s.meta, event) {
                Sent::Nothing => continue,
                Sent::Chunk(chunk) => return Some((chunk, s)),
                Sent::Last {
                    chunk,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    if choice.counts_prompt {
                        s.prompt_tokens += prompt_tokens;
                    }
                    s.completion_tokens += completion_tokens;
                    s.open -= 1;
                    return Some((chunk, s));
                }
                Sent::Failed(body) => {
                    s.done = true;
                    return Some((body, s));
                }
            }
        }
    });
    data.map(|value| Ok(SseEvent::default().data(value.to_string())))
        .chain(stream::once(async {
            Ok(SseEvent::default().data("[DONE]"))
        }))
}
