//! Collectives between processes over TCP, arranged as a ring (the CPU twin of NCCL).
//!
//! Every rank listens on one address and connects to the next rank's; data flows one way round the
//! ring. All-reduce is the bandwidth-optimal ring algorithm (reduce-scatter then all-gather, each
//! rank sending `2 (t-1) / t` of the buffer). Every message carries a sequence number and a
//! length, so ranks that fall out of step get an error rather than garbage, and every socket read
//! and write has a timeout, so a dead or stalled peer yields an error, never a hang. After any
//! failure the ring refuses further operations: the group must be formed again.
//!
//! Joining is authenticated: the coordinator hands every rank of a formation the same random
//! secret over gRPC (mutual TLS when configured), the connecting rank's hello carries an
//! HMAC-SHA256 of its fields under that secret, and the accepting rank answers with another, so a
//! process without the secret can neither join nor pose as a peer. The activations themselves
//! travel unencrypted: keep the ring on a private network.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"CRVR";
/// Magic, rank, world size, epoch.
const HELLO_FIELDS: usize = 20;
/// The fields and their HMAC-SHA256 tag.
const HELLO_LEN: usize = HELLO_FIELDS + TAG_LEN;
const TAG_LEN: usize = 32;

/// HMAC-SHA256 under the group's `secret` of a domain label and the hello's fields.
fn ring_tag(secret: &[u8], label: &[u8], fields: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(fields);
    mac
}
/// Above this many bytes per step, sends run on a second thread so that two ranks sending to each
/// other at once cannot both block on full socket buffers.
const CONCURRENT_SEND_BYTES: usize = 32 * 1024;

/// A bound, not yet connected ring endpoint. Bind first (port 0 is fine), publish
/// [`RingListener::local_addr`] to the group, then [`RingListener::connect`] with everyone's address.
pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Binds the address this rank receives from its predecessor on.
    pub fn bind(addr: impl ToSocketAddrs) -> std::io::Result<Self> {
        Ok(RingListener {
            listener: TcpListener::bind(addr)?,
        })
    }

    /// The address peers must connect to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Joins the ring: connects to rank `rank + 1` and accepts rank `rank - 1`, within `timeout`.
    /// `timeout` also bounds every later send and receive. `epoch` names this formation of the
    /// group: the listener outlives a ring (a failed group is formed again on the same address),
    /// and a connection left over from an earlier formation is told apart and refused. `secret`
    /// is the formation's shared secret: both ends of every link prove they hold it.
    pub fn connect(
        &self,
        rank: usize,
        peers: &[SocketAddr],
        timeout: Duration,
        epoch: u64,
        secret: &[u8],
    ) -> Result<TcpRing> {
        let world = peers.len();
        if world < 2 || rank >= world {
            return Err(Error::Collective {
                op: "connect",
                reason: format!("rank {rank} of a ring of {world} (needs at least 2 ranks)"),
            });
        }
        let deadline = Instant::now() + timeout;
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next = connect_with_retry(peers[next_rank], next_rank, deadline)?;
        configure(&next, timeout, "connect")?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        hello.extend_from_slice(&epoch.to_le_bytes());
        let tag = ring_tag(secret, b"caravan-ring-hello", &hello)
            .finalize()
            .into_bytes();
        hello.extend_from_slice(&tag);
        (&next)
            .write_all(&hello)
            .map_err(|e| io_error("connect", next_rank, timeout, e))?;
        // Accept first, then read the successor's answer: every rank writes its hello before it
        // accepts, so no rank waits on one that is itself waiting.
        let prev = accept_from(
            &self.listener,
            prev_rank,
            world,
            epoch,
            secret,
            timeout,
            deadline,
        )?;
        configure(&prev, timeout, "connect")?;
        let mut answer = [0u8; TAG_LEN];
        (&next)
            .read_exact(&mut answer)
            .map_err(|e| io_error("connect", next_rank, timeout, e))?;
        ring_tag(secret, b"caravan-ring-answer", &hello[..HELLO_FIELDS])
            .verify_slice(&answer)
            .map_err(|_| Error::Collective {
                op: "connect",
                reason: format!(
                    "rank {next_rank} at {} does not hold this group's secret: not a member of \
                     this formation",
                    peers[next_rank]
                ),
            })?;
        tracing::debug!(rank, world, next = %peers[next_rank], "joined TCP ring");
        Ok(TcpRing {
            rank,
            world,
            next,
            prev,
            timeout,
            sequence: AtomicU64::new(0),
            broken: AtomicBool::new(false),
            busy_micros: AtomicU64::new(0),
        })
    }
}

