//! Data-parallel training: W ranks (one process per GPU, or threads on the CPU) train one
//! model together, each on its slice of every global batch.
//!
//! The invariants that make W ranks train exactly what one process would:
//!
//! - **One global batch.** Every rank draws the whole global batch's window starts from the
//!   same seeded stream (so the samplers stay in step) and reads only its contiguous slice of
//!   rows ([`rank_rows`], `WindowSampler::batch_rows`); `batch_size` stays the global batch.
//! - **Gradients are summed.** Each rank weights its rows by their share of the *global* step
//!   (rows / (B·accum), or 1/N real bytes with documents), so the sum over ranks of their
//!   gradients ([`Collective::all_reduce_sum`]) is the one-process gradient. Clipping and AdamW
//!   then run on identical inputs on every rank, so parameters stay identical without being
//!   sent again; rank 0's are broadcast once at the start.
//! - **One timeline.** The stop decision (limits, Ctrl-C on any rank) and the elapsed time
//!   that drives a timed schedule are agreed at the start of every step; rank 0 alone
//!   validates, writes metrics and checkpoints, and the others wait for it at that agreement.
//!   A checkpoint does not depend on the number of ranks, so a run resumes on any number.
//!
//! Ranks find each other torchrun-style ([`DistEnv`]: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`): rank 0 hands the NCCL id to the others over a small TCP
//! rendezvous ([`exchange_id`]), which also checks that every rank runs the same configuration
//! ([`fingerprint`]). [`Alone`] is the group of one that a single process trains in (the same
//! code, every collective a no-op); [`ThreadGroup`] is an in-process group of CPU ranks
//! (threads), which the tests use to check the data-parallel path without GPUs;
//! `nccl::NcclGroup` (feature `cuda`) is the real one.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
pub mod nccl;

/// The bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// A run's fingerprint: SHA-256 of its configuration.
pub type Fingerprint = [u8; 32];

fn dist_err(msg: impl Into<String>) -> Error {
    Error::Dist(msg.into())
}

// ---------------------------------------------------------------------------------------------
// Where this process sits in the job.

