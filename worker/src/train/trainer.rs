//! The trainer: data → micro-batches → gradients → all-reduce → clip → AdamW, with
//! evaluation, early stopping, EMA and exact checkpoint/resume. `run` is the loop; the
//! pieces it calls are the stage runner (`stage.rs`), the step (`step.rs`), the checkpointer
//! (`checkpointer.rs`, `persistence.rs`), evaluation and early stopping (`eval.rs`,
//! `early_stopping.rs`), micro-batches (`batches.rs`) and reporting (`report.rs`).
//!
//! Data parallel: every rank draws the same global batch from the global cursor and takes its
//! slice (rows `rank*b/w .. (rank+1)*b/w` of each micro-batch), so `w` ranks with batch `b/w`
//! see exactly the samples of one rank with batch `b`, and a run resumes at the same data
//! position with any world size that divides the batch. Rank 0 writes checkpoints and
//! metrics; all ranks hold the same weights.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::json;
use stackwise_common::checkpoint::{CheckpointError, LoadedCheckpoint};
use stackwise_common::config::{EvalStrategy, TrainConfig};
use stackwise_common::plan::{Plan, StagePlan};

use super::actcache::ActivationCache;
use super::checkpointer::{Checkpointer, SavePolicy, StepEnd};
use super::early_stopping::observe_val_loss;
use super::report::{Reporter, StepReport, stage_line};
use super::spec::RunSpec;
use super::state::TrainerState;
use super::step::{self, StepStats};
use crate::comm::{Comm, Local, Timed};
use crate::models::params::FrozenSet;
use crate::models::{Params, Transformer};
use crate::optim::{AdamW, Ema};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the newest valid checkpoint of the run.
    pub resume: bool,
    /// Stop (with a checkpoint) once this step is reached; the schedule still spans
    /// `training.steps`. For time-sliced jobs and resume tests.
    pub until_step: Option<u64>,
    /// Show a progress bar when stderr is a terminal.
    pub progress: bool,
    /// Continue from this checkpoint of the run (chosen by the coordinator, so every rank
    /// loads the same one).
    pub resume_from: Option<String>,
    /// The stage plan (from the coordinator's planner); none = planned here from the config.
    pub plan: Option<Plan>,
}

/// What the trainer reports as it goes (the worker forwards these to the coordinator).
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Step(stackwise_proto::model::StepMetrics),
    Checkpoint {
        step: u64,
        name: String,
        uri: String,
    },
}

/// The training was stopped from outside (`Trainer::set_abort`).
#[derive(Debug, thiserror::Error)]
#[error("training aborted")]
pub struct Aborted;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: String,
    pub step: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub last_checkpoint: Option<String>,
    pub tokens_per_s: f64,
    pub stopped_early: bool,
    /// Stopped with a checkpoint because a stop was requested (SIGTERM, the coordinator).
    pub stopped_on_request: bool,
}

pub struct Trainer {
    pub(super) spec: RunSpec,
    // The current stage's model (see `stage.rs`).
    pub(super) model: Transformer,
    pub(super) params: Params,
    pub(super) frozen: FrozenSet,
    pub(super) opt: AdamW,
    pub(super) ema: Option<Ema>,
    pub(super) act_cache: Option<ActivationCache>,
    /// `clm` trains on every token; `sft` only on the response tokens marked at prepare time.
    pub(super) all_tokens: bool,
    pub(super) state: TrainerState,
    /// The cursor's permutation of the current epoch.
    pub(super) order: Option<(u64, Vec<u32>)>,
    pub(super) last_val_accuracy: Option<f64>,
    /// Evaluate a scaffold run's base alone (`evaluate_without_scaffold`).
    pub(super) base_only_eval: bool,
    pub(super) checkpointer: Checkpointer,
    pub(super) comm: Box<dyn Comm>,
    /// Nanoseconds `comm` spent in collectives since the last step report.
    comm_spent: Arc<AtomicU64>,
    observer: Option<Box<dyn FnMut(TrainEvent) + Send>>,
    abort: Option<Arc<AtomicBool>>,
    stop_request: Option<Arc<AtomicBool>>,
}