fn configure(stream: &TcpStream, timeout: Duration, op: &'static str) -> Result<()> {
    let fail = |e: std::io::Error| Error::Collective {
        op,
        reason: format!("configuring socket: {e}"),
    };
    stream.set_nodelay(true).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    Ok(())
}

fn connect_with_retry(addr: SocketAddr, peer: usize, deadline: Instant) -> Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
            Ok(stream) => return Ok(stream),
            // The peer may not be listening yet (multi-host start-up): retry until the deadline.
            Err(e) if Instant::now() < deadline => {
                tracing::trace!(%addr, error = %e, "ring connect retry");
                std::thread::sleep(Duration::from_millis(20).min(left));
            }
            Err(e) => {
                return Err(Error::Collective {
                    op: "connect",
                    reason: format!("cannot reach rank {peer} at {addr}: {e}"),
                })
            }
        }
    }
}

fn accept_from(
    listener: &TcpListener,
    prev_rank: usize,
    world: usize,
    epoch: u64,
    secret: &[u8],
    timeout: Duration,
    deadline: Instant,
) -> Result<TcpStream> {
    let timeout_err = || Error::CollectiveTimeout {
        op: "connect",
        peer: prev_rank,
        timeout_ms: timeout.as_millis(),
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Collective {
            op: "connect",
            reason: e.to_string(),
        })?;
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false).ok();
                let left = deadline.saturating_duration_since(Instant::now());
                stream
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                    .ok();
                let mut hello = [0u8; HELLO_LEN];
                let ok = (&stream).read_exact(&mut hello).is_ok()
                    && &hello[..4] == MAGIC
                    && hello[4..8] == (prev_rank as u32).to_le_bytes()
                    && hello[8..12] == (world as u32).to_le_bytes()
                    && hello[12..20] == epoch.to_le_bytes();
                let fields = &hello[..HELLO_FIELDS];
                let authentic = ok
                    && ring_tag(secret, b"caravan-ring-hello", fields)
                        .verify_slice(&hello[HELLO_FIELDS..])
                        .is_ok();
                if authentic {
                    let answer = ring_tag(secret, b"caravan-ring-answer", fields)
                        .finalize()
                        .into_bytes();
                    if (&stream).write_all(&answer).is_ok() {
                        return Ok(stream);
                    }
                }
                // Not our predecessor in this formation (a stale process or connection, a port
                // scanner, a process without the group's secret): drop it, keep waiting.
                tracing::warn!(
                    %from,
                    "rejected a ring connection that is not rank {prev_rank} of this formation"
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(timeout_err());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(Error::Collective {
                    op: "connect",
                    reason: format!("accept: {e}"),
                })
            }
        }
    }
}

fn io_error(op: &'static str, peer: usize, timeout: Duration, e: std::io::Error) -> Error {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Error::CollectiveTimeout {
            op,
            peer,
            timeout_ms: timeout.as_millis(),
        },
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            Error::Collective {
                op,
                reason: format!("rank {peer} closed the connection"),
            }
        }
        _ => Error::Collective {
            op,
            reason: format!("rank {peer}: {e}"),
        },
    }
}

/// Element types the ring can sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceType {
    F32,
    F16,
    BF16,
}

