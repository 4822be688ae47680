//! Starts a tensor-parallel group as child processes on this machine and forms their TCP ring.
//!
//! Rendezvous needs no fixed ports: each child binds its ring listener on port 0 and prints
//! `CARAVAN_RING_ADDR <addr>` as its first line of stdout; once every rank has reported, the parent
//! writes the full address list to each child's stdin. After that, rank 0's stdout is passed
//! through and the others' is drained.

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

/// Runs `world_size` copies of this executable with `args` plus `--rank R --world-size N`,
/// joins them into one ring, and waits for all of them. Fails if any rank fails.
pub fn run(world_size: usize, args: &[OsString]) -> Result<()> {
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
        let list = addrs.join(",") + "\n";
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

/// The child's half of the rendezvous: binds on `host`, reports the address on stdout, reads the
/// group's addresses from stdin and joins the ring.
pub fn join_from_stdio(
    rank: usize,
    world_size: usize,
    host: &str,
    timeout: Duration,
) -> Result<TcpRing> {
    let listener =
        RingListener::bind((host, 0)).with_context(|| format!("binding ring on {host}"))?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{ADDR_PREFIX}{addr}")?;
    stdout.flush()?;
    drop(stdout);
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
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
    tracing::info!(rank, %addr, "joining TCP ring");
    Ok(listener.connect(rank, &peers, timeout)?)
}
