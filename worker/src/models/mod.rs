//! Transformer models with Hugging Face parameter names, and HF folder loading/export.

pub mod config;
pub mod decoder;
pub mod hf;
pub mod params;
pub mod quant;

pub use config::{ModelConfig, RawModelConfig};
pub use decoder::{KvCache, Transformer};
pub use params::{ParamBuilder, Params};
