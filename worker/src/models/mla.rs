//! Multi-head latent attention (DeepSeek-AI 2024, DeepSeek-V2): keys and values come from a
//! low-rank latent, plus one decoupled rotary key shared by all heads, so the KV cache holds
//! only the latent and the rotary key. Names as in HF's `DeepseekV2Attention`, without the
//! query low-rank path.

use candle_core::{Module, Result, Tensor};
use stackwise_common::config::{Family, ModelConfig};

use super::linear::{INIT_STD, Linear, Norm};
use super::params::{Init, ParamBuilder};
use super::rope::Rope;
use crate::ops;

/// The projections: queries `q_proj` with a nope and a rotary part per head;
/// `kv_a_proj_with_mqa` makes the key/value latent (normalised by `kv_a_layernorm`) and the
/// shared rotary key; `kv_b_proj` expands the latent into per-head nope keys and values.
#[derive(Clone)]
pub struct MlaProj {
    pub q: Linear,
    pub kv_a: Linear,
    pub kv_norm: Norm,
    pub kv_b: Linear,
    pub rope: Rope,
    pub rank: usize,
    pub rope_dim: usize,
}

impl MlaProj {
    /// The projections of layer `prefix` and its output projection's name.
    pub fn load(p: &mut ParamBuilder, prefix: &str, cfg: &ModelConfig) -> Result<(Self, String)> {
        let (base, out) = match cfg.family {
            Family::Gpt2 => (format!("{prefix}.attn"), format!("{prefix}.attn.c_proj")),
            Family::Llama => (
                format!("{prefix}.self_attn"),
                format!("{prefix}.self_attn.o_proj"),
            ),
        };
        let (h, hd, r, dr) = (cfg.n_heads, cfg.head_dim, cfg.mla_kv_rank, cfg.mla_rope_dim);
        let d = cfg.d_model;
        let mla = Self {
            q: Linear::load(
                p,
                &format!("{base}.q_proj"),
                d,
                h * (hd + dr),
                cfg,
                INIT_STD,
            )?,
            kv_a: Linear::load(
                p,
                &format!("{base}.kv_a_proj_with_mqa"),
                d,
                r + dr,
                cfg,
                INIT_STD,
            )?,
            kv_norm: Norm {
                weight: p.get(&format!("{base}.kv_a_layernorm.weight"), &[r], Init::Ones)?,
                bias: None,
                eps: cfg.norm_eps,
            },
            kv_b: Linear::load(
                p,
                &format!("{base}.kv_b_proj"),
                r,
                h * 2 * hd,
                cfg,
                INIT_STD,
            )?,
            rope: Rope::with_dim(dr, cfg, &p.device())?,
            rank: r,
            rope_dim: dr,
        };
        Ok((mla, out))
    }

    /// Attention output before the output projection, `(B, T, nh * hd)`: the latent and
    /// rotary key are cached; keys and values are expanded from them.
    pub fn attend(
        &self,
        x: &Tensor,
        (nh, hd): (usize, usize),
        causal: bool,
        start: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (r, dr) = (self.rank, self.rope_dim);
        let q = self
            .q
            .forward(x)?
            .reshape((b, t, nh, hd + dr))?
            .transpose(1, 2)?
            .contiguous()?; // (B, H, T, hd + dr)
        let q_rope = self
            .rope
            .apply(&q.narrow(3, hd, dr)?.contiguous()?, start)?;
        let q = Tensor::cat(&[&q.narrow(3, 0, hd)?, &q_rope], 3)?;
        let kva = self.kv_a.forward(x)?; // (B, T, r + dr)
        let latent = self.kv_norm.forward(&kva.narrow(2, 0, r)?.contiguous()?)?; // (B, T, r)
        let k_rope = kva
            .narrow(2, r, dr)?
            .reshape((b, t, 1, dr))?
            .transpose(1, 2)?
            .contiguous()?; // (B, 1, T, dr)
        let k_rope = self.rope.apply(&k_rope, start)?;
        // Cached as (B, 1, S, r) and (B, 1, S, dr): the sequence on dim 2 like MHA's cache.
        let latent = latent.unsqueeze(1)?;
        let (latent, k_rope) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pl, pk)) => (
                        Tensor::cat(&[&pl, &latent], 2)?,
                        Tensor::cat(&[&pk, &k_rope], 2)?,
                    ),
                    None => (latent, k_rope),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (latent, k_rope),
        };
        let latent = latent.squeeze(1)?;
        let s = latent.dim(1)?;
        let kv = self
            .kv_b
            .forward(&latent)?
            .reshape((b, s, nh, 2 * hd))?
            .transpose(1, 2)?
            .contiguous()?; // (B, H, S, 2 hd)
        let k = Tensor::cat(
            &[&kv.narrow(3, 0, hd)?, &k_rope.broadcast_as((b, nh, s, dr))?],
            3,
        )?;
        let v = kv.narrow(3, hd, hd)?.contiguous()?;
        let scale = 1.0 / ((hd + dr) as f64).sqrt();
        let scores = ops::autocast::matmul(&q.contiguous()?, &k.t()?.contiguous()?)?; // (B, H, T, S)
        let att = ops::attention_softmax(&scores, scale, causal && t > 1)?;
        ops::autocast::matmul(&att, &v)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))
    }
}
