//! Micro-batches of a step (DESIGN §4): every rank draws the same global batch from the
//! global cursor and takes its slice of each micro-batch, masked (masked objectives) with a
//! salt per row, and fed from the activation cache when the stage has one.

use anyhow::Result;
use stackwise_common::data::{Cursor, rank_rows};

/// A sample: token ids and loss flags, padded to the sequence length.
type Sample = (Vec<u32>, Vec<f32>);

/// A step of token-budget batching draws at most this many samples.
const MAX_BUDGET_ROWS: usize = 1 << 20;

/// The loss tokens of a sample: its flagged targets (every position but the first).
pub fn loss_tokens(row: &Sample) -> usize {
    row.1.iter().skip(1).filter(|&&w| w > 0.0).count()
}

/// The prompt of an SFT sample: its tokens before the first loss token (at least one).
pub fn prompt_len(row: &Sample) -> usize {
    row.1
        .iter()
        .position(|&w| w > 0.0)
        .unwrap_or(row.0.len())
        .max(1)
}

use super::trainer::Trainer;
use crate::objectives::{Batch, Masking};

/// The mask salt of each of `rows` rows drawn from `start`: the step (a new mask every
/// step), or with static masks (`mask_seeds`) the stage and the sample's mask seed (its
/// epoch modulo `mask_seeds`), so an epoch later the sample is masked the same way again.
pub fn mask_salts(
    step: u64,
    stage: usize,
    start: Cursor,
    samples: usize,
    rows: usize,
    mask_seeds: Option<u64>,
) -> Vec<u64> {
    match mask_seeds {
        None => vec![step; rows],
        Some(seeds) => (0..rows as u64)
            .map(|r| {
                let epoch = start.epoch + (start.index + r) / samples as u64;
                ((stage as u64) << 32) | (epoch % seeds)
            })
            .collect(),
    }
}

impl Trainer {
    /// The masking of the current stage at `fractions` (none for causal objectives).
    pub(super) fn masking(&self, fractions: Vec<f64>) -> Option<Masking> {
        let stage = self.stage();
        let mask_id = self.spec.mask_id;
        stage.objective.is_masked().then(|| Masking {
            objective: stage.objective,
            mask_id: mask_id.unwrap_or(0),
            vocab: self.spec.tok.vocab_size() as u32 - u32::from(mask_id.is_some()),
            fractions,
            seed: self.spec.cfg.run.seed,
        })
    }

    /// The global sample indices of the next step and their rows (advances the cursor):
    /// `grad_accum` micro-batches of `batch_size`, or with `tokens_per_step` as many
    /// micro-batches as it takes for their loss tokens to reach the budget. Every rank draws
    /// the same global rows, so every rank counts the same tokens without a message.
    fn step_rows(&mut self) -> Result<(Vec<usize>, Vec<Sample>)> {
        let t = &self.spec.cfg.training;
        let (batch_size, n, seed) = (
            t.batch_size,
            self.spec.train_samples(),
            self.spec.cfg.run.seed,
        );
        let spec = &self.spec;
        let all_tokens = self.all_tokens;
        let rows_of = |idx: &[usize]| {
            spec.train
                .samples(idx, spec.seq_len, spec.packed, spec.pad_id, all_tokens)
        };
        let Some(budget) = t.tokens_per_step else {
            let idx = self
                .state
                .cursor
                .take(batch_size * t.grad_accum, n, seed, &mut self.order);
            let rows = rows_of(&idx)?;
            return Ok((idx, rows));
        };
        let (mut idx, mut rows, mut tokens) = (Vec::new(), Vec::new(), 0usize);
        while tokens < budget {
            if idx.len() >= MAX_BUDGET_ROWS {
                anyhow::bail!(
                    "training.tokens_per_step {budget}: {} samples hold only {tokens} loss tokens; lower the budget",
                    idx.len()
                );
            }
            let more = self.state.cursor.take(batch_size, n, seed, &mut self.order);
            for row in rows_of(&more)? {
                tokens += loss_tokens(&row);
                rows.push(row);
            }
            idx.extend(more);
        }
        Ok((idx, rows))
    }

