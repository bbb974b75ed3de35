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
    let summary = trainer.run(&opts)?;
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
