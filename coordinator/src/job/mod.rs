//! The job (DESIGN §2): a pure state machine holding intent (the plan, the target group,
//! the generation) and observed state (members, sessions, progress). Its methods return
//! [`Action`]s — send this command to that worker, look up the newest checkpoint — that the
//! service carries out; no I/O runs inside it.

pub mod history;
pub mod machine;
pub mod spec;
mod view;

pub use machine::{Action, CHECKPOINT_STOP_TIMEOUT, Job, Phase};
pub use spec::{GroupOptions, JobSpec, OnWorkerLoss, job_spec};
pub use view::status_json;