/// This process's place in a multi-process job, from torchrun-style environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// 0 ≤ rank < world_size; rank 0 serves the rendezvous and writes the run folder.
    pub rank: usize,
    pub world_size: usize,
    /// This process's index on its host: it trains on GPU `cuda:LOCAL_RANK` unless told otherwise.
    pub local_rank: usize,
    /// Rank 0's host, as the other ranks reach it.
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// Default `MASTER_PORT`, torchrun's.
    pub const DEFAULT_PORT: u16 = 29500;

    /// The job this process belongs to, or `None` when `WORLD_SIZE` is not set (a plain run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`DistEnv::from_env`] over any variable lookup: `WORLD_SIZE` and `RANK` are required
    /// together; `LOCAL_RANK` defaults to `RANK` (one host), `MASTER_ADDR` to 127.0.0.1 and
    /// `MASTER_PORT` to 29500.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            if get("RANK").is_some() {
                return Err(dist_err("RANK is set but WORLD_SIZE is not: set both (and MASTER_ADDR, MASTER_PORT) on every rank"));
            }
            return Ok(None);
        };
        let number = |name: &str, value: &str| -> Result<usize> {
            value.trim().parse::<usize>().map_err(|_| dist_err(format!("{name}={value:?} is not a whole number")))
        };
        let world_size = number("WORLD_SIZE", &world)?;
        if world_size == 0 {
            return Err(dist_err("WORLD_SIZE must be at least 1"));
        }
        let rank = match get("RANK") {
            Some(r) => number("RANK", &r)?,
            None => return Err(dist_err("WORLD_SIZE is set but RANK is not: give every process its RANK (0 to WORLD_SIZE - 1)")),
        };
        if rank >= world_size {
            return Err(dist_err(format!("RANK {rank} is out of range for WORLD_SIZE {world_size} (ranks are 0 to {})", world_size - 1)));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(r) => number("LOCAL_RANK", &r)?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR").map_or_else(|| "127.0.0.1".to_string(), |a| a.trim().to_string());
        if master_addr.is_empty() {
            return Err(dist_err("MASTER_ADDR is empty: set it to rank 0's host name or address"));
        }
        let master_port = match get("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| dist_err(format!("MASTER_PORT={p:?} is not a TCP port (1 to 65535)")))?,
            None => Self::DEFAULT_PORT,
        };
        Ok(Some(DistEnv { rank, world_size, local_rank, master_addr, master_port }))
    }

    /// `MASTER_ADDR:MASTER_PORT` (IPv6 addresses in brackets).
    pub fn address(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// The rows of a global batch of `batch` sequences that `rank` of `world` trains on: a
/// contiguous slice of batch / world rows.
pub fn rank_rows(batch: usize, world: usize, rank: usize) -> Result<Range<usize>> {
    if world == 0 || rank >= world {
        return Err(dist_err(format!("rank {rank} is not one of {world} ranks")));
    }
    if !batch.is_multiple_of(world) {
        return Err(Error::Config(format!(
            "the batch size ({batch}) is the global batch, split evenly over the {world} ranks: use a multiple of {world}"
        )));
    }
    let per = batch / world;
    Ok(rank * per..(rank + 1) * per)
}

/// SHA-256 of a configuration's JSON: ranks compare it at the rendezvous, so a rank given
/// other settings (or another checkpoint to resume) is refused before any training.
pub fn fingerprint<T: Serialize>(config: &T) -> Result<Fingerprint> {
    Ok(Sha256::digest(serde_json::to_vec(config)?).into())
}

// ---------------------------------------------------------------------------------------------
// Rendezvous: rank 0 hands the NCCL id to the others over TCP.
//
// Each other rank connects to MASTER_ADDR:MASTER_PORT (retrying until the deadline) and sends
// HELLO = MAGIC, rank (u32 LE), world size (u32 LE), fingerprint (32 bytes). Rank 0 waits for
// all of them, checks every hello, then answers each: b'K' and the 128-byte id, or b'E',
// a length (u32 LE) and a message saying why the job cannot start.

const MAGIC: &[u8; 8] = b"MBDDP\x00\x00\x01";
const HELLO_BYTES: usize = 8 + 4 + 4 + 32;
/// A refusal's message is at most this long.
const MAX_MESSAGE: usize = 4096;

/// Rank 0 makes the id (`new_id`) and serves it; every other rank fetches it. Within
/// `timeout` every rank must have joined, or each one stops with an error saying who is
/// missing. All ranks must pass the same `fingerprint`.
pub fn exchange_id(
    env: &DistEnv,
    fingerprint: &Fingerprint,
    new_id: impl FnOnce() -> Result<[u8; ID_BYTES]>,
    timeout: Duration,
) -> Result<[u8; ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let listener = listen(env)?;
        let id = new_id()?;
        serve_id(&listener, env.world_size, fingerprint, &id, deadline)?;
        Ok(id)
    } else {
        fetch_id(&env.address(), env.rank, env.world_size, fingerprint, deadline)
    }
}

/// Rank 0's listening socket on MASTER_ADDR:MASTER_PORT.
pub fn listen(env: &DistEnv) -> Result<TcpListener> {
    let address = env.address();
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| dist_err(format!("cannot resolve MASTER_ADDR {address} ({e}): set it to rank 0's host name or address")))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(dist_err(format!(
        "rank 0 cannot listen on {address} ({}): MASTER_ADDR must be an address of rank 0's host and MASTER_PORT a free port",
        last.map_or_else(|| "no address".to_string(), |e| e.to_string())
    )))
}

