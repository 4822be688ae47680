//! `--local-workers`: the coordinator starts its workers as child processes on this machine and
//! restarts any that dies, so the group can be formed again. Each child gets `--exit-with-parent`
//! and a pipe on stdin, so no worker outlives the coordinator. A worker that refuses to start
//! (a device it cannot use, bad flags) is not restarted: the coordinator stops with its reason.

use std::{
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use caravan_proto::WORKER_EXIT_REFUSED;
use tokio::{
    process::{Child, ChildStdin, Command},
    sync::{oneshot, watch},
};

/// Spawned worker processes; dropping this kills them.
pub struct LocalWorkers {
    children: Vec<Child>,
    /// The write ends of the children's stdin. Held apart from `children` because
    /// `Child::wait` closes a stdin it still owns, which would tell the worker to exit.
    lifelines: Vec<Option<ChildStdin>>,
    coordinator_url: String,
    device: String,
    /// More flags for every worker (log format, OTLP endpoint).
    extra_args: Vec<String>,
}

impl LocalWorkers {
    /// Starts `n` `caravan-worker` processes registering at `coordinator_url`.
    pub fn spawn(
        n: usize,
        coordinator_url: &str,
        device: &str,
        extra_args: Vec<String>,
    ) -> Result<Self> {
        let mut workers = LocalWorkers {
            children: Vec::with_capacity(n),
            lifelines: Vec::with_capacity(n),
            coordinator_url: coordinator_url.to_string(),
            device: device.to_string(),
            extra_args,
        };
        for i in 0..n {
            let (child, lifeline) = workers.start(i)?;
            workers.children.push(child);
            workers.lifelines.push(lifeline);
        }
        Ok(workers)
    }

    fn start(&self, i: usize) -> Result<(Child, Option<ChildStdin>)> {
        let exe = std::env::current_exe()?;
        let worker = exe.with_file_name("caravan-worker");
        let mut child = Command::new(&worker)
            .args([
                "--coordinator",
                &self.coordinator_url,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--device", &self.device, "--exit-with-parent"])
            .args(&self.extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting local worker {i} ({})", worker.display()))?;
        let lifeline = child.stdin.take();
        Ok((child, lifeline))
    }

    /// Resolves when any worker process exits: its index and exit status (`None` when waiting
    /// failed).
    pub async fn any_exit(&mut self) -> (usize, Option<ExitStatus>) {
        let waits = self.children.iter_mut().enumerate().map(|(i, c)| {
            Box::pin(async move {
                let status = c.wait().await;
                if let Err(e) = &status {
                    tracing::warn!("waiting for local worker {i}: {e}");
                }
                (i, status.ok())
            })
        });
        futures::future::select_all(waits).await.0
    }

    /// Starts worker `i` again.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let (child, lifeline) = self.start(i)?;
        self.children[i] = child;
        self.lifelines[i] = lifeline;
        Ok(())
    }

    /// Restarts workers as they die until `stop` turns true, then stops them all. A worker that
    /// exits with [`WORKER_EXIT_REFUSED`] refused to start (its one-line reason is on stderr):
    /// it is not restarted, and `refused` is told, so that the coordinator stops.
    pub async fn supervise(
        mut self,
        mut stop: watch::Receiver<bool>,
        refused: oneshot::Sender<String>,
    ) {
        let mut refused = Some(refused);
        loop {
            let exited = tokio::select! {
                exited = self.any_exit() => exited,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (i, status) = exited;
            let how = status.map_or_else(|| "unknown status".to_string(), |s| s.to_string());
            if status.and_then(|s| s.code()) == Some(i32::from(WORKER_EXIT_REFUSED)) {
                let why = format!("local worker {i} refused to start ({how}; its error is above)");
                tracing::info!(%why, "not restarting it");
                if let Some(refused) = refused.take() {
                    let _ = refused.send(why);
                }
                let _ = stop.wait_for(|s| *s).await;
                break;
            }
            let reason = format!("local worker {i} exited ({how})");
            tracing::warn!(%reason, "restarting it");
            eprintln!("{reason}; restarting it");
            // Do not spin on a worker that cannot start.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Err(e) = self.restart(i) {
                tracing::error!(error = %format!("{e:#}"), "cannot restart local worker {i}");
                let _ = stop.wait_for(|s| *s).await;
                break;
            }
        }
        self.shutdown().await;
    }

    /// Stops every worker.
    pub async fn shutdown(mut self) {
        self.lifelines.clear();
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for child in &mut self.children {
            let _ = child.wait().await;
        }
    }
}
