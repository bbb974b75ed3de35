//! Batches of the training objectives: the model input and the predicted positions, with
//! masks for `mlm` (BERT 80/10/10) and `diffusion` (MDLM: mask with probability `t`, weight
//! `1/t`) drawn from a generator keyed by (seed, salt, sample index), so every rank, world
//! size and resume sees the same masks.

use candle_core::{Device, Result, Tensor};
use stackwise_common::config::Objective;
use stackwise_common::rng::Rng;

use crate::models::ScaffoldInput;

/// The smallest diffusion time drawn when `t ~ U(0, 1]` (MDLM's `eps`): keeps `1/t` bounded.
pub const MIN_T: f64 = 1e-3;

/// How a masked batch is drawn.
#[derive(Debug, Clone)]
pub struct Masking {
    pub objective: Objective,
    pub mask_id: u32,
    /// Real vocabulary size (random replacements of `mlm` draw below it).
    pub vocab: u32,
    /// Each sequence is masked at one of these, uniformly; empty = `t ~ U(MIN_T, 1]`.
    pub fractions: Vec<f64>,
    pub seed: u64,
}

/// A micro-batch: the model input `(B, T)` and the predicted positions. For causal
/// objectives the input is `ids[:, :-1]` and every position predicts the next token; for
/// masked objectives the input has mask tokens and only masked positions are predicted.
#[derive(Debug, Clone)]
pub struct Batch {
    pub input: Tensor,
    /// Flat indices into `(B * T)` of the predicted positions (`None` = all of them).
    pub positions: Option<Tensor>,
    /// Target id per predicted position.
    pub targets: Tensor,
    /// Loss weight per predicted position.
    pub weights: Tensor,
    /// What the summed weighted loss is divided by (summed over micro-batches and ranks).
    pub normaliser: f64,
    pub tokens: usize,
    /// The input of layer `k` when it comes from an activation cache: `(hidden (B, T, D), k)`.
    pub prefix: Option<(Tensor, usize)>,
    /// A scaffold run's prompts, read by the scaffold model.
    pub scaffold: Option<ScaffoldInput>,
}

