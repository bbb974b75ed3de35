//! Data-parallel gradient sync: the step's gradients are summed over all ranks in buckets,
//! and the buckets of the last micro-batch are all-reduced while its backward pass is still
//! running, as PyTorch DDP does.
//!
//! Buckets follow the order in which the backward pass finishes the parameters' gradients
//! (the output side first), as rank 0 sees it; the order is broadcast, so every rank cuts the
//! same buckets. A bucket goes to the communication thread as soon as all of its gradients
//! are final and every earlier bucket has gone, so all ranks reduce the same buffers in the
//! same order. A parameter without a gradient on this rank contributes zeros.

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

use crate::comm::Comm;
use crate::models::Params;

/// Gradients are all-reduced in buckets of about this many floats (4 MiB): small enough that
/// most of the exchange happens during the backward pass, large enough that the per-bucket
/// latency of the ring stays small beside its transfer time.
pub const BUCKET_FLOATS: usize = 1 << 20;

/// What the last micro-batch's backward and the all-reduce return.
pub struct Synced {
    /// The step's loss summed over all ranks.
    pub loss: f64,
    /// Some rank voted to stop.
    pub stop: bool,
    /// Time the caller waited for the all-reduce after its backward pass ended: the part of
    /// the exchange that the backward pass did not hide.
    pub exposed: Duration,
    /// Buckets reduced, and how many of them were handed over before the pass ended.
    pub buckets: usize,
    pub during_backward: usize,
}

/// How `backward_all_reduced` exchanges the gradients.
#[derive(Debug, Clone, Copy)]
pub struct SyncOptions {
    /// Reduce buckets while the backward pass runs (else after it, in the same buckets).
    pub overlap: bool,
    /// Bucket size in floats (`BUCKET_FLOATS`).
    pub bucket_floats: usize,
}

/// Adds a finished backward pass's gradients into the step's sums, by parameter name.
pub type Accumulate<'a> = dyn FnMut(&GradStore, &mut HashMap<String, Tensor>) -> Result<()> + 'a;

/// The parameters in bucket order, cut into buckets.
struct BucketPlan {
    /// Indices into the parameters' name order, in the order the buckets are reduced.
    order: Vec<usize>,
    /// Ranges of `order`, one per bucket.
    buckets: Vec<Range<usize>>,
}

impl BucketPlan {
    /// Buckets of about `bucket_floats` over `vars` (`index`: theirs by tensor) in the order the
    /// backward pass of `loss` finishes their gradients on rank 0; parameters the graph does not
    /// reach come last.
    fn agreed(
        loss: &Tensor,
        vars: &[(&String, &Tensor)],
        index: &HashMap<TensorId, Vec<usize>>,
        bucket_floats: usize,
        comm: &mut dyn Comm,
    ) -> Result<Self> {
        let mut order: Vec<usize> = loss
            .sorted_nodes()
            .iter()
            .filter(|n| n.is_variable())
            .filter_map(|n| index.get(&n.id()))
            .flatten()
            .copied()
            .collect();
        let mut seen = vec![false; vars.len()];
        order.iter().for_each(|&i| seen[i] = true);
        order.extend((0..vars.len()).filter(|&i| !seen[i]));
        // Indices are exact in f32 up to 2^24 parameter tensors.
        let mut wire: Vec<f32> = order.iter().map(|&i| i as f32).collect();
        comm.broadcast(&mut wire, 0)?;
        let order: Vec<usize> = wire.iter().map(|&i| i as usize).collect();
        let mut check = vec![false; vars.len()];
        for &i in &order {
            anyhow::ensure!(
                i < vars.len() && !check[i],
                "rank 0's bucket order does not match this rank's {} parameters",
                vars.len()
            );
            check[i] = true;
        }
        let mut buckets = Vec::new();
        let (mut start, mut size) = (0, 0);
        for (k, &i) in order.iter().enumerate() {
            size += vars[i].1.elem_count();
            if size >= bucket_floats || k + 1 == order.len() {
                buckets.push(start..k + 1);
                (start, size) = (k + 1, 0);
            }
        }
        if buckets.is_empty() {
            buckets.push(0..0);
        }
        Ok(Self { order, buckets })
    }
}

/// Add `g` (detached) to the step's sum for `name`; the first contribution is stored as is.
pub(super) fn add_into(
    grads: &mut HashMap<String, Tensor>,
    name: &str,
    g: Tensor,
) -> candle_core::Result<()> {
    let sum = match grads.remove(name) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert(name.to_string(), sum);
    Ok(())
}

/// The indices of `vars` by tensor: one parameter may be listed under several names.
fn by_id(vars: &[(&String, &Tensor)]) -> HashMap<TensorId, Vec<usize>> {
    let mut index: HashMap<TensorId, Vec<usize>> = HashMap::new();
    for (i, (_, v)) in vars.iter().enumerate() {
        index.entry(v.id()).or_default().push(i);
    }
    index
}

