//! Checkpointing (DESIGN §6): a pure policy says when to save; the [`Checkpointer`] carries
//! it out, staging the files in memory and uploading them on a background thread while
//! training goes on (the step stalls only for serialization). Also here: the stage's
//! full-precision backup, and restoring a trainer from a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use candle_core::Tensor;
use stackwise_common::checkpoint::{
    CheckpointMeta, CheckpointStore, LoadedCheckpoint, ManifestEntry, step_dir,
};

use super::state::TrainerState;
use super::trainer::Trainer;
use crate::checkpoint as layout;
use crate::models::hf;

/// When to save (pure): every `every` steps, at the step the run stops at, at every stage
/// boundary (a stage that ends early included), and when the run ends (early stopping, a
/// stop request).
#[derive(Debug, Clone, Copy)]
pub struct SavePolicy {
    pub every: u64,
}

/// Where a step left the run, as far as saving goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepEnd {
    pub step: u64,
    pub stop_at: u64,
    pub stage_end: u64,
    pub stage_ended_early: bool,
    pub run_ends: bool,
}

impl SavePolicy {
    pub fn should_save(&self, s: &StepEnd) -> bool {
        (self.every > 0 && s.step.is_multiple_of(self.every))
            || s.step == s.stop_at
            || s.step == s.stage_end
            || s.stage_ended_early
            || s.run_ends
    }
}

/// A checkpoint staged in memory, ready to upload.
pub struct Staged {
    pub step: u64,
    pub meta: CheckpointMeta,
    pub files: Vec<(String, Bytes)>,
    /// Shared objects already stored, listed by the manifest as they are.
    pub refs: Vec<ManifestEntry>,
    /// The stage's frozen tensors, when this is the stage's first checkpoint: (object, bytes).
    pub frozen_upload: Option<(String, Bytes)>,
}

/// A committed checkpoint, and the shared frozen-tensor object it wrote (first of a stage).
pub struct Saved {
    pub step: u64,
    pub name: String,
    pub frozen: Option<ManifestEntry>,
}

/// Uploads staged checkpoints, one at a time, and applies retention after each. Only the
/// leader (rank 0) writes; the other ranks only track the name of the last checkpoint.
pub struct Checkpointer {
    ckpt: CheckpointStore,
    run_uri: String,
    keep_last: usize,
    leader: bool,
    pending: Option<(u64, JoinHandle<Result<Saved>>)>,
    /// The last committed checkpoint.
    pub last: Option<String>,
}

impl Drop for Checkpointer {
    /// An aborted trainer still finishes its upload, so no writer outlives it.
    fn drop(&mut self) {
        if let Some((_, h)) = self.pending.take() {
            let _ = h.join();
        }
    }
}

impl Checkpointer {
    pub fn new(ckpt: CheckpointStore, run_uri: &str, keep_last: usize, leader: bool) -> Self {
        Self {
            ckpt,
            run_uri: run_uri.to_string(),
            keep_last,
            leader,
            pending: None,
            last: None,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Start uploading `staged` (the caller has waited for the previous upload). Returns
    /// the checkpoint's name.
    pub fn upload(&mut self, staged: Staged) -> Result<String> {
        let Staged {
            step,
            meta,
            files,
            mut refs,
            frozen_upload,
        } = staged;
        let name = step_dir(step);
        if !self.leader {
            self.last = Some(name.clone());
            return Ok(name);
        }
        let (ckpt, keep) = (self.ckpt.clone(), self.keep_last);
        let handle = std::thread::Builder::new()
            .name(format!("upload-{name}"))
            .spawn(move || -> Result<Saved> {
                // The shared frozen tensors are committed before any manifest names them.
                let frozen = match frozen_upload {
                    Some((object, bytes)) => {
                        let entry = ckpt.put_shared(&object, layout::FROZEN, bytes)?;
                        refs.push(entry.clone());
                        Some(entry)
                    }
                    None => None,
                };
                let name = ckpt.save_with_refs(step, meta, files, refs)?;
                let dropped = ckpt.apply_retention(keep)?;
                if !dropped.is_empty() {
                    tracing::debug!(?dropped, "retention removed old checkpoints");
                }
                Ok(Saved { step, name, frozen })
            })
            .context("start the checkpoint upload thread")?;
        self.pending = Some((step, handle));
        Ok(name)
    }

    /// Whether an upload is done and waiting to be collected by `wait`.
    pub fn finished(&self) -> bool {
        self.pending.as_ref().is_some_and(|(_, h)| h.is_finished())
    }

    /// Wait for the background upload, if any: the committed checkpoint.
    pub fn wait(&mut self) -> Result<Option<Saved>> {
        let Some((step, handle)) = self.pending.take() else {
            return Ok(None);
        };
        match handle.join() {
            Ok(Ok(saved)) => {
                self.last = Some(saved.name.clone());
                Ok(Some(saved))
            }
            Ok(Err(e)) => Err(e.context(format!(
                "checkpoint at step {step} could not be written to {}; the last complete checkpoint is {}",
                self.run_uri,
                self.last.as_deref().unwrap_or("none")
            ))),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

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
        if !self.frozen.plain.is_empty() || !self.frozen.stored.is_empty() {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_saves_on_the_cadence_at_boundaries_and_at_the_end() {
        let p = SavePolicy { every: 10 };
        let at = |step| StepEnd {
            step,
            stop_at: 35,
            stage_end: 25,
            ..Default::default()
        };
        let saves: Vec<u64> = (1..=35).filter(|&s| p.should_save(&at(s))).collect();
        assert_eq!(saves, vec![10, 20, 25, 30, 35]);
        assert!(p.should_save(&StepEnd {
            stage_ended_early: true,
            ..at(7)
        }));
        assert!(p.should_save(&StepEnd {
            run_ends: true,
            ..at(7)
        }));
        let never = SavePolicy { every: 0 };
        assert!(!never.should_save(&at(10)));
        assert!(never.should_save(&at(25)));
    }
}
