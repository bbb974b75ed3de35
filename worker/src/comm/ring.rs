//! The CPU collective: a ring of TCP connections (rank r sends to r+1 and receives from
//! r-1). All-reduce is reduce-scatter then all-gather over `world` chunks, each cut into
//! pieces that are forwarded as soon as they are reduced, so sending and receiving overlap.
//!
//! Determinism: every rank performs the same fixed sequence of `chunk += received` and
//! `chunk = received` operations, so the floating-point summation order is fixed (it never
//! depends on timing) and the all-gather hands every rank the very same bits.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::frame::{Frame, Op};
use super::handshake::{Hello, RingKey, accept_prev, dial_next};
use super::shm::{self, ShmRx, ShmTx, Watch};
use super::{Comm, CommError, add_assign, chunk_range};

#[cfg(not(target_endian = "little"))]
compile_error!("the ring sends f32 buffers as raw little-endian bytes");

/// Floats per message: 256 KiB pieces keep the pipe full without large staging buffers.
const PIECE_FLOATS: usize = 64 * 1024;

/// How a ring is formed and how long its collectives may wait.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// The generation's key (see [`RingKey::derive`]).
    pub key: RingKey,
    /// Forming the ring fails after this long.
    pub connect_timeout: Duration,
    /// A collective fails when the previous rank sends nothing (or the next takes nothing)
    /// for this long: ranks out of step, or a peer stalled without closing its socket.
    pub collective_timeout: Duration,
    /// Move the pieces between ranks on one machine through shared memory (`shm.rs`) when
    /// both can map the same file; TCP otherwise.
    pub shared_memory: bool,
}

impl RingOptions {
    /// Shared-memory links unless `STACKWISE_RING_SHM=0`.
    pub fn shared_memory_from_env() -> bool {
        std::env::var(shm::SHM_ENV).map_or(true, |v| v.trim() != "0")
    }
}

pub struct RingListener {
    listener: TcpListener,
}

