//! Logging and tracing set-up for the worker's binaries (see `caravan_proto::telemetry`).

pub use caravan_proto::telemetry::TelemetryGuard;
use caravan_proto::telemetry::{init as init_telemetry, TelemetryConfig};

/// Structured logs on stderr, quiet by default (`RUST_LOG` overrides `default`); OTLP traces when
/// `otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is set.
pub fn init(
    default: &str,
    log_format: &str,
    otlp_endpoint: Option<String>,
) -> Result<TelemetryGuard, String> {
    init_telemetry(TelemetryConfig {
        service: "caravan-worker",
        default_filter: default.to_string(),
        log_format: log_format.to_string(),
        otlp_endpoint,
    })
}
