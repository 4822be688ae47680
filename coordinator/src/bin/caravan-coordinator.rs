//! `caravan-coordinator`: serves a Llama 2 checkpoint over an OpenAI-compatible HTTP API,
//! sharded over a tensor-parallel group of workers.

use std::process::ExitCode;

use caravan_coordinator::server::{serve, ServeArgs};
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Serve a Llama 2 model over HTTP, tensor-parallel across workers.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
    match runtime.block_on(serve(cli.serve)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
