//! The files of a checkpoint folder `step-NNNNNNNN/` and the objects its stage shares:
//!
//! ```text
//! model.safetensors       trainable weights of the active layers (HF names)
//! ema.safetensors         their EMA, when training.ema_decay is set
//! optimizer.safetensors   AdamW moments
//! trainer_state.json      step, stage, data cursor, RNG, schedule, stage results
//! config.json             HF config of exactly the active layers
//! tokenizer.json
//! adapter/                an adapter run's adapter as a PEFT folder (its base: the manifest's `base`)
//! scaffold.json, scaffold_adapter/, fusers.safetensors   a scaffold run's (see `scaffold.rs`)
//! frozen.safetensors      → frozen/stage-NN/frozen.safetensors (written once per stage)
//! backup.safetensors      → backups/stage-NN/model.safetensors (full precision, before quantizing)
//! ```
//! The last two are manifest entries whose bytes live in shared objects under
//! `checkpoints/`; the manifest's sha256 covers them like any other file.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use stackwise_common::checkpoint::{BaseRef, CheckpointStore, LoadedCheckpoint, ManifestEntry};

use crate::models::params::StagePolicy;
use crate::models::{ParamBuilder, Transformer, hf};
use stackwise_common::config::ModelConfig;
use stackwise_common::tokenizer::Tok;

pub const MODEL: &str = "model.safetensors";
pub const EMA: &str = "ema.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const FROZEN: &str = "frozen.safetensors";
pub const BACKUP: &str = "backup.safetensors";
/// The adapter of an adapter run as a PEFT folder (`adapter_config.json`,
/// `adapter_model.safetensors`).
pub const ADAPTER: &str = "adapter";

/// The shared object holding stage `stage`'s frozen tensors (as used, dequantized).
pub fn frozen_object(stage: usize) -> String {
    format!("frozen/stage-{stage:02}/{FROZEN}")
}

/// The shared object holding stage `stage`'s full-precision weights before quantizing.
pub fn backup_object(stage: usize) -> String {
    format!("backups/stage-{stage:02}/{MODEL}")
}

fn file<'a>(ck: &'a LoadedCheckpoint, name: &str) -> Result<&'a [u8]> {
    ck.files
        .get(name)
        .map(|b| b.as_ref())
        .with_context(|| format!("checkpoint {} has no {name}", ck.name))
}

/// The tensors of one safetensors file of a verified checkpoint.
pub fn tensors(
    ck: &LoadedCheckpoint,
    name: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load_buffer(file(ck, name)?, device)
        .with_context(|| format!("read {name} of checkpoint {}", ck.name))
}

/// A verified checkpoint's weights: `model.safetensors` (or, with `ema`, the EMA weights
/// when it has them) plus the frozen tensors its stage shares between checkpoints.
pub fn load_weights(
    ck: &LoadedCheckpoint,
    ema: bool,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let weights_file = if ema && ck.files.contains_key(EMA) {
        EMA
    } else {
        MODEL
    };
    let mut weights = tensors(ck, weights_file, device)?;
    if ck.files.contains_key(FROZEN) {
        weights.extend(tensors(ck, FROZEN, device)?);
    }
    if let Some(base) = &ck.manifest.meta.base {
        let mut all = base_weights(base, device)
            .with_context(|| format!("the base model of checkpoint {}", ck.name))?;
        all.extend(weights);
        weights = all;
    }
    Ok(weights)
}

/// An adapter run's frozen base as its adapters saw it: read from its folder (checked
/// against the sha256 the checkpoint references) and, for a base stored at reduced
/// precision (QLoRA's nf4), quantized and dequantized as the trainer did.
pub fn base_weights(base: &BaseRef, device: &Device) -> Result<HashMap<String, Tensor>> {
    let dir = base.verified_dir()?;
    let cfg = ModelConfig::read_hf_dir(dir)?;
    let raw = hf::read_safetensors_dir(dir, device)?;
    if !base.precision.is_lossy() {
        let (_, params) = hf::model_from_tensors(&cfg, raw, device)?;
        return Ok(params.tensors()?.into_iter().collect());
    }
    let policy = StagePolicy::frozen(base.precision);
    let mut loaded = hf::normalize_keys(&cfg, raw);
    if cfg.tie_embeddings {
        loaded.remove(crate::models::names::LM_HEAD);
    }
    let mut p = ParamBuilder::for_stage(loaded, 0, policy, device);
    Transformer::build(&cfg, &mut p, device)?;
    let (_, frozen, _) = p.finish_stage();
    Ok(frozen.tensors()?.into_iter().collect())
}

/// The model config a checkpoint was written with (its active layers).
pub fn model_config(ck: &LoadedCheckpoint) -> Result<ModelConfig> {
    let v: serde_json::Value = serde_json::from_slice(file(ck, CONFIG)?)
        .with_context(|| format!("parse {CONFIG} of {}", ck.name))?;
    Ok(ModelConfig::from_hf_json(&v)?)
}

/// The tokenizer a checkpoint was written with.
pub fn tokenizer(ck: &LoadedCheckpoint) -> Result<Tok> {
    Tok::from_json_bytes(file(ck, TOKENIZER)?)
        .map_err(|e| anyhow::anyhow!("{TOKENIZER} of checkpoint {}: {e}", ck.name))
}

/// A shared object (a stage's backup), verified against the manifest entry that names it.
pub fn read_shared(
    ckpt: &CheckpointStore,
    entry: &ManifestEntry,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let object = entry.object.as_deref().unwrap_or(&entry.path);
    let bytes = ckpt
        .store()
        .get(object)?
        .with_context(|| format!("the shared object {object} is missing"))?;
    entry
        .verify(&bytes)
        .map_err(|e| anyhow::anyhow!("{object}: {e}"))?;
    Ok(candle_core::safetensors::load_buffer(&bytes, device)?)
}
