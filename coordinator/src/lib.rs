//! StackWise's control plane: the pure job state machine (intent and observed state, which
//! returns actions), membership (leases, generations), and the thin gRPC service that
//! carries the actions out. It builds on `stackwise-common` and `stackwise-proto` alone —
//! no tensor code; the `stackwise` binary (`cli/`) joins it with the worker.

pub mod http;
pub mod job;
pub mod membership;
pub mod service;

pub use job::{Action, GroupOptions, Job, JobSpec, OnWorkerLoss, Phase, job_spec};
pub use service::{Coordinator, Shared, TlsFiles};
