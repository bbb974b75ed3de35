//! Serving: the engine that schedules requests over the models (`engine.rs`), what requests
//! and their events are (`request.rs`), and the state of each running sequence
//! (`sequence.rs`); the HTTP layer is the binary's (`stackwise serve`).

pub mod engine;
pub mod request;
mod sequence;

pub use engine::{Engine, EngineStats, PagePool};
pub use request::{Event, Finish, GenerationRequest, ServedModel};
