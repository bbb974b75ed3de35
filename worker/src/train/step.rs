//! One optimizer step, shared by the trainer and the benchmarks: micro-batches → gradients
//! summed across them (each scaled by its share of the global target count, so accumulation
//! equals one big batch) → all-reduce across ranks (during the last micro-batch's backward
//! pass, `grad_sync`) → global-norm clip → AdamW, or a skip when anything is non-finite on
//! any rank.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Result;
use candle_core::Tensor;
use candle_core::backprop::GradStore;

use super::grad_sync;
use crate::comm::Comm;
use crate::models::{Params, Transformer};
use crate::objectives::{Batch, nll_sum};
use crate::optim::AdamW;
use crate::optim::adamw::clip_grad_norm;

#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss over the step's target tokens (all ranks).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens this rank processed.
    pub tokens: usize,
    /// Loss tokens of the step on all ranks (its target count).
    pub loss_tokens: f64,
    /// Micro-batches of the step.
    pub micro_batches: usize,
    pub skipped: bool,
    /// Some rank voted to stop after this step (every rank sees the same answer).
    pub stop: bool,
    /// The step count after this step (set by the trainer).
    pub step: u64,
    /// The step finished a pass over the training data (set by the trainer).
    pub epoch_ended: bool,
    /// Seconds the step waited for the gradient all-reduce after its backward pass (the part
    /// the overlap did not hide; 0 on one rank).
    pub allreduce_exposed_s: f64,
}

/// The step's gradients, summed over its micro-batches and all ranks.
pub struct StepGradients {
    /// Mean loss over the step's target tokens.
    pub loss: f64,
    /// The step's target count on all ranks.
    pub weight: f64,
    /// By parameter name.
    pub grads: HashMap<String, Tensor>,
    /// Some rank voted to stop.
    pub stop: bool,
    /// Time waited for the all-reduce after the last backward pass.
    pub exposed: Duration,
}

/// Loss, global target count and gradients (by parameter name) of `batches` on this rank,
/// summed over all ranks of `comm`: every rank returns the same values.
pub fn gradients(
    model: &Transformer,
    params: &Params,
    batches: &[Batch],
    comm: &mut dyn Comm,
) -> Result<(f64, f64, HashMap<String, Tensor>)> {
    let g = gradients_voting(model, params, batches, comm, false, 0, true)?;
    Ok((g.loss, g.weight, g.grads))
}

/// `gradients`, plus a vote carried in the gradients' last bucket: the returned flag is set
/// on every rank when any rank voted `stop` (a checkpoint-and-stop request reaches the ranks
/// at different steps; the vote makes them stop at the same one). `step` seeds the adapters'
/// dropout masks (`ops::dropout`), with the micro-batch and the rank. With `overlap`, the
/// last micro-batch's gradients are all-reduced during its backward pass
/// (`training.overlap_comm`).
pub fn gradients_voting(
    model: &Transformer,
    params: &Params,
    batches: &[Batch],
    comm: &mut dyn Comm,
    stop: bool,
    step: u64,
    overlap: bool,
) -> Result<StepGradients> {
    let local_weight: f64 = batches
        .iter()
        .map(Batch::weight)
        .sum::<candle_core::Result<f64>>()?;
    let total_weight = if comm.world_size() > 1 {
        // Target counts are integers; f32 holds them exactly up to 2^24 per step.
        let mut w = [local_weight as f32];
        comm.all_reduce_sum(&mut w)?;
        w[0] as f64
    } else {
        local_weight
    };
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut loss = 0f64;
    if total_weight == 0.0 {
        let mut v = [f32::from(u8::from(stop))];
        if comm.world_size() > 1 {
            comm.all_reduce_sum(&mut v)?;
        }
        return Ok(StepGradients {
            loss: 0.0,
            weight: 0.0,
            grads,
            stop: v[0] > 0.0,
            exposed: Duration::ZERO,
        });
    }
    let mut agreed = stop;
    let mut exposed = Duration::ZERO;
    let mut accumulate = |g: &GradStore, grads: &mut HashMap<String, Tensor>| -> Result<()> {
        accumulate_gradients(model, params, g, grads)
    };
    for (i, b) in batches.iter().enumerate() {
        // Forward and backward (which may recompute blocks) draw the same dropout masks.
        let _dropout = crate::ops::dropout::TrainingScope::enter(step, i, comm.rank());
        let l = (nll_sum(model, b)? / total_weight)?;
        loss += l.to_scalar::<f32>()? as f64;
        if i + 1 == batches.len() && comm.world_size() > 1 {
            let opts = grad_sync::SyncOptions {
                overlap,
                bucket_floats: grad_sync::BUCKET_FLOATS,
            };
            let synced = grad_sync::backward_all_reduced(
                &l,
                params,
                &mut grads,
                loss,
                stop,
                comm,
                model.recompute.as_deref(),
                opts,
                &mut accumulate,
            )?;
            (loss, agreed, exposed) = (synced.loss, synced.stop, synced.exposed);
        } else {
            let g = l.backward()?;
            accumulate(&g, &mut grads)?;
        }
    }
    Ok(StepGradients {
        loss,
        weight: total_weight,
        grads,
        stop: agreed,
        exposed,
    })
}

