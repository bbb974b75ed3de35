//! The decoder-only transformer: GPT-2 (Radford et al. 2019) and LLaMA (Touvron et al. 2023)
//! layouts with mixable options (MHA/GQA, causal/bidirectional, learned/rotary positions,
//! GELU/SwiGLU, LayerNorm/RMSNorm, tied/untied head, sequential/parallel residual).
//! Field names follow the HF checkpoint keys; see `names` for the two layouts.

use candle_core::{D, Device, Module, Result, Tensor};

use super::config::{
    Activation, AttentionKind, AttentionMode, Family, ModelConfig, NormKind, Positions,
};
use super::params::{Init, ParamBuilder, Params, Weight};
use crate::ops;

const INIT_STD: f64 = 0.02;

/// A projection. GPT-2's `Conv1D` stores `[in, out]` and computes `x @ W + b`; `nn.Linear`
/// stores `[out, in]` and computes `x @ W^T + b`. A frozen weight may be stored at reduced
/// precision, and may carry LoRA factors (`A (r, in)`, `B (out, r)`, PEFT's layout for both).
#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub conv1d: bool,
    pub lora: Option<Lora>,
}

#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Linear {
    fn load(
        p: &mut ParamBuilder,
        name: &str,
        d_in: usize,
        d_out: usize,
        cfg: &ModelConfig,
        std: f64,
    ) -> Result<Self> {
        let conv1d = cfg.family == Family::Gpt2;
        let shape = if conv1d { [d_in, d_out] } else { [d_out, d_in] };
        let weight = p.linear_weight(&format!("{name}.weight"), &shape, Init::Normal(std))?;
        let bias = if cfg.bias {
            Some(p.get(&format!("{name}.bias"), &[d_out], Init::Zeros)?)
        } else {
            None
        };
        let lora = p
            .lora(name, d_in, d_out)?
            .map(|(a, b, scale)| Lora { a, b, scale });
        Ok(Self {
            weight,
            bias,
            conv1d,
            lora,
        })
    }

    /// This projection with its weight as a dense f32 tensor (dequantized once).
    fn materialized(&self) -> Result<Self> {
        Ok(match &self.weight {
            Weight::Dense(_) => self.clone(),
            Weight::Frozen(f) => Self {
                weight: Weight::Dense(f.dense()?),
                ..self.clone()
            },
        })
    }

    /// The projection onto output features `start..start + len`, sharing this one's weights.
    fn columns(&self, start: usize, len: usize) -> Result<Self> {
        let w = self.weight.dense()?;
        let weight = if self.conv1d {
            w.narrow(1, start, len)?
        } else {
            w.narrow(0, start, len)?
        };
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.narrow(0, start, len))
            .transpose()?;
        let lora = self
            .lora
            .as_ref()
            .map(|l| -> Result<Lora> {
                Ok(Lora {
                    a: l.a.clone(),
                    b: l.b.narrow(0, start, len)?,
                    scale: l.scale,
                })
            })
            .transpose()?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            conv1d: self.conv1d,
            lora,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let x2 = x.reshape(((), d_in))?; // (B*T, in)
        let w = self.weight.dense()?;
        let mut y = if self.conv1d {
            x2.matmul(&w)?
        } else {
            x2.matmul(&w.t()?)?
        };
        if let Some(l) = &self.lora {
            let delta = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + (delta * l.scale)?)?;
        }
        let y = match &self.bias {
            Some(b) => ops::add_bias(&y, b)?,
            None => y,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        y.reshape(out_dims)
    }
}

#[derive(Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn load(p: &mut ParamBuilder, name: &str, cfg: &ModelConfig) -> Result<Self> {
        let weight = p.get(&format!("{name}.weight"), &[cfg.d_model], Init::Ones)?;
        let bias = match cfg.norm {
            NormKind::LayerNorm => {
                Some(p.get(&format!("{name}.bias"), &[cfg.d_model], Init::Zeros)?)
            }
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            weight,
            bias,
            eps: cfg.norm_eps,
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => ops::layer_norm(x, &self.weight, b, self.eps),
            None => ops::rms_norm(x, &self.weight, self.eps),
        }
    }
}

