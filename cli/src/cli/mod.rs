//! Subcommands of the `stackwise` binary.

pub mod adapter;
pub mod args;
pub mod bench;
pub mod chat;
pub mod ckpt;
pub mod data;
pub mod dist;
pub mod eval;
pub mod finetune;
pub mod generate;
pub mod logging;
pub mod model_source;
pub mod quickstart;
pub mod selfcheck;
pub mod serve;
pub mod train;
