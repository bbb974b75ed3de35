//! `trainer_state.json`: everything besides tensors that resume needs to continue exactly.

use serde::{Deserialize, Serialize};
use stackwise_common::checkpoint::ManifestEntry;
use stackwise_common::data::Cursor;
use stackwise_common::rng::Rng;

use stackwise_common::schedule::Schedule;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub run_id: String,
    /// Optimizer updates done (including skipped non-finite ones).
    pub step: u64,
    pub cursor: Cursor,
    pub rng: Rng,
    pub schedule: Schedule,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub best_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    /// Evaluations since the best one (early stopping).
    pub evals_since_best: u64,
    pub ema: bool,
    pub stopped_early: bool,
    /// The stage of the plan being trained.
    #[serde(default)]
    pub stage: usize,
    /// The current stage's full-precision backup (taken before frozen weights were
    /// quantized), referenced by each of its checkpoints.
    #[serde(default)]
    pub backup: Option<ManifestEntry>,
    /// The current stage's frozen tensors, written once and referenced by its checkpoints.
    #[serde(default)]
    pub frozen_shared: Option<ManifestEntry>,
    /// Each finished stage's validation masked loss at the plan's reference fractions
    /// (multi-stage masked plans).
    #[serde(default)]
    pub stage_results: Vec<StageResult>,
    /// The dataset's content fingerprint: resume checks it is the same data.
    #[serde(default)]
    pub data_fingerprint: Option<String>,
}

impl TrainerState {
    /// The state of a run at step 0 of its first stage.
    pub fn start(run_id: &str, seed: u64, schedule: Schedule, ema: bool) -> Self {
        Self {
            run_id: run_id.to_string(),
            step: 0,
            cursor: Cursor::start(),
            rng: Rng::derive(seed, "trainer"),
            schedule,
            tokens_seen: 0,
            skipped_steps: 0,
            best_val_loss: None,
            last_val_loss: None,
            evals_since_best: 0,
            ema,
            stopped_early: false,
            stage: 0,
            backup: None,
            frozen_shared: None,
            stage_results: Vec::new(),
            data_fingerprint: None,
        }
    }
}

/// A finished stage measured on the plan-wide scale (`Plan::reference_mask_fractions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: usize,
    pub step: u64,
    pub val_loss: f64,
    pub val_masked_accuracy: Option<f64>,
    /// The stage ended early (early stopping) at `step`.
    pub stopped_early: bool,
}
