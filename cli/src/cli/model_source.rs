//! `--model` for eval / generate: a Hugging Face folder, a StackWise checkpoint folder, or a
//! run folder (its newest checkpoint whose manifest verifies).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use stackwise_common::checkpoint::{CheckpointStore, LoadedCheckpoint};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::Tok;
use stackwise_worker::checkpoint as layout;
use stackwise_worker::models::{ModelConfig, Transformer, hf};

pub struct LoadedModel {
    pub model: Transformer,
    pub tok: Tok,
    pub source: String,
}

/// Load a model and its tokenizer. `ema`: use the EMA weights when the checkpoint has them.
pub fn load(path: &Path, ema: bool, device: &Device) -> Result<LoadedModel> {
    if let Some(ck) = checkpoint_folder(path)? {
        return from_checkpoint(&ck, ema, device, path.display().to_string());
    }
    if path.join(layout::CONFIG).exists() {
        let cfg = ModelConfig::read_hf_dir(path)?;
        let weights = if ema && path.join(layout::EMA).exists() {
            candle_core::safetensors::load(path.join(layout::EMA), device)?
        } else {
            hf::read_safetensors_dir(path, device)?
        };
        let (model, _) = hf::model_from_tensors(&cfg, weights, device)
            .with_context(|| format!("load {}", path.display()))?;
        let tok = Tok::load(path)
            .with_context(|| format!("{}: the model folder needs its tokenizer", path.display()))?;
        return Ok(LoadedModel {
            model,
            tok,
            source: path.display().to_string(),
        });
    }
    if path.join("checkpoints").is_dir() {
        let run = Store::open(&path.to_string_lossy())?;
        let ck = CheckpointStore::new(&run)
            .load_latest()?
            .with_context(|| format!("{}: no checkpoint with a valid manifest", path.display()))?;
        let source = format!("{}/checkpoints/{}", path.display(), ck.name);
        return from_checkpoint(&ck, ema, device, source);
    }
    bail!(
        "{}: not a model folder (config.json + model.safetensors + tokenizer.json) nor a run folder (checkpoints/)",
        path.display()
    )
}

fn from_checkpoint(
    ck: &LoadedCheckpoint,
    ema: bool,
    device: &Device,
    source: String,
) -> Result<LoadedModel> {
    let cfg = layout::model_config(ck)?;
    let weights = layout::load_weights(ck, ema, device)?;
    let (model, _) =
        hf::model_from_tensors(&cfg, weights, device).with_context(|| format!("load {source}"))?;
    Ok(LoadedModel {
        model,
        tok: layout::tokenizer(ck)?,
        source,
    })
}

/// A StackWise checkpoint folder (`…/checkpoints/step-…`), loaded and verified through its
/// manifest; `None` for any other folder.
fn checkpoint_folder(path: &Path) -> Result<Option<LoadedCheckpoint>> {
    let in_checkpoints = path
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "checkpoints");
    if !in_checkpoints && !path.join("MANIFEST.json").exists() {
        return Ok(None);
    }
    if !path.join("MANIFEST.json").exists() {
        bail!(
            "{}: no MANIFEST.json, so this checkpoint is incomplete (a torn save); use an earlier one",
            path.display()
        );
    }
    // Loading checks every file's size and sha256 against the manifest.
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{}: cannot locate the checkpoint's folder", path.display())
    };
    let store = Store::open(&parent.to_string_lossy())?;
    let ck = CheckpointStore { store }
        .load(&name.to_string_lossy())
        .with_context(|| format!("load checkpoint {}", path.display()))?;
    Ok(Some(ck))
}
