//! Optimisation: AdamW (Loshchilov & Hutter 2019, PyTorch's update order), global-norm
//! gradient clipping and EMA weights. Learning-rate schedules are pure and shared:
//! `stackwise_common::schedule`.

pub mod adamw;
pub mod ema;

pub use adamw::{AdamW, AdamWConfig};
pub use ema::Ema;
