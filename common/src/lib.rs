//! StackWise's shared vocabulary, below both the coordinator and the worker: configuration
//! (raw → resolved), the plan and its pure planner, LR schedules, tokenizers, token shards
//! and the data cursor, the object store and checkpoint storage. No tensor code (no candle):
//! the control plane builds on this alone.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod plan;
pub mod rng;
pub mod schedule;
pub mod sentencepiece;
pub mod store;
pub mod tokenizer;
