//! The worker process (`stackwise worker`): registers with the coordinator, keeps its lease
//! with heartbeats, runs the stages it is told to on a training thread, streams progress,
//! and reconnects with backoff when the coordinator goes away. Work stops at once when the
//! session is lost (a worker without a lease must not keep training) or on Abort.

use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use stackwise_common::config::DeviceSpec;
use stackwise_proto::pb;

use super::client::Target;
use super::session::session;
use crate::comm::RingListener;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub target: Target,
    /// A readable name for logs and `stackwise status`.
    pub name: String,
    pub device: DeviceSpec,
    /// Where to listen for ring connections (`0.0.0.0:0`: any port).
    pub ring_bind: String,
    /// The host other workers use to reach this one (default: the address this machine uses
    /// to reach the coordinator).
    pub advertise_host: Option<String>,
    /// Give up after failing to reach the coordinator for this long.
    pub rejoin_timeout: Duration,
    /// On SIGTERM, checkpoint at a step all ranks agree on and stop the job (a second
    /// SIGTERM exits at once). Off for in-process workers, whose launcher handles signals.
    pub graceful_sigterm: bool,
}

/// Set once this worker process got SIGTERM.
#[derive(Default)]
pub(super) struct Terminate {
    pub(super) asked: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Terminate {
    pub(super) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.asked.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// A stable 64-bit tag of the run id (FNV-1a), checked in the ring handshake.
pub fn run_tag(run_id: &str) -> u64 {
    run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The local address this machine uses to reach `url`'s host (no packet is sent).
fn local_host_towards(url: &str) -> Option<String> {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let authority = rest.split('/').next()?;
    let addr = authority.to_socket_addrs().ok()?.next()?;
    let sock = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .ok()?;
    sock.connect(addr).ok()?;
    Some(sock.local_addr().ok()?.ip().to_string())
}

pub(super) fn capabilities(device: DeviceSpec) -> pb::Capabilities {
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    pb::Capabilities {
        device_kind: if device.is_cuda() { "cuda" } else { "cpu" }.into(),
        device: device.to_string(),
        memory_bytes,
        host,
        cpu_threads: rayon::current_num_threads() as u32,
    }
}

/// Errors that retrying cannot fix.
fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tonic::Status>().is_some_and(|s| {
            matches!(
                s.code(),
                tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::InvalidArgument
            ) || (s.code() == tonic::Code::FailedPrecondition
                && s.message().contains("protocol version"))
        })
    })
}

/// Run until the coordinator says Shutdown (Ok) or cannot be reached for `rejoin_timeout`.
pub async fn run_worker(opts: WorkerOptions) -> Result<()> {
    let listener = Arc::new(
        RingListener::bind(&opts.ring_bind)
            .with_context(|| format!("bind the ring listener to {}", opts.ring_bind))?,
    );
    let port = listener.local_addr()?.port();
    let host = opts
        .advertise_host
        .clone()
        .or_else(|| local_host_towards(&opts.target.url))
        .unwrap_or_else(|| "127.0.0.1".into());
    let ring_address = format!("{host}:{port}");
    let term = Arc::new(Terminate::default());
    if opts.graceful_sigterm {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listen for SIGTERM")?;
        let term = term.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                if term.asked.swap(true, Ordering::SeqCst) {
                    eprintln!("SIGTERM again: exiting without a checkpoint");
                    std::process::exit(143);
                }
                tracing::warn!(
                    "SIGTERM: asking every rank to checkpoint after the same step, then stopping"
                );
                term.notify.notify_waiters();
            }
        });
    }
    let mut backoff = Duration::from_millis(200);
    let mut failing_since: Option<Instant> = None;
    loop {
        let mut registered = false;
        if term.asked.load(Ordering::SeqCst) && !registered {
            bail!("SIGTERM while not connected to the coordinator: exiting");
        }
        match session(&opts, &listener, &ring_address, &mut registered, &term).await {
            Ok(reason) => {
                tracing::info!("shutting down: {reason}");
                return Ok(());
            }
            Err(e) if is_fatal(&e) => {
                let unauthenticated = e.chain().any(|c| {
                    c.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::Unauthenticated)
                });
                if unauthenticated {
                    bail!(
                        "the coordinator at {} refused this worker (UNAUTHENTICATED: missing or wrong token); \
                         pass the job's token with --token-file or STACKWISE_TOKEN",
                        opts.target.url
                    );
                }
                return Err(e);
            }
            Err(e) => {
                if registered {
                    failing_since = None;
                    backoff = Duration::from_millis(200);
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > opts.rejoin_timeout {
                    bail!(
                        "gave up on the coordinator at {} after {:?}: {e:#}",
                        opts.target.url,
                        opts.rejoin_timeout
                    );
                }
                tracing::warn!("coordinator session ended ({e:#}); reconnecting in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