    /// A scaffold run's prompts of rows `mine` of `global`, padded to the longest prompt of
    /// `global` (the whole micro-batch across ranks, so the shapes do not depend on the
    /// world size).
    pub(super) fn scaffold_input(
        &self,
        global: &[Sample],
        mine: std::ops::Range<usize>,
    ) -> Result<Option<crate::models::ScaffoldInput>> {
        let (Some(run), Some(fusion)) = (&self.spec.scaffold, &self.model.fusion) else {
            return Ok(None);
        };
        // The same prompt rule as generation and serving (Fusion::prompt_ids).
        let mut prompts = global
            .iter()
            .map(|r| fusion.prompt_ids(&self.spec.tok, &r.0[..prompt_len(r)]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let prompts: Vec<Vec<u32>> = prompts.drain(mine).collect();
        let pad = run
            .tokenizer
            .as_ref()
            .map_or(self.spec.pad_id, |t| t.eos_id().unwrap_or(0));
        Ok(Some(crate::models::ScaffoldInput::new(
            &prompts,
            width,
            pad,
            &self.spec.device,
        )?))
    }

    /// This rank's micro-batches of the next step (advances the cursor).
    pub(super) fn micro_batches(&mut self) -> Result<Vec<Batch>> {
        let start = self.state.cursor;
        let (idx, rows) = self.step_rows()?;
        let t = &self.spec.cfg.training;
        let (batch_size, n) = (t.batch_size, self.spec.train_samples());
        let salts = mask_salts(
            self.state.step,
            self.state.stage,
            start,
            n,
            idx.len(),
            t.mask_seeds,
        );
        // This rank's slice of each global micro-batch.
        let mine = rank_rows(batch_size, self.comm.world_size(), self.comm.rank());
        let masking = self.masking(self.stage().mask_fractions.clone());
        let device = self.spec.device.clone();
        let mut out = Vec::new();
        for ((c, keys), salts) in rows
            .chunks(batch_size)
            .zip(idx.chunks(batch_size))
            .zip(salts.chunks(batch_size))
        {
            let global = c;
            let (c, keys, salts) = (&c[mine.clone()], &keys[mine.clone()], &salts[mine.clone()]);
            let mut b = match &masking {
                Some(m) => {
                    let keys: Vec<u64> = keys.iter().map(|&k| k as u64).collect();
                    Batch::masked_salted(c, &keys, salts, m, &device)?
                }
                None => Batch::from_rows(c, &device)?,
            };
            b.scaffold = self.scaffold_input(global, mine.clone())?;
            if let Some(cache) = &mut self.act_cache {
                let names: Vec<String> = keys
                    .iter()
                    .zip(salts)
                    .map(|(k, s)| format!("{s:016x}-{k}"))
                    .collect();
                let (layer, model) = (cache.layer, &self.model);
                let x = cache.inputs(&b.input, &names, |ids| model.prefix(ids, layer), &device)?;
                b.prefix = Some((x, layer));
            }
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_mask_salts_repeat_by_epoch_and_fresh_ones_follow_the_step() {
        assert_eq!(mask_salts(7, 0, Cursor::start(), 4, 3, None), vec![7, 7, 7]);
        // 4 samples, 2 mask seeds: rows 2..6 of epoch 0 cross into epoch 1, then epoch 2
        // (seed 0 again) repeats epoch 0's salt.
        let start = Cursor { epoch: 0, index: 2 };
        let s = mask_salts(0, 1, start, 4, 8, Some(2));
        let stage = 1u64 << 32;
        assert_eq!(
            s,
            vec![
                stage,
                stage,
                stage | 1,
                stage | 1,
                stage | 1,
                stage | 1,
                stage,
                stage
            ]
        );
    }
}