impl Batch {
    /// A causal batch. `rows`: token ids and per-token loss flags, all of the same length;
    /// flag `t` says whether token `t` (t >= 1) counts as a target.
    pub fn from_rows(rows: &[(Vec<u32>, Vec<f32>)], device: &Device) -> Result<Self> {
        let b = rows.len();
        let t = rows.first().map_or(0, |r| r.0.len());
        let input: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.0[..t - 1].iter().copied())
            .collect();
        let targets: Vec<u32> = rows.iter().flat_map(|r| r.0[1..].iter().copied()).collect();
        let weights: Vec<f32> = rows.iter().flat_map(|r| r.1[1..].iter().copied()).collect();
        let normaliser = weights.iter().map(|&w| w as f64).sum();
        let n = targets.len();
        Ok(Self {
            input: Tensor::from_vec(input, (b, t - 1), device)?,
            positions: None,
            targets: Tensor::from_vec(targets, n, device)?,
            weights: Tensor::from_vec(weights, n, device)?,
            normaliser,
            tokens: b * t,
            prefix: None,
            scaffold: None,
        })
    }

    /// A masked batch: row `i` is masked with a generator keyed by `keys[i]` (its sample
    /// index) and `salt` (the step, or a fixed value for evaluation). Positions whose flag
    /// is 0 (padding, prompts) are never masked.
    pub fn masked(
        rows: &[(Vec<u32>, Vec<f32>)],
        keys: &[u64],
        salt: u64,
        m: &Masking,
        device: &Device,
    ) -> Result<Self> {
        Self::masked_salted(rows, keys, &vec![salt; rows.len()], m, device)
    }

    /// `masked` with a salt per row (static masks: the salt is the sample's mask seed).
    pub fn masked_salted(
        rows: &[(Vec<u32>, Vec<f32>)],
        keys: &[u64],
        salts: &[u64],
        m: &Masking,
        device: &Device,
    ) -> Result<Self> {
        let b = rows.len();
        let t = rows.first().map_or(0, |r| r.0.len());
        let mut input = Vec::with_capacity(b * t);
        let (mut positions, mut targets, mut weights) = (vec![], vec![], vec![]);
        let mut eligible = 0f64;
        let mut masked = 0f64;
        for (row, (((ids, flags), &key), &salt)) in rows.iter().zip(keys).zip(salts).enumerate() {
            let mut rng = Rng::derive(m.seed, &format!("mask/{salt}/{key}"));
            let frac = if m.fractions.is_empty() {
                MIN_T + (1.0 - MIN_T) * rng.uniform()
            } else {
                m.fractions[rng.below(m.fractions.len() as u64) as usize]
            };
            for (j, (&id, &flag)) in ids.iter().zip(flags).enumerate() {
                let draw = rng.uniform();
                let kind = rng.uniform();
                if flag <= 0.0 {
                    input.push(id);
                    continue;
                }
                eligible += 1.0;
                if draw >= frac {
                    input.push(id);
                    continue;
                }
                masked += 1.0;
                // BERT: of the chosen tokens 80 % become the mask, 10 % a random token,
                // 10 % stay. Diffusion always masks.
                let shown = match m.objective {
                    Objective::Mlm if kind >= 0.9 => id,
                    Objective::Mlm if kind >= 0.8 => (rng.below(m.vocab as u64)) as u32,
                    _ => m.mask_id,
                };
                input.push(shown);
                positions.push((row * t + j) as u32);
                targets.push(id);
                weights.push(match m.objective {
                    Objective::Diffusion => (1.0 / frac) as f32,
                    _ => 1.0,
                });
            }
        }
        let normaliser = match m.objective {
            Objective::Diffusion => eligible,
            _ => masked,
        };
        let n = positions.len();
        Ok(Self {
            input: Tensor::from_vec(input, (b, t), device)?,
            positions: Some(Tensor::from_vec(positions, n, device)?),
            targets: Tensor::from_vec(targets, n, device)?,
            weights: Tensor::from_vec(weights, n, device)?,
            normaliser,
            tokens: b * t,
            prefix: None,
            scaffold: None,
        })
    }

    /// The loss normaliser (target tokens for clm/sft/mlm, all tokens for diffusion).
    pub fn weight(&self) -> Result<f64> {
        Ok(self.normaliser)
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Number of predicted positions.
    pub fn predicted(&self) -> usize {
        self.targets.elem_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, t: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
        (0..n)
            .map(|i| {
                let ids: Vec<u32> = (0..t).map(|j| ((i * 7 + j) % 50) as u32).collect();
                (ids, vec![1.0; t])
            })
            .collect()
    }

    fn masking(objective: Objective, fractions: Vec<f64>) -> Masking {
        Masking {
            objective,
            mask_id: 99,
            vocab: 50,
            fractions,
            seed: 7,
        }
    }

    #[test]
    fn masked_share_matches_each_requested_fraction() {
        for frac in [0.1, 0.15, 0.5, 0.9, 0.99] {
            let r = rows(64, 256);
            let keys: Vec<u64> = (0..64).collect();
            let m = masking(Objective::Diffusion, vec![frac]);
            let b = Batch::masked(&r, &keys, 3, &m, &Device::Cpu).unwrap();
            let n = (64 * 256) as f64;
            let share = b.predicted() as f64 / n;
            // Binomial(n, frac): 5 standard deviations.
            let sd = (frac * (1.0 - frac) / n).sqrt();
            assert!((share - frac).abs() < 5.0 * sd + 1e-9, "{frac}: {share}");
            let input = b.input.flatten_all().unwrap().to_vec1::<u32>().unwrap();
            let masked_tokens = input.iter().filter(|&&x| x == 99).count();
            assert_eq!(
                masked_tokens,
                b.predicted(),
                "diffusion always shows the mask"
            );
            // Weighted by 1/t and normalised by tokens: E[loss weight] = 1 per token.
            let w: f32 = b.weights.sum_all().unwrap().to_scalar().unwrap();
            assert!((w as f64 * frac / n - share).abs() < 1e-3);
            assert_eq!(b.normaliser, n);
        }
    }

    #[test]
    fn time_step_fractions_are_drawn_per_sequence() {
        let r = rows(400, 64);
        let keys: Vec<u64> = (0..400).collect();
        let m = masking(Objective::Diffusion, vec![0.1, 0.9]);
        let b = Batch::masked(&r, &keys, 0, &m, &Device::Cpu).unwrap();
        let pos = b.positions.unwrap().to_vec1::<u32>().unwrap();
        let mut per_row = vec![0usize; 400];
        for p in pos {
            per_row[p as usize / 64] += 1;
        }
        let low = per_row.iter().filter(|&&c| c < 25).count();
        let high = per_row.iter().filter(|&&c| c > 40).count();
        assert_eq!(
            low + high,
            400,
            "every row is near 6 or near 58 masked tokens"
        );
        assert!((150..250).contains(&low), "{low} rows at 0.1");
    }

    #[test]
    fn mlm_is_bert_style_and_normalised_by_masked_tokens() {
        let r = rows(64, 256);
        let keys: Vec<u64> = (0..64).collect();
        let m = masking(Objective::Mlm, vec![0.15]);
        let b = Batch::masked(&r, &keys, 0, &m, &Device::Cpu).unwrap();
        let input = b.input.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        let pos = b.positions.as_ref().unwrap().to_vec1::<u32>().unwrap();
        let shown_mask = pos.iter().filter(|&&p| input[p as usize] == 99).count();
        let share = shown_mask as f64 / pos.len() as f64;
        assert!(
            (share - 0.8).abs() < 0.05,
            "{share} of chosen tokens show the mask"
        );
        assert_eq!(b.normaliser, pos.len() as f64);
    }

    #[test]
    fn masks_depend_on_the_key_not_the_batch_layout() {
        let r = rows(4, 32);
        let m = masking(Objective::Diffusion, vec![]);
        let whole = Batch::masked(&r, &[10, 11, 12, 13], 5, &m, &Device::Cpu).unwrap();
        let half = Batch::masked(&r[2..], &[12, 13], 5, &m, &Device::Cpu).unwrap();
        let w = whole.input.to_vec2::<u32>().unwrap();
        assert_eq!(&w[2..], &half.input.to_vec2::<u32>().unwrap()[..]);
        let other_step = Batch::masked(&r, &[10, 11, 12, 13], 6, &m, &Device::Cpu).unwrap();
        assert_ne!(w, other_step.input.to_vec2::<u32>().unwrap());
    }

    #[test]
    fn padding_is_never_masked() {
        let mut r = rows(8, 32);
        for row in &mut r {
            for f in &mut row.1[16..] {
                *f = 0.0;
            }
        }
        let m = masking(Objective::Diffusion, vec![0.99]);
        let b = Batch::masked(&r, &(0..8).collect::<Vec<_>>(), 0, &m, &Device::Cpu).unwrap();
        let pos = b.positions.unwrap().to_vec1::<u32>().unwrap();
        assert!(pos.iter().all(|p| p % 32 < 16));
        assert_eq!(b.normaliser, 8.0 * 16.0);
    }
}