/// Rotary embedding tables in HF's non-interleaved "rotate_half" layout.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor, // (max_T, head_dim)
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        Self::with_dim(cfg.head_dim, cfg, device)
    }

    /// Tables for rotating `hd`-dimensional vectors (MLA's decoupled rotary part).
    fn with_dim(hd: usize, cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let t = cfg.seq_len;
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for pos in 0..t {
            for half in 0..2 {
                let _ = half;
                for f in &inv {
                    let a = pos as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (t, hd), device)?,
            sin: Tensor::from_vec(sin, (t, hd), device)?,
        })
    }

    /// `x`: (B, H, T, hd) at positions `start..start+T`.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, _, t, hd) = x.dims4()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Keys and values of earlier positions, per layer: (B, n_kv_heads, S, head_dim).
#[derive(Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone)]
enum Qkv {
    Fused(Linear),
    Split { q: Linear, k: Linear, v: Linear },
    Mla(Box<MlaProj>),
}

/// DeepSeek-V2's multi-head latent attention projections (names as in HF's
/// `DeepseekV2Attention`, without the query low-rank path): queries `q_proj` with a nope and
/// a rotary part per head; `kv_a_proj_with_mqa` makes the key/value latent (normalised by
/// `kv_a_layernorm`) and one rotary key shared by all heads; `kv_b_proj` expands the latent
/// into per-head nope keys and values. The KV cache holds the latent and the rotary key.
#[derive(Clone)]
struct MlaProj {
    q: Linear,
    kv_a: Linear,
    kv_norm: Norm,
    kv_b: Linear,
    rope: Rope,
    rank: usize,
    rope_dim: usize,
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

/// `elu(x) + 1`: the positive feature map of linear attention.
fn feature_map(x: &Tensor) -> Result<Tensor> {
    x.elu(1.0)? + 1.0
}

/// (T, S) 0/1 mask: query `i` (at position `S - T + i`) sees keys `0..=S - T + i`.
fn causal_ones(t: usize, s: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= s - t + i { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, s), device)
}

/// Linear attention in its quadratic form, exact for both masks: `y_i = sum_j a_ij v_j /
/// sum_j a_ij` with `a_ij = phi(q_i) . phi(k_j)` over the visible keys `j`. `q (B, H, T, d)`,
/// `k, v (B, H, S, d)`; with `S > T` the queries are the last `T` positions.
pub fn kernel_attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    let (t, s) = (q.dim(2)?, k.dim(2)?);
    let a = feature_map(q)?.matmul(&feature_map(k)?.t()?)?; // (B, H, T, S)
    let a = if causal && t > 1 {
        a.broadcast_mul(&causal_ones(t, s, q.device())?)?
    } else {
        a
    };
    let den = (a.sum_keepdim(3)? + 1e-6)?;
    a.matmul(v)?.broadcast_div(&den)
}

