//! The worker process (`stackwise worker`): registers with the coordinator, keeps its lease
//! with heartbeats, runs the stages it is told to on a training thread, streams progress,
//! and reconnects with backoff when the coordinator goes away. Work stops at once when the
//! session is lost (a worker without a lease must not keep training) or on Abort.

pub mod client;

use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use stackwise_proto::model::{Backend, Command, Fence, Report, RunStage, StageDone, WorkerReport};
use stackwise_proto::{PROTOCOL_VERSION, pb};
use tokio::sync::mpsc::UnboundedSender;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub use client::Target;

use crate::comm::{Comm, Local, Ring, RingAbort, RingListener};
use crate::train::{Aborted, RunOptions, TrainConfig, TrainEvent, Trainer};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub target: Target,
    /// A readable name for logs and `stackwise status`.
    pub name: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
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
struct Terminate {
    asked: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Terminate {
    async fn wait(&self) {
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

fn capabilities(device: &str) -> pb::Capabilities {
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
        device_kind: if device.starts_with("cuda") {
            "cuda"
        } else {
            "cpu"
        }
        .into(),
        device: device.into(),
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

/// The stage running on this worker's training thread.
struct Work {
    abort: Arc<AtomicBool>,
    /// Checkpoint and stop at the next step all ranks agree on (the coordinator asked).
    stop_request: Arc<AtomicBool>,
    ring: Arc<Mutex<Option<RingAbort>>>,
    nccl: std::sync::mpsc::Sender<Vec<u8>>,
    thread: std::thread::JoinHandle<()>,
}

async fn stop(work: Option<Work>) {
    let Some(w) = work else { return };
    w.abort.store(true, Ordering::SeqCst);
    if let Some(r) = w.ring.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        r.abort();
    }
    let _ = tokio::task::spawn_blocking(move || w.thread.join()).await;
}

/// One registration and session. Returns the Shutdown reason, or the error that ended it.
async fn session(
    opts: &WorkerOptions,
    listener: &Arc<RingListener>,
    ring_address: &str,
    registered: &mut bool,
    term: &Terminate,
) -> Result<String> {
    let mut client = opts.target.connect().await?;
    let reg = match client
        .register(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: opts.name.clone(),
            capabilities: Some(capabilities(&opts.device)),
            ring_address: ring_address.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("job is over") => {
            return Ok(s.message().to_string());
        }
        Err(s) => return Err(anyhow::Error::new(s).context("register with the coordinator")),
    };
    *registered = true;
    tracing::info!(worker = %reg.worker_id, run = %reg.run_id, ring = %ring_address, "registered");
    let (up, up_rx) = tokio::sync::mpsc::unbounded_channel::<pb::WorkerMessage>();
    let worker_id = reg.worker_id.clone();
    let report = {
        let (run_id, worker_id) = (reg.run_id.clone(), worker_id.clone());
        move |generation: u64, report: Report| {
            WorkerReport {
                fence: Fence {
                    run_id: run_id.clone(),
                    generation,
                },
                worker_id: worker_id.clone(),
                report,
            }
            .into_pb()
        }
    };
    let _ = up.send(report(0, Report::Hello));
    let mut inbound = client
        .session(UnboundedReceiverStream::new(up_rx))
        .await
        .context("open the session stream")?
        .into_inner();

    let step = Arc::new(AtomicU64::new(0));
    let generation = Arc::new(AtomicU64::new(0));
    let heartbeat = {
        let (up, step, generation, report) =
            (up.clone(), step.clone(), generation.clone(), report.clone());
        let every = Duration::from_millis(reg.heartbeat_ms.max(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let hb = report(
                    generation.load(Ordering::SeqCst),
                    Report::Heartbeat {
                        step: step.load(Ordering::SeqCst),
                    },
                );
                if up.send(hb).is_err() {
                    return;
                }
            }
        })
    };

    let mut work: Option<Work> = None;
    let mut term_handled = false;
    let result = loop {
        let next = tokio::select! {
            m = inbound.message() => Some(m),
            _ = term.wait(), if !term_handled => None,
        };
        let Some(next) = next else {
            term_handled = true;
            match &work {
                // The ranks agree on a step in the next all-reduce, checkpoint it, and
                // report their stage done; the coordinator then stops the job.
                Some(w) => w.stop_request.store(true, Ordering::SeqCst),
                None => break Ok("SIGTERM".to_string()),
            }
            continue;
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => break Err(anyhow!("the coordinator closed the session")),
            Err(s) => break Err(anyhow::Error::new(s)),
        };
        let (fence, cmd) = match <(Fence, Command)>::try_from(msg) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("ignored an invalid command: {e}");
                continue;
            }
        };
        if fence.run_id != reg.run_id {
            tracing::warn!(run = %fence.run_id, "ignored a command for another run");
            continue;
        }
        match cmd {
            Command::RunStage(rs) => {
                stop(work.take()).await;
                generation.store(fence.generation, Ordering::SeqCst);
                tracing::info!(
                    generation = fence.generation,
                    rank = rs.rank,
                    world = rs.world_size,
                    "starting stage {}",
                    rs.stage_name
                );
                work = Some(start(
                    *rs,
                    fence,
                    opts.device.clone(),
                    listener.clone(),
                    up.clone(),
                    report.clone(),
                    step.clone(),
                ));
            }
            Command::Abort { reason } => {
                tracing::warn!(
                    generation = fence.generation,
                    "generation aborted: {reason}"
                );
                stop(work.take()).await;
            }
            Command::Shutdown { reason } => break Ok(reason),
            Command::Checkpoint { step } => {
                tracing::info!(
                    step,
                    "the coordinator asks for a checkpoint and a stop; all ranks stop after the same step"
                );
                if let Some(w) = &work {
                    w.stop_request.store(true, Ordering::SeqCst);
                }
            }
            Command::NcclId(id) => {
                if let Some(w) = &work {
                    let _ = w.nccl.send(id);
                }
            }
        }
    };
    stop(work.take()).await;
    heartbeat.abort();
    result
}

