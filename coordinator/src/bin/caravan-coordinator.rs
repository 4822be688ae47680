//! `caravan-coordinator`: serves a Llama 2 checkpoint over an OpenAI-compatible HTTP API,
//! sharded over a tensor-parallel group of workers.

use std::process::ExitCode;

use caravan_common::telemetry::{self, TelemetryConfig};
use caravan_coordinator::server::{serve, ServeArgs};
use clap::Parser;

/// Serve a Llama 2 model over HTTP, tensor-parallel across workers.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel needs the runtime.
    let _entered = runtime.enter();
    let _telemetry = match telemetry::init(TelemetryConfig {
        service: "caravan-coordinator",
        default_filter: "warn".into(),
        log_format: cli.serve.log_format,
        otlp_endpoint: cli.serve.otlp_endpoint.clone(),
    }) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli.serve)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
