//! Fused cross-entropy: per-row `-log softmax(logits)[target]` in one pass over the logits,
//! and the backward `dlogits = g * (softmax - onehot(target))` in one more. The composed
//! version makes ~8 passes over the (tokens, vocab) logits, the largest tensor of a step.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice, simd, storage_f32};
use super::fastmath;

struct CrossEntropy {
    targets: Vec<u32>,
    /// Each row's log-sum-exp, kept by the forward for the backward (which then takes one
    /// exp per logit instead of three passes: max, sum of exps, exps).
    lse: std::sync::OnceLock<Vec<f32>>,
}

fn row_lse(row: &[f32]) -> f32 {
    let max = fastmath::max(row);
    max + fastmath::sum_exp(row, max).ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "sw-cross-entropy"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, self.name())?;
        let (n, v) = l.shape().dims2()?;
        let mut lse = vec![0f32; n];
        lse.par_iter_mut().enumerate().for_each(|(r, o)| {
            *o = simd(|| row_lse(&x[r * v..(r + 1) * v]));
        });
        let out = (0..n)
            .map(|r| lse[r] - x[r * v + self.targets[r] as usize])
            .collect();
        // A second forward of the same op (none today) would recompute the same values.
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, v) = logits.dims2()?;
        let g = g.to_vec1::<f32>()?;
        let logits = logits.contiguous()?;
        let (storage, layout) = logits.storage_and_layout();
        let x = storage_f32(&storage, layout, self.name())?;
        let recomputed: Vec<f32>;
        let lse = match self.lse.get() {
            Some(lse) => lse,
            None => {
                recomputed = (0..n).map(|r| row_lse(&x[r * v..(r + 1) * v])).collect();
                &recomputed
            }
        };
        let mut dx = Vec::<f32>::with_capacity(n * v);
        dx.spare_capacity_mut()[..n * v]
            .par_chunks_mut(v)
            .enumerate()
            .for_each(|(r, d)| {
                let (row, gr, lr) = (&x[r * v..(r + 1) * v], g[r], lse[r]);
                simd(|| {
                    for (d, &xv) in d.iter_mut().zip(row) {
                        d.write(gr * fastmath::exp(xv - lr));
                    }
                });
                let t = self.targets[r] as usize;
                d[t].write(gr * fastmath::exp(row[t] - lr) - gr);
            });
        // SAFETY: every row of `dx` was written above.
        unsafe { dx.set_len(n * v) };
        drop(storage);
        Ok(Some(Tensor::from_vec(dx, (n, v), logits.device())?))
    }
}

/// Per-position cross-entropy `-log p(target)`: `logits (N, V)`, `targets (N)` u32 → `(N)`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if matches!(logits.device(), Device::Cpu) && logits.dtype() == DType::F32 {
        let targets = targets.to_vec1::<u32>()?;
        let v = logits.dim(1)?;
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target id {bad} is outside the vocabulary of {v}")
        }
        return logits.contiguous()?.apply_op1(CrossEntropy {
            targets,
            lse: Default::default(),
        });
    }
    let logp = super::log_softmax_last_dim(logits)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::{max_abs_diff, probe_grads};
    use candle_core::Var;

    #[test]
    fn fused_matches_composed_log_softmax_with_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 3.0, (6, 11), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.0, 2.0, 1.0, 0.5, 1.0], &dev).unwrap();
        let fused = token_nll(x.as_tensor(), &t).unwrap();
        let logp = crate::ops::log_softmax_last_dim(x.as_tensor()).unwrap();
        let reference = logp
            .gather(&t.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let d = max_abs_diff(&fused, &reference);
        assert!(d < 1e-5, "forward {d}");
        let gf = probe_grads(fused, &w);
        let gr = probe_grads(reference, &w);
        let d = max_abs_diff(
            gf.get(x.as_tensor()).unwrap(),
            gr.get(x.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "backward {d}");
        assert!(
            token_nll(
                x.as_tensor(),
                &Tensor::new(&[11u32, 0, 0, 0, 0, 0], &dev).unwrap()
            )
            .is_err()
        );
    }
}
