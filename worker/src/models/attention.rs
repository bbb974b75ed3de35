//! Self-attention of a decoder layer: multi-head or grouped-query (Ainslie et al. 2023)
//! softmax attention, kernel (linear) attention (`kernel_attention.rs`), or multi-head latent
//! attention (`mla.rs`); causal or bidirectional; rotary positions when the model has them.

use candle_core::{Module, Result, Tensor};
use stackwise_common::config::{AttentionKind, AttentionMode, Autocast, Family, ModelConfig};

use super::kernel_attention::kernel_attention;
use super::linear::{INIT_STD, Linear};
use super::mla::MlaProj;
use super::paged::{PageTable, PagedLayer};
use super::params::ParamBuilder;
use super::rope::Rope;
use crate::ops;

#[derive(Clone)]
enum Qkv {
    /// GPT-2's `c_attn`: `[q | k | v]` in one projection.
    Fused(Linear),
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    Mla(Box<MlaProj>),
}

#[derive(Clone)]
pub struct Attention {
    qkv: Qkv,
    out: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    bidirectional: bool,
    kernel: bool,
}

impl Attention {
    pub(super) fn load(p: &mut ParamBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        let bidirectional = cfg.attention_mode == AttentionMode::Bidirectional;
        if cfg.attention == AttentionKind::Mla {
            let (mla, out) = MlaProj::load(p, prefix, cfg)?;
            return Ok(Self {
                qkv: Qkv::Mla(Box::new(mla)),
                out: Linear::load(p, &out, cfg.q_dim(), cfg.d_model, cfg, out_std)?,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_heads,
                head_dim: cfg.head_dim,
                bidirectional,
                kernel: false,
            });
        }
        let (qkv, out) = match cfg.family {
            Family::Gpt2 => (
                Qkv::Fused(Linear::load(
                    p,
                    &format!("{prefix}.attn.c_attn"),
                    cfg.d_model,
                    cfg.q_dim() + 2 * cfg.kv_dim(),
                    cfg,
                    INIT_STD,
                )?),
                Linear::load(
                    p,
                    &format!("{prefix}.attn.c_proj"),
                    cfg.q_dim(),
                    cfg.d_model,
                    cfg,
                    out_std,
                )?,
            ),
            Family::Llama => (
                Qkv::Split {
                    q: Linear::load(
                        p,
                        &format!("{prefix}.self_attn.q_proj"),
                        cfg.d_model,
                        cfg.q_dim(),
                        cfg,
                        INIT_STD,
                    )?,
                    k: Linear::load(
                        p,
                        &format!("{prefix}.self_attn.k_proj"),
                        cfg.d_model,
                        cfg.kv_dim(),
                        cfg,
                        INIT_STD,
                    )?,
                    v: Linear::load(
                        p,
                        &format!("{prefix}.self_attn.v_proj"),
                        cfg.d_model,
                        cfg.kv_dim(),
                        cfg,
                        INIT_STD,
                    )?,
                },
                Linear::load(
                    p,
                    &format!("{prefix}.self_attn.o_proj"),
                    cfg.q_dim(),
                    cfg.d_model,
                    cfg,
                    out_std,
                )?,
            ),
        };
        Ok(Self {
            qkv,
            out,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            bidirectional,
            kernel: cfg.attention == AttentionKind::Kernel,
        })
    }

    /// Lay the projections out for decoding (`Linear::prepare_for_decoding`); MLA keeps its
    /// own.
    pub(super) fn prepare_for_decoding(&mut self) -> Result<()> {
        match &mut self.qkv {
            Qkv::Fused(l) => l.prepare_for_decoding()?,
            Qkv::Split { q, k, v } => {
                q.prepare_for_decoding()?;
                k.prepare_for_decoding()?;
                v.prepare_for_decoding()?;
            }
            Qkv::Mla(_) => return Ok(()),
        }
        self.out.prepare_for_decoding()
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        start: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        if let Qkv::Mla(m) = &self.qkv {
            let causal = !self.bidirectional;
            let y = m.attend(x, (self.n_heads, self.head_dim), causal, start, cache)?;
            return self.out.forward(&y);
        }
        let (b, t, _) = x.dims3()?;
        // With a KV cache it decodes: no gradients.
        let (q, k, v) = self.project(x, cache.is_some())?;
        if cache.is_none()
            && !self.kernel
            && ops::autocast::get() == Autocast::Off
            && let Some(y) = self.attend_in_place(&q, &k, &v, (b, t), rope, start)?
        {
            return self.out.forward(&y);
        }
        let (q, k, v) = self.heads(&q, &k, &v, (b, t), rope, start)?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        let y = self.attend(&q, k, v)?;
        self.out.forward(&y)
    }

