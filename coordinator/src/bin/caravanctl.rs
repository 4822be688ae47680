//! `caravanctl`: the operator CLI. Talks to a coordinator's HTTP admin endpoints, and runs the
//! offline tools (checkpoint conversion, layout planning).

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use caravan_coordinator::operator::{
    convert::{Conversion, ConvertOptions},
    hardware,
    plan::{self, Goal, ModelShape, PlanRequest},
};
use caravan_coordinator::server::parse_bytes;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

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
    Health,
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
    match runtime.block_on(run(&cli.url, api_key, cli.json, online)) {
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
            Ok(if plan.recommended.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Online(_) => bail!("not an offline command"),
    }
}

/// Commands that talk to a coordinator.
async fn run(url: &str, api_key: Option<String>, json: bool, command: Online) -> Result<ExitCode> {
    let base = Base::parse(url, api_key)?;
    match command {
        Online::Status => {
            let body = base.get_ok("/admin/status").await?;
            let status: Value = serde_json::from_str(&body).context("parsing /admin/status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Online::Workers => {
            let body = base.get_ok("/admin/workers").await?;
            let workers: Value = serde_json::from_str(&body).context("parsing /admin/workers")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else {
                print_workers(&workers);
            }
            Ok(ExitCode::SUCCESS)
        }
        Online::Generate {
            prompt,
            max_tokens,
            temperature,
        } => generate(&base, &prompt, max_tokens, temperature, json).await,
        Online::Health => {
            let (code, body) = base.request("GET", "/health", None).await?;
            if json {
                println!("{body}");
            } else {
                let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if code == 200 {
                    println!("ok");
                } else {
                    let reason = v["reason"]
                        .as_str()
                        .or(v["error"]["message"].as_str())
                        .unwrap_or(body.trim());
                    println!("unavailable (HTTP {code}): {reason}");
                }
            }
            Ok(if code == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Online::Drain { timeout } => {
            let (code, body) = base.request("POST", "/admin/drain", None).await?;
            if code != 202 {
                bail!("drain refused (HTTP {code}): {body}");
            }
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let mut last = None;
            loop {
                let status = match base.request("GET", "/admin/status", None).await {
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
                    if json {
                        println!("{}", serde_json::to_string_pretty(&status)?);
                    }
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
async fn generate(
    base: &Base,
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    json: bool,
) -> Result<ExitCode> {
    let models = base.get_ok("/v1/models").await?;
    let models: Value = serde_json::from_str(&models).context("parsing /v1/models")?;
    let model = models["data"][0]["id"]
        .as_str()
        .context("the server lists no model")?
        .to_string();
    let body = serde_json::json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": temperature, "stream": true,
    });
    let mut stream = base
        .open("POST", "/v1/completions", Some(&body.to_string()))
        .await?;
    if stream.status != 200 {
        let status = stream.status;
        bail!("HTTP {status}: {}", stream.read_rest().await?);
    }
    let mut out = std::io::stdout();
    while let Some(line) = stream.next_line().await? {
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
            use std::io::Write;
            print!("{text}");
            out.flush()?;
        }
    }
    if !json {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn print_workers(w: &Value) {
    println!("WORKER           RANK  HOST             DEVICE   MEMORY     LAST SEEN  ADDRESS");
    for w in w["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<5} {:<16} {:<8} {:<10} {:<10} {}",
            w["id"].as_str().unwrap_or(""),
            w["rank"]
                .as_u64()
                .map_or("-".to_string(), |r| r.to_string()),
            w["host"].as_str().unwrap_or(""),
            w["device"].as_str().unwrap_or(""),
            gib(&w["memory_bytes"]),
            format!("{} ms", w["last_seen_ms"]),
            w["address"].as_str().unwrap_or(""),
        );
    }
}

fn gib(bytes: &Value) -> String {
    format!(
        "{:.1} GiB",
        bytes.as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64
    )
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
    println!("\nRANK  SHARD   WORKER           HOST             DEVICE   MEMORY     RING                   HEALTH");
    for w in s["workers"].as_array().into_iter().flatten() {
        println!(
            "{:<5} {:<7} {:<16} {:<16} {:<8} {:<10} {:<22} {}",
            w["rank"].as_u64().unwrap_or(0),
            w["shard"].as_str().unwrap_or(""),
            w["id"].as_str().unwrap_or(""),
            w["host"].as_str().unwrap_or(""),
            w["device"].as_str().unwrap_or(""),
            gib(&w["memory_bytes"]),
            w["ring_address"].as_str().unwrap_or(""),
            w["health"].as_str().unwrap_or(""),
        );
    }
}

/// A plain-HTTP base URL (the coordinator serves HTTP; put TLS in front of it).
struct Base {
    authority: String,
    /// Sent as `Authorization: Bearer` when the coordinator requires a key.
    api_key: Option<String>,
}

impl Base {
    fn parse(url: &str, api_key: Option<String>) -> Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("--url must be http://HOST:PORT, got {url:?}");
        };
        let authority = rest.trim_end_matches('/').to_string();
        if authority.is_empty() || authority.contains('/') {
            bail!("--url must be http://HOST:PORT, got {url:?}");
        }
        if let Some(key) = &api_key {
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("--api-key must be printable ASCII without spaces");
            }
        }
        Ok(Base { authority, api_key })
    }

    /// One request with `Connection: close`: (status, body).
    async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let mut response = self.open(method, path, body).await?;
        let status = response.status;
        let body = tokio::time::timeout(Duration::from_secs(30), response.read_rest())
            .await
            .context("reading the response: timed out")??;
        Ok((status, body))
    }

    /// A GET that must answer 200; anything else is an error carrying the server's message.
    async fn get_ok(&self, path: &str) -> Result<String> {
        let (status, body) = self.request("GET", path, None).await?;
        if status != 200 {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let message = v["error"]["message"].as_str().unwrap_or(body.trim());
            bail!("GET {path}: HTTP {status}: {message}");
        }
        Ok(body)
    }

    /// Sends a request and reads the status line and headers.
    async fn open(&self, method: &str, path: &str, body: Option<&str>) -> Result<Response> {
        let connect = tokio::net::TcpStream::connect(&self.authority);
        let mut stream = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .with_context(|| format!("connecting to {}: timed out", self.authority))?
            .with_context(|| format!("connecting to {}", self.authority))?;
        let body = body.unwrap_or("");
        let auth = match &self.api_key {
            Some(key) => format!("Authorization: Bearer {key}\r\n"),
            None => String::new(),
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             {auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.authority,
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("malformed HTTP response")?;
        let mut chunked = false;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 || line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        Ok(Response {
            status,
            reader,
            chunked,
            pending: Vec::new(),
            done: false,
        })
    }
}

/// A response body, read as it arrives (plain or chunked).
struct Response {
    status: u16,
    reader: BufReader<tokio::net::TcpStream>,
    chunked: bool,
    /// Body bytes read but not yet returned as lines.
    pending: Vec<u8>,
    done: bool,
}

impl Response {
    /// More body bytes into `pending`; false at the end.
    async fn fill(&mut self) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        if !self.chunked {
            let mut buf = [0u8; 8192];
            let n = self.reader.read(&mut buf).await?;
            self.pending.extend_from_slice(&buf[..n]);
            self.done = n == 0;
            return Ok(n > 0);
        }
        let mut size = String::new();
        if self.reader.read_line(&mut size).await? == 0 {
            self.done = true;
            return Ok(false);
        }
        let size = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
            .context("malformed chunk size")?;
        if size == 0 {
            self.done = true;
            return Ok(false);
        }
        let mut chunk = vec![0u8; size + 2];
        self.reader.read_exact(&mut chunk).await?;
        chunk.truncate(size);
        self.pending.extend_from_slice(&chunk);
        Ok(true)
    }

    /// The next line of the body (without its line ending), or `None` at the end.
    async fn next_line(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                return Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()));
            }
            if !self.fill().await? {
                if self.pending.is_empty() {
                    return Ok(None);
                }
                let rest: Vec<u8> = std::mem::take(&mut self.pending);
                return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
            }
        }
    }

    async fn read_rest(&mut self) -> Result<String> {
        while self.fill().await? {}
        Ok(String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned())
    }
}
