//! `stackwise data prepare` and `stackwise tokenizer train`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use stackwise_common::data::prepare::{PrepareOptions, collect_inputs, prepare, read_utf8};
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
}

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
}

/// Read every input (UTF-8 checked) for tokenizer training.
fn read_texts(inputs: &[PathBuf]) -> Result<Vec<String>> {
    collect_inputs(inputs)?
        .iter()
        .map(|f| Ok(read_utf8(f)?))
        .collect()
}

pub fn train_tokenizer(inputs: &[PathBuf], kind: TokenizerKind, vocab_size: usize) -> Result<Tok> {
    let texts = read_texts(inputs)?;
    let started = std::time::Instant::now();
    let tok = Tok::train(kind, &texts, vocab_size)?;
    tracing::info!(kind = ?kind, vocab = tok.vocab_size(), secs = started.elapsed().as_secs_f64(), "trained tokenizer");
    Ok(tok)
}

pub fn prepare_dataset(a: &PrepareArgs) -> Result<()> {
    if !(0.0..1.0).contains(&a.val_fraction) {
        anyhow::bail!("--val-fraction must be in [0, 1), got {}", a.val_fraction);
    }
    let tok = match &a.tokenizer {
        Some(p) => Tok::load(p)?,
        None => train_tokenizer(&a.inputs, a.train_tokenizer, a.vocab_size)?,
    };
    let out = Store::open(&a.out)?;
    let opts = PrepareOptions {
        val_fraction: a.val_fraction,
        response_marker: (!a.no_response_marker).then(|| a.response_marker.clone()),
        ..Default::default()
    };
    let index = prepare(&a.inputs, &tok, &out, &opts)
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
            let tok = train_tokenizer(&a.inputs, a.kind, a.vocab_size)?;
            std::fs::write(&a.out, tok.to_json()?)
                .with_context(|| format!("write {}", a.out.display()))?;
            eprintln!("wrote {} ({} tokens)", a.out.display(), tok.vocab_size());
            Ok(())
        }
    }
}
