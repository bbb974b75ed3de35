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
use super::{Comm, CommError, chunk_range};

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
        Ok(Self {
            rank,
            world,
            next,
            prev,
            tx,
            rx,
            scratch: vec![0.0; PIECE_FLOATS],
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
        for (d, s) in dst.iter_mut().zip(tmp.iter()) {
            *d += *s;
        }
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
            let (peers, opts) = (peers.clone(), opts.clone());
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
mod tests {
    use super::*;

    /// `rank`'s seat in a ring over `peers`.
    fn seat(peers: &[String], rank: usize) -> Seat<'_> {
        Seat {
            next_peer: &peers[(rank + 1) % peers.len()],
            rank,
            world: peers.len(),
        }
    }
    use crate::comm::handshake;

    fn opts() -> RingOptions {
        test_options()
    }

    fn rings(world: usize, generation: u64) -> Vec<Ring> {
        test_rings(world, generation)
    }

    fn on_all<T: Send + 'static>(
        rings: Vec<Ring>,
        f: impl Fn(&mut Ring) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<(Ring, T)> {
        let hs: Vec<_> = rings
            .into_iter()
            .map(|mut ring| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let out = f(&mut ring);
                    (ring, out)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn input(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + rank * 13) % 101) as f32 * 0.37 - 11.0 + rank as f32 * 1e-3)
            .collect()
    }

    #[test]
    fn all_reduce_is_exact_and_identical_on_every_rank() {
        for (world, shared_memory) in [(2, true), (3, true), (4, true), (2, false), (3, false)] {
            let mut rs = test_rings_with(
                world,
                1,
                &RingOptions {
                    shared_memory,
                    ..opts()
                },
            );
            assert!(
                rs.iter()
                    .all(|r| r.tx.is_some() == shared_memory && r.rx.is_some() == shared_memory)
            );
            // Sizes that do not divide by the world size or the piece size, and 0 / 1.
            for n in [0, 1, 3, 5, 1001, PIECE_FLOATS + 3, 3 * PIECE_FLOATS + 17] {
                let out = on_all(rs, move |ring| {
                    let mut b = input(ring.rank(), n);
                    ring.all_reduce_sum(&mut b).unwrap();
                    b
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, n)).collect();
                let expected: Vec<f64> = (0..n)
                    .map(|i| inputs.iter().map(|x| x[i] as f64).sum())
                    .collect();
                for (_, got) in &out {
                    assert_eq!(got.len(), n);
                    for (g, e) in got.iter().zip(&expected) {
                        assert!(
                            (*g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                            "world {world} n {n}"
                        );
                    }
                    // Bitwise the same everywhere.
                    assert_eq!(bytes(got), bytes(&out[0].1));
                }
                rs = out.into_iter().map(|(r, _)| r).collect();
            }
        }
    }

    /// Shared-memory files still in `/dev/shm` from this process.
    fn our_shm_files() -> Vec<String> {
        let ours = format!("stackwise-ring-{}-", std::process::id());
        std::fs::read_dir("/dev/shm")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&ours))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_rank_without_shared_memory_keeps_its_links_on_tcp_and_the_sums_agree() {
        // Rank 1 of 3 has STACKWISE_RING_SHM=0: the links 0 -> 1 and 1 -> 2 stay on TCP,
        // 2 -> 0 goes through shared memory; one ring mixes both.
        let listeners: Vec<_> = (0..3)
            .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let o = RingOptions {
                        shared_memory: rank != 1,
                        ..opts()
                    };
                    Ring::connect(&l, seat(&peers, rank), 7, 1, &o, Default::default()).unwrap()
                })
            })
            .collect();
        let rs: Vec<Ring> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        let links: Vec<(bool, bool)> = rs
            .iter()
            .map(|r| (r.tx.is_some(), r.rx.is_some()))
            .collect();
        assert_eq!(links, [(false, true), (false, false), (true, false)]);
        // Each file is removed as soon as its link has formed.
        assert!(our_shm_files().is_empty(), "{:?}", our_shm_files());
        let n = 2 * PIECE_FLOATS + 9;
        let out = on_all(rs, move |ring| {
            let mut b = input(ring.rank(), n);
            ring.all_reduce_sum(&mut b).unwrap();
            let mut c = if ring.rank() == 1 {
                input(5, n)
            } else {
                vec![0.0; n]
            };
            ring.broadcast(&mut c, 1).unwrap();
            (b, c)
        });
        let inputs: Vec<Vec<f32>> = (0..3).map(|r| input(r, n)).collect();
        let want: Vec<f32> = (0..n).map(|i| inputs.iter().map(|x| x[i]).sum()).collect();
        for (_, (b, c)) in &out {
            for (g, e) in b.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0));
            }
            assert_eq!(bytes(b), bytes(&out[0].1.0));
            assert_eq!(c, &input(5, n));
        }
    }

    #[test]
    fn all_reduce_is_deterministic_across_repeats() {
        let n = 2 * PIECE_FLOATS + 5;
        let mut rs = rings(3, 1);
        let mut first: Option<Vec<f32>> = None;
        for _ in 0..4 {
            let out = on_all(rs, move |ring| {
                let mut b: Vec<f32> = input(ring.rank(), n)
                    .iter()
                    .map(|x| x * 1.000_123)
                    .collect();
                ring.all_reduce_sum(&mut b).unwrap();
                b
            });
            let got = out[0].1.clone();
            if let Some(f) = &first {
                assert_eq!(bytes(f), bytes(&got));
            }
            first = Some(got);
            rs = out.into_iter().map(|(r, _)| r).collect();
        }
    }

    #[test]
    fn broadcast_and_barrier() {
        for world in 2..=4 {
            let rs = rings(world, 3);
            let out = on_all(rs, move |ring| {
                let root = world - 1;
                let mut b = if ring.rank() == root {
                    input(9, 70_000)
                } else {
                    vec![0.0; 70_000]
                };
                ring.broadcast(&mut b, root).unwrap();
                ring.barrier().unwrap();
                b
            });
            for (_, b) in &out {
                assert_eq!(b, &input(9, 70_000));
            }
        }
    }

    /// Connections a listener must drop: idle, garbage, a stale generation's hello, and a
    /// current hello with the wrong key.
    fn strangers(addr: SocketAddr) -> Vec<std::thread::JoinHandle<()>> {
        let stale = Hello {
            run_tag: 7,
            generation: 1,
            from_rank: 1,
            world: 2,
        };
        let current = Hello {
            generation: 2,
            ..stale
        };
        let wrong_key = RingKey::derive(Some("not the job token"), b"generation nonce");
        let mut out = Vec::new();
        out.push(std::thread::spawn(move || {
            let _idle = TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_secs(1));
        }));
        out.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&[0x5a; 4096]);
        }));
        out.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = handshake::dial(&mut s, &opts().key, &stale);
        }));
        out.push(std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            assert!(handshake::dial(&mut s, &wrong_key, &current).is_err());
        }));
        out
    }

    #[test]
    fn strangers_and_stale_peers_on_the_port_are_dropped_and_the_ring_still_forms() {
        let l = RingListener::bind("127.0.0.1:0").unwrap();
        let other = RingListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![
            l.local_addr().unwrap().to_string(),
            other.local_addr().unwrap().to_string(),
        ];
        // They knock before rank 1 does, and stay connected while the ring forms.
        let knocks = strangers(l.local_addr().unwrap());
        std::thread::sleep(Duration::from_millis(100));
        let p2 = peers.clone();
        let h = std::thread::spawn(move || {
            Ring::connect(&other, seat(&p2, 1), 7, 2, &opts(), Default::default()).unwrap()
        });
        let started = Instant::now();
        let mut r0 = Ring::connect(&l, seat(&peers, 0), 7, 2, &opts(), Default::default()).unwrap();
        // Not held up by the idle connection's handshake deadline.
        assert!(started.elapsed() < handshake::HANDSHAKE_TIMEOUT);
        let mut r1 = h.join().unwrap();
        let t = std::thread::spawn(move || {
            let mut b = vec![1.0f32; 10];
            r1.all_reduce_sum(&mut b).unwrap();
            b
        });
        let mut b = vec![2.0f32; 10];
        r0.all_reduce_sum(&mut b).unwrap();
        assert_eq!(b, vec![3.0; 10]);
        assert_eq!(t.join().unwrap(), vec![3.0; 10]);
        for k in knocks {
            k.join().unwrap();
        }
    }

    #[test]
    fn a_ring_with_the_wrong_key_never_forms() {
        let l = RingListener::bind("127.0.0.1:0").unwrap();
        let other = RingListener::bind("127.0.0.1:0").unwrap();
        let peers = vec![
            l.local_addr().unwrap().to_string(),
            other.local_addr().unwrap().to_string(),
        ];
        let quick = |token: &str| RingOptions {
            key: RingKey::derive(Some(token), b"generation nonce"),
            connect_timeout: Duration::from_secs(2),
            ..opts()
        };
        let p2 = peers.clone();
        let h = std::thread::spawn(move || {
            Ring::connect(&other, seat(&p2, 1), 7, 2, &quick("b"), Default::default()).is_err()
        });
        assert!(Ring::connect(&l, seat(&peers, 0), 7, 2, &quick("a"), Default::default()).is_err());
        assert!(h.join().unwrap());
    }

    #[test]
    fn ranks_out_of_step_fail_with_both_collectives_named() {
        let mut rs = rings(2, 1);
        let mut r1 = rs.pop().unwrap();
        let mut r0 = rs.pop().unwrap();
        let t = std::thread::spawn(move || r1.broadcast(&mut [0.0; 10], 0));
        let e0 = r0.all_reduce_sum(&mut [1.0; 12]);
        let e1 = t.join().unwrap().unwrap_err().to_string();
        assert!(e0.is_err());
        assert!(
            e1.contains("rank 0 is at collective #1 (an all-reduce of 12 floats), rank 1 at collective #1 (a broadcast from rank 0 of 10 floats)"),
            "{e1}"
        );
    }

    #[test]
    fn a_rank_that_never_joins_the_collective_times_out_instead_of_hanging() {
        let quick = RingOptions {
            collective_timeout: Duration::from_millis(300),
            ..opts()
        };
        let mut rs = test_rings_with(2, 1, &quick);
        let _idle = rs.pop().unwrap();
        let mut r0 = rs.pop().unwrap();
        let started = Instant::now();
        let e = r0.all_reduce_sum(&mut [1.0; 100]).unwrap_err();
        assert!(matches!(e, CommError::Timeout(_)), "{e}");
        assert!(e.to_string().contains(COLLECTIVE_TIMEOUT_ENV));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_dead_peer_fails_the_collective_instead_of_hanging() {
        for shared_memory in [true, false] {
            let mut rs = test_rings_with(
                3,
                1,
                &RingOptions {
                    shared_memory,
                    ..opts()
                },
            );
            let dead = rs.pop().unwrap();
            drop(dead);
            let started = Instant::now();
            let out = on_all(rs, |ring| {
                let mut b = vec![1.0f32; 300_000];
                ring.all_reduce_sum(&mut b).is_err()
            });
            assert!(out.iter().all(|(_, failed)| *failed));
            // Noticed from the sockets, long before the 20 s collective timeout.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "shared memory: {shared_memory}"
            );
        }
    }

    #[test]
    fn a_peer_that_dies_in_the_middle_of_a_collective_fails_it() {
        // Rank 1 takes part in the frame exchange, then stops reading and closes: rank 0's
        // writer is left waiting for free slots (or socket space) that never come.
        for shared_memory in [true, false] {
            let mut rs = test_rings_with(
                2,
                1,
                &RingOptions {
                    shared_memory,
                    ..opts()
                },
            );
            let r1 = rs.pop().unwrap();
            let mut r0 = rs.pop().unwrap();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                drop(r1);
            });
            let started = Instant::now();
            let e = r0
                .all_reduce_sum(&mut vec![1.0f32; 40 * PIECE_FLOATS])
                .unwrap_err();
            t.join().unwrap();
            assert!(matches!(e, CommError::Io(_)), "{e}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "shared memory: {shared_memory}"
            );
        }
    }

    #[test]
    fn abort_unblocks_a_waiting_rank() {
        let mut rs = rings(2, 1);
        let _idle = rs.pop().unwrap(); // never joins the collective
        let mut r0 = rs.pop().unwrap();
        let abort = r0.abort_handle();
        let t = std::thread::spawn(move || r0.all_reduce_sum(&mut vec![1.0f32; 4_000_000]));
        std::thread::sleep(Duration::from_millis(200));
        abort.abort();
        assert!(matches!(t.join().unwrap(), Err(CommError::Aborted)));
    }
}
