//! Generation, shared by `stackwise generate` and the serving engine: autoregressive
//! sampling with a contiguous or paged KV cache (`sampling.rs`) and mask-diffusion sampling
//! for bidirectional models (`diffusion.rs`).

pub mod diffusion;
pub mod sampling;

pub use diffusion::{Remasking, diffusion_generate};
pub use sampling::{Generation, SamplingConfig, generate, generate_fused, generate_paged, pick};
