//! Scaled dot-product attention as one CPU op with its backward:
//! `softmax(q k^T / sqrt(hd) + causal mask) v`, heads read and written in place.
//!
//! Composed of candle ops, attention costs three layout copies into (B, H, T, hd) on the way in
//! and one out, a full (T, S) score product per head of which a causal mask throws half away,
//! and the same again in the backward. Here each (batch, head) is one task: its queries go in
//! blocks of `BLOCK` rows, and a block multiplies only the keys some row of it can see (gemm on
//! strided views of the projections, so nothing is copied), which for causal attention over
//! T = S skips nearly half of the four products' work. The probabilities are kept for the
//! backward (the composed graph keeps them too). Grouped-query heads read their group's keys and
//! values; a group's key and value gradients are one task's sums, so no two tasks write the same
//! memory.
//!
//! The softmax is `attention_softmax`'s row arithmetic (`softmax_row`); the score products are
//! separate gemm calls on blocks rather than one on the whole (T, S), so scores, outputs and
//! gradients agree with the composed path to rounding, not bitwise (the tests bound the
//! difference).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::attention::{softmax_row, softmax_row_bwd};
use super::cpu::{fused_ok, simd, storage_f32};

/// Query rows per block: the keys a block multiplies are those its last row sees.
const BLOCK: usize = 64;

/// `softmax(q k^T * scale + mask) v` for `q (B, T, H, hd)` and `k`, `v (B, S, Hkv, hd)` (any
/// strides, H a multiple of Hkv; query head h reads kv head h / (H / Hkv), as HF's
/// `repeat_kv`); with `causal`, query i (at absolute position S - T + i) sees keys
/// `0..=S - T + i`. Returns `(B, T, H * hd)`. `None` where the op does not apply (not f32 on
/// the CPU): the caller composes candle ops instead.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
) -> Result<Option<Tensor>> {
    let (b, t, h, hd) = q.dims4()?;
    let (bk, s, hkv, hdk) = k.dims4()?;
    if !(fused_ok(q) && fused_ok(k) && fused_ok(v)) || b * t * s * h * hd == 0 {
        return Ok(None);
    }
    if (bk, hdk) != (b, hd) || v.dims4()? != (b, s, hkv, hd) || hkv == 0 || h % hkv != 0 {
        candle_core::bail!(
            "sdpa: q {:?}, k {:?}, v {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if causal && s < t {
        candle_core::bail!(
            "sdpa: causal attention needs at least as many keys ({s}) as queries ({t})"
        );
    }
    // gemm reads rows at any stride, but each row's elements one apart.
    let unit = |x: &Tensor| -> Result<Tensor> {
        if x.layout().stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    let op = Sdpa {
        scale: scale as f32,
        causal,
        probs: OnceLock::new(),
    };
    Ok(Some(unit(q)?.apply_op3(&unit(k)?, &unit(v)?, op)?))
}

/// All of an f32 storage (a view's layout says where its elements are).
fn whole(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("sw-sdpa: expected f32 storage"),
    }
}

/// A (B, N, H, hd) input as gemm sees it: data, offset of element 0 and strides of b, n, h.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    sb: usize,
    sn: usize,
    sh: usize,
}

// SAFETY: views point into storage that outlives the parallel section that reads them.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    fn new(data: &[f32], l: &Layout) -> Self {
        let st = l.stride();
        Self {
            ptr: data[l.start_offset()..].as_ptr(),
            sb: st[0],
            sn: st[1],
            sh: st[2],
        }
    }

    /// Row 0 of head `h` of batch `b`; rows are `sn` apart.
    fn head(&self, b: usize, h: usize) -> *const f32 {
        // SAFETY: in bounds for every (b, h) of the layout the view was made from.
        unsafe { self.ptr.add(b * self.sb + h * self.sh) }
    }
}

/// A contiguous (B, N, H, hd) output, written by tasks that own disjoint heads.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    n: usize,
    h: usize,
    hd: usize,
}

