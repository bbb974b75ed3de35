//! The control plane at N workers: the real `stackwise coordinator` process against N
//! simulated workers in this process (see `stackwise_bench::swarm`).
//!   swarm --workers 1024 --stackwise target/release/stackwise --dir /tmp/swarm
//! Phases: rendezvous; steady state (heartbeat and Status latency, coordinator CPU); 1 % of
//! the workers go silent and then close their streams (detection, re-formation); the
//! coordinator is killed and restarted with --resume while the workers reconnect with their
//! backoff, and the job then runs to its end. Prints one JSON line of figures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use stackwise_bench::swarm::{Event, Mode, Seen, Swarm, worker};
use stackwise_proto::pb;
use stackwise_worker::runtime::Target;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    workers: usize,
    /// The `stackwise` binary whose coordinator is measured.
    #[arg(long)]
    stackwise: PathBuf,
    /// Scratch directory (config, token, run, coordinator logs).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Simulated time per training step.
    #[arg(long, default_value_t = 200)]
    step_ms: u64,
    /// Seconds of steady state to measure latency and CPU over.
    #[arg(long, default_value_t = 10)]
    steady_s: u64,
}

/// The coordinator process and what /proc says of it.
struct Coord {
    child: Child,
    peak_rss_kb: Arc<Mutex<u64>>,
    peak_fds: Arc<Mutex<(usize, usize)>>,
    started: Instant,
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (all fds, sockets) open in `pid`.
fn fds(pid: u32) -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let links: Vec<_> = dir
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    let sockets = links
        .iter()
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count();
    (links.len(), sockets)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = s.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

impl Coord {
    fn start(a: &Args, port: u16, min: usize, extra: &[&str], log: &str) -> Result<Self> {
        let log = std::fs::File::create(a.dir.join(log))?;
        let n = a.workers.to_string();
        let min = min.to_string();
        let child = Command::new(&a.stackwise)
            .arg("coordinator")
            .arg("--config")
            .arg(a.dir.join("swarm.yaml"))
            .arg("--token-file")
            .arg(a.dir.join("token"))
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--min-workers", &min, "--max-workers", &n])
            .args(["--on-worker-loss", "recover"])
            .args(["--lease-ms", &a.lease_ms.to_string()])
            .args(["--heartbeat-ms", &a.heartbeat_ms.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start the coordinator")?;
        let pid = child.id();
        let peak_rss_kb: Arc<Mutex<u64>> = Arc::default();
        let peak_fds: Arc<Mutex<(usize, usize)>> = Arc::default();
        let (rss, fd) = (Arc::clone(&peak_rss_kb), Arc::clone(&peak_fds));
        std::thread::spawn(move || {
            while let Some(hwm) = proc_status_kb(pid, "VmHWM:") {
                *rss.lock().unwrap() = hwm;
                let now = fds(pid);
                let mut peak = fd.lock().unwrap();
                *peak = (peak.0.max(now.0), peak.1.max(now.1));
                drop(peak);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Ok(Self {
            child,
            peak_rss_kb,
            peak_fds,
            started: Instant::now(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn peak_rss_mb(&self) -> f64 {
        *self.peak_rss_kb.lock().unwrap() as f64 / 1024.0
    }
}

/// Who has seen what, from the workers' events.
struct Watch {
    rx: mpsc::UnboundedReceiver<Event>,
    last: HashMap<(usize, SeenKey), Instant>,
}

#[derive(Hash, PartialEq, Eq, Clone, Copy)]
struct SeenKey(u8);

fn key(s: Seen) -> SeenKey {
    SeenKey(s as u8)
}

impl Watch {
    fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.last.insert((e.worker, key(e.seen)), e.at);
        }
    }

    /// When `seen` last happened to `w` at or after `since`.
    fn at(&self, w: usize, seen: Seen, since: Instant) -> Option<Instant> {
        self.last
            .get(&(w, key(seen)))
            .copied()
            .filter(|t| *t >= since)
    }

    /// Poll the events until `check` is satisfied, or fail after `limit` with what it
    /// says is still missing.
    async fn until<T>(
        &mut self,
        limit: Duration,
        check: impl Fn(&Self) -> Result<T, String>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            self.drain();
            match check(self) {
                Ok(t) => return Ok(t),
                Err(missing) if Instant::now() > deadline => bail!("{missing} within {limit:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Wait until every worker in `ws` saw `seen` at or after `since`; the latest such time.
    async fn all(
        &mut self,
        ws: &[usize],
        seen: Seen,
        since: Instant,
        limit: Duration,
    ) -> Result<Instant> {
        self.until(limit, |w| {
            let times: Vec<_> = ws.iter().map(|x| w.at(*x, seen, since)).collect();
            let missing = times.iter().filter(|t| t.is_none()).count();
            match times.into_iter().max() {
                Some(Some(t)) if missing == 0 => Ok(t),
                _ if ws.is_empty() => Ok(since),
                _ => Err(format!(
                    "{missing} of {} workers did not see {seen:?}",
                    ws.len()
                )),
            }
        })
        .await
    }

    /// The first time any worker in `ws` saw `seen` at or after `since`.
    async fn any(
        &mut self,
        ws: &[usize],
        seen: Seen,
        since: Instant,
        limit: Duration,
    ) -> Result<Instant> {
        self.until(limit, |w| {
            ws.iter()
                .filter_map(|x| w.at(*x, seen, since))
                .min()
                .ok_or_else(|| format!("no worker saw {seen:?}"))
        })
        .await
    }
}

fn percentiles(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let ms = |d: Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
    let at = |q: f64| v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)));
    serde_json::json!({
        "n": v.len(),
        "p50_ms": at(0.50).map(|d| ms(*d)),
        "p99_ms": at(0.99).map(|d| ms(*d)),
        "max_ms": v.last().map(|d| ms(*d)),
    })
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

fn write_job(dir: &Path, n: usize, survivors: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    // The global batch divides by both the full group and the survivors of the loss.
    let batch = n / gcd(n, survivors) * survivors;
    let data = dir.join("data.txt");
    std::fs::write(&data, "a tiny corpus the coordinator never reads\n")?;
    std::fs::write(
        dir.join("swarm.yaml"),
        format!(
            "run: {{name: swarm, output: {out}, seed: 1}}\n\
             model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}\n\
             data: {{path: {data}}}\n\
             training: {{steps: 1000000, batch_size: {batch}, lr: 1.0e-3, checkpoint_every: 50}}\n",
            out = dir.join("out").display(),
            data = data.display()
        ),
    )?;
    std::fs::write(dir.join("token"), stackwise_proto::random_hex(16))?;
    Ok(())
}

/// Allow as many open files as the hard limit (N sockets here, N in the coordinator).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

async fn wait_listening(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the coordinator did not listen on port {port} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let a = Args::parse();
    raise_fd_limit();
    let n = a.workers;
    let lost = (n / 100).max(1);
    let survivors_n = n - lost;
    write_job(&a.dir, n, survivors_n)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let token = std::fs::read_to_string(a.dir.join("token"))?;
    let target = Target {
        url: format!("http://127.0.0.1:{port}"),
        token: Some(token),
        tls_ca: None,
    };
    let mut coord = Coord::start(&a, port, survivors_n, &[], "coordinator-1.log")?;
    wait_listening(port, Duration::from_secs(30)).await?;

    let (tx, rx) = mpsc::unbounded_channel();
    let swarm = Arc::new(Swarm {
        target: target.clone(),
        step: Duration::from_millis(a.step_ms),
        checkpoint_every: 50,
        events: tx,
        heartbeat_rtt: Mutex::default(),
        measuring: AtomicBool::new(false),
    });
    let mut watch = Watch {
        rx,
        last: HashMap::new(),
    };
    let all: Vec<usize> = (0..n).collect();
    let mut modes = Vec::with_capacity(n);
    let t0 = Instant::now();
    for w in 0..n {
        let (mode_tx, mode_rx) = watch::channel(Mode::Run);
        modes.push(mode_tx);
        tokio::spawn(worker(w, swarm.clone(), mode_rx));
    }

    // 1. Rendezvous: from the last Register until every worker holds its RunStage.
    let last_register = watch
        .all(&all, Seen::Registered, t0, Duration::from_secs(120))
        .await?;
    let all_running = watch
        .all(&all, Seen::RunStage, t0, Duration::from_secs(120))
        .await?;
    let rendezvous = all_running.saturating_duration_since(last_register);
    eprintln!(
        "swarm N={n}: {n} registered in {:.2} s, rendezvous {:.3} s",
        secs(last_register - t0),
        secs(rendezvous)
    );

    // 2. Steady state: heartbeat round trips, Status latency, the coordinator's CPU.
    swarm.measuring.store(true, Ordering::Relaxed);
    let status_lat = Arc::new(Mutex::new(Vec::new()));
    let stop_status = Arc::new(AtomicBool::new(false));
    let poller = {
        let (lat, stop, target) = (status_lat.clone(), stop_status.clone(), target.clone());
        tokio::spawn(async move {
            let mut client = target.connect().await?;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let s = client.status(pb::StatusRequest {}).await?.into_inner();
                lat.lock().unwrap().push(t.elapsed());
                anyhow::ensure!(
                    s.workers.len() == n,
                    "status lists {} workers",
                    s.workers.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        })
    };
    let (cpu0, w0) = (cpu_seconds(coord.pid()), Instant::now());
    tokio::time::sleep(Duration::from_secs(a.steady_s)).await;
    let cpu_pct = (cpu_seconds(coord.pid()) - cpu0) / w0.elapsed().as_secs_f64() * 100.0;
    swarm.measuring.store(false, Ordering::Relaxed);
    stop_status.store(true, Ordering::Relaxed);
    poller.await??;
    let heartbeat = percentiles(std::mem::take(&mut *swarm.heartbeat_rtt.lock().unwrap()));
    let status = percentiles(std::mem::take(&mut *status_lat.lock().unwrap()));
    let swarm_fds = fds(std::process::id());

    // 3. Failure: 1 % go silent for 1 s (a hang), then close their streams (a crash).
    let victims: Vec<usize> = (0..lost).map(|i| i * n / lost + n / (2 * lost)).collect();
    let survivors: Vec<usize> = all
        .iter()
        .copied()
        .filter(|w| !victims.contains(w))
        .collect();
    for v in &victims {
        modes[*v].send(Mode::Silent)?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t_loss = Instant::now();
    for v in &victims {
        modes[*v].send(Mode::Die)?;
    }
    let detected = watch
        .any(&survivors, Seen::Abort, t_loss, Duration::from_secs(60))
        .await?;
    let reformed = watch
        .all(&survivors, Seen::RunStage, t_loss, Duration::from_secs(60))
        .await?;
    let (detect, reform) = (detected - t_loss, reformed - t_loss);
    eprintln!(
        "swarm N={n}: {lost} lost; detected in {:.3} s, re-formed in {:.3} s",
        secs(detect),
        secs(reform)
    );
    let rss1 = coord.peak_rss_mb();
    let fds1 = *coord.peak_fds.lock().unwrap();

    // 4. Reconnect storm: kill -9 and restart with --resume; the job then runs to its end.
    coord.child.kill()?;
    coord.child.wait()?;
    let t_kill = Instant::now();
    let until = "40";
    coord = Coord::start(
        &a,
        port,
        survivors_n,
        &["--resume", "--until-step", until],
        "coordinator-2.log",
    )?;
    let reconnected = watch
        .all(&survivors, Seen::RunStage, t_kill, Duration::from_secs(120))
        .await?;
    let reconnect = reconnected - coord.started;
    eprintln!(
        "swarm N={n}: coordinator restarted; group re-formed {:.3} s after the restart",
        secs(reconnect)
    );
    watch
        .all(
            &survivors,
            Seen::Shutdown,
            reconnected,
            Duration::from_secs(120),
        )
        .await
        .context("the resumed job did not run to its end")?;
    let exit = coord.child.wait()?;
    anyhow::ensure!(
        exit.success(),
        "the resumed coordinator exited with {exit} (see {})",
        a.dir.join("coordinator-2.log").display()
    );
    let rss = rss1.max(coord.peak_rss_mb());
    let fds2 = *coord.peak_fds.lock().unwrap();
    println!(
        "{}",
        serde_json::json!({
            "workers": n,
            "lease_ms": a.lease_ms,
            "heartbeat_ms": a.heartbeat_ms,
            "step_ms": a.step_ms,
            "register_all_s": secs(last_register - t0),
            "rendezvous_s": secs(rendezvous),
            "heartbeat_rtt": heartbeat,
            "status_rpc": status,
            "coordinator_cpu_pct": (cpu_pct * 10.0).round() / 10.0,
            "coordinator_peak_rss_mb": (rss * 10.0).round() / 10.0,
            "lost": lost,
            "detect_s": secs(detect),
            "reform_s": secs(reform),
            "reconnect_s": secs(reconnect),
            "coordinator_fds": fds1.0.max(fds2.0),
            "coordinator_sockets": fds1.1.max(fds2.1),
            "swarm_fds": swarm_fds.0,
            "swarm_sockets": swarm_fds.1,
            "job": format!("finished at step {until} after the restart"),
        })
    );
    Ok(())
}
