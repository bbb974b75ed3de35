//! Scaffold fusion's fusers: gated cross-attention after chosen layers of a frozen base, over a
//! second ("scaffold") model's hidden states. The scaffold reads the prompt; the base
//! reads prompt + completion, and after each fused layer `i` its hidden states `h (B, T, D)`
//! become
//!
//! ```text
//! s     = scaffold(prompt)                      final hidden states (B, S, D_s), after its final norm
//! K, V  = s W_k^T + b_k, s W_v^T + b_v          (B, S, D), split into H heads: the width projection
//! Q     = h W_q^T + b_q
//! A     = softmax(Q K^T / sqrt(D / H) + pad) V  per head; pad = -inf on prompt padding
//! c     = LayerNorm(A W_o^T + b_o)
//! g     = sigmoid([h ; c] W_g^T + b_g)          per feature, from the base state and the context
//! h'    = h + w * g * c * rms(h)                w = influence weight (scaffold_weight)
//! ```
//!
//! `rms(h) = sqrt(mean_d h^2)` per position: the normalized context enters at the scale of the
//! base's residual stream, which in a trained model is far above 1 (16 in a 2-layer GPT-2
//! trained by StackWise), so the scaffold can steer it whatever the base's depth and scale.
//!
//! With `pool: mean` the scaffold states are first averaged over the prompt, so `K` and `V`
//! have one position (the original fuser's attention). The norm sits on the attended
//! context, not on the residual sum, so `w = 0` leaves the base's hidden states exactly
//! unchanged: the fuser is skipped altogether and the model is the base, bit for bit.

use std::collections::HashMap;

use candle_core::{D, Device, Module, Result, Tensor};
use stackwise_common::config::ScaffoldPool;
use stackwise_common::tokenizer::Tok;

use super::linear::{INIT_STD, Linear, Norm};
use super::params::{Init, ParamBuilder, Weight};
use crate::ops;

/// The prefix of every fuser parameter: `fusers.{layer}.q_proj.weight`, ...
pub const FUSER_PREFIX: &str = "fusers.";

/// One gated cross-attention fuser (see the module docs).
#[derive(Clone)]
pub struct Fuser {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm: Norm,
    gate: Linear,
    heads: usize,
}

fn projection(p: &mut ParamBuilder, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    let w = p.get(
        &format!("{name}.weight"),
        &[d_out, d_in],
        Init::Normal(INIT_STD),
    )?;
    let b = p.get(&format!("{name}.bias"), &[d_out], Init::Zeros)?;
    Ok(Linear {
        weight: Weight::Dense(w),
        bias: Some(b),
        conv1d: false,
        lora: None,
        boft: None,
        strips: None,
    })
}

impl Fuser {
    /// The fuser after base layer `layer`: base width `d`, scaffold width `d_s`.
    pub fn load(
        p: &mut ParamBuilder,
        layer: usize,
        d: usize,
        d_s: usize,
        heads: usize,
    ) -> Result<Self> {
        let n = |part: &str| format!("{FUSER_PREFIX}{layer}.{part}");
        Ok(Self {
            q: projection(p, &n("q_proj"), d, d)?,
            k: projection(p, &n("k_proj"), d_s, d)?,
            v: projection(p, &n("v_proj"), d_s, d)?,
            o: projection(p, &n("o_proj"), d, d)?,
            norm: Norm {
                weight: p.get(&n("norm.weight"), &[d], Init::Ones)?,
                bias: Some(p.get(&n("norm.bias"), &[d], Init::Zeros)?),
                eps: 1e-5,
            },
            gate: projection(p, &n("gate"), 2 * d, d)?,
            heads,
        })
    }

