//! Logging set-up shared by Caravan's binaries: structured, on stderr, quiet by default.

use tracing_subscriber::EnvFilter;

/// Installs a `tracing` subscriber. `RUST_LOG` (e.g. `caravan_ops=info`) overrides `default`.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
