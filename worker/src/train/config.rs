//! The training config (`stackwise train CONFIG.yaml`): raw serde layer with defaults, then
//! validation with errors that name the field and the fix.

use serde::{Deserialize, Serialize};

use crate::models::RawModelConfig;
use crate::objectives::Objective;
use crate::optim::ScheduleKind;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub run: RunSection,
    /// The architecture of a model trained from scratch.
    #[serde(default)]
    pub model: RawModelConfig,
    /// Start from a Hugging Face model folder (full fine-tune) instead of `model:`.
    #[serde(default)]
    pub init_from: Option<String>,
    pub data: DataSection,
    #[serde(default)]
    pub training: TrainingSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// The run id; checkpoints go to `<output>/runs/<name>/`.
    pub name: String,
    /// Root of the run store: a path or `file://` URI.
    pub output: String,
    pub seed: u64,
    /// `cpu` (default) or `cuda:N` with the `cuda` feature.
    pub device: String,
    /// CPU threads for the kernels (default: all physical cores).
    pub threads: Option<usize>,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            name: "run".into(),
            output: ".".into(),
            seed: 1234,
            device: "cpu".into(),
            threads: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A dataset made by `stackwise data prepare` (path or URI).
    pub path: String,
    /// Pack the token stream into full `seq_len` blocks (default: yes for clm, no for sft).
    #[serde(default)]
    pub packing: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingSection {
    pub objective: Objective,
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence (default: the model's seq_len).
    pub seq_len: Option<usize>,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub min_lr_ratio: f64,
    pub cycles: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Max global gradient norm (none = no clipping).
    pub grad_clip: Option<f64>,
    /// EMA of the weights (e.g. 0.999); evaluated and exported instead of the raw weights.
    pub ema_decay: Option<f64>,
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Stop after this many evaluations without a new best validation loss.
    pub patience: Option<u64>,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub log_every: u64,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            objective: Objective::Clm,
            steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            seq_len: None,
            lr: 3e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 50,
            min_lr_ratio: 0.1,
            cycles: 1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: Some(1.0),
            ema_decay: None,
            eval_every: 100,
            eval_batches: 16,
            patience: None,
            checkpoint_every: 200,
            keep_last: 3,
            log_every: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("training.{field}: {msg}")]
pub struct TrainConfigError {
    pub field: &'static str,
    pub msg: String,
}

impl TrainingSection {
    pub fn validate(&self) -> Result<(), TrainConfigError> {
        let err = |field, msg: &str| {
            Err(TrainConfigError {
                field,
                msg: msg.to_string(),
            })
        };
        if self.steps == 0 {
            return err("steps", "must be at least 1");
        }
        if self.batch_size == 0 {
            return err("batch_size", "must be at least 1");
        }
        if self.grad_accum == 0 {
            return err("grad_accum", "must be at least 1 (1 = no accumulation)");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return err("lr", "must be a positive number, e.g. 3e-4");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return err(
                "beta1",
                "beta1 and beta2 must be in [0, 1), e.g. 0.9 and 0.95",
            );
        }
        if let Some(d) = self.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return err("ema_decay", "must be in [0, 1), e.g. 0.999");
        }
        if self.warmup_steps > self.steps {
            return err("warmup_steps", "is longer than training.steps; lower it");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return err("min_lr_ratio", "must be in [0, 1]");
        }
        if self.seq_len == Some(0) || self.seq_len == Some(1) {
            return err("seq_len", "must be at least 2 (one input and one target)");
        }
        Ok(())
    }
}
