//! Rotary position embeddings (Su et al. 2021, RoFormer) in Hugging Face's non-interleaved
//! "rotate_half" layout: `inv_freq[i] = theta^(-2i/d)`, `x * cos + rotate_half(x) * sin`.

use candle_core::{D, Device, Result, Tensor};
use stackwise_common::config::ModelConfig;

/// Rotary embedding tables in HF's non-interleaved "rotate_half" layout.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor, // (max_T, head_dim)
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        Self::with_dim(cfg.head_dim, cfg, device)
    }

    /// Tables for rotating `hd`-dimensional vectors (MLA's decoupled rotary part).
    pub fn with_dim(hd: usize, cfg: &ModelConfig, device: &Device) -> Result<Self> {
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
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, _, t, hd) = x.dims4()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
        let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}
