//! StackWise coordinator: membership (leases, generations), the job state machine, the gRPC
//! service, and the single-node launcher. Hosts the `stackwise` binary (`src/main.rs`).

pub mod job;
pub mod launch;
pub mod membership;
pub mod plan;
pub mod service;
pub mod spec;

pub use job::{Job, JobSpec, OnWorkerLoss, Phase};
pub use service::{Coordinator, TlsFiles};
