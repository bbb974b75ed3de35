//! What the trainer saves and restores: the files of a checkpoint of the current step (handed
//! to the [`Checkpointer`](super::checkpointer::Checkpointer)), the stage's full-precision
//! backup before frozen weights are quantized, and resuming from a verified checkpoint.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use candle_core::Tensor;
use stackwise_common::checkpoint::{CheckpointMeta, LoadedCheckpoint, ManifestEntry};

use super::checkpointer::Staged;
use super::state::TrainerState;
use super::trainer::Trainer;
use crate::adapters::{BoftAdapter, LoraAdapter};
use crate::checkpoint as layout;
use crate::checkpoint::scaffold as ckscaffold;
use crate::models::fuser::FUSER_PREFIX;
use crate::models::hf;
use crate::models::scaffold::{SCAFFOLD_PREFIX, strip_prefix};

impl Trainer {
    /// Stage a checkpoint of the current step and start its upload (DESIGN §6). One upload
    /// at a time; the checkpoint counts (and is reported) once its manifest is written.
    pub(super) fn save_checkpoint(&mut self) -> Result<String> {
        if !self.checkpointer.is_leader() {
            let staged = Staged {
                step: self.state.step,
                meta: CheckpointMeta::default(),
                files: Vec::new(),
                refs: Vec::new(),
                frozen_upload: None,
            };
            return self.checkpointer.upload(staged);
        }
        self.wait_pending_save()?;
        let staged = self.stage_files()?;
        self.checkpointer.upload(staged)
    }

    /// The files of a checkpoint of this step. The frozen tensors (as they are used,
    /// dequantized) do not change during a stage: they are written once per stage as a
    /// shared object that each checkpoint of the stage references in its manifest
    /// (`stackwise ckpt export` makes a standalone folder).
    fn stage_files(&self) -> Result<Staged> {
        let weights = self.params.snapshot();
        let mut refs: Vec<_> = self.state.backup.iter().cloned().collect();
        let mut frozen_upload = None;
        // An adapter run's frozen part is its base, which the manifest references instead.
        let frozen_elsewhere = self.spec.base.is_some();
        if !frozen_elsewhere && (!self.frozen.plain.is_empty() || !self.frozen.stored.is_empty()) {
            match &self.state.frozen_shared {
                Some(entry) => refs.push(entry.clone()),
                None => {
                    let bytes = hf::params_to_safetensors(&self.frozen.tensors()?)?;
                    frozen_upload =
                        Some((layout::frozen_object(self.state.stage), Bytes::from(bytes)));
                }
            }
        }
        // A config.json for exactly the active layers.
        let mut model_cfg = self.model.cfg.clone();
        model_cfg.n_layers = self.model.active_layers();
        let mut files: Vec<(String, Bytes)> = vec![
            (
                layout::MODEL.into(),
                Bytes::from(hf::params_to_safetensors(&weights)?),
            ),
            (
                layout::CONFIG.into(),
                Bytes::from(serde_json::to_vec_pretty(&model_cfg.to_hf_json())?),
            ),
            (
                layout::TOKENIZER.into(),
                Bytes::from(self.spec.tok.to_json()?),
            ),
            (
                layout::OPTIMIZER.into(),
                Bytes::from(hf::params_to_safetensors(&self.opt.state_tensors())?),
            ),
            (
                layout::TRAINER_STATE.into(),
                Bytes::from(serde_json::to_vec_pretty(&self.state)?),
            ),
        ];
        if let Some(base) = &self.spec.base {
            // The adapter as a PEFT folder `adapter/` (the EMA's, when there is one).
            let trained = self.ema.as_ref().map_or(&weights, |e| &e.shadow);
            let (cfg, stage) = (&self.model.cfg, self.stage());
            let peft = match (&stage.adapters, &stage.boft) {
                (Some(lora), _) => {
                    LoraAdapter::from_trained(lora, cfg, trained).files(cfg, Some(&base.path))?
                }
                (None, Some(boft)) => {
                    BoftAdapter::from_trained(boft, trained)?.files(boft, cfg, Some(&base.path))?
                }
                (None, None) => Vec::new(),
            };
            for (name, bytes) in peft {
                files.push((format!("{}/{name}", layout::ADAPTER), Bytes::from(bytes)));
            }
        }
        if let (Some(run), Some(sc), Some(fusion)) = (
            &self.spec.scaffold,
            &self.stage().scaffold,
            &self.model.fusion,
        ) {
            let trained = self.ema.as_ref().map_or(&weights, |e| &e.shadow);
            let own: BTreeMap<String, Tensor> = strip_prefix(trained, SCAFFOLD_PREFIX);
            let peft = LoraAdapter::from_trained(&sc.lora, &run.cfg, &own)
                .files(&run.cfg, Some(&run.source.path))?;
            for (name, bytes) in peft {
                files.push((
                    format!("{}/{name}", ckscaffold::SCAFFOLD_ADAPTER),
                    Bytes::from(bytes),
                ));
            }
            // The fusers as the model uses them; trained ones from the EMA when there is one.
            let mut fusers: BTreeMap<String, Tensor> =
                fusion.fusers.fuser_tensors()?.into_iter().collect();
            for (k, v) in trained.iter().filter(|(k, _)| k.starts_with(FUSER_PREFIX)) {
                fusers.insert(k.clone(), v.clone());
            }
            files.push((
                ckscaffold::FUSERS.into(),
                Bytes::from(hf::params_to_safetensors(&fusers)?),
            ));
            let s = &run.section;
            let meta = ckscaffold::ScaffoldMeta {
                scaffold: run.source.clone(),
                cross_attn_layers: s.cross_attn_layers.clone(),
                heads: s.heads.unwrap_or(self.model.cfg.n_heads),
                pool: s.pool,
                fusers: s.fusers,
                influence_weight: s.influence_weight,
                lora_scale: sc.lora.scale(),
            };
            files.push((
                ckscaffold::SCAFFOLD_META.into(),
                Bytes::from(serde_json::to_vec_pretty(&meta)?),
            ));
        }
        if let Some(ema) = &self.ema {
            files.push((
                layout::EMA.into(),
                Bytes::from(hf::params_to_safetensors(&ema.shadow)?),
            ));
        }
        Ok(Staged {
            step: self.state.step,
            meta: CheckpointMeta {
                val_loss: self.state.last_val_loss,
                stage: Some(format!("{}: {}", self.state.stage, self.stage().name)),
                base: self.spec.base.clone(),
            },
            files,
            refs,
            frozen_upload,
        })
    }

