//! The files of a scaffold run's checkpoint, beside the usual ones (`layout.rs`):
//!
//! ```text
//! scaffold.json           the scaffold (path + sha256), the fused layers, heads, pooling,
//!                         trained influence and LoRA scale
//! scaffold_adapter/       the scaffold's LoRA as a PEFT folder (its base: the scaffold)
//! fusers.safetensors      every fuser tensor, trainable or frozen (`fusers.{layer}.…`)
//! ```
//! The base is referenced by the manifest's `base`, as for any adapter run; neither model is
//! copied.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use stackwise_common::checkpoint::{BaseRef, LoadedCheckpoint};
use stackwise_common::config::{FuserMode, ModelConfig, ScaffoldPool};
use stackwise_common::tokenizer::Tok;

use super::layout;
use crate::models::fuser::Fusers;
use crate::models::scaffold::{SCAFFOLD_PREFIX, strip_prefix};
use crate::models::{Fusion, ParamBuilder, hf};

pub const SCAFFOLD_META: &str = "scaffold.json";
pub const SCAFFOLD_ADAPTER: &str = "scaffold_adapter";
pub const FUSERS: &str = "fusers.safetensors";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaffoldMeta {
    pub scaffold: BaseRef,
    pub cross_attn_layers: Vec<usize>,
    pub heads: usize,
    pub pool: ScaffoldPool,
    pub fusers: FuserMode,
    /// The trained influence: `generate`'s default `--scaffold-weight`.
    pub influence_weight: f64,
    /// The scaffold LoRA's `alpha / r`.
    pub lora_scale: f64,
}

/// The scaffold meta of a checkpoint, if it is a scaffold run's.
pub fn meta(ck: &LoadedCheckpoint) -> Result<Option<ScaffoldMeta>> {
    ck.files
        .get(SCAFFOLD_META)
        .map(|b| {
            serde_json::from_slice(b)
                .with_context(|| format!("parse {SCAFFOLD_META} of {}", ck.name))
        })
        .transpose()
}

/// A scaffold checkpoint's scaffold (read from its folder, checked against the sha256 it
/// references, with the trained LoRA; the EMA's with `ema`) and its fusers, to attach to a
/// base of width `d_base`. `None` for other checkpoints.
pub fn load_fusion(
    ck: &LoadedCheckpoint,
    ema: bool,
    d_base: usize,
    device: &Device,
) -> Result<Option<Arc<Fusion>>> {
    let Some(meta) = meta(ck)? else {
        return Ok(None);
    };
    let dir = meta
        .scaffold
        .verified_dir()
        .with_context(|| format!("the scaffold model of checkpoint {}", ck.name))?;
    let mut cfg = ModelConfig::read_hf_dir(dir)?;
    let mut weights = hf::normalize_keys(&cfg, hf::read_safetensors_dir(dir, device)?);
    let trained_file = if ema && ck.files.contains_key(layout::EMA) {
        layout::EMA
    } else {
        layout::MODEL
    };
    let trained = layout::tensors(ck, trained_file, device)?;
    weights.extend(strip_prefix::<HashMap<_, _>>(&trained, SCAFFOLD_PREFIX));
    cfg.lora_scale = Some(meta.lora_scale);
    let (scaffold, _) = hf::model_from_tensors(&cfg, weights, device)
        .with_context(|| format!("load the scaffold {}", meta.scaffold.path))?;
    let mut p = ParamBuilder::from_tensors(layout::tensors(ck, FUSERS, device)?, device);
    let mut fusers = Fusers::build(
        &mut p,
        &meta.cross_attn_layers,
        (d_base, cfg.d_model),
        meta.heads,
        meta.pool,
        meta.influence_weight,
    )
    .with_context(|| format!("load {FUSERS} of {}", ck.name))?;
    let own = Tok::load(dir)
        .with_context(|| format!("the scaffold {}: its tokenizer", meta.scaffold.path))?;
    if own.to_json()? != layout::tokenizer(ck)?.to_json()? {
        fusers.tokenizer = Some(own);
    }
    Ok(Some(Arc::new(Fusion { scaffold, fusers })))
}
