//! `--local-workers`: the coordinator starts its workers as child processes on this machine.
//! Each child gets `--exit-with-parent` and a pipe on stdin, so no worker outlives the coordinator.

use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::process::{Child, Command};

/// Spawned worker processes; dropping this kills them.
pub struct LocalWorkers {
    children: Vec<Child>,
    /// The write ends of the children's stdin. Held apart from `children` because
    /// `Child::wait` closes a stdin it still owns, which would tell the worker to exit.
    _lifelines: Vec<tokio::process::ChildStdin>,
}

impl LocalWorkers {
    /// Starts `n` `caravan-worker` processes registering at `coordinator_url`.
    pub fn spawn(n: usize, coordinator_url: &str, device: &str) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let worker = exe.with_file_name("caravan-worker");
        let mut children = Vec::with_capacity(n);
        let mut lifelines = Vec::with_capacity(n);
        for i in 0..n {
            let mut child = Command::new(&worker)
                .args([
                    "--coordinator",
                    coordinator_url,
                    "--listen",
                    "127.0.0.1:0",
                    "--device",
                    device,
                ])
                .arg("--exit-with-parent")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting local worker {i} ({})", worker.display()))?;
            lifelines.extend(child.stdin.take());
            children.push(child);
        }
        Ok(LocalWorkers {
            children,
            _lifelines: lifelines,
        })
    }

    /// Resolves when any worker process exits, with a description.
    pub async fn any_exit(&mut self) -> String {
        let waits = self.children.iter_mut().enumerate().map(|(i, c)| {
            Box::pin(async move {
                let status = c.wait().await;
                format!(
                    "local worker {i} exited ({})",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                )
            })
        });
        futures::future::select_all(waits).await.0
    }

    /// Stops every worker.
    pub async fn shutdown(mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        for child in &mut self.children {
            let _ = child.wait().await;
        }
    }
}
