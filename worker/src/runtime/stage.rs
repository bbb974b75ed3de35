//! A stage on the worker's training thread: the communicator the coordinator chose (local,
//! TCP ring, NCCL), the trainer, and the reports it streams back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stackwise_common::config::DeviceSpec;
use stackwise_common::plan::Plan;
use stackwise_proto::model::{Backend, Fence, Report, RunStage, StageDone};
use stackwise_proto::pb;
use tokio::sync::mpsc::Sender;

use crate::comm::{
    COLLECTIVE_TIMEOUT_ENV, Comm, Local, Ring, RingKey, RingListener, RingOptions, Seat,
};
use crate::train::{Aborted, RunOptions, TrainEvent, Trainer};

/// A stable 64-bit tag of the run id (FNV-1a), checked in the ring handshake.
pub fn run_tag(run_id: &str) -> u64 {
    run_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// This worker's side of the rings it joins: its listener, bound once for its life, and
/// the job token the generations' ring keys are derived from.
pub(super) struct RingSide {
    pub(super) listener: RingListener,
    pub(super) token: Option<String>,
}

/// How long a collective may wait on a peer: `STACKWISE_COLLECTIVE_TIMEOUT_S`, else 30 min
/// (long enough for the slowest checkpoint write a rank may be busy with).
fn collective_timeout() -> Result<Duration> {
    match std::env::var(COLLECTIVE_TIMEOUT_ENV) {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(Duration::from_secs_f64)
            .with_context(|| {
                format!("{COLLECTIVE_TIMEOUT_ENV}={v:?} is not a positive number of seconds")
            }),
        Err(_) => Ok(Duration::from_secs(30 * 60)),
    }
}

/// Ends the generation's communicator from another thread (ring or NCCL), so a rank
/// blocked in a collective returns at once.
type CommAbort = Arc<Mutex<Option<Box<dyn Fn() + Send>>>>;

/// The stage running on this worker's training thread.
pub(super) struct Work {
    abort: Arc<AtomicBool>,
    /// Checkpoint and stop at the next step all ranks agree on (the coordinator asked).
    pub(super) stop_request: Arc<AtomicBool>,
    comm_abort: CommAbort,
    pub(super) nccl: std::sync::mpsc::Sender<Vec<u8>>,
    thread: std::thread::JoinHandle<()>,
}

pub(super) async fn stop(work: Option<Work>) {
    let Some(w) = work else { return };
    w.abort.store(true, Ordering::SeqCst);
    if let Some(abort) = w
        .comm_abort
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        abort();
    }
    let _ = tokio::task::spawn_blocking(move || w.thread.join()).await;
}

type ReportFn = dyn Fn(u64, Report) -> pb::WorkerMessage + Send + Sync;

/// Fault injection for tests: the training thread panics once it reports this step.
pub const FAULT_ENV: &str = "STACKWISE_FAULT_PANIC_AT_STEP";

fn injected_panic_step() -> Option<u64> {
    std::env::var(FAULT_ENV).ok().and_then(|v| v.parse().ok())
}

/// The text of a panic's payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

