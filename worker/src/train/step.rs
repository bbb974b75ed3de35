//! One optimizer step, shared by the trainer and the benchmarks: micro-batches → gradients
//! summed across them (each scaled by its share of the global target count, so accumulation
//! equals one big batch) → all-reduce across ranks → global-norm clip → AdamW, or a skip
//! when anything is non-finite on any rank.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;

use crate::comm::Comm;
use crate::models::{Params, Transformer};
use crate::objectives::{Batch, nll_sum};
use crate::optim::AdamW;
use crate::optim::adamw::clip_grad_norm;

/// Gradients are all-reduced in buckets of at most this many floats (32 MiB), which bounds
/// the staging memory of the exchange.
pub const BUCKET_FLOATS: usize = 8 << 20;

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
}

/// Loss, global target count and gradients (by parameter name) of `batches` on this rank,
/// summed over all ranks of `comm`: every rank returns the same values.
pub fn gradients(
    model: &Transformer,
    params: &Params,
    batches: &[Batch],
    comm: &mut dyn Comm,
) -> Result<(f64, f64, HashMap<String, Tensor>)> {
    let (loss, weight, grads, _) = gradients_voting(model, params, batches, comm, false, 0)?;
    Ok((loss, weight, grads))
}

/// `gradients`, plus a vote carried in the gradients' last bucket: the returned flag is set
/// on every rank when any rank voted `stop` (a checkpoint-and-stop request reaches the ranks
/// at different steps; the vote makes them stop at the same one). `step` seeds the adapters'
/// dropout masks (`ops::dropout`), with the micro-batch and the rank.
pub fn gradients_voting(
    model: &Transformer,
    params: &Params,
    batches: &[Batch],
    comm: &mut dyn Comm,
    stop: bool,
    step: u64,
) -> Result<(f64, f64, HashMap<String, Tensor>, bool)> {
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
        return Ok((0.0, 0.0, grads, v[0] > 0.0));
    }
    for (i, b) in batches.iter().enumerate() {
        // Forward and backward (which may recompute blocks) draw the same dropout masks.
        let _dropout = crate::ops::dropout::TrainingScope::enter(step, i, comm.rank());
        let l = (nll_sum(model, b)? / total_weight)?;
        loss += l.to_scalar::<f32>()? as f64;
        let g = l.backward()?;
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
            let gt = gt.detach();
            let sum = match grads.remove(name) {
                Some(prev) => (prev + gt)?,
                None => gt,
            };
            grads.insert(name.clone(), sum);
        }
        if let Some(sink) = &model.recompute {
            sink.clear();
        }
    }
    let mut agreed = stop;
    if comm.world_size() > 1 {
        (loss, agreed) = all_reduce_gradients(params, &mut grads, loss, stop, comm)?;
    }
    Ok((loss, total_weight, grads, agreed))
}

/// Sum `grads` (and the scalar `loss`) over all ranks, packed into buckets of about
/// `BUCKET_FLOATS` in parameter order; the loss and the stop vote ride in the last bucket.
/// A parameter without a gradient on this rank contributes zeros.
fn all_reduce_gradients(
    params: &Params,
    grads: &mut HashMap<String, Tensor>,
    loss: f64,
    stop: bool,
    comm: &mut dyn Comm,
) -> Result<(f64, bool)> {
    let vars: Vec<(&String, &Tensor)> = params
        .vars
        .iter()
        .map(|(n, v)| (n, v.as_tensor()))
        .collect();
    let mut buckets: Vec<std::ops::Range<usize>> = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, (_, v)) in vars.iter().enumerate() {
        size += v.elem_count();
        if size >= BUCKET_FLOATS || i + 1 == vars.len() {
            buckets.push(start..i + 1);
            (start, size) = (i + 1, 0);
        }
    }
    if buckets.is_empty() {
        buckets.push(0..0);
    }
    let last = buckets.len() - 1;
    let mut total_loss = loss;
    let mut agreed = stop;
    let mut buf: Vec<f32> = Vec::new();
    for (b, range) in buckets.into_iter().enumerate() {
        buf.clear();
        for (name, var) in &vars[range.clone()] {
            match grads.get(*name) {
                Some(g) => buf.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => buf.resize(buf.len() + var.elem_count(), 0.0),
            }
        }
        if b == last {
            buf.push(loss as f32);
            buf.push(f32::from(u8::from(stop)));
        }
        comm.all_reduce_sum(&mut buf)?;
        if b == last {
            agreed = buf.pop().expect("vote slot") > 0.0;
            total_loss = buf.pop().expect("loss slot") as f64;
        }
        let mut off = 0;
        for (name, var) in &vars[range] {
            let n = var.elem_count();
            let t = Tensor::from_slice(&buf[off..off + n], var.shape(), var.device())?;
            grads.insert((*name).clone(), t);
            off += n;
        }
    }
    Ok((total_loss, agreed))
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
        model, params, opt, batches, grad_clip, lr, comm, false, step,
    )
}

/// `train_step` with a stop vote (see `gradients_voting`); `step` (the run's step count, the
/// same at this step of a resumed run) seeds the adapters' dropout masks.
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
) -> Result<StepStats> {
    let tokens = batches.iter().map(Batch::tokens).sum();
    let (loss, weight, mut grads, stop) =
        gradients_voting(model, params, batches, comm, stop, step)?;
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
    })
}
