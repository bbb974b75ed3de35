//! The model code training, generation and serving all use: the decoder-only transformer
//! (`decoder.rs`) and its layers (projections and norms, attention variants, rotary
//! positions, the KV cache), parameters and frozen storage, and Hugging Face folders.

pub mod attention;
pub mod block;
pub mod decoder;
mod dynamic_map;
pub mod fuser;
pub mod hf;
pub mod kernel_attention;
pub mod kv_cache;
pub mod linear;
pub mod mla;
pub mod paged;
pub mod params;
pub mod quant;
pub mod recompute;
pub mod rope;
pub mod scaffold;
#[cfg(test)]
pub(crate) mod testing;

pub use decoder::{Fusion, Transformer, names};
pub use fuser::{ScaffoldContext, ScaffoldInput};
pub use kv_cache::KvCache;
pub use paged::{PageTable, PagedKvCache};
pub use params::{ParamBuilder, Params};
pub use stackwise_common::config::{ModelConfig, RawModelConfig};
