//! Fused CPU kernels with a backward pass: LayerNorm, RMSNorm, last-dim softmax and tanh-GELU.
//! On other devices or dtypes they fall back to compositions of candle ops, which have a
//! backward everywhere. Backward formulas follow the standard derivations (e.g. llm.c's
//! `layernorm_backward`), checked against finite differences and the PyTorch fixtures.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{f32_slice as slice, fused_ok, simd};
use super::fastmath;

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

// Rows are processed in parallel when there are enough of them to amortise rayon's overhead.
fn par_rows<F>(out: &mut [f32], n: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if out.len() >= 1 << 14 {
        out.par_chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    } else {
        out.chunks_mut(n).enumerate().for_each(|(r, o)| f(r, o));
    }
}

// ---------------------------------------------------------------- softmax

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "sw-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, n, |r, o| {
            let row = &x[r * n..(r + 1) * n];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = fastmath::exp(v - max);
            }
            for o in o.iter() {
                sum += *o;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "sw-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let n = l1.dims()[l1.dims().len() - 1];
        let mut out = vec![0f32; y.len()];
        // dx = y * (g - sum(g * y))
        par_rows(&mut out, n, |r, o| {
            let (yr, gr) = (&y[r * n..(r + 1) * n], &g[r * n..(r + 1) * n]);
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    }
}

// ---------------------------------------------------------------- GELU (tanh approximation)

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// Elements per parallel task in elementwise kernels.
const CHUNK: usize = 1 << 14;
const GELU_C: f32 = 0.044_715;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "sw-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        // Chunks of plain slice loops, so LLVM vectorises the branch-free tanh.
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                simd(|| {
                    for i in 0..o.len().min(x.len()) {
                        let v = x[i];
                        o[i] = 0.5
                            * v
                            * (1.0 + fastmath::tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v)));
                    }
                })
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "sw-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| {
                simd(|| {
                    let n = o.len().min(x.len()).min(g.len());
                    for i in 0..n {
                        let v = x[i];
                        let t = fastmath::tanh(SQRT_2_OVER_PI * (v + GELU_C * v * v * v));
                        let dinner = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
                        o[i] = g[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * dinner);
                    }
                })
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// GELU, tanh approximation (`gelu_new`), differentiable.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu()
    }
}

// ---------------------------------------------------------------- LayerNorm

struct LayerNorm {
    eps: f32,
}

fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "sw-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, n, |r, o| {
            let row = &x[r * n..(r + 1) * n];
            let (mean, rstd) = row_stats(row, self.eps);
            for i in 0..n {
                o[i] = (row[i] - mean) * rstd * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
        let n = w.elem_count();
        let len = x.elem_count();
        let rows = len / n;
        let mut dx = vec![0f32; len];
        // Rows in fixed blocks on all cores, each block with its own weight and bias gradient
        // sums, added in block order: the result does not depend on the number of threads.
        let blocks: Vec<(Vec<f32>, Vec<f32>)> = {
            let guards = [&x, &w, &g].map(|t| t.storage_and_layout());
            let slice = |i: usize| super::cpu::storage_f32(&guards[i].0, guards[i].1, self.name());
            let (xs, ws, gs) = (slice(0)?, slice(1)?, slice(2)?);
            dx.par_chunks_mut(LN_BLOCK_ROWS * n)
                .enumerate()
                .map(|(k, dxb)| {
                    let mut dw = vec![0f32; n];
                    let mut db = vec![0f32; n];
                    for (j, d) in dxb.chunks_mut(n).enumerate() {
                        let r = k * LN_BLOCK_ROWS + j;
                        let row = &xs[r * n..(r + 1) * n];
                        let gr = &gs[r * n..(r + 1) * n];
                        let (mean, rstd) = row_stats(row, self.eps);
                        let (mut mean_gw, mut mean_gw_xhat) = (0f32, 0f32);
                        for i in 0..n {
                            let xhat = (row[i] - mean) * rstd;
                            let gw = gr[i] * ws[i];
                            mean_gw += gw;
                            mean_gw_xhat += gw * xhat;
                            dw[i] += gr[i] * xhat;
                            db[i] += gr[i];
                        }
                        mean_gw /= n as f32;
                        mean_gw_xhat /= n as f32;
                        for i in 0..n {
                            let xhat = (row[i] - mean) * rstd;
                            d[i] = rstd * (gr[i] * ws[i] - mean_gw - xhat * mean_gw_xhat);
                        }
                    }
                    (dw, db)
                })
                .collect()
        };
        debug_assert_eq!(blocks.len(), rows.div_ceil(LN_BLOCK_ROWS));
        let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
        for (bw, bb) in &blocks {
            dw.iter_mut().zip(bw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(bb).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

/// Rows per task of the LayerNorm backward.
const LN_BLOCK_ROWS: usize = 64;

/// LayerNorm over the last dimension with weight and bias, differentiable.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNorm { eps: eps as f32 },
        )
    } else {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }
}

