//! The `training.adapter` section: fine-tune a frozen `init_from` base through PEFT-style adapters
//! (`stackwise finetune` writes it). The keys are PEFT's own (`r`, `lora_alpha`,
//! `target_modules`, ...), so a `LoraConfig` reads across unchanged.

use serde::{Deserialize, Serialize};

use super::error::TrainConfigError;
use super::model::Family;
use super::precision::Precision;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterMethod {
    /// Low-rank factors added to each target projection (PEFT `LoraConfig`).
    #[default]
    Lora,
    /// Butterfly orthogonal rotations of each target projection's input (PEFT `BOFTConfig`).
    Boft,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterSection {
    pub method: AdapterMethod,
    /// LoRA rank.
    pub r: usize,
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), in [0, 1).
    pub lora_dropout: f64,
    /// Scale `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// PEFT's suffix match: `c_proj` adapts `attn.c_proj` and `mlp.c_proj`. Empty: the
    /// family's attention and MLP projections (see [`default_targets`]).
    pub target_modules: Vec<String>,
    /// Storage of the frozen base: `fp32`, or `nf4` for QLoRA, `nf4_dq` for QLoRA with double
    /// quantization (also bf16, fp16, fp8).
    pub base_precision: Precision,
    /// BOFT: rotation block size (or `boft_block_num` blocks per layer; set one of the two).
    pub boft_block_size: usize,
    pub boft_block_num: usize,
    /// BOFT: butterfly factors (1 = block-diagonal OFT).
    pub boft_n_butterfly_factor: usize,
    /// BOFT's multiplicative dropout while training, in [0, 1).
    pub boft_dropout: f64,
}

impl Default for AdapterSection {
    fn default() -> Self {
        Self {
            method: AdapterMethod::Lora,
            r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: Vec::new(),
            base_precision: Precision::Fp32,
            boft_block_size: 0,
            boft_block_num: 0,
            boft_n_butterfly_factor: 1,
            boft_dropout: 0.0,
        }
    }
}

/// The projections a family's adapters target when `target_modules` is empty: every linear
/// of attention and the MLP.
pub fn default_targets(family: Family) -> Vec<String> {
    let names: &[&str] = match family {
        Family::Gpt2 => &["c_attn", "c_proj", "c_fc"],
        Family::Llama => &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    };
    names.iter().map(|s| s.to_string()).collect()
}

impl AdapterSection {
    pub fn validate(&self) -> Result<(), TrainConfigError> {
        let err = |field, msg: String| Err(TrainConfigError { field, msg });
        if self.r == 0 {
            return err("adapter.r", "must be at least 1, e.g. 8".into());
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return err(
                "adapter.lora_alpha",
                "must be a positive number, e.g. 16".into(),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err(
                "adapter.lora_dropout",
                format!(
                    "{} is not a probability below 1; e.g. 0.05",
                    self.lora_dropout
                ),
            );
        }
        if self.method == AdapterMethod::Boft {
            if (self.boft_block_size == 0) == (self.boft_block_num == 0) {
                return err(
                    "adapter.boft_block_size",
                    "set one of boft_block_size and boft_block_num (e.g. boft_block_size: 4)"
                        .into(),
                );
            }
            if self.boft_n_butterfly_factor == 0 {
                return err(
                    "adapter.boft_n_butterfly_factor",
                    "must be at least 1 (1 = block-diagonal OFT)".into(),
                );
            }
            if !(0.0..1.0).contains(&self.boft_dropout) {
                return err(
                    "adapter.boft_dropout",
                    format!(
                        "{} is not a probability below 1; e.g. 0.1",
                        self.boft_dropout
                    ),
                );
            }
        }
        if let Some(bad) = self.target_modules.iter().find(|t| t.trim().is_empty()) {
            return err(
                "adapter.target_modules",
                format!("{bad:?} is empty; name modules such as c_attn or q_proj"),
            );
        }
        Ok(())
    }
}
