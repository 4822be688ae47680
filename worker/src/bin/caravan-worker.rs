//! `caravan-worker`: one tensor-parallel rank. Serves `caravan.v1.Worker` over gRPC, registers
//! with the coordinator, and loads whatever shard the coordinator assigns it.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use caravan_common::telemetry::LogFormat;
use caravan_ops::{
    comm::RingListener,
    cpu::{cpu_kernel_path, set_cpu_kernels, CpuKernels},
};
use caravan_proto::{
    self as pb, coordinator_client::CoordinatorClient, worker_server::WorkerServer,
};
use caravan_worker::{
    device,
    membership::EtcdRegistration,
    runner::{ModelRunner, SharedRunner, SharedStatus},
    service::{WorkerIdentity, WorkerService},
    telemetry,
};
use clap::Parser;
use tch::Device;
use tokio::io::AsyncReadExt;

/// A Caravan worker: one rank of a tensor-parallel group.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Register directly with the coordinator at this gRPC address, e.g. http://10.0.0.1:50051.
    #[arg(
        long,
        env = "CARAVAN_COORDINATOR",
        required_unless_present = "etcd_endpoints"
    )]
    coordinator: Option<String>,
    /// Register in etcd instead (comma-separated endpoints, e.g. http://etcd:2379): every
    /// coordinator of the cluster sees this worker, and a dead one disappears with its lease.
    #[arg(
        long,
        env = "CARAVAN_ETCD_ENDPOINTS",
        value_delimiter = ',',
        conflicts_with = "coordinator"
    )]
    etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, env = "CARAVAN_ETCD_PREFIX", default_value = caravan_proto::etcd::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// Seconds the etcd registration outlives this worker.
    #[arg(long, env = "CARAVAN_ETCD_LEASE_TTL", default_value_t = 5)]
    etcd_lease_ttl: i64,
    /// Address for this worker's gRPC service (port 0 picks a free one).
    #[arg(long, env = "CARAVAN_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address for the TCP ring between ranks (default: the --listen address's IP, port chosen
    /// freely).
    #[arg(long, env = "CARAVAN_RING_ADDR")]
    ring_addr: Option<SocketAddr>,
    /// The IP or host name the coordinator and the other ranks reach this worker by (needed when
    /// listening on 0.0.0.0; on Kubernetes, the pod IP). Default: the --listen IP.
    #[arg(long, env = "CARAVAN_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// cpu, cuda (GPU 0) or cuda:N. A device this build or machine cannot use is refused at
    /// start, in one line (exit status 2).
    #[arg(long, env = "CARAVAN_DEVICE", default_value = "cpu")]
    device: String,
    /// On a CPU: `on` runs Caravan's kernels where the CPU has them (AVX2; AVX-512 BF16 for bf16
    /// weights where present); `avx2` their AVX2 loops only; `off` runs every product, norm and
    /// attention through libtorch, the path a GPU takes.
    #[arg(long, env = "CARAVAN_CPU_KERNELS", default_value_t = CpuKernels::On)]
    cpu_kernels: CpuKernels,
    /// Log format on stderr.
    #[arg(long, env = "CARAVAN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Export OpenTelemetry traces over OTLP/gRPC to this collector (default:
    /// OTEL_EXPORTER_OTLP_ENDPOINT, if set).
    #[arg(long, env = "CARAVAN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    tls: caravan_common::tls::TlsArgs,
    #[command(flatten)]
    etcd_tls: caravan_common::tls::EtcdTlsArgs,
    /// Exit when standard input closes (set by a coordinator that spawned this worker, so that
    /// workers never outlive it).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

