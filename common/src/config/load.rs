//! From a YAML file plus overrides to a [`TrainConfig`], and the checks every entry point
//! (`train`, `coordinator`, `launch`, a worker's trainer) shares.

use std::ops::RangeInclusive;
use std::path::Path;

use anyhow::{Context, Result};

use super::overrides::{apply_env, apply_sets};
use super::train::{TrainConfig, TrainConfigError};

/// Read the YAML file and apply `STACKWISE_*` env vars and `--set` overrides.
pub fn load_config(path: &Path, sets: &[String]) -> Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read config {}", path.display()))?;
    let mut cfg = config_from_str(&text, std::env::vars(), sets)
        .with_context(|| format!("config {}", path.display()))?;
    if cfg.storage.is_some() {
        crate::store::configure_s3(cfg.storage.clone());
    }
    if cfg.run.name == "run" {
        // Default run name: the config file's stem.
        cfg.run.name = path
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().to_string());
    }
    Ok(cfg)
}

/// A config from YAML text, then `STACKWISE_*` variables of `env`, then `--set` overrides.
pub fn config_from_str(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<TrainConfig> {
    let mut raw: serde_yaml::Value = serde_yaml::from_str(text).context("parse the YAML")?;
    if raw.is_null() {
        raw = serde_yaml::Value::Mapping(Default::default());
    }
    let applied = apply_env(&mut raw, env)?;
    if !applied.is_empty() {
        tracing::info!(
            ?applied,
            "config keys set from STACKWISE_* environment variables"
        );
    }
    apply_sets(&mut raw, sets)?;
    serde_yaml::from_value(raw).context("invalid config")
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
    if let Some(s) = &mut cfg.scaffold {
        fix(&mut s.base);
        fix(&mut s.scaffold);
    }
    Ok(())
}

/// `training.batch_size` is the global batch: some world size in `workers` must divide it
/// (a coordinator checks its whole range, a trainer its actual world size).
pub fn require_world_divides_batch(
    batch: usize,
    workers: RangeInclusive<usize>,
) -> Result<(), TrainConfigError> {
    if workers.clone().any(|w| w > 0 && batch.is_multiple_of(w)) {
        return Ok(());
    }
    let (lo, hi) = (*workers.start(), *workers.end());
    let workers = if lo == hi {
        format!("the number of workers ({lo})")
    } else {
        format!("any worker count in {lo}..={hi}")
    };
    Err(TrainConfigError {
        field: "batch_size",
        msg: format!(
            "{batch} is the global batch and must divide by {workers}; change the batch size or the number of workers"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_check_names_the_batch_and_the_workers() {
        assert!(require_world_divides_batch(8, 2..=2).is_ok());
        assert!(require_world_divides_batch(6, 4..=6).is_ok());
        let one = require_world_divides_batch(6, 4..=4)
            .unwrap_err()
            .to_string();
        assert!(
            one.contains("training.batch_size: 6 is the global batch")
                && one.contains("workers (4)"),
            "{one}"
        );
        let range = require_world_divides_batch(7, 2..=6)
            .unwrap_err()
            .to_string();
        assert!(range.contains("2..=6"), "{range}");
    }
}
