//! The training config (`stackwise train CONFIG.yaml`): raw serde layer with defaults, then
//! validation with errors that name the field and the fix. The value types a config names
//! (objective, storage precision, activation cache) live here too: the planner, the
//! coordinator and the worker all speak them.

use serde::{Deserialize, Serialize};

pub use super::error::TrainConfigError;
use super::model::RawModelConfig;
pub use super::precision::{Autocast, Precision};
use crate::schedule::ScheduleKind;

/// What a stage optimizes (DESIGN §3, "Objectives").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Clm,
    Sft,
    Mlm,
    Diffusion,
}

impl Objective {
    /// Masked objectives predict tokens in place with bidirectional attention.
    pub fn is_masked(self) -> bool {
        matches!(self, Objective::Mlm | Objective::Diffusion)
    }
}

/// When validation runs (HF Trainer's `eval_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalStrategy {
    /// Every `eval_every` optimizer steps (0: never), and at each stage's end.
    #[default]
    Steps,
    /// After the step that finishes each pass over the training split (the data cursor
    /// enters the next epoch), and at each stage's end; `patience` then counts epochs.
    Epoch,
}

/// Where the frozen prefix's outputs of a layer-wise stage come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationCacheKind {
    /// Computed on the fly every step, without gradients (no memory, one prefix forward).
    #[default]
    None,
    /// In the worker's memory.
    Memory,
    /// Files on the worker's local disk (`activation_cache_dir`).
    Disk,
    /// Objects in the run's store (`<run>/activation-cache/`), kept across restarts.
    Store,
}

/// How the layers are trained (DESIGN §3, "The plan").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingMode {
    /// All layers at once (the baseline).
    #[default]
    #[serde(alias = "end-to-end", alias = "e2e")]
    EndToEnd,
    /// One stage per layer: layer k trains, layers < k are frozen.
    Layerwise,
    /// One stage per block of `block_size` layers.
    Blockwise,
    /// `total_blocks` blocks of `block_size`, trained one after another with the earlier
    /// blocks `frozen` (optionally quantized, with QLoRA) or `trainable`.
    #[serde(alias = "fusion")]
    Fused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FusionMode {
    #[default]
    Frozen,
    Trainable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleShape {
    #[default]
    Linear,
    Exponential,
    Cosine,
}

/// Per-layer mask fractions from `min` (first layer) to `max` (last layer).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskSchedule {
    #[serde(default)]
    pub kind: ScheduleShape,
    pub min: f64,
    pub max: f64,
}

impl Default for MaskSchedule {
    fn default() -> Self {
        Self {
            kind: ScheduleShape::Linear,
            min: 0.15,
            max: 0.90,
        }
    }
}