impl ReduceType {
    fn size(self) -> usize {
        match self {
            ReduceType::F32 => 4,
            ReduceType::F16 | ReduceType::BF16 => 2,
        }
    }

    /// `acc += incoming`, element-wise, both little-endian byte buffers of this type.
    fn add_into(self, acc: &mut [u8], incoming: &[u8]) {
        match self {
            ReduceType::F32 => {
                for (a, b) in acc.chunks_exact_mut(4).zip(incoming.chunks_exact(4)) {
                    let s = f32::from_le_bytes(a[..4].try_into().unwrap())
                        + f32::from_le_bytes(b.try_into().unwrap());
                    a.copy_from_slice(&s.to_le_bytes());
                }
            }
            ReduceType::F16 => {
                for (a, b) in acc.chunks_exact_mut(2).zip(incoming.chunks_exact(2)) {
                    let s = half::f16::from_le_bytes([a[0], a[1]]).to_f32()
                        + half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    a.copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
                }
            }
            ReduceType::BF16 => {
                for (a, b) in acc.chunks_exact_mut(2).zip(incoming.chunks_exact(2)) {
                    let s = half::bf16::from_le_bytes([a[0], a[1]]).to_f32()
                        + half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                    a.copy_from_slice(&half::bf16::from_f32(s).to_le_bytes());
                }
            }
        }
    }
}

/// How long a receive polls before it sleeps (see `TcpRing::poll_briefly`).
const POLL_BEFORE_SLEEP: Duration = Duration::from_micros(200);

/// A connected ring of `world` ranks. Operations must be called in the same order on every rank.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// Stream to rank + 1 (we only write).
    next: TcpStream,
    /// Stream from rank - 1 (we only read).
    prev: TcpStream,
    timeout: Duration,
    sequence: AtomicU64,
    broken: AtomicBool,
    /// Time spent inside collectives since the last [`TcpRing::take_busy_micros`].
    busy_micros: AtomicU64,
}

