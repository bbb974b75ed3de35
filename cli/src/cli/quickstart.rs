//! `stackwise quickstart`: the whole path on one CPU with nothing to download — write an
//! embedded corpus (three Shakespeare plays), train a BPE tokenizer, prepare the data, train
//! a small GPT-2-style model, and sample from it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use stackwise_common::data::PrepareOptions;
use stackwise_common::tokenizer::TokenizerKind;

use super::data::{PrepareArgs, prepare_dataset};
use super::generate::{GenerateArgs, run as generate};
use super::train::{TrainArgs, run as train};

const CORPUS: &[(&str, &str)] = &[
    (
        "macbeth.txt",
        include_str!("../../assets/corpus/macbeth.txt"),
    ),
    (
        "midsummer_nights_dream.txt",
        include_str!("../../assets/corpus/midsummer_nights_dream.txt"),
    ),
    (
        "comedy_of_errors.txt",
        include_str!("../../assets/corpus/comedy_of_errors.txt"),
    ),
];

#[derive(Args)]
pub struct QuickstartArgs {
    /// Working folder (corpus, dataset, config, run).
    #[arg(long, default_value = "quickstart")]
    pub out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    /// Train on these text files instead of the embedded plays.
    #[arg(long)]
    pub corpus: Vec<PathBuf>,
    /// Prompt for the sample at the end.
    #[arg(long, default_value = "MACBETH.\n")]
    pub prompt: String,
    /// Write the corpus, dataset and config, then stop: train the config elsewhere (a
    /// coordinator and workers, as deploy/compose does).
    #[arg(long)]
    pub prepare_only: bool,
}

fn config_yaml(data: &str, output: &str, steps: u64) -> String {
    format!(
        "# Written by `stackwise quickstart`; run it again with `stackwise train <this file>`.
run:
  name: quickstart
  output: {output}
  seed: 1234
model:
  family: gpt2
  d_model: 128
  n_layers: 4
  n_heads: 4
  seq_len: 128
data:
  path: {data}
training:
  objective: clm
  steps: {steps}
  batch_size: 16
  lr: 2.0e-3
  schedule: cosine
  warmup_steps: 30
  min_lr_ratio: 0.1
  weight_decay: 0.1
  grad_clip: 1.0
  eval_every: 100
  eval_batches: 8
  checkpoint_every: 200
  keep_last: 2
  log_every: 20
"
    )
}

pub fn run(a: QuickstartArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let inputs = if a.corpus.is_empty() {
        let dir = a.out.join("corpus");
        std::fs::create_dir_all(&dir)?;
        for (name, text) in CORPUS {
            std::fs::write(dir.join(name), text).with_context(|| format!("write {name}"))?;
        }
        vec![dir]
    } else {
        a.corpus.clone()
    };
    let data = a.out.join("data");
    eprintln!("[1/3] tokenizer + dataset -> {}", data.display());
    prepare_dataset(&PrepareArgs {
        inputs,
        out: data.to_string_lossy().to_string(),
        tokenizer: None,
        train_tokenizer: TokenizerKind::Bpe,
        vocab_size: 2048,
        val_fraction: 0.05,
        response_marker: String::new(),
        no_response_marker: true,
        tokenizer_sample_mb: super::data::DEFAULT_SAMPLE_MB,
        shard_tokens: PrepareOptions::default().shard_tokens,
    })?;
    let config = a.out.join("quickstart.yaml");
    std::fs::write(
        &config,
        config_yaml(&data.to_string_lossy(), &a.out.to_string_lossy(), a.steps),
    )?;
    if a.prepare_only {
        eprintln!(
            "prepared: train it with `stackwise train {0}` or `stackwise coordinator --config {0}`",
            config.display()
        );
        return Ok(());
    }
    let run_dir = a.out.join("runs").join("quickstart");
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("clear the previous quickstart run {}", run_dir.display()))?;
    }
    eprintln!(
        "[2/3] training ({} steps; config {})",
        a.steps,
        config.display()
    );
    train(TrainArgs {
        config,
        overrides: Default::default(),
        run: Default::default(),
        output: Default::default(),
    })?;
    eprintln!("[3/3] sampling from {}", run_dir.display());
    generate(GenerateArgs {
        source: super::args::ModelArgs {
            model: run_dir,
            ema: false,
            adapter: None,
            device: Default::default(),
        },
        prompt: a.prompt.clone(),
        sampling: super::generate::SamplingArgs {
            max_new_tokens: 120,
            min_new_tokens: 0,
            temperature: 0.8,
            greedy: false,
            top_k: 40,
            top_p: None,
            repetition_penalty: 1.1,
            no_repeat_ngram: None,
            stop_on_repeat_ngram: None,
            scaffold_weight: None,
            seed: 0,
            no_cache: false,
        },
        sampler: super::generate::Sampler::Auto,
        diffusion_steps: 16,
        remasking: super::generate::Remasking::Confidence,
        paged: super::generate::PagedArgs {
            paged: false,
            page_size: 64,
            max_pages: 6,
        },
        json: false,
    })
}