    /// Wait for the background upload, if any; report the committed checkpoint.
    pub fn wait_pending_save(&mut self) -> Result<()> {
        let Some(saved) = self.checkpointer.wait()? else {
            return Ok(());
        };
        if saved.frozen.is_some() {
            self.state.frozen_shared = saved.frozen;
        }
        let uri = format!("{}/checkpoints/{}", self.spec.run.uri(), saved.name);
        self.emit(super::TrainEvent::Checkpoint {
            step: saved.step,
            name: saved.name,
            uri,
        });
        Ok(())
    }

    /// Write the full-precision `weights` (before quantizing) as this stage's backup: one
    /// shared object, referenced by every checkpoint of the stage.
    pub(super) fn write_backup(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        let sorted: BTreeMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let bytes = Bytes::from(hf::params_to_safetensors(&sorted)?);
        let object = layout::backup_object(self.state.stage);
        let entry = if self.checkpointer.is_leader() {
            self.spec
                .ckpt
                .put_shared(&object, layout::BACKUP, bytes)
                .with_context(|| format!("write the full-precision backup {object}"))?
        } else {
            ManifestEntry {
                object: Some(object),
                ..ManifestEntry::of(layout::BACKUP, &bytes)
            }
        };
        self.state.backup = Some(entry);
        Ok(())
    }

    /// A stage's full-precision backup, verified against its manifest entry.
    pub(super) fn read_backup(&self, entry: &ManifestEntry) -> Result<HashMap<String, Tensor>> {
        layout::read_shared(&self.spec.ckpt, entry, &self.spec.device)
            .context("read the stage's backup")
    }