impl Attention {
    fn load(p: &mut ParamBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        if cfg.attention == AttentionKind::Mla {
            let (base, out) = match cfg.family {
                Family::Gpt2 => (format!("{prefix}.attn"), format!("{prefix}.attn.c_proj")),
                Family::Llama => (
                    format!("{prefix}.self_attn"),
                    format!("{prefix}.self_attn.o_proj"),
                ),
            };
            let (h, hd, r, dr) = (cfg.n_heads, cfg.head_dim, cfg.mla_kv_rank, cfg.mla_rope_dim);
            let mla = MlaProj {
                q: Linear::load(
                    p,
                    &format!("{base}.q_proj"),
                    cfg.d_model,
                    h * (hd + dr),
                    cfg,
                    INIT_STD,
                )?,
                kv_a: Linear::load(
                    p,
                    &format!("{base}.kv_a_proj_with_mqa"),
                    cfg.d_model,
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
            return Ok(Self {
                qkv: Qkv::Mla(Box::new(mla)),
                out: Linear::load(p, &out, cfg.q_dim(), cfg.d_model, cfg, out_std)?,
                n_heads: h,
                n_kv_heads: h,
                head_dim: hd,
                bidirectional: cfg.attention_mode == AttentionMode::Bidirectional,
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
            bidirectional: cfg.attention_mode == AttentionMode::Bidirectional,
            kernel: cfg.attention == AttentionKind::Kernel,
        })
    }

    /// MLA: the latent and rotary key are cached; keys and values are expanded from them.
    fn forward_mla(
        &self,
        m: &MlaProj,
        x: &Tensor,
        start: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, hd, r, dr) = (self.n_heads, self.head_dim, m.rank, m.rope_dim);
        let q =
            m.q.forward(x)?
                .reshape((b, t, nh, hd + dr))?
                .transpose(1, 2)?
                .contiguous()?; // (B, H, T, hd + dr)
        let q_rope = m.rope.apply(&q.narrow(3, hd, dr)?.contiguous()?, start)?;
        let q = Tensor::cat(&[&q.narrow(3, 0, hd)?, &q_rope], 3)?;
        let kva = m.kv_a.forward(x)?; // (B, T, r + dr)
        let latent = m.kv_norm.forward(&kva.narrow(2, 0, r)?.contiguous()?)?; // (B, T, r)
        let k_rope = kva
            .narrow(2, r, dr)?
            .reshape((b, t, 1, dr))?
            .transpose(1, 2)?
            .contiguous()?; // (B, 1, T, dr)
        let k_rope = m.rope.apply(&k_rope, start)?;
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
        let kv = m
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
        let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?; // (B, H, T, S)
        let att = ops::attention_softmax(&scores, scale, !self.bidirectional && t > 1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.out.forward(&y)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        start: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        if let Qkv::Mla(m) = &self.qkv {
            return self.forward_mla(m, x, start, cache);
        }
        let (b, t, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.head_dim, self.n_heads, self.n_kv_heads);
        let (q, k, v) = match &self.qkv {
            Qkv::Mla(_) => unreachable!("handled above"),
            // Split the fused [q | k | v] projection on its weight, not on its output: the
            // gradient of a narrow is padded to the full tensor, which is far smaller for the
            // (d, q + 2kv) weight than for the (B, T, q + 2kv) activation.
            Qkv::Fused(l) => {
                let l = l.materialized()?;
                (
                    l.columns(0, nh * hd)?.forward(x)?,
                    l.columns(nh * hd, nkv * hd)?.forward(x)?,
                    l.columns((nh + nkv) * hd, nkv * hd)?.forward(x)?,
                )
            }
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
        };
        let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?; // (B, nh, T, hd)
        let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?; // (B, nkv, T, hd)
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (q, k) = match rope {
            Some(r) => (r.apply(&q, start)?, r.apply(&k, start)?),
            None => (q, k),
        };
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
        if self.kernel {
            let y = kernel_attention(&q, &k, &v, !self.bidirectional)?; // (B, nh, T, hd)
            let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            return self.out.forward(&y);
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = q.matmul(&k.t()?)?; // (B, nh, T, S)
        let att = ops::attention_softmax(&scores, scale, !self.bidirectional && t > 1)?;
        let y = att.matmul(&v)?; // (B, nh, T, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.out.forward(&y)
    }
}

#[derive(Clone)]
pub struct Mlp {
    up: Linear,
    gate: Option<Linear>,
    down: Linear,
    activation: Activation,
}

impl Mlp {
    fn load(p: &mut ParamBuilder, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        let swiglu = cfg.activation == Activation::Swiglu;
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        Ok(match cfg.family {
            Family::Gpt2 => Self {
                // SwiGLU in GPT-2 layout: c_fc holds [gate | up].
                up: Linear::load(
                    p,
                    &format!("{prefix}.mlp.c_fc"),
                    d,
                    if swiglu { 2 * ff } else { ff },
                    cfg,
                    INIT_STD,
                )?,
                gate: None,
                down: Linear::load(p, &format!("{prefix}.mlp.c_proj"), ff, d, cfg, out_std)?,
                activation: cfg.activation,
            },
            Family::Llama => Self {
                gate: if swiglu {
                    Some(Linear::load(
                        p,
                        &format!("{prefix}.mlp.gate_proj"),
                        d,
                        ff,
                        cfg,
                        INIT_STD,
                    )?)
                } else {
                    None
                },
                up: Linear::load(p, &format!("{prefix}.mlp.up_proj"), d, ff, cfg, INIT_STD)?,
                down: Linear::load(p, &format!("{prefix}.mlp.down_proj"), ff, d, cfg, out_std)?,
                activation: cfg.activation,
            },
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match (self.activation, &self.gate) {
            (Activation::Swiglu, Some(gate)) => (gate.forward(x)?.silu()? * self.up.forward(x)?)?,
            (Activation::Swiglu, None) => {
                let gu = self.up.forward(x)?;
                let ff = gu.dim(D::Minus1)? / 2;
                (gu.narrow(D::Minus1, 0, ff)?.silu()? * gu.narrow(D::Minus1, ff, ff)?)?
            }
            (Activation::Gelu, _) => ops::gelu_tanh(&self.up.forward(x)?)?,
            (Activation::GeluErf, _) => self.up.forward(x)?.gelu_erf()?,
            (Activation::Relu, _) => self.up.forward(x)?.relu()?,
        };
        self.down.forward(&h)
    }
}

#[derive(Clone)]
pub struct Block {
    norm1: Norm,
    attn: Attention,
    norm2: Norm,
    mlp: Mlp,
    parallel_residual: bool,
}

impl Block {
    fn load(p: &mut ParamBuilder, i: usize, cfg: &ModelConfig) -> Result<Self> {
        let (prefix, n1, n2) = match cfg.family {
            Family::Gpt2 => (format!("transformer.h.{i}"), "ln_1", "ln_2"),
            Family::Llama => (
                format!("model.layers.{i}"),
                "input_layernorm",
                "post_attention_layernorm",
            ),
        };
        Ok(Self {
            norm1: Norm::load(p, &format!("{prefix}.{n1}"), cfg)?,
            attn: Attention::load(p, &prefix, cfg)?,
            norm2: Norm::load(p, &format!("{prefix}.{n2}"), cfg)?,
            mlp: Mlp::load(p, &prefix, cfg)?,
            parallel_residual: cfg.parallel_residual,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        start: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward(&self.norm1.forward(x)?, rope, start, cache)?;
        if self.parallel_residual {
            // GPT-J / NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            (x + a)? + self.mlp.forward(&self.norm2.forward(x)?)?
        } else {
            let x = (x + a)?;
            let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
            x + m
        }
    }
}

/// A decoder-only language model.
#[derive(Clone)]
pub struct Transformer {
    pub cfg: ModelConfig,
    tok_emb: Tensor, // (V, D)
    pos_emb: Option<Tensor>,
    blocks: Vec<Block>,
    norm_f: Norm,
    lm_head: Option<Tensor>, // (V, D) when untied
    rope: Option<Rope>,
}

/// Names of the embedding tables, which differ by family.
pub mod names {
    use super::Family;

    pub fn tok_emb(f: Family) -> &'static str {
        match f {
            Family::Gpt2 => "transformer.wte.weight",
            Family::Llama => "model.embed_tokens.weight",
        }
    }

    pub fn pos_emb(f: Family) -> &'static str {
        match f {
            Family::Gpt2 => "transformer.wpe.weight",
            Family::Llama => "model.embed_positions.weight",
        }
    }

    pub fn norm_f(f: Family) -> &'static str {
        match f {
            Family::Gpt2 => "transformer.ln_f",
            Family::Llama => "model.norm",
        }
    }

    pub const LM_HEAD: &str = "lm_head.weight";
}

impl Transformer {
    pub fn build(cfg: &ModelConfig, p: &mut ParamBuilder, device: &Device) -> Result<Self> {
        Self::build_layers(cfg, p, device, cfg.n_layers)
    }

    /// A model of the first `active` layers of `cfg` (a layer-wise stage): the same
    /// parameter names and initialisation as the full model, the later layers left out.
    pub fn build_layers(
        cfg: &ModelConfig,
        p: &mut ParamBuilder,
        device: &Device,
        active: usize,
    ) -> Result<Self> {
        let f = cfg.family;
        let tok_emb = p.get(
            names::tok_emb(f),
            &[cfg.vocab_size, cfg.d_model],
            Init::Normal(INIT_STD),
        )?;
        let pos_emb = match cfg.positions {
            Positions::Learned => Some(p.get(
                names::pos_emb(f),
                &[cfg.seq_len, cfg.d_model],
                Init::Normal(0.01),
            )?),
            Positions::Rope => None,
        };
        let blocks = (0..active.min(cfg.n_layers))
            .map(|i| Block::load(p, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm_f = Norm::load(p, names::norm_f(f), cfg)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(p.get(
                names::LM_HEAD,
                &[cfg.vocab_size, cfg.d_model],
                Init::Normal(INIT_STD),
            )?)
        };
        let rope = match cfg.positions {
            Positions::Rope => Some(Rope::new(cfg, device)?),
            Positions::Learned => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb,
            pos_emb,
            blocks,
            norm_f,
            lm_head,
            rope,
        })
    }

    /// A freshly initialised model (seeded) and its parameters.
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<(Self, Params)> {
        let mut p = ParamBuilder::init(seed, device);
        let model = Self::build(cfg, &mut p, device)?;
        Ok((model, p.finish().0))
    }

    /// Final hidden states `(B, T, D)` for tokens `ids (B, T)` at positions `start..start+T`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        start: usize,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut x = self.embed(ids, start)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, self.rope.as_ref(), start, slot)?;
        }
        self.norm_f.forward(&x)
    }

    /// Token (and learned position) embeddings `(B, T, D)`.
    pub fn embed(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if start + t > self.cfg.seq_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's seq_len {}",
                start + t,
                self.cfg.seq_len
            )
        }
        let mut x = self.tok_emb.embedding(&ids.flatten_all()?)?.reshape((
            ids.dim(0)?,
            t,
            self.cfg.d_model,
        ))?;
        if let Some(pe) = &self.pos_emb {
            x = ops::add_bias(&x, &pe.narrow(0, start, t)?)?;
        }
        Ok(x)
    }

    /// The input of layer `upto`: embeddings and layers `0..upto` (an activation-cache entry).
    pub fn prefix(&self, ids: &Tensor, upto: usize) -> Result<Tensor> {
        let mut x = self.embed(ids, 0)?;
        for block in &self.blocks[..upto] {
            x = block.forward(&x, self.rope.as_ref(), 0, None)?;
        }
        Ok(x.detach())
    }

    /// Final hidden states from the input `x (B, T, D)` of layer `from`.
    pub fn hidden_after(&self, x: &Tensor, from: usize) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.blocks[from..] {
            x = block.forward(&x, self.rope.as_ref(), 0, None)?;
        }
        self.norm_f.forward(&x)
    }