    /// Attention over a paged KV cache for the packed tokens `x (1, N, D)` of several
    /// sequences (`seqs`, in order: each its first position and its page table): each
    /// sequence's new keys and values are written to its pages, then its queries attend to
    /// all its positions. The same arithmetic as `forward` with a contiguous cache, so a
    /// sequence's output does not depend on the others packed with it.
    pub(super) fn forward_paged(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        seqs: &[(usize, &PageTable)],
        layer: &PagedLayer,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, true)?;
        let (hd, nkv) = (self.head_dim, self.n_kv_heads);
        let mut outputs = Vec::with_capacity(seqs.len());
        let mut off = 0;
        for &(start, table) in seqs {
            let t = table.len() - start;
            let part = |x: &Tensor| x.narrow(1, off, t);
            let (q, k, v) = self.heads(&part(&q)?, &part(&k)?, &part(&v)?, (1, t), rope, start)?;
            // Stored as (T, nkv * hd) rows, one a position.
            let rows = |x: &Tensor| x.transpose(1, 2)?.contiguous()?.reshape((t, nkv * hd));
            layer.write(table, start, &rows(&k)?, &rows(&v)?)?;
            let (k, v) = layer.read(table)?;
            let s = table.len();
            let heads = |x: Tensor| x.reshape((1, s, nkv, hd))?.transpose(1, 2)?.contiguous(); // (1, nkv, S, hd)
            outputs.push(self.attend(&q, heads(k)?, heads(v)?)?);
            off += t;
        }
        self.out.forward(&Tensor::cat(&outputs, 1)?)
    }

    /// The query, key and value projections of `x (B, T, D)`: (B, T, heads * hd) each.
    /// `decoding` (no gradients): GPT-2's fused projection as one product, then split.
    fn project(&self, x: &Tensor, decoding: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        Ok(match &self.qkv {
            Qkv::Mla(_) => candle_core::bail!("MLA projects to a latent; see mla.rs"),
            // The same numbers either way: each output column is its own sum over the input.
            Qkv::Fused(l) if decoding || l.strips.is_some() => {
                let y = l.forward(x)?;
                (
                    y.narrow(2, 0, nh * hd)?,
                    y.narrow(2, nh * hd, nkv * hd)?,
                    y.narrow(2, (nh + nkv) * hd, nkv * hd)?,
                )
            }
            // Training splits the fused [q | k | v] projection on its weight, not on its
            // output: the gradient of a narrow is padded to the full tensor, which is far
            // smaller for the (d, q + 2kv) weight than for the (B, T, q + 2kv) activation.
            // The three slices share the LoRA hidden state x A^T: computed once.
            Qkv::Fused(l) => {
                let l = l.materialized()?;
                let h = l.lora_hidden(x)?;
                let part = |start, len| l.columns(start, len)?.forward_with_hidden(x, h.as_ref());
                (
                    part(0, nh * hd)?,
                    part(nh * hd, nkv * hd)?,
                    part((nh + nkv) * hd, nkv * hd)?,
                )
            }
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
        })
    }

    /// Projections (B, T, heads * hd) as heads (B, heads, T, hd), rotated for positions
    /// `start..start + T` when the model is rotary.
    fn heads(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (b, t): (usize, usize),
        rope: Option<&Rope>,
        start: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?; // (B, nh, T, hd)
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?; // (B, nkv, T, hd)
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        Ok(match rope {
            Some(r) => (r.apply(&q, start)?, r.apply(&k, start)?, v),
            None => (q, k, v),
        })
    }

    /// Softmax attention of projections `(B, T, heads * hd)` as one fused op on the heads in
    /// place (`ops::scaled_dot_product_attention`): `(B, T, nh * hd)`, or `None` where the op
    /// does not apply. Rotary models rotate queries and keys as (B, heads, T, hd) and pass them
    /// as strided views.
    fn attend_in_place(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        (b, t): (usize, usize),
        rope: Option<&Rope>,
        start: usize,
    ) -> Result<Option<Tensor>> {
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let (mut q, mut k) = (q.reshape((b, t, nh, hd))?, k.reshape((b, t, nkv, hd))?);
        let v = v.reshape((b, t, nkv, hd))?;
        if let Some(r) = rope {
            // The rotary tables run over (.., T, hd).
            let rotate = |x: &Tensor| r.apply(&x.transpose(1, 2)?, start)?.transpose(1, 2);
            (q, k) = (rotate(&q)?, rotate(&k)?);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        ops::scaled_dot_product_attention(&q, &k, &v, scale, !self.bidirectional)
    }

    /// Queries `q (B, nh, T, hd)` over keys and values `(B, nkv, S, hd)` (the last T of the
    /// S positions are the queries' own): the heads' outputs as (B, T, nh * hd).
    fn attend(&self, q: &Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = self.n_kv_heads;
        let s = k.dim(2)?;
        // GQA: query head h reads kv head h / (nh / nkv), as HF's repeat_kv (repeat_interleave).
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let expand = |x: Tensor| -> Result<Tensor> {
                x.unsqueeze(2)?
                    .expand((b, nkv, rep, s, hd))?
                    .reshape((b, nh, s, hd)) // (B, nh, S, hd)
            };
            (expand(k)?, expand(v)?)
        } else {
            (k, v)
        };
        let y = if self.kernel {
            kernel_attention(q, &k, &v, !self.bidirectional)? // (B, nh, T, hd)
        } else {
            let scale = 1.0 / (hd as f64).sqrt();
            let scores = ops::autocast::matmul(q, &k.t()?)?; // (B, nh, T, S)
            let att = ops::attention_softmax(&scores, scale, !self.bidirectional && t > 1)?;
            ops::autocast::matmul(&att, &v)? // (B, nh, T, hd)
        };
        y.transpose(1, 2)?.reshape((b, t, nh * hd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{rand, tiny};
    use candle_core::Device;

    #[test]
    fn mla_matches_attention_over_explicitly_expanded_keys_and_values() {
        // Naive reference, position by position: latent c_j = rms(W_a x_j)[..r]; rotary key
        // rope(W_a x_j)[r..]; per head h: k_j = [W_b^h,nope c_j ; rope key], v_j = W_b^h,v c_j,
        // q_i = [q nope ; rope(q rot)], softmax over visible j of q_i.k_j / sqrt(hd + dr).
        for mode in [AttentionMode::Causal, AttentionMode::Bidirectional] {
            let cfg = tiny(Family::Llama, mode, Some("mla"));
            let mut p = ParamBuilder::init(4, &Device::Cpu);
            let attn = Attention::load(&mut p, "model.layers.0", &cfg).unwrap();
            let Qkv::Mla(m) = &attn.qkv else { panic!() };
            let (t, d) = (6, cfg.d_model);
            let x = rand(&[1, t, d], 9);
            let got = attn.forward(&x, None, 0, None).unwrap().squeeze(0).unwrap();
            let got: Vec<Vec<f32>> = got.to_vec2().unwrap();

            let mat = |l: &Linear| -> Vec<Vec<f32>> {
                // As [out][in].
                l.weight.dense().unwrap().to_vec2().unwrap()
            };
            let apply = |w: &Vec<Vec<f32>>, v: &[f32]| -> Vec<f32> {
                w.iter()
                    .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
                    .collect()
            };
            let (h, hd, r, dr) = (cfg.n_heads, cfg.head_dim, m.rank, m.rope_dim);
            let rope = |v: &[f32], pos: usize| -> Vec<f32> {
                let half = v.len() / 2;
                let mut out = vec![0f32; v.len()];
                for i in 0..half {
                    let ang = pos as f64 / cfg.rope_theta.powf(2.0 * i as f64 / v.len() as f64);
                    let (c, s) = (ang.cos() as f32, ang.sin() as f32);
                    out[i] = v[i] * c - v[i + half] * s;
                    out[i + half] = v[i + half] * c + v[i] * s;
                }
                out
            };
            let (wq, wa, wb, wo) = (mat(&m.q), mat(&m.kv_a), mat(&m.kv_b), mat(&attn.out));
            let xs: Vec<Vec<f32>> = x.squeeze(0).unwrap().to_vec2().unwrap();
            let mut keys = vec![vec![vec![0f32; hd + dr]; t]; h];
            let mut vals = vec![vec![vec![0f32; hd]; t]; h];
            let mut qs = vec![vec![vec![0f32; hd + dr]; t]; h];
            for j in 0..t {
                let a = apply(&wa, &xs[j]);
                let ms = a[..r].iter().map(|v| v * v).sum::<f32>() / r as f32;
                let c: Vec<f32> = a[..r]
                    .iter()
                    .map(|v| v / (ms + cfg.norm_eps as f32).sqrt())
                    .collect();
                let kr = rope(&a[r..], j);
                let kv = apply(&wb, &c);
                let q = apply(&wq, &xs[j]);
                for hh in 0..h {
                    let base = hh * 2 * hd;
                    keys[hh][j][..hd].copy_from_slice(&kv[base..base + hd]);
                    keys[hh][j][hd..].copy_from_slice(&kr);
                    vals[hh][j].copy_from_slice(&kv[base + hd..base + 2 * hd]);
                    let qb = hh * (hd + dr);
                    qs[hh][j][..hd].copy_from_slice(&q[qb..qb + hd]);
                    qs[hh][j][hd..].copy_from_slice(&rope(&q[qb + hd..qb + hd + dr], j));
                }
            }
            for i in 0..t {
                let mut y = vec![0f32; h * hd];
                for hh in 0..h {
                    let upto = if mode == AttentionMode::Causal {
                        i + 1
                    } else {
                        t
                    };
                    let sc: Vec<f32> = (0..upto)
                        .map(|j| {
                            qs[hh][i]
                                .iter()
                                .zip(&keys[hh][j])
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                / ((hd + dr) as f32).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = sc.iter().map(|s| (s - mx).exp()).sum();
                    for (j, s) in sc.iter().enumerate() {
                        let w = (s - mx).exp() / z;
                        for c in 0..hd {
                            y[hh * hd + c] += w * vals[hh][j][c];
                        }
                    }
                }
                let want = apply(&wo, &y);
                for (a, b) in got[i].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "{mode:?} t{i}: {a} vs {b}");
                }
            }
        }
    }
}
