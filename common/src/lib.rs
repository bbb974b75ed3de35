//! StackWise shared pieces: configuration, tokenizers, token shards, checkpoint store.

pub mod rng;
