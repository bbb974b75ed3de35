//! From a YAML config and command-line flags to a `JobSpec`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use stackwise_common::checkpoint::CheckpointStore;
use stackwise_common::config::{apply_env, apply_sets};
use stackwise_common::store::Store;
use stackwise_worker::train::TrainConfig;
use tokio::time::Duration;

use crate::job::{JobSpec, OnWorkerLoss};

/// Read the YAML file and apply `STACKWISE_*` env vars and `--set` overrides.
pub fn load_config(path: &Path, sets: &[String]) -> Result<TrainConfig> {
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
    if cfg.storage.is_some() {
        stackwise_common::store::configure_s3(cfg.storage.clone());
    }
    if cfg.run.name == "run" {
        // Default run name: the config file's stem.
        cfg.run.name = path
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().to_string());
    }
    Ok(cfg)
}

/// Relative local paths become absolute, so workers started elsewhere (another directory,
/// or a machine sharing the filesystem) read and write the same places.
pub fn absolutize(cfg: &mut TrainConfig) -> Result<()> {
    let cwd = std::env::current_dir().context("current directory")?;
    let fix = |p: &mut String| {
        if !p.contains("://") && Path::new(p.as_str()).is_relative() {
            *p = cwd.join(p.as_str()).to_string_lossy().to_string();
        }
    };
    fix(&mut cfg.data.path);
    fix(&mut cfg.run.output);
    if let Some(i) = &mut cfg.init_from {
        fix(i);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct SpecOptions {
    pub min_workers: usize,
    pub max_workers: usize,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub rendezvous_grace: Duration,
    pub resume: bool,
    pub on_worker_loss: OnWorkerLoss,
    pub until_step: Option<u64>,
}

pub fn job_spec(mut cfg: TrainConfig, o: SpecOptions) -> Result<JobSpec> {
    cfg.training.validate()?;
    if o.min_workers == 0 || o.max_workers < o.min_workers {
        bail!(
            "workers: need 1 <= min_workers <= max_workers (got {}..={})",
            o.min_workers,
            o.max_workers
        );
    }
    let batch = cfg.training.batch_size;
    if !(o.min_workers..=o.max_workers).any(|w| batch.is_multiple_of(w)) {
        bail!(
            "training.batch_size ({batch}) is the global batch: no worker count in {}..={} divides it; \
             change the batch size or the number of workers",
            o.min_workers,
            o.max_workers
        );
    }
    if o.heartbeat >= o.lease {
        bail!(
            "the heartbeat interval ({:?}) must be shorter than the lease ({:?})",
            o.heartbeat,
            o.lease
        );
    }
    absolutize(&mut cfg)?;
    let run_uri = format!(
        "{}/runs/{}",
        cfg.run.output.trim_end_matches('/'),
        cfg.run.name
    );
    let run = Store::open(&cfg.run.output)?.child(&format!("runs/{}", cfg.run.name));
    let existing = CheckpointStore::new(&run).list_names()?;
    if !o.resume && !existing.is_empty() {
        bail!(
            "{} already has checkpoints ({}); pass --resume to continue it, or set run.name to start a new run",
            run.uri(),
            existing.join(", ")
        );
    }
    let plan = crate::plan::plan_config(&cfg)?;
    Ok(JobSpec {
        run_id: cfg.run.name.clone(),
        config_yaml: serde_yaml::to_string(&cfg).context("serialize the config")?,
        plan_json: serde_json::to_string(&plan)?,
        run_uri,
        total_steps: plan.total_steps(),
        batch_size: batch,
        min_workers: o.min_workers,
        max_workers: o.max_workers,
        lease: o.lease,
        heartbeat: o.heartbeat,
        rendezvous_grace: o.rendezvous_grace,
        resume: o.resume,
        on_worker_loss: o.on_worker_loss,
        until_step: o.until_step,
    })
}