fn main() -> ExitCode {
    let restart = caravan_ops::cpu::restart_with_passive_openmp();
    let args = Args::parse();
    // A device this worker cannot use is refused here, in one line, before anything starts.
    let device = match device::parse_device(&args.device).and_then(|d| {
        let d = d.unwrap_or(Device::Cuda(0));
        device::check_usable(d).map(|()| d)
    }) {
        Ok(device) => device,
        Err(why) => {
            eprintln!("error: {why}");
            return ExitCode::from(pb::WORKER_EXIT_REFUSED);
        }
    };
    // Two threads: a step runs on (and blocks) the one that received it, the other answers
    // health checks and keeps the membership meanwhile.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
    let _telemetry = match telemetry::init("warn", args.log_format, args.otlp_endpoint.clone()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = restart {
        tracing::warn!("running with spinning OpenMP threads (slower decode): cannot restart: {e}");
    }
    match runtime.block_on(run(args, device)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The accepted connections of `listener`, with Nagle's algorithm off. A step's answer is written
/// as several small HTTP/2 frames; with Nagle on, the last one waited for the coordinator's
/// delayed ACK, adding up to 40 ms to a step (measured at 32 sequences: a 101 ms step took
/// 143 ms at the coordinator). `Server::tcp_nodelay` covers only tonic's own listener.
fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        stream.inspect(|s| {
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY on a gRPC connection: {e}");
            }
        })
    })
}

