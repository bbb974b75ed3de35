//! Optimisation: AdamW (Loshchilov & Hutter 2019, PyTorch's update order), global-norm
//! gradient clipping, learning-rate schedules and EMA weights.

pub mod adamw;
pub mod ema;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use ema::Ema;
pub use schedule::{Schedule, ScheduleKind};
