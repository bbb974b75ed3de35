//! Data-parallel gradient sync: the step's gradients are summed over all ranks in buckets,
//! and the buckets of the last micro-batch are all-reduced while its backward pass is still
//! running, as PyTorch DDP does.
//!
//! Buckets follow the order in which the backward pass finishes the parameters' gradients
//! (the output side first), as rank 0 sees it; the order is broadcast, so every rank cuts the
//! same buckets. A bucket goes to the communication thread as soon as all of its gradients
//! are final and every earlier bucket has gone, so all ranks reduce the same buffers in the
//! same order. A parameter without a gradient on this rank contributes zeros.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

use crate::comm::Comm;
use crate::models::Params;
use crate::models::recompute::{FinalGrad, GradSink};

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
    /// Buckets reduced, and how many of them had all their gradients before the pass ended.
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
        sink: Option<&GradSink>,
        bucket_floats: usize,
        comm: &mut dyn Comm,
    ) -> Result<Self> {
        // A recomputed block's parameters are not in the graph: they come where its output is.
        let blocks = sink
            .map(GradSink::params_behind_outputs)
            .unwrap_or_default();
        let mut order: Vec<usize> = Vec::new();
        let mut seen = vec![false; vars.len()];
        for n in loss.sorted_nodes() {
            let own = [n.id()];
            let ids = match blocks.get(&n.id()) {
                Some(ids) => ids.as_slice(),
                None => &own[..],
            };
            // A block's parameters in name order (candle hands them over in a hash map's), so
            // rank 0 cuts the same buckets every step: where a bucket ends decides the order
            // in which the ring sums an element.
            let mut group: Vec<usize> = ids
                .iter()
                .filter_map(|id| index.get(id))
                .flatten()
                .copied()
                .filter(|&i| !seen[i])
                .collect();
            group.sort_unstable();
            group.dedup();
            for i in group {
                seen[i] = true;
                order.push(i);
            }
        }
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

/// Recomputed blocks hand their gradients to the exchange thread while this lives.
struct Listening<'a>(&'a GradSink);

impl<'a> Listening<'a> {
    fn start(sink: &'a GradSink, tx: mpsc::Sender<FinalGrad>) -> Self {
        sink.listen(Some(tx));
        Self(sink)
    }
}

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.listen(None);
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

