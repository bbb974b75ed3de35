//! A one-way shared-memory channel between neighbouring ranks on the same machine (as NCCL's
//! SHM transport): a file in `/dev/shm` mapped by both, holding a ring of slots of one ring
//! piece each. The sender copies a piece into a free slot; the receiver adds it into (or copies
//! it to) its buffer straight from the slot. Over loopback TCP each byte is copied into the
//! kernel and out again; here it is copied once.
//!
//! The TCP connection of the ring stays open beside it. It carries each collective's frame,
//! and it is how a dead or aborted peer is noticed: while a side waits on the channel it
//! checks, every [`TICK`], that nothing arrived on the socket (a closed or reset connection
//! reads as ready), and that its own ring was not aborted.
//!
//! Forming it ([`negotiate`]): each rank offers rank + 1 a channel (the file's name and a random
//! token written in it) over their TCP connection; rank + 1 maps the file, checks the token and
//! answers yes or no. A rank in another container or on another host cannot open the file, so
//! it answers no and that link stays on TCP. The sender removes the file once answered, so
//! nothing is left in `/dev/shm` while the ring runs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use super::CommError;

/// Disables the shared-memory links (`0`): every link then goes over TCP.
pub const SHM_ENV: &str = "STACKWISE_RING_SHM";

/// Pieces in flight per link.
const SLOTS: usize = 8;
/// How often a waiting side checks the peer's socket and the abort flag.
const TICK: Duration = Duration::from_millis(20);
/// Header: magic and token at 0, the sender's count at 64, the receiver's at 128 (own lines).
const MAGIC: u64 = 0x5354_4b57_5348_4d31; // "STKWSHM1"
const HEAD_AT: usize = 64;
const TAIL_AT: usize = 128;
const DATA_AT: usize = 4096;

/// One mapped channel; the sending and receiving ends wrap it.
struct Channel {
    map: MmapMut,
    slot_floats: usize,
    /// Pieces this end has sent or taken (its own copy of HEAD or TAIL).
    count: u32,
}

impl Channel {
    fn bytes(slot_floats: usize) -> usize {
        DATA_AT + SLOTS * slot_floats * 4
    }

    fn map(file: &File, slot_floats: usize) -> std::io::Result<Self> {
        // SAFETY: the file is private to the two ranks of this link (mode 0600, removed once
        // both have mapped it); its contents are only touched through the atomics and the
        // slot hand-off protocol below.
        let map = unsafe { MmapMut::map_mut(file)? };
        if map.len() != Self::bytes(slot_floats) {
            return Err(std::io::Error::other(
                "shared-memory file has the wrong size",
            ));
        }
        Ok(Self {
            map,
            slot_floats,
            count: 0,
        })
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        // SAFETY: `at` is 8-aligned inside the page-aligned mapping, which lives as long as self.
        unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU64>() }
    }

    fn counter(&self, at: usize) -> &AtomicU32 {
        // SAFETY: as above, 4-aligned.
        unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU32>() }
    }

    fn slot(&self, count: u32) -> *mut f32 {
        let i = count as usize % SLOTS;
        // SAFETY: slot i lies inside the mapping (see `bytes`).
        unsafe {
            self.map
                .as_ptr()
                .cast_mut()
                .add(DATA_AT + i * self.slot_floats * 4)
                .cast()
        }
    }
}

/// What a waiting side checks every tick: its peer's socket and its ring's abort flag.
pub(super) struct Watch<'a> {
    pub peer: &'a TcpStream,
    pub aborted: &'a AtomicBool,
    /// No piece moving for this long is a timeout.
    pub timeout: Duration,
}

impl Watch<'_> {
    /// Wait while `blocked()` gives the value of `word` it waits to see change, sleeping on
    /// the word; return once `blocked()` gives None.
    fn until(&self, word: &AtomicU32, blocked: impl Fn() -> Option<u32>) -> Result<(), CommError> {
        let start = Instant::now();
        loop {
            // A short spin first: the other side is usually a piece's copy away.
            for _ in 0..256 {
                if blocked().is_none() {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
            let Some(seen) = blocked() else {
                return Ok(());
            };
            futex_wait(word, seen, TICK);
            if blocked().is_none() {
                return Ok(());
            }
            if self.aborted.load(Ordering::SeqCst) {
                return Err(CommError::Aborted);
            }
            // The peer writes nothing on this socket while a collective's pieces move, so
            // anything readable is a closed or reset connection, or a peer out of step. Look
            // at the channel once more after the socket: a piece sent just before its sender
            // moved on (and wrote the next frame) is already visible.
            let peer_moved = socket_ready(self.peer)?;
            if blocked().is_none() {
                return Ok(());
            }
            if peer_moved {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the neighbouring rank closed its connection",
                )
                .into());
            }
            if start.elapsed() >= self.timeout {
                return Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
            }
        }
    }
}

/// The sending end of a link (to rank + 1).
pub(super) struct ShmTx(Channel);

/// The receiving end of a link (from rank - 1).
pub(super) struct ShmRx(Channel);

impl ShmTx {
    /// Copy `piece` (at most one ring piece) into the next slot, waiting for a free one.
    pub fn send(&mut self, piece: &[f32], watch: &Watch<'_>) -> Result<(), CommError> {
        let c = &mut self.0;
        assert!(piece.len() <= c.slot_floats, "piece larger than a slot");
        let head = c.count;
        let tail = c.counter(TAIL_AT);
        watch.until(tail, || {
            let t = tail.load(Ordering::Acquire);
            (head.wrapping_sub(t) as usize >= SLOTS).then_some(t)
        })?;
        // SAFETY: the receiver is done with this slot (its count passed it) and touches it
        // again only after the release store of HEAD below.
        unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), c.slot(head), piece.len()) };
        c.count = head.wrapping_add(1);
        c.counter(HEAD_AT).store(c.count, Ordering::Release);
        futex_wake(c.counter(HEAD_AT));
        Ok(())
    }
}

