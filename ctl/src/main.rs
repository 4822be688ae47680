//! `caravanctl`: the operator CLI. Talks to a coordinator's HTTP admin endpoints (their JSON is
//! `caravan_proto::admin`), and runs the offline tools in [`operator`] (checkpoint conversion,
//! layout planning).

mod operator;

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use caravan_common::units::parse_bytes;
use caravan_proto::admin;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use operator::{
    convert::{Conversion, ConvertOptions},
    hardware,
    plan::{self, Goal, ModelShape, PlanRequest},
};
use serde_json::Value;

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
    /// The coordinator's API key, when it was started with --api-key or --api-key-file.
    #[arg(long, global = true, env = "CARAVAN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file of API keys, one per line (as the coordinator's --api-key-file): the first is sent.
    #[arg(
        long,
        global = true,
        env = "CARAVAN_API_KEY_FILE",
        conflicts_with = "api_key"
    )]
    api_key_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Online {
    /// Readiness, requests in flight, KV-cache use and the worker group, rank by rank (host,
    /// device, memory, shard, health).
    Status,
    /// Every registered worker, in the group or waiting to join one.
    Workers,
    /// Stream a completion of one prompt to the terminal.
    Generate {
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
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
    Health {
        /// Wait up to SECONDS for /health to answer 200 (the group formed, loaded and warmed
        /// up), printing each new reason on the way; a coordinator not reachable yet counts as
        /// not ready. Exits 1 with the last reason when the time is up.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Online(Online),
    /// Turn a multi-head checkpoint into a grouped-query one by mean-pooling each group's key
    /// and value heads (GQA paper, arXiv 2305.13245, section 2.1). Offline; streams tensor by
    /// tensor.
    Convert {
        /// KV heads to keep; must divide the checkpoint's KV heads (and so its query heads).
        #[arg(long)]
        kv_heads: usize,
        /// Largest output shard, e.g. 5GB, 500MB, 2GiB.
        #[arg(long, default_value = "5GB", value_parser = parse_bytes)]
        max_shard_size: u64,
        /// The Hugging Face checkpoint folder to read.
        input: PathBuf,
        /// The folder to write (must not exist, or be empty).
        output: PathBuf,
    },
    /// Tensor-parallel layouts for a model on GPU nodes: memory, KV-cache capacity, all-reduce
    /// volume and decode-time bounds per layout, and a recommendation. Offline.
    Plan {
        /// llama-2-7b, llama-2-13b, llama-2-70b, a config.json, or a checkpoint folder.
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 1)]
        nodes: u64,
        #[arg(long)]
        gpus_per_node: u64,
        /// One of the GPUs in the planner's table (docs/SCALING.md), e.g. a100-80gb.
        #[arg(long)]
        gpu: String,
        #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
        dtype: String,
        /// Sequence length to count KV capacity in.
        #[arg(long, default_value_t = 4096)]
        context: u64,
        /// Network bandwidth of each node in Gbit/s, for groups that span nodes.
        #[arg(long, default_value_t = 200.0)]
        network_gbps: f64,
        /// Fraction of GPU memory to use (as vLLM's --gpu-memory-utilization).
        #[arg(long, default_value_t = 0.9)]
        memory_utilization: f64,
        /// GiB per GPU kept for activations and the CUDA context.
        #[arg(long, default_value_t = 2.0)]
        activation_reserve_gib: f64,
        #[arg(long, value_enum, default_value_t = Goal::Throughput)]
        goal: Goal,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let api_key = match api_key(cli.api_key.clone(), cli.api_key_file.as_deref()) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let online = match cli.command {
        Command::Online(online) => online,
        offline => {
            return match run_offline(offline, cli.json) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    match run(&cli.url, api_key, cli.json, online) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The key to send: `--api-key`, or the first key of `--api-key-file`.
fn api_key(key: Option<String>, file: Option<&std::path::Path>) -> Result<Option<String>> {
    let Some(path) = file else {
        return Ok(key);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading API keys from {}", path.display()))?;
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .with_context(|| format!("{} holds no API keys", path.display()))?;
    Ok(Some(first.to_string()))
}

/// Commands that need no coordinator.
fn run_offline(command: Command, json: bool) -> Result<ExitCode> {
    match command {
        Command::Convert {
            kv_heads,
            max_shard_size,
            input,
            output,
        } => {
            let options = ConvertOptions {
                input,
                output,
                kv_heads,
                max_shard_bytes: max_shard_size,
            };
            run_convert(options, json)
        }
        Command::Plan {
            model,
            nodes,
            gpus_per_node,
            gpu,
            dtype,
            context,
            network_gbps,
            memory_utilization,
            activation_reserve_gib,
            goal,
        } => {
            if !(0.0..=1024.0).contains(&activation_reserve_gib) {
                bail!("--activation-reserve-gib must be between 0 and 1024");
            }
            let request = PlanRequest {
                model: ModelShape::load(&model)?,
                nodes,
                gpus_per_node,
                gpu: hardware::gpu(&gpu).map_err(anyhow::Error::msg)?,
                dtype_bytes: if dtype == "f32" { 4 } else { 2 },
                context,
                network_gbps,
                memory_utilization,
                activation_reserve_bytes: (activation_reserve_gib * (1u64 << 30) as f64) as u64,
                goal,
            };
            let plan = request.plan()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", plan::render(&plan));
            }
            Ok(exit_code(plan.recommended.is_some()))
        }
        Command::Online(_) => bail!("not an offline command"),
    }
}

/// Commands that talk to a coordinator.
fn run(url: &str, api_key: Option<String>, json: bool, command: Online) -> Result<ExitCode> {
    let base = Base::parse(url, api_key)?;
    match command {
        Online::Status => show(&base, "/admin/status", json, print_status),
        Online::Workers => show(&base, "/admin/workers", json, print_workers),
        Online::Generate {
            prompt,
            max_tokens,
            temperature,
        } => generate(&base, &prompt, max_tokens, temperature, json),
        Online::Health { wait: None } => {
            let (code, body) = base.request("GET", "/health", None)?;
            if json {
                println!("{body}");
            } else if code == 200 {
                println!("ok");
            } else {
                println!("unavailable (HTTP {code}): {}", health_reason(&body));
            }
            Ok(exit_code(code == 200))
        }
        Online::Health {
            wait: Some(seconds),
        } => wait_healthy(&base, seconds, json),
        Online::Drain { timeout } => {
            let (code, body) = base.request("POST", "/admin/drain", None)?;
            if code != 202 {
                bail!("drain refused (HTTP {code}): {body}");
            }
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let mut last = None;
            loop {
                let (status, body) = match base.request("GET", "/admin/status", None) {
                    Ok((_, body)) => (
                        serde_json::from_str::<admin::Status>(&body)
                            .context("parsing /admin/status")?,
                        body,
                    ),
                    // The coordinator finished draining and exited.
                    Err(_) => {
                        eprintln!("drained: the coordinator has stopped");
                        return Ok(ExitCode::SUCCESS);
                    }
                };
                if status.drained {
                    eprintln!("drained");
                    if json {
                        println!("{body}");
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                if last != Some(status.in_flight) {
                    eprintln!("draining: {} requests in flight", status.in_flight);
                    last = Some(status.in_flight);
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "still {} requests in flight after {timeout} s",
                        status.in_flight
                    );
                    return Ok(ExitCode::FAILURE);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// GETs an admin endpoint and prints it: as (pretty) JSON, or as `table` prints its typed form.
fn show<T: serde::de::DeserializeOwned>(
    base: &Base,
    path: &str,
    json: bool,
    table: fn(&T),
) -> Result<ExitCode> {
    let body = base.get_ok(path)?;
    let parsing = || format!("parsing {path}");
    if json {
        let value: Value = serde_json::from_str(&body).with_context(parsing)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        table(&serde_json::from_str(&body).with_context(parsing)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Converts with progress on stderr: a bar on a terminal, else a line at every tenth of the
/// bytes (for logs of a batch job).
fn run_convert(options: ConvertOptions, json: bool) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let (input, output) = (options.input.clone(), options.output.clone());
    let conversion = Conversion::prepare(options)?;
    let total = conversion.output_bytes();
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "converting {bar:30} {bytes}/{total_bytes} [{elapsed_precise}, {bytes_per_sec}]",
        )
        .expect("static template"),
    );
    let lines = !std::io::stderr().is_terminal();
    let (mut done, mut tenths) = (0u64, 0u64);
    let started = Instant::now();
    let report = conversion.run(&mut |bytes| {
        bar.inc(bytes);
        done += bytes;
        let now = (done * 10).checked_div(total).unwrap_or(10);
        if lines && now > tenths {
            tenths = now;
            eprintln!(
                "converting: {:>3}% ({:.1} of {:.1} MiB, {:.0} s)",
                now * 10,
                done as f64 / (1u64 << 20) as f64,
                total as f64 / (1u64 << 20) as f64,
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    bar.finish_and_clear();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "kv_heads_before": report.kv_heads_before,
                "kv_heads_after": report.kv_heads_after,
                "tensors": report.tensors,
                "pooled": report.pooled,
                "shards": report.shards,
                "bytes_before": report.bytes_before,
                "bytes_written": report.bytes_written,
            })
        );
    } else {
        println!(
            "converted {} -> {}: {} KV heads -> {}, {} projections mean-pooled, {} tensors in {} \
             shard(s), {:.1} MiB -> {:.1} MiB",
            input.display(),
            output.display(),
            report.kv_heads_before,
            report.kv_heads_after,
            report.pooled,
            report.tensors,
            report.shards,
            report.bytes_before as f64 / (1u64 << 20) as f64,
            report.bytes_written as f64 / (1u64 << 20) as f64,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Streams one completion, printing text as it arrives.
fn generate(
    base: &Base,
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    json: bool,
) -> Result<ExitCode> {
    let models = base.get_ok("/v1/models")?;
    let models: Value = serde_json::from_str(&models).context("parsing /v1/models")?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("the server lists no model")?
        .to_string();
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": temperature, "stream": true,
    });
    let response = base.send("POST", "/v1/completions", Some(&body.to_string()), None)?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if status != 200 {
        bail!(
            "HTTP {status}: {}",
            body.read_to_string().unwrap_or_default()
        );
    }
    let mut out = std::io::stdout();
    for line in BufReader::new(body.into_reader()).lines() {
        let line = line.context("reading the stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: Value = serde_json::from_str(data).context("parsing an event")?;
        if json {
            println!("{data}");
            continue;
        }
        if let Some(error) = event.get("error") {
            println!();
            bail!(
                "{}",
                error["message"]
                    .as_str()
                    .unwrap_or("the server ended the stream with an error")
            );
        }
        if let Some(text) = event["choices"][0]["text"].as_str() {
            print!("{text}");
            out.flush()?;
        }
    }
    if !json {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn print_workers(w: &admin::Workers) {
    println!("WORKER           RANK  HOST             DEVICE   MEMORY     LAST SEEN  ADDRESS");
    for w in &w.workers {
        println!(
            "{:<16} {:<5} {:<16} {:<8} {:<10} {:<10} {}",
            w.id,
            w.rank.map_or("-".to_string(), |r| r.to_string()),
            w.host,
            w.device,
            gib(w.memory_bytes),
            format!("{} ms", w.last_seen_ms),
            w.address,
        );
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn print_status(s: &admin::Status) {
    println!(
        "model      {}\nready      {}{}\nin flight  {} ({} running, {} waiting)\nKV cache   {} / {} blocks in use",
        s.model,
        if s.ready { "yes" } else { "no" },
        if s.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.reason)
        },
        s.in_flight,
        s.running,
        s.waiting,
        s.kv_cache_blocks_used,
        s.kv_cache_blocks_total,
    );
    // MEMORY: the device's (the GPU's, or the host's on CPU) in use and total, once the shard
    // and its KV cache were in place.
    println!("\nRANK  SHARD   WORKER           HOST             DEVICE   MEMORY          WEIGHTS    KV CACHE   RING                   HEALTH");
    for w in &s.workers {
        let memory = match w.device_total_bytes {
            0 => "-".to_string(),
            total => format!(
                "{:.1}/{}",
                total.saturating_sub(w.device_free_bytes) as f64 / (1u64 << 30) as f64,
                gib(total)
            ),
        };
        println!(
            "{:<5} {:<7} {:<16} {:<16} {:<8} {:<15} {:<10} {:<10} {:<22} {}",
            w.rank,
            w.shard,
            w.id,
            w.host,
            w.device,
            memory,
            gib(w.weight_bytes),
            gib(w.kv_cache_bytes),
            w.ring_address,
            w.health,
        );
    }
    if let Some(kernels) = kernels_line(&s.workers) {
        println!("\nkernels    {kernels}");
    }
    if !s.spares.is_empty() {
        println!("\nspares     {}", s.spares.join(", "));
    }
}

/// What computes the ranks' weight products: once when every rank says the same, else per rank;
/// `None` when no rank said (older workers).
fn kernels_line(workers: &[admin::GroupMember]) -> Option<String> {
    let first = &workers.first()?.kernels;
    if workers.iter().all(|w| w.kernels.is_empty()) {
        None
    } else if workers.iter().all(|w| &w.kernels == first) {
        Some(format!("{first} (every rank)"))
    } else {
        let ranks: Vec<String> = workers
            .iter()
            .map(|w| {
                let kernels = if w.kernels.is_empty() {
                    "-"
                } else {
                    &w.kernels
                };
                format!("rank {}: {kernels}", w.rank)
            })
            .collect();
        Some(ranks.join("; "))
    }
}

/// A plain-HTTP base URL (the coordinator serves HTTP; put TLS in front of it).
struct Base {
    url: String,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer` when the coordinator requires a key.
    api_key: Option<String>,
}

/// How often `caravanctl health --wait` asks again.
const HEALTH_POLL: Duration = Duration::from_secs(2);

/// Why /health is not 200, from its JSON body.
fn health_reason(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    v["reason"]
        .as_str()
        .or(v["error"]["message"].as_str())
        .unwrap_or(body.trim())
        .to_string()
}

fn exit_code(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Polls /health until it answers 200 or `seconds` pass; each new reason goes to stderr as the
/// wait's progress.
fn wait_healthy(base: &Base, seconds: u64, json: bool) -> Result<ExitCode> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut last_reason = String::new();
    loop {
        let reason = match base.request("GET", "/health", None) {
            Ok((200, body)) => {
                if json {
                    println!("{body}");
                } else {
                    println!("ok after {} s", start.elapsed().as_secs());
                }
                return Ok(ExitCode::SUCCESS);
            }
            Ok((code, body)) => format!("HTTP {code}: {}", health_reason(&body)),
            Err(e) => format!("not reachable: {e:#}"),
        };
        if reason != last_reason {
            eprintln!("[{:>4} s] waiting: {reason}", start.elapsed().as_secs());
            last_reason = reason;
        }
        let now = Instant::now();
        if now >= deadline {
            println!("unavailable after {seconds} s: {last_reason}");
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(HEALTH_POLL.min(deadline - now));
    }
}

impl Base {
    fn parse(url: &str, api_key: Option<String>) -> Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--url must be http://HOST:PORT, got {url:?}");
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("--url must be http://HOST:PORT, got {url:?}");
        }
        if let Some(key) = &api_key {
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("--api-key must be printable ASCII without spaces");
            }
        }
        let agent = ureq::Agent::config_builder()
            // Straight to the coordinator, as before: never hand the API key to a proxy from the
            // environment.
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(5)))
            // The status line and headers; a streamed body may take as long as it takes.
            .timeout_recv_response(Some(Duration::from_secs(30)))
            // Statuses are answers here, not transport errors: their JSON says why.
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Base {
            url: format!("http://{authority}"),
            agent,
            api_key,
        })
    }

    /// Sends a request; the response's body is read by the caller, within `body_timeout` when
    /// one is given (a stream has none).
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        body_timeout: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{path}", self.url);
        let auth = self.api_key.as_ref().map(|k| format!("Bearer {k}"));
        let sent = match method {
            "GET" => {
                let mut r = self
                    .agent
                    .get(&url)
                    .config()
                    .timeout_recv_body(body_timeout)
                    .build();
                if let Some(auth) = &auth {
                    r = r.header("Authorization", auth);
                }
                r.call()
            }
            "POST" => {
                let mut r = self
                    .agent
                    .post(&url)
                    .config()
                    .timeout_recv_body(body_timeout)
                    .build()
                    .content_type("application/json");
                if let Some(auth) = &auth {
                    r = r.header("Authorization", auth);
                }
                r.send(body.unwrap_or(""))
            }
            other => bail!("unsupported method {other}"),
        };
        sent.with_context(|| format!("{method} {url}"))
    }

    /// One request, its whole body read (within 30 s): (status, body).
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let response = self.send(method, path, body, Some(Duration::from_secs(30)))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        Ok((status, body))
    }

    /// A GET that must answer 200; anything else is an error carrying the server's message.
    fn get_ok(&self, path: &str) -> Result<String> {
        let (status, body) = self.request("GET", path, None)?;
        if status != 200 {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let message = v["error"]["message"].as_str().unwrap_or(body.trim());
            bail!("GET {path}: HTTP {status}: {message}");
        }
        Ok(body)
    }
}
