//! The OpenAI-compatible HTTP API (axum): completions and chat completions, streaming or not,
//! models, health, and Prometheus metrics.

pub mod completions;
pub mod error;
pub mod types;

use std::sync::{Arc, OnceLock};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;

use crate::{
    engine::EngineHandle, group::SharedHealth, model_info::ModelInfo, tokenizer::Tokenizer,
};
pub use error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What every handler can reach.
pub struct AppState {
    pub model: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub health: SharedHealth,
    /// Set once the worker group is formed and warmed up.
    pub engine: OnceLock<EngineHandle>,
    pub created: u64,
}

pub type SharedState = Arc<AppState>;

/// Builds the router.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

async fn models(State(state): State<SharedState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.model.name,
            "object": "model",
            "created": state.created,
            "owned_by": "caravan",
            "max_model_len": state.model.max_context,
        }]
    }))
}

/// 200 only when every worker is alive and the group can step.
async fn health(State(state): State<SharedState>) -> Response {
    if state.engine.get().is_some() && state.health.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        let reason = match state.health.reason() {
            r if r.is_empty() => "starting: the worker group is not formed yet".to_string(),
            r => r,
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": reason})),
        )
            .into_response()
    }
}

/// Prometheus text exposition of the scheduler's counters.
async fn metrics(State(state): State<SharedState>) -> Response {
    let ready = u8::from(state.engine.get().is_some() && state.health.is_ready());
    let mut body = format!(
        "# HELP caravan_ready Whether the worker group can serve (1) or not (0).\n\
         # TYPE caravan_ready gauge\ncaravan_ready {ready}\n"
    );
    if let Some(engine) = state.engine.get() {
        body += &engine.stats().render();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "Unknown endpoint.".into(),
        param: None,
        code: None,
    }
}
