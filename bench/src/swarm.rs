//! Simulated workers for `bench/swarm.sh`: each is a real gRPC client of the coordinator with
//! the real token. It registers, opens its session with the hello, heartbeats at the cadence
//! the coordinator gave it, and on RunStage reports steps, checkpoints (rank 0) and StageDone
//! as a training rank would, without a model or a ring. It reconnects with the worker's own
//! [`Backoff`]. What it sees goes to the orchestrator as [`Event`]s.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use stackwise_proto::model::{Command, Fence, Report, StageDone, StepMetrics, WorkerReport};
use stackwise_proto::{PROTOCOL_VERSION, pb};
use stackwise_worker::runtime::{Backoff, Target, spread};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;

/// What the orchestrator tells one simulated worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    /// Alive but silent: no heartbeats, no reports (a hung process).
    Silent,
    /// Close the session and exit (the process died).
    Die,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Registered,
    RunStage,
    Abort,
    Shutdown,
    SessionLost,
}

#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub worker: usize,
    pub seen: Seen,
    pub at: Instant,
}

/// What every simulated worker shares.
pub struct Swarm {
    pub target: Target,
    /// Time between simulated training steps.
    pub step: Duration,
    /// Rank 0 reports a checkpoint every this many steps.
    pub checkpoint_every: u64,
    pub events: mpsc::UnboundedSender<Event>,
    /// Heartbeat round trips (heartbeat sent to its ack read), while `measuring`.
    pub heartbeat_rtt: Mutex<Vec<Duration>>,
    pub measuring: AtomicBool,
}

impl Swarm {
    fn seen(&self, worker: usize, seen: Seen) {
        let _ = self.events.send(Event {
            worker,
            seen,
            at: Instant::now(),
        });
    }
}

enum End {
    Shutdown,
    Died,
}

/// One simulated worker, until Shutdown or [`Mode::Die`].
pub async fn worker(idx: usize, swarm: Arc<Swarm>, mut mode: watch::Receiver<Mode>) {
    let mut backoff = Backoff::reconnect();
    loop {
        match session(idx, &swarm, &mut mode, &mut backoff).await {
            Ok(End::Shutdown) => return swarm.seen(idx, Seen::Shutdown),
            Ok(End::Died) => return,
            Err(_) => {
                swarm.seen(idx, Seen::SessionLost);
                tokio::time::sleep(backoff.next_wait()).await;
            }
        }
    }
}

/// The training a RunStage asked for.
struct Stage {
    fence: Fence,
    rank: u32,
    stage: u32,
    step: u64,
    until: u64,
    ticker: tokio::time::Interval,
}

fn resume_step(checkpoint: Option<&str>) -> u64 {
    checkpoint
        .and_then(|c| c.strip_prefix("step-"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn session(
    idx: usize,
    swarm: &Swarm,
    mode: &mut watch::Receiver<Mode>,
    backoff: &mut Backoff,
) -> Result<End> {
    let mut client = swarm.target.connect().await?;
    let reg = client
        .register(pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: format!("sim-{idx}"),
            capabilities: Some(pb::Capabilities {
                device_kind: "cpu".into(),
                device: "cpu".into(),
                memory_bytes: 1 << 30,
                host: "swarm".into(),
                cpu_threads: 1,
            }),
            ring_address: format!("127.0.0.1:{}", 10_000 + idx),
        })
        .await
        .context("register")?
        .into_inner();
    backoff.reset();
    swarm.seen(idx, Seen::Registered);
    let report = |generation: u64, report: Report| {
        WorkerReport {
            fence: Fence {
                run_id: reg.run_id.clone(),
                generation,
            },
            worker_id: reg.worker_id.clone(),
            report,
        }
        .into_pb()
    };
    let (up, up_rx) = mpsc::channel::<pb::WorkerMessage>(1024);
    up.send(report(
        0,
        Report::Hello {
            session_secret: reg.session_secret.clone(),
        },
    ))
    .await?;
    let mut inbound = client
        .session(ReceiverStream::new(up_rx))
        .await
        .context("open the session")?
        .into_inner();
    let every = Duration::from_millis(reg.heartbeat_ms.max(10));
    let mut heartbeat = tokio::time::interval_at(Instant::now() + spread(every), every);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut sent: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut stage: Option<Stage> = None;
    loop {
        let running = *mode.borrow() == Mode::Run;
        tokio::select! {
            biased;
            m = inbound.message() => {
                let Some(m) = m? else { bail!("the coordinator closed the session") };
                let (fence, cmd) = <(Fence, Command)>::try_from(m)?;
                match cmd {
                    Command::RunStage(rs) => {
                        let step = resume_step(rs.resume_checkpoint.as_deref());
                        let mut ticker = tokio::time::interval_at(Instant::now() + swarm.step, swarm.step);
                        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        stage = Some(Stage {
                            fence,
                            rank: rs.rank,
                            stage: rs.stage,
                            step,
                            until: rs.until_step.unwrap_or(u64::MAX),
                            ticker,
                        });
                        swarm.seen(idx, Seen::RunStage);
                    }
                    Command::Abort { .. } => {
                        stage = None;
                        swarm.seen(idx, Seen::Abort);
                    }
                    Command::Shutdown { .. } => return Ok(End::Shutdown),
                    // A graceful stop: end the stage after the next step.
                    Command::Checkpoint { .. } => {
                        if let Some(s) = &mut stage {
                            s.until = s.step + 1;
                        }
                    }
                    Command::NcclId(_) => {}
                    Command::HeartbeatAck { seq } => {
                        while let Some((s, at)) = sent.front().copied() {
                            if s > seq {
                                break;
                            }
                            sent.pop_front();
                            if s == seq && swarm.measuring.load(Ordering::Relaxed) {
                                swarm.heartbeat_rtt.lock().unwrap().push(at.elapsed());
                            }
                        }
                    }
                }
            }
            _ = mode.changed() => {
                if *mode.borrow() == Mode::Die {
                    return Ok(End::Died);
                }
            }
            _ = heartbeat.tick(), if running => {
                seq += 1;
                let step = stage.as_ref().map_or(0, |s| s.step);
                let generation = stage.as_ref().map_or(0, |s| s.fence.generation);
                sent.push_back((seq, Instant::now()));
                up.send(report(generation, Report::Heartbeat { step, seq })).await?;
            }
            _ = async { stage.as_mut().expect("guarded").ticker.tick().await }, if running && stage.is_some() => {
                let s = stage.as_mut().expect("guarded");
                s.step += 1;
                let g = s.fence.generation;
                up.send(report(g, Report::Step(StepMetrics {
                    stage: s.stage,
                    step: s.step,
                    total_steps: s.until,
                    loss: 4.0 / (1.0 + s.step as f64 / 100.0),
                    lr: 1e-3,
                    grad_norm: 1.0,
                    tokens: 1024,
                    tokens_per_s: 1024.0 / swarm.step.as_secs_f64(),
                    val_loss: None,
                    skipped: false,
                    allreduce_seconds: 0.0,
                }))).await?;
                let name = format!("step-{:08}", s.step);
                if s.rank == 0 && s.step.is_multiple_of(swarm.checkpoint_every) {
                    up.send(report(g, Report::Checkpoint { step: s.step, name: name.clone(), uri: String::new() })).await?;
                }
                if s.step >= s.until {
                    up.send(report(g, Report::StageDone(StageDone {
                        stage: s.stage,
                        step: s.step,
                        train_loss: None,
                        val_loss: None,
                        last_checkpoint: Some(name),
                        stopped_early: false,
                        stopped_on_request: false,
                    }))).await?;
                    stage = None;
                }
            }
        }
    }
}
