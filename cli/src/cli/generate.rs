//! `stackwise generate`: sample a continuation of a prompt.

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::Args;
use stackwise_worker::generate::{SamplingConfig, generate};

use super::args::ModelArgs;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 100)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Never repeat an n-gram of this size.
    #[arg(long)]
    pub no_repeat_ngram: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the whole context every token (to compare with the KV cache).
    #[arg(long)]
    pub no_cache: bool,
    /// `auto`: mask-diffusion for a bidirectional model trained with a masked objective,
    /// autoregressive otherwise.
    #[arg(long, value_enum, default_value_t = Sampler::Auto)]
    pub sampler: Sampler,
    /// Denoising steps of the diffusion sampler (more = slower, better).
    #[arg(long, default_value_t = 16)]
    pub diffusion_steps: usize,
    /// Which masked positions each diffusion step commits.
    #[arg(long, value_enum, default_value_t = Remasking::Confidence)]
    pub remasking: Remasking,
    /// Print {"text", "tokens", "tokens_per_s", "sampler"} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sampler {
    Auto,
    /// Left to right with a KV cache.
    Ar,
    /// Start fully masked, predict all, re-mask the least confident.
    Diffusion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Remasking {
    /// Keep the tokens the model is surest of, re-mask the rest (LLaDA).
    Confidence,
    /// Keep a random subset (MDLM's ancestral order): less drawn to frequent tokens, better
    /// for small or briefly trained models.
    Random,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    if let Some(p) = a.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        bail!("--top-p must be in (0, 1], got {p}");
    }
    if a.repetition_penalty <= 0.0 {
        bail!("--repetition-penalty must be > 0 (1 = off)");
    }
    let m = a.source.load()?;
    let prompt = m
        .tok
        .encode(&a.prompt, false)
        .context("tokenize the prompt")?;
    if prompt.is_empty() {
        bail!("the prompt tokenizes to nothing; give some text");
    }
    if prompt.len() >= m.model.cfg.seq_len {
        bail!(
            "the prompt is {} tokens; this model sees at most {} positions, so shorten the prompt",
            prompt.len(),
            m.model.cfg.seq_len
        );
    }
    let cfg = SamplingConfig {
        temperature: if a.greedy { 0.0 } else { a.temperature },
        top_k: (a.top_k > 0).then_some(a.top_k),
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        no_repeat_ngram: a.no_repeat_ngram,
        min_new_tokens: a.min_new_tokens,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        use_cache: !a.no_cache,
        eos_token_id: m.tok.eos_id().or(m.model.cfg.eos_token_id),
    };
    let bidirectional =
        m.model.cfg.attention_mode == stackwise_common::config::AttentionMode::Bidirectional;
    let diffusion = match a.sampler {
        Sampler::Ar => false,
        Sampler::Diffusion => true,
        Sampler::Auto => bidirectional && m.model.cfg.mask_token_id.is_some(),
    };
    let out = if diffusion {
        let Some(mask_id) = m.model.cfg.mask_token_id else {
            bail!(
                "--sampler diffusion needs a model trained with a masked objective (its config.json has no mask_token_id)"
            );
        };
        stackwise_worker::generate::diffusion_generate(
            &m.model,
            &prompt,
            mask_id,
            a.diffusion_steps,
            match a.remasking {
                Remasking::Confidence => stackwise_worker::generate::Remasking::Confidence,
                Remasking::Random => stackwise_worker::generate::Remasking::Random,
            },
            &cfg,
        )?
    } else {
        if bidirectional {
            tracing::warn!(
                "this model uses bidirectional attention; left-to-right sampling is not what it was trained for"
            );
        }
        generate(&m.model, &prompt, &cfg)?
    };
    let text = m.tok.decode(&out.tokens)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"text": text, "tokens": out.tokens, "tokens_per_s": out.tokens_per_s,
                "sampler": if diffusion { "diffusion" } else { "autoregressive" }})
        );
    } else {
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{}{}", a.prompt, text)?;
        eprintln!(
            "{} tokens at {:.1} tok/s ({})",
            out.tokens.len(),
            out.tokens_per_s,
            if diffusion {
                format!(
                    "diffusion, {} steps, {} remasking",
                    a.diffusion_steps,
                    if a.remasking == Remasking::Random {
                        "random"
                    } else {
                        "confidence"
                    }
                )
            } else if a.no_cache {
                "no cache".into()
            } else {
                "KV cache".into()
            }
        );
    }
    Ok(())
}
