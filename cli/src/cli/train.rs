//! `stackwise train CONFIG.yaml`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use stackwise_common::config::load_config;
use stackwise_common::plan::{plan_config, table};
use stackwise_worker::train::{RunOptions, Trainer};

use super::args::{OutputArgs, Overrides, ResumeArgs};

#[derive(Args)]
pub struct TrainArgs {
    /// The YAML config (see README: configuration reference).
    pub config: PathBuf,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(flatten)]
    pub run: ResumeArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

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
    let cfg = load_config(&a.config, &a.overrides.sets)?;
    let plan = plan_config(&cfg)?;
    let opts = RunOptions {
        resume: a.run.resume,
        until_step: a.run.until_step,
        progress: !a.output.no_progress,
        resume_from: None,
        plan: Some(plan),
    };
    let mut trainer = Trainer::new(cfg, &opts)?;
    let signal = stop_on_signals(&mut trainer)?;
    let summary = trainer.run(&opts)?;
    crate::plot::write_into_run(&summary.run_dir);
    if summary.stopped_on_request {
        eprintln!(
            "stopped: signal {} at step {}; checkpoint {}; continue with --resume",
            signal.load(std::sync::atomic::Ordering::SeqCst),
            summary.step,
            summary.last_checkpoint.as_deref().unwrap_or("-")
        );
        std::process::exit(128 + signal.load(std::sync::atomic::Ordering::SeqCst));
    }
    if a.output.json {
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
    #[command(flatten)]
    pub overrides: Overrides,
    /// Print the plan as JSON (what the coordinator sends the workers).
    #[arg(long)]
    pub json: bool,
}

/// `stackwise plan CONFIG`: the stage table, computed without touching data or stores.
pub fn run_plan(a: PlanArgs) -> Result<()> {
    let cfg = load_config(&a.config, &a.overrides.sets)?;
    let plan = plan_config(&cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", table(&plan));
    }
    Ok(())
}
