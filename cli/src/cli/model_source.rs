//! `--model` for eval / generate: a Hugging Face folder, a StackWise checkpoint folder, or a
//! run folder (its newest checkpoint whose manifest verifies).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use std::collections::HashMap;

use candle_core::Tensor;
use stackwise_common::checkpoint::{CheckpointStore, LoadedCheckpoint};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::Tok;
use stackwise_worker::models::{ModelConfig, Transformer, hf};

pub struct LoadedModel {
    pub model: Transformer,
    pub tok: Tok,
    pub source: String,
}

/// Load a model and its tokenizer. `ema`: use `ema.safetensors` when the checkpoint has one.
pub fn load(path: &Path, ema: bool, device: &Device) -> Result<LoadedModel> {
    if let Some(ck) = checkpoint_folder(path)? {
        return from_checkpoint(&ck, ema, device, path.display().to_string());
    }
    if path.join("config.json").exists() {
        let cfg = hf::read_config(path)?;
        let weights = if ema && path.join("ema.safetensors").exists() {
            candle_core::safetensors::load(path.join("ema.safetensors"), device)?
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

/// A verified checkpoint's weights: `model.safetensors` (or the EMA weights) plus the frozen
/// tensors its stage shares between checkpoints.
pub fn checkpoint_weights(
    ck: &LoadedCheckpoint,
    ema: bool,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = |name: &str| {
        ck.files
            .get(name)
            .with_context(|| format!("checkpoint {} has no {name}", ck.name))
    };
    let weights_file = if ema && ck.files.contains_key("ema.safetensors") {
        "ema.safetensors"
    } else {
        "model.safetensors"
    };
    let mut weights = candle_core::safetensors::load_buffer(file(weights_file)?, device)?;
    if let Some(frozen) = ck.files.get("frozen.safetensors") {
        weights.extend(candle_core::safetensors::load_buffer(frozen, device)?);
    }
    Ok(weights)
}

fn from_checkpoint(
    ck: &LoadedCheckpoint,
    ema: bool,
    device: &Device,
    source: String,
) -> Result<LoadedModel> {
    let file = |name: &str| {
        ck.files
            .get(name)
            .with_context(|| format!("checkpoint {} has no {name}", ck.name))
    };
    let cfg: serde_json::Value = serde_json::from_slice(file("config.json")?)?;
    let cfg = ModelConfig::from_hf_json(&cfg)?;
    let weights = checkpoint_weights(ck, ema, device)?;
    let (model, _) =
        hf::model_from_tensors(&cfg, weights, device).with_context(|| format!("load {source}"))?;
    let inner = tokenizers::Tokenizer::from_bytes(file("tokenizer.json")?)
        .map_err(|e| anyhow::anyhow!("tokenizer.json: {e}"))?;
    Ok(LoadedModel {
        model,
        tok: Tok { inner },
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