/// The parameters' names and tensors, in the parameters' name order.
fn named(params: &Params) -> Vec<(&String, &Tensor)> {
    params
        .vars
        .iter()
        .map(|(n, v)| (n, v.as_tensor()))
        .collect()
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
/// they are reduced after it, in the same buckets, so the result is the same bits.
///
/// The exchange thread owns the step's sums while the pass runs: the walk (and `sink`, the
/// model's recomputed blocks, as each block's backward ends) hands it every final gradient;
/// it adds them in and all-reduces each bucket once its gradients are all in and every earlier
/// bucket has gone.
/// `accumulate(store, grads)` adds a finished backward pass's gradients into `grads` (used
/// without the overlap).
#[allow(clippy::too_many_arguments)]
pub fn backward_all_reduced(
    last: &Tensor,
    params: &Params,
    grads: &mut HashMap<String, Tensor>,
    loss: f64,
    stop: bool,
    comm: &mut dyn Comm,
    sink: Option<&GradSink>,
    opts: SyncOptions,
    accumulate: &mut Accumulate<'_>,
) -> Result<Synced> {
    let vars = named(params);
    let index = by_id(&vars);
    let plan = BucketPlan::agreed(last, &vars, &index, sink, opts.bucket_floats, comm)?;
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
    if !opts.overlap {
        let store = last.backward()?;
        accumulate(&store, grads)?;
    }

    let walked = AtomicBool::new(false);
    let (reduced, during_backward, exposed) =
        std::thread::scope(|s| -> Result<(Vec<Vec<f32>>, usize, Duration)> {
            let (tx, rx) = mpsc::channel::<FinalGrad>();
            let (vars, index, plan, walked) = (&vars, &index, &plan, &walked);
            let grads = &mut *grads;
            let exchange = s.spawn(move || -> Result<(Vec<Vec<f32>>, usize)> {
                let mut pending: Vec<usize> = plan.buckets.iter().map(|r| r.len()).collect();
                let mut out = Vec::new();
                // Reduce the buckets, in order, whose gradients are all in (all when `flush`).
                let mut reduce_ready = |out: &mut Vec<Vec<f32>>,
                                        grads: &HashMap<String, Tensor>,
                                        pending: &[usize],
                                        flush: bool|
                 -> Result<()> {
                    while out.len() < plan.buckets.len() && (flush || pending[out.len()] == 0) {
                        let mut buf = pack(out.len(), grads)?;
                        comm.all_reduce_sum(&mut buf)?;
                        out.push(buf);
                    }
                    Ok(())
                };
                for FinalGrad(id, g) in rx {
                    for &i in index.get(&id).into_iter().flatten() {
                        anyhow::ensure!(
                            pending[bucket_of[i]] > 0 && bucket_of[i] >= out.len(),
                            "the gradient of {} arrived after its bucket was reduced; \
                             set training.overlap_comm: false",
                            vars[i].0
                        );
                        add_into(grads, vars[i].0, g.clone())?;
                        pending[bucket_of[i]] -= 1;
                    }
                    reduce_ready(&mut out, grads, &pending, false)?;
                }
                let during_backward = out.len();
                if !walked.load(Ordering::SeqCst) {
                    anyhow::bail!("the backward pass failed");
                }
                reduce_ready(&mut out, grads, &pending, true)?;
                Ok((out, during_backward))
            });
            let backward = if opts.overlap {
                let hook_tx = tx.clone();
                let mut hook = |var: &Tensor, g: &Tensor| -> candle_core::Result<()> {
                    // A failed send means the exchange thread stopped; its error comes from join.
                    let _ = hook_tx.send(FinalGrad(var.id(), g.detach()));
                    Ok(())
                };
                // The sink's sender is dropped when the walk ends, even by a panic, so the
                // exchange thread's channel closes.
                let _listening = sink.map(|s| Listening::start(s, tx.clone()));
                last.backward_with(&mut hook)
                    .map(drop)
                    .map_err(anyhow::Error::from)
            } else {
                Ok(())
            };
            // Without it (the backward failed) the exchange ends without reducing what is left.
            walked.store(backward.is_ok(), Ordering::SeqCst);
            drop(tx);
            let waited = Instant::now();
            let out = exchange.join().expect("the all-reduce thread panicked");
            let exposed = waited.elapsed();
            backward?;
            let (out, during) = out.context("all-reduce of the gradient buckets")?;
            Ok((out, during, exposed))
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
    use crate::comm::Ring;
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
        let synced = backward_all_reduced(
            &last, &params, &mut grads, loss, false, comm, None, opts, acc,
        )
        .unwrap();
        (synced.loss, flat(&grads), synced)
    }

    /// `step` on every rank of a `world`-rank ring (threads joined by real TCP), with
    /// buckets small enough that the tiny model's gradients fill several.
    fn on_ranks(
        world: usize,
        overlap: bool,
        step: fn(&mut Ring, usize, SyncOptions) -> (f64, Grads, Synced),
    ) -> Vec<(f64, Grads, Synced)> {
        let opts = SyncOptions {
            overlap,
            bucket_floats: 300,
        };
        let hs: Vec<_> = test_rings(world, 1)
            .into_iter()
            .map(|mut ring| std::thread::spawn(move || step(&mut ring, world, opts)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn buckets_reduced_during_the_backward_pass_give_the_bits_of_reducing_after_it() {
        let world = 3;
        let run = |overlap: bool| {
            on_ranks(world, overlap, |ring, world, opts| {
                rank_step(ring, world, opts)
            })
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

    /// A tiny GPT-2 whose blocks recompute their activations in the backward pass.
    fn recomputing_model() -> (Transformer, Params) {
        let cfg = tiny(Family::Gpt2, AttentionMode::Causal, None);
        let (mut model, params) = Transformer::init(&cfg, 3, &Device::Cpu).unwrap();
        model.recompute = Some(std::sync::Arc::new(GradSink::new(false)));
        (model, params)
    }

    /// The block a parameter belongs to (`transformer.h.{i}.…`), if any.
    fn block_of(name: &str) -> Option<usize> {
        name.strip_prefix("transformer.h.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    #[test]
    fn the_bucket_plan_puts_recomputed_blocks_where_the_backward_pass_finishes_them() {
        let (model, params) = recomputing_model();
        let sink = model.recompute.clone().unwrap();
        let vars = named(&params);
        let index = by_id(&vars);
        let batch = &micro_batches(0)[0];
        // The first backward pass shows which parameters each block's backward finishes.
        nll_sum(&model, batch).unwrap().backward().unwrap();
        sink.clear();
        let loss = nll_sum(&model, batch).unwrap();
        let plan = BucketPlan::agreed(
            &loss,
            &vars,
            &index,
            Some(&sink),
            300,
            &mut crate::comm::Local,
        )
        .unwrap();
        let names: Vec<&str> = plan.order.iter().map(|&i| vars[i].0.as_str()).collect();
        let at = |pred: &dyn Fn(&str) -> bool| -> Vec<usize> {
            names
                .iter()
                .enumerate()
                .filter(|(_, n)| pred(n))
                .map(|(k, _)| k)
                .collect()
        };
        let (block1, block0) = (
            at(&|n| block_of(n) == Some(1)),
            at(&|n| block_of(n) == Some(0)),
        );
        let wpe = at(&|n| n.contains("wpe"));
        let ln_f = at(&|n| n.contains("ln_f"));
        assert!(
            !block1.is_empty() && !block0.is_empty() && wpe.len() == 1,
            "{names:?}"
        );
        // The output side first: the final norm, then block 1, then block 0, then the
        // position embedding (the walk's last parameters).
        assert!(ln_f.iter().max() < block1.iter().min(), "{names:?}");
        assert!(block1.iter().max() < block0.iter().min(), "{names:?}");
        assert!(block0.iter().max() < wpe.iter().min(), "{names:?}");
    }

    /// Two steps of one micro-batch on `recomputing_model` (the second's bucket plan knows
    /// where the blocks' gradients come); the second step's loss, gradients and sync.
    fn recomputing_rank_steps(
        ring: &mut Ring,
        world: usize,
        opts: SyncOptions,
    ) -> (f64, Grads, Synced) {
        let (model, params) = recomputing_model();
        let sink = model.recompute.clone();
        let total: f64 = (0..world)
            .map(|r| micro_batches(r)[1].weight().unwrap())
            .sum();
        let batch = &micro_batches(ring.rank())[1];
        let mut acc = |store: &GradStore, grads: &mut HashMap<String, Tensor>| {
            for (name, var) in &params.vars {
                let g = sink.as_ref().and_then(|s| s.take(var.as_tensor()));
                let g = g.or_else(|| store.get(var.as_tensor()).cloned());
                add_into(grads, name, g.unwrap().detach())?;
            }
            anyhow::Ok(())
        };
        let mut last = None;
        for _ in 0..2 {
            let l = (nll_sum(&model, batch).unwrap() / total).unwrap();
            let loss = l.to_scalar::<f32>().unwrap() as f64;
            let mut grads = HashMap::new();
            let synced = backward_all_reduced(
                &l,
                &params,
                &mut grads,
                loss,
                false,
                ring,
                sink.as_deref(),
                opts,
                &mut acc,
            )
            .unwrap();
            last = Some((synced.loss, flat(&grads), synced));
        }
        last.unwrap()
    }

    #[test]
    fn recomputed_blocks_reduced_during_the_backward_pass_give_the_bits_of_reducing_after_it() {
        let world = 3;
        let run = |overlap: bool| on_ranks(world, overlap, recomputing_rank_steps);
        let (overlapped, after) = (run(true), run(false));
        let synced = &overlapped[0].2;
        assert!(synced.buckets >= 4, "{} buckets", synced.buckets);
        // Every bucket got its gradients inside the walk: the recomputed blocks' ones as
        // each block's backward ended.
        assert_eq!(synced.during_backward, synced.buckets);
        let (loss, grads) = (overlapped[0].0, &overlapped[0].1);
        for (l, g, s) in overlapped.iter().chain(&after) {
            assert_eq!(l.to_bits(), loss.to_bits());
            assert_eq!(g, grads, "every rank and both ways: the same bits");
            assert_eq!(s.buckets, synced.buckets);
        }
        // The sums of the plain model (no recomputation) over every rank's batch.
        let (mut model, params) = recomputing_model();
        model.recompute = None;
        let all: Vec<Batch> = (0..world).map(|r| micro_batches(r).remove(1)).collect();
        let (one_loss, _, one) =
            crate::train::step::gradients(&model, &params, &all, &mut crate::comm::Local).unwrap();
        assert!((one_loss - loss).abs() < 1e-5, "{one_loss} vs {loss}");
        assert_eq!(one.len(), grads.len());
        for (name, g) in grads {
            let want = &flat(&one)[name];
            let d = g
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{name}: max |diff| {d}");
        }
    }
}
