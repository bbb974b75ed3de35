//! The training plan (DESIGN §3): the stage types every process speaks, and the pure planner
//! that computes them from the config.

mod error;
mod finetune;
pub mod planner;
pub mod types;

pub use planner::{PlanError, plan, plan_config, schedule_fractions, table};
pub use types::{
    BoftSpec, LoraSpec, Plan, PlanFormatError, ScaffoldStage, StagePlan, suffix_match,
};