/// Throughput and the last loss, as the loop goes.
struct Progress {
    started: Instant,
    window_start: Instant,
    window_tokens: usize,
    total_tokens: usize,
    last_loss: Option<f64>,
    stop_requested: bool,
}

impl Trainer {
    /// A single-process trainer (world size 1).
    pub fn new(cfg: TrainConfig, opts: &RunOptions) -> Result<Self> {
        Self::with_comm(cfg, opts, Box::new(Local))
    }

    /// A trainer that is one rank of `comm`'s group.
    pub fn with_comm(cfg: TrainConfig, opts: &RunOptions, comm: Box<dyn Comm>) -> Result<Self> {
        let fresh = !opts.resume && opts.resume_from.is_none();
        let spec = RunSpec::resolve(cfg, opts.plan.clone(), comm.world_size(), fresh)?;
        let mut trainer = Self::start(spec, comm)?;
        match trainer.checkpoint_to_resume(opts)? {
            Some(c) => trainer.restore(&c)?,
            None => {
                let weights = trainer.spec.initial.clone();
                trainer.enter_stage(weights)?;
            }
        }
        if trainer.spec.base.is_some() {
            // An adapter run's one stage holds the base in `frozen`, at its storage precision;
            // keeping the f32 copy as well would undo QLoRA's saving. The base's folder has it.
            trainer.spec.initial = HashMap::new();
        }
        if let Some(s) = &mut trainer.spec.scaffold {
            // Likewise the scaffold's: its frozen weights are in `frozen` now.
            s.weights = HashMap::new();
        }
        if trainer.is_leader() {
            trainer.write_run_files()?;
        }
        Ok(trainer)
    }

    /// A trainer at step 0 of the plan; `enter_stage` or `restore` builds the model.
    fn start(spec: RunSpec, comm: Box<dyn Comm>) -> Result<Self> {
        let cfg = &spec.cfg;
        let checkpointer = Checkpointer::new(
            spec.ckpt.clone(),
            spec.run.uri(),
            cfg.training.keep_last,
            comm.rank() == 0,
        );
        let (model, params) = Transformer::init(&spec.model_cfg, cfg.run.seed, &spec.device)?;
        let comm_spent = Arc::new(AtomicU64::new(0));
        let comm: Box<dyn Comm> = Box::new(Timed::new(comm, comm_spent.clone()));
        let mut trainer = Self {
            state: TrainerState::start(
                &cfg.run.name,
                cfg.run.seed,
                stackwise_common::schedule::Schedule::constant(0.0),
                cfg.training.ema_decay.is_some(),
            ),
            model,
            params,
            frozen: FrozenSet::default(),
            opt: AdamW::new(&BTreeMap::new(), Default::default())?,
            ema: None,
            act_cache: None,
            all_tokens: true,
            order: None,
            last_val_accuracy: None,
            base_only_eval: false,
            checkpointer,
            comm,
            comm_spent,
            observer: None,
            abort: None,
            stop_request: None,
            spec,
        };
        trainer.state.schedule = trainer.stage_schedule(0);
        trainer.state.data_fingerprint = Some(trainer.spec.data_fingerprint.clone());
        Ok(trainer)
    }