impl RingListener {
    /// Bind `addr` (e.g. `0.0.0.0:0` for any free port).
    pub fn bind(addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Shuts a ring's sockets down from another thread, so a rank blocked in a collective
/// returns with an error at once (used when the coordinator aborts a generation).
#[derive(Clone)]
pub struct RingAbort {
    streams: Arc<Vec<TcpStream>>,
    aborted: Arc<AtomicBool>,
}

impl RingAbort {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in self.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub struct Ring {
    rank: usize,
    world: usize,
    next: TcpStream,
    prev: TcpStream,
    /// Shared-memory links to rank + 1 and from rank - 1, where they formed.
    tx: Option<ShmTx>,
    rx: Option<ShmRx>,
    scratch: Vec<f32>,
    broken: bool,
    aborted: Arc<AtomicBool>,
    abort_streams: Arc<Vec<TcpStream>>,
    /// Collectives started on this ring, checked against the previous rank's count.
    seq: u64,
    collective_timeout: Duration,
}

/// Where a rank sits in a generation's ring: its rank, the world size, and the address of
/// rank + 1's listener (the only peer it dials).
#[derive(Debug, Clone, Copy)]
pub struct Seat<'a> {
    pub rank: usize,
    pub world: usize,
    pub next_peer: &'a str,
}

impl Ring {
    /// Form the ring of one generation: connect to rank+1's listener (`next_peer`) and accept rank-1's
    /// connection, both authenticated with the generation's key. Connections from another
    /// run or generation (e.g. a late peer of an aborted generation) and strangers are
    /// dropped. Fails after `opts.connect_timeout`, or soon after `cancel` is set.
    pub fn connect(
        listener: &RingListener,
        seat: Seat<'_>,
        run_tag: u64,
        generation: u64,
        opts: &RingOptions,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, CommError> {
        let Seat {
            next_peer,
            rank,
            world,
        } = seat;
        if world < 2 || rank >= world {
            return Err(CommError::Setup(format!(
                "a ring needs at least 2 ranks and rank < world (rank {rank}, world {world})"
            )));
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let hello = Hello {
            run_tag,
            generation,
            from_rank: rank as u32,
            world: world as u32,
        };
        let next_addr = next_peer.to_string();
        let (key, dial_cancel) = (opts.key.clone(), cancel.clone());
        let dialer =
            std::thread::spawn(move || dial_next(&next_addr, &key, &hello, deadline, &dial_cancel));
        let expected = Hello {
            from_rank: ((rank + world - 1) % world) as u32,
            ..hello
        };
        let prev = accept_prev(&listener.listener, &opts.key, expected, deadline, &cancel);
        let next = dialer
            .join()
            .map_err(|_| CommError::Setup("ring dialer panicked".into()))?;
        let (mut prev, mut next) = (prev?, next?);
        let (tx, rx) = shm::negotiate(
            &mut next,
            &mut prev,
            opts.shared_memory,
            PIECE_FLOATS,
            deadline,
        )?;
        tracing::debug!(
            "rank {rank}: link to rank + 1 over {}, from rank - 1 over {}",
            if tx.is_some() { "shared memory" } else { "TCP" },
            if rx.is_some() { "shared memory" } else { "TCP" },
        );
        prev.set_read_timeout(Some(opts.collective_timeout))?;
        next.set_write_timeout(Some(opts.collective_timeout))?;
        let abort_streams = Arc::new(vec![next.try_clone()?, prev.try_clone()?]);
        // Only a TCP link from rank - 1 lands the pieces to add in a buffer of their own.
        let scratch = if rx.is_none() {
            vec![0.0; PIECE_FLOATS]
        } else {
            Vec::new()
        };
        Ok(Self {
            rank,
            world,
            next,
            prev,
            tx,
            rx,
            scratch,
            broken: false,
            aborted: Arc::new(AtomicBool::new(false)),
            abort_streams,
            seq: 0,
            collective_timeout: opts.collective_timeout,
        })
    }

    /// How this rank's links move data: `"shm"` (both through shared memory), `"tcp"`, or
    /// `"shm+tcp"` (one of each).
    pub fn transport(&self) -> &'static str {
        match (self.tx.is_some(), self.rx.is_some()) {
            (true, true) => "shm",
            (false, false) => "tcp",
            _ => "shm+tcp",
        }
    }

    pub fn abort_handle(&self) -> RingAbort {
        RingAbort {
            streams: self.abort_streams.clone(),
            aborted: self.aborted.clone(),
        }
    }

    fn fail(&mut self, e: CommError) -> CommError {
        self.broken = true;
        let _ = self.next.shutdown(Shutdown::Both);
        let _ = self.prev.shutdown(Shutdown::Both);
        if self.aborted.load(Ordering::SeqCst) {
            return CommError::Aborted;
        }
        match e {
            CommError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                CommError::Timeout(format!(
                    "rank {}: no data moved to or from the neighbouring ranks for {:?} \
                     (ranks out of step, or a peer stalled); raise it with {COLLECTIVE_TIMEOUT_ENV}",
                    self.rank, self.collective_timeout
                ))
            }
            e => e,
        }
    }

    /// The frame of this rank's next collective.
    fn frame(&mut self, op: Op, floats: usize) -> Frame {
        self.seq += 1;
        Frame {
            op,
            seq: self.seq,
            floats: floats as u64,
        }
    }

    fn check(&self) -> Result<(), CommError> {
        if self.broken || self.aborted.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        Ok(())
    }
}

fn bytes(s: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

fn bytes_mut(s: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// Send one piece to rank + 1: through the shared-memory link where there is one.
fn send_piece(
    next: &TcpStream,
    tx: Option<&mut ShmTx>,
    piece: &[f32],
    aborted: &AtomicBool,
    timeout: Duration,
) -> Result<(), CommError> {
    match tx {
        Some(tx) => tx.send(
            piece,
            &Watch {
                peer: next,
                aborted,
                timeout,
            },
        ),
        None => Ok((&mut &*next).write_all(bytes(piece))?),
    }
}

/// Receive one piece from rank - 1 into `dst`, added to it when `add`. Over TCP the bytes to
/// add land in `scratch` first; from shared memory they are added straight from the slot.
fn recv_piece(
    prev: &TcpStream,
    rx: Option<&mut ShmRx>,
    scratch: &mut [f32],
    dst: &mut [f32],
    add: bool,
    aborted: &AtomicBool,
    timeout: Duration,
) -> Result<(), CommError> {
    if let Some(rx) = rx {
        return rx.recv(
            dst,
            add,
            &Watch {
                peer: prev,
                aborted,
                timeout,
            },
        );
    }
    let mut sock = prev;
    if add {
        let tmp = &mut scratch[..dst.len()];
        sock.read_exact(bytes_mut(tmp))?;
        add_assign(dst, tmp);
    } else {
        sock.read_exact(bytes_mut(dst))?;
    }
    Ok(())
}

/// Overrides the collectives' timeout (seconds) of the ring and NCCL.
pub const COLLECTIVE_TIMEOUT_ENV: &str = "STACKWISE_COLLECTIVE_TIMEOUT_S";

/// The pieces of chunk `c`.
fn pieces(n: usize, world: usize, c: usize) -> Vec<Range<usize>> {
    let r = chunk_range(n, world, c);
    (r.start..r.end)
        .step_by(PIECE_FLOATS)
        .map(|s| s..(s + PIECE_FLOATS).min(r.end))
        .collect()
}

/// One piece of one step: the region of the buffer it reads (writer) or writes (reader).
struct PieceOp {
    step: usize,
    piece: usize,
    range: Range<usize>,
}

/// The ops of one side in order, and the index of each step's first op.
fn schedule(
    n: usize,
    world: usize,
    chunk_of_step: impl Fn(usize) -> usize,
) -> (Vec<PieceOp>, Vec<usize>) {
    let mut ops = Vec::new();
    let mut starts = Vec::new();
    for step in 0..2 * (world - 1) {
        starts.push(ops.len());
        for (piece, range) in pieces(n, world, chunk_of_step(step))
            .into_iter()
            .enumerate()
        {
            ops.push(PieceOp { step, piece, range });
        }
    }
    (ops, starts)
}

/// Progress of the two sides of an all-reduce: ops completed by the reader and the writer.
#[derive(Default)]
struct Progress {
    state: Mutex<(usize, usize, bool)>,
    cv: Condvar,
}

impl Progress {
    /// Wait until `ready(reader_done, writer_done)`; false if the other side failed.
    fn wait(&self, ready: impl Fn(usize, usize) -> bool) -> bool {
        let mut g = self.state.lock().expect("progress lock");
        while !g.2 && !ready(g.0, g.1) {
            g = self.cv.wait(g).expect("progress lock");
        }
        !g.2
    }

    fn update(&self, f: impl FnOnce(&mut (usize, usize, bool))) {
        f(&mut self.state.lock().expect("progress lock"));
        self.cv.notify_all();
    }
}

/// The buffer shared by the reader (this thread) and the writer thread.
#[derive(Clone, Copy)]
struct SharedBuf(*mut f32);
// SAFETY: the two sides touch disjoint regions at any time; see `all_reduce_sum`.
unsafe impl Send for SharedBuf {}
unsafe impl Sync for SharedBuf {}

impl SharedBuf {
    fn at(&self, i: usize) -> *mut f32 {
        // SAFETY (of the add): callers pass offsets inside the buffer.
        unsafe { self.0.add(i) }
    }
}

impl Comm for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Step s (of 2(w-1)): send chunk (r-s) mod w, receive chunk (r-s-1) mod w; in the
    /// first w-1 steps the received piece is added, in the last w-1 it replaces.
    ///
    /// Safety of the shared buffer: the writer sends piece k of step s only after the reader
    /// finished piece k of step s-1 (the same region, just reduced), and the reader writes
    /// piece k of step s only after the writer finished piece k of step s+1-w (the last send
    /// of that region before it is overwritten). Those are the only steps at which the two
    /// sides meet the same region, so no region is read and written at the same time. The
    /// hand-offs go through a mutex, which orders the memory accesses.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.check()?;
        let (w, r, n) = (self.world, self.rank, buf.len());
        if n == 0 {
            return Ok(());
        }
        let frame = self.frame(Op::AllReduce, n);
        let (wops, wstart) = schedule(n, w, |s| (r + w * 2 - s % w) % w);
        let (rops, rstart) = schedule(n, w, |s| (r + w * 2 - s % w - 1) % w);
        let progress = Progress::default();
        let shared = SharedBuf(buf.as_mut_ptr());
        let reduce_steps = w - 1;
        let (next, prev) = (&self.next, &self.prev);
        let (tx, rx) = (&mut self.tx, &mut self.rx);
        let scratch = &mut self.scratch;
        let (aborted, timeout) = (&*self.aborted, self.collective_timeout);
        let result = std::thread::scope(|scope| {
            let writer = scope.spawn(|| -> Result<(), CommError> {
                let mut out = next;
                if let Err(e) = out.write_all(&frame.encode()) {
                    progress.update(|p| p.2 = true);
                    return Err(e.into());
                }
                for (i, op) in wops.iter().enumerate() {
                    let need = (op.step > 0).then(|| rstart[op.step - 1] + op.piece + 1);
                    if !progress.wait(|rd, _| need.is_none_or(|k| rd >= k)) {
                        return Err(CommError::Aborted);
                    }
                    // SAFETY: see above; the region is not being written now.
                    let region = unsafe {
                        std::slice::from_raw_parts(
                            shared.at(op.range.start).cast_const(),
                            op.range.len(),
                        )
                    };
                    if let Err(e) = send_piece(out, tx.as_mut(), region, aborted, timeout) {
                        progress.update(|p| p.2 = true);
                        return Err(e);
                    }
                    progress.update(|p| p.1 = i + 1);
                }
                Ok(())
            });
            let read = (|| -> Result<(), CommError> {
                frame.check(prev, r, w)?;
                for (i, op) in rops.iter().enumerate() {
                    let need = (op.step + 1 >= w).then(|| wstart[op.step + 1 - w] + op.piece + 1);
                    if !progress.wait(|_, wd| need.is_none_or(|k| wd >= k)) {
                        return Err(CommError::Aborted);
                    }
                    // SAFETY: see above; the region is not being read now.
                    let region = unsafe {
                        std::slice::from_raw_parts_mut(shared.at(op.range.start), op.range.len())
                    };
                    let add = op.step < reduce_steps;
                    recv_piece(prev, rx.as_mut(), scratch, region, add, aborted, timeout)?;
                    progress.update(|p| p.0 = i + 1);
                }
                Ok(())
            })();
            if read.is_err() {
                progress.update(|p| p.2 = true);
                // Unblock a writer stuck on a full socket.
                let _ = next.shutdown(Shutdown::Both);
            }
            let wrote = writer.join().unwrap_or(Err(CommError::Aborted));
            read.and(wrote)
        });
        result.map_err(|e| self.fail(e))
    }

    /// Pipelined along the ring from `root`: each rank receives a piece from its
    /// predecessor and forwards it, except the rank just before `root`.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        self.check()?;
        let (w, r) = (self.world, self.rank);
        if root >= w {
            return Err(CommError::Setup(format!(
                "broadcast root {root} >= world {w}"
            )));
        }
        let dist = (r + w - root) % w;
        let frame = self.frame(Op::Broadcast { root: root as u32 }, buf.len());
        let result = (|| -> Result<(), CommError> {
            if dist > 0 {
                frame.check(&self.prev, r, w)?;
            }
            if dist < w - 1 {
                self.next.write_all(&frame.encode())?;
            }
            let n = buf.len();
            let (aborted, timeout) = (&*self.aborted, self.collective_timeout);
            for s in (0..n).step_by(PIECE_FLOATS) {
                let piece = &mut buf[s..(s + PIECE_FLOATS).min(n)];
                if dist > 0 {
                    let (rx, scratch) = (self.rx.as_mut(), &mut self.scratch);
                    recv_piece(&self.prev, rx, scratch, piece, false, aborted, timeout)?;
                }
                if dist < w - 1 {
                    send_piece(&self.next, self.tx.as_mut(), piece, aborted, timeout)?;
                }
            }
            Ok(())
        })();
        result.map_err(|e| self.fail(e))
    }
}

/// A test job's ring options: a fixed key, 20 s timeouts.
#[cfg(test)]
pub(crate) fn test_options() -> RingOptions {
    RingOptions {
        key: RingKey::derive(Some("job token"), b"generation nonce"),
        connect_timeout: Duration::from_secs(20),
        collective_timeout: Duration::from_secs(20),
        shared_memory: true,
    }
}

/// Ranks of a `world`-rank ring as threads of this process, joined by real TCP connections on
/// 127.0.0.1 (for tests).
#[cfg(test)]
pub(crate) fn test_rings(world: usize, generation: u64) -> Vec<Ring> {
    test_rings_with(world, generation, &test_options())
}

/// `test_rings` with other options.
#[cfg(test)]
pub(crate) fn test_rings_with(world: usize, generation: u64, opts: &RingOptions) -> Vec<Ring> {
    test_rings_each(world, generation, |_| opts.clone())
}

/// `test_rings` with each rank's own options.
#[cfg(test)]
pub(crate) fn test_rings_each(
    world: usize,
    generation: u64,
    opts: impl Fn(usize) -> RingOptions,
) -> Vec<Ring> {
    let listeners: Vec<_> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (peers, opts) = (peers.clone(), opts(rank));
            std::thread::spawn(move || {
                let seat = Seat {
                    next_peer: &peers[(rank + 1) % peers.len()],
                    rank,
                    world: peers.len(),
                };
                Ring::connect(&l, seat, 7, generation, &opts, Default::default()).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
