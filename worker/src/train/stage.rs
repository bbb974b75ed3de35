//! The stage runner (DESIGN §3): enter a stage of the plan, or advance to the next one, by
//! building its model (only the active layers; trainable ones as `Var`s, frozen ones at the
//! stage's storage precision), a fresh optimizer and LR schedule, and its activation cache.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;
use stackwise_common::config::{ActivationCacheKind, Objective};
use stackwise_common::plan::StagePlan;
use stackwise_common::schedule::Schedule;

use super::actcache::ActivationCache;
use super::trainer::Trainer;
use crate::models::fuser::FUSER_PREFIX;
use crate::models::params::StagePolicy;
use crate::models::scaffold::{SCAFFOLD_PREFIX, TrainingSetup};
use crate::models::{ParamBuilder, Transformer};
use crate::optim::{AdamW, AdamWConfig, Ema};

impl Trainer {
    pub(super) fn adamw_config(&self) -> AdamWConfig {
        let t = &self.spec.cfg.training;
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        }
    }

    /// The LR schedule of stage `i`: warmup and decay over the stage's own steps.
    pub(super) fn stage_schedule(&self, i: usize) -> Schedule {
        let t = &self.spec.cfg.training;
        let stage = &self.spec.plan.stages[i];
        Schedule {
            kind: t.schedule,
            lr: stage.lr,
            warmup_steps: t.warmup_steps.min(stage.steps),
            total_steps: stage.steps,
            min_lr_ratio: t.min_lr_ratio,
            cycles: t.cycles,
        }
    }

    /// Build the current stage's model from `weights` (missing ones from the seeded init):
    /// trainable parameters as `Var`s, frozen ones at the stage's precision, a fresh
    /// optimizer over the trainable ones. Before frozen weights are quantized, their
    /// full-precision values go to the store as the stage's backup.
    pub(super) fn enter_stage(&mut self, weights: HashMap<String, Tensor>) -> Result<()> {
        let stage = self.stage().clone();
        let lossy = stage.frozen_precision.is_lossy() && !stage.frozen.is_empty();
        if lossy && self.state.backup.is_none() {
            self.write_backup(&weights)?;
        }
        if let Some(a) = &stage.adapters {
            self.spec.model_cfg.lora_scale = Some(a.scale());
        }
        let mut mcfg = self.spec.model_cfg.clone();
        mcfg.attention_mode = stage.attention;
        let device = self.spec.device.clone();
        // A scaffold stage's checkpointed weights: the scaffold's LoRA and the fusers.
        let mut weights = weights;
        let scaffold_loaded = take_prefixed(&mut weights, SCAFFOLD_PREFIX, true);
        let fusers_loaded = take_prefixed(&mut weights, FUSER_PREFIX, false);
        let mut pb = ParamBuilder::for_stage(
            weights,
            self.spec.cfg.run.seed,
            StagePolicy::of(&stage),
            &device,
        );
        pb.set_lora_scale(mcfg.lora_scale);
        self.model = Transformer::build_layers(&mcfg, &mut pb, &device, stage.active_layers)?;
        crate::ops::autocast::set(self.spec.cfg.training.autocast);
        if self.spec.cfg.training.gradient_checkpointing {
            let sink = crate::models::recompute::GradSink::new(!stage.train_embeddings);
            self.model.recompute = Some(std::sync::Arc::new(sink));
        }
        let (mut params, mut frozen, _later_layers) = pb.finish_stage();
        if let (Some(sc), Some(run)) = (&stage.scaffold, &self.spec.scaffold) {
            let mut sw = run.weights.clone();
            sw.extend(scaffold_loaded);
            let s = &run.section;
            let parts = TrainingSetup {
                scaffold_cfg: &run.cfg,
                weights: sw,
                fusers: fusers_loaded,
                lora: &sc.lora,
                train_fusers: sc.train_fusers,
                layers: &s.cross_attn_layers,
                d_base: mcfg.d_model,
                heads: s.heads.unwrap_or(mcfg.n_heads),
                pool: s.pool,
                influence: s.influence_weight,
                seed: self.spec.cfg.run.seed,
            }
            .build(&device)?;
            let mut fusion = parts.fusion;
            fusion.fusers.tokenizer = run.tokenizer.clone();
            params.extend(parts.params);
            frozen.extend(parts.frozen);
            self.model.fusion = Some(std::sync::Arc::new(fusion));
        }
        self.params = params;
        self.frozen = frozen;
        self.opt = AdamW::new(&self.params.vars, self.adamw_config())?;
        self.ema = self
            .spec
            .cfg
            .training
            .ema_decay
            .map(|d| Ema::new(&self.params, d))
            .transpose()?;
        self.all_tokens = stage.objective != Objective::Sft;
        self.act_cache = self.stage_cache(&stage)?;
        let trainable = self.params.count() * 4;
        let mib = |bytes: usize| format!("{:.2}", bytes as f64 / (1 << 20) as f64);
        tracing::info!(
            stage = self.state.stage,
            name = %stage.name,
            trainable_mib = mib(trainable),
            frozen_mib = mib(self.frozen.bytes()),
            optimizer_mib = mib(2 * trainable),
            frozen_precision = stage.frozen_precision.name(),
            "stage weights: trainable, frozen and optimizer state"
        );
        Ok(())
    }

    /// Move on to the next stage of the plan.
    pub(super) fn next_stage(&mut self) -> Result<()> {
        // The boundary checkpoint belongs to the stage that ends.
        self.wait_pending_save()?;
        let weights = self.full_weights()?;
        self.advance_stage(weights)
    }

    /// Enter the stage after the current one with `weights` (full precision).
    pub(super) fn advance_stage(&mut self, weights: HashMap<String, Tensor>) -> Result<()> {
        self.state.stage += 1;
        self.state.backup = None;
        self.state.frozen_shared = None;
        self.state.schedule = self.stage_schedule(self.state.stage);
        // Early stopping watches each stage on its own: a deeper stage's loss at its higher
        // mask fraction is not comparable with the last one's.
        self.state.best_val_loss = None;
        self.state.evals_since_best = 0;
        self.enter_stage(weights)
    }

    /// Whether the step count stands at the end of a stage that is not the last.
    pub(super) fn at_stage_boundary(&self) -> bool {
        self.state.step == self.spec.plan.stage_end(self.state.stage)
            && self.state.stage + 1 < self.spec.plan.stages.len()
    }

    /// The activation cache of a stage whose trainable layers sit on a fully frozen prefix
    /// (frozen embeddings and layers `0..k`, no adapters); none otherwise.
    fn stage_cache(&self, stage: &StagePlan) -> Result<Option<ActivationCache>> {
        let t = &self.spec.cfg.training;
        if t.activation_cache == ActivationCacheKind::None || stage.frozen.is_empty() {
            return Ok(None);
        }
        let k = stage.frozen.len();
        let prefix_only = stage.frozen == (0..k).collect::<Vec<_>>()
            && stage.adapters.is_none()
            && !stage.train_embeddings
            && stage.trainable.iter().all(|&l| l >= k);
        if !prefix_only {
            tracing::warn!(
                stage = %stage.name,
                "activation_cache: the frozen layers have trainable parts (adapters or embeddings); computing them on the fly"
            );
            return Ok(None);
        }
        ActivationCache::new(
            t.activation_cache,
            t.activation_cache_dir.as_deref(),
            &self.spec.run,
            &self.spec.cfg.run.name,
            &self.activation_fingerprint(stage, k)?,
            self.state.stage,
            k,
            self.comm.rank(),
        )
    }
}

