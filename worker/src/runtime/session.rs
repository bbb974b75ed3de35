//! One session with the coordinator: register, open the session stream, send heartbeats,
//! and carry out its commands (RunStage, Abort, Checkpoint, NcclId, Shutdown).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use stackwise_proto::model::{Command, Fence, JobEnd, Report, WorkerReport};
use stackwise_proto::{PROTOCOL_VERSION, pb};
use tokio::sync::mpsc::error::TrySendError;
use tokio_stream::wrappers::ReceiverStream;

use super::options::{Terminate, WorkerOptions, capabilities};
use super::stage::{RingSide, Work, start, stop};

/// Messages queued for the coordinator at most.
const UPLINK_CAPACITY: usize = 1024;

/// One registration and session. Returns the Shutdown (reason, how the job ended), or the
/// error that ended it.
pub(super) async fn session(
    opts: &WorkerOptions,
    ring_side: &Arc<RingSide>,
    ring_address: &str,
    registered: &mut bool,
    term: &Terminate,
) -> Result<(String, JobEnd)> {
    let mut client = opts.target.connect().await?;
    let reg = match client
        .register(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: opts.name.clone(),
            capabilities: Some(capabilities(opts.device)),
            ring_address: ring_address.to_string(),
        })
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("job is over") => {
            // "the job is over: finished|stopped|failed" (ProtoError::JobOver).
            let end = match s.message().rsplit(": ").next() {
                Some("finished") => JobEnd::Finished,
                Some("stopped") => JobEnd::Stopped,
                _ => JobEnd::Failed,
            };
            return Ok((s.message().to_string(), end));
        }
        Err(s) => return Err(anyhow::Error::new(s).context("register with the coordinator")),
    };
    *registered = true;
    tracing::info!(worker = %reg.worker_id, run = %reg.run_id, ring = %ring_address, "registered");
    // Bounded: a stalled stream holds back the training thread's reports (it waits) and
    // drops heartbeats, instead of queueing without limit.
    let (up, up_rx) = tokio::sync::mpsc::channel::<pb::WorkerMessage>(UPLINK_CAPACITY);
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
    let _ = up.try_send(report(
        0,
        Report::Hello {
            session_secret: reg.session_secret.clone(),
        },
    ));
    let mut inbound = client
        .session(ReceiverStream::new(up_rx))
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
            // A random phase: workers that registered together spread their heartbeats.
            let mut next = tokio::time::Instant::now() + super::backoff::spread(every);
            for seq in 1.. {
                tokio::time::sleep_until(next).await;
                next += every;
                let hb = report(
                    generation.load(Ordering::SeqCst),
                    Report::Heartbeat {
                        step: step.load(Ordering::SeqCst),
                        seq,
                    },
                );
                match up.try_send(hb) {
                    Ok(()) | Err(TrySendError::Full(_)) => {}
                    Err(TrySendError::Closed(_)) => return,
                }
            }
        })
    };

    // The coordinator answers every heartbeat. Unanswered for a whole lease, it has dropped
    // this worker (or hangs): a worker without a lease must not keep training.
    let lease = Duration::from_millis(reg.lease_ms.max(1));
    let mut last_ack = tokio::time::Instant::now();
    let mut lease_check = tokio::time::interval(lease / 4);
    let mut work: Option<Work> = None;
    let mut term_handled = false;
    let result = loop {
        let next = tokio::select! {
            // Messages first: acks that queued while this loop waited (e.g. for a stage
            // to stop) count before the lease is checked.
            biased;
            m = inbound.message() => Some(m),
            _ = term.wait(), if !term_handled => None,
            _ = lease_check.tick() => {
                if last_ack.elapsed() > lease {
                    break Err(anyhow!(
                        "the coordinator answered no heartbeat for {lease:?} (the lease): it has dropped this worker or hangs"
                    ));
                }
                continue;
            }
        };
        let Some(next) = next else {
            term_handled = true;
            match &work {
                // The ranks agree on a step in the next all-reduce, checkpoint it, and
                // report their stage done; the coordinator then stops the job.
                Some(w) => w.stop_request.store(true, Ordering::SeqCst),
                None => break Ok(("SIGTERM while no stage ran".to_string(), JobEnd::Stopped)),
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
                    opts.device,
                    ring_side.clone(),
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
            Command::Shutdown { reason, end } => break Ok((reason, end)),
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
            Command::HeartbeatAck { .. } => last_ack = tokio::time::Instant::now(),
        }
    };
    stop(work.take()).await;
    heartbeat.abort();
    result
}