    /// The checkpoint to continue from: the coordinator's choice, or the newest valid one
    /// with `--resume`. A choice that fails verification falls back to the newest older
    /// checkpoint that verifies (every rank reads the same bytes, so all fall back alike).
    fn checkpoint_to_resume(&self, opts: &RunOptions) -> Result<Option<LoadedCheckpoint>> {
        let (ckpt, run) = (&self.spec.ckpt, self.spec.run.uri());
        if let Some(name) = &opts.resume_from {
            return match ckpt.load(name) {
                Ok(c) => Ok(Some(c)),
                Err(CheckpointError::Invalid { msg, .. }) => {
                    let older = ckpt.load_latest_before(name)?;
                    tracing::warn!(
                        "skipping checkpoint {name}: {msg}; resuming from {}",
                        older.as_ref().map_or("the start", |c| c.name.as_str())
                    );
                    Ok(older)
                }
                Err(e) => Err(e).with_context(|| format!("load checkpoint {name} of {run}")),
            };
        }
        if !opts.resume {
            return Ok(None);
        }
        let latest = ckpt.load_latest()?;
        if latest.is_none() {
            tracing::warn!(run = %run, "--resume: no valid checkpoint found; starting from step 0");
        }
        Ok(latest)
    }

    /// The resolved config (secrets redacted) and the plan, beside the checkpoints.
    fn write_run_files(&self) -> Result<()> {
        let mut shown = self.spec.cfg.clone();
        shown.storage = shown.storage.map(|s| s.redacted());
        let resolved = serde_yaml::to_string(&shown).context("serialize config")?;
        self.spec.run.put("config.yaml", Bytes::from(resolved))?;
        self.spec.run.put(
            "plan.json",
            Bytes::from(serde_json::to_vec_pretty(&self.spec.plan)?),
        )?;
        Ok(())
    }

    /// The current stage.
    pub fn stage(&self) -> &StagePlan {
        &self.spec.plan.stages[self.state.stage]
    }

    /// Frozen tensors of the current stage.
    pub fn frozen(&self) -> &FrozenSet {
        &self.frozen
    }

    /// Activation-cache hits and misses of the current stage.
    pub fn activation_cache_stats(&self) -> Option<(u64, u64)> {
        self.act_cache.as_ref().map(|c| (c.hits, c.misses))
    }

    /// Masked-token accuracy of the last evaluation (masked objectives).
    pub fn last_val_accuracy(&self) -> Option<f64> {
        self.last_val_accuracy
    }

