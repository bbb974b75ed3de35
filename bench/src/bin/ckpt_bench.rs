//! Checkpoint save / load throughput of a GPT-2-small-sized model (124M parameters, fp32) with
//! its AdamW state, to any store URI (the local S3 server in `bench/ckpt.sh`), and the training
//! stall: the time the training loop spends staging the checkpoint in memory before the
//! background upload takes over. Prints one JSON line.

use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use candle_core::Device;
use clap::Parser;
use stackwise_common::checkpoint::{CheckpointMeta, CheckpointStore};
use stackwise_common::config::RawModelConfig;
use stackwise_common::store::Store;
use stackwise_worker::models::{Transformer, hf};
use stackwise_worker::optim::{AdamW, AdamWConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Where to save, e.g. s3://bench/ckpt or /tmp/ckpt.
    #[arg(long)]
    uri: String,
    #[arg(long, default_value_t = 12)]
    layers: usize,
    #[arg(long, default_value_t = 768)]
    d_model: usize,
    #[arg(long, default_value_t = 50257)]
    vocab: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    stackwise_worker::alloc::tune_for_training();
    let cfg = RawModelConfig {
        d_model: Some(a.d_model),
        n_layers: Some(a.layers),
        n_heads: Some(12),
        vocab_size: Some(a.vocab),
        seq_len: Some(1024),
        ..Default::default()
    }
    .resolve(None)?;
    let (_model, params) = Transformer::init(&cfg, 1, &Device::Cpu)?;
    let opt = AdamW::new(&params.vars, AdamWConfig::default())?;
    let n_params: usize = params.count();

    // The stall: what `Trainer::save_checkpoint` does on the training thread. The first
    // checkpoint of a process also pays for fresh pages; later ones reuse the allocator's.
    let stage = || -> Result<Vec<(String, Bytes)>> {
        Ok(vec![
            (
                stackwise_worker::checkpoint::MODEL.to_string(),
                Bytes::from(hf::params_to_safetensors(&params.snapshot())?),
            ),
            (
                stackwise_worker::checkpoint::OPTIMIZER.to_string(),
                Bytes::from(hf::params_to_safetensors(&opt.state_tensors())?),
            ),
        ])
    };
    let t = Instant::now();
    drop(stage()?);
    let first_stall = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let files = stage()?;
    let stall = t.elapsed().as_secs_f64();
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();

    let run = Store::open(&a.uri)?.child(&format!("runs/bench-{}", std::process::id()));
    let ckpt = CheckpointStore::new(&run);
    let t = Instant::now();
    let name = ckpt.save(1, CheckpointMeta::default(), files)?;
    let save = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let loaded = ckpt.load(&name)?; // reads and verifies every sha256
    let load = t.elapsed().as_secs_f64();
    assert_eq!(loaded.files.values().map(|b| b.len()).sum::<usize>(), bytes);
    for (n, _) in run.list("")? {
        run.delete(&n)?;
    }
    println!(
        "{}",
        serde_json::json!({"impl": "stackwise", "params": n_params, "bytes": bytes, "stall_s": stall, "first_stall_s": first_stall,
            "save_s": save, "load_s": load, "save_gbps": bytes as f64 / save / 1e9,
            "load_gbps": bytes as f64 / load / 1e9, "stall_over_save": stall / save})
    );
    Ok(())
}
