//! Training: the trainer's loop (`trainer.rs`) and the pieces it calls: the run spec resolved
//! once at start, the stage runner, the step, the checkpointer (pure policy and upload) and
//! what it persists, evaluation and early stopping, micro-batches and masking salts, and
//! reporting; the resumable state and the activation cache.

pub mod actcache;
pub mod batches;
pub mod checkpointer;
pub mod early_stopping;
pub mod eval;
pub mod grad_sync;
pub mod persistence;
pub mod report;
pub mod spec;
pub mod stage;
pub mod state;
pub mod step;
pub mod trainer;

pub use spec::RunSpec;
pub use trainer::{Aborted, RunOptions, TrainEvent, TrainSummary, Trainer};
