//! `stackwise data prepare` and `stackwise tokenizer train`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use stackwise_common::data::prepare::{PrepareOptions, prepare_scanned};
use stackwise_common::data::source::{self, Scan};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::{Tok, TokenizerKind};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Tokenize text files, folders or JSONL into token shards + index.json (written last).
    Prepare(PrepareArgs),
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Text files, folders of them, or .jsonl files ({"text"} or {"prompt","completion"}).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output dataset: a path or file:// URI.
    #[arg(long)]
    pub out: String,
    /// Use this tokenizer (tokenizer.json, a model folder, or GPT-2 vocab/merges folder).
    #[arg(long, conflicts_with = "train_tokenizer")]
    pub tokenizer: Option<PathBuf>,
    /// Otherwise train one of this kind on the inputs.
    #[arg(long, default_value = "bpe")]
    pub train_tokenizer: TokenizerKind,
    /// Vocabulary size of a trained BPE tokenizer.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Fraction held out for validation.
    #[arg(long, default_value_t = 0.05)]
    pub val_fraction: f64,
    /// In JSONL "text" records, the loss (SFT) starts after this marker.
    #[arg(long, default_value = "### Response:")]
    pub response_marker: String,
    /// Do not look for a response marker.
    #[arg(long)]
    pub no_response_marker: bool,
    /// Train the tokenizer on about this many MB of the inputs, taken evenly through every
    /// file (0: all of them).
    #[arg(long, default_value_t = DEFAULT_SAMPLE_MB)]
    pub tokenizer_sample_mb: u64,
    /// Tokens per shard file (a shard closes at the first document end past this).
    #[arg(long, default_value_t = PrepareOptions::default().shard_tokens)]
    pub shard_tokens: usize,
}

/// Enough text for a 4k-50k BPE vocabulary to settle, and a bound on the trainer's memory.
pub const DEFAULT_SAMPLE_MB: u64 = 64;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE, byte or char tokenizer and write tokenizer.json.
    Train(TokenizerTrainArgs),
}

#[derive(Args)]
pub struct TokenizerTrainArgs {
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long, default_value = "bpe")]
    pub kind: TokenizerKind,
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long, default_value = "tokenizer.json")]
    pub out: PathBuf,
    /// Train on about this many MB of the inputs, taken evenly through every file (0: all).
    #[arg(long, default_value_t = DEFAULT_SAMPLE_MB)]
    pub sample_mb: u64,
}

/// Train a tokenizer on about `sample_mb` MB of the scanned inputs (all with 0), streamed.
fn train_tokenizer(
    scan: &Scan,
    marker: Option<&str>,
    kind: TokenizerKind,
    vocab_size: usize,
    sample_mb: u64,
) -> Result<Tok> {
    let budget = if sample_mb == 0 {
        u64::MAX
    } else {
        sample_mb << 20
    };
    let started = std::time::Instant::now();
    let mut failed = None;
    let texts =
        source::sample(scan, budget, marker).map_while(|t| t.map_err(|e| failed = Some(e)).ok());
    let tok = Tok::train_from_iter(kind, texts, vocab_size);
    if let Some(e) = failed {
        return Err(e.into());
    }
    let tok = tok?;
    tracing::info!(
        kind = ?kind,
        vocab = tok.vocab_size(),
        sample_mb = (budget.min(scan.bytes) as f64 / 1e6),
        secs = started.elapsed().as_secs_f64(),
        "trained tokenizer"
    );
    Ok(tok)
}

pub fn prepare_dataset(a: &PrepareArgs) -> Result<()> {
    if !(0.0..1.0).contains(&a.val_fraction) {
        anyhow::bail!("--val-fraction must be in [0, 1), got {}", a.val_fraction);
    }
    let marker = (!a.no_response_marker).then(|| a.response_marker.clone());
    // One pass checks every file before anything is trained or written.
    let scan = source::scan(&a.inputs, marker.as_deref())?;
    let tok = match &a.tokenizer {
        Some(p) => Tok::load(p)?,
        None => train_tokenizer(
            &scan,
            marker.as_deref(),
            a.train_tokenizer,
            a.vocab_size,
            a.tokenizer_sample_mb,
        )?,
    };
    let out = Store::open(&a.out)?;
    let opts = PrepareOptions {
        val_fraction: a.val_fraction,
        response_marker: marker,
        shard_tokens: a.shard_tokens,
        ..Default::default()
    };
    let index = prepare_scanned(&scan, &tok, &out, &opts)
        .with_context(|| format!("prepare dataset at {}", a.out))?;
    eprintln!(
        "dataset {}: {} files | vocab {} | train {} tokens ({} docs) | validation {} tokens ({} docs) | unigram entropy {:.4} nats/token",
        a.out,
        index.sources.len(),
        index.vocab_size,
        index.train.tokens,
        index.train.docs,
        index.validation.tokens,
        index.validation.docs,
        index.unigram_entropy.unwrap_or(f64::NAN)
    );
    Ok(())
}

pub fn run_data(c: DataCommand) -> Result<()> {
    match c {
        DataCommand::Prepare(a) => prepare_dataset(&a),
    }
}

pub fn run_tokenizer(c: TokenizerCommand) -> Result<()> {
    match c {
        TokenizerCommand::Train(a) => {
            // Text fields of JSONL records, whole (no response marker split needed).
            let scan = source::scan(&a.inputs, None)?;
            let tok = train_tokenizer(&scan, None, a.kind, a.vocab_size, a.sample_mb)?;
            std::fs::write(&a.out, tok.to_json()?)
                .with_context(|| format!("write {}", a.out.display()))?;
            eprintln!("wrote {} ({} tokens)", a.out.display(), tok.vocab_size());
            Ok(())
        }
    }
}
