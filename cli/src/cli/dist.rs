//! The distributed commands: `coordinator`, `worker`, `launch`, `status`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use stackwise_common::config::{DeviceSpec, load_config};
use stackwise_coordinator::{Coordinator, GroupOptions, Phase, TlsFiles, job_spec};
use stackwise_proto::pb;
use stackwise_worker::runtime::{Target, WorkerOptions, run_worker};
use tokio::time::Duration;

use super::args::{CoordinatorTarget, LossArgs, OutputArgs, Overrides, ResumeArgs};
use crate::launch::{LaunchDevice, LaunchError, LaunchOptions, launch};

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// The training config (YAML); workers receive it resolved, with absolute paths.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "0.0.0.0:50051")]
    pub bind: String,
    /// Start training once this many workers are registered.
    #[arg(long, default_value_t = 1)]
    pub min_workers: usize,
    /// Use at most this many workers (default: min-workers).
    #[arg(long)]
    pub max_workers: Option<usize>,
    /// Once min-workers are there, wait this long for more before starting.
    #[arg(long, default_value_t = 2000)]
    pub rendezvous_grace_ms: u64,
    /// File holding the shared token (else STACKWISE_TOKEN). Every RPC must carry it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve without a token (trusted networks only).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// TLS certificate (PEM); with --tls-key, the coordinator serves https.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often workers send heartbeats.
    #[arg(long, default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// Also serve /metrics (Prometheus text) and /healthz over HTTP here, e.g. 0.0.0.0:9090.
    #[arg(long)]
    pub http_bind: Option<String>,
    #[command(flatten)]
    pub loss: LossArgs,
    #[command(flatten)]
    pub run: ResumeArgs,
}

pub fn run_coordinator(a: CoordinatorArgs) -> Result<()> {
    let token = Target::token_from(a.token_file.as_deref())?;
    if token.is_none() && !a.insecure_no_auth {
        bail!(
            "no token: pass --token-file FILE or set STACKWISE_TOKEN (or --insecure-no-auth on a trusted network)"
        );
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(TlsFiles {
            cert_pem: std::fs::read(c).with_context(|| format!("read {}", c.display()))?,
            key_pem: std::fs::read(k).with_context(|| format!("read {}", k.display()))?,
        }),
        _ => None,
    };
    let cfg = load_config(&a.config, &a.overrides.sets)?;
    let spec = job_spec(
        cfg,
        GroupOptions {
            min_workers: a.min_workers,
            max_workers: a.max_workers.unwrap_or(a.min_workers),
            lease: a.loss.lease(),
            heartbeat: Duration::from_millis(a.heartbeat_ms),
            rendezvous_grace: Duration::from_millis(a.rendezvous_grace_ms),
            resume: a.run.resume,
            on_worker_loss: a.loss.on_worker_loss,
            until_step: a.run.until_step,
        },
    )?;
    let run_id = spec.run_id.clone();
    let run_uri = spec.run_uri.clone();
    runtime()?.block_on(async move {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let coord = Coordinator::start(spec, &a.bind, token, tls).await?;
        eprintln!(
            "coordinator for run {run_id} listening on {scheme}://{} (waiting for {} worker(s))",
            coord.addr, a.min_workers
        );
        if let Some(bind) = &a.http_bind {
            let (addr, _) = stackwise_coordinator::http::serve(coord.shared.clone(), bind).await?;
            eprintln!("coordinator dashboard on http://{addr}/ (metrics: /metrics)");
        }
        // SIGINT or SIGTERM: checkpoint at a step all workers agree on, then stop; a second
        // SIGINT stops at once.
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut asked = false;
        let phase = loop {
            tokio::select! {
                p = coord.wait_over() => break p,
                _ = sigint.recv() => {
                    if asked {
                        coord.stop_job("interrupted (Ctrl-C twice)".into());
                    } else {
                        eprintln!("coordinator: interrupted; checkpointing, then stopping (Ctrl-C again: stop now)");
                        coord.checkpoint_and_stop("interrupted (Ctrl-C)".into());
                        asked = true;
                    }
                }
                _ = sigterm.recv(), if !asked => {
                    eprintln!("coordinator: SIGTERM; checkpointing, then stopping");
                    coord.checkpoint_and_stop("terminated (SIGTERM)".into());
                    asked = true;
                }
            }
        };
        let status = coord.status();
        coord.shutdown(Duration::from_secs(10)).await;
        crate::plot::write_into_run(&run_uri);
        match phase {
            Phase::Finished => {
                eprintln!(
                    "done: run {run_id} | step {} | loss {:.4}",
                    status.step, status.loss
                );
                Ok(())
            }
            Phase::Failed(m) | Phase::Stopped(m) => bail!("{m}"),
            _ => Ok(()),
        }
    })
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub target: CoordinatorTarget,
    /// Name shown in logs and `stackwise status` (default: worker-N from JOB_COMPLETION_INDEX
    /// or RANK, else host name and pid).
    #[arg(long, env = "STACKWISE_WORKER_NAME")]
    pub name: Option<String>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu", env = "STACKWISE_DEVICE")]
    pub device: DeviceSpec,
    /// Where to accept ring connections from the previous rank.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub ring_bind: String,
    /// Host other workers use to reach this one (default: this machine's address toward the coordinator).
    #[arg(long)]
    pub advertise_host: Option<String>,
    /// Give up after this many seconds without reaching the coordinator.
    #[arg(long, default_value_t = 300)]
    pub rejoin_timeout_s: u64,
}