/// A fine-tune stage after pre-training: causal attention, `clm` or `sft`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneStage {
    pub objective: Objective,
    pub steps: u64,
    /// Default: training.lr.
    #[serde(default)]
    pub lr: Option<f64>,
    /// `lora`: train adapters on every (frozen) linear; none: full fine-tune.
    #[serde(default)]
    pub adapters: Option<String>,
    /// Storage precision of the frozen base with `adapters: lora` (QLoRA with nf4).
    #[serde(default)]
    pub precision: Option<Precision>,
}

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
    /// A frozen base steered by a LoRA-adapted scaffold model (replaces `init_from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaffold: Option<super::scaffold::ScaffoldSection>,
    pub data: DataSection,
    #[serde(default)]
    pub training: TrainingSection,
    /// S3 endpoint, region and credentials for `s3://` URIs (over the `AWS_*` environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<crate::store::S3Settings>,
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
    /// Total optimizer steps (of all pre-training stages unless `steps_per_stage` is set).
    #[serde(alias = "max_steps")]
    pub steps: u64,
    /// `end_to_end` (default), `layerwise`, `blockwise` or `fused`.
    pub mode: TrainingMode,
    /// Fused mode: the blocks before the one training are `frozen` or `trainable`.
    pub fusion_mode: FusionMode,
    /// Fused mode: number of blocks (total_blocks * block_size = model.n_layers).
    pub total_blocks: Option<usize>,
    /// Layers per block (blockwise, fused).
    pub block_size: Option<usize>,
    /// Steps of every pre-training stage (default: `steps` shared out evenly).
    pub steps_per_stage: Option<u64>,
    /// Storage precision of frozen layers: fp32, bf16, fp16, fp8 or nf4 (not nf4_dq).
    #[serde(alias = "frozen_precision")]
    pub quantization_type: Precision,
    /// LoRA adapters on frozen layers (QLoRA when they are quantized).
    pub qlora_enabled: bool,
    pub qlora_rank: usize,
    pub qlora_alpha: f64,
    /// Each layer (or block) trains at its own mask fraction.
    pub time_step_masking: bool,
    /// Explicit per-layer mask fractions (one per layer), for time-step masking.
    pub mask_fractions: Option<Vec<f64>>,
    /// Per-layer mask fractions from a schedule when `mask_fractions` is absent.
    pub mask_schedule: MaskSchedule,
    /// The mask fraction of `mlm` without time-step masking.
    pub mask_fraction: f64,
    /// Stages run after pre-training.
    pub finetune: Vec<FinetuneStage>,
    /// Static masks: each sample has this many masks per stage, cycled by epoch (none: a
    /// fresh mask every step). Needed by the activation cache.
    pub mask_seeds: Option<u64>,
    /// Inputs of a layer-wise stage: `none` (the frozen prefix runs on the fly, without
    /// gradients), `memory`, `disk` or `store` (cached per sample and mask seed).
    pub activation_cache: ActivationCacheKind,
    /// Folder of the `disk` activation cache (default: the system temp folder).
    pub activation_cache_dir: Option<String>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Token-budget batching: micro-batches of `batch_size` whole documents are drawn until
    /// this many loss tokens (all workers together) are in the step; then the optimizer steps.
    pub tokens_per_step: Option<usize>,
    /// Recompute each block's activations in the backward instead of keeping them.
    pub gradient_checkpointing: bool,
    /// Data parallelism: all-reduce gradient buckets while the backward pass runs (DeepSpeed's
    /// `overlap_comm`); off, they are reduced after it. Same numbers either way.
    pub overlap_comm: bool,
    /// Mixed precision: `bf16` (or `fp16`) matrix products with f32 master weights, as
    /// `torch.autocast`; `off` (default) computes in f32. Meant for GPUs.
    pub autocast: Autocast,
    /// Tokens per sequence (default: the model's seq_len).
    pub seq_len: Option<usize>,
    #[serde(alias = "learning_rate")]
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
    /// `steps` (every `eval_every` steps) or `epoch` (at the end of every epoch).
    pub eval_strategy: EvalStrategy,
    pub eval_batches: usize,
    /// Stop after this many evaluations without a new best validation loss.
    pub patience: Option<u64>,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub log_every: u64,
    /// Resume even when the dataset's content differs from the one the checkpoint was
    /// trained on; off by default, so a changed dataset is an error.
    pub allow_data_change: bool,
    /// Fine-tune the frozen `init_from` base through adapters instead of training weights.
    pub adapter: Option<super::adapter::AdapterSection>,
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            objective: Objective::Clm,
            steps: 1000,
            mode: TrainingMode::EndToEnd,
            fusion_mode: FusionMode::Frozen,
            total_blocks: None,
            block_size: None,
            steps_per_stage: None,
            quantization_type: Precision::Fp32,
            qlora_enabled: false,
            qlora_rank: 8,
            qlora_alpha: 16.0,
            time_step_masking: false,
            mask_fractions: None,
            mask_schedule: MaskSchedule::default(),
            mask_fraction: 0.15,
            finetune: Vec::new(),
            mask_seeds: None,
            activation_cache: ActivationCacheKind::None,
            activation_cache_dir: None,
            batch_size: 8,
            grad_accum: 1,
            tokens_per_step: None,
            gradient_checkpointing: false,
            overlap_comm: true,
            autocast: Autocast::Off,
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
            eval_strategy: EvalStrategy::Steps,
            eval_batches: 16,
            patience: None,
            checkpoint_every: 200,
            keep_last: 3,
            log_every: 10,
            allow_data_change: false,
            adapter: None,
        }
    }
}

impl TrainingSection {
    /// Whether the run validates at all.
    pub fn evaluates(&self) -> bool {
        self.eval_strategy == EvalStrategy::Epoch || self.eval_every > 0
    }

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
        if self.mask_seeds == Some(0) {
            return err(
                "mask_seeds",
                "must be at least 1 (or unset for a new mask every step)",
            );
        }
        if self.activation_cache != ActivationCacheKind::None && self.mask_seeds.is_none() {
            return err(
                "activation_cache",
                "needs static masks: set training.mask_seeds (e.g. 1), so a sample's masked input repeats across epochs",
            );
        }
        if self.tokens_per_step == Some(0) {
            return err(
                "tokens_per_step",
                "must be at least 1 loss token, e.g. 16384",
            );
        }
        if self.tokens_per_step.is_some() && self.grad_accum != 1 {
            return err(
                "tokens_per_step",
                "sets the number of micro-batches of a step itself: leave grad_accum at 1",
            );
        }
        // A staged plan re-quantizes frozen layers from the dequantized values its checkpoints
        // keep, which double quantization would not reproduce: it is for adapter fine-tunes,
        // whose base is read again from its folder.
        let dq = "nf4_dq (double quantization) is for adapter fine-tunes (training.adapter.base_precision); use nf4 here";
        if self.quantization_type == Precision::Nf4Dq {
            return err("quantization_type", dq);
        }
        if self
            .finetune
            .iter()
            .any(|f| f.precision == Some(Precision::Nf4Dq))
        {
            return err("finetune.precision", dq);
        }
        if let Some(a) = &self.adapter {
            a.validate()?;
        }
        if self.seq_len == Some(0) || self.seq_len == Some(1) {
            return err("seq_len", "must be at least 2 (one input and one target)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_quantization_is_for_adapter_fine_tunes_only() {
        let t: TrainingSection = serde_yaml::from_str("quantization_type: nf4_dq").unwrap();
        let e = t.validate().unwrap_err();
        assert_eq!(e.field, "quantization_type");
        assert!(e.msg.contains("adapter"), "{}", e.msg);
        let a: TrainingSection = serde_yaml::from_str("adapter: {base_precision: nf4_dq}").unwrap();
        a.validate().unwrap();
        assert_eq!(a.adapter.unwrap().base_precision, Precision::Nf4Dq);
        assert!(Precision::Nf4Dq.is_nf4() && Precision::Nf4Dq.is_lossy());
    }
}
