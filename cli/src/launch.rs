//! `stackwise launch`: the single-node debug mode. A coordinator in this process plus N
//! worker processes (or tasks with `--in-process`), their log lines prefixed with the rank,
//! one progress bar for the job, and a clean stop on Ctrl-C or a failed worker.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use indicatif::{ProgressBar, ProgressStyle};
use stackwise_worker::runtime::{Target, WorkerOptions, run_worker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Duration, Instant};

use stackwise_common::config::{DeviceSpec, load_config};
use stackwise_common::store::SECRET_ENV;
use stackwise_coordinator::{Coordinator, GroupOptions, OnWorkerLoss, Phase, Shared, job_spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LaunchDevice {
    Cpu,
    /// One worker per GPU: worker i uses cuda:i.
    Cuda,
}

#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub config: PathBuf,
    pub sets: Vec<String>,
    pub workers: usize,
    pub device: LaunchDevice,
    pub in_process: bool,
    pub resume: bool,
    pub until_step: Option<u64>,
    /// CPU threads per worker (default: the machine's threads divided among the workers).
    pub threads_per_worker: Option<usize>,
    pub lease: Duration,
    pub on_worker_loss: OnWorkerLoss,
    /// Restarts of a dead worker process (with `--on-worker-loss recover`).
    pub max_restarts: usize,
    pub progress: bool,
    /// Serve the coordinator's /metrics and /healthz here.
    pub http_bind: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LaunchSummary {
    pub run_id: String,
    pub workers: usize,
    pub step: u64,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub last_checkpoint: Option<String>,
    pub generations: u64,
    pub seconds: f64,
    /// Mean training tokens/s of all workers together (from the first to the last step).
    pub tokens_per_s: Option<f64>,
}

/// Why the job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A signal stopped the job: `signal` (2 or 15) and what happened.
    #[error("{message}")]
    Interrupted { signal: i32, message: String },
    #[error("{0}")]
    Failed(String),
}

/// Where log lines go: above the progress bar when there is one.
struct Printer {
    bar: Option<ProgressBar>,
}

impl Printer {
    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom for the job token")?;
    Ok(hex_encode(&b))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct LocalWorker {
    name: String,
    child: Option<Child>,
    pid: Option<u32>,
    restarts: usize,
}

/// "worker local-1 (rank 1, pid 4242) was killed by signal 9 (SIGKILL)".
fn died(w: &LocalWorker, rank: Option<u32>, status: std::process::ExitStatus) -> String {
    let rank = rank.map_or(String::new(), |r| format!("rank {r}, "));
    format!(
        "worker {} ({rank}pid {}) {}",
        w.name,
        w.pid.unwrap_or(0),
        exit_text(status)
    )
}

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(9)) => "was killed by signal 9 (SIGKILL)".into(),
        (None, Some(15)) => "was terminated by signal 15 (SIGTERM)".into(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "exited".into(),
    }
}

