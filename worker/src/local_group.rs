//! Starts a tensor-parallel group as child processes on this machine and forms their TCP ring.
//!
//! Rendezvous needs no fixed ports: each child binds its ring listener on port 0 and prints
//! `CARAVAN_RING_ADDR <addr>` as its first line of stdout; once every rank has reported, the parent
//! writes the full address list to each child's stdin, then a second line: `tcp`, or `nccl <id>`
//! with an NCCL unique id when the group uses NCCL. After that, rank 0's stdout is passed through
//! and the others' is drained.

use std::{
    ffi::OsString,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use caravan_ops::comm::{RingListener, TcpRing};

const ADDR_PREFIX: &str = "CARAVAN_RING_ADDR ";

/// How the children of a local group talk to each other.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The TCP ring (CPU tensors, or GPU tensors staged through host memory).
    Tcp,
    /// NCCL, with the group's unique id in hex.
    Nccl(String),
}

/// What a child learns at rendezvous.
pub struct Rendezvous {
    pub listener: RingListener,
    pub peers: Vec<SocketAddr>,
    pub backend: Backend,
    /// The ring's shared secret (see `caravan_ops::comm::TcpRing`).
    pub secret: Vec<u8>,
}

impl Rendezvous {
    /// Joins the TCP ring described by this rendezvous.
    pub fn into_ring(self, rank: usize, timeout: Duration) -> Result<TcpRing> {
        Ok(self
            .listener
            .connect(rank, &self.peers, timeout, 0, &self.secret)?)
    }
}

/// Runs `world_size` copies of this executable with `args` plus `--rank R --world-size N`,
/// hands them the group's addresses and backend, and waits for all of them. Fails if any rank
/// fails.
pub fn run(world_size: usize, args: &[OsString], backend: &Backend) -> Result<()> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut children: Vec<Child> = Vec::with_capacity(world_size);
    let result = (|| -> Result<()> {
        for rank in 0..world_size {
            let child = Command::new(&exe)
                .args(args)
                .arg("--rank")
                .arg(rank.to_string())
                .arg("--world-size")
                .arg(world_size.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting rank {rank}"))?;
            children.push(child);
        }
        let mut readers: Vec<BufReader<ChildStdout>> = children
            .iter_mut()
            .map(|c| BufReader::new(c.stdout.take().expect("piped")))
            .collect();
        let mut addrs = Vec::with_capacity(world_size);
        for (rank, reader) in readers.iter_mut().enumerate() {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let addr = line
                .trim_end()
                .strip_prefix(ADDR_PREFIX)
                .ok_or_else(|| anyhow!("rank {rank} exited before joining the group"))?;
            addrs.push(addr.to_string());
        }
        let backend_line = match backend {
            Backend::Tcp => "tcp".to_string(),
            Backend::Nccl(id) => format!("nccl {id}"),
        };
        // The ring's shared secret travels on the children's stdin, like the addresses.
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let list = format!("{}\n{backend_line}\n{secret}\n", addrs.join(","));
        for child in &mut children {
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(list.as_bytes())?;
        }
        let mut forwarders = Vec::new();
        for (rank, reader) in readers.into_iter().enumerate() {
            forwarders.push(std::thread::spawn(move || {
                for line in reader.lines().map_while(|l| l.ok()) {
                    if rank == 0 {
                        println!("{line}");
                    }
                }
            }));
        }
        let mut failures = Vec::new();
        for (rank, child) in children.iter_mut().enumerate() {
            let status = child.wait()?;
            if !status.success() {
                failures.push(format!("rank {rank} exited with {status}"));
            }
        }
        for f in forwarders {
            let _ = f.join();
        }
        if !failures.is_empty() {
            bail!("{}", failures.join("; "));
        }
        Ok(())
    })();
    if result.is_err() {
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    result
}

/// The child's half of the rendezvous: binds on `host`, reports the address on stdout, and reads
/// the group's addresses and backend from stdin.
pub fn join_from_stdio(host: &str, world_size: usize) -> Result<Rendezvous> {
    let listener =
        RingListener::bind((host, 0)).with_context(|| format!("binding ring on {host}"))?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ADDR_PREFIX}{addr}")?;
    stdout.flush()?;
    drop(stdout);
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    let peers = line
        .trim()
        .split(',')
        .map(|a| {
            a.parse::<SocketAddr>()
                .with_context(|| format!("bad ring address {a:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    if peers.len() != world_size {
        bail!(
            "got {} ring addresses for a group of {world_size}",
            peers.len()
        );
    }
    line.clear();
    stdin.read_line(&mut line)?;
    let backend = match line.trim().split_once(' ') {
        Some(("nccl", id)) => Backend::Nccl(id.to_string()),
        None if line.trim() == "tcp" => Backend::Tcp,
        _ => bail!("bad backend line from the launcher: {line:?}"),
    };
    line.clear();
    stdin.read_line(&mut line)?;
    let hex = line.trim();
    let secret = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .ok()
        .filter(|s| s.len() == 32 && hex.len() == 64)
        .with_context(|| format!("bad ring secret line from the launcher: {line:?}"))?;
    tracing::info!(%addr, ?peers, "rendezvous complete");
    Ok(Rendezvous {
        listener,
        peers,
        backend,
        secret,
    })
}