impl Trainer {
    /// What the cached inputs of layer `k` depend on, hashed: the frozen prefix's weights
    /// (embeddings and layers `0..k`, as stored), the data, the masking (objective, seed, mask
    /// seeds, fractions), the sequence length and packing. A cache entry is only read back by
    /// a run whose fingerprint matches, so a re-created run of the same name, or one on other
    /// data or weights, never reads stale activations.
    fn activation_fingerprint(&self, stage: &StagePlan, k: usize) -> Result<String> {
        use crate::models::params::{Group, group_of};
        use sha2::{Digest, Sha256};
        let t = &self.spec.cfg.training;
        let mut h = Sha256::new();
        let what = serde_json::json!({
            "data": self.spec.data_fingerprint, "seed": self.spec.cfg.run.seed,
            "objective": stage.objective, "mask_fractions": stage.mask_fractions,
            "mask_seeds": t.mask_seeds, "seq_len": self.spec.seq_len, "packed": self.spec.packed,
            "attention": stage.attention, "layer": k, "mask_id": self.spec.mask_id,
        });
        h.update(what.to_string().as_bytes());
        let prefix = |name: &str| match group_of(name) {
            Group::Embeddings => true,
            Group::Layer(i) => i < k,
            Group::Head => false,
        };
        for (name, w) in self.frozen.tensors()?.iter().filter(|(n, _)| prefix(n)) {
            h.update(name.as_bytes());
            h.update(le_bytes(&w.flatten_all()?.to_vec1::<f32>()?));
        }
        Ok(hex::encode(h.finalize()))
    }
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Remove the weights under `prefix` from `weights`; returned without the prefix when
/// `strip` (the scaffold's own names), as they are otherwise (the fusers').
fn take_prefixed(
    weights: &mut HashMap<String, Tensor>,
    prefix: &str,
    strip: bool,
) -> HashMap<String, Tensor> {
    let names: Vec<String> = weights
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    names
        .into_iter()
        .map(|k| {
            let t = weights.remove(&k).expect("listed");
            let name = if strip {
                k[prefix.len()..].to_string()
            } else {
                k
            };
            (name, t)
        })
        .collect()
}