/// Rank 0's side: waits (until `deadline`) for the `world - 1` other ranks, checks their
/// hellos, then sends each the id, or a refusal to all when one does not fit.
pub fn serve_id(
    listener: &TcpListener,
    world: usize,
    fingerprint: &Fingerprint,
    id: &[u8; ID_BYTES],
    deadline: Instant,
) -> Result<()> {
    let started = Instant::now();
    let address = listener.local_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    listener.set_nonblocking(true).map_err(|e| dist_err(format!("rendezvous socket {address}: {e}")))?;
    let mut joined: Vec<(usize, TcpStream)> = Vec::new();
    let problem = loop {
        if joined.len() + 1 == world {
            break None;
        }
        let now = Instant::now();
        if now >= deadline {
            let mut missing: Vec<usize> = (1..world).collect();
            missing.retain(|r| !joined.iter().any(|(j, _)| j == r));
            break Some(format!(
                "rank(s) {missing:?} of {world} did not join the rendezvous at {address} within {:.0} s: start every rank \
                 with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT (or raise --nccl-timeout)",
                started.elapsed().as_secs_f64()
            ));
        }
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => break Some(format!("the rendezvous at {address} failed: {e}")),
        };
        // A hello is a few bytes sent at once; a connection that sends none is not a rank.
        let hello = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(10).min(deadline - now).max(Duration::from_millis(1)))))
            .and_then(|()| read_exact(&mut stream, HELLO_BYTES));
        let Ok(hello) = hello else { continue };
        if &hello[..8] != MAGIC {
            continue; // not one of ours (a port scanner, another program): ignore it
        }
        let word = |at: usize| u32::from_le_bytes([hello[at], hello[at + 1], hello[at + 2], hello[at + 3]]) as usize;
        let (rank, their_world) = (word(8), word(12));
        let refusal = if their_world != world {
            Some(format!("rank {rank} has WORLD_SIZE {their_world} but rank 0 has {world}: give every rank the same WORLD_SIZE"))
        } else if rank == 0 || rank >= world {
            Some(format!("a process joined as rank {rank}, which is not one of ranks 1 to {}: check RANK", world - 1))
        } else if joined.iter().any(|(r, _)| *r == rank) {
            Some(format!("two processes joined as rank {rank}: give every process its own RANK"))
        } else if hello[16..] != fingerprint[..] {
            Some(format!(
                "rank {rank} runs another configuration than rank 0: give every rank the same model, training and data \
                 settings (and, to resume, the same checkpoint)"
            ))
        } else {
            None
        };
        if let Some(msg) = refusal {
            refuse(&mut stream, &msg);
            break Some(msg);
        }
        joined.push((rank, stream));
    };
    match problem {
        Some(msg) => {
            for (_, stream) in &mut joined {
                refuse(stream, &msg);
            }
            Err(dist_err(msg))
        }
        None => {
            for (rank, stream) in &mut joined {
                let mut reply = Vec::with_capacity(1 + ID_BYTES);
                reply.push(b'K');
                reply.extend_from_slice(id);
                stream.write_all(&reply).map_err(|e| dist_err(format!("sending the NCCL id to rank {rank}: {e}")))?;
            }
            Ok(())
        }
    }
}

fn refuse(stream: &mut TcpStream, msg: &str) {
    let bytes = &msg.as_bytes()[..msg.len().min(MAX_MESSAGE)];
    let mut reply = vec![b'E'];
    reply.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    reply.extend_from_slice(bytes);
    let _ = stream.write_all(&reply); // best effort: that rank also times out on its own
}

