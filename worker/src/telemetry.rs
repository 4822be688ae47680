//! Logging and tracing set-up for the worker's binaries (see `caravan_common::telemetry`).

pub use caravan_common::telemetry::TelemetryGuard;
use caravan_common::telemetry::{init as init_telemetry, LogFormat, TelemetryConfig};

/// Structured logs on stderr, quiet by default (`RUST_LOG` overrides `default`); OTLP traces when
/// `otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is set.
pub fn init(
    default: &str,
    log_format: LogFormat,
    otlp_endpoint: Option<String>,
) -> Result<TelemetryGuard, String> {
    init_telemetry(TelemetryConfig {
        service: "caravan-worker",
        default_filter: default.to_string(),
        log_format,
        otlp_endpoint,
    })
}
