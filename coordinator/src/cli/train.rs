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
    let opts = RunOptions {
        resume: a.resume,
        until_step: a.until_step,
        progress: !a.no_progress,
        resume_from: None,
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
