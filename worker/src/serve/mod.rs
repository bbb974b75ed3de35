//! Serving: the engine that schedules requests over the models (`engine.rs`); the HTTP layer
//! is the binary's (`stackwise serve`).

pub mod engine;

pub use engine::{Engine, EngineStats, Event, Finish, GenerationRequest, PagePool, ServedModel};