pub async fn launch(o: LaunchOptions) -> Result<LaunchSummary> {
    if o.workers == 0 {
        return Err(anyhow!("--workers must be at least 1"));
    }
    let started = Instant::now();
    let cfg = load_config(&o.config, &o.sets)?;
    // The S3 secret reaches the worker processes in their environment, never in a RunStage.
    let s3_secret = cfg.storage.as_ref().and_then(|s| s.for_workers().1);
    let spec = job_spec(
        cfg,
        GroupOptions {
            min_workers: o.workers,
            max_workers: o.workers,
            lease: o.lease,
            heartbeat: o.lease / 5,
            rendezvous_grace: Duration::ZERO,
            resume: o.resume,
            on_worker_loss: o.on_worker_loss,
            until_step: o.until_step,
        },
    )?;
    let run_id = spec.run_id.clone();
    let run_uri = spec.run_uri.clone();
    let total = spec.target_step();
    let token = random_token()?;
    let mut worker_env = vec![("STACKWISE_TOKEN", token.clone())];
    worker_env.extend(s3_secret.map(|s| (SECRET_ENV, s)));
    let coord = Coordinator::start(spec, "127.0.0.1:0", Some(token.clone()), None).await?;
    let url = format!("http://{}", coord.addr);
    let metrics = match &o.http_bind {
        Some(bind) => {
            let (addr, _) = stackwise_coordinator::http::serve(coord.shared.clone(), bind).await?;
            format!(" | dashboard http://{addr}/ | metrics http://{addr}/metrics")
        }
        None => String::new(),
    };
    coord.job().log_events = false;

    let bar = (o.progress && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    let printer = Arc::new(Printer { bar });
    printer.line(&format!(
        "launch: run {run_id} | coordinator {url}{metrics} | {} {} worker(s){}",
        o.workers,
        match o.device {
            LaunchDevice::Cpu => "CPU",
            LaunchDevice::Cuda => "CUDA",
        },
        if o.in_process { " in this process" } else { "" }
    ));

    let threads = o.threads_per_worker.unwrap_or_else(|| {
        let all = std::thread::available_parallelism().map_or(1, |n| n.get());
        (all / o.workers).max(1)
    });
    let device_of = |i: usize| match o.device {
        LaunchDevice::Cpu => DeviceSpec::Cpu,
        LaunchDevice::Cuda => DeviceSpec::Cuda(i),
    };

    let mut locals: Vec<LocalWorker> = Vec::new();
    let mut tasks = Vec::new();
    if o.in_process {
        for i in 0..o.workers {
            let opts = WorkerOptions {
                target: Target {
                    url: url.clone(),
                    token: Some(token.clone()),
                    tls_ca: None,
                },
                name: format!("local-{i}"),
                device: device_of(i),
                ring_bind: "127.0.0.1:0".into(),
                advertise_host: Some("127.0.0.1".into()),
                rejoin_timeout: Duration::from_secs(10),
                graceful_sigterm: false,
            };
            tasks.push(tokio::spawn(run_worker(opts)));
        }
    } else {
        let exe = std::env::current_exe().context("find the stackwise executable")?;
        for i in 0..o.workers {
            let mut w = LocalWorker {
                name: format!("local-{i}"),
                child: None,
                pid: None,
                restarts: 0,
            };
            spawn_worker(
                &mut w,
                &exe,
                &url,
                &worker_env,
                device_of(i),
                threads,
                &coord,
                &printer,
            )?;
            locals.push(w);
        }
    }

    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listen for SIGINT")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    // The first SIGINT or SIGTERM asks for a checkpoint and a graceful stop; a second
    // SIGINT stops at once.
    let mut interrupted: Option<i32> = None;
    let mut seen_events = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let exe = std::env::current_exe().context("find the stackwise executable")?;
    let phase = loop {
        tokio::select! {
            _ = sigint.recv() => {
                if interrupted.is_some() {
                    printer.line("launch: interrupted again; stopping the workers without a checkpoint");
                    coord.stop_job("interrupted (Ctrl-C twice)".into());
                } else {
                    interrupted = Some(2);
                    printer.line("launch: interrupted (Ctrl-C); checkpointing, then stopping (Ctrl-C again: stop now)");
                    coord.checkpoint_and_stop("interrupted (Ctrl-C)".into());
                }
            }
            _ = sigterm.recv(), if interrupted.is_none() => {
                interrupted = Some(15);
                printer.line("launch: SIGTERM; checkpointing, then stopping");
                coord.checkpoint_and_stop("terminated (SIGTERM)".into());
            }
            _ = tick.tick() => {}
        }
        // Coordinator events and progress.
        {
            let job = coord.job();
            for e in &job.events[seen_events..] {
                printer.line(&format!("[coordinator] {e}"));
            }
            seen_events = job.events.len();
        }
        let status = coord.status();
        if let Some(b) = &printer.bar {
            b.set_position(status.step);
            b.set_message(format!(
                "stage {} | loss {:.4} | {:.0} tok/s | {} worker(s), gen {}",
                status.stage_name,
                status.loss,
                status.tokens_per_s,
                status.workers.iter().filter(|w| w.rank >= 0).count(),
                status.generation
            ));
        }
        let phase = coord.phase();
        if phase.is_over() {
            break phase;
        }
        // Worker processes that died before the job was over.
        for (i, w) in locals.iter_mut().enumerate() {
            let Some(child) = &mut w.child else { continue };
            let Ok(Some(st)) = child.try_wait() else {
                continue;
            };
            let what = died(w, rank_of(&coord, &w.name), st);
            w.child = None;
            if o.on_worker_loss == OnWorkerLoss::Recover && w.restarts < o.max_restarts {
                w.restarts += 1;
                printer.line(&format!(
                    "launch: {what}; restarting it ({}/{})",
                    w.restarts, o.max_restarts
                ));
                spawn_worker(
                    w,
                    &exe,
                    &url,
                    &worker_env,
                    device_of(i),
                    threads,
                    &coord,
                    &printer,
                )?;
            } else if o.on_worker_loss == OnWorkerLoss::Stop || w.restarts >= o.max_restarts {
                coord.fail_job(format!("{what}; stopping the job"));
            }
        }
    };
    if let Some(b) = &printer.bar {
        b.finish_and_clear();
    }
    // When a worker process died, its exit status says more than the coordinator's view
    // ("its stream closed"): name it in the error. The others exit non-zero too once told
    // the job failed, so one killed by a signal is the likelier cause.
    let mut phase = phase;
    if let Phase::Failed(why) = &phase {
        let deadline = Instant::now() + Duration::from_secs(2);
        'reap: while Instant::now() < deadline {
            let mut dead: Vec<(usize, std::process::ExitStatus)> = Vec::new();
            for (i, w) in locals.iter_mut().enumerate() {
                if let Some(child) = &mut w.child
                    && let Ok(Some(st)) = child.try_wait()
                    && !st.success()
                {
                    dead.push((i, st));
                }
            }
            use std::os::unix::process::ExitStatusExt;
            if let Some(&(i, st)) = dead
                .iter()
                .find(|(_, st)| st.signal().is_some())
                .or(dead.first())
            {
                let w = &mut locals[i];
                let rank = rank_of(&coord, &w.name).or_else(|| rank_in_message(why));
                let what = died(w, rank, st);
                w.child = None;
                phase = Phase::Failed(format!("{what}; stopping the job"));
                break 'reap;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    {
        let job = coord.job();
        for e in &job.events[seen_events..] {
            printer.line(&format!("[coordinator] {e}"));
        }
    }

    // Workers got Shutdown; give them time to exit, then make sure.
    let deadline = Instant::now() + Duration::from_secs(20);
    for w in &mut locals {
        if let Some(child) = &mut w.child {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, child.wait()).await.is_err() {
                printer.line(&format!(
                    "launch: worker {} did not exit; killing it",
                    w.name
                ));
                let _ = child.kill().await;
            }
        }
    }
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(20), t).await {
            Ok(Ok(Err(e))) if phase == Phase::Finished => {
                tracing::warn!("in-process worker: {e:#}")
            }
            Err(_) => tracing::warn!("an in-process worker did not stop within 20 s"),
            _ => {}
        }
    }
    let status = coord.status();
    let (last_checkpoint, generations, tokens_per_s) = {
        let job = coord.job();
        (
            job.last_checkpoint.clone(),
            job.generations_formed,
            job.mean_tokens_per_s(),
        )
    };
    coord.shutdown(Duration::from_secs(2)).await;
    crate::plot::write_into_run(&run_uri);
    match phase {
        Phase::Finished => Ok(LaunchSummary {
            run_id,
            workers: o.workers,
            step: status.step,
            loss: status.loss,
            val_loss: status.val_loss,
            last_checkpoint,
            generations,
            seconds: started.elapsed().as_secs_f64(),
            tokens_per_s,
        }),
        Phase::Stopped(message) if interrupted.is_some() => Err(LaunchError::Interrupted {
            signal: interrupted.unwrap_or(2),
            message,
        }
        .into()),
        Phase::Failed(m) | Phase::Stopped(m) => Err(LaunchError::Failed(m).into()),
        Phase::Waiting { .. } | Phase::Running { .. } => {
            unreachable!("loop exits only when the job is over")
        }
    }
}