// ---------------------------------------------------------------- RMSNorm

struct RmsNorm {
    eps: f32,
}

fn row_rstd(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "sw-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, n, |r, o| {
            let row = &x[r * n..(r + 1) * n];
            let rstd = row_rstd(row, self.eps);
            for i in 0..n {
                o[i] = row[i] * rstd * w[i];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, gs) = (to_vec(x)?, to_vec(w)?, to_vec(g)?);
        let n = ws.len();
        let mut dx = vec![0f32; xs.len()];
        let mut dw = vec![0f32; n];
        for r in 0..xs.len() / n {
            let row = &xs[r * n..(r + 1) * n];
            let gr = &gs[r * n..(r + 1) * n];
            let rstd = row_rstd(row, self.eps);
            let mut mean_gw_xhat = 0f32;
            for i in 0..n {
                let xhat = row[i] * rstd;
                mean_gw_xhat += gr[i] * ws[i] * xhat;
                dw[i] += gr[i] * xhat;
            }
            mean_gw_xhat /= n as f32;
            let d = &mut dx[r * n..(r + 1) * n];
            for i in 0..n {
                d[i] = rstd * (gr[i] * ws[i] - row[i] * rstd * mean_gw_xhat);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
        ))
    }
}

/// RMSNorm over the last dimension (`w * x / sqrt(mean(x^2) + eps)`), differentiable.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?
            .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
    } else {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::{max_abs_diff, probe_grads};
    use candle_core::Device;
    use candle_core::Var;

    /// Compares the fused op's gradient with the composed (reference) op's.
    fn check_grad(
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let probe = Tensor::randn(0f32, 1.0, fused(&ts).unwrap().shape(), &Device::Cpu).unwrap();
        let yf = fused(&ts).unwrap();
        let yc = composed(&ts).unwrap();
        let fwd = max_abs_diff(&yf, &yc);
        assert!(fwd < 1e-5, "forward differs by {fwd}");
        let gf = probe_grads(yf, &probe);
        let gc = probe_grads(yc, &probe);
        for t in &ts {
            let a = gf.get(t).expect("fused grad");
            let b = gc.get(t).expect("composed grad");
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "grad differs by {d}");
        }
    }

    /// LayerNorm from candle ops (eps 1e-5), the reference of the fused one.
    fn composed_layer_norm(t: &[Tensor]) -> Result<Tensor> {
        let mean = t[0].mean_keepdim(D::Minus1)?;
        let xc = t[0].broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(&t[1])?
            .broadcast_add(&t[2])
    }

    #[test]
    fn fused_ops_match_composed_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
        check_grad(
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            composed_layer_norm,
            &[x.clone(), w.clone(), b],
        );
        check_grad(
            |t| rms_norm(&t[0], &t[1], 1e-6),
            |t| {
                let ms = t[0].sqr()?.mean_keepdim(D::Minus1)?;
                t[0].broadcast_div(&(ms + 1e-6)?.sqrt()?)?
                    .broadcast_mul(&t[1])
            },
            &[x.clone(), w],
        );
        check_grad(
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            std::slice::from_ref(&x),
        );
        check_grad(|t| gelu_tanh(&t[0]), |t| t[0].gelu(), &[x]);
    }

    #[test]
    fn layer_norm_backward_over_several_row_blocks_matches_composed() {
        // 150 rows: two full blocks of LN_BLOCK_ROWS and a partial one, whose weight and bias
        // gradients are summed across blocks.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 50, 16), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 16, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 16, &dev).unwrap();
        const { assert!(150 > 2 * LN_BLOCK_ROWS && 150 % LN_BLOCK_ROWS != 0) };
        check_grad(
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5),
            composed_layer_norm,
            &[x, w, b],
        );
    }
}
