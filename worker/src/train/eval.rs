//! Evaluation during training: validation loss (and masked-token accuracy for masked
//! objectives) with the EMA weights when enabled, shared out across ranks; early stopping;
//! and each finished stage scored on the plan-wide mask fractions.

use anyhow::Result;
use serde_json::json;

use super::batches::prompt_len;
use super::report::Reporter;
use super::state::StageResult;
use super::trainer::Trainer;
use crate::generate::{SamplingConfig, generate_fused};
use crate::objectives::{Batch, Totals};

impl Trainer {
    /// Mean loss on the validation split (first `eval_batches` batches), with the EMA
    /// weights when enabled. The batches are shared out across ranks. Masked objectives are
    /// evaluated at the stage's mean mask fraction with fixed masks, and also report the
    /// masked-token accuracy.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        self.evaluate_at(self.stage().eval_fraction().into_iter().collect())
    }

    /// A scaffold run's validation loss of the base alone (no scaffold context: the fusers
    /// are skipped).
    pub(super) fn evaluate_without_scaffold(&mut self) -> Result<Option<f64>> {
        self.base_only_eval = true;
        let v = self.evaluate();
        self.base_only_eval = false;
        v
    }

    /// A scaffold run's greedy completions of the first validation prompts (logged at each
    /// evaluation, as the original prints a few samples every epoch).
    pub(super) fn log_scaffold_samples(&self, rep: &mut Reporter) -> Result<()> {
        const SAMPLES: usize = 3;
        let (spec, Some(fusion)) = (&self.spec, &self.model.fusion) else {
            return Ok(());
        };
        if !self.is_leader() {
            return Ok(());
        }
        let n = spec.val.num_samples(spec.seq_len, spec.packed).min(SAMPLES);
        let cfg = SamplingConfig {
            temperature: 0.0,
            max_new_tokens: 32,
            stop_on_repeat_ngram: Some(3),
            eos_token_id: spec.tok.eos_id(),
            ..Default::default()
        };
        for i in 0..n {
            let row = spec
                .val
                .sample(i, spec.seq_len, spec.packed, spec.pad_id, false)?;
            let prompt = &row.0[..prompt_len(&row)];
            let input = self.scaffold_input(std::slice::from_ref(&row), 0..1)?;
            let Some(input) = input else { return Ok(()) };
            let ctx = fusion.context(&input, fusion.influence())?;
            let out = generate_fused(&self.model, prompt, &cfg, Some(&ctx))?;
            let (p, c) = (spec.tok.decode(prompt)?, spec.tok.decode(&out.tokens)?);
            rep.record(
                &json!({"step": self.state.step, "sample": i, "prompt": p, "completion": c}),
            );
            rep.line(&format!("  sample {}: {p:?} -> {c:?}", i + 1));
        }
        Ok(())
    }

    /// `evaluate` with each validation sequence masked at one of `fractions` (chosen per
    /// sequence, the same on every call).
    pub(super) fn evaluate_at(&mut self, fractions: Vec<f64>) -> Result<Option<f64>> {
        let spec = &self.spec;
        let n = spec.val.num_samples(spec.seq_len, spec.packed);
        if n == 0 {
            return Ok(None);
        }
        let t = &spec.cfg.training;
        let (count, batch_size) = (n.min(t.eval_batches * t.batch_size), t.batch_size);
        let raw = match &self.ema {
            Some(ema) => {
                let raw = self.params.tensors()?;
                self.params
                    .load(&ema.shadow.clone().into_iter().collect())?;
                Some(raw)
            }
            None => None,
        };
        let masking = self.masking(fractions);
        let mut totals = Totals::default();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let all: Vec<usize> = (0..count).collect();
        let spec = &self.spec;
        for chunk in all.chunks(batch_size).skip(rank).step_by(world) {
            let rows = spec.val.samples(
                chunk,
                spec.seq_len,
                spec.packed,
                spec.pad_id,
                self.all_tokens,
            )?;
            let mut b = match &masking {
                Some(m) => {
                    let keys: Vec<u64> = chunk.iter().map(|&k| k as u64).collect();
                    Batch::masked(&rows, &keys, u64::MAX, m, &spec.device)?
                }
                None => Batch::from_rows(&rows, &spec.device)?,
            };
            if !self.base_only_eval {
                b.scaffold = self.scaffold_input(&rows, 0..rows.len())?;
            }
            totals.add(&self.model, &b)?;
        }
        if let Some(raw) = raw {
            self.params.load(&raw.into_iter().collect())?;
        }
        if world > 1 {
            let mut b = totals.to_f32();
            self.comm.all_reduce_sum(&mut b)?;
            totals = Totals::from_f32(b);
        }
        self.last_val_accuracy = if masking.is_some() {
            totals.accuracy()
        } else {
            None
        };
        Ok(totals.mean())
    }

    /// At the end of a stage of a multi-stage masked plan: the validation masked loss at the
    /// plan's reference fractions, on which every stage's result compares (logged, kept in
    /// the trainer state and metrics.jsonl as `stage_end`).
    pub(super) fn record_stage_result(
        &mut self,
        step: u64,
        stopped_early: bool,
        rep: &mut Reporter,
    ) -> Result<()> {
        let fractions = self.spec.plan.reference_mask_fractions();
        if fractions.is_empty() || !self.stage().objective.is_masked() {
            return Ok(());
        }
        // The step's own evaluation (at the stage's fraction) stays the one reported.
        let stage_accuracy = self.last_val_accuracy;
        let val = self.evaluate_at(fractions.clone())?;
        let accuracy = std::mem::replace(&mut self.last_val_accuracy, stage_accuracy);
        let Some(v) = val else {
            return Ok(());
        };
        let result = StageResult {
            stage: self.state.stage,
            step,
            val_loss: v,
            val_masked_accuracy: accuracy,
            stopped_early,
        };
        let mut rec = json!({
            "step": step, "stage": self.state.stage, "stage_end": true,
            "reference_mask_fractions": fractions, "val_loss_reference": v,
            "stopped_early": stopped_early,
        });
        if let Some(acc) = result.val_masked_accuracy {
            rec["val_masked_accuracy_reference"] = acc.into();
        }
        rep.record(&rec);
        if self.is_leader() {
            rep.line(&super::report::stage_end_line(
                &result,
                &fractions,
                self.state.stage_results.last(),
            ));
        }
        // A resumed stage end (the checkpoint was written before a crash) replaces its entry.
        self.state.stage_results.retain(|r| r.stage != result.stage);
        self.state.stage_results.push(result);
        Ok(())
    }
}
