//! Training: config, the single-process trainer, its resumable state and reporting.

pub mod actcache;
pub mod config;
pub mod plan;
pub mod report;
pub mod state;
pub mod step;
pub mod trainer;

pub use config::TrainConfig;
pub use plan::{LoraSpec, Plan, Precision, StagePlan};
pub use trainer::{Aborted, RunOptions, TrainEvent, TrainSummary, Trainer};
