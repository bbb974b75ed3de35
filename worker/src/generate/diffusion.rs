//! Mask-diffusion sampling (LLaDA, Nie et al. 2025; MDLM's ancestral order, Sahoo et al.
//! 2024) for models trained with a masked objective and bidirectional attention.

use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use stackwise_common::rng::Rng;

use super::sampling::{Generation, SamplingConfig, pick};
use crate::models::Transformer;

/// Which still-masked positions a diffusion step commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Remasking {
    /// The ones whose sampled token the model is surest of; the rest are re-masked (LLaDA's
    /// low-confidence remasking).
    #[default]
    Confidence,
    /// A uniformly random subset (MDLM's ancestral order): no bias toward the most frequent
    /// tokens, which suits small or briefly trained models.
    Random,
}

/// Mask-diffusion sampling for bidirectional models (LLaDA-style, low-confidence
/// re-masking): append `max_new_tokens` mask tokens to the prompt; at each of `steps`
/// steps predict every masked position at once, keep the most confident predictions and
/// re-mask the rest, so that the masked share falls linearly to zero.
pub fn diffusion_generate(
    model: &Transformer,
    prompt: &[u32],
    mask_id: u32,
    steps: usize,
    remasking: Remasking,
    cfg: &SamplingConfig,
) -> Result<Generation> {
    let device = model.device();
    let n = cfg
        .max_new_tokens
        .min(model.cfg.seq_len.saturating_sub(prompt.len()));
    if n == 0 {
        candle_core::bail!(
            "no room to generate: the prompt fills the model's {} positions",
            model.cfg.seq_len
        )
    }
    let steps = steps.clamp(1, n);
    let mut rng = Rng::derive(cfg.seed, "diffusion-sampling");
    let mut x: Vec<u32> = prompt.to_vec();
    x.extend(std::iter::repeat_n(mask_id, n));
    let started = Instant::now();
    for s in 0..steps {
        let masked: Vec<usize> = (prompt.len()..x.len())
            .filter(|&i| x[i] == mask_id)
            .collect();
        if masked.is_empty() {
            break;
        }
        let input = Tensor::new(x.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, 0, None)?.squeeze(0)?; // (T, V)
        let mut picks: Vec<(usize, u32, f32)> = Vec::with_capacity(masked.len());
        for &i in &masked {
            let mut row: Vec<f32> = logits.get(i)?.to_dtype(DType::F32)?.to_vec1()?;
            row[mask_id as usize] = f32::NEG_INFINITY; // never predict the mask itself
            let tok = pick(&row, &x, cfg, i - prompt.len(), &mut rng);
            let priority = match remasking {
                // The model's probability of the chosen token.
                Remasking::Confidence => {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f32 = row.iter().map(|v| (v - max).exp()).sum();
                    (row[tok as usize] - max).exp() / z
                }
                Remasking::Random => rng.uniform() as f32,
            };
            picks.push((i, tok, priority));
        }
        // Tokens still masked after this step (linear schedule).
        let remain = n * (steps - s - 1) / steps;
        let keep = masked.len().saturating_sub(remain);
        picks.sort_by(|a, b| b.2.total_cmp(&a.2));
        for &(i, tok, _) in &picks[..keep] {
            x[i] = tok;
        }
    }
    let new = x[prompt.len()..].to_vec();
    Ok(Generation::since(new, started))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusion_sampler_unmasks_everything_and_keeps_the_prompt_context() {
        use stackwise_common::config::{AttentionMode, RawModelConfig};
        let cfg = RawModelConfig {
            d_model: Some(32),
            n_layers: Some(2),
            n_heads: Some(4),
            vocab_size: Some(40),
            seq_len: Some(32),
            attention_mode: Some(AttentionMode::Bidirectional),
            ..Default::default()
        }
        .resolve(None)
        .unwrap();
        let (m, _) = Transformer::init(&cfg, 5, &candle_core::Device::Cpu).unwrap();
        let greedy = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: 12,
            ..Default::default()
        };
        let out =
            diffusion_generate(&m, &[1, 2, 3], 39, 4, Remasking::Confidence, &greedy).unwrap();
        assert_eq!(out.tokens.len(), 12);
        assert!(out.tokens.iter().all(|&t| t != 39), "{:?}", out.tokens);
        // Deterministic for a seed; capped by the model's positions.
        let again =
            diffusion_generate(&m, &[1, 2, 3], 39, 4, Remasking::Confidence, &greedy).unwrap();
        assert_eq!(out.tokens, again.tokens);
        let long = SamplingConfig {
            max_new_tokens: 100,
            ..greedy
        };
        assert_eq!(
            diffusion_generate(&m, &[1, 2, 3], 39, 8, Remasking::Random, &long)
                .unwrap()
                .tokens
                .len(),
            29
        );
    }
}
