//! `caravanctl`: the operator CLI. Talks to a coordinator's HTTP admin endpoints.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Operate a Caravan cluster.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// The coordinator's HTTP address.
    #[arg(
        long,
        global = true,
        env = "CARAVAN_URL",
        default_value = "http://127.0.0.1:8000"
    )]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Readiness, requests in flight, KV-cache use and the worker group, rank by rank.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop admitting requests, wait for those in flight to finish, and stop the coordinator.
    /// Exits 0 once drained (or once the coordinator is gone).
    Drain {
        /// Seconds to wait for the drain to complete before giving up (the coordinator ends
        /// what is left at its own --drain-timeout).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Exit 0 if the coordinator answers /health with 200, else 1 with the reason.
    Health,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let base = Base::parse(&cli.url)?;
    match cli.command {
        Command::Status { json } => {
            let (_, body) = base.request("GET", "/admin/status").await?;
            let status: Value = serde_json::from_str(&body).context("parsing /admin/status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health => {
            let (code, body) = base.request("GET", "/health").await?;
            println!("{body}");
            Ok(if code == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Drain { timeout } => {
            let (code, body) = base.request("POST", "/admin/drain").await?;
            if code != 202 {
                bail!("drain refused (HTTP {code}): {body}");
            }
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let mut last = None;
            loop {
                let status = match base.request("GET", "/admin/status").await {
                    Ok((_, body)) => serde_json::from_str::<Value>(&body)?,
                    // The coordinator finished draining and exited.
                    Err(_) => {
                        eprintln!("drained: the coordinator has stopped");
                        return Ok(ExitCode::SUCCESS);
                    }
                };
                let in_flight = status["in_flight"].as_u64().unwrap_or(0);
                if status["drained"].as_bool() == Some(true) {
                    eprintln!("drained");
                    return Ok(ExitCode::SUCCESS);
                }
                if last != Some(in_flight) {
                    eprintln!("draining: {in_flight} requests in flight");
                    last = Some(in_flight);
                }
                if Instant::now() > deadline {
                    eprintln!("still {in_flight} requests in flight after {timeout} s");
                    return Ok(ExitCode::FAILURE);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn print_status(s: &Value) {
    let ready = s["ready"].as_bool().unwrap_or(false);
    println!(
        "model      {}\nready      {}{}\nin flight  {} ({} running, {} waiting)\nKV cache   {} / {} blocks in use",
        s["model"].as_str().unwrap_or("?"),
        if ready { "yes" } else { "no" },
        match s["reason"].as_str() {
            Some(r) if !r.is_empty() => format!(" ({r})"),
            _ => String::new(),
        },
        s["in_flight"],
        s["running"],
        s["waiting"],
        s["kv_cache_blocks_used"],
        s["kv_cache_blocks_total"],
    );
    println!("\nRANK  WORKER     HOST             DEVICE   ADDRESS                      RING");
    for w in s["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<5} {:<10} {:<16} {:<8} {:<28} {}",
            w["rank"],
            w["id"].as_str().unwrap_or(""),
            w["host"].as_str().unwrap_or(""),
            w["device"].as_str().unwrap_or(""),
            w["address"].as_str().unwrap_or(""),
            w["ring_address"].as_str().unwrap_or(""),
        );
    }
}

/// A plain-HTTP base URL (the coordinator serves HTTP; put TLS in front of it).
struct Base {
    authority: String,
}

impl Base {
    fn parse(url: &str) -> Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--url must be http://HOST:PORT, got {url:?}");
        };
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!("--url must be http://HOST:PORT, got {url:?}");
        }
        Ok(Base { authority })
    }

    /// One request with `Connection: close`: (status, body).
    async fn request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        let connect = tokio::net::TcpStream::connect(&self.authority);
        let mut stream = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .with_context(|| format!("connecting to {}: timed out", self.authority))?
            .with_context(|| format!("connecting to {}", self.authority))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.authority
        );
        stream.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
            .await
            .context("reading the response: timed out")??;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("malformed HTTP response")?;
        Ok((code, body.to_string()))
    }
}
