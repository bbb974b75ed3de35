//! `stackwise eval`: mean next-token cross-entropy over consecutive non-overlapping blocks of
//! N tokens (an incomplete last block is dropped), as HF `run_clm` evaluates; or, with
//! `--mask-fractions`, masked-token loss and accuracy at given mask fractions.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::Args;
use stackwise_worker::objectives::{Batch, Masking, Objective, Totals};

use super::args::ModelArgs;
use super::model_source;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub source: ModelArgs,
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
    /// Masked-token evaluation (models trained with mlm / diffusion): mask this share of
    /// the tokens (comma-separated list, e.g. 0.15,0.5,0.9) and report the mean
    /// cross-entropy and accuracy on the masked tokens at each.
    #[arg(long, value_delimiter = ',', value_name = "F,F,…")]
    pub mask_fractions: Vec<f64>,
    /// Seed of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, serde::Serialize)]
pub struct MaskedResult {
    pub mask_fraction: f64,
    pub loss: f64,
    pub accuracy: f64,
    pub masked_tokens: usize,
}

/// Mean CE and accuracy on masked tokens, one mask fraction at a time.
fn masked_eval(
    m: &model_source::LoadedModel,
    rows: &[(Vec<u32>, Vec<f32>)],
    a: &EvalArgs,
) -> Result<Vec<MaskedResult>> {
    let Some(mask_id) = m.model.cfg.mask_token_id else {
        bail!(
            "--mask-fractions: {} was not trained with a masked objective (its config.json has no mask_token_id)",
            m.source
        );
    };
    let mut out = Vec::new();
    for &f in &a.mask_fractions {
        if !(f > 0.0 && f <= 1.0) {
            bail!("--mask-fractions: {f} is not in (0, 1]");
        }
        let masking = Masking {
            objective: Objective::Diffusion,
            mask_id,
            vocab: mask_id,
            fractions: vec![f],
            seed: a.seed,
        };
        let mut totals = Totals::default();
        for (i, chunk) in rows.chunks(a.batch).enumerate() {
            let keys: Vec<u64> = (0..chunk.len()).map(|j| (i * a.batch + j) as u64).collect();
            let mut b = Batch::masked(chunk, &keys, 0, &masking, &Device::Cpu)?;
            // Plain mean over masked tokens (not the 1/t training weight).
            b.weights = b.weights.ones_like()?;
            totals.add(&m.model, &b)?;
        }
        let n = totals.predicted.max(1.0);
        out.push(MaskedResult {
            mask_fraction: f,
            loss: totals.nll / n,
            accuracy: totals.hits / n,
            masked_tokens: totals.predicted as usize,
        });
    }
    Ok(out)
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
    let m = a.source.load()?;
    if a.seq_len > m.model.cfg.seq_len {
        bail!(
            "--seq-len {} exceeds the model's maximum of {} positions",
            a.seq_len,
            m.model.cfg.seq_len
        );
    }
    let text = stackwise_common::data::source::read_utf8(&a.data)?;
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
    let rows: Vec<(Vec<u32>, Vec<f32>)> = ids
        .chunks_exact(a.seq_len)
        .map(|c| (c.to_vec(), vec![1.0; a.seq_len]))
        .collect();
    if !a.mask_fractions.is_empty() {
        let results = masked_eval(&m, &rows, &a)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"masked": results, "tokens": blocks * a.seq_len, "blocks": blocks})
            );
        } else {
            for r in &results {
                println!(
                    "{}: mask fraction {:.2} | masked-token loss {:.6} | accuracy {:.4} | {} masked tokens",
                    m.source, r.mask_fraction, r.loss, r.accuracy, r.masked_tokens
                );
            }
        }
        return Ok(());
    }
    let mut totals = Totals::default();
    for chunk in rows.chunks(a.batch) {
        totals.add(&m.model, &Batch::from_rows(chunk, &device)?)?;
    }
    let loss = totals.mean().context("no predicted position")?;
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
