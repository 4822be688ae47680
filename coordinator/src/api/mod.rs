//! The OpenAI-compatible HTTP API (axum): completions and chat completions, streaming or not,
//! models, vLLM's tokenize and detokenize, health, and Prometheus metrics.

pub mod auth;
mod collect;
pub mod completions;
pub mod error;
pub mod forward;
mod render;
mod stream;
pub mod tokenize;
pub mod types;
pub mod validate;

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, RwLock,
};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use caravan_proto::admin;
use serde_json::json;

use tokio::sync::Notify;

use crate::{
    chat_template::ChatTemplate,
    engine::EngineHandle,
    group::{GroupMember, HealthProbe},
    health::SharedHealth,
    model_info::ModelInfo,
    registry::Registry,
    stats::EngineStats,
    structured::Grammars,
    tokenizer::Tokenizer,
};
pub use error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What every handler can reach.
pub struct AppState {
    pub model: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Arc<ChatTemplate>,
    /// Compiles structured-output constraints for this model's tokenizer.
    pub grammars: Arc<Grammars>,
    pub health: SharedHealth,
    /// The scheduler of the current worker group; `None` while a group is being formed.
    pub engine: RwLock<Option<EngineHandle>>,
    /// The current group's members, rank order, and a way to ask them how they are.
    pub workers: RwLock<Vec<GroupMember>>,
    pub probe: RwLock<Option<HealthProbe>>,
    /// Every registered worker, in the group or not.
    pub registry: Arc<Registry>,
    pub tp: usize,
    /// Counters that live across group formations.
    pub stats: Arc<EngineStats>,
    pub control: Arc<Control>,
    pub created: u64,
    /// With `--forward-to-leader`: a standby's way to the leader.
    pub forward: Option<Arc<forward::Forwarder>>,
}

/// Operator controls: draining.
#[derive(Debug, Default)]
pub struct Control {
    /// No new requests are admitted.
    pub draining: AtomicBool,
    /// Everything in flight has ended; the process is stopping.
    pub drained: AtomicBool,
    /// Signalled by `POST /admin/drain`.
    pub drain_requested: Notify,
}

impl AppState {
    /// The scheduler, when a group is serving.
    pub fn engine(&self) -> Option<EngineHandle> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_ready(&self) -> bool {
        !self.control.draining.load(Ordering::Acquire)
            && self.engine().is_some()
            && self.health.is_ready()
    }

    pub fn not_ready_reason(&self) -> String {
        if self.control.draining.load(Ordering::Acquire) {
            return "draining".into();
        }
        match self.health.reason() {
            r if r.is_empty() => "starting: the worker group is not formed yet".to_string(),
            r => r,
        }
    }
}

pub type SharedState = Arc<AppState>;

/// Builds the router; with `keys`, every route but those they leave public needs a key.
pub fn router(state: SharedState, keys: Option<Arc<auth::ApiKeys>>) -> Router {
    let router = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/admin/status", get(admin_status))
        .route("/admin/workers", get(admin_workers))
        .route("/admin/drain", post(admin_drain))
        .fallback(not_found);
    // Only a coordinator started with --forward-to-leader looks at who leads.
    let router = match state.forward {
        Some(_) => router.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            forward::to_leader,
        )),
        None => router,
    }
    .with_state(state);
    match keys {
        Some(keys) => router.layer(axum::middleware::from_fn_with_state(
            keys,
            auth::require_api_key,
        )),
        None => router,
    }
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
    if state.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": state.not_ready_reason()})),
        )
            .into_response()
    }
}

