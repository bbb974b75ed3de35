//! StackWise shared pieces: configuration, tokenizers, token shards, checkpoint store.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod rng;
pub mod store;
pub mod tokenizer;
