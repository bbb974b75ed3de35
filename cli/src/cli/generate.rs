//! `stackwise generate`: sample a continuation of a prompt.

use std::io::Write;

use anyhow::{Context, Result, bail};
use clap::Args;
use stackwise_worker::generate::{
    Generation, SamplingConfig, generate, generate_fused, generate_paged,
};
use stackwise_worker::models::PagedKvCache;

use super::args::ModelArgs;
use super::model_source::LoadedModel;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
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
    #[command(flatten)]
    pub paged: PagedArgs,
}

/// The paged KV cache `stackwise serve` uses, for one sequence (the original's
/// paged-attention demo: `--paged --page-size 64 --max-pages 6`).
#[derive(Args, Debug, Clone)]
pub struct PagedArgs {
    /// Decode over a paged KV cache of --max-pages pages of --page-size positions, allocated
    /// at start, instead of a cache that grows.
    #[arg(long)]
    pub paged: bool,
    /// Positions per page (with --paged).
    #[arg(long, default_value_t = 64, requires = "paged")]
    pub page_size: usize,
    /// Pages in the cache (with --paged): prompt + --max-new-tokens must fit.
    #[arg(long, default_value_t = 6, requires = "paged")]
    pub max_pages: usize,
}

/// How tokens are chosen (`generate` and `chat`).
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
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
    /// Stop when the output repeats an n-gram of this size, and cut the repeat off (0 = off).
    /// Default: 3 for scaffold models (as the original), off otherwise.
    #[arg(long, value_name = "N")]
    pub stop_on_repeat_ngram: Option<usize>,
    /// A scaffold model's influence, 0 (the base alone, exactly) to 1. Default: the
    /// influence it was trained with.
    #[arg(long, value_name = "W")]
    pub scaffold_weight: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Recompute the whole context every token (to compare with the KV cache).
    #[arg(long)]
    pub no_cache: bool,
}

impl SamplingArgs {
    /// The sampling config for model `m`, with the flags checked.
    pub fn config(&self, m: &LoadedModel) -> Result<SamplingConfig> {
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            bail!("--top-p must be in (0, 1], got {p}");
        }
        if self.repetition_penalty <= 0.0 {
            bail!("--repetition-penalty must be > 0 (1 = off)");
        }
        if let Some(w) = self.scaffold_weight {
            if !(0.0..=1.0).contains(&w) {
                bail!("--scaffold-weight must be in [0, 1], got {w}");
            }
            if m.model.fusion.is_none() {
                bail!(
                    "--scaffold-weight: {} is not a scaffold model (a run trained with a scaffold: section)",
                    m.source
                );
            }
        }
        let default_stop = m.model.fusion.is_some().then_some(3);
        Ok(SamplingConfig {
            temperature: if self.greedy { 0.0 } else { self.temperature },
            top_k: (self.top_k > 0).then_some(self.top_k),
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram: self.no_repeat_ngram,
            stop_on_repeat_ngram: self
                .stop_on_repeat_ngram
                .or(default_stop)
                .filter(|&n| n > 0),
            min_new_tokens: self.min_new_tokens,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            use_cache: !self.no_cache,
            eos_token_id: m.tok.eos_id().or(m.model.cfg.eos_token_id),
        })
    }
}

/// The prompt's token ids for model `m`, checked against its context.
pub fn encode_prompt(m: &LoadedModel, prompt: &str) -> Result<Vec<u32>> {
    let ids = m.tok.encode(prompt, false).context("tokenize the prompt")?;
    if ids.is_empty() {
        bail!("the prompt tokenizes to nothing; give some text");
    }
    if ids.len() >= m.model.cfg.seq_len {
        bail!(
            "the prompt is {} tokens; this model sees at most {} positions, so shorten the prompt",
            ids.len(),
            m.model.cfg.seq_len
        );
    }
    Ok(ids)
}

/// Autoregressive generation from `prompt`; a scaffold model's scaffold reads the prompt
/// once, at `scaffold_weight` (default: its trained influence).
pub fn autoregressive(
    m: &LoadedModel,
    prompt: &[u32],
    cfg: &SamplingConfig,
    scaffold_weight: Option<f64>,
) -> Result<Generation> {
    let Some(fusion) = &m.model.fusion else {
        return Ok(generate(&m.model, prompt, cfg)?);
    };
    let ctx = fusion.prompt_context(&m.tok, prompt, scaffold_weight)?;
    Ok(generate_fused(&m.model, prompt, cfg, Some(&ctx))?)
}

/// `--paged`: decode over a paged KV cache of the flags' size.
fn paged(
    m: &LoadedModel,
    prompt: &[u32],
    cfg: &SamplingConfig,
    a: &GenerateArgs,
) -> Result<Generation> {
    if m.model.fusion.is_some() {
        bail!("--paged: a scaffold model decodes with its contiguous cache; drop --paged");
    }
    if a.sampling.no_cache {
        bail!("--paged is a KV cache; it cannot go with --no-cache");
    }
    let p = &a.paged;
    if p.page_size == 0 || p.max_pages == 0 {
        bail!("--page-size and --max-pages must be at least 1");
    }
    let mut kv = PagedKvCache::new(
        &m.model.cfg,
        p.page_size,
        p.max_pages,
        m.model.dtype(),
        &m.model.device(),
    )
    .context("--paged")?;
    Ok(generate_paged(&m.model, prompt, cfg, &mut kv)?)
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
    let m = a.source.load_for_decoding()?;
    let prompt = encode_prompt(&m, &a.prompt)?;
    let cfg = a.sampling.config(&m)?;
    let bidirectional =
        m.model.cfg.attention_mode == stackwise_common::config::AttentionMode::Bidirectional;
    let diffusion = match a.sampler {
        Sampler::Ar => false,
        Sampler::Diffusion => true,
        Sampler::Auto => bidirectional && m.model.cfg.mask_token_id.is_some(),
    };
    if diffusion && a.paged.paged {
        bail!(
            "--paged decodes left to right; the diffusion sampler has no KV cache (use --sampler ar)"
        );
    }
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
        if a.paged.paged {
            paged(&m, &prompt, &cfg, &a)?
        } else {
            autoregressive(&m, &prompt, &cfg, a.sampling.scaffold_weight)?
        }
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
            } else if a.sampling.no_cache {
                "no cache".into()
            } else if a.paged.paged {
                format!(
                    "paged KV cache, {} pages of {}",
                    a.paged.max_pages, a.paged.page_size
                )
            } else {
                "KV cache".into()
            }
        );
    }
    Ok(())
}