pub(super) fn start(
    rs: RunStage,
    fence: Fence,
    device: DeviceSpec,
    ring_side: Arc<RingSide>,
    up: Sender<pb::WorkerMessage>,
    report: impl Fn(u64, Report) -> pb::WorkerMessage + Send + Sync + Clone + 'static,
    step: Arc<AtomicU64>,
) -> Work {
    let abort = Arc::new(AtomicBool::new(false));
    let stop_request = Arc::new(AtomicBool::new(false));
    let comm_abort: CommAbort = Arc::default();
    let (nccl, nccl_rx) = std::sync::mpsc::channel();
    let thread = {
        let (abort, comm_abort, stop_request) =
            (abort.clone(), comm_abort.clone(), stop_request.clone());
        let report: Arc<ReportFn> = Arc::new(report);
        std::thread::Builder::new()
            .name(format!("train-rank{}", rs.rank))
            .spawn(move || {
                let gen_ = fence.generation;
                let stage_name = rs.stage_name.clone();
                let send = |r: Report| {
                    let _ = up.blocking_send(report(gen_, r));
                };
                let fault_at = injected_panic_step();
                let run = || {
                    run_stage(
                        &rs,
                        &fence,
                        device,
                        &ring_side,
                        &abort,
                        &stop_request,
                        &comm_abort,
                        &nccl_rx,
                        &send,
                        {
                            let (up, report) = (up.clone(), report.clone());
                            Box::new(move |e| {
                                let r = match e {
                                    TrainEvent::Step(m) => {
                                        if fault_at == Some(m.step) {
                                            panic!(
                                                "injected fault at step {} ({FAULT_ENV})",
                                                m.step
                                            );
                                        }
                                        step.store(m.step, Ordering::SeqCst);
                                        Report::Step(m)
                                    }
                                    TrainEvent::Checkpoint { step, name, uri } => {
                                        Report::Checkpoint { step, name, uri }
                                    }
                                };
                                let _ = up.blocking_send(report(gen_, r));
                            })
                        },
                    )
                };
                // A panic on this thread is reported like an error, never left to hang the job.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                    .unwrap_or_else(|p| {
                        Err(anyhow::anyhow!(
                            "the training thread panicked: {}",
                            panic_message(&*p)
                        ))
                    });
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
        comm_abort,
        nccl,
        thread,
    }
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    rs: &RunStage,
    fence: &Fence,
    device: DeviceSpec,
    ring_side: &RingSide,
    abort: &Arc<AtomicBool>,
    stop_request: &Arc<AtomicBool>,
    comm_abort: &CommAbort,
    nccl_rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    send: &dyn Fn(Report),
    observer: Box<dyn FnMut(TrainEvent) + Send>,
) -> Result<StageDone> {
    let mut cfg: stackwise_common::config::TrainConfig =
        serde_yaml::from_str(&rs.config_yaml).context("the config sent by the coordinator")?;
    cfg.run.device = device.to_string();
    let rank = rs.rank as usize;
    let comm: Box<dyn Comm> = match rs.backend {
        Backend::Local => Box::new(Local),
        Backend::Ring => {
            let opts = RingOptions {
                key: RingKey::derive(ring_side.token.as_deref(), &rs.ring_nonce),
                connect_timeout: Duration::from_secs(120),
                collective_timeout: collective_timeout()?,
                shared_memory: RingOptions::shared_memory_from_env(),
            };
            let ring = Ring::connect(
                &ring_side.listener,
                Seat {
                    next_peer: &rs.next_peer,
                    rank,
                    world: rs.world_size as usize,
                },
                run_tag(&fence.run_id) ^ rs.ring_tag,
                fence.generation,
                &opts,
                abort.clone(),
            )?;
            let handle = ring.abort_handle();
            *comm_abort.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Box::new(move || handle.abort()));
            if abort.load(Ordering::SeqCst) {
                return Err(Aborted.into());
            }
            Box::new(ring)
        }
        Backend::Nccl => nccl_comm(rs, device, nccl_rx, send, comm_abort)?,
    };
    let opts = RunOptions {
        resume: false,
        until_step: rs.until_step,
        progress: false,
        resume_from: rs.resume_checkpoint.clone(),
        plan: rs
            .plan_json
            .as_deref()
            .map(Plan::from_json)
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
    device: DeviceSpec,
    nccl_rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    send: &dyn Fn(Report),
    comm_abort: &CommAbort,
) -> Result<Box<dyn Comm>> {
    use crate::comm::nccl;
    let DeviceSpec::Cuda(ordinal) = device else {
        bail!("the coordinator chose NCCL, but this worker's device is {device}");
    };
    let id = if rs.rank == 0 {
        let id = nccl::new_id()?;
        send(Report::NcclId(id.clone()));
        id
    } else {
        nccl_rx
            .recv_timeout(Duration::from_secs(120))
            .context("waiting for rank 0's NCCL id from the coordinator")?
    };
    let comm = nccl::Nccl::new(
        ordinal,
        rs.rank as usize,
        rs.world_size as usize,
        &id,
        Duration::from_secs(120),
        collective_timeout()?,
    )?;
    let handle = comm.abort_handle();
    *comm_abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move || handle.abort()));
    Ok(Box::new(comm))
}

#[cfg(not(feature = "cuda"))]
fn nccl_comm(
    _rs: &RunStage,
    _device: DeviceSpec,
    _nccl_rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    _send: &dyn Fn(Report),
    _comm_abort: &CommAbort,
) -> Result<Box<dyn Comm>> {
    bail!("the coordinator chose NCCL, but this worker was built without --features cuda")
}
