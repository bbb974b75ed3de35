//! `stackwise eval`: mean next-token cross-entropy over consecutive non-overlapping blocks of
//! N tokens (an incomplete last block is dropped), as HF `run_clm` evaluates.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;
use stackwise_worker::objectives::{Batch, nll_sum};

use super::model_source;

#[derive(Args)]
pub struct EvalArgs {
    /// HF model folder, checkpoint folder or run folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A UTF-8 text file, tokenized with the model's tokenizer.
    #[arg(long)]
    pub data: PathBuf,
    /// Block length N (each block scores its N-1 predicted positions).
    #[arg(long)]
    pub seq_len: usize,
    /// Blocks per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Do not add the tokenizer's special tokens (BOS…); HF's `tokenizer(text)` adds them.
    #[arg(long)]
    pub no_special_tokens: bool,
    /// Evaluate the EMA weights when the checkpoint has them.
    #[arg(long)]
    pub ema: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub blocks: usize,
}

pub fn run(a: EvalArgs) -> Result<()> {
    if a.seq_len < 2 {
        bail!(
            "--seq-len must be at least 2 (one input and one target), got {}",
            a.seq_len
        );
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let device = Device::Cpu;
    let m = model_source::load(&a.model, a.ema, &device)?;
    if a.seq_len > m.model.cfg.seq_len {
        bail!(
            "--seq-len {} exceeds the model's maximum of {} positions",
            a.seq_len,
            m.model.cfg.seq_len
        );
    }
    let text = stackwise_common::data::prepare::read_utf8(&a.data)?;
    let ids = m
        .tok
        .encode(&text, !a.no_special_tokens)
        .context("tokenize --data")?;
    let blocks = ids.len() / a.seq_len;
    if blocks == 0 {
        bail!(
            "{}: {} tokens, fewer than one block of --seq-len {}",
            a.data.display(),
            ids.len(),
            a.seq_len
        );
    }
    let (mut sum, mut count) = (0f64, 0f64);
    let rows: Vec<(Vec<u32>, Vec<f32>)> = ids
        .chunks_exact(a.seq_len)
        .map(|c| (c.to_vec(), vec![1.0; a.seq_len]))
        .collect();
    for chunk in rows.chunks(a.batch) {
        let b = Batch::from_rows(chunk, &device)?;
        sum += nll_sum(&m.model, &b)?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        count += b.weight()?;
    }
    let loss = sum / count;
    let r = EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: blocks * a.seq_len,
        blocks,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: loss {:.6} | perplexity {:.4} | {} tokens in {} blocks of {}",
            m.source, r.loss, r.perplexity, r.tokens, r.blocks, a.seq_len
        );
    }
    Ok(())
}
