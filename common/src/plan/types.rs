//! A training plan: the list of stages the coordinator's planner computes from the config
//! (DESIGN §3) and every worker executes in order. Each stage says which layers are active,
//! which of them train and which are frozen (and at what storage precision), the adapters on
//! the frozen ones, the objective, the attention mode, the mask fractions and the steps.

use serde::{Deserialize, Serialize};

use crate::config::{AttentionMode, Objective, Precision};

/// LoRA adapters (QLoRA when the base is quantized) on the linear layers of frozen blocks,
/// with PEFT's options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub dropout: f64,
    /// Scale `alpha / sqrt(rank)` (rsLoRA) instead of `alpha / rank`.
    #[serde(default)]
    pub rslora: bool,
    /// The adapted linears by PEFT's suffix match; empty: every frozen linear.
    #[serde(default)]
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// Rank and alpha, no dropout, every frozen linear (the StackWise stages' adapters).
    pub fn new(rank: usize, alpha: f64) -> Self {
        Self {
            rank,
            alpha,
            dropout: 0.0,
            rslora: false,
            targets: Vec::new(),
        }
    }

    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether the linear `module` (its name without `.weight`) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        suffix_match(&self.targets, module)
    }
}

/// PEFT's `target_modules` match: `module` is a target or ends with `.target`; no targets
/// match every module.
pub fn suffix_match(targets: &[String], module: &str) -> bool {
    targets.is_empty()
        || targets
            .iter()
            .any(|t| module == t || module.ends_with(&format!(".{t}")))
}

/// Butterfly orthogonal adapters (PEFT's BOFT) on the frozen linears: each rotates its layer's
/// input by a product of `factors` butterfly-permuted block-diagonal Cayley rotations and
/// scales its outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoftSpec {
    /// Rotation block size (0: `in_features / block_num`).
    pub block_size: usize,
    /// Blocks per factor (0: `in_features / block_size`).
    pub block_num: usize,
    /// Butterfly factors (1: plain block-diagonal OFT).
    pub factors: usize,
    /// PEFT's multiplicative dropout while training: in one random factor, this share of the
    /// blocks is replaced by the identity.
    #[serde(default)]
    pub dropout: f64,
    /// The adapted linears by PEFT's suffix match; empty: every frozen linear.
    #[serde(default)]
    pub targets: Vec<String>,
}

impl BoftSpec {
    pub fn targets(&self, module: &str) -> bool {
        suffix_match(&self.targets, module)
    }

    /// `(blocks, block size)` of a layer with `d_in` input features, or why it does not fit.
    pub fn layout(&self, d_in: usize) -> Result<(usize, usize), String> {
        let b = match (self.block_size, self.block_num) {
            (0, 0) => return Err("set block_size or block_num".into()),
            (b, 0) => b,
            (0, n) if d_in.is_multiple_of(n) => d_in / n,
            (0, n) => return Err(format!("block_num {n} does not divide in_features {d_in}")),
            (_, _) => return Err("set block_size or block_num, not both".into()),
        };
        if b == 0 || !d_in.is_multiple_of(b) {
            return Err(format!("block size {b} does not divide in_features {d_in}"));
        }
        let blocks = d_in / b;
        let spread = 1usize << (self.factors.max(1) - 1);
        if self.factors > 1 && (b % 2 != 0 || !blocks.is_multiple_of(spread)) {
            return Err(format!(
                "{} butterfly factors need an even block size and a block count divisible by {spread};                  in_features {d_in} with block size {b} has {blocks} blocks",
                self.factors
            ));
        }
        Ok((blocks, b))
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
    /// Butterfly orthogonal adapters on the frozen layers' linears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boft: Option<BoftSpec>,
    /// A scaffold stage: the base is frozen whole and a scaffold model's LoRA trains (with
    /// the fusers, when they train).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaffold: Option<ScaffoldStage>,
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

/// What trains in a scaffold stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaffoldStage {
    /// The scaffold's LoRA (targets resolved: never empty).
    pub lora: LoraSpec,
    pub train_fusers: bool,
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

/// A plan that arrived as JSON (from the coordinator) and does not hold together.
#[derive(Debug, thiserror::Error)]
pub enum PlanFormatError {
    #[error("the stage plan is not valid JSON")]
    Json(#[from] serde_json::Error),
    #[error("the stage plan has no stages")]
    Empty,
    #[error("stage {stage} ({name}) of the plan: {msg}")]
    Stage {
        stage: usize,
        name: String,
        msg: String,
    },
}

impl Plan {
    /// Parse a plan sent over the wire and check it holds together.
    pub fn from_json(raw: &str) -> Result<Self, PlanFormatError> {
        let plan: Plan = serde_json::from_str(raw)?;
        plan.validate()?;
        Ok(plan)
    }

    /// At least one stage; each with steps, and its layers among its active ones.
    pub fn validate(&self) -> Result<(), PlanFormatError> {
        if self.stages.is_empty() {
            return Err(PlanFormatError::Empty);
        }
        for (i, s) in self.stages.iter().enumerate() {
            let bad = |msg: String| PlanFormatError::Stage {
                stage: i,
                name: s.name.clone(),
                msg,
            };
            if s.steps == 0 {
                return Err(bad("has 0 steps".into()));
            }
            if let Some(l) = s
                .trainable
                .iter()
                .chain(&s.frozen)
                .find(|&&l| l >= s.active_layers)
            {
                return Err(bad(format!(
                    "layer {l} is not among its {} active layers",
                    s.active_layers
                )));
            }
            if let Some(l) = s.trainable.iter().find(|l| s.frozen.contains(l)) {
                return Err(bad(format!("layer {l} is both trainable and frozen")));
            }
        }
        Ok(())
    }
}
