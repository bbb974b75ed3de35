//! The ring's connection handshake: both ends prove they hold the generation's ring key.
//!
//! The key is HMAC-SHA256 keyed with the job token over the generation's nonce, which the
//! coordinator draws at random for every generation and sends in `RunStage`. A connection
//! goes through three fixed-size frames:
//!
//! 1. dialer → listener: `hello` (32 bytes: magic, run tag, generation, from rank, world)
//!    and a fresh 16-byte nonce `nd`;
//! 2. listener → dialer: its own fresh nonce `nl` and `MAC("listener" ‖ hello ‖ nd ‖ nl)`;
//! 3. dialer → listener: `MAC("dialer" ‖ hello ‖ nd ‖ nl)`.
//!
//! Each side checks the other's MAC in constant time, so neither a stranger on the port nor
//! a stranger listening at a peer's address gets a ring connection, and a recorded handshake
//! cannot be replayed (the other side's nonce is new each time). Without a job token
//! (`--insecure-no-auth`) the key is derived from the nonce alone: that still keeps out
//! connections from other runs and generations, but anyone who can read the gRPC traffic
//! could forge it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::CommError;

/// "STKWRING"
const MAGIC: u64 = 0x5354_4b57_5249_4e47;
const NONCE: usize = 16;
const TAG: usize = 32;
/// Frame sizes: hello + nonce; nonce + MAC; MAC.
pub(super) const DIAL_FRAME: usize = Hello::SIZE + NONCE;
pub(super) const REPLY_FRAME: usize = NONCE + TAG;

/// How long either side waits for the other's next frame before dropping the connection.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

type HmacSha256 = Hmac<Sha256>;

/// The secret both ends of a generation's ring connections prove they hold.
#[derive(Clone)]
pub struct RingKey([u8; 32]);

impl std::fmt::Debug for RingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingKey(..)")
    }
}

impl RingKey {
    /// The key of one generation: HMAC-SHA256(job token, "stackwise ring v1" ‖ nonce).
    pub fn derive(token: Option<&str>, nonce: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(token.unwrap_or("").as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(b"stackwise ring v1");
        mac.update(nonce);
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("32-byte key");
        mac.update(label);
        for p in parts {
            mac.update(p);
        }
        mac
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; TAG] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Constant-time check of `tag`.
    fn verify(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(label, parts).verify_slice(tag).is_ok()
    }
}

/// Who a connection says it is; the listener compares it with what it expects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Hello {
    pub run_tag: u64,
    pub generation: u64,
    pub from_rank: u32,
    pub world: u32,
}

impl Hello {
    pub const SIZE: usize = 32;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.run_tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..28].copy_from_slice(&self.from_rank.to_le_bytes());
        b[28..32].copy_from_slice(&self.world.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        (u64_at(0) == MAGIC).then(|| Self {
            run_tag: u64_at(8),
            generation: u64_at(16),
            from_rank: u32_at(24),
            world: u32_at(28),
        })
    }
}

fn nonce() -> [u8; NONCE] {
    stackwise_proto::random_bytes(NONCE)
        .try_into()
        .expect("NONCE bytes")
}

/// Why a connection was dropped during its handshake (logged, never fatal to the listener).
#[derive(Debug, thiserror::Error)]
pub(super) enum Refused {
    #[error("no complete handshake frame within {HANDSHAKE_TIMEOUT:?}: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a ring hello")]
    NotAHello,
    #[error("a hello for another run, generation or rank: {0:?}")]
    Unexpected(Hello),
    #[error("the MAC does not verify (wrong job token or generation)")]
    BadMac,
}