    /// `(B, S, D_s)` scaffold states → this fuser's keys and values `(B, H, S, D/H)`.
    fn keys_values(&self, s: &Tensor) -> Result<(Tensor, Tensor)> {
        let split = |x: Tensor| -> Result<Tensor> {
            let (b, n, d) = x.dims3()?;
            x.reshape((b, n, self.heads, d / self.heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        Ok((split(self.k.forward(s)?)?, split(self.v.forward(s)?)?))
    }

    /// `h + w * g * LayerNorm(cross-attention(h, K, V)) * rms(h)`.
    fn forward(
        &self,
        h: &Tensor,
        kv: &(Tensor, Tensor),
        pad: Option<&Tensor>,
        w: f64,
    ) -> Result<Tensor> {
        let (b, t, d) = h.dims3()?;
        let hd = d / self.heads;
        let q = self
            .q
            .forward(h)?
            .reshape((b, t, self.heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let mut scores = (ops::autocast::matmul(&q, &kv.0.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(pad) = pad {
            scores = scores.broadcast_add(pad)?;
        }
        let a = ops::autocast::matmul(&ops::softmax_last_dim(&scores)?, &kv.1)?; // (B, H, T, hd)
        let a = a.transpose(1, 2)?.reshape((b, t, d))?;
        let c = self.norm.forward(&self.o.forward(&a)?)?;
        let g = self.gate.forward(&Tensor::cat(&[h, &c], D::Minus1)?)?;
        // sigmoid(x) = (1 + tanh(x / 2)) / 2: no overflow, so no inf / inf in the backward.
        let g = (((g * 0.5)?.tanh()? + 1.0)? * 0.5)?;
        // The context enters at the base's own scale (its residual stream's RMS per position).
        let rms = h.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
        h + ((g * c)?.broadcast_mul(&rms)? * w)?
    }
}

/// The fusers of a base, by the layer they follow (the scaffold model itself is
/// `decoder::Fusion::scaffold`).
#[derive(Clone)]
pub struct Fusers {
    /// `(base layer, fuser)`, by layer.
    pub fusers: Vec<(usize, Fuser)>,
    /// The trained influence (the default `scaffold_weight`).
    pub influence: f64,
    pub pool: ScaffoldPool,
    /// The scaffold's tokenizer when it differs from the base's (prompts are re-encoded).
    pub tokenizer: Option<Tok>,
}

/// The scaffold's reading of a batch of prompts, computed once: each fuser's keys and
/// values, the padding mask, and the influence the fusers apply.
pub struct ScaffoldContext {
    kv: Vec<(Tensor, Tensor)>,
    pad: Option<Tensor>,
    pub influence: f64,
}

/// The scaffold's input: prompts `(B, S)` right-padded, and each one's length.
#[derive(Debug, Clone)]
pub struct ScaffoldInput {
    pub ids: Tensor,
    pub lens: Vec<usize>,
}

impl ScaffoldInput {
    /// Prompts padded with `pad` to `width` (at least the longest).
    pub fn new(prompts: &[Vec<u32>], width: usize, pad: u32, device: &Device) -> Result<Self> {
        let width = width.max(prompts.iter().map(Vec::len).max().unwrap_or(1));
        let mut ids = Vec::with_capacity(prompts.len() * width);
        for p in prompts {
            ids.extend(p);
            ids.extend(std::iter::repeat_n(pad, width - p.len()));
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (prompts.len(), width), device)?,
            lens: prompts.iter().map(Vec::len).collect(),
        })
    }
}

impl Fusers {
    /// Fusers after each of `layers`, from base width `d` to scaffold width `d_s`.
    pub fn build(
        p: &mut ParamBuilder,
        layers: &[usize],
        (d, d_s): (usize, usize),
        heads: usize,
        pool: ScaffoldPool,
        influence: f64,
    ) -> Result<Self> {
        let mut fusers = layers
            .iter()
            .map(|&l| Ok((l, Fuser::load(p, l, d, d_s, heads)?)))
            .collect::<Result<Vec<_>>>()?;
        fusers.sort_by_key(|f| f.0);
        Ok(Self {
            fusers,
            influence,
            pool,
            tokenizer: None,
        })
    }

    /// The fuser after base layer `layer`, if any.
    pub fn fuser_after(&self, layer: usize) -> Option<usize> {
        self.fusers.iter().position(|f| f.0 == layer)
    }

    /// The scaffold's final states `s (B, S, D_s)` of `input`, projected for every fuser.
    pub fn context(
        &self,
        s: Tensor,
        input: &ScaffoldInput,
        influence: f64,
    ) -> Result<ScaffoldContext> {
        let (b, width, _) = s.dims3()?;
        let device = s.device();
        let real: Vec<f32> = input
            .lens
            .iter()
            .flat_map(|&n| (0..width).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        let (states, pad) = match self.pool {
            ScaffoldPool::Mean => {
                let m = Tensor::from_vec(real, (b, width, 1), device)?;
                let lens: Vec<f32> = input.lens.iter().map(|&n| n.max(1) as f32).collect();
                let lens = Tensor::from_vec(lens, (b, 1, 1), device)?;
                let pooled = s.broadcast_mul(&m)?.sum_keepdim(1)?.broadcast_div(&lens)?;
                (pooled, None)
            }
            ScaffoldPool::None => {
                let pad = if input.lens.iter().all(|&n| n >= width) {
                    None
                } else {
                    let v: Vec<f32> = real
                        .iter()
                        .map(|&r| if r > 0.0 { 0.0 } else { f32::NEG_INFINITY })
                        .collect();
                    Some(Tensor::from_vec(v, (b, 1, 1, width), device)?)
                };
                (s, pad)
            }
        };
        let kv = self
            .fusers
            .iter()
            .map(|(_, f)| f.keys_values(&states))
            .collect::<Result<Vec<_>>>()?;
        Ok(ScaffoldContext { kv, pad, influence })
    }

    /// Apply fuser `j` to the base's hidden states `h`; identity at influence 0.
    pub fn apply(&self, j: usize, h: &Tensor, ctx: &ScaffoldContext) -> Result<Tensor> {
        if ctx.influence == 0.0 {
            return Ok(h.clone());
        }
        self.fusers[j]
            .1
            .forward(h, &ctx.kv[j], ctx.pad.as_ref(), ctx.influence)
    }

    /// Every fuser tensor by name (`fusers.{layer}.…`), for `fusers.safetensors`.
    pub fn fuser_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (l, f) in &self.fusers {
            let mut put = |part: &str, t: &Tensor| -> Result<()> {
                out.insert(format!("{FUSER_PREFIX}{l}.{part}"), t.detach().copy()?);
                Ok(())
            };
            for (name, lin) in [
                ("q_proj", &f.q),
                ("k_proj", &f.k),
                ("v_proj", &f.v),
                ("o_proj", &f.o),
                ("gate", &f.gate),
            ] {
                put(&format!("{name}.weight"), &lin.weight.dense()?)?;
                if let Some(b) = &lin.bias {
                    put(&format!("{name}.bias"), b)?;
                }
            }
            put("norm.weight", &f.norm.weight)?;
            if let Some(b) = &f.norm.bias {
                put("norm.bias", b)?;
            }
        }
        Ok(out)
    }
}
