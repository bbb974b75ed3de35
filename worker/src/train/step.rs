//! One optimizer step, shared by the trainer and the benchmarks: micro-batches → gradients
//! summed across them (each scaled by its share of the global target count, so accumulation
//! equals one big batch) → global-norm clip → AdamW, or a skip when anything is non-finite.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use crate::models::{Params, Transformer};
use crate::objectives::{Batch, nll_sum};
use crate::optim::AdamW;
use crate::optim::adamw::clip_grad_norm;

#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss over the step's target tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub skipped: bool,
}

/// Loss and summed gradients (by parameter name) of `batches`.
pub fn gradients(
    model: &Transformer,
    params: &Params,
    batches: &[Batch],
) -> Result<(f64, f64, HashMap<String, Tensor>)> {
    let total_weight: f64 = batches.iter().map(Batch::weight).sum::<Result<f64>>()?;
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut loss = 0f64;
    if total_weight == 0.0 {
        return Ok((0.0, 0.0, grads));
    }
    for b in batches {
        let l = (nll_sum(model, b)? / total_weight)?;
        loss += l.to_scalar::<f32>()? as f64;
        let g = l.backward()?;
        for (name, var) in &params.vars {
            if let Some(gt) = g.get(var.as_tensor()) {
                let sum = match grads.remove(name) {
                    Some(prev) => (prev + gt)?,
                    None => gt.clone(),
                };
                grads.insert(name.clone(), sum);
            }
        }
    }
    Ok((loss, total_weight, grads))
}

/// Gradients, clipping and the AdamW update with learning rate `lr`.
pub fn train_step(
    model: &Transformer,
    params: &Params,
    opt: &mut AdamW,
    batches: &[Batch],
    grad_clip: Option<f64>,
    lr: f64,
) -> Result<StepStats> {
    let tokens = batches.iter().map(Batch::tokens).sum();
    let (loss, weight, mut grads) = gradients(model, params, batches)?;
    let grad_norm = clip_grad_norm(&mut grads, grad_clip)?;
    let skipped = weight == 0.0 || !loss.is_finite() || !grad_norm.is_finite();
    if !skipped {
        opt.step(&grads, lr)?;
    }
    Ok(StepStats {
        loss,
        grad_norm,
        tokens,
        skipped,
    })
}
