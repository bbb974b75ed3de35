//! `x + b` broadcast over rows, with a fast backward. candle reduces the bias gradient with a
//! strided sum over the leading dims: 9.9 ms for a (2048, 1536) gradient here, against
//! 0.2 ms for a row loop that vectorises across columns (`bench/src/bin/reduce_probe.rs`).

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::f32_slice;

struct AddBias;

/// Sum of the rows of `g` (n, m): a (m) vector; rows split across threads, then combined.
fn column_sum(g: &[f32], m: usize) -> Vec<f32> {
    let rows = g.len() / m;
    let per_task = rows.div_ceil(rayon::current_num_threads().max(1)).max(64);
    let partials: Vec<Vec<f32>> = g
        .par_chunks(per_task * m)
        .map(|block| {
            let mut acc = vec![0f32; m];
            for row in block.chunks_exact(m) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; m];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "sw-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        let m = b.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(m * 64)
            .zip(x.par_chunks(m * 64))
            .for_each(|(o, x)| {
                for (orow, xrow) in o.chunks_exact_mut(m).zip(x.chunks_exact(m)) {
                    for j in 0..m {
                        orow[j] = xrow[j] + b[j];
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gv = g.flatten_all()?.to_vec1::<f32>()?;
        let db = column_sum(&gv, b.elem_count());
        Ok((
            Some(g.clone()),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `x + b` where `b`'s shape equals the trailing dims of `x` (a bias, a position table).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fast =
        matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && b.dtype() == DType::F32;
    if fast && x.dims().ends_with(b.dims()) {
        return x.contiguous()?.apply_op2(&b.contiguous()?, AddBias);
    }
    x.broadcast_add(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::{max_abs_diff, probe_grads};
    use candle_core::Var;

    #[test]
    fn matches_broadcast_add_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 70, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (70, 5), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 70, 5), &dev).unwrap();
        let fused = add_bias(x.as_tensor(), b.as_tensor()).unwrap();
        let reference = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        assert_eq!(
            fused.to_vec3::<f32>().unwrap(),
            reference.to_vec3::<f32>().unwrap()
        );
        let gf = probe_grads(fused, &probe);
        let gr = probe_grads(reference, &probe);
        for v in [&x, &b] {
            let d = max_abs_diff(
                gf.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "{d}");
        }
    }
}
