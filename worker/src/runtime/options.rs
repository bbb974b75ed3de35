//! What a worker is and how it runs: its options, the SIGTERM flag its loops watch, and the
//! capabilities it registers with.

use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stackwise_common::config::DeviceSpec;
use stackwise_proto::pb;

use super::client::Target;

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
    pub(super) notify: tokio::sync::Notify,
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

/// The local address this machine uses to reach `url`'s host (no packet is sent).
pub(super) fn local_host_towards(url: &str) -> Option<String> {
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