pub fn run_worker_cmd(a: WorkerArgs) -> Result<()> {
    let target = a.target.target()?;
    let name = a
        .name
        .unwrap_or_else(|| super::args::default_worker_name(|k| std::env::var(k).ok()));
    runtime()?.block_on(run_worker(WorkerOptions {
        target,
        name,
        device: a.device,
        ring_bind: a.ring_bind,
        advertise_host: a.advertise_host,
        rejoin_timeout: Duration::from_secs(a.rejoin_timeout_s),
        graceful_sigterm: true,
    }))
}

#[derive(Args)]
pub struct LaunchArgs {
    /// The training config (YAML).
    pub config: PathBuf,
    /// Number of workers (with --device cuda: one per GPU).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[arg(long, value_enum, default_value_t = LaunchDevice::Cpu)]
    pub device: LaunchDevice,
    /// Run the coordinator and workers as tasks of this process (for a debugger).
    #[arg(long)]
    pub in_process: bool,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(flatten)]
    pub run: ResumeArgs,
    /// CPU threads per worker (default: this machine's threads / workers).
    #[arg(long)]
    pub threads_per_worker: Option<usize>,
    #[command(flatten)]
    pub loss: LossArgs,
    /// With --on-worker-loss recover: restarts per worker.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: usize,
    /// Serve the coordinator's /metrics (Prometheus text) and /healthz here, e.g. 127.0.0.1:9090.
    #[arg(long)]
    pub http_bind: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run_launch(a: LaunchArgs) -> Result<()> {
    let opts = LaunchOptions {
        config: a.config,
        sets: a.overrides.sets,
        workers: a.workers,
        device: a.device,
        in_process: a.in_process,
        resume: a.run.resume,
        until_step: a.run.until_step,
        threads_per_worker: a.threads_per_worker,
        lease: a.loss.lease(),
        on_worker_loss: a.loss.on_worker_loss,
        max_restarts: a.max_restarts,
        progress: !a.output.no_progress,
        http_bind: a.http_bind,
    };
    let json = a.output.json;
    let result = runtime()?.block_on(launch(opts));
    match result {
        Ok(s) => {
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                eprintln!(
                    "done: run {} | {} worker(s) | step {} | loss {:.4} | val {} | {:.1} s | {} tok/s | checkpoint {}",
                    s.run_id,
                    s.workers,
                    s.step,
                    s.loss,
                    s.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                    s.seconds,
                    s.tokens_per_s.map_or("-".into(), |t| format!("{t:.0}")),
                    s.last_checkpoint.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        Err(e) => {
            if let Some(LaunchError::Interrupted { signal, .. }) = e.downcast_ref::<LaunchError>() {
                eprintln!("stopped: {e}");
                std::process::exit(128 + signal);
            }
            Err(e)
        }
    }
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: CoordinatorTarget,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_status(a: StatusArgs) -> Result<()> {
    let target = a.target.target()?;
    let s: pb::JobStatus = runtime()?.block_on(async {
        let mut c = target.connect().await?;
        anyhow::Ok(
            c.status(pb::StatusRequest {})
                .await
                .context("status")?
                .into_inner(),
        )
    })?;
    let since_ckpt = s
        .seconds_since_checkpoint
        .map_or("-".to_string(), |t| format!("{t:.0} s ago"));
    if a.json {
        println!("{}", stackwise_coordinator::job::status_json(&s));
        return Ok(());
    }
    println!(
        "run {} | {} | generation {} | stage {} | step {}/{} | loss {:.4}{} | lr {:.2e} | {:.0} tok/s{}",
        s.run_id,
        s.state,
        s.generation,
        s.stage_name,
        s.step,
        s.total_steps,
        s.loss,
        s.val_loss
            .map_or(String::new(), |v| format!(" | val {v:.4}")),
        s.lr,
        s.tokens_per_s,
        if s.message.is_empty() {
            String::new()
        } else {
            format!(" | {}", s.message)
        }
    );
    println!(
        "workers {} alive (min {}, max {}) | all-reduce {:.3} s/step | checkpoints {} committed, last {} ({since_ckpt})",
        s.workers.len(),
        s.min_workers,
        s.max_workers,
        s.allreduce_seconds,
        s.checkpoints_committed,
        if s.last_checkpoint.is_empty() {
            "-"
        } else {
            &s.last_checkpoint
        },
    );
    println!(
        "{:<8} {:<16} {:>4} {:<16} {:<8} {:<9} {:>7} {:>8} {:>9} {:>8}",
        "WORKER", "NAME", "RANK", "HOST", "DEVICE", "STATE", "STEP", "LOSS", "TOK/S", "SEEN"
    );
    for w in &s.workers {
        println!(
            "{:<8} {:<16} {:>4} {:<16} {:<8} {:<9} {:>7} {:>8.4} {:>9.0} {:>6}ms",
            w.worker_id,
            w.name,
            if w.rank < 0 {
                "-".to_string()
            } else {
                w.rank.to_string()
            },
            w.host,
            w.device,
            w.state,
            w.step,
            w.loss,
            w.tokens_per_s,
            w.last_seen_ms_ago
        );
    }
    Ok(())
}
