//! A training plan: the list of stages the coordinator's planner computes from the config
//! (DESIGN §3) and every worker executes in order. Each stage says which layers are active,
//! which of them train and which are frozen (and at what storage precision), the adapters on
//! the frozen ones, the objective, the attention mode, the mask fractions and the steps.

use serde::{Deserialize, Serialize};

use crate::models::config::AttentionMode;
use crate::objectives::Objective;

/// Storage precision of frozen linear weights; they are dequantized to f32 on the fly, so
/// gradients still flow through them to earlier trainable parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
    Fp8,
    Nf4,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp8 => "fp8",
            Precision::Nf4 => "nf4",
        }
    }

    /// Whether storing at this precision loses information (and so needs a backup).
    pub fn is_lossy(self) -> bool {
        self != Precision::Fp32
    }
}

/// LoRA adapters (QLoRA when the base is quantized) on the linear layers of frozen blocks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Human-readable: "layer 3", "block 2 (layers 4-7)", "end-to-end", "fine-tune clm".
    pub name: String,
    /// Layers `0..active_layers` run in the forward pass; later ones do not exist yet.
    pub active_layers: usize,
    /// Layers whose weights train.
    pub trainable: Vec<usize>,
    /// Active layers whose weights are frozen, stored at `frozen_precision`.
    pub frozen: Vec<usize>,
    pub frozen_precision: Precision,
    /// Adapters on the frozen layers' linears (none = frozen layers have no trainable part).
    pub adapters: Option<LoraSpec>,
    /// Token (and learned position) embeddings train in this stage.
    pub train_embeddings: bool,
    /// The final norm (and an untied LM head) train in this stage.
    pub train_head: bool,
    pub objective: Objective,
    pub attention: AttentionMode,
    /// Mask fractions of the stage's layers (time-step masking): every sequence is masked
    /// at one of them, chosen uniformly. Empty for causal objectives.
    pub mask_fractions: Vec<f64>,
    pub steps: u64,
    pub lr: f64,
}

impl StagePlan {
    /// The mask fraction used to evaluate this stage (the mean of its fractions).
    pub fn eval_fraction(&self) -> Option<f64> {
        (!self.mask_fractions.is_empty())
            .then(|| self.mask_fractions.iter().sum::<f64>() / self.mask_fractions.len() as f64)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// `layerwise`, `blockwise`, `fused` or `end_to_end`.
    pub mode: String,
    pub stages: Vec<StagePlan>,
}

impl Plan {
    pub fn total_steps(&self) -> u64 {
        self.stages.iter().map(|s| s.steps).sum()
    }

    /// First global step of stage `i`.
    pub fn stage_start(&self, i: usize) -> u64 {
        self.stages[..i].iter().map(|s| s.steps).sum()
    }

    /// One past the last global step of stage `i`.
    pub fn stage_end(&self, i: usize) -> u64 {
        self.stage_start(i) + self.stages[i].steps
    }

    /// Every mask fraction of the plan's masked stages, ascending, once each: where a
    /// multi-stage masked plan evaluates each stage's result, so stages compare on one scale
    /// (a stage's own fraction rises with its depth). Empty with fewer than two masked stages.
    pub fn reference_mask_fractions(&self) -> Vec<f64> {
        let masked: Vec<_> = self
            .stages
            .iter()
            .filter(|s| s.objective.is_masked())
            .collect();
        if masked.len() < 2 {
            return Vec::new();
        }
        let mut all: Vec<f64> = masked
            .iter()
            .flat_map(|s| s.mask_fractions.iter().copied())
            .collect();
        all.sort_by(f64::total_cmp);
        all.dedup();
        all
    }
}