async fn run(args: Args, device: Device) -> Result<()> {
    set_cpu_kernels(args.cpu_kernels);
    let ring_addr = args
        .ring_addr
        .unwrap_or(SocketAddr::new(args.listen.ip(), 0));
    let ring = RingListener::bind(ring_addr)
        .with_context(|| format!("binding the ring on {ring_addr}"))?;
    let ring_addr = ring.local_addr()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding gRPC on {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    let advertise = match &args.advertise_host {
        Some(host) => host.clone(),
        None if grpc_addr.ip().is_unspecified() || ring_addr.ip().is_unspecified() => {
            anyhow::bail!(
                "listening on an unspecified address ({grpc_addr}, ring {ring_addr}): pass \
                 --advertise-host with the address peers reach this worker by"
            )
        }
        None => grpc_addr.ip().to_string(),
    };
    let tls = args.tls.load()?;
    let etcd_tls = args.etcd_tls.client_config_for(&args.etcd_endpoints)?;
    let advertised_grpc = caravan_common::tls::with_scheme(
        &join_host_port(&advertise, grpc_addr.port()),
        tls.is_some(),
    );
    let advertised_ring = join_host_port(&advertise, ring_addr.port());
    // The addresses peers will use, said once: wrong interfaces are the classic multi-host hang.
    let compute = match device {
        Device::Cpu => format!("cpu, kernels: {}", cpu_kernel_path()),
        other => format!("{other:?}"),
    };
    // One write of the whole line: workers started together share their parent's stderr, and
    // `eprintln!` writes a line in pieces that theirs would interleave with.
    let line = format!(
        "caravan-worker: gRPC {grpc_addr}, ring {ring_addr}, advertised as {advertised_grpc} and \
         ring {advertised_ring}; computing on {compute}\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());

    let status = SharedStatus::default();
    let fault = caravan_worker::faults::Fault::from_env().map_err(anyhow::Error::msg)?;
    if let Some(fault) = &fault {
        tracing::warn!(?fault, "a fault will be injected (CARAVAN_INJECT_FAULT)");
    }
    let runner = SharedRunner::new(ModelRunner::new(device, ring, status.clone(), fault).into());
    let identity = WorkerIdentity {
        host: caravan_worker::host::hostname(),
        device: device::name(device),
        // What a CPU rank's cache is sized from (the coordinator's --kv-cache-memory-fraction),
        // and for operators; a GPU rank sizes its own after loading.
        memory_bytes: device::memory(device).map_or(0, |m| m.free),
        ring_addr: advertised_ring.clone(),
    };
    let service = WorkerService::new(runner, status, identity.clone());
    // The standard gRPC health protocol, for Kubernetes `grpc` probes and load balancers.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<WorkerServer<WorkerService>>()
        .await;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server
            .tls_config(tls.server_config())
            .context("configuring TLS for the worker service")?;
    }
    let server = server
        .add_service(health_service)
        .add_service(WorkerServer::new(service))
        .serve_with_incoming(no_delay(listener));
    let server = tokio::spawn(server);
    tracing::info!(%grpc_addr, %ring_addr, "worker listening");

    let registration = pb::RegisterRequest {
        protocol_version: caravan_proto::PROTOCOL_VERSION.into(),
        worker_addr: advertised_grpc.clone(),
        host: identity.host.clone(),
        device: identity.device.clone(),
        memory_bytes: identity.memory_bytes,
        ring_addr: identity.ring_addr.clone(),
    };
    let membership = if args.etcd_endpoints.is_empty() {
        let url = args.coordinator.clone().unwrap_or_default();
        let mut client = connect(&url, tls.as_ref()).await?;
        let registered = client
            .register(registration.clone())
            .await
            .context("registering with the coordinator")?
            .into_inner();
        tracing::info!(worker_id = %registered.worker_id, "registered");
        let worker_id = registered.worker_id;
        let interval = Duration::from_millis(registered.heartbeat_interval_ms.max(100) as u64);
        tokio::spawn(heartbeats(client, worker_id, interval, registration))
    } else {
        let registration_in_etcd = EtcdRegistration {
            endpoints: args.etcd_endpoints.clone(),
            prefix: args.etcd_prefix.clone(),
            lease_ttl: args.etcd_lease_ttl.max(1),
            worker_id: format!("{}-{}", identity.host, std::process::id()),
            tls: etcd_tls,
        };
        tokio::spawn(registration_in_etcd.run(registration))
    };

    let exit_with_parent = args.exit_with_parent;
    let parent_gone = async move {
        if !exit_with_parent {
            return std::future::pending().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {}
    };
    let mut membership = membership;
    tokio::select! {
        _ = parent_gone => tracing::info!("parent gone; exiting"),
        result = server => result??,
        // Membership tasks end only on a fatal error.
        result = &mut membership => result??,
    }
    membership.abort();
    Ok(())
}

/// Direct registration: a heartbeat every `interval`; registers again when the coordinator no
/// longer knows this worker.
async fn heartbeats(
    mut client: CoordinatorClient<tonic::transport::Channel>,
    mut worker_id: String,
    interval: Duration,
    registration: pb::RegisterRequest,
) -> Result<()> {
    loop {
        tokio::time::sleep(interval).await;
        let request = pb::HeartbeatRequest {
            worker_id: worker_id.clone(),
        };
        match client.heartbeat(request).await {
            // Removed from the pool (it failed a group, or the coordinator restarted): offer
            // this worker again.
            Ok(r) if !r.get_ref().known => match client.register(registration.clone()).await {
                Ok(r) => {
                    worker_id = r.into_inner().worker_id;
                    tracing::info!(%worker_id, "registered again");
                }
                Err(e) => tracing::warn!(error = %e.message(), "registering again failed"),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e.message(), "heartbeat failed"),
        }
    }
}

async fn connect(
    url: &str,
    tls: Option<&caravan_common::tls::ClusterTls>,
) -> Result<CoordinatorClient<tonic::transport::Channel>> {
    let url = caravan_common::tls::with_scheme(url, tls.is_some());
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad coordinator address {url:?}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client_config())
            .context("configuring TLS towards the coordinator")?;
    }
    // The coordinator may still be starting: retry for a while, but only while it is not
    // listening yet (a TLS or protocol failure will not cure itself).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(CoordinatorClient::new(channel)),
            Err(e) if not_listening_yet(&e) && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "coordinator not reachable yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to the coordinator at {url}"))
            }
        }
    }
}

/// Whether a connection failed because nothing listens at the address (yet).
fn not_listening_yet(error: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
            );
        }
        source = e.source();
    }
    // A connect timeout carries no io::Error.
    error.to_string().contains("timed out")
}

/// `host:port`, bracketing IPv6 literals.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
