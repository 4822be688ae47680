//! A standby coordinator answers the engine's endpoints through the leader
//! (`--forward-to-leader`): completions, chat completions, `/health` and the status pages are
//! sent on to the URL the leader announced in etcd and its answer streamed back, so that every
//! coordinator behind a Service serves once the leader does (and a Kubernetes readiness probe,
//! `/health`, passes on each of them). What a coordinator answers from its own state stays
//! local: models, tokenize, metrics, drain.
//!
//! A forwarded request carries [`FORWARDED_BY`]; a coordinator that receives one and does not
//! lead answers it itself (503 "standby") rather than forwarding again, so a stale view of who
//! leads can never make a loop.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use futures::StreamExt;
use http_body_util::BodyExt;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::json;

use super::SharedState;

/// Set on a forwarded request: the forwarding coordinator's URL.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-caravan-forwarded-by");

/// The endpoints that need the leader's engine or group.
const FORWARDED_PATHS: [&str; 5] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/health",
    "/admin/status",
    "/admin/workers",
];

/// How long connecting to the leader may take before the request fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Hop-by-hop headers (RFC 9110, section 7.6.1), never passed on.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Who leads, and the client this coordinator forwards with.
pub struct Forwarder {
    client: Client<HttpConnector, Body>,
    /// This coordinator's URL as announced in etcd when it leads.
    own_url: String,
    /// The URL the current leader announced; `None` while none leads.
    leader: RwLock<Option<String>>,
    /// This coordinator leads, and serves everything itself.
    leading: AtomicBool,
    /// Requests forwarded, and those whose answers are still streaming back (a drain waits for
    /// them).
    pub forwarded: AtomicU64,
    pub in_flight: Arc<AtomicU64>,
}

impl Forwarder {
    pub fn new(own_url: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // Streamed tokens are small writes (see the HTTP listener).
        connector.set_nodelay(true);
        Forwarder {
            client: Client::builder(TokioExecutor::new()).build(connector),
            own_url,
            leader: RwLock::new(None),
            leading: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            in_flight: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn set_leader(&self, url: Option<String>) {
        *self.leader.write().unwrap_or_else(|e| e.into_inner()) = url;
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
    }

    /// Where to forward to: another coordinator's URL, while this one does not lead.
    fn target(&self) -> Option<String> {
        if self.leading.load(Ordering::Acquire) {
            return None;
        }
        let leader = self.leader.read().unwrap_or_else(|e| e.into_inner());
        leader.clone().filter(|url| *url != self.own_url)
    }

    /// Sends `request` to `leader` and streams its answer back; a leader that cannot be reached
    /// is a 503 that says so.
    async fn forward(&self, leader: &str, request: Request) -> Response {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri = match format!("{}{path}", leader.trim_end_matches('/')).parse::<Uri>() {
            Ok(uri) => uri,
            Err(e) => {
                return unavailable(format!(
                    "standby: the leader announced an unusable URL {leader:?}: {e}"
                ))
            }
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        if let Ok(own) = HeaderValue::from_str(&self.own_url) {
            parts.headers.insert(FORWARDED_BY, own);
        }
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::start(self.in_flight.clone());
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(answer) => {
                let (mut parts, body) = answer.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // Counted until the last byte is passed on, or the client goes away.
                let stream = body.into_data_stream().map(move |chunk| {
                    let _counted = &in_flight;
                    chunk
                });
                Response::from_parts(parts, Body::from_stream(stream))
            }
            Err(e) => unavailable(format!(
                "standby: forwarding to the leader at {leader} failed: {e}"
            )),
        }
    }
}

/// Counts one forwarded request while it lives.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn start(counter: Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A 503 that both `/health` readers (`reason`) and API clients (`error.message`) understand.
fn unavailable(reason: String) -> Response {
    tracing::warn!(%reason, "cannot forward to the leader");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "unavailable",
            "reason": reason,
            "error": {"message": reason, "type": "service_unavailable", "param": null, "code": null},
        })),
    )
        .into_response()
}

/// The middleware: forwards the engine's endpoints while another coordinator leads; everything
/// else, and everything while this one leads, drains or knows no leader, is answered here.
pub async fn to_leader(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let Some(forwarder) = &state.forward else {
        return next.run(request).await;
    };
    let forwardable = FORWARDED_PATHS.contains(&request.uri().path())
        && !request.headers().contains_key(FORWARDED_BY)
        && !state.control.draining.load(Ordering::Acquire);
    match forwardable.then(|| forwarder.target()).flatten() {
        Some(leader) => forwarder.forward(&leader, request).await,
        None => next.run(request).await,
    }
}
