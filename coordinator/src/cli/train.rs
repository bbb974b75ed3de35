//! `stackwise train CONFIG.yaml`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use stackwise_common::config::{apply_env, apply_sets};
use stackwise_worker::train::{RunOptions, TrainConfig, Trainer};

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

/// Read the YAML file and apply `STACKWISE_*` env vars and `--set` overrides.
pub fn load_config(path: &PathBuf, sets: &[String]) -> Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    let mut raw: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    if raw.is_null() {
        raw = serde_yaml::Value::Mapping(Default::default());
    }
    let applied = apply_env(&mut raw, std::env::vars())?;
    if !applied.is_empty() {
        tracing::info!(
            ?applied,
            "config keys set from STACKWISE_* environment variables"
        );
    }
    apply_sets(&mut raw, sets)?;
    let mut cfg: TrainConfig = serde_yaml::from_value(raw)
        .with_context(|| format!("invalid config {}", path.display()))?;
    if cfg.run.name == "run" {
        // Default run name: the config file's stem.
        cfg.run.name = path
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().to_string());
    }
    Ok(cfg)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = load_config(&a.config, &a.sets)?;
    let opts = RunOptions {
        resume: a.resume,
        until_step: a.until_step,
        progress: !a.no_progress,
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
