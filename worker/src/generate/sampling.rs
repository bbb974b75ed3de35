//! Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p (nucleus,
//! Holtzman et al. 2020), repetition penalty (CTRL, Keskar et al. 2019), no-repeat n-gram
//! blocking, min/max new tokens.

use std::collections::HashSet;
use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};
use stackwise_common::rng::Rng;

use crate::models::{KvCache, PagedKvCache, ScaffoldContext, Transformer};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// > 1 discourages tokens already present in the context.
    pub repetition_penalty: f64,
    /// Never repeat an n-gram of this size.
    pub no_repeat_ngram: Option<usize>,
    /// Stop once the output repeats an n-gram of this size, and cut the repeat off.
    #[serde(default)]
    pub stop_on_repeat_ngram: Option<usize>,
    pub min_new_tokens: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
    pub use_cache: bool,
    pub eos_token_id: Option<u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: Some(50),
            top_p: None,
            repetition_penalty: 1.0,
            no_repeat_ngram: None,
            stop_on_repeat_ngram: None,
            min_new_tokens: 0,
            max_new_tokens: 100,
            seed: 0,
            use_cache: true,
            eos_token_id: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub tokens_per_s: f64,
}

impl Generation {
    /// `tokens`, generated since `started`.
    pub fn since(tokens: Vec<u32>, started: Instant) -> Self {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        Self {
            tokens_per_s: tokens.len() as f64 / secs,
            tokens,
        }
    }
}

/// Tokens that would complete an n-gram already in `ctx`.
fn banned_by_ngram(ctx: &[u32], n: usize) -> HashSet<u32> {
    let mut out = HashSet::new();
    if n == 0 || ctx.len() + 1 < n {
        return out;
    }
    let prefix = &ctx[ctx.len() + 1 - n..];
    for w in ctx.windows(n) {
        if &w[..n - 1] == prefix {
            out.insert(w[n - 1]);
        }
    }
    out
}

/// Choose the next token from `logits` (V) given the context so far.
pub fn pick(logits: &[f32], ctx: &[u32], cfg: &SamplingConfig, n_new: usize, rng: &mut Rng) -> u32 {
    let mut l: Vec<f32> = logits.to_vec();
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        for &t in ctx.iter().collect::<HashSet<_>>() {
            if let Some(x) = l.get_mut(t as usize) {
                *x = if *x > 0.0 { *x / p } else { *x * p };
            }
        }
    }
    if let Some(n) = cfg.no_repeat_ngram {
        for t in banned_by_ngram(ctx, n) {
            l[t as usize] = f32::NEG_INFINITY;
        }
    }
    if n_new < cfg.min_new_tokens
        && let Some(e) = cfg.eos_token_id
        && let Some(x) = l.get_mut(e as usize)
    {
        *x = f32::NEG_INFINITY;
    }
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32)
    };
    if cfg.temperature <= 0.0 {
        return argmax(&l);
    }
    let mut idx: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
    if idx.is_empty() {
        return argmax(logits);
    }
    idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.max(1));
    }
    let t = cfg.temperature as f32;
    let max = l[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((l[i] - max) / t) as f64).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = cfg.top_p {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        probs.truncate(keep);
        idx.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let mut u = rng.uniform();
    for (p, &i) in probs.iter().zip(&idx) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    *idx.last().expect("non-empty") as u32
}

/// Whether the last `n` tokens of `out` already occurred as an n-gram earlier in `out`.
pub fn ends_with_repeat(out: &[u32], n: usize) -> bool {
    if n == 0 || out.len() <= n {
        return false;
    }
    let last = &out[out.len() - n..];
    out[..out.len() - 1].windows(n).any(|w| w == last)
}

/// Continue `prompt` (token ids, non-empty) with up to `max_new_tokens` tokens.
pub fn generate(model: &Transformer, prompt: &[u32], cfg: &SamplingConfig) -> Result<Generation> {
    generate_fused(model, prompt, cfg, None)
}

/// `generate` for a base with a scaffold: `ctx` is the scaffold's reading of the prompt,
/// computed once; the base decodes with its KV cache.
pub fn generate_fused(
    model: &Transformer,
    prompt: &[u32],
    cfg: &SamplingConfig,
    ctx: Option<&ScaffoldContext>,
) -> Result<Generation> {
    let device = model.device();
    let mut cache = KvCache::new(model.cfg.n_layers);
    sample(model, prompt, cfg, |ctx_ids| {
        let logits = if cfg.use_cache {
            let start = cache.len();
            let input = Tensor::new(&ctx_ids[start..], &device)?.unsqueeze(0)?;
            model.forward_fused(&input, start, Some(&mut cache), ctx)?
        } else {
            let input = Tensor::new(ctx_ids, &device)?.unsqueeze(0)?;
            model.forward_fused(&input, 0, None, ctx)?
        };
        logits.squeeze(0)?.get(logits.dim(1)? - 1) // (V)
    })
}