/// What `caravanctl status` shows: the group, rank by rank (each asked for its health now).
async fn admin_status(State(state): State<SharedState>) -> Json<admin::Status> {
    let members = state
        .workers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let probe = state
        .probe
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let health = match probe {
        Some(p) => p.statuses().await.iter().map(|h| h.describe()).collect(),
        None => vec![],
    };
    let world = members.len();
    let workers = members
        .iter()
        .enumerate()
        .map(|(rank, m)| admin::GroupMember {
            rank,
            shard: format!("{} of {world}", rank + 1),
            id: m.worker.id.clone(),
            address: m.worker.worker_addr.clone(),
            ring_address: m.worker.ring_addr.clone(),
            host: m.worker.host.clone(),
            device: m.worker.device.clone(),
            memory_bytes: m.worker.memory_bytes,
            weight_bytes: m.memory.weight_bytes,
            kv_cache_bytes: m.memory.kv_cache_bytes,
            device_total_bytes: m.memory.device_total_bytes,
            device_free_bytes: m.memory.device_free_bytes,
            kernels: m.kernels.clone(),
            health: health
                .get(rank)
                .cloned()
                .unwrap_or_else(|| "unknown".into()),
        })
        .collect();
    let spares = state
        .registry
        .workers()
        .into_iter()
        .filter(|w| !members.iter().any(|m| m.worker.id == w.id))
        .map(|w| w.id)
        .collect();
    let s = &state.stats;
    let ready = state.is_ready();
    Json(admin::Status {
        model: state.model.name.clone(),
        tensor_parallel_size: state.tp,
        ready,
        reason: if ready {
            String::new()
        } else {
            state.not_ready_reason()
        },
        draining: state.control.draining.load(Ordering::Acquire),
        drained: state.control.drained.load(Ordering::Acquire),
        in_flight: EngineStats::get(&s.in_flight),
        running: EngineStats::get(&s.running),
        waiting: EngineStats::get(&s.waiting),
        kv_cache_blocks_used: EngineStats::get(&s.kv_blocks_used),
        kv_cache_blocks_total: EngineStats::get(&s.kv_blocks_total),
        workers,
        spares,
    })
}

/// What `caravanctl workers` shows: every registered worker, in the group or not.
async fn admin_workers(State(state): State<SharedState>) -> Json<admin::Workers> {
    let members: Vec<String> = state
        .workers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|m| m.worker.id.clone())
        .collect();
    let workers = state
        .registry
        .workers()
        .into_iter()
        .map(|w| admin::RegisteredWorker {
            rank: members.iter().position(|m| *m == w.id),
            id: w.id,
            address: w.worker_addr,
            ring_address: w.ring_addr,
            host: w.host,
            device: w.device,
            memory_bytes: w.memory_bytes,
            last_seen_ms: w.last_seen.elapsed().as_millis() as u64,
        })
        .collect();
    Json(admin::Workers { workers })
}

/// Starts a drain: no new requests; the process stops once those in flight end (or the drain
/// timeout passes). Answers at once; poll `/admin/status` for `drained`.
async fn admin_drain(State(state): State<SharedState>) -> Response {
    state.control.drain_requested.notify_one();
    (
        StatusCode::ACCEPTED,
        Json(admin::DrainStarted {
            status: "draining".into(),
            in_flight: EngineStats::get(&state.stats.in_flight),
        }),
    )
        .into_response()
}

/// Prometheus text exposition of the scheduler's counters.
async fn metrics(State(state): State<SharedState>) -> Response {
    let ready = u8::from(state.is_ready());
    let mut body = format!(
        "# HELP caravan_ready Whether the worker group can serve (1) or not (0).\n\
         # TYPE caravan_ready gauge\ncaravan_ready {ready}\n"
    );
    body += &state.stats.render();
    let members: Vec<String> = state
        .workers
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|m| m.worker.id.clone())
        .collect();
    let registered = state.registry.workers();
    let spares = registered
        .iter()
        .filter(|w| !members.contains(&w.id))
        .count();
    body += &format!(
        "# HELP caravan_workers_registered Workers registered and alive.\n\
         # TYPE caravan_workers_registered gauge\ncaravan_workers_registered {}\n\
         # HELP caravan_workers_up Workers in the serving group (0 while it is not ready).\n\
         # TYPE caravan_workers_up gauge\ncaravan_workers_up {}\n\
         # HELP caravan_workers_spare Registered workers outside the group, ready to replace a rank.\n\
         # TYPE caravan_workers_spare gauge\ncaravan_workers_spare {spares}\n",
        registered.len(),
        if ready == 1 { members.len() } else { 0 },
    );
    if let Some(forward) = &state.forward {
        body += &format!(
            "# HELP caravan_forwarded_requests_total Requests this standby sent on to the leader.\n\
             # TYPE caravan_forwarded_requests_total counter\ncaravan_forwarded_requests_total {}\n\
             # HELP caravan_forwarded_requests_in_flight Forwarded requests whose answers are still streaming back.\n\
             # TYPE caravan_forwarded_requests_in_flight gauge\ncaravan_forwarded_requests_in_flight {}\n",
            forward.forwarded.load(Ordering::Relaxed),
            forward.in_flight.load(Ordering::Relaxed),
        );
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
