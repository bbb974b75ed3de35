//! The layers every model is built from: a projection with Hugging Face weights (GPT-2's
//! `Conv1D` or `nn.Linear` layout; dense, or frozen at reduced precision and dequantized on the
//! fly; optionally with LoRA factors) and the two norms (LayerNorm, RMSNorm).

use candle_core::{Module, Result, Tensor};
use stackwise_common::config::{Family, ModelConfig, NormKind};

use super::params::{Init, ParamBuilder, Weight};
use crate::adapters::{Boft, Lora};
use crate::ops;

/// The std of GPT-2's initialization (residual projections get it over sqrt(2 n_layers)).
pub const INIT_STD: f64 = 0.02;

/// A projection. GPT-2's `Conv1D` stores `[in, out]` and computes `x @ W + b`; `nn.Linear`
/// stores `[out, in]` and computes `x @ W^T + b`. A frozen weight may be stored at reduced
/// precision, and may carry LoRA factors (`A (r, in)`, `B (out, r)`, PEFT's layout for both).
#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub conv1d: bool,
    pub lora: Option<Lora>,
    /// A butterfly orthogonal adapter: the weight becomes `diag(s) W Q^T`.
    pub boft: Option<Box<Boft>>,
    /// For decoding: the weight as column strips (`prepare_for_decoding`).
    pub strips: Option<ops::Strips>,
}

impl Linear {
    pub(super) fn load(
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
            .map(|(a, b, scale, dropout)| Lora {
                a,
                b,
                scale,
                dropout,
                module: crate::ops::dropout::module_key(name),
            });
        let boft = p
            .boft(name, d_in, d_out)?
            .map(|(r, s, dropout)| Boft::new(r, s).map(|b| Box::new(b.with_dropout(dropout, name))))
            .transpose()?;
        Ok(Self {
            weight,
            bias,
            conv1d,
            lora,
            boft,
            strips: None,
        })
    }

    /// Lay a dense weight out as column strips for decoding (`ops::Strips`); a quantized or
    /// BOFT-rotated weight keeps its own path.
    pub(super) fn prepare_for_decoding(&mut self) -> Result<()> {
        if self.boft.is_some() {
            return Ok(());
        }
        if let Weight::Dense(w) = &self.weight {
            let w = if self.conv1d { w.clone() } else { w.t()? };
            self.strips = Some(ops::Strips::new(&w.detach())?);
        }
        Ok(())
    }

    /// The weight the projection computes with: dense f32, with a BOFT adapter applied.
    fn effective_weight(&self) -> Result<Tensor> {
        let w = self.weight.dense()?;
        match &self.boft {
            Some(b) => b.apply(&w, self.conv1d),
            None => Ok(w),
        }
    }

    /// This projection with its weight as a dense f32 tensor (dequantized, and a BOFT adapter
    /// folded in, once).
    pub(super) fn materialized(&self) -> Result<Self> {
        if self.boft.is_none() && matches!(self.weight, Weight::Dense(_)) {
            return Ok(self.clone());
        }
        Ok(Self {
            weight: Weight::Dense(self.effective_weight()?),
            boft: None,
            strips: None,
            ..self.clone()
        })
    }

    /// The projection onto output features `start..start + len`, sharing this one's weights.
    pub(super) fn columns(&self, start: usize, len: usize) -> Result<Self> {
        let w = self.effective_weight()?;
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
            .map(|l| l.columns(start, len))
            .transpose()?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            conv1d: self.conv1d,
            lora,
            boft: None,
            strips: None,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with_hidden(x, None)
    }
}

impl Linear {
    /// The adapter's hidden state for `x (.., in)` ([`Lora::hidden`]), when it has LoRA.
    pub(super) fn lora_hidden(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let d_in = x.dim(candle_core::D::Minus1)?;
        self.lora
            .as_ref()
            .map(|l| l.hidden(&x.reshape(((), d_in))?))
            .transpose()
    }

    /// `forward`, with the LoRA hidden state already computed (`lora_hidden` of the projection
    /// this one is a slice of) or, with `None`, computed here.
    pub(super) fn forward_with_hidden(
        &self,
        x: &Tensor,
        hidden: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let x2 = x.reshape(((), d_in))?; // (B*T, in)
        // Row-invariant products: a row's output does not depend on the rows batched with it.
        let mut y = match &self.strips {
            Some(s) => s.matmul(&x2)?,
            None => {
                let w = self.effective_weight()?;
                if self.conv1d {
                    ops::matmul_rows(&x2, &w)?
                } else {
                    ops::matmul_rows(&x2, &w.t()?)?
                }
            }
        };
        if let Some(l) = &self.lora {
            let delta = match hidden {
                Some(h) => l.delta_from(h)?,
                None => l.delta(&x2)?,
            };
            y = (y + delta)?;
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
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) eps: f64,
}

impl Norm {
    pub(super) fn load(p: &mut ParamBuilder, name: &str, cfg: &ModelConfig) -> Result<Self> {
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