    /// Project hidden states `(.., D)` to vocabulary logits `(.., V)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.tok_emb);
        let dims = hidden.dims().to_vec();
        let d = dims[dims.len() - 1];
        let y = hidden.reshape(((), d))?.matmul(&head.t()?)?;
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.cfg.vocab_size;
        y.reshape(out)
    }

    /// Layers in the forward pass (fewer than `cfg.n_layers` in a layer-wise stage).
    pub fn active_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.tok_emb.device().clone()
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.logits(&self.hidden(ids, start, cache)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::RawModelConfig;

    fn tiny_with(family: Family, mode: AttentionMode, attention: Option<&str>) -> ModelConfig {
        RawModelConfig {
            family: Some(family),
            d_model: Some(32),
            n_layers: Some(2),
            n_heads: Some(4),
            n_kv_heads: if attention == Some("mla") {
                None
            } else {
                Some(2)
            },
            attention_type: attention.map(str::to_string),
            vocab_size: Some(50),
            seq_len: Some(16),
            attention_mode: Some(mode),
            ..Default::default()
        }
        .resolve(None)
        .unwrap()
    }

    fn ids() -> Tensor {
        Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn causal_attention_ignores_the_future_and_bidirectional_does_not() {
        for (family, kind) in [Family::Gpt2, Family::Llama]
            .into_iter()
            .flat_map(|f| [None, Some("mla"), Some("kernel")].map(|k| (f, k)))
        {
            for mode in [AttentionMode::Causal, AttentionMode::Bidirectional] {
                let (m, _) =
                    Transformer::init(&tiny_with(family, mode, kind), 1, &Device::Cpu).unwrap();
                let a = m.forward(&ids(), 0, None).unwrap();
                let changed = Tensor::new(&[[1u32, 5, 9, 3, 7, 40]], &Device::Cpu).unwrap();
                let b = m.forward(&changed, 0, None).unwrap();
                let prefix = max_diff(&a.narrow(1, 0, 5).unwrap(), &b.narrow(1, 0, 5).unwrap());
                match mode {
                    AttentionMode::Causal => assert_eq!(prefix, 0.0, "{family:?} {kind:?}"),
                    AttentionMode::Bidirectional => assert!(prefix > 1e-6, "{family:?} {kind:?}"),
                }
            }
        }
    }

    #[test]
    fn kv_cache_gives_the_same_logits_as_a_full_forward() {
        for (family, kind) in [Family::Gpt2, Family::Llama]
            .into_iter()
            .flat_map(|f| [None, Some("mla"), Some("kernel")].map(|k| (f, k)))
        {
            let cfg = tiny_with(family, AttentionMode::Causal, kind);
            let (m, _) = Transformer::init(&cfg, 2, &Device::Cpu).unwrap();
            let full = m.forward(&ids(), 0, None).unwrap();
            let mut cache = KvCache::new(cfg.n_layers);
            let first = m
                .forward(&ids().narrow(1, 0, 4).unwrap(), 0, Some(&mut cache))
                .unwrap();
            let mut last = first.narrow(1, 3, 1).unwrap();
            for pos in 4..6 {
                last = m
                    .forward(&ids().narrow(1, pos, 1).unwrap(), pos, Some(&mut cache))
                    .unwrap();
            }
            assert_eq!(cache.len(), 6);
            assert!(max_diff(&full.narrow(1, 5, 1).unwrap(), &last) < 1e-5);
            assert!(max_diff(&full.narrow(1, 0, 4).unwrap(), &first) < 1e-5);
        }
    }

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = stackwise_common::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn to3(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        // (1, H, T, d) -> [h][t][d]
        t.squeeze(0).unwrap().to_vec3().unwrap()
    }

    #[test]
    fn kernel_attention_matches_the_recurrent_form() {
        // Naive reference: running sums S = sum phi(k_j) v_j^T and z = sum phi(k_j), read by
        // phi(q_i) (causal: after adding key i; bidirectional: after all keys).
        let (h, t, d) = (2, 7, 5);
        let (q, k, v) = (
            rand(&[1, h, t, d], 1),
            rand(&[1, h, t, d], 2),
            rand(&[1, h, t, d], 3),
        );
        let phi = |x: f32| if x > 0.0 { x + 1.0 } else { x.exp() };
        for causal in [true, false] {
            let got = to3(&kernel_attention(&q, &k, &v, causal).unwrap());
            let (q, k, v) = (to3(&q), to3(&k), to3(&v));
            for hh in 0..h {
                for i in 0..t {
                    let upto = if causal { i + 1 } else { t };
                    let mut s = vec![vec![0f32; d]; d];
                    let mut z = vec![0f32; d];
                    for j in 0..upto {
                        for a in 0..d {
                            z[a] += phi(k[hh][j][a]);
                            for c in 0..d {
                                s[a][c] += phi(k[hh][j][a]) * v[hh][j][c];
                            }
                        }
                    }
                    let den: f32 = (0..d).map(|a| phi(q[hh][i][a]) * z[a]).sum::<f32>() + 1e-6;
                    for c in 0..d {
                        let num: f32 = (0..d).map(|a| phi(q[hh][i][a]) * s[a][c]).sum();
                        let want = num / den;
                        assert!(
                            (got[hh][i][c] - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "causal {causal} h{hh} t{i} c{c}: {} vs {want}",
                            got[hh][i][c]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn mla_matches_attention_over_explicitly_expanded_keys_and_values() {
        // Naive reference, position by position: latent c_j = rms(W_a x_j)[..r]; rotary key
        // rope(W_a x_j)[r..]; per head h: k_j = [W_b^h,nope c_j ; rope key], v_j = W_b^h,v c_j,
        // q_i = [q nope ; rope(q rot)], softmax over visible j of q_i.k_j / sqrt(hd + dr).
        for mode in [AttentionMode::Causal, AttentionMode::Bidirectional] {
            let cfg = tiny_with(Family::Llama, mode, Some("mla"));
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
