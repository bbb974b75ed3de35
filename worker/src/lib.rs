//! StackWise worker: candle models, objectives, optimizer, the trainer and generation.

pub mod adapters;
pub mod alloc;
pub mod checkpoint;
pub mod comm;
pub mod device;
pub mod generate;
pub mod golden;
pub mod models;
pub mod objectives;
pub mod ops;
pub mod optim;
pub mod runtime;
pub mod serve;
pub mod train;