// SAFETY: each task writes only the heads it owns.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn new(buf: &mut [f32], n: usize, h: usize, hd: usize) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            n,
            h,
            hd,
        }
    }

    fn head(&self, b: usize, h: usize) -> *mut f32 {
        // SAFETY: b < B and h < H of the buffer this was made from.
        unsafe { self.ptr.add((b * self.n * self.h + h) * self.hd) }
    }

    /// Distance between rows.
    fn rs(&self) -> isize {
        (self.h * self.hd) as isize
    }
}

/// `dst (m, n) = [dst +] lhs (m, k) @ rhs (k, n)`, single-threaded (the caller runs one task a
/// head on each core); strides as (row, column).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    // SAFETY: the caller passes pointers and strides that stay inside their buffers.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

struct Sdpa {
    scale: f32,
    causal: bool,
    /// (B, H, T, S) probabilities of the forward, zero where masked: the backward reads them.
    probs: OnceLock<Vec<f32>>,
}

impl Sdpa {
    /// Keys query row `i` of T sees among S.
    fn visible(&self, i: usize, t: usize, s: usize) -> usize {
        if self.causal { i + (s - t) + 1 } else { s }
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "sw-sdpa"
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
        let (q, k, v) = (
            View::new(whole(s1)?, l1),
            View::new(whole(s2)?, l2),
            View::new(whole(s3)?, l3),
        );
        let (b, t, h, hd) = l1.shape().dims4()?;
        let (_, s, hkv, _) = l2.shape().dims4()?;
        let rep = h / hkv;
        let mut out = vec![0f32; b * t * h * hd];
        let mut probs = vec![0f32; b * h * t * s];
        let o = Out::new(&mut out, t, h, hd);
        probs.par_chunks_mut(t * s).enumerate().for_each(|(bh, p)| {
            let (bi, hi) = (bh / h, bh % h);
            let (qh, kh, vh) = (q.head(bi, hi), k.head(bi, hi / rep), v.head(bi, hi / rep));
            for i0 in (0..t).step_by(BLOCK) {
                let rows = BLOCK.min(t - i0);
                let n = self.visible(i0 + rows - 1, t, s);
                let pb = &mut p[i0 * s..(i0 + rows) * s];
                // SAFETY: rows i0..i0 + rows of this head, keys 0..n <= S.
                unsafe {
                    mm(
                        (rows, n, hd),
                        pb.as_mut_ptr(),
                        s as isize,
                        false,
                        (qh.add(i0 * q.sn), q.sn as isize, 1),
                        (kh, 1, k.sn as isize),
                    );
                }
                simd(|| {
                    for (r, row) in pb.chunks_mut(s).enumerate() {
                        let vis = self.visible(i0 + r, t, s);
                        softmax_row(&mut row[..vis], self.scale);
                        row[vis..n].fill(0.0);
                    }
                });
                // SAFETY: as above; the output rows of this head only.
                unsafe {
                    mm(
                        (rows, hd, n),
                        o.head(bi, hi).offset(i0 as isize * o.rs()),
                        o.rs(),
                        false,
                        (pb.as_ptr(), s as isize, 1),
                        (vh, v.sn as isize, 1),
                    );
                }
            }
        });
        let _ = self.probs.set(probs);
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, t, h * hd])))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(probs) = self.probs.get() else {
            candle_core::bail!("sw-sdpa: backward before forward");
        };
        let grad = grad.contiguous()?;
        let (b, t, h, hd) = q.dims4()?;
        let (_, s, hkv, _) = k.dims4()?;
        let rep = h / hkv;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; b * t * h * hd],
            vec![0f32; b * s * hkv * hd],
            vec![0f32; b * s * hkv * hd],
        );
        {
            let (sq, lq) = q.storage_and_layout();
            let (sk, lk) = k.storage_and_layout();
            let (sv, lv) = v.storage_and_layout();
            let (sg, lg) = grad.storage_and_layout();
            let view = |st: &candle_core::Storage, l: &Layout| match st {
                candle_core::Storage::Cpu(c) => Ok(View::new(whole(c)?, l)),
                _ => candle_core::bail!("sw-sdpa: expected CPU tensors"),
            };
            let (qv, kv, vv) = (view(&sq, lq)?, view(&sk, lk)?, view(&sv, lv)?);
            let g = storage_f32(&sg, lg, self.name())?;
            let go = View {
                ptr: g.as_ptr(),
                sb: t * h * hd,
                sn: h * hd,
                sh: hd,
            };
            let (dqo, dko, dvo) = (
                Out::new(&mut dq, t, h, hd),
                Out::new(&mut dk, s, hkv, hd),
                Out::new(&mut dv, s, hkv, hd),
            );
            // One task a (batch, kv head): its query heads one after another, so the group's
            // key and value gradients are summed by one task in a fixed order.
            (0..b * hkv).into_par_iter().for_each(|bg| {
                let (bi, gi) = (bg / hkv, bg % hkv);
                let mut dp = vec![0f32; BLOCK * s];
                for hi in gi * rep..(gi + 1) * rep {
                    let p = &probs[(bi * h + hi) * t * s..][..t * s];
                    let (qh, goh) = (qv.head(bi, hi), go.head(bi, hi));
                    let (kh, vh) = (kv.head(bi, gi), vv.head(bi, gi));
                    for i0 in (0..t).step_by(BLOCK) {
                        let rows = BLOCK.min(t - i0);
                        let n = self.visible(i0 + rows - 1, t, s);
                        let pb = &p[i0 * s..(i0 + rows) * s];
                        let gb = goh.wrapping_add(i0 * go.sn);
                        // SAFETY (all four products): rows i0..i0 + rows of this head, keys
                        // 0..n, into the scratch block and the gradients this task owns.
                        unsafe {
                            // dP = dO V^T
                            mm(
                                (rows, n, hd),
                                dp.as_mut_ptr(),
                                s as isize,
                                false,
                                (gb, go.sn as isize, 1),
                                (vh, 1, vv.sn as isize),
                            );
                        }
                        simd(|| {
                            for (r, (d, pr)) in
                                dp.chunks_mut(s).zip(pb.chunks(s)).take(rows).enumerate()
                            {
                                let vis = self.visible(i0 + r, t, s);
                                softmax_row_bwd(&mut d[..vis], &pr[..vis], self.scale);
                                d[vis..n].fill(0.0);
                            }
                        });
                        unsafe {
                            // dQ = dS K
                            mm(
                                (rows, hd, n),
                                dqo.head(bi, hi).offset(i0 as isize * dqo.rs()),
                                dqo.rs(),
                                false,
                                (dp.as_ptr(), s as isize, 1),
                                (kh, kv.sn as isize, 1),
                            );
                            // dK += dS^T Q
                            mm(
                                (n, hd, rows),
                                dko.head(bi, gi),
                                dko.rs(),
                                true,
                                (dp.as_ptr(), 1, s as isize),
                                (qh.add(i0 * qv.sn), qv.sn as isize, 1),
                            );
                            // dV += P^T dO
                            mm(
                                (n, hd, rows),
                                dvo.head(bi, gi),
                                dvo.rs(),
                                true,
                                (pb.as_ptr(), 1, s as isize),
                                (gb, go.sn as isize, 1),
                            );
                        }
                    }
                }
            });
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, t, h, hd), dev)?),
            Some(Tensor::from_vec(dk, (b, s, hkv, hd), dev)?),
            Some(Tensor::from_vec(dv, (b, s, hkv, hd), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention_softmax;
    use crate::ops::cpu::max_abs_diff;
    use candle_core::{Device, Var};

    /// The composed reference: heads transposed to (B, H, T, hd), GQA keys repeated, full
    /// products, the fused masked softmax; back to (B, T, H * hd).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Tensor {
        let (b, t, h, hd) = q.dims4().unwrap();
        let (_, s, hkv, _) = k.dims4().unwrap();
        let heads = |x: &Tensor, n: usize| -> Tensor {
            let x = x.transpose(1, 2).unwrap().contiguous().unwrap(); // (B, hkv, S, hd)
            x.unsqueeze(2)
                .unwrap()
                .expand((b, hkv, h / hkv, n, hd))
                .unwrap()
                .reshape((b, h, n, hd))
                .unwrap()
        };
        let qh = q.transpose(1, 2).unwrap().contiguous().unwrap();
        let scores = qh.matmul(&heads(k, s).t().unwrap()).unwrap();
        let att = attention_softmax(&scores, scale, causal).unwrap();
        att.matmul(&heads(v, s))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h * hd))
            .unwrap()
    }

    #[test]
    fn matches_the_composed_ops_with_gradients() {
        let dev = Device::Cpu;
        // (B, T, S, H, Hkv, hd, causal, queries as a strided view): blocks of 64 rows with a
        // ragged last one; more keys than queries (a prefill after cached positions); GQA;
        // bidirectional.
        for (b, t, s, h, hkv, hd, causal, strided) in [
            (2, 150, 150, 4, 4, 16, true, false),
            (1, 70, 90, 4, 2, 8, true, true),
            (2, 33, 33, 6, 3, 8, false, false),
            (1, 64, 64, 2, 1, 32, true, true),
        ] {
            let rand = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
            };
            // Strided: stored (B, H, T, hd) as a rotary model's heads are, viewed as (B, T, H, hd).
            let q = rand(if strided {
                (b, h, t, hd)
            } else {
                (b, t, h, hd)
            });
            let qv = if strided {
                q.as_tensor().transpose(1, 2).unwrap()
            } else {
                q.as_tensor().clone()
            };
            let (k, v) = (rand((b, s, hkv, hd)), rand((b, s, hkv, hd)));
            let scale = 1.0 / (hd as f64).sqrt();
            let probe = Tensor::randn(0f32, 1.0, (b, t, h * hd), &dev).unwrap();
            let fused =
                scaled_dot_product_attention(&qv, k.as_tensor(), v.as_tensor(), scale, causal)
                    .unwrap()
                    .unwrap();
            let reference = composed(&qv, k.as_tensor(), v.as_tensor(), scale, causal);
            let d = max_abs_diff(&fused, &reference);
            assert!(
                d < 1e-5,
                "forward {d} for {:?}",
                (b, t, s, h, hkv, hd, causal)
            );
            let gf = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = (reference * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let d = max_abs_diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gr.get(x.as_tensor()).unwrap(),
                );
                assert!(
                    d < 1e-4,
                    "d{name} {d} for {:?}",
                    (b, t, s, h, hkv, hd, causal)
                );
            }
        }
    }

    #[test]
    fn a_masked_key_moves_only_the_rows_that_see_it() {
        // Causal: only the last query sees the last key, so changing that key and its value
        // leaves every earlier output row bitwise as it was.
        let dev = Device::Cpu;
        let (b, t, h, hd) = (1, 80, 2, 8);
        let q = Tensor::randn(0f32, 1.0, (b, t, h, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, t, h, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, t, h, hd), &dev).unwrap();
        let run = |k: &Tensor, v: &Tensor| {
            scaled_dot_product_attention(&q, k, v, 0.3, true)
                .unwrap()
                .unwrap()
        };
        let y = run(&k, &v);
        let bump = |x: &Tensor| {
            let last = (x.narrow(1, t - 1, 1).unwrap() + 5.0).unwrap();
            Tensor::cat(&[&x.narrow(1, 0, t - 1).unwrap(), &last], 1).unwrap()
        };
        let y2 = run(&bump(&k), &bump(&v));
        let rows = |y: &Tensor| {
            y.narrow(1, 0, t - 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(rows(&y), rows(&y2));
        let last = |y: &Tensor| {
            y.narrow(1, t - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_ne!(last(&y), last(&y2));
    }
}
