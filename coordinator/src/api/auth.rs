//! API keys: with `--api-key` or `--api-key-file`, every HTTP request must carry
//! `Authorization: Bearer <key>` (401 with an OpenAI-style JSON error otherwise). `/health` and
//! `/metrics` can be left open for probes and scrapers with `--public-health-and-metrics`.

use std::{path::Path, sync::Arc};

use anyhow::{ensure, Context, Result};
use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::ApiError;

/// The accepted keys and which paths need none.
#[derive(Debug, Clone)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
    public_health_and_metrics: bool,
}

impl ApiKeys {
    /// Keys from the command line and from a file (one per line; blank lines and `#` comments
    /// skipped). `None` when there are none: the API is open.
    pub fn load(
        keys: &[String],
        file: Option<&Path>,
        public_health_and_metrics: bool,
    ) -> Result<Option<Arc<Self>>> {
        let mut all: Vec<String> = keys.iter().map(|k| k.trim().to_string()).collect();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading API keys from {}", path.display()))?;
            all.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
            ensure!(
                !all.is_empty(),
                "{} holds no API keys (one per line)",
                path.display()
            );
        }
        for key in &all {
            ensure!(
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic()),
                "API keys must be non-empty printable ASCII without spaces"
            );
        }
        if all.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(ApiKeys {
            keys: all.into_iter().map(String::into_bytes).collect(),
            public_health_and_metrics,
        })))
    }

    /// Whether `presented` is one of the keys, in time independent of where it differs.
    fn accepts(&self, presented: &[u8]) -> bool {
        self.keys
            .iter()
            .fold(false, |found, key| found | constant_time_eq(key, presented))
    }

    fn is_public(&self, path: &str) -> bool {
        self.public_health_and_metrics && matches!(path, "/health" | "/metrics")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware: passes the request on, or answers 401.
pub async fn require_api_key(
    State(keys): State<Arc<ApiKeys>>,
    request: Request,
    next: Next,
) -> Response {
    if keys.is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let message = match presented {
        Some(key) if keys.accepts(key.as_bytes()) => return next.run(request).await,
        Some(_) => "Incorrect API key provided.",
        None => {
            "You didn't provide an API key. Send it in the Authorization header: \
             `Authorization: Bearer YOUR_KEY`."
        }
    };
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        kind: "invalid_request_error",
        message: message.into(),
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_flags_and_files_and_compare_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# team keys\nsk-alpha\n\n  sk-beta  \n").unwrap();
        let keys = ApiKeys::load(&["sk-flag".into()], Some(&file), false)
            .unwrap()
            .unwrap();
        for ok in ["sk-flag", "sk-alpha", "sk-beta"] {
            assert!(keys.accepts(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "sk-alph", "sk-alphaa", "SK-ALPHA", "# team keys"] {
            assert!(!keys.accepts(bad.as_bytes()), "{bad}");
        }
        assert!(ApiKeys::load(&[], None, false).unwrap().is_none());
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(ApiKeys::load(&[], Some(&file), false).is_err());
        assert!(ApiKeys::load(&["has space".into()], None, false).is_err());
    }

    #[test]
    fn only_health_and_metrics_can_be_public() {
        let keys = ApiKeys::load(&["k".into()], None, true).unwrap().unwrap();
        assert!(keys.is_public("/health") && keys.is_public("/metrics"));
        assert!(!keys.is_public("/v1/completions") && !keys.is_public("/admin/drain"));
        let closed = ApiKeys::load(&["k".into()], None, false).unwrap().unwrap();
        assert!(!closed.is_public("/health"));
    }
}
