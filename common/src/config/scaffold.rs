//! The `scaffold:` section: a frozen base model steered by a second, LoRA-adapted "scaffold"
//! model through gated cross-attention fusers inside chosen base layers. The scaffold reads
//! the prompt; the base reads prompt + completion and, after each fused layer, attends to the
//! scaffold's final hidden states. The base comes from `scaffold.base` (so the config needs
//! neither `model:` nor `init_from`). The fuser's formula is in the worker's
//! `models/scaffold.rs` and the README.

use serde::{Deserialize, Serialize};

use super::error::TrainConfigError;
use super::precision::Precision;

/// Whether the fusers train with the scaffold's LoRA or stay at their seeded init (the
/// original freezes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FuserMode {
    #[default]
    Frozen,
    Trainable,
}

/// What the base's queries attend over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaffoldPool {
    /// Every scaffold position (prompt padding masked).
    #[default]
    None,
    /// One key: the mean of the scaffold states over the prompt (the original's fuser).
    Mean,
}

/// The scaffold's LoRA (PEFT's `LoraConfig` keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaffoldLora {
    pub r: usize,
    pub alpha: f64,
    /// Dropout on the scaffold adapter's input while training, in [0, 1) (the original: 0.1).
    pub dropout: f64,
    /// PEFT's suffix match; empty: the scaffold family's attention and MLP projections.
    pub target_modules: Vec<String>,
}

impl Default for ScaffoldLora {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaffoldSection {
    /// The frozen base: an HF folder or a StackWise checkpoint folder.
    pub base: String,
    /// The scaffold model (frozen but for its LoRA): an HF folder or a checkpoint folder.
    pub scaffold: String,
    /// Base layers (0-based, HF's `h.{i}` / `layers.{i}`) followed by a fuser.
    pub cross_attn_layers: Vec<usize>,
    /// The fusers' output scale while training, and the default `--scaffold-weight`.
    #[serde(default = "one")]
    pub influence_weight: f64,
    #[serde(default)]
    pub fusers: FuserMode,
    #[serde(default)]
    pub pool: ScaffoldPool,
    /// Cross-attention heads; default: the base's.
    #[serde(default)]
    pub heads: Option<usize>,
    /// Storage of the frozen base (fp32, bf16, fp16, fp8 or nf4).
    #[serde(default)]
    pub base_precision: Precision,
    #[serde(default)]
    pub lora: ScaffoldLora,
}

fn one() -> f64 {
    1.0
}

impl ScaffoldSection {
    /// Checks that need no model: each error names its field.
    pub fn validate(&self) -> Result<(), TrainConfigError> {
        let err = |field, msg: String| Err(TrainConfigError { field, msg });
        if self.cross_attn_layers.is_empty() {
            return err(
                "scaffold.cross_attn_layers",
                "name at least one base layer to fuse after, e.g. [5, 7]".into(),
            );
        }
        let mut sorted = self.cross_attn_layers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.cross_attn_layers.len() {
            return err(
                "scaffold.cross_attn_layers",
                format!("{:?} names a layer twice", self.cross_attn_layers),
            );
        }
        if !(0.0..=1.0).contains(&self.influence_weight) {
            return err(
                "scaffold.influence_weight",
                format!("{} is outside 0..=1", self.influence_weight),
            );
        }
        if self.heads == Some(0) {
            return err("scaffold.heads", "must be at least 1".into());
        }
        if self.lora.r == 0 {
            return err("scaffold.lora.r", "must be at least 1, e.g. 8".into());
        }
        if !(self.lora.alpha > 0.0 && self.lora.alpha.is_finite()) {
            return err(
                "scaffold.lora.alpha",
                "must be a positive number, e.g. 16".into(),
            );
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return err(
                "scaffold.lora.dropout",
                format!(
                    "{} is not a probability below 1; e.g. 0.1",
                    self.lora.dropout
                ),
            );
        }
        Ok(())
    }

    /// Checks against the base's depth and width.
    pub fn validate_for(&self, n_layers: usize, d_model: usize) -> Result<(), TrainConfigError> {
        if let Some(&bad) = self.cross_attn_layers.iter().find(|&&l| l >= n_layers) {
            return Err(TrainConfigError {
                field: "scaffold.cross_attn_layers",
                msg: format!(
                    "layer {bad} does not exist: the base has {n_layers} layers (0..{n_layers})"
                ),
            });
        }
        let heads = self.heads.unwrap_or(1);
        if !d_model.is_multiple_of(heads) {
            return Err(TrainConfigError {
                field: "scaffold.heads",
                msg: format!("{heads} heads do not divide the base's width {d_model}"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(yaml: &str) -> ScaffoldSection {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_errors_name_the_field() {
        let s = section("{base: b, scaffold: s, cross_attn_layers: [1]}");
        assert_eq!(s.influence_weight, 1.0);
        assert_eq!(s.fusers, FuserMode::Frozen);
        assert_eq!(s.lora.r, 8);
        assert!(s.validate().is_ok());
        let e = section("{base: b, scaffold: s, cross_attn_layers: [1, 1]}")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "scaffold.cross_attn_layers");
        let e = section("{base: b, scaffold: s, cross_attn_layers: [1], lora: {dropout: 1.0}}")
            .validate()
            .unwrap_err();
        assert_eq!(e.field, "scaffold.lora.dropout");
        let e = s.validate_for(1, 64).unwrap_err();
        assert!(e.msg.contains("the base has 1 layers"), "{e}");
    }
}