impl TcpRing {
    /// Microseconds spent in collectives since the last call (and resets the count).
    pub fn take_busy_micros(&self) -> u64 {
        self.busy_micros.swap(0, Ordering::Relaxed)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn check_usable(&self, op: &'static str) -> Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Collective {
                op,
                reason: "the ring failed earlier; the group must be formed again".into(),
            });
        }
        Ok(())
    }

    /// Runs `f`, marking the ring unusable if it fails (peers are then out of step).
    fn guarded<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _span = tracing::info_span!("collective", op, backend = "tcp_ring").entered();
        self.check_usable(op)?;
        let started = Instant::now();
        let result = f();
        self.busy_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if result.is_err() {
            self.broken.store(true, Ordering::Release);
        }
        result
    }

    fn header(&self, seq: u64, len: usize) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&seq.to_le_bytes());
        h[8..].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    fn send(&self, op: &'static str, seq: u64, data: &[u8]) -> Result<()> {
        let mut writer = &self.next;
        let err = |e| io_error(op, self.next_rank(), self.timeout, e);
        if data.len() <= 4096 {
            let mut message = Vec::with_capacity(16 + data.len());
            message.extend_from_slice(&self.header(seq, data.len()));
            message.extend_from_slice(data);
            writer.write_all(&message).map_err(err)
        } else {
            writer
                .write_all(&self.header(seq, data.len()))
                .map_err(err)?;
            writer.write_all(data).map_err(err)
        }
    }

    fn recv(&self, op: &'static str, seq: u64, out: &mut [u8]) -> Result<()> {
        let mut reader = &self.prev;
        let err = |e| io_error(op, self.prev_rank(), self.timeout, e);
        self.poll_briefly().map_err(err)?;
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).map_err(err)?;
        let got_seq = u64::from_le_bytes(header[..8].try_into().unwrap());
        let got_len = u64::from_le_bytes(header[8..].try_into().unwrap()) as usize;
        if got_seq != seq || got_len != out.len() {
            return Err(Error::Collective {
                op,
                reason: format!(
                    "rank {} is out of step: message #{got_seq} of {got_len} bytes, \
                     expected #{seq} of {} bytes",
                    self.prev_rank(),
                    out.len()
                ),
            });
        }
        reader.read_exact(out).map_err(err)
    }

    /// Polls for the previous rank's next message for up to [`POLL_BEFORE_SLEEP`], yielding the
    /// core between polls, before the blocking read sleeps in the kernel. Ranks finish a layer's
    /// half within microseconds of each other; a sleeping reader's wake-up took longer than
    /// that, twice per all-reduce (TP 2 on one host: 15% over TP 1 before, see BENCHMARKS).
    fn poll_briefly(&self) -> std::io::Result<()> {
        self.prev.set_nonblocking(true)?;
        let start = Instant::now();
        let mut byte = [0u8; 1];
        loop {
            match self.prev.peek(&mut byte) {
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock && start.elapsed() < POLL_BEFORE_SLEEP =>
                {
                    std::thread::yield_now()
                }
                // Data, end of stream, an error, or time is up: the blocking read takes over.
                _ => break,
            }
        }
        self.prev.set_nonblocking(false)
    }

    /// Sends `outgoing` to the next rank while receiving `incoming` from the previous one.
    fn exchange(&self, op: &'static str, outgoing: &[u8], incoming: &mut [u8]) -> Result<()> {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        if outgoing.len().max(incoming.len()) <= CONCURRENT_SEND_BYTES {
            // Small messages fit the socket buffers: send, then receive, on this thread.
            self.send(op, seq, outgoing)?;
            return self.recv(op, seq, incoming);
        }
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| self.send(op, seq, outgoing));
            let received = self.recv(op, seq, incoming);
            let sent = sender.join().unwrap_or_else(|_| {
                Err(Error::Collective {
                    op,
                    reason: "sender thread panicked".into(),
                })
            });
            sent.and(received)
        })
    }

    /// Sums `buf` (elements of `ty`) across all ranks, in place; every rank ends with the sum.
    pub fn all_reduce_sum(&self, buf: &mut [u8], ty: ReduceType) -> Result<()> {
        self.guarded("all_reduce", || {
            let elems = buf.len() / ty.size();
            let w = self.world;
            // Chunk c covers elements [bounds[c], bounds[c+1]).
            let bounds: Vec<usize> = (0..=w).map(|c| c * elems / w * ty.size()).collect();
            let chunk = |c: usize| bounds[c % w]..bounds[c % w + 1];
            let mut scratch = vec![0u8; bounds.windows(2).map(|b| b[1] - b[0]).max().unwrap_or(0)];
            let r = self.rank;
            // Reduce-scatter: after w-1 steps rank r holds the full sum of chunk r+1.
            for s in 0..w - 1 {
                let send = chunk(r + w - s);
                let recv = chunk(r + w - s - 1);
                let incoming = &mut scratch[..recv.len()];
                self.exchange("all_reduce", &buf[send], incoming)?;
                ty.add_into(&mut buf[recv], incoming);
            }
            // All-gather: pass the finished chunks round the ring.
            for s in 0..w - 1 {
                let send = chunk(r + 1 + w - s);
                let recv = chunk(r + w - s);
                let incoming = &mut scratch[..recv.len()];
                self.exchange("all_reduce", &buf[send], incoming)?;
                buf[recv].copy_from_slice(incoming);
            }
            Ok(())
        })
    }

    /// Concatenates every rank's `local` (all the same length) in rank order into `out`
    /// (`world * local.len()` bytes).
    pub fn all_gather(&self, local: &[u8], out: &mut [u8]) -> Result<()> {
        self.guarded("all_gather", || {
            let n = local.len();
            if out.len() != n * self.world {
                return Err(Error::Collective {
                    op: "all_gather",
                    reason: format!(
                        "output of {} bytes for {} ranks x {n}",
                        out.len(),
                        self.world
                    ),
                });
            }
            let (w, r) = (self.world, self.rank);
            out[r * n..(r + 1) * n].copy_from_slice(local);
            let mut scratch = vec![0u8; n];
            for s in 0..w - 1 {
                let send = (r + w - s) % w;
                let recv = (r + w - s - 1) % w;
                self.exchange("all_gather", &out[send * n..(send + 1) * n], &mut scratch)?;
                out[recv * n..(recv + 1) * n].copy_from_slice(&scratch);
            }
            Ok(())
        })
    }

    /// Copies `buf` from rank `root` to every rank, passing it along the ring.
    pub fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        self.guarded("broadcast", || {
            let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
            if self.rank != root {
                self.recv("broadcast", seq, buf)?;
            }
            if self.next_rank() != root {
                self.send("broadcast", seq, buf)?;
            }
            Ok(())
        })
    }

    /// Returns once every rank has reached the barrier.
    pub fn barrier(&self) -> Result<()> {
        let mut flag = [0u8; 4];
        self.all_reduce_sum(&mut flag, ReduceType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const SECRET: &[u8] = b"the secret of this formation";

    /// Forms a real ring of `world` ranks over loopback, one thread per rank.
    fn ring(world: usize, timeout: Duration) -> Vec<TcpRing> {
        let listeners: Vec<_> = (0..world)
            .map(|_| Arc::new(RingListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        form(&listeners, timeout, 0)
    }

    fn form(listeners: &[Arc<RingListener>], timeout: Duration, epoch: u64) -> Vec<TcpRing> {
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(rank, l)| {
                let (l, addrs) = (l.clone(), addrs.clone());
                std::thread::spawn(move || l.connect(rank, &addrs, timeout, epoch, SECRET).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn a_group_forms_again_on_the_same_listeners() {
        let listeners: Vec<_> = (0..3)
            .map(|_| Arc::new(RingListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        let first = form(&listeners, Duration::from_secs(10), 1);
        drop(first);
        let second = form(&listeners, Duration::from_secs(10), 2);
        let handles: Vec<_> = second
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let mut buf = f32_bytes(&[r.rank() as f32 + 1.0; 5]);
                    r.all_reduce_sum(&mut buf, ReduceType::F32).unwrap();
                    from_f32_bytes(&buf)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![6.0; 5]);
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn from_f32_bytes(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn all_reduce_sums_across_ranks_for_small_and_large_buffers() {
        for world in [2, 3, 4] {
            // 5 elements: uneven chunks; 100_003: concurrent sends.
            for n in [1usize, 5, 100_003] {
                let rings = ring(world, Duration::from_secs(10));
                let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let hs: Vec<_> = rings
                        .iter()
                        .map(|ring| {
                            s.spawn(move || {
                                let r = ring.rank() as f32;
                                let data: Vec<f32> =
                                    (0..n).map(|i| i as f32 + 1000.0 * r).collect();
                                let mut buf = f32_bytes(&data);
                                ring.all_reduce_sum(&mut buf, ReduceType::F32).unwrap();
                                from_f32_bytes(&buf)
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let offset = 1000.0 * (0..world).sum::<usize>() as f32;
                let expected: Vec<f32> = (0..n).map(|i| world as f32 * i as f32 + offset).collect();
                for got in results {
                    assert_eq!(got, expected, "world {world}, n {n}");
                }
            }
        }
    }

    #[test]
    fn all_gather_and_broadcast_follow_rank_order() {
        let rings = ring(3, Duration::from_secs(10));
        std::thread::scope(|s| {
            for ring in &rings {
                s.spawn(move || {
                    let local = vec![ring.rank() as u8; 3];
                    let mut out = vec![0u8; 9];
                    ring.all_gather(&local, &mut out).unwrap();
                    assert_eq!(out, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
                    let mut b = if ring.rank() == 1 {
                        vec![7u8, 8]
                    } else {
                        vec![0, 0]
                    };
                    ring.broadcast(&mut b, 1).unwrap();
                    assert_eq!(b, [7, 8]);
                    ring.barrier().unwrap();
                });
            }
        });
    }

    #[test]
    fn bf16_sum_is_computed_in_f32_and_rounded_once() {
        let rings = ring(2, Duration::from_secs(10));
        std::thread::scope(|s| {
            for ring in &rings {
                s.spawn(move || {
                    let v = half::bf16::from_f32(if ring.rank() == 0 { 1.5 } else { 2.25 });
                    let mut buf = v.to_le_bytes().to_vec();
                    ring.all_reduce_sum(&mut buf, ReduceType::BF16).unwrap();
                    assert_eq!(half::bf16::from_le_bytes([buf[0], buf[1]]).to_f32(), 3.75);
                });
            }
        });
    }

    #[test]
    fn a_silent_peer_gives_a_timeout_error_not_a_hang() {
        let mut rings = ring(2, Duration::from_millis(300));
        let silent = rings.pop().unwrap();
        let started = Instant::now();
        let mut buf = f32_bytes(&[1.0; 16]);
        let err = rings[0]
            .all_reduce_sum(&mut buf, ReduceType::F32)
            .unwrap_err();
        assert!(
            matches!(err, Error::CollectiveTimeout { peer: 1, .. }),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The ring is now out of step and says so.
        let again = rings[0].barrier().unwrap_err();
        assert!(again.to_string().contains("formed again"), "{again}");
        drop(silent);
    }

    #[test]
    fn a_dead_peer_gives_an_error() {
        let mut rings = ring(2, Duration::from_secs(30));
        drop(rings.pop());
        let started = Instant::now();
        let mut buf = f32_bytes(&[1.0; 16]);
        let err = rings[0]
            .all_reduce_sum(&mut buf, ReduceType::F32)
            .unwrap_err();
        assert!(err.to_string().contains("closed") || matches!(err, Error::Collective { .. }));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "noticed by EOF, not the timeout"
        );
    }

    #[test]
    fn connect_times_out_when_a_rank_never_comes() {
        let a = RingListener::bind("127.0.0.1:0").unwrap();
        let b = RingListener::bind("127.0.0.1:0").unwrap();
        let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        // Rank 1 never calls connect; its listener accepts the TCP handshake but no hello comes back.
        let err = a
            .connect(0, &addrs, Duration::from_millis(200), 0, SECRET)
            .unwrap_err();
        assert!(matches!(err, Error::CollectiveTimeout { .. }), "{err}");
        drop(b);
    }

    #[test]
    fn a_process_without_the_secret_cannot_join() {
        let listeners: Vec<_> = (0..2)
            .map(|_| Arc::new(RingListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        // An impostor that knows everything but the secret reaches rank 0 first, posing as rank 1.
        let mut impostor = TcpStream::connect(listeners[0].local_addr().unwrap()).unwrap();
        let mut hello = Vec::new();
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&2u32.to_le_bytes());
        hello.extend_from_slice(&7u64.to_le_bytes());
        let forged = ring_tag(b"a guess", b"caravan-ring-hello", &hello)
            .finalize()
            .into_bytes();
        hello.extend_from_slice(&forged);
        impostor.write_all(&hello).unwrap();

        // The real ranks still form the ring and compute.
        let ring = form(&listeners, Duration::from_secs(10), 7);
        let handles: Vec<_> = ring
            .into_iter()
            .map(|r| {
                std::thread::spawn(move || {
                    let mut buf = f32_bytes(&[1.0; 3]);
                    r.all_reduce_sum(&mut buf, ReduceType::F32).unwrap();
                    from_f32_bytes(&buf)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![2.0; 3]);
        }
        // The impostor got no answer: its connection was dropped.
        impostor
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answer = [0u8; TAG_LEN];
        let read = impostor.read(&mut answer);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
