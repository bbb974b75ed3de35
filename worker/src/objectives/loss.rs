//! Losses over a batch's predicted positions, and the running totals evaluation sums them
//! into (the trainer's validation and `stackwise eval` share them).

use candle_core::{DType, Result, Tensor};

use super::batch::Batch;
use crate::models::Transformer;
use crate::ops;

/// Logits `(N, V)` at the batch's predicted positions. Only those rows are projected onto
/// the vocabulary, which for masked objectives is a fraction of the (B*T, V) logits.
pub fn predicted_logits(model: &Transformer, batch: &Batch) -> Result<Tensor> {
    let hidden = match (&batch.prefix, &batch.scaffold, &model.fusion) {
        (Some((x, k)), _, _) => model.hidden_after(x, *k)?,
        (None, Some(prompts), Some(f)) => {
            let ctx = f.context(prompts, f.influence())?;
            model.hidden_fused(&batch.input, 0, None, Some(&ctx))?
        }
        _ => model.hidden(&batch.input, 0, None)?,
    }; // (B, T, D)
    let (b, t, d) = hidden.dims3()?;
    let flat = hidden.reshape((b * t, d))?;
    let rows = match &batch.positions {
        Some(p) => flat.index_select(p, 0)?,
        None => flat,
    };
    model.logits(&rows)
}

/// Sum of the weighted NLL over the batch's predicted positions (divide by the total
/// normaliser outside, so micro-batches and ranks with different counts average correctly).
pub fn nll_sum(model: &Transformer, batch: &Batch) -> Result<Tensor> {
    if batch.predicted() == 0 {
        // No target here: a zero that still depends on nothing (no gradient).
        return Tensor::zeros((), DType::F32, batch.input.device());
    }
    let logits = predicted_logits(model, batch)?;
    let nll = ops::token_nll(&logits, &batch.targets)?;
    (nll * &batch.weights)?.sum_all()
}

/// Weighted NLL sum and the number of correct argmax predictions (for evaluation).
pub fn nll_and_hits(model: &Transformer, batch: &Batch) -> Result<(f64, usize)> {
    if batch.predicted() == 0 {
        return Ok((0.0, 0));
    }
    let logits = predicted_logits(model, batch)?.detach();
    let nll = ops::token_nll(&logits, &batch.targets)?;
    let sum = (nll * &batch.weights)?.sum_all()?.to_scalar::<f32>()? as f64;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    let hits = pred
        .iter()
        .zip(batch.targets.to_vec1::<u32>()?)
        .filter(|(p, t)| **p == *t)
        .count();
    Ok((sum, hits))
}

/// Mean loss of one batch.
pub fn mean_loss(model: &Transformer, batch: &Batch) -> Result<Tensor> {
    nll_sum(model, batch)? / batch.weight()?.max(1e-12)
}

/// Weighted NLL, weight, correct argmax predictions and predicted positions, summed over
/// batches (and, through `to_f32` / `from_f32`, over ranks).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub nll: f64,
    pub weight: f64,
    pub hits: f64,
    pub predicted: f64,
}

impl Totals {
    /// Score one batch (no gradient) and add it.
    pub fn add(&mut self, model: &Transformer, batch: &Batch) -> Result<()> {
        let (nll, hits) = nll_and_hits(model, batch)?;
        self.nll += nll;
        self.weight += batch.weight()?;
        self.hits += hits as f64;
        self.predicted += batch.predicted() as f64;
        Ok(())
    }

    /// Weighted mean NLL (none without weight).
    pub fn mean(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.nll / self.weight)
    }

    /// Share of predicted positions whose argmax is the target.
    pub fn accuracy(&self) -> Option<f64> {
        (self.predicted > 0.0).then(|| self.hits / self.predicted)
    }

    /// For an all-reduce over ranks.
    pub fn to_f32(&self) -> [f32; 4] {
        [
            self.nll as f32,
            self.weight as f32,
            self.hits as f32,
            self.predicted as f32,
        ]
    }

    pub fn from_f32(b: [f32; 4]) -> Self {
        Self {
            nll: b[0] as f64,
            weight: b[1] as f64,
            hits: b[2] as f64,
            predicted: b[3] as f64,
        }
    }
}