impl ShmRx {
    /// Take the next piece (`dst.len()` floats): added into `dst` when `add`, else copied.
    pub fn recv(&mut self, dst: &mut [f32], add: bool, watch: &Watch<'_>) -> Result<(), CommError> {
        let c = &mut self.0;
        assert!(dst.len() <= c.slot_floats, "piece larger than a slot");
        let tail = c.count;
        let head = c.counter(HEAD_AT);
        watch.until(head, || {
            let h = head.load(Ordering::Acquire);
            (h == tail).then_some(h)
        })?;
        // SAFETY: the sender filled this slot before its release store of HEAD, which the
        // acquire load above saw, and leaves it alone until TAIL passes it.
        let src = unsafe { std::slice::from_raw_parts(c.slot(tail).cast_const(), dst.len()) };
        if add {
            super::add_assign(dst, src);
        } else {
            dst.copy_from_slice(src);
        }
        c.count = tail.wrapping_add(1);
        c.counter(TAIL_AT).store(c.count, Ordering::Release);
        futex_wake(c.counter(TAIL_AT));
        Ok(())
    }
}

/// Whether the socket has anything to read (data, end of stream or an error), without waiting.
fn socket_ready(s: &TcpStream) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n > 0 && p.revents != 0)
}

/// Sleep while `word` holds `expected`, at most `timeout` (a shared, not private, futex: the
/// word lives in a mapping two processes share).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned word and sleeps; it writes nothing. Spurious
    // returns (EAGAIN, EINTR, the timeout) are fine: callers re-check.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only wakes waiters on the word's address.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

/// The file of an offered channel; removed when dropped.
struct Offer {
    path: PathBuf,
    token: u64,
}

impl Offer {
    fn create(slot_floats: usize) -> std::io::Result<(Self, Channel)> {
        let mut token = [0u8; 8];
        getrandom::fill(&mut token).map_err(|e| std::io::Error::other(e.to_string()))?;
        let token = u64::from_le_bytes(token);
        let path = PathBuf::from(format!(
            "/dev/shm/stackwise-ring-{}-{token:016x}",
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let offer = Self { path, token };
        // From here on, dropping `offer` removes the file.
        file.set_len(Channel::bytes(slot_floats) as u64)?;
        let channel = Channel::map(&file, slot_floats)?;
        channel.word(8).store(token, Ordering::Relaxed);
        channel.word(0).store(MAGIC, Ordering::Release);
        Ok((offer, channel))
    }

    fn message(&self) -> Vec<u8> {
        let name = self.path.as_os_str().as_encoded_bytes();
        let mut m = Vec::with_capacity(name.len() + 10);
        m.extend_from_slice(&(name.len() as u16).to_le_bytes());
        m.extend_from_slice(name);
        m.extend_from_slice(&self.token.to_le_bytes());
        m
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Open the channel `prev` offered, if it is one this process can map.
fn accept(path: &[u8], token: u64, slot_floats: usize) -> Option<ShmRx> {
    let path = std::str::from_utf8(path).ok()?;
    if !path.starts_with("/dev/shm/stackwise-ring-") || path.contains("..") {
        return None;
    }
    let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
    let channel = Channel::map(&file, slot_floats).ok()?;
    let ours = channel.word(0).load(Ordering::Acquire) == MAGIC
        && channel.word(8).load(Ordering::Relaxed) == token;
    ours.then_some(ShmRx(channel))
}

/// Form the shared-memory links of a ring whose TCP connections are up: offer one to `next`,
/// answer `prev`'s offer. Each direction falls back to TCP (None) when the two ranks cannot
/// share a file, or when `enabled` is false on either side. Both ranks of a link always run
/// this exchange, so they agree on what the link is.
pub(super) fn negotiate(
    next: &mut TcpStream,
    prev: &mut TcpStream,
    enabled: bool,
    slot_floats: usize,
    deadline: Instant,
) -> Result<(Option<ShmTx>, Option<ShmRx>), CommError> {
    let offer = if enabled {
        match Offer::create(slot_floats) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::debug!("no shared-memory link to the next rank: {e}");
                None
            }
        }
    } else {
        None
    };
    match &offer {
        Some((o, _)) => next.write_all(&o.message())?,
        None => next.write_all(&0u16.to_le_bytes())?,
    }
    let left = |deadline: Instant| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| CommError::Setup("timed out forming shared-memory links".into()))
    };
    prev.set_read_timeout(Some(left(deadline)?))?;
    let mut len = [0u8; 2];
    prev.read_exact(&mut len)?;
    let len = u16::from_le_bytes(len) as usize;
    let rx = if len > 0 {
        let mut m = vec![0u8; len + 8];
        prev.read_exact(&mut m)?;
        let token = u64::from_le_bytes(m[len..].try_into().expect("8 bytes"));
        enabled
            .then(|| accept(&m[..len], token, slot_floats))
            .flatten()
    } else {
        None
    };
    prev.write_all(&[rx.is_some() as u8])?;
    next.set_read_timeout(Some(left(deadline)?))?;
    let mut yes = [0u8];
    next.read_exact(&mut yes)?;
    next.set_read_timeout(None)?;
    // The offer's file is removed here either way (Offer's drop); the mappings outlive it.
    let tx = offer
        .filter(|_| yes[0] == 1)
        .map(|(_file, channel)| ShmTx(channel));
    Ok((tx, rx))
}
