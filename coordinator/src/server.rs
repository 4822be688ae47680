//! Starting the coordinator: the listeners, the local workers and etcd, in that order, before
//! [`Supervisor`] serves; then stopping the workers. The flags and their checks are in
//! [`crate::config`].

use std::{
    future::IntoFuture,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use anyhow::{bail, Context, Result};
use axum::serve::ListenerExt;
use caravan_proto::coordinator_server::CoordinatorServer;

use tokio::sync::{oneshot, watch};

pub use crate::config::ServeArgs;
use crate::{
    api::{self, forward::Forwarder, AppState, Control},
    config::ServedModel,
    etcd::Etcd,
    group::{ShardPlan, StepLimits},
    health::GroupHealth,
    local_workers::LocalWorkers,
    registry::{CoordinatorService, Registry},
    stats::EngineStats,
    supervisor::Supervisor,
};

/// Runs the coordinator until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<()> {
    if args.tp == 0 {
        bail!("--tensor-parallel-size must be at least 1");
    }
    let tls = args.tls.load()?;
    let etcd_tls = args.etcd_tls.client_config_for(&args.etcd_endpoints)?;
    let api_keys = api::auth::ApiKeys::load(
        &args.api_key,
        args.api_key_file.as_deref(),
        args.public_health_and_metrics,
    )?;
    let ServedModel {
        model_dir,
        model,
        tokenizer,
        chat_template,
        grammars,
        kv_cache,
        engine: engine_config,
    } = ServedModel::load(&args)?;
    let block_size = args.block_size;

    let health = Arc::new(GroupHealth::default());
    let stats = Arc::new(EngineStats::default());
    let registry = Arc::new(Registry::default());
    let control = Arc::new(Control::default());
    if !args.etcd_endpoints.is_empty() {
        // From the first answer on, until the election is won.
        health.fail("standby: not leading yet");
    }
    let http = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding HTTP on {}:{}", args.host, args.port))?;
    let http_addr = http.local_addr()?;
    let advertise_url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));
    let forward = args
        .forward_to_leader
        .then(|| Arc::new(Forwarder::new(advertise_url.clone())));
    let state = Arc::new(AppState {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        chat_template,
        grammars,
        health: health.clone(),
        engine: RwLock::new(None),
        workers: RwLock::new(Vec::new()),
        probe: RwLock::new(None),
        registry: registry.clone(),
        tp: args.tp,
        stats: stats.clone(),
        control: control.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        forward: forward.clone(),
    });
    // Streamed tokens are small writes: with Nagle's algorithm on, one can wait for the client's
    // delayed ACK (up to 40 ms) behind the one before it.
    let http = http.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY on an HTTP connection: {e}");
        }
    });
    // The listener stops with the process; draining is done before that, below.
    let http_server =
        tokio::spawn(axum::serve(http, api::router(state.clone(), api_keys)).into_future());

    let grpc_addr = if args.local_workers {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        args.grpc_addr
    };
    let grpc = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("binding the registration service on {grpc_addr}"))?;
    let grpc_addr = grpc.local_addr()?;
    let mut grpc_server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        grpc_server = grpc_server
            .tls_config(tls.server_config())
            .context("configuring TLS for the registration service")?;
    }
    tokio::spawn(
        grpc_server
            .add_service(CoordinatorServer::new(CoordinatorService::new(
                registry.clone(),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc)),
    );
    tracing::info!(%http_addr, %grpc_addr, tp = args.tp, "coordinator listening");

    let (stop_workers, stop_workers_rx) = watch::channel(false);
    // Told when a local worker refuses to start: the coordinator then stops with its reason.
    let (refused_tx, refused_rx) = oneshot::channel::<String>();
    let supervisor = if args.local_workers {
        let mut extra = vec![
            "--log-format".to_string(),
            args.log_format.as_str().to_string(),
        ];
        if let Some(endpoint) = &args.otlp_endpoint {
            extra.extend(["--otlp-endpoint".to_string(), endpoint.clone()]);
        }
        if let Some(tls) = &tls {
            extra.extend(tls.files.to_args());
        }
        let url = caravan_common::tls::with_scheme(&grpc_addr.to_string(), tls.is_some());
        let workers = LocalWorkers::spawn(args.tp + args.local_spares, &url, &args.device, extra)?;
        Some(tokio::spawn(workers.supervise(stop_workers_rx, refused_tx)))
    } else {
        eprintln!("waiting for {} workers to register at {grpc_addr}", args.tp);
        None
    };
    let threads = match (args.threads_per_worker, args.local_workers) {
        (0, true) => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / args.tp).max(1) as u32
        }
        (n, _) => n,
    };
    let plan = ShardPlan {
        model_path: model_dir.display().to_string(),
        dtype: args.dtype.choice(model.dtype),
        quantization: args.quantization,
        vocab_sharding: args.vocab_sharding.into(),
        kv_cache,
        block_size: block_size as u32,
        collective_timeout: args.collective_timeout,
        collective: args.collective,
        threads_per_worker: threads,
        step_limits: StepLimits {
            max_num_batched_tokens: args.max_num_batched_tokens as u32,
            max_num_seqs: args.max_batch_size as u32,
            max_model_len: model.max_context as u32,
        },
        tls: tls.clone(),
    };

    let refused = std::sync::OnceLock::new();
    let shutdown = async {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = control.drain_requested.notified() => {}
            Ok(why) = refused_rx => {
                let _ = refused.set(why);
            }
        }
    };
    tokio::pin!(shutdown);

    // With etcd: wait to lead, then follow the workers registered there; a leader that loses its
    // lease ends what is in flight with errors and campaigns again.
    let etcd = match args.etcd_endpoints.is_empty() {
        true => None,
        false => {
            let etcd = Etcd::connect(
                &args.etcd_endpoints,
                etcd_tls,
                &args.etcd_prefix,
                args.etcd_lease_ttl,
            );
            Some(etcd.await?)
        }
    };
    let serving = Supervisor {
        state: state.clone(),
        etcd,
        etcd_prefix: args.etcd_prefix.clone(),
        advertise_url,
        plan,
        engine_config,
        block_size,
        prefix_caching: !args.no_prefix_caching,
        drain_timeout: args.drain_timeout,
        http_addr,
    };
    serving.run(shutdown).await?;
    tracing::info!("shutting down");
    let _ = stop_workers.send(true);
    if let Some(supervisor) = supervisor {
        let _ = supervisor.await;
    }
    http_server.abort();
    match refused.get() {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
