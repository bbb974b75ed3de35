//! The worker runtime: the `stackwise worker` process (`worker.rs`, `options.rs`), its session with the
//! coordinator (`session.rs`), the stage it runs on its training thread (`stage.rs`) and the
//! gRPC client (`client.rs`).

pub mod backoff;
pub mod client;
pub mod options;
pub mod session;
pub mod stage;
pub mod worker;

pub use backoff::{Backoff, spread};
pub use client::Target;
pub use options::WorkerOptions;
pub use stage::run_tag;
pub use worker::{JobStopped, run_worker};
