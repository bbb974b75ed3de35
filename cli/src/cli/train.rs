//! `stackwise train CONFIG.yaml`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use stackwise_worker::train::{RunOptions, Trainer};

#[derive(Args)]
pub struct TrainArgs {
    /// The YAML config (see README: configuration reference).
    pub config: PathBuf,
    /// Override a config key, e.g. --set training.lr=1e-3 (repeatable; after STACKWISE_* env).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Continue the run from its newest valid checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop with a checkpoint at this step (the LR schedule still spans training.steps).
    #[arg(long, value_name = "STEP")]
    pub until_step: Option<u64>,
    /// Plain log lines even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub use stackwise_coordinator::spec::load_config;

/// The first SIGINT or SIGTERM makes the trainer checkpoint after its current step and
/// stop; a second SIGINT exits at once. Returns the signal number once one arrived.
fn stop_on_signals(trainer: &mut Trainer) -> Result<std::sync::Arc<std::sync::atomic::AtomicI32>> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use tokio::signal::unix::{SignalKind, signal};
    let flag = Arc::new(AtomicBool::new(false));
    let which = Arc::new(AtomicI32::new(0));
    trainer.set_stop_request(flag.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (f, w) = (flag, which.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let (Ok(mut int), Ok(mut term)) =
                    (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
                else {
                    return;
                };
                loop {
                    let sig = tokio::select! {
                        _ = int.recv() => 2,
                        _ = term.recv() => 15,
                    };
                    if f.swap(true, Ordering::SeqCst) && sig == 2 {
                        eprintln!("interrupted again: exiting without a checkpoint");
                        std::process::exit(130);
                    }
                    w.store(sig, Ordering::SeqCst);
                    eprintln!(
                        "signal {sig}: checkpointing after this step, then stopping (Ctrl-C again: exit now)"
                    );
                }
            })
        })?;
    Ok(which)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = load_config(&a.config, &a.sets)?;
    let plan = stackwise_coordinator::plan::plan_config(&cfg)?;
    let opts = RunOptions {
        resume: a.resume,
        until_step: a.until_step,
        progress: !a.no_progress,
        resume_from: None,
        plan: Some(plan),
    };
    let mut trainer = Trainer::new(cfg, &opts)?;
    let signal = stop_on_signals(&mut trainer)?;
    let summary = trainer.run(&opts)?;
    if summary.stopped_on_request {
        eprintln!(
            "stopped: signal {} at step {}; checkpoint {}; continue with --resume",
            signal.load(std::sync::atomic::Ordering::SeqCst),
            summary.step,
            summary.last_checkpoint.as_deref().unwrap_or("-")
        );
        std::process::exit(128 + signal.load(std::sync::atomic::Ordering::SeqCst));
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "done: step {} | train loss {} | val loss {} | {:.0} tok/s | checkpoint {}",
            summary.step,
            summary.train_loss.map_or("-".into(), |l| format!("{l:.4}")),
            summary.val_loss.map_or("-".into(), |l| format!("{l:.4}")),
            summary.tokens_per_s,
            summary
                .last_checkpoint
                .as_deref()
                .map_or("-".to_string(), |c| format!(
                    "{}/checkpoints/{c}",
                    summary.run_dir
                )),
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct PlanArgs {
    /// The YAML config.
    pub config: PathBuf,
    /// Override a config key, e.g. --set training.mode=layerwise (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the plan as JSON (what the coordinator sends the workers).
    #[arg(long)]
    pub json: bool,
}

/// `stackwise plan CONFIG`: the stage table, computed without touching data or stores.
pub fn run_plan(a: PlanArgs) -> Result<()> {
    let cfg = load_config(&a.config, &a.sets)?;
    let plan = stackwise_coordinator::plan::plan_config(&cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", stackwise_coordinator::plan::table(&plan));
    }
    Ok(())
}
