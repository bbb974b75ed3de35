//! Gradient checkpointing: a decoder block runs as one op whose forward keeps no graph (only
//! its input is saved) and whose backward recomputes the block with a graph and backpropagates
//! through it. The gradient of the input goes back into the outer graph; the gradients of the
//! block's own parameters (weights, LoRA, BOFT) go to a [`GradSink`] the train step reads.
//! Same math, so the gradients equal the plain run's; the memory of every block's
//! activations is traded for a second forward of it in the backward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor, TensorId, Var};

use super::block::Block;
use super::rope::Rope;
use crate::ops::cpu::f32_slice;

/// Parameter gradients of recomputed blocks, by the parameter's tensor id, summed; or, while a
/// listener is set (the overlapped all-reduce of a step's last backward pass), handed to it
/// as each block's backward finishes them.
#[derive(Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
    listener: Mutex<Option<mpsc::Sender<FinalGrad>>>,
    /// The parameters whose gradients each block's backward produced, as first seen.
    block_params: Mutex<HashMap<usize, Vec<TensorId>>>,
    /// The output of each block in the latest forward pass, and its block.
    outputs: Mutex<Vec<(TensorId, usize)>>,
    /// The embeddings do not train, so nothing upstream of the first block needs a gradient:
    /// its input enters as a variable of its own, or candle's backward would never reach
    /// the recomputed blocks (their parameters are inside the op, not in the outer graph).
    pub constant_embeddings: bool,
}

/// A parameter's gradient, final for this backward pass.
pub struct FinalGrad(pub TensorId, pub Tensor);

impl GradSink {
    pub fn new(constant_embeddings: bool) -> Self {
        Self {
            constant_embeddings,
            ..Self::default()
        }
    }

