//! One decoder block (pre-norm attention and MLP, sequential or parallel residual) and its
//! MLP (GELU or SwiGLU), loaded by their HF checkpoint keys.

use candle_core::{D, Module, Result, Tensor};
use stackwise_common::config::{Activation, Family, ModelConfig};

use super::attention::Attention;
use super::linear::{INIT_STD, Linear, Norm};
use super::paged::{PageTable, PagedLayer};
use super::params::ParamBuilder;
use super::rope::Rope;
use crate::ops;

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
    pub(crate) fn load(p: &mut ParamBuilder, i: usize, cfg: &ModelConfig) -> Result<Self> {
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

    /// Lay the projections out for decoding (`Linear::prepare_for_decoding`).
    pub(super) fn prepare_for_decoding(&mut self) -> Result<()> {
        self.attn.prepare_for_decoding()?;
        let m = &mut self.mlp;
        m.up.prepare_for_decoding()?;
        if let Some(g) = &mut m.gate {
            g.prepare_for_decoding()?;
        }
        m.down.prepare_for_decoding()
    }

    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        start: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        self.residual(x, |h| self.attn.forward(h, rope, start, cache))
    }

    /// `forward` for the packed new tokens of several sequences over a paged KV cache.
    pub(super) fn forward_paged(
        &self,
        x: &Tensor,
        rope: Option<&Rope>,
        seqs: &[(usize, &PageTable)],
        layer: &PagedLayer,
    ) -> Result<Tensor> {
        self.residual(x, |h| self.attn.forward_paged(h, rope, seqs, layer))
    }

    /// The block around its attention `attn` (applied to the normed input).
    fn residual(&self, x: &Tensor, attn: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let a = attn(&self.norm1.forward(x)?)?;
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
