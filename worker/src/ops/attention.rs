//! Attention probabilities in one fused pass: `softmax(scale * scores + causal mask)` over the
//! last dimension, with its backward `dx = scale * y * (g - sum(g * y))`. Saves the separate
//! scale, mask-add and softmax passes over the (B, H, T, S) score tensor.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::cpu::{f32_slice, simd};
use super::fastmath;

/// Query row `r` of a (.., T, S) score tensor may see keys `0..=r % T + (S - T)` when causal.
fn visible(row: usize, t: usize, s: usize, causal: bool) -> usize {
    if causal {
        (row % t + (s - t) + 1).min(s)
    } else {
        s
    }
}

/// `row <- softmax(scale * row)` in place: the visible part of one attention row. Call it
/// inside `simd`.
#[inline(always)]
pub(super) fn softmax_row(row: &mut [f32], scale: f32) {
    let max = fastmath::max(row) * scale;
    for x in row.iter_mut() {
        *x = fastmath::exp(*x * scale - max);
    }
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|x| *x *= inv);
}

/// The backward of `softmax_row` for probabilities `y`: `g <- scale * y * (g - sum(g * y))`
/// in place. Call it inside `simd`.
#[inline(always)]
pub(super) fn softmax_row_bwd(g: &mut [f32], y: &[f32], scale: f32) {
    let dot: f32 = y.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
    for (g, &y) in g.iter_mut().zip(y) {
        *g = scale * y * (*g - dot);
    }
}

struct AttnSoftmax {
    scale: f32,
    causal: bool,
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "sw-attn-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, self.name())?;
        let dims = l.dims();
        let (t, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(s).enumerate().for_each(|(r, o)| {
            let n = visible(r, t, s, self.causal);
            o[..n].copy_from_slice(&x[r * s..r * s + n]);
            simd(|| softmax_row(&mut o[..n], self.scale));
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &g.contiguous()?,
            &AttnSoftmaxBwd { scale: self.scale },
        )?))
    }
}

struct AttnSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "sw-attn-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let s = l1.dims()[l1.dims().len() - 1];
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(s).enumerate().for_each(|(r, o)| {
            o.copy_from_slice(&g[r * s..(r + 1) * s]);
            simd(|| softmax_row_bwd(o, &y[r * s..(r + 1) * s], self.scale));
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `softmax(scale * scores + mask)` over the last dim of `scores (.., T, S)`; with `causal`,
/// query `i` (at absolute position `S - T + i`) sees keys `0..=S - T + i`.
pub fn attention_softmax(scores: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    if matches!(scores.device(), Device::Cpu) && scores.dtype() == DType::F32 {
        return scores.contiguous()?.apply_op1(AttnSoftmax {
            scale: scale as f32,
            causal,
        });
    }
    let x = (scores * scale)?;
    let x = if causal {
        let (t, s) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
        // Made where x is, from two index vectors (t + s ids uploaded, not a t x s mask): key j
        // is hidden from query i when j > i + s - t.
        let dev = x.device();
        let last_visible = Tensor::arange((s - t) as u32, s as u32, dev)?.reshape((t, 1))?;
        let keys = Tensor::arange(0u32, s as u32, dev)?.reshape((1, s))?;
        let hidden = keys.broadcast_gt(&last_visible)?; // (t, s) u8
        let neg = Tensor::new(f32::NEG_INFINITY, dev)?
            .to_dtype(x.dtype())?
            .broadcast_as((t, s))?;
        let zero = Tensor::zeros((), x.dtype(), dev)?.broadcast_as((t, s))?;
        x.broadcast_add(&hidden.where_cond(&neg, &zero)?)?
    } else {
        x
    };
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::{max_abs_diff, probe_grads};
    use candle_core::Var;

    #[test]
    fn fused_matches_the_composed_reference_with_gradients() {
        let dev = Device::Cpu;
        for (t, s, causal) in [(5, 5, true), (3, 7, true), (4, 6, false)] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, 3, t, s), &dev).unwrap()).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (2, 3, t, s), &dev).unwrap();
            let fused = attention_softmax(x.as_tensor(), 0.37, causal).unwrap();
            // Reference: the generic path (runs on any device), forced through a non-CPU dtype.
            let reference =
                attention_softmax(&x.as_tensor().to_dtype(DType::F64).unwrap(), 0.37, causal)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
            let d = max_abs_diff(&fused, &reference);
            assert!(d < 1e-6, "forward {d}");
            let gf = probe_grads(fused, &probe);
            let gr = probe_grads(reference, &probe);
            let (a, b) = (
                gf.get(x.as_tensor()).unwrap(),
                gr.get(x.as_tensor()).unwrap(),
            );
            let d = max_abs_diff(a, b);
            assert!(d < 1e-5, "backward {d}");
        }
    }
}