/// Add the gradients of one backward pass (`g`, and those recomputed blocks left in the
/// model's sink) into `grads`, by parameter name.
fn accumulate_gradients(
    model: &Transformer,
    params: &Params,
    g: &GradStore,
    grads: &mut HashMap<String, Tensor>,
) -> Result<()> {
    for (name, var) in &params.vars {
        // A parameter inside a recomputed block gets its gradient from the sink.
        let recomputed = model
            .recompute
            .as_ref()
            .and_then(|s| s.take(var.as_tensor()));
        let gt = match (g.get(var.as_tensor()), recomputed) {
            (Some(a), Some(b)) => (a + b)?,
            (Some(a), None) => a.clone(),
            (None, Some(b)) => b,
            (None, None) => continue,
        };
        // Detached: a gradient keeps the graph that made it, and with it the micro-batch's
        // activations, through the next micro-batches of the step.
        grad_sync::add_into(grads, name, gt.detach())?;
    }
    if let Some(sink) = &model.recompute {
        sink.clear();
    }
    Ok(())
}

/// Gradients, clipping and the AdamW update with learning rate `lr`. The skip decision is
/// taken on all-reduced values, so every rank skips together.
pub fn train_step(
    model: &Transformer,
    params: &Params,
    opt: &mut AdamW,
    batches: &[Batch],
    grad_clip: Option<f64>,
    lr: f64,
    comm: &mut dyn Comm,
) -> Result<StepStats> {
    let step = opt.step;
    train_step_voting(
        model, params, opt, batches, grad_clip, lr, comm, false, step, true,
    )
}

/// `train_step` with a stop vote (see `gradients_voting`); `step` (the run's step count, the
/// same at this step of a resumed run) seeds the adapters' dropout masks; `overlap` as in
/// `gradients_voting`.
#[allow(clippy::too_many_arguments)]
pub fn train_step_voting(
    model: &Transformer,
    params: &Params,
    opt: &mut AdamW,
    batches: &[Batch],
    grad_clip: Option<f64>,
    lr: f64,
    comm: &mut dyn Comm,
    stop: bool,
    step: u64,
    overlap: bool,
) -> Result<StepStats> {
    let tokens = batches.iter().map(Batch::tokens).sum();
    let StepGradients {
        loss,
        weight,
        mut grads,
        stop,
        exposed,
    } = gradients_voting(model, params, batches, comm, stop, step, overlap)?;
    let grad_norm = clip_grad_norm(&mut grads, grad_clip)?;
    let skipped = weight == 0.0 || !loss.is_finite() || !grad_norm.is_finite();
    if !skipped {
        opt.step(&grads, lr)?;
    }
    Ok(StepStats {
        loss,
        grad_norm,
        tokens,
        loss_tokens: weight,
        micro_batches: batches.len(),
        skipped,
        stop,
        step: 0,
        epoch_ended: false,
        allreduce_exposed_s: exposed.as_secs_f64(),
    })
}