/// Another rank's side: connects to rank 0 at `address` (retrying until `deadline`), sends
/// its hello and waits for the id.
pub fn fetch_id(address: &str, rank: usize, world: usize, fingerprint: &Fingerprint, deadline: Instant) -> Result<[u8; ID_BYTES]> {
    let started = Instant::now();
    let waited = || format!("{:.0} s", started.elapsed().as_secs_f64());
    let mut stream = loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(dist_err(format!(
                "rank {rank}: no rank 0 answered at {address} within {}: start rank 0 with the same MASTER_ADDR and \
                 MASTER_PORT (MASTER_ADDR must be rank 0's host), or raise --nccl-timeout",
                waited()
            )));
        }
        let attempt = address.to_socket_addrs().ok().and_then(|mut a| a.next()).and_then(|addr| {
            TcpStream::connect_timeout(&addr, (deadline - now).min(Duration::from_secs(5))).ok()
        });
        match attempt {
            Some(s) => break s,
            None => std::thread::sleep(Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()))),
        }
    };
    let mut hello = Vec::with_capacity(HELLO_BYTES);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    hello.extend_from_slice(fingerprint);
    stream.write_all(&hello).map_err(|e| dist_err(format!("rank {rank}: sending to rank 0 at {address}: {e}")))?;
    // Rank 0 answers once every rank has joined.
    let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining)).map_err(|e| dist_err(format!("rendezvous socket: {e}")))?;
    let kind = read_exact(&mut stream, 1).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => dist_err(format!(
            "rank {rank}: rank 0 at {address} did not hand out the NCCL id within {}: not every rank joined (see rank 0's error)",
            waited()
        )),
        _ => dist_err(format!("rank {rank}: rank 0 at {address} closed the rendezvous ({e}): see rank 0's error")),
    })?;
    let lost = |e: std::io::Error| dist_err(format!("rank {rank}: reading rank 0's reply from {address}: {e}"));
    match kind[0] {
        b'K' => {
            let id = read_exact(&mut stream, ID_BYTES).map_err(lost)?;
            let mut out = [0u8; ID_BYTES];
            out.copy_from_slice(&id);
            Ok(out)
        }
        b'E' => {
            let len = read_exact(&mut stream, 4).map_err(lost)?;
            let len = (u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize).min(MAX_MESSAGE);
            let msg = read_exact(&mut stream, len).map_err(lost)?;
            Err(dist_err(format!("rank {rank}: rank 0 refused to start the job: {}", String::from_utf8_lossy(&msg))))
        }
        _ => Err(dist_err(format!("rank {rank}: {address} is not a megabyte rendezvous (unexpected reply): check MASTER_PORT"))),
    }
}

fn read_exact(stream: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Collectives.

/// The operations data-parallel training needs from a group of ranks. Every rank calls them
/// in the same order with tensors of the same shapes and dtypes.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sums over the ranks of each tensor (contiguous, f32 or f64), every
    /// rank receiving identical values. The buffers may be reduced in place (NCCL does), so
    /// pass ones that nothing else reads.
    fn all_reduce_sum(&mut self, bufs: Vec<Tensor>) -> Result<Vec<Tensor>>;
    /// Rank `root`'s values of each tensor, on every rank; may overwrite the buffers.
    fn broadcast(&mut self, bufs: Vec<Tensor>, root: usize) -> Result<Vec<Tensor>>;
    /// Leaves the group cleanly after the last collective (NCCL: finalize and destroy the
    /// communicator). A group dropped without it tears down at once (NCCL: abort).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A group of one: the process trains alone. Every collective returns its buffers as they
/// are, so single-process training runs the data-parallel code with nothing to branch on.
pub struct Alone;

impl Collective for Alone {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, bufs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        Ok(bufs)
    }

    fn broadcast(&mut self, bufs: Vec<Tensor>, root: usize) -> Result<Vec<Tensor>> {
        if root != 0 {
            return Err(dist_err(format!("broadcast from rank {root} of 1")));
        }
        Ok(bufs)
    }
}

/// The sums over the ranks of `tensors` (one dtype, any shapes) and of `extra` (sent along in
/// the same collective call), with the tensors packed into flat buckets of about
/// `bucket_elems` elements: a few large all-reduces instead of one per tensor. A group of one
/// returns them untouched (no copy).
pub fn all_reduce_sum_packed(
    group: &mut dyn Collective,
    tensors: Vec<Tensor>,
    extra: Tensor,
    bucket_elems: usize,
) -> Result<(Vec<Tensor>, Tensor)> {
    if group.world_size() == 1 {
        return Ok((tensors, extra));
    }
    let shapes: Vec<candle_core::Shape> = tensors.iter().map(|t| t.shape().clone()).collect();
    let (mut bufs, packing) = pack(&tensors.iter().collect::<Vec<_>>(), bucket_elems)?;
    drop(tensors); // the buckets hold the values now
    bufs.push(extra);
    let mut summed = group.all_reduce_sum(bufs)?;
    let extra = summed.pop().ok_or_else(|| dist_err("a buffer went missing in the all-reduce"))?;
    Ok((packing.unpack(&summed, &shapes.iter().collect::<Vec<_>>())?, extra))
}