/// `generate` over the paged KV cache `kv` (the serving engine's): the sequence takes the
/// pages `prompt + max_new_tokens` positions need, and gives them back at the end.
pub fn generate_paged(
    model: &Transformer,
    prompt: &[u32],
    cfg: &SamplingConfig,
    kv: &mut PagedKvCache,
) -> Result<Generation> {
    let positions = (prompt.len() + cfg.max_new_tokens).min(model.cfg.seq_len);
    let need = kv.pages_for(positions);
    let Some(mut table) = kv.allocate(need) else {
        candle_core::bail!(
            "{positions} positions need {need} pages of {} tokens; the cache has {} free of {} \
             (raise --max-pages or lower --max-new-tokens)",
            kv.page_size(),
            kv.free_pages(),
            kv.max_pages()
        )
    };
    let out = sample(model, prompt, cfg, |ctx_ids| {
        let done = table.len();
        model
            .forward_paged(&mut [(&ctx_ids[done..], &mut table)], kv)?
            .get(0)
    });
    kv.release(table);
    out
}

/// The sampling loop: `logits(context)` gives the next token's logits (V).
fn sample(
    model: &Transformer,
    prompt: &[u32],
    cfg: &SamplingConfig,
    mut logits: impl FnMut(&[u32]) -> Result<Tensor>,
) -> Result<Generation> {
    if prompt.is_empty() {
        candle_core::bail!("the prompt is empty; give at least one token")
    }
    let mut rng = Rng::derive(cfg.seed, "sampling");
    let mut ctx = prompt.to_vec();
    let limit = model.cfg.seq_len;
    let started = Instant::now();
    let mut new = Vec::new();
    for n in 0..cfg.max_new_tokens {
        if ctx.len() >= limit {
            break;
        }
        let last: Vec<f32> = logits(&ctx)?.to_dtype(DType::F32)?.to_vec1()?;
        let next = pick(&last, &ctx, cfg, n, &mut rng);
        ctx.push(next);
        new.push(next);
        if Some(next) == cfg.eos_token_id {
            break;
        }
        if let Some(n) = cfg.stop_on_repeat_ngram
            && ends_with_repeat(&new, n)
        {
            new.truncate(new.len() - n);
            break;
        }
    }
    Ok(Generation::since(new, started))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_ngram_is_found_only_when_it_ends_the_output() {
        // "the cat sat the cat" has no repeated 3-gram; one more "sat" repeats the first.
        assert!(!ends_with_repeat(&[1, 2, 3, 1, 2], 3));
        assert!(ends_with_repeat(&[1, 2, 3, 1, 2, 3], 3));
        assert!(!ends_with_repeat(&[1, 2, 3], 3));
        assert!(ends_with_repeat(&[7, 7], 1));
        assert!(!ends_with_repeat(&[1, 2, 3, 1, 2, 3], 0));
    }

    #[test]
    fn greedy_penalties_and_filters() {
        let mut rng = Rng::new(1);
        let greedy = SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(pick(&[0.1, 3.0, 2.0], &[], &greedy, 0, &mut rng), 1);
        // A strong repetition penalty moves greedy off a token already in the context.
        let rep = SamplingConfig {
            repetition_penalty: 10.0,
            ..greedy.clone()
        };
        assert_eq!(pick(&[0.1, 3.0, 2.0], &[1], &rep, 0, &mut rng), 2);
        // 2-gram "5 1" already occurred after a 5: 1 is banned.
        let ngram = SamplingConfig {
            no_repeat_ngram: Some(2),
            ..greedy.clone()
        };
        assert_eq!(
            pick(
                &[0.1, 3.0, 2.0, 0.0, 0.0, 0.0],
                &[5, 1, 5],
                &ngram,
                0,
                &mut rng
            ),
            2
        );
        // EOS is held back until min_new_tokens.
        let min = SamplingConfig {
            min_new_tokens: 3,
            eos_token_id: Some(1),
            ..greedy.clone()
        };
        assert_eq!(pick(&[0.1, 3.0, 2.0], &[], &min, 2, &mut rng), 2);
        assert_eq!(pick(&[0.1, 3.0, 2.0], &[], &min, 3, &mut rng), 1);
        // top_k = 1 at any temperature is greedy; top_p keeps only the nucleus.
        let k1 = SamplingConfig {
            temperature: 5.0,
            top_k: Some(1),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(pick(&[0.1, 3.0, 2.0], &[], &k1, 0, &mut rng), 1);
        }
        let p = SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
            ..Default::default()
        };
        for _ in 0..20 {
            assert_eq!(pick(&[0.0, 5.0, 0.0], &[], &p, 0, &mut rng), 1);
        }
    }
}
