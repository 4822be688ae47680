//! `POST /v1/completions` and `POST /v1/chat/completions`, stage by stage: the body validated
//! ([`validate`]), one sequence per choice submitted to the engine (here), the answer rendered
//! per endpoint ([`super::render`]) and sent whole ([`super::collect`]) or streamed
//! ([`super::stream`]).

use std::time::Duration;

use axum::{
    body::Body,
    extract::State,
    response::{sse::KeepAlive, IntoResponse, Response, Sse},
};
use tokio::sync::mpsc;

use super::{
    collect::collect,
    error::ApiError,
    render::ResponseMeta,
    stream::sse_stream,
    validate::{self, Endpoint, ValidRequest},
    SharedState, MAX_BODY_BYTES,
};
use crate::{
    engine::{GenerationRequest, SubmitError},
    output::Event,
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
    match read_body(body)
        .await
        .and_then(|bytes| validate(&state, &bytes))
    {
        Ok(request) => run(state, request).await,
        Err(e) => e.into_response(),
    }
}

/// One generated sequence of a request: which prompt, and where its events arrive.
pub(super) struct Submitted {
    pub(super) prompt: usize,
    pub(super) receiver: mpsc::UnboundedReceiver<Event>,
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