type ReportFn = dyn Fn(u64, Report) -> pb::WorkerMessage + Send + Sync;

fn start(
    rs: RunStage,
    fence: Fence,
    device: String,
    listener: Arc<RingListener>,
    up: UnboundedSender<pb::WorkerMessage>,
    report: impl Fn(u64, Report) -> pb::WorkerMessage + Send + Sync + Clone + 'static,
    step: Arc<AtomicU64>,
) -> Work {
    let abort = Arc::new(AtomicBool::new(false));
    let stop_request = Arc::new(AtomicBool::new(false));
    let ring: Arc<Mutex<Option<RingAbort>>> = Arc::default();
    let (nccl, nccl_rx) = std::sync::mpsc::channel();
    let thread = {
        let (abort, ring, stop_request) = (abort.clone(), ring.clone(), stop_request.clone());
        let report: Arc<ReportFn> = Arc::new(report);
        std::thread::Builder::new()
            .name(format!("train-rank{}", rs.rank))
            .spawn(move || {
                let gen_ = fence.generation;
                let stage_name = rs.stage_name.clone();
                let send = |r: Report| {
                    let _ = up.send(report(gen_, r));
                };
                let result = run_stage(
                    &rs,
                    &fence,
                    &device,
                    &listener,
                    &abort,
                    &stop_request,
                    &ring,
                    &nccl_rx,
                    &send,
                    {
                        let (up, report) = (up.clone(), report.clone());
                        Box::new(move |e| {
                            let r = match e {
                                TrainEvent::Step(m) => {
                                    step.store(m.step, Ordering::SeqCst);
                                    Report::Step(m)
                                }
                                TrainEvent::Checkpoint { step, name, uri } => {
                                    Report::Checkpoint { step, name, uri }
                                }
                            };
                            let _ = up.send(report(gen_, r));
                        })
                    },
                );
                match result {
                    Ok(done) => {
                        tracing::info!(step = done.step, "stage {stage_name} done");
                        send(Report::StageDone(done));
                    }
                    Err(_) if abort.load(Ordering::SeqCst) => {
                        tracing::info!("stopped: the generation was aborted");
                    }
                    Err(e) => {
                        tracing::error!("stage failed: {e:#}");
                        send(Report::Failed {
                            message: format!("{e:#}"),
                        });
                    }
                }
            })
            .expect("spawn the training thread")
    };
    Work {
        abort,
        stop_request,
        ring,
        nccl,
        thread,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    rs: &RunStage,
    fence: &Fence,
    device: &str,
    listener: &RingListener,
    abort: &Arc<AtomicBool>,
    stop_request: &Arc<AtomicBool>,
    ring_slot: &Mutex<Option<RingAbort>>,
    nccl_rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    send: &dyn Fn(Report),
    observer: Box<dyn FnMut(TrainEvent) + Send>,
) -> Result<StageDone> {
    let mut cfg: TrainConfig =
        serde_yaml::from_str(&rs.config_yaml).context("the config sent by the coordinator")?;
    cfg.run.device = device.to_string();
    let rank = rs.rank as usize;
    let comm: Box<dyn Comm> = match rs.backend {
        Backend::Local => Box::new(Local),
        Backend::Ring => {
            let ring = Ring::connect(
                listener,
                &rs.peers,
                rank,
                run_tag(&fence.run_id) ^ rs.ring_tag,
                fence.generation,
                Duration::from_secs(120),
                abort.clone(),
            )?;
            *ring_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(ring.abort_handle());
            if abort.load(Ordering::SeqCst) {
                return Err(Aborted.into());
            }
            Box::new(ring)
        }
        Backend::Nccl => nccl_comm(rs, device, nccl_rx, send)?,
    };
    let opts = RunOptions {
        resume: false,
        until_step: rs.until_step,
        progress: false,
        resume_from: rs.resume_checkpoint.clone(),
        plan: rs
            .plan_json
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .context("the stage plan sent by the coordinator")?,
    };
    let mut trainer = Trainer::with_comm(cfg, &opts, comm)?;
    trainer.set_abort(abort.clone());
    trainer.set_stop_request(stop_request.clone());
    trainer.set_observer(observer);
    let s = trainer.run(&opts)?;
    Ok(StageDone {
        stage: rs.stage,
        step: s.step,
        train_loss: s.train_loss,
        val_loss: s.val_loss,
        last_checkpoint: s.last_checkpoint,
        stopped_early: s.stopped_early,
        stopped_on_request: s.stopped_on_request,
    })
}

/// Rank 0 makes the NCCL unique id and sends it up; the coordinator relays it to the other
/// ranks, which wait for it here.
#[cfg(feature = "cuda")]
fn nccl_comm(
    rs: &RunStage,
    device: &str,
    nccl_rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    send: &dyn Fn(Report),
) -> Result<Box<dyn Comm>> {
    use crate::comm::nccl;
    let ordinal: usize = device
        .strip_prefix("cuda:")
        .map_or(Ok(0), str::parse)
        .with_context(|| format!("device {device:?}: use cuda:N"))?;
    let id = if rs.rank == 0 {
        let id = nccl::new_id()?;
        send(Report::NcclId(id.clone()));
        id
    } else {
        nccl_rx
            .recv_timeout(Duration::from_secs(120))
            .context("waiting for rank 0's NCCL id from the coordinator")?
    };
    Ok(Box::new(nccl::Nccl::new(
        ordinal,
        rs.rank as usize,
        rs.world_size as usize,
        &id,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_comm(
    _rs: &RunStage,
    _device: &str,
    _nccl_rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    _send: &dyn Fn(Report),
) -> Result<Box<dyn Comm>> {
    bail!("the coordinator chose NCCL, but this worker was built without --features cuda")
}