/// The rank in a coordinator message such as "worker w00002 (local-1, rank 1) lost: ...".
fn rank_in_message(msg: &str) -> Option<u32> {
    let rest = &msg[msg.find(", rank ")? + 7..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn rank_of(coord: &Coordinator, name: &str) -> Option<u32> {
    member_rank(&coord.shared, name).flatten()
}

/// `Some(rank)` while the worker called `name` is a member (the rank is `None` between
/// generations), `None` once it has left the job.
fn member_rank(shared: &Shared, name: &str) -> Option<Option<u32>> {
    shared
        .job()
        .members
        .members()
        .find(|m| m.name == name)
        .map(|m| m.rank)
}

#[allow(clippy::too_many_arguments)]
fn spawn_worker(
    w: &mut LocalWorker,
    exe: &std::path::Path,
    url: &str,
    env: &[(&str, String)],
    device: DeviceSpec,
    threads: usize,
    coord: &Coordinator,
    printer: &Arc<Printer>,
) -> Result<()> {
    let mut child = Command::new(exe)
        .args([
            "--threads",
            &threads.to_string(),
            "worker",
            "--coordinator",
            url,
        ])
        .args([
            "--name",
            &w.name,
            "--device",
            &device.to_string(),
            "--ring-bind",
            "127.0.0.1:0",
        ])
        .args(["--advertise-host", "127.0.0.1", "--rejoin-timeout-s", "10"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start worker {}", w.name))?;
    w.pid = child.id();
    printer.line(&format!(
        "launch: started worker {} (pid {})",
        w.name,
        w.pid.unwrap_or(0)
    ));
    let streams: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for stream in streams.into_iter().flatten() {
        let (printer, name, job) = (printer.clone(), w.name.clone(), coord.shared.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            let mut last_rank = None;
            while let Ok(Some(line)) = lines.next_line().await {
                // A worker that already left the job keeps its last rank.
                let rank = member_rank(&job, &name).unwrap_or(last_rank);
                last_rank = rank;
                let prefix = rank.map_or(format!("[{name}]"), |r| format!("[rank {r}]"));
                printer.line(&format!("{prefix} {line}"));
            }
        });
    }
    w.child = Some(child);
    Ok(())
}
