//! Helpers of the models' unit tests: seeded random tensors, tiny configs, differences.

use candle_core::{Device, Tensor};
use stackwise_common::config::{AttentionMode, Family, ModelConfig, RawModelConfig};

/// A standard-normal tensor of `shape`, seeded.
pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = stackwise_common::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("shape matches")
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar())
        .expect("same shapes")
}

/// A 2-layer, 32-wide model of `family` (GQA with 2 kv heads unless MLA).
pub fn tiny(family: Family, mode: AttentionMode, attention: Option<&str>) -> ModelConfig {
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
    .expect("a valid tiny config")
}
