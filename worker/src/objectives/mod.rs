//! Training objectives. `clm`: next-token cross-entropy; `sft`: the same, restricted to the
//! response tokens by a per-token loss mask built at `data prepare` time.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::Transformer;
use crate::ops;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Clm,
    Sft,
}

/// A micro-batch: token ids `(B, T)` and a target mask `(B, T)`: `mask[b, t] = 1` when token
/// `t` (t >= 1) is predicted from positions `..t` and counts in the loss.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
}

impl Batch {
    /// `rows`: token ids and per-token loss flags, all of the same length.
    pub fn from_rows(rows: &[(Vec<u32>, Vec<f32>)], device: &Device) -> Result<Self> {
        let b = rows.len();
        let t = rows.first().map_or(0, |r| r.0.len());
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.0.iter().copied()).collect();
        let mask: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                r.1.iter()
                    .enumerate()
                    .map(|(i, &m)| if i == 0 { 0.0 } else { m })
            })
            .collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, t), device)?,
        })
    }

    /// Number of target tokens (the loss normaliser).
    pub fn weight(&self) -> Result<f64> {
        self.mask
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()
    }

    pub fn tokens(&self) -> usize {
        self.ids.elem_count()
    }
}

/// Sum of the masked next-token NLL over the batch (divide by the total weight outside, so
/// micro-batches and ranks with different token counts average correctly).
pub fn nll_sum(model: &Transformer, batch: &Batch) -> Result<Tensor> {
    let (b, t) = batch.ids.dims2()?;
    let hidden = model.hidden(&batch.ids.narrow(1, 0, t - 1)?, 0, None)?; // (B, T-1, D)
    let logits = model.logits(&hidden)?.reshape((b * (t - 1), ()))?; // (B*(T-1), V)
    let targets = batch.ids.narrow(1, 1, t - 1)?.flatten_all()?;
    let weights = batch.mask.narrow(1, 1, t - 1)?.flatten_all()?;
    let nll = ops::token_nll(&logits, &targets)?;
    (nll * weights)?.sum_all()
}

/// Mean masked next-token loss of one batch.
pub fn mean_loss(model: &Transformer, batch: &Batch) -> Result<Tensor> {
    nll_sum(model, batch)? / batch.weight()?.max(1e-12)
}