/// Runs the backward pass of `last` (the step's last micro-batch, its loss already scaled)
/// and sums the step's gradients over all ranks of `comm` into `grads`, which holds the earlier
/// micro-batches' sums on entry. `loss` and `stop` (this rank's loss and stop vote) ride in the
/// last bucket. With `opts.overlap`, buckets are reduced during the backward pass; without it
/// (used when blocks recompute their activations, whose gradients arrive through `accumulate`
/// after the pass) they are reduced after it, in the same buckets, so the result is the same
/// bits.
/// `accumulate(store, grads)` adds a finished backward pass's gradients into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn backward_all_reduced(
    last: &Tensor,
    params: &Params,
    grads: &mut HashMap<String, Tensor>,
    loss: f64,
    stop: bool,
    comm: &mut dyn Comm,
    opts: SyncOptions,
    accumulate: &mut Accumulate<'_>,
) -> Result<Synced> {
    let vars: Vec<(&String, &Tensor)> = params
        .vars
        .iter()
        .map(|(n, v)| (n, v.as_tensor()))
        .collect();
    let index = by_id(&vars);
    let plan = BucketPlan::agreed(last, &vars, &index, opts.bucket_floats, comm)?;
    let mut bucket_of = vec![0; vars.len()];
    for (b, r) in plan.buckets.iter().enumerate() {
        plan.order[r.clone()].iter().for_each(|&i| bucket_of[i] = b);
    }
    let tail = [loss as f32, f32::from(u8::from(stop))];
    let last_bucket = plan.buckets.len() - 1;
    let pack = |b: usize, grads: &HashMap<String, Tensor>| -> Result<Vec<f32>> {
        let r = plan.buckets[b].clone();
        let n: usize = plan.order[r.clone()]
            .iter()
            .map(|&i| vars[i].1.elem_count())
            .sum();
        let mut buf = Vec::with_capacity(n + 2);
        for &i in &plan.order[r] {
            match grads.get(vars[i].0) {
                Some(g) => buf.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => buf.resize(buf.len() + vars[i].1.elem_count(), 0.0),
            }
        }
        if b == last_bucket {
            buf.extend(tail);
        }
        Ok(buf)
    };

    let mut during_backward = 0;
    let (reduced, exposed) = std::thread::scope(|s| -> Result<(Vec<Vec<f32>>, Duration)> {
        let (tx, rx) = mpsc::channel::<Vec<f32>>();
        let exchange = s.spawn(move || -> Result<Vec<Vec<f32>>> {
            let mut out = Vec::new();
            for mut buf in rx {
                comm.all_reduce_sum(&mut buf)?;
                out.push(buf);
            }
            Ok(out)
        });
        let sent = Cell::new(0);
        // Hand over the buckets, in order, whose gradients are all final (all when `flush`).
        let send_ready = |grads: &HashMap<String, Tensor>, pending: &[usize], flush: bool| {
            while sent.get() < plan.buckets.len() && (flush || pending[sent.get()] == 0) {
                // A failed send means the exchange thread stopped; its error comes from join.
                let _ = tx.send(pack(sent.get(), grads)?);
                sent.set(sent.get() + 1);
            }
            anyhow::Ok(())
        };
        let backward = if opts.overlap {
            let mut pending: Vec<usize> = plan.buckets.iter().map(|r| r.len()).collect();
            let mut hook = |var: &Tensor, g: &Tensor| -> candle_core::Result<()> {
                let Some(names) = index.get(&var.id()) else {
                    return Ok(());
                };
                let g = g.detach();
                for &i in names {
                    add_into(grads, vars[i].0, g.clone())?;
                    pending[bucket_of[i]] -= 1;
                }
                send_ready(grads, &pending, false).map_err(candle_core::Error::wrap)
            };
            last.backward_with(&mut hook)
                .map(drop)
                .map_err(anyhow::Error::from)
        } else {
            last.backward()
                .map_err(anyhow::Error::from)
                .and_then(|store| accumulate(&store, grads))
        };
        during_backward = sent.get();
        let flushed = backward.and_then(|()| send_ready(grads, &[], true));
        drop(tx);
        let waited = Instant::now();
        let out = exchange.join().expect("the all-reduce thread panicked");
        let exposed = waited.elapsed();
        flushed?;
        Ok((out.context("all-reduce of the gradient buckets")?, exposed))
    })?;

    let mut total = (loss, stop);
    for (b, mut buf) in reduced.into_iter().enumerate() {
        if b == last_bucket {
            total.1 = buf.pop().expect("vote slot") > 0.0;
            total.0 = buf.pop().expect("loss slot") as f64;
        }
        let mut off = 0;
        for &i in &plan.order[plan.buckets[b].clone()] {
            let (name, var) = vars[i];
            let n = var.elem_count();
            let t = Tensor::from_slice(&buf[off..off + n], var.shape(), var.device())?;
            grads.insert(name.clone(), t);
            off += n;
        }
    }
    Ok(Synced {
        loss: total.0,
        stop: total.1,
        exposed,
        buckets: plan.buckets.len(),
        during_backward,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ring::test_rings;
    use crate::models::Transformer;
    use crate::models::testing::tiny;
    use crate::objectives::{Batch, nll_sum};
    use candle_core::Device;
    use stackwise_common::config::{AttentionMode, Family};

    /// Rank `rank`'s two micro-batches; every rank's differ.
    fn micro_batches(rank: usize) -> Vec<Batch> {
        (0..2)
            .map(|m| {
                let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..2)
                    .map(|r| {
                        let s = rank * 5 + m * 3 + r;
                        (
                            (0..8).map(|i| ((i * 7 + s * 3) % 16) as u32).collect(),
                            vec![1.0; 8],
                        )
                    })
                    .collect();
                Batch::from_rows(&rows, &Device::Cpu).unwrap()
            })
            .collect()
    }

    /// The tiny GPT-2 with one parameter listed under a second name, as a tied weight may be.
    fn model_with_an_alias() -> (Transformer, Params) {
        let cfg = tiny(Family::Gpt2, AttentionMode::Causal, None);
        let (model, mut params) = Transformer::init(&cfg, 3, &Device::Cpu).unwrap();
        let first = params.vars.values().next().unwrap().clone();
        params.vars.insert("zz.alias".into(), first);
        (model, params)
    }

    type Grads = std::collections::BTreeMap<String, Vec<f32>>;

    fn flat(grads: &HashMap<String, Tensor>) -> Grads {
        grads
            .iter()
            .map(|(n, g)| (n.clone(), g.flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    /// This rank's step: the first micro-batch's gradients by a plain backward pass, then the
    /// second's through `backward_all_reduced`.
    fn rank_step(comm: &mut dyn Comm, world: usize, opts: SyncOptions) -> (f64, Grads, Synced) {
        let (model, params) = model_with_an_alias();
        let total: f64 = (0..world)
            .flat_map(micro_batches)
            .map(|b| b.weight().unwrap())
            .sum();
        let batches = micro_batches(comm.rank());
        let mut grads = HashMap::new();
        let first = (nll_sum(&model, &batches[0]).unwrap() / total).unwrap();
        let store = first.backward().unwrap();
        for (name, var) in &params.vars {
            grads.insert(name.clone(), store.get(var.as_tensor()).unwrap().detach());
        }
        let last = (nll_sum(&model, &batches[1]).unwrap() / total).unwrap();
        let loss = (first.to_scalar::<f32>().unwrap() + last.to_scalar::<f32>().unwrap()) as f64;
        let mut unused = |_: &GradStore, _: &mut HashMap<String, Tensor>| anyhow::Ok(());
        let mut accumulate = |store: &GradStore, grads: &mut HashMap<String, Tensor>| {
            for (name, var) in &params.vars {
                add_into(grads, name, store.get(var.as_tensor()).unwrap().detach())?;
            }
            anyhow::Ok(())
        };
        let acc: &mut dyn FnMut(&_, &mut _) -> Result<()> = if opts.overlap {
            &mut unused
        } else {
            &mut accumulate
        };
        let synced =
            backward_all_reduced(&last, &params, &mut grads, loss, false, comm, opts, acc).unwrap();
        (synced.loss, flat(&grads), synced)
    }

    #[test]
    fn buckets_reduced_during_the_backward_pass_give_the_bits_of_reducing_after_it() {
        let world = 3;
        // Small buckets, so the tiny model's gradients fill several.
        let run = |overlap: bool| -> Vec<(f64, Grads, Synced)> {
            let opts = SyncOptions {
                overlap,
                bucket_floats: 300,
            };
            let hs: Vec<_> = test_rings(world, 1)
                .into_iter()
                .map(|mut ring| std::thread::spawn(move || rank_step(&mut ring, world, opts)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        };
        let overlapped = run(true);
        let after = run(false);
        let (loss, grads, synced) = &overlapped[0];
        assert!(synced.buckets >= 4, "{} buckets", synced.buckets);
        // Every bucket is handed over from inside the backward walk, the last one when the
        // embeddings' gradients (the walk's last variables) are final.
        assert_eq!(synced.during_backward, synced.buckets);
        for (l, g, s) in overlapped.iter().chain(&after) {
            assert_eq!(l.to_bits(), loss.to_bits());
            assert_eq!(g, grads, "every rank and both ways: the same bits");
            assert_eq!(s.buckets, synced.buckets);
        }
        assert!(after.iter().all(|(_, _, s)| s.during_backward == 0));

        // The same sums as one process that runs every rank's micro-batches.
        let (model, params) = model_with_an_alias();
        let all: Vec<Batch> = (0..world).flat_map(micro_batches).collect();
        let (one_loss, _, one) =
            crate::train::step::gradients(&model, &params, &all, &mut crate::comm::Local).unwrap();
        assert!((one_loss - loss).abs() < 1e-5, "{one_loss} vs {loss}");
        assert_eq!(one.len(), grads.len());
        for (name, g) in flat(&one) {
            let d = g
                .iter()
                .zip(&grads[&name])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{name}: max |diff| {d}");
        }
    }
}