/// The dialer's side, on a fresh connection to the next rank. On success the stream is
/// authenticated both ways.
pub(super) fn dial(s: &mut TcpStream, key: &RingKey, hello: &Hello) -> Result<(), Refused> {
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let h = hello.encode();
    let nd = nonce();
    let mut frame = [0u8; DIAL_FRAME];
    frame[..Hello::SIZE].copy_from_slice(&h);
    frame[Hello::SIZE..].copy_from_slice(&nd);
    s.write_all(&frame)?;
    let mut reply = [0u8; REPLY_FRAME];
    s.read_exact(&mut reply)?;
    let (nl, tag) = reply.split_at(NONCE);
    if !key.verify(b"listener", &[&h, &nd, nl], tag) {
        return Err(Refused::BadMac);
    }
    s.write_all(&key.tag(b"dialer", &[&h, &nd, nl]))?;
    s.set_read_timeout(None)?;
    Ok(())
}

/// The listener's side, on an accepted connection: it must say `expected` and prove the key.
pub(super) fn accept(s: &mut TcpStream, key: &RingKey, expected: &Hello) -> Result<(), Refused> {
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut frame = [0u8; DIAL_FRAME];
    s.read_exact(&mut frame)?;
    let (h, nd) = frame.split_at(Hello::SIZE);
    let hello = Hello::decode(h).ok_or(Refused::NotAHello)?;
    if hello != *expected {
        return Err(Refused::Unexpected(hello));
    }
    let nl = nonce();
    let mut reply = [0u8; REPLY_FRAME];
    reply[..NONCE].copy_from_slice(&nl);
    reply[NONCE..].copy_from_slice(&key.tag(b"listener", &[h, nd, &nl]));
    s.write_all(&reply)?;
    let mut tag = [0u8; TAG];
    s.read_exact(&mut tag)?;
    if !key.verify(b"dialer", &[h, nd, &nl], &tag) {
        return Err(Refused::BadMac);
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(())
}

/// Handshakes in progress at once on a listener; connections past it are closed at once.
const MAX_HANDSHAKES: usize = 64;

fn tune(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_nonblocking(false)?;
    Ok(())
}

/// Dial the next rank until a connection passes the handshake, the deadline passes, or
/// `cancel` is set.
pub(super) fn dial_next(
    addr: &str,
    key: &RingKey,
    hello: &Hello,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TcpStream, CommError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| CommError::Setup(format!("resolve peer {addr}: {e}")))?
        .collect();
    let mut last_refusal = None;
    loop {
        if let Some(mut s) = addrs
            .iter()
            .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
        {
            tune(&s)?;
            match dial(&mut s, key, hello) {
                Ok(()) => return Ok(s),
                Err(e) => {
                    tracing::debug!(
                        "ring: the next rank at {addr} refused or failed the handshake: {e}"
                    );
                    last_refusal = Some(e.to_string());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(CommError::Setup(format!(
                "could not connect to the next rank at {addr} in time{}",
                last_refusal.map_or(String::new(), |e| format!(" (last handshake: {e})"))
            )));
        }
        if cancel.load(Ordering::SeqCst) {
            return Err(CommError::Aborted);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Accept connections, each handshaken on a thread of its own (at most [`MAX_HANDSHAKES`]
/// at once, each bounded by the handshake deadline), until one from the previous rank
/// passes. Idle, garbage and unauthenticated connections are dropped without delaying it.
pub(super) fn accept_prev(
    listener: &TcpListener,
    key: &RingKey,
    expected: Hello,
    deadline: Instant,
    cancel: &AtomicBool,
) -> Result<TcpStream, CommError> {
    let (tx, rx) = std::sync::mpsc::channel::<TcpStream>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept() {
            Ok((s, from)) => {
                if in_flight.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
                    tracing::warn!(
                        "ring: {from} dropped: {MAX_HANDSHAKES} handshakes already in progress"
                    );
                    continue;
                }
                in_flight.fetch_add(1, Ordering::SeqCst);
                let (tx, key, in_flight) = (tx.clone(), key.clone(), in_flight.clone());
                std::thread::spawn(move || {
                    let mut s = s;
                    let ok = tune(&s)
                        .map_err(Refused::from)
                        .and_then(|()| accept(&mut s, &key, &expected));
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    match ok {
                        Ok(()) => {
                            let _ = tx.send(s);
                        }
                        Err(e) => tracing::debug!("ring: dropped a connection from {from}: {e}"),
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(s) = rx.try_recv() {
                    return Ok(s);
                }
                if cancel.load(Ordering::SeqCst) {
                    return Err(CommError::Aborted);
                }
                if Instant::now() > deadline {
                    return Err(CommError::Setup(format!(
                        "rank {} did not connect in time",
                        expected.from_rank
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    const HELLO: Hello = Hello {
        run_tag: 7,
        generation: 3,
        from_rank: 1,
        world: 2,
    };

    /// Run `accept` with `key` on one connection, the dialer's side with `dial_key`.
    fn pair(key: &RingKey, dial_key: &RingKey, said: Hello) -> (bool, bool) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dial_key = dial_key.clone();
        let d = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            dial(&mut s, &dial_key, &said).is_ok()
        });
        let (mut s, _) = l.accept().unwrap();
        let accepted = accept(&mut s, key, &HELLO).is_ok();
        drop(s);
        (accepted, d.join().unwrap())
    }

    #[test]
    fn both_ends_with_the_key_connect_and_a_wrong_key_or_hello_is_refused_by_both() {
        let key = RingKey::derive(Some("token"), b"nonce of generation 3");
        assert_eq!(pair(&key, &key, HELLO), (true, true));
        for wrong in [
            RingKey::derive(Some("other token"), b"nonce of generation 3"),
            RingKey::derive(Some("token"), b"nonce of generation 2"),
            RingKey::derive(None, b"nonce of generation 3"),
        ] {
            // The listener refuses the dialer's MAC; the dialer refuses the listener's.
            assert_eq!(pair(&key, &wrong, HELLO), (false, false));
        }
        let stale = Hello {
            generation: 2,
            ..HELLO
        };
        assert_eq!(pair(&key, &key, stale), (false, false));
    }

    #[test]
    fn idle_and_garbage_connections_are_dropped_within_the_handshake_deadline() {
        let key = RingKey::derive(Some("token"), b"n");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _idle = TcpStream::connect(addr).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let t = std::time::Instant::now();
        assert!(matches!(accept(&mut s, &key, &HELLO), Err(Refused::Io(_))));
        assert!(t.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(2));

        let mut garbage = TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0xAB; DIAL_FRAME]).unwrap();
        let (mut s, _) = l.accept().unwrap();
        assert!(matches!(
            accept(&mut s, &key, &HELLO),
            Err(Refused::NotAHello)
        ));
    }

    #[test]
    fn a_recorded_dialer_frame_cannot_be_replayed() {
        let key = RingKey::derive(Some("token"), b"n");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Record an honest handshake's frames from the dialer.
        let k = key.clone();
        let d = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            dial(&mut s, &k, &HELLO).unwrap();
        });
        let (mut s, _) = l.accept().unwrap();
        let mut first = [0u8; DIAL_FRAME];
        s.read_exact(&mut first).unwrap();
        let nl = [5u8; NONCE];
        let mut reply = [0u8; REPLY_FRAME];
        reply[..NONCE].copy_from_slice(&nl);
        reply[NONCE..].copy_from_slice(&key.tag(
            b"listener",
            &[&first[..Hello::SIZE], &first[Hello::SIZE..], &nl],
        ));
        s.write_all(&reply).unwrap();
        let mut recorded = [0u8; TAG];
        s.read_exact(&mut recorded).unwrap();
        d.join().unwrap();
        // Replay both frames to a listener, which draws a new nonce: refused.
        let r = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&first).unwrap();
            let mut reply = [0u8; REPLY_FRAME];
            s.read_exact(&mut reply).unwrap();
            let _ = s.write_all(&recorded);
        });
        let (mut s, _) = l.accept().unwrap();
        assert!(matches!(accept(&mut s, &key, &HELLO), Err(Refused::BadMac)));
        r.join().unwrap();
    }
}