/// An in-process group of `world` ranks, one per thread, on the CPU: sums are taken in rank
/// order, so every rank gets the same bits. A rank that waits longer than `timeout` for the
/// others gets an error instead of hanging.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    slots: Mutex<Vec<Option<Vec<Tensor>>>>,
    /// (ranks arrived, generation) of the barrier.
    gate: Mutex<(usize, u64)>,
    turn: Condvar,
}

impl ThreadGroup {
    /// The `world` ranks of a new group, rank i at index i: hand one to each thread.
    pub fn new(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            slots: Mutex::new(vec![None; world]),
            gate: Mutex::new((0, 0)),
            turn: Condvar::new(),
        });
        (0..world).map(|rank| ThreadGroup { rank, shared: shared.clone() }).collect()
    }

    /// Waits until every rank has arrived here.
    fn barrier(&self) -> Result<()> {
        let s = &self.shared;
        let poisoned = || dist_err("another rank's thread panicked");
        let mut gate = s.gate.lock().map_err(|_| poisoned())?;
        let generation = gate.1;
        gate.0 += 1;
        if gate.0 == s.world {
            *gate = (0, generation + 1);
            s.turn.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + s.timeout;
        while gate.1 == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(dist_err(format!(
                    "rank {} waited {:.0} s for the other ranks: one of them stopped or hangs",
                    self.rank,
                    s.timeout.as_secs_f64()
                )));
            }
            gate = s.turn.wait_timeout(gate, left).map_err(|_| poisoned())?.0;
        }
        Ok(())
    }

    /// Every rank's tensors, once all have put theirs.
    fn exchange(&self, bufs: Vec<Tensor>, combine: impl Fn(&[Vec<Tensor>]) -> Result<Vec<Tensor>>) -> Result<Vec<Tensor>> {
        let poisoned = || dist_err("another rank's thread panicked");
        self.shared.slots.lock().map_err(|_| poisoned())?[self.rank] = Some(bufs);
        self.barrier()?;
        let result = {
            let slots = self.shared.slots.lock().map_err(|_| poisoned())?;
            let all: Vec<Vec<Tensor>> = slots.iter().map(|s| s.clone().unwrap_or_default()).collect();
            drop(slots);
            if all.iter().any(|b| b.len() != all[0].len()) {
                Err(dist_err("the ranks passed different numbers of tensors to a collective"))
            } else {
                combine(&all)
            }
        };
        // Nobody puts the next call's tensors before everyone has read these.
        self.barrier()?;
        result
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, bufs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        self.exchange(bufs, |all| {
            (0..all[0].len())
                .map(|i| {
                    let mut sum = all[0][i].clone();
                    for rank in &all[1..] {
                        sum = (sum + &rank[i])?;
                    }
                    Ok(sum)
                })
                .collect()
        })
    }

    fn broadcast(&mut self, bufs: Vec<Tensor>, root: usize) -> Result<Vec<Tensor>> {
        if root >= self.shared.world {
            return Err(dist_err(format!("broadcast from rank {root} of {}", self.shared.world)));
        }
        self.exchange(bufs, |all| Ok(all[root].iter().map(|t| t.copy()).collect::<candle_core::Result<Vec<_>>>()?))
    }
}

// ---------------------------------------------------------------------------------------------
// Buckets: many tensors as a few flat buffers.

/// Default size of a gradient bucket: one all-reduce per 64 MiB of f32 gradients.
pub const BUCKET_BYTES: usize = 64 << 20;

