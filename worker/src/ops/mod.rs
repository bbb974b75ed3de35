//! Differentiable building-block ops. candle-nn's fused `softmax_last_dim`, `layer_norm` and
//! `rms_norm` have no backward pass (TECH-NOTES), so training uses these instead: compositions
//! of candle ops (every one with a backward) and fused CPU kernels with hand-written backward.

mod attention;
pub mod autocast;
mod bias;
pub(crate) mod cpu;
mod cross_entropy;
pub mod dropout;
mod fastmath;
mod fused;
pub(crate) mod inverse;
mod log_softmax;
mod matmul;
mod sdpa;

pub use attention::attention_softmax;
pub use bias::add_bias;
pub use cpu::simd_level;
pub use cross_entropy::token_nll;
pub use fused::{gelu_tanh, layer_norm, rms_norm, softmax_last_dim};
pub use inverse::batch_inverse;
pub use log_softmax::log_softmax_last_dim;
pub use matmul::{Strips, matmul_rows};
pub use sdpa::scaled_dot_product_attention;
