//! Checkpointing (DESIGN §6): a pure policy says when to save; the [`Checkpointer`] carries
//! it out, uploading a staged checkpoint on a background thread while training goes on (the
//! step stalls only for serialization). What the trainer stages, its backups and how it
//! restores are in `persistence.rs`.

use std::thread::JoinHandle;

use anyhow::{Context, Result};
use bytes::Bytes;
use stackwise_common::checkpoint::{CheckpointMeta, CheckpointStore, ManifestEntry, step_dir};

use crate::checkpoint as layout;

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