/// Where each tensor of a packing lies: (bucket, offset, elements).
pub struct Packing {
    places: Vec<(usize, usize, usize)>,
}

/// Flattens `tensors` (one dtype) in order into buckets of whole tensors, each about
/// `bucket_elems` elements (a larger tensor is a bucket of its own): one copy per tensor, into
/// fresh buffers that share no storage with `tensors` (collectives may work in place).
pub fn pack(tensors: &[&Tensor], bucket_elems: usize) -> Result<(Vec<Tensor>, Packing)> {
    let mut buckets = Vec::new();
    let mut places = Vec::with_capacity(tensors.len());
    let mut current: Vec<Tensor> = Vec::new();
    let mut filled = 0;
    for t in tensors {
        let n = t.elem_count();
        if filled > 0 && filled + n > bucket_elems {
            buckets.push(bucket(&current)?);
            current.clear();
            filled = 0;
        }
        places.push((buckets.len(), filled, n));
        current.push(t.flatten_all()?);
        filled += n;
    }
    if !current.is_empty() {
        buckets.push(bucket(&current)?);
    }
    Ok((buckets, Packing { places }))
}

/// One flat buffer of its own holding `parts` in order.
fn bucket(parts: &[Tensor]) -> Result<Tensor> {
    Ok(match parts {
        // `cat` of one tensor would return that tensor itself.
        [one] => one.force_contiguous()?,
        _ => Tensor::cat(parts, 0)?,
    })
}

impl Packing {
    /// The tensors back out of (reduced) buckets, as views, in packing order and with
    /// `shapes`.
    pub fn unpack(&self, buckets: &[Tensor], shapes: &[&candle_core::Shape]) -> Result<Vec<Tensor>> {
        if shapes.len() != self.places.len() {
            return Err(dist_err("unpacking another number of tensors than was packed"));
        }
        self.places
            .iter()
            .zip(shapes)
            .map(|(&(b, off, n), shape)| {
                let bucket = buckets.get(b).ok_or_else(|| dist_err("a bucket went missing in a collective"))?;
                Ok(bucket.narrow(0, off, n)?.reshape(*shape)?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_share_no_storage_with_what_they_pack() {
        use candle_core::{Device, Var};
        // One tensor larger than a bucket (a bucket of its own), then two that share one.
        let vars: Vec<Var> = [(3, 4), (2, 2), (1, 3)]
            .iter()
            .enumerate()
            .map(|(i, &shape)| Var::from_tensor(&(Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu).unwrap() * i as f64).unwrap()).unwrap())
            .collect();
        let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let (buckets, packing) = pack(&tensors, 8).unwrap();
        assert_eq!(buckets.iter().map(|b| b.elem_count()).collect::<Vec<_>>(), vec![12, 7]);
        // The unpacked views can be set into the variables they came from, which fails for a
        // view of a variable's own storage (what an in-place collective would then write).
        let shapes: Vec<&candle_core::Shape> = tensors.iter().map(|t| t.shape()).collect();
        for (i, (var, value)) in vars.iter().zip(packing.unpack(&buckets, &shapes).unwrap()).enumerate() {
            var.set(&value).unwrap();
            assert_eq!(var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![i as f32; var.elem_count()]);
        }
    }

    #[test]
    fn environment_variables_are_read_and_checked() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
        let env = DistEnv::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("MASTER_PORT", "1234")])).unwrap().unwrap();
        assert_eq!(env, DistEnv { rank: 3, world_size: 4, local_rank: 3, master_addr: "127.0.0.1".into(), master_port: 1234 });
        assert_eq!(env.address(), "127.0.0.1:1234");
        for (bad, says) in [
            (&[("RANK", "0")][..], "WORLD_SIZE is not"),
            (&[("WORLD_SIZE", "2")][..], "RANK is not"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2")][..], "out of range"),
            (&[("WORLD_SIZE", "two"), ("RANK", "0")][..], "not a whole number"),
            (&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "99999")][..], "not a TCP port"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = bad;
            let err = DistEnv::from_vars(vars(pairs)).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
