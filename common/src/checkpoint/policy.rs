//! Checkpoint retention policy (pure): keep the newest `keep_last` plus the best by
//! validation loss.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The frozen base of an adapter run (its weights are not in the checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<super::BaseRef>,
}

/// Names (sorted oldest first in `all`) to delete.
pub fn retention(all: &[(String, CheckpointMeta)], keep_last: usize) -> Vec<String> {
    let best = all
        .iter()
        .filter_map(|(n, m)| m.val_loss.filter(|v| v.is_finite()).map(|v| (n, v)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(n, _)| n.clone());
    let cut = all.len().saturating_sub(keep_last.max(1));
    all[..cut]
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| Some(n) != best.as_ref())
        .collect()
}