    /// A recomputed block's gradient of parameter `id`.
    fn deliver(&self, block: usize, id: TensorId, g: &Tensor) -> Result<()> {
        // A gradient candle computed carries the graph of the ops that made it, and so the
        // recomputed block's activations: detached, they are freed when the block's backward
        // ends, which is the point of recomputing.
        let g = g.detach();
        {
            let mut seen = self.block_params.lock().expect("grad sink lock");
            let ids = seen.entry(block).or_default();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        if let Some(tx) = &*self.listener.lock().expect("grad sink lock") {
            // A closed channel means the all-reduce stopped; its error reaches the step.
            let _ = tx.send(FinalGrad(id, g));
            return Ok(());
        }
        let mut map = self.grads.lock().expect("grad sink lock");
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Hand the gradients of the blocks recomputed from now on to `tx` (None: keep them here).
    pub fn listen(&self, tx: Option<mpsc::Sender<FinalGrad>>) {
        *self.listener.lock().expect("grad sink lock") = tx;
    }

    /// For each block output of the latest forward pass, the parameters its backward finishes,
    /// as the last backward of that block produced them (none before the first).
    pub fn params_behind_outputs(&self) -> HashMap<TensorId, Vec<TensorId>> {
        let outputs = self.outputs.lock().expect("grad sink lock");
        let seen = self.block_params.lock().expect("grad sink lock");
        outputs
            .iter()
            .filter_map(|(id, block)| Some((*id, seen.get(block)?.clone())))
            .collect()
    }

    fn note_output(&self, block: usize, y: &Tensor) {
        let mut outputs = self.outputs.lock().expect("grad sink lock");
        if block == 0 {
            // A new forward pass: only its blocks' outputs are looked up.
            outputs.clear();
        }
        outputs.push((y.id(), block));
    }

    /// The summed gradient of the parameter `t`, removed from the sink.
    pub fn take(&self, t: &Tensor) -> Option<Tensor> {
        self.grads.lock().expect("grad sink lock").remove(&t.id())
    }

    /// Forget what is left (a step that did not read it).
    pub fn clear(&self) {
        self.grads.lock().expect("grad sink lock").clear();
    }
}

struct Recompute {
    /// The block's index in the model.
    index: usize,
    block: Block,
    rope: Option<Rope>,
    sink: Arc<GradSink>,
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "sw-recompute-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = Tensor::from_slice(f32_slice(s, l, self.name())?, l.shape(), &Device::Cpu)?;
        let y = self
            .block
            .forward(&x, self.rope.as_ref(), 0, None)?
            .detach();
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        let xv = Var::from_tensor(&x.detach())?;
        let y = self
            .block
            .forward(xv.as_tensor(), self.rope.as_ref(), 0, None)?;
        let grads = (y * gy.detach())?.sum_all()?.backward()?;
        for id in grads.get_ids() {
            if *id != xv.as_tensor().id()
                && let Some(g) = grads.get_id(*id)
            {
                self.sink.deliver(self.index, *id, g)?;
            }
        }
        Ok(grads.get(xv.as_tensor()).map(Tensor::detach))
    }
}

/// `block(x)` with its activations recomputed in the backward (f32 on the CPU; elsewhere the
/// plain forward). `constant_input`: nothing upstream of `x` trains, so `x` enters as a
/// variable of its own (else candle's backward would never reach the op: the block's
/// parameters are inside it, not in the outer graph).
pub fn block_forward(
    index: usize,
    block: &Block,
    x: &Tensor,
    rope: Option<&Rope>,
    sink: &Arc<GradSink>,
    constant_input: bool,
) -> Result<Tensor> {
    if !crate::ops::cpu::fused_ok(x) {
        return block.forward(x, rope, 0, None);
    }
    let x = if constant_input {
        Var::from_tensor(&x.detach())?.as_tensor().clone()
    } else {
        x.contiguous()?
    };
    let y = x.apply_op1(Recompute {
        index,
        block: block.clone(),
        rope: rope.cloned(),
        sink: sink.clone(),
    })?;
    sink.note_output(index, &y);
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Local;
    use crate::models::Transformer;
    use crate::models::testing::tiny;
    use crate::objectives::Batch;
    use stackwise_common::config::{AttentionMode, Family};

    #[test]
    fn adapters_on_a_frozen_model_get_the_plain_gradients_through_recomputed_blocks() {
        use crate::models::ParamBuilder;
        use crate::models::params::StagePolicy;
        use stackwise_common::plan::LoraSpec;
        let mut cfg = tiny(Family::Llama, AttentionMode::Causal, None);
        let (_, init) = Transformer::init(&cfg, 3, &Device::Cpu).unwrap();
        let base: HashMap<String, Tensor> = init.tensors().unwrap().into_iter().collect();
        let policy = StagePolicy {
            trainable_layers: Vec::new(),
            train_embeddings: false,
            train_head: false,
            precision: stackwise_common::config::Precision::Fp32,
            lora: Some(LoraSpec::new(2, 4.0)),
            boft: None,
        };
        cfg.lora_scale = Some(2.0);
        let mut p = ParamBuilder::for_stage(base, 5, policy, &Device::Cpu);
        let mut model = Transformer::build(&cfg, &mut p, &Device::Cpu).unwrap();
        let params = p.finish_stage().0;
        // B starts at zero; give it values so A's gradient is not zero too.
        for (name, v) in &params.vars {
            if name.contains("lora_B") {
                v.set(&crate::models::testing::rand(v.dims(), 9)).unwrap();
            }
        }
        let rows: Vec<(Vec<u32>, Vec<f32>)> =
            vec![((0..8).map(|i| (i * 5 + 1) % 16).collect(), vec![1.0; 8])];
        let batches = [Batch::from_rows(&rows, &Device::Cpu).unwrap()];
        let (_, _, plain) =
            crate::train::step::gradients(&model, &params, &batches, &mut Local).unwrap();
        model.recompute = Some(Arc::new(GradSink::new(true)));
        let (_, _, gc) =
            crate::train::step::gradients(&model, &params, &batches, &mut Local).unwrap();
        assert_eq!(plain.len(), params.vars.len());
        assert_eq!(gc.len(), plain.len(), "every adapter has a gradient");
        for (name, g) in &plain {
            let d = crate::models::testing::max_diff(g, &gc[name]);
            assert!(d <= 1e-6, "{name}: max |diff| {d}");
        }
    }

    #[test]
    fn recomputed_blocks_give_the_plain_gradients() {
        for family in [Family::Gpt2, Family::Llama] {
            let cfg = tiny(family, AttentionMode::Causal, None);
            let (mut model, params) = Transformer::init(&cfg, 3, &Device::Cpu).unwrap();
            let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..2)
                .map(|r| ((0..8).map(|i| (i * 7 + r * 3) % 16).collect(), vec![1.0; 8]))
                .collect();
            let batches = [Batch::from_rows(&rows, &Device::Cpu).unwrap()];
            let grads = |m: &Transformer| {
                crate::train::step::gradients(m, &params, &batches, &mut Local).unwrap()
            };
            let (loss, _, plain) = grads(&model);
            model.recompute = Some(Arc::new(GradSink::new(false)));
            let (loss_gc, _, gc) = grads(&model);
            assert_eq!(loss, loss_gc);
            assert_eq!(
                plain.len(),
                gc.len(),
                "{family:?}: every parameter has a gradient"
            );
            for (name, g) in &plain {
                let d = crate::models::testing::max_diff(g, &gc[name]);
                assert!(d <= 1e-6, "{family:?} {name}: max |diff| {d}");
            }
            // Kept gradients are detached: one that held the graph of the ops that made it
            // would keep the step's (or a recomputed block's) activations alive with it, and
            // gradient checkpointing would save no memory (measured: 1,387 MiB peak RSS with
            // and without it before, 538 MiB with it after; README, bench/finetune_modes.sh).
            for (name, g) in plain.iter().chain(&gc) {
                assert!(
                    !g.track_op(),
                    "{family:?} {name}: the gradient holds its graph"
                );
            }
        }
    }
}