    /// Rank 0 writes checkpoints, metrics and the resolved config.
    pub fn is_leader(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Receive step metrics and checkpoint reports.
    pub fn set_observer(&mut self, f: Box<dyn FnMut(TrainEvent) + Send>) {
        self.observer = Some(f);
    }

    /// Once `flag` is set on any rank, every rank checkpoints after the same step and `run`
    /// returns early (`TrainSummary::stopped_on_request`): a graceful stop, e.g. on SIGTERM.
    pub fn set_stop_request(&mut self, flag: Arc<AtomicBool>) {
        self.stop_request = Some(flag);
    }

    /// Stop at the next step boundary once `flag` is set (`run` returns `Aborted`).
    pub fn set_abort(&mut self, flag: Arc<AtomicBool>) {
        self.abort = Some(flag);
    }

    pub(super) fn emit(&mut self, e: TrainEvent) {
        if let Some(f) = &mut self.observer {
            f(e);
        }
    }

    pub fn model(&self) -> &Transformer {
        &self.model
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Train until `training.steps` (or `until_step`, or early stopping).
    pub fn run(&mut self, opts: &RunOptions) -> Result<TrainSummary> {
        let total = self.spec.plan.total_steps();
        let stop_at = opts.until_step.unwrap_or(total).min(total);
        let leader = self.is_leader();
        let mut rep = Reporter::new(
            &self.spec.run,
            total,
            self.state.step,
            opts.progress && leader,
            leader,
        );
        rep.line(&self.run_line());
        if self.state.stage > 0 && self.state.step == self.spec.plan.stage_start(self.state.stage) {
            // Resumed at the checkpoint that ended the stage before.
            rep.line(&self.current_stage_line());
        }
        let policy = SavePolicy {
            every: self.spec.cfg.training.checkpoint_every,
        };
        let mut progress = Progress::new();
        while self.state.step < stop_at && !self.state.stopped_early && !progress.stop_requested {
            if self
                .abort
                .as_ref()
                .is_some_and(|a| a.load(Ordering::SeqCst))
            {
                return Err(Aborted.into());
            }
            self.begin_stage_if_due(&mut rep)?;
            let stage_end = self.spec.plan.stage_end(self.state.stage);
            let lr = self
                .state
                .schedule
                .at(self.state.step - self.spec.plan.stage_start(self.state.stage));
            let stats = self.train_step(lr)?;
            progress.step(&stats);
            let val = self.maybe_evaluate(stage_end, stats.epoch_ended)?;
            let ended_early = self.end_stage_if_stopped_early(stage_end, &rep);
            let step = stats.step;
            if self.spec.cfg.training.evaluates() && (step == stage_end || ended_early) {
                self.record_stage_result(step, ended_early, &mut rep)?;
            }
            let end = StepEnd {
                step,
                stop_at,
                stage_end,
                stage_ended_early: ended_early,
                run_ends: self.state.stopped_early || progress.stop_requested,
            };
            if policy.should_save(&end) {
                self.save_checkpoint()?;
            }
            if self.checkpointer.finished() {
                self.wait_pending_save()?;
            }
            // Diagnostics only below this line.
            self.report_step(&mut rep, &mut progress, &stats, lr, val, total, stop_at);
            if val.is_some() {
                self.log_scaffold_samples(&mut rep)?;
            }
        }
        self.wait_pending_save()?;
        rep.finish();
        Ok(self.summary(&rep, progress))
    }

    /// At a stage boundary, enter the next stage; at a stage's first step (multi-stage
    /// plans), evaluate where it starts from: its objective on the model before its first
    /// step (a `stage_start` record).
    fn begin_stage_if_due(&mut self, rep: &mut Reporter) -> Result<()> {
        if self.at_stage_boundary() {
            self.next_stage()?;
            rep.line(&self.current_stage_line());
        }
        let plan = &self.spec.plan;
        // Adapter runs report the wrapped base before training (the adapter starts at zero,
        // so it is the base's loss), as PEFT scripts print it before and after wrapping.
        let adapter_run = self.spec.base.is_some();
        if !self.spec.cfg.training.evaluates()
            || (plan.stages.len() == 1 && !adapter_run)
            || self.state.step != plan.stage_start(self.state.stage)
        {
            return Ok(());
        }
        let Some(v) = self.evaluate()? else {
            return Ok(());
        };
        let mut rec = json!({
            "step": self.state.step, "stage": self.state.stage, "stage_start": true,
            "val_loss": v,
        });
        if let Some(acc) = self.last_val_accuracy {
            rec["val_masked_accuracy"] = acc.into();
        }
        rep.record(&rec);
        if self.spec.scaffold.is_some() {
            // Every rank evaluates (the totals are all-reduced); rank 0 reports.
            let base = self.evaluate_without_scaffold()?.unwrap_or(f64::NAN);
            rep.record(&json!({"step": self.state.step, "base_val_loss": base}));
            if self.is_leader() {
                rep.line(&format!(
                    "before training: val {v:.4} ppl {:.2} (base + fusers, scaffold LoRA at zero); the base alone: val {base:.4} ppl {:.2}; {}",
                    v.exp(),
                    base.exp(),
                    self.parameters_line()
                ));
            }
        } else if self.is_leader() && adapter_run {
            rep.line(&format!(
                "before training: val {v:.4} ppl {:.2} (the base wrapped with a zero adapter; {})",
                v.exp(),
                self.parameters_line()
            ));
        } else if self.is_leader() {
            rep.line(&format!(
                "stage {} starts at val {v:.4}{}",
                self.state.stage + 1,
                self.last_val_accuracy
                    .map_or(String::new(), |a| format!(" masked acc {a:.3}"))
            ));
        }
        Ok(())
    }

    /// One optimizer step (see `step::train_step_voting`), then EMA and bookkeeping.
    fn train_step(&mut self, lr: f64) -> Result<StepStats> {
        let epoch = self.state.cursor.epoch;
        let batches = self.micro_batches()?;
        let vote = self
            .stop_request
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        let mut stats = step::train_step_voting(
            &self.model,
            &self.params,
            &mut self.opt,
            &batches,
            self.spec.cfg.training.grad_clip,
            lr,
            self.comm.as_mut(),
            vote,
            self.state.step,
            self.spec.cfg.training.overlap_comm,
        )?;
        if stats.skipped {
            self.state.skipped_steps += 1;
            tracing::warn!(
                step = self.state.step,
                loss = stats.loss,
                grad_norm = stats.grad_norm,
                "non-finite loss or gradient norm (or no target tokens): step skipped"
            );
        } else if let Some(ema) = &mut self.ema {
            ema.update(&self.params)?;
        }
        self.state.step += 1;
        self.state.tokens_seen += stats.tokens as u64;
        stats.step = self.state.step;
        // The global cursor moves into the next epoch with the last sample of this one.
        stats.epoch_ended = self.state.cursor.epoch > epoch;
        Ok(stats)
    }

    /// Evaluate every `eval_every` steps (or, with `eval_strategy: epoch`, after the step that
    /// ends an epoch) and at the stage's end; early stopping watches it.
    fn maybe_evaluate(&mut self, stage_end: u64, epoch_ended: bool) -> Result<Option<f64>> {
        let t = &self.spec.cfg.training;
        let step = self.state.step;
        let due = match t.eval_strategy {
            EvalStrategy::Steps => t.eval_every > 0 && step.is_multiple_of(t.eval_every),
            EvalStrategy::Epoch => epoch_ended,
        };
        if !t.evaluates() || !(due || step == stage_end) {
            return Ok(None);
        }
        let val = self.evaluate()?;
        if let Some(v) = val {
            observe_val_loss(&mut self.state, v, self.spec.cfg.training.patience);
        }
        Ok(val)
    }

    /// Early stopping ends a stage that is not the last one, not the run: the step count
    /// moves to the stage's end, where the next stage starts. Returns whether it did.
    fn end_stage_if_stopped_early(&mut self, stage_end: u64, rep: &Reporter) -> bool {
        if !self.state.stopped_early || self.state.stage + 1 == self.spec.plan.stages.len() {
            return false;
        }
        let stopped_at = self.state.step;
        self.state.stopped_early = false;
        self.state.step = stage_end;
        if self.is_leader() {
            rep.line(&format!(
                "stage {} stops early at step {stopped_at}: no better validation loss in {} evaluations; stage {} starts",
                self.state.stage + 1,
                self.state.evals_since_best,
                self.state.stage + 2
            ));
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn report_step(
        &mut self,
        rep: &mut Reporter,
        progress: &mut Progress,
        stats: &StepStats,
        lr: f64,
        val: Option<f64>,
        total: u64,
        stop_at: u64,
    ) {
        let step = stats.step;
        let tokens_per_s = progress.window_tokens_per_s();
        let allreduce_s = self.comm_spent.swap(0, Ordering::Relaxed) as f64 / 1e9;
        self.emit(TrainEvent::Step(stackwise_proto::model::StepMetrics {
            stage: self.state.stage as u32,
            step,
            total_steps: total,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens as u64,
            tokens_per_s,
            val_loss: val,
            skipped: stats.skipped,
            allreduce_seconds: allreduce_s,
        }));
        let every = self.spec.cfg.training.log_every.max(1);
        if step.is_multiple_of(every) || val.is_some() || step == stop_at {
            let (mut rec, line) = StepReport {
                step,
                total,
                stages: self.spec.plan.stages.len(),
                stage: self.state.stage,
                loss: stats.loss,
                lr,
                grad_norm: stats.grad_norm,
                skipped: stats.skipped,
                tokens_per_s,
                tokens_seen: self.state.tokens_seen,
                loss_tokens: stats.loss_tokens,
                micro_batches: stats.micro_batches,
                val_loss: val,
                val_accuracy: val.and(self.last_val_accuracy),
            }
            .render();
            if self.comm.world_size() > 1 {
                // This rank's seconds in collectives in this step, and the part of
                // this step's gradient all-reduce its backward pass did not hide.
                rec["allreduce_s"] = allreduce_s.into();
                rec["allreduce_exposed_s"] = stats.allreduce_exposed_s.into();
            }
            rep.record(&rec);
            if self.is_leader() && (!rep.is_bar() || val.is_some()) {
                rep.line(&line);
            }
            progress.new_window();
        }
        rep.progress(
            step,
            format!("loss {:.4} {tokens_per_s:.0} tok/s", stats.loss),
        );
    }

    /// The closing lines and the summary.
    fn summary(&self, rep: &Reporter, progress: Progress) -> TrainSummary {
        let last = self.checkpointer.last.clone();
        if progress.stop_requested {
            rep.line(&format!(
                "stopped on request at step {} with checkpoint {}; continue with --resume",
                self.state.step,
                last.as_deref().unwrap_or("-")
            ));
        }
        if self.state.stopped_early {
            rep.line(&format!(
                "early stopping at step {}: no better validation loss in {} evaluations",
                self.state.step, self.state.evals_since_best
            ));
        }
        let plan_done = self.state.step >= self.spec.plan.total_steps() || self.state.stopped_early;
        if self.is_leader() && plan_done && self.state.stage_results.len() > 1 {
            rep.line(&format!(
                "validation masked loss at the plan's fractions after each stage: {}",
                self.state
                    .stage_results
                    .iter()
                    .map(|r| format!("{:.4}", r.val_loss))
                    .collect::<Vec<_>>()
                    .join(" -> ")
            ));
        }
        TrainSummary {
            run_dir: self.spec.run.uri().to_string(),
            step: self.state.step,
            train_loss: progress.last_loss,
            val_loss: self.state.last_val_loss,
            best_val_loss: self.state.best_val_loss,
            last_checkpoint: last,
            tokens_per_s: progress.total_tokens as f64
                / progress.started.elapsed().as_secs_f64().max(1e-9),
            stopped_early: self.state.stopped_early,
            stopped_on_request: progress.stop_requested,
        }
    }

    fn run_line(&self) -> String {
        let s = &self.spec;
        format!(
            "run {} | rank {}/{} | {} | {} stage(s) | {} train / {} validation tokens | {} samples of {} tokens{} | from step {}",
            s.run.uri(),
            self.comm.rank(),
            self.comm.world_size(),
            self.parameters_line(),
            s.plan.stages.len(),
            s.train.num_tokens(),
            s.val.num_tokens(),
            s.train_samples(),
            s.seq_len,
            if s.packed { " (packed)" } else { "" },
            self.state.step
        )
    }

    /// `trainable 16,384 of 120,000 parameters (13.65%)`: the current stage's.
    fn parameters_line(&self) -> String {
        let trainable = self.params.count();
        let total = trainable + self.frozen.count();
        format!(
            "trainable {trainable} of {total} parameters ({:.2}%)",
            100.0 * trainable as f64 / total.max(1) as f64
        )
    }

    fn current_stage_line(&self) -> String {
        stage_line(
            self.state.stage,
            self.spec.plan.stages.len(),
            self.stage(),
            self.params.count(),
        )
    }
}

impl Progress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            window_start: Instant::now(),
            window_tokens: 0,
            total_tokens: 0,
            last_loss: None,
            stop_requested: false,
        }
    }

    fn step(&mut self, stats: &StepStats) {
        self.stop_requested |= stats.stop;
        self.window_tokens += stats.tokens;
        self.total_tokens += stats.tokens;
        self.last_loss = Some(stats.loss);
    }

    fn window_tokens_per_s(&self) -> f64 {
        self.window_tokens as f64 / self.window_start.elapsed().as_secs_f64().max(1e-9)
    }

    fn new_window(&mut self) {
        self.window_tokens = 0;
        self.window_start = Instant::now();
    }
}