    /// Every weight of the active layers, at full precision where a backup holds it.
    pub(super) fn full_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut w: HashMap<String, Tensor> = self.spec.initial.clone();
        w.extend(self.params.tensors()?);
        w.extend(self.frozen.tensors()?);
        let quantized = self.frozen.quantized_names();
        if !quantized.is_empty() {
            let entry = self
                .state
                .backup
                .as_ref()
                .context("quantized weights without a backup")?;
            let backup = self.read_backup(entry)?;
            for name in quantized {
                let t = backup
                    .get(&name)
                    .with_context(|| format!("the stage's backup has no {name}"))?;
                w.insert(name, t.clone());
            }
        }
        Ok(w)
    }

    /// Continue from a verified checkpoint: weights, optimizer, EMA and trainer state.
    pub(super) fn restore(&mut self, c: &LoadedCheckpoint) -> Result<()> {
        let device = self.spec.device.clone();
        let state: TrainerState =
            serde_json::from_slice(c.files.get(layout::TRAINER_STATE).with_context(|| {
                format!("checkpoint {} has no {}", c.name, layout::TRAINER_STATE)
            })?)
            .with_context(|| format!("parse {}", layout::TRAINER_STATE))?;
        self.check_same_data(c, &state)?;
        if let Some(was) = &c.manifest.meta.base
            && self
                .spec
                .base
                .as_ref()
                .is_none_or(|b| b.sha256 != was.sha256)
        {
            bail!(
                "checkpoint {} adapts the base {} (sha256 {}), but this run's init_from is {}; resume with the base it was trained on",
                c.name,
                was.path,
                &was.sha256[..16],
                self.spec
                    .base
                    .as_ref()
                    .map_or("not an adapter base".into(), |b| format!(
                        "{} (sha256 {})",
                        b.path,
                        &b.sha256[..16]
                    ))
            );
        }
        if let (Some(was), Some(run)) = (ckscaffold::meta(c)?, &self.spec.scaffold)
            && was.scaffold.sha256 != run.source.sha256
        {
            bail!(
                "checkpoint {} was trained with the scaffold {} (sha256 {}), but scaffold.scaffold is now {} (sha256 {}); \
                 resume with the scaffold it was trained with",
                c.name,
                was.scaffold.path,
                &was.scaffold.sha256[..16],
                run.source.path,
                &run.source.sha256[..16]
            );
        }
        let mut state = state;
        state.data_fingerprint = Some(self.spec.data_fingerprint.clone());
        let plan = &self.spec.plan;
        if state.stage >= plan.stages.len() {
            bail!(
                "checkpoint {} is at stage {} but the plan has {} stages; resume with the config it was trained with",
                c.name,
                state.stage,
                plan.stages.len()
            );
        }
        let mut weights = self.spec.initial.clone();
        weights.extend(layout::tensors(c, layout::MODEL, &device)?);
        let frozen = if c.files.contains_key(layout::FROZEN) {
            layout::tensors(c, layout::FROZEN, &device)?
        } else {
            HashMap::new()
        };
        let ended_its_stage =
            state.step == plan.stage_end(state.stage) && state.stage + 1 < plan.stages.len();
        if ended_its_stage {
            // The checkpoint ended its stage (the coordinator starts each stage from one):
            // go straight to the next stage, with the frozen weights at full precision from
            // the stage's backup, as `next_stage` would, without building the finished one.
            match &state.backup {
                Some(entry) => {
                    let backup = self.read_backup(entry)?;
                    for (name, t) in frozen {
                        let full = backup.get(&name).cloned().unwrap_or(t);
                        weights.insert(name, full);
                    }
                }
                None => weights.extend(frozen),
            }
            self.state = state;
            self.checkpointer.last = Some(c.name.clone());
            tracing::info!(checkpoint = %c.name, step = self.state.step, "resumed at the end of stage {}", self.state.stage + 1);
            return self.advance_stage(weights);
        }
        weights.extend(frozen);
        self.state = TrainerState {
            schedule: self.stage_schedule(state.stage),
            ..state
        };
        self.enter_stage(weights).context("restore model weights")?;
        let stage_step = self
            .state
            .step
            .checked_sub(self.spec.plan.stage_start(self.state.stage))
            .with_context(|| {
                format!(
                    "checkpoint {}: its step is before its stage's start",
                    c.name
                )
            })?;
        self.opt
            .load_state(&layout::tensors(c, layout::OPTIMIZER, &device)?, stage_step)
            .context("restore optimizer state")?;
        if let Some(ema) = &mut self.ema {
            let t = layout::tensors(c, layout::EMA, &device)?;
            for (k, v) in ema.shadow.iter_mut() {
                *v = t
                    .get(k)
                    .with_context(|| format!("{} has no {k}", layout::EMA))?
                    .clone();
            }
        }
        self.checkpointer.last = Some(c.name.clone());
        tracing::info!(checkpoint = %c.name, step = self.state.step, stage = self.state.stage, "resumed from checkpoint");
        Ok(())
    }

    /// A checkpoint continues on the data it was trained on: the same dataset (unless
    /// `training.allow_data_change`), and in any case a cursor inside it.
    fn check_same_data(&self, c: &LoadedCheckpoint, state: &TrainerState) -> Result<()> {
        let (spec, path) = (&self.spec, &self.spec.cfg.data.path);
        if let Some(was) = &state.data_fingerprint
            && *was != spec.data_fingerprint
            && !spec.cfg.training.allow_data_change
        {
            bail!(
                "checkpoint {} was trained on a dataset with fingerprint {}, but {path} now has {}: the data changed; \
                 resume on the original data, or set training.allow_data_change: true to continue on this one",
                c.name,
                &was[..was.len().min(16)],
                &spec.data_fingerprint[..16]
            );
        }
        let n = spec.train_samples();
        if state.cursor.index as usize >= n {
            bail!(
                "checkpoint {}: its data cursor is at sample {} of epoch {}, but {path} has {n} training samples; \
                 resume on the data it was trained on",
                c.name,
                state.cursor.index,
                state.cursor.epoch
            );
        }
        Ok(())
    }
}
