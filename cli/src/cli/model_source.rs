//! `--model` for eval / generate: a Hugging Face folder, a StackWise checkpoint folder, or a
//! run folder (its newest checkpoint whose manifest verifies).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use stackwise_common::checkpoint::{CheckpointStore, LoadedCheckpoint};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::Tok;
use stackwise_worker::adapters::PeftAdapter;
use stackwise_worker::checkpoint as layout;
use stackwise_worker::checkpoint::scaffold;
use stackwise_worker::models::fuser::FUSER_PREFIX;
use stackwise_worker::models::scaffold::SCAFFOLD_PREFIX;
use stackwise_worker::models::{Fusion, ModelConfig, Transformer, hf};

pub struct LoadedModel {
    pub model: Transformer,
    pub tok: Tok,
    pub source: String,
}

/// A model's config, weights (by the model's parameter names) and tokenizer, before the
/// model is built: what an adapter is applied to or merged into.
pub struct ModelWeights {
    pub cfg: ModelConfig,
    pub weights: HashMap<String, Tensor>,
    pub tok: Tok,
    pub source: String,
    /// A scaffold run's scaffold and fusers (attached to the base when it is built).
    pub fusion: Option<Arc<Fusion>>,
}

/// Load a model and its tokenizer. `ema`: use the EMA weights when the checkpoint has them;
/// `adapter`: a PEFT folder (LoRA applied unmerged, BOFT merged).
pub fn load(
    path: &Path,
    ema: bool,
    adapter: Option<&Path>,
    device: &Device,
) -> Result<LoadedModel> {
    let mut w = weights(path, ema, device)?;
    if let Some(dir) = adapter {
        PeftAdapter::load(dir, device)?
            .apply(&mut w.weights, &mut w.cfg)
            .with_context(|| format!("apply the adapter {} to {}", dir.display(), w.source))?;
        w.source = format!("{} + {}", w.source, dir.display());
    }
    let (mut model, _) = hf::model_from_tensors(&w.cfg, w.weights, device)
        .with_context(|| format!("load {}", w.source))?;
    model.fusion = w.fusion;
    Ok(LoadedModel {
        model,
        tok: w.tok,
        source: w.source,
    })
}

/// The config, weights and tokenizer of an HF folder, a checkpoint folder or a run folder.
pub fn weights(path: &Path, ema: bool, device: &Device) -> Result<ModelWeights> {
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
        let tok = Tok::load(path)
            .with_context(|| format!("{}: the model folder needs its tokenizer", path.display()))?;
        return Ok(ModelWeights {
            weights: hf::normalize_keys(&cfg, weights),
            cfg,
            tok,
            source: path.display().to_string(),
            fusion: None,
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
) -> Result<ModelWeights> {
    let cfg = layout::model_config(ck)?;
    let mut weights = layout::load_weights(ck, ema, device)?;
    let fusion = scaffold::load_fusion(ck, ema, cfg.d_model, device)?;
    if fusion.is_some() {
        // The scaffold's LoRA and the fusers are the fusion's, not the base's.
        weights.retain(|k, _| !k.starts_with(SCAFFOLD_PREFIX) && !k.starts_with(FUSER_PREFIX));
    }
    Ok(ModelWeights {
        weights: hf::normalize_keys(&cfg, weights),
        cfg,
        tok: layout::tokenizer(ck)?,
        source,
        fusion,
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
