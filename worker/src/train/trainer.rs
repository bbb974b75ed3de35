//! The trainer: data → micro-batches → gradients → all-reduce → clip → AdamW, with
//! evaluation, early stopping, EMA and exact checkpoint/resume.
//!
//! Data parallel: every rank draws the same global batch from the global cursor and takes its
//! slice (rows `rank*b/w .. (rank+1)*b/w` of each micro-batch), so `w` ranks with batch `b/w`
//! see exactly the samples of one rank with batch `b`, and a run resumes at the same data
//! position with any world size that divides the batch. Rank 0 writes checkpoints and
//! metrics; all ranks hold the same weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use candle_core::{Device, Tensor};
use serde_json::json;
use stackwise_common::checkpoint::{CheckpointMeta, CheckpointStore, LoadedCheckpoint};
use stackwise_common::data::{Cursor, SplitData, TokenIndex, rank_rows};
use stackwise_common::rng::Rng;
use stackwise_common::store::Store;
use stackwise_common::tokenizer::Tok;

use super::actcache::{ActivationCache, ActivationCacheKind};
use super::config::TrainConfig;
use super::config::TrainingMode;
use super::plan::{Plan, Precision, StagePlan};
use super::report::{Reporter, peak_rss_bytes};
use super::state::{StageResult, TrainerState};
use super::step::{self, StepStats};
use crate::comm::{Comm, Local};
use crate::models::config::AttentionMode;
use crate::models::params::{FrozenSet, StagePolicy};
use crate::models::{ModelConfig, ParamBuilder, Params, Transformer, hf};
use crate::objectives::{Batch, Masking, Objective, nll_and_hits};
use crate::optim::{AdamW, AdamWConfig, Ema, Schedule};
use stackwise_common::checkpoint::ManifestEntry;

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
    /// The stage plan (from the coordinator's planner); none = one end-to-end stage.
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

/// A committed checkpoint, and the shared frozen-tensor object it wrote (first of a stage).
struct SavedCheckpoint {
    name: String,
    frozen: Option<ManifestEntry>,
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
    cfg: TrainConfig,
    plan: Plan,
    /// The full model's config (all layers, vocabulary with the mask token).
    model_cfg: ModelConfig,
    /// Weights of an `init_from` model (layers a stage has not reached yet come from here).
    initial: HashMap<String, Tensor>,
    model: Transformer,
    params: Params,
    frozen: FrozenSet,
    opt: AdamW,
    ema: Option<Ema>,
    state: TrainerState,
    train: SplitData,
    val: SplitData,
    packed: bool,
    /// `clm` trains on every token; `sft` only on the response tokens marked at prepare time.
    all_tokens: bool,
    mask_id: Option<u32>,
    last_val_accuracy: Option<f64>,
    seq_len: usize,
    pad_id: u32,
    tok: Tok,
    run: Store,
    ckpt: CheckpointStore,
    device: Device,
    order: Option<(u64, Vec<u32>)>,
    last_checkpoint: Option<String>,
    comm: Box<dyn Comm>,
    observer: Option<Box<dyn FnMut(TrainEvent) + Send>>,
    abort: Option<Arc<AtomicBool>>,
    pending_save: Option<(u64, std::thread::JoinHandle<Result<SavedCheckpoint>>)>,
    stall_seconds: f64,
    act_cache: Option<ActivationCache>,
    stop_request: Option<Arc<AtomicBool>>,
}

impl Drop for Trainer {
    /// An aborted trainer still finishes its upload, so no writer outlives it.
    fn drop(&mut self) {
        if let Some((_, h)) = self.pending_save.take() {
            let _ = h.join();
        }
    }
}

fn device_from(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        d if d.starts_with("cuda") => {
            let ordinal = d
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse)
                .context("parse run.device (cuda:N)")?;
            Device::new_cuda(ordinal)
                .with_context(|| format!("open {d}; is this build made with --features cuda?"))
        }
        other => bail!("run.device {other:?}: use cpu or cuda:N"),
    }
}

fn adamw_config(cfg: &TrainConfig) -> AdamWConfig {
    let t = &cfg.training;
    AdamWConfig {
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        weight_decay: t.weight_decay,
    }
}

/// The LR schedule of one stage: warmup and decay over the stage's own steps.
fn stage_schedule(cfg: &TrainConfig, stage: &StagePlan) -> Schedule {
    let t = &cfg.training;
    Schedule {
        kind: t.schedule,
        lr: stage.lr,
        warmup_steps: t.warmup_steps.min(stage.steps),
        total_steps: stage.steps,
        min_lr_ratio: t.min_lr_ratio,
        cycles: t.cycles,
    }
}

/// The plan of a config without stages: one end-to-end stage. Staged configs are planned
/// by the coordinator (`stackwise train`, `launch` and `worker` pass the plan in).
fn single_stage_plan(cfg: &TrainConfig, model: &ModelConfig) -> Result<Plan> {
    let t = &cfg.training;
    if t.mode != TrainingMode::EndToEnd || !t.finetune.is_empty() || t.time_step_masking {
        bail!(
            "training.mode {:?} (or finetune / time_step_masking) needs a stage plan; run it with `stackwise train`,              `launch` or a coordinator, which plan it",
            t.mode
        );
    }
    let masked = t.objective.is_masked();
    Ok(Plan {
        mode: "end_to_end".into(),
        stages: vec![StagePlan {
            name: "end-to-end".into(),
            active_layers: model.n_layers,
            trainable: (0..model.n_layers).collect(),
            frozen: vec![],
            frozen_precision: Precision::Fp32,
            adapters: None,
            train_embeddings: true,
            train_head: true,
            objective: t.objective,
            attention: if masked {
                AttentionMode::Bidirectional
            } else {
                model.attention_mode
            },
            mask_fractions: match t.objective {
                Objective::Mlm => vec![t.mask_fraction],
                _ => vec![],
            },
            steps: t.steps,
            lr: t.lr,
        }],
    })
}

impl Trainer {
    /// A single-process trainer (world size 1).
    pub fn new(cfg: TrainConfig, opts: &RunOptions) -> Result<Self> {
        Self::with_comm(cfg, opts, Box::new(Local))
    }

    /// A trainer that is one rank of `comm`'s group.
    pub fn with_comm(cfg: TrainConfig, opts: &RunOptions, comm: Box<dyn Comm>) -> Result<Self> {
        cfg.training.validate()?;
        let world = comm.world_size();
        if !cfg.training.batch_size.is_multiple_of(world) {
            bail!(
                "training.batch_size ({}) is the global batch and must divide by the number of workers ({world}); \
                 change one of them",
                cfg.training.batch_size
            );
        }
        if cfg.storage.is_some() {
            stackwise_common::store::configure_s3(cfg.storage.clone());
        }
        let device = device_from(&cfg.run.device)?;
        let data_store = Store::open(&cfg.data.path)?;
        let (index, mut tok) = TokenIndex::open(&data_store)?;
        let train = index.load_split(&data_store, &index.train)?;
        let val = index.load_split(&data_store, &index.validation)?;

        // The full model's config, and its weights when it starts from an HF folder.
        let (mut model_cfg, initial) = match &cfg.init_from {
            Some(dir) => {
                let mut model_cfg = hf::read_config(Path::new(dir))?;
                let tensors = hf::read_safetensors_dir(Path::new(dir), &device)?;
                if let Some(mode) = cfg.model.attention_mode {
                    model_cfg.attention_mode = mode;
                }
                let (_, params) = hf::model_from_tensors(&model_cfg, tensors, &device)
                    .with_context(|| format!("load init_from {dir}"))?;
                let initial: HashMap<String, Tensor> = params.tensors()?.into_iter().collect();
                (model_cfg, initial)
            }
            None => (cfg.model.resolve(Some(index.vocab_size))?, HashMap::new()),
        };
        let plan = match &opts.plan {
            Some(p) => p.clone(),
            None => single_stage_plan(&cfg, &model_cfg)?,
        };
        if plan.stages.is_empty() {
            bail!("the training plan has no stages");
        }
        let masked = plan.stages.iter().any(|s| s.objective.is_masked());
        let mask_id = if masked {
            let id = tok.ensure_mask_token()?;
            if cfg.init_from.is_none() && cfg.model.vocab_size.is_none() {
                model_cfg.vocab_size = model_cfg.vocab_size.max(id as usize + 1);
            }
            if id as usize >= model_cfg.vocab_size {
                bail!(
                    "a masked objective needs a mask token: the tokenizer has none, and the model's vocab_size ({}) \
                     has no room for one at id {id}; raise model.vocab_size",
                    model_cfg.vocab_size
                );
            }
            model_cfg.mask_token_id = Some(id);
            Some(id)
        } else {
            None
        };
        if cfg.init_from.is_none() {
            if model_cfg.vocab_size < index.vocab_size {
                bail!(
                    "model.vocab_size ({}) is smaller than the tokenizer's ({})",
                    model_cfg.vocab_size,
                    index.vocab_size
                );
            }
            model_cfg.eos_token_id = tok.eos_id();
            model_cfg.bos_token_id = tok.eos_id();
        } else if model_cfg.vocab_size < index.vocab_size {
            bail!(
                "init_from {}: the model's vocab_size ({}) is smaller than the dataset tokenizer's ({}); \
                 prepare the data with the model's tokenizer (`stackwise data prepare --tokenizer {0}`)",
                cfg.init_from.as_deref().unwrap_or_default(),
                model_cfg.vocab_size,
                index.vocab_size
            );
        }
        if !model_cfg.is_hf_compatible() {
            tracing::info!(
                "this model uses options transformers has no field for (e.g. bidirectional attention, parallel \
                 residual, non-default norm or positions); its config.json keeps them under \"stackwise\" and only \
                 StackWise reloads it exactly"
            );
        }
        let seq_len = cfg.training.seq_len.unwrap_or(model_cfg.seq_len);
        if seq_len > model_cfg.seq_len {
            bail!(
                "training.seq_len ({seq_len}) exceeds the model's seq_len ({}); lower it or raise model.seq_len",
                model_cfg.seq_len
            );
        }
        let packed = cfg
            .data
            .packing
            .unwrap_or(plan.stages[0].objective != Objective::Sft);
        let n_train = train.num_samples(seq_len, packed);
        if n_train == 0 {
            bail!(
                "{}: the training split has {} tokens, fewer than one sequence of {seq_len}; lower training.seq_len or add data",
                cfg.data.path,
                train.tokens.len()
            );
        }

        let run = Store::open(&cfg.run.output)?.child(&format!("runs/{}", cfg.run.name));
        let ckpt = CheckpointStore::new(&run);
        let state = TrainerState {
            run_id: cfg.run.name.clone(),
            step: 0,
            cursor: Cursor::start(),
            rng: Rng::derive(cfg.run.seed, "trainer"),
            schedule: stage_schedule(&cfg, &plan.stages[0]),
            tokens_seen: 0,
            skipped_steps: 0,
            best_val_loss: None,
            last_val_loss: None,
            evals_since_best: 0,
            ema: cfg.training.ema_decay.is_some(),
            stopped_early: false,
            stage: 0,
            backup: None,
            frozen_shared: None,
            stage_results: Vec::new(),
        };
        let pad_id = tok.eos_id().unwrap_or(0);
        // Filled by `enter_stage`.
        let (model, params) = Transformer::init(&model_cfg, cfg.run.seed, &device)?;
        let opt = AdamW::new(&BTreeMap::new(), adamw_config(&cfg))?;
        let mut trainer = Self {
            cfg,
            plan,
            model_cfg,
            initial,
            model,
            params,
            frozen: FrozenSet::default(),
            opt,
            ema: None,
            state,
            train,
            val,
            packed,
            all_tokens: true,
            mask_id,
            last_val_accuracy: None,
            seq_len,
            pad_id,
            tok,
            run,
            ckpt,
            device,
            order: None,
            last_checkpoint: None,
            comm,
            observer: None,
            abort: None,
            pending_save: None,
            stall_seconds: 0.0,
            act_cache: None,
            stop_request: None,
        };
        let existing = trainer.ckpt.list_names()?;
        let resume_from = if let Some(name) = &opts.resume_from {
            Some(
                trainer
                    .ckpt
                    .load(name)
                    .with_context(|| format!("load checkpoint {name} of {}", trainer.run.uri()))?,
            )
        } else if opts.resume {
            let latest = trainer.ckpt.load_latest()?;
            if latest.is_none() {
                tracing::warn!(run = %trainer.run.uri(), "--resume: no valid checkpoint found; starting from step 0");
            }
            latest
        } else if !existing.is_empty() {
            bail!(
                "{} already has checkpoints ({}); pass --resume to continue it, or set run.name to start a new run",
                trainer.run.uri(),
                existing.join(", ")
            );
        } else {
            None
        };
        match resume_from {
            Some(c) => trainer.restore(&c)?,
            None => {
                let weights = trainer.initial.clone();
                trainer.enter_stage(weights)?;
            }
        }
        if trainer.is_leader() {
            let mut shown = trainer.cfg.clone();
            shown.storage = shown.storage.map(|s| s.redacted());
            let resolved = serde_yaml::to_string(&shown).context("serialize config")?;
            trainer.run.put("config.yaml", Bytes::from(resolved))?;
            trainer.run.put(
                "plan.json",
                Bytes::from(serde_json::to_vec_pretty(&trainer.plan)?),
            )?;
        }
        Ok(trainer)
    }

    fn restore(&mut self, c: &LoadedCheckpoint) -> Result<()> {
        let device = self.device.clone();
        let load = |name: &str| -> Result<HashMap<String, Tensor>> {
            let bytes = c
                .files
                .get(name)
                .with_context(|| format!("checkpoint {} has no {name}", c.name))?;
            Ok(candle_core::safetensors::load_buffer(bytes, &device)?)
        };
        let state: TrainerState = serde_json::from_slice(
            c.files
                .get("trainer_state.json")
                .with_context(|| format!("checkpoint {} has no trainer_state.json", c.name))?,
        )
        .context("parse trainer_state.json")?;
        if state.stage >= self.plan.stages.len() {
            bail!(
                "checkpoint {} is at stage {} but the plan has {} stages; resume with the config it was trained with",
                c.name,
                state.stage,
                self.plan.stages.len()
            );
        }
        let mut weights = self.initial.clone();
        weights.extend(load("model.safetensors")?);
        let frozen = if c.files.contains_key("frozen.safetensors") {
            load("frozen.safetensors")?
        } else {
            HashMap::new()
        };
        let ended_its_stage = state.step == self.plan.stage_end(state.stage)
            && state.stage + 1 < self.plan.stages.len();
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
            self.last_checkpoint = Some(c.name.clone());
            tracing::info!(checkpoint = %c.name, step = self.state.step, "resumed at the end of stage {}", self.state.stage + 1);
            return self.advance_stage(weights);
        }
        weights.extend(frozen);
        self.state = TrainerState {
            schedule: stage_schedule(&self.cfg, &self.plan.stages[state.stage]),
            ..state
        };
        self.enter_stage(weights).context("restore model weights")?;
        let stage_step = self.state.step - self.plan.stage_start(self.state.stage);
        self.opt
            .load_state(&load("optimizer.safetensors")?, stage_step)
            .context("restore optimizer state")?;
        if let Some(ema) = &mut self.ema {
            let t = load("ema.safetensors")?;
            for (k, v) in ema.shadow.iter_mut() {
                *v = t
                    .get(k)
                    .with_context(|| format!("ema.safetensors has no {k}"))?
                    .clone();
            }
        }
        self.last_checkpoint = Some(c.name.clone());
        tracing::info!(checkpoint = %c.name, step = self.state.step, stage = self.state.stage, "resumed from checkpoint");
        Ok(())
    }

    /// Build the current stage's model from `weights` (missing ones from the seeded init):
    /// trainable parameters as `Var`s, frozen ones at the stage's precision, a fresh
    /// optimizer over the trainable ones. Before frozen weights are quantized, their
    /// full-precision values go to the store as the stage's backup.
    fn enter_stage(&mut self, weights: HashMap<String, Tensor>) -> Result<()> {
        let stage = self.plan.stages[self.state.stage].clone();
        let lossy = stage.frozen_precision.is_lossy() && !stage.frozen.is_empty();
        if lossy && self.state.backup.is_none() {
            self.write_backup(&weights)?;
        }
        let mut mcfg = self.model_cfg.clone();
        mcfg.attention_mode = stage.attention;
        if let Some(a) = stage.adapters {
            mcfg.lora_scale = Some(a.scale());
            self.model_cfg.lora_scale = Some(a.scale());
        }
        let mut pb = ParamBuilder::for_stage(
            weights,
            self.cfg.run.seed,
            StagePolicy::of(&stage),
            &self.device,
        );
        pb.set_lora_scale(mcfg.lora_scale);
        self.model = Transformer::build_layers(&mcfg, &mut pb, &self.device, stage.active_layers)?;
        let (params, frozen, _later_layers) = pb.finish_stage();
        self.params = params;
        self.frozen = frozen;
        self.opt = AdamW::new(&self.params.vars, adamw_config(&self.cfg))?;
        self.ema = self
            .cfg
            .training
            .ema_decay
            .map(|d| Ema::new(&self.params, d))
            .transpose()?;
        self.all_tokens = stage.objective != Objective::Sft;
        self.act_cache = self.stage_cache(&stage)?;
        let trainable = self.params.count() * 4;
        tracing::info!(
            stage = self.state.stage,
            name = %stage.name,
            trainable_mib = format!("{:.2}", trainable as f64 / (1 << 20) as f64),
            frozen_mib = format!("{:.2}", self.frozen.bytes() as f64 / (1 << 20) as f64),
            optimizer_mib = format!("{:.2}", 2.0 * trainable as f64 / (1 << 20) as f64),
            frozen_precision = stage.frozen_precision.name(),
            "stage weights: trainable, frozen and optimizer state"
        );
        Ok(())
    }

    /// The activation cache of a stage whose trainable layers sit on a fully frozen prefix
    /// (frozen embeddings and layers `0..k`, no adapters); none otherwise.
    fn stage_cache(&self, stage: &StagePlan) -> Result<Option<ActivationCache>> {
        let t = &self.cfg.training;
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
            &self.run,
            &self.cfg.run.name,
            self.state.stage,
            k,
            self.comm.rank(),
        )
    }

    /// Activation-cache hits and misses of the current stage.
    pub fn activation_cache_stats(&self) -> Option<(u64, u64)> {
        self.act_cache.as_ref().map(|c| (c.hits, c.misses))
    }

    /// Write the full-precision `weights` (before quantizing) as this stage's backup: one
    /// object under `checkpoints/backups/`, referenced by every checkpoint of the stage.
    fn write_backup(&mut self, weights: &HashMap<String, Tensor>) -> Result<()> {
        let sorted: BTreeMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let bytes = Bytes::from(hf::params_to_safetensors(&sorted)?);
        let object = format!("backups/stage-{:02}/model.safetensors", self.state.stage);
        let entry = if self.is_leader() {
            self.ckpt
                .put_shared(&object, "backup.safetensors", bytes)
                .with_context(|| format!("write the full-precision backup {object}"))?
        } else {
            ManifestEntry {
                object: Some(object),
                ..ManifestEntry::of("backup.safetensors", &bytes)
            }
        };
        self.state.backup = Some(entry);
        Ok(())
    }

    /// Every weight of the active layers, at full precision where a backup holds it.
    fn full_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut w: HashMap<String, Tensor> = self.initial.clone();
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

    /// A stage's full-precision backup, verified against its manifest entry.
    fn read_backup(&self, entry: &ManifestEntry) -> Result<HashMap<String, Tensor>> {
        let object = entry.object.as_deref().unwrap_or(&entry.path);
        let bytes = self
            .ckpt
            .store()
            .get(object)?
            .with_context(|| format!("the backup {object} is missing"))?;
        entry
            .verify(&bytes)
            .map_err(|e| anyhow::anyhow!("backup {object}: {e}"))?;
        Ok(candle_core::safetensors::load_buffer(&bytes, &self.device)?)
    }

    /// Move on to the next stage of the plan.
    fn next_stage(&mut self) -> Result<()> {
        // The boundary checkpoint belongs to the stage that ends.
        self.wait_pending_save()?;
        let weights = self.full_weights()?;
        self.advance_stage(weights)
    }

    /// Enter the stage after the current one with `weights` (full precision).
    fn advance_stage(&mut self, weights: HashMap<String, Tensor>) -> Result<()> {
        self.state.stage += 1;
        self.state.backup = None;
        self.state.frozen_shared = None;
        self.state.schedule = stage_schedule(&self.cfg, &self.plan.stages[self.state.stage]);
        // Early stopping watches each stage on its own: a deeper stage's loss at its higher
        // mask fraction is not comparable with the last one's.
        self.state.best_val_loss = None;
        self.state.evals_since_best = 0;
        self.enter_stage(weights)
    }

    /// "stage 2/3: block 1 (layers 4-7) | 265600 trainable parameters | diffusion at mask
    /// fraction 0.65 | 100 steps".
    fn stage_line(&self) -> String {
        let s = self.stage();
        format!(
            "stage {}/{}: {} | {} trainable parameters | {} | {} steps",
            self.state.stage + 1,
            self.plan.stages.len(),
            s.name,
            self.params.count(),
            match s.eval_fraction() {
                Some(f) => format!("{:?} at mask fraction {f:.2}", s.objective),
                None => format!("{:?}", s.objective),
            }
            .to_lowercase(),
            s.steps
        )
    }

    /// The current stage.
    pub fn stage(&self) -> &StagePlan {
        &self.plan.stages[self.state.stage]
    }

    /// Frozen tensors of the current stage.
    pub fn frozen(&self) -> &FrozenSet {
        &self.frozen
    }

    fn masking(&self, fractions: Vec<f64>) -> Option<Masking> {
        let stage = self.stage();
        stage.objective.is_masked().then(|| Masking {
            objective: stage.objective,
            mask_id: self.mask_id.unwrap_or(0),
            vocab: self.tok.vocab_size() as u32 - u32::from(self.mask_id.is_some()),
            fractions,
            seed: self.cfg.run.seed,
        })
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

    fn emit(&mut self, e: TrainEvent) {
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

    pub fn run_store(&self) -> &Store {
        &self.run
    }

    fn micro_batches(&mut self) -> Result<Vec<Batch>> {
        let t = &self.cfg.training;
        let n = self.train.num_samples(self.seq_len, self.packed);
        let start = self.state.cursor;
        let idx = self.state.cursor.take(
            t.batch_size * t.grad_accum,
            n,
            self.cfg.run.seed,
            &mut self.order,
        );
        let rows: Vec<_> = idx
            .iter()
            .map(|&i| {
                self.train
                    .sample(i, self.seq_len, self.packed, self.pad_id, self.all_tokens)
            })
            .collect();
        // This rank's slice of each global micro-batch.
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mine = rank_rows(t.batch_size, world, rank);
        let masking = self.masking(self.stage().mask_fractions.clone());
        // Mask salt per row: the step (a new mask every step), or with static masks the
        // sample's mask seed in this stage (its epoch modulo `mask_seeds`).
        let salts: Vec<u64> = match t.mask_seeds {
            None => vec![self.state.step; idx.len()],
            Some(seeds) => (0..idx.len() as u64)
                .map(|r| {
                    let epoch = start.epoch + (start.index + r) / n as u64;
                    ((self.state.stage as u64) << 32) | (epoch % seeds)
                })
                .collect(),
        };
        let mut out = Vec::new();
        for ((c, keys), salts) in rows
            .chunks(t.batch_size)
            .zip(idx.chunks(t.batch_size))
            .zip(salts.chunks(t.batch_size))
        {
            let mut b = match &masking {
                Some(m) => {
                    let keys: Vec<u64> = keys[mine.clone()].iter().map(|&k| k as u64).collect();
                    Batch::masked_salted(
                        &c[mine.clone()],
                        &keys,
                        &salts[mine.clone()],
                        m,
                        &self.device,
                    )?
                }
                None => Batch::from_rows(&c[mine.clone()], &self.device)?,
            };
            if let Some(cache) = &mut self.act_cache {
                let names: Vec<String> = keys[mine.clone()]
                    .iter()
                    .zip(&salts[mine.clone()])
                    .map(|(k, s)| format!("{s:016x}-{k}"))
                    .collect();
                let layer = cache.layer;
                let model = &self.model;
                let x = cache.inputs(
                    &b.input,
                    &names,
                    |ids| model.prefix(ids, layer),
                    &self.device,
                )?;
                b.prefix = Some((x, layer));
            }
            out.push(b);
        }
        Ok(out)
    }

    /// One optimizer step (see `step::train_step`), then EMA and bookkeeping.
    fn train_step(&mut self, lr: f64) -> Result<StepStats> {
        let batches = self.micro_batches()?;
        let vote = self
            .stop_request
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst));
        let stats = step::train_step_voting(
            &self.model,
            &self.params,
            &mut self.opt,
            &batches,
            self.cfg.training.grad_clip,
            lr,
            self.comm.as_mut(),
            vote,
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
        Ok(stats)
    }

    /// Mean loss on the validation split (first `eval_batches` batches), with the EMA
    /// weights when enabled. The batches are shared out across ranks. Masked objectives are
    /// evaluated at the stage's mean mask fraction with fixed masks, and also report the
    /// masked-token accuracy.
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        self.evaluate_at(self.stage().eval_fraction().into_iter().collect())
    }

    /// `evaluate` with each validation sequence masked at one of `fractions` (chosen per
    /// sequence, the same on every call).
    fn evaluate_at(&mut self, fractions: Vec<f64>) -> Result<Option<f64>> {
        let n = self.val.num_samples(self.seq_len, self.packed);
        if n == 0 {
            return Ok(None);
        }
        let t = &self.cfg.training;
        let count = n.min(t.eval_batches * t.batch_size);
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
        let (mut sum, mut weight, mut hits, mut predicted) = (0f64, 0f64, 0f64, 0f64);
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let all: Vec<usize> = (0..count).collect();
        for chunk in all.chunks(t.batch_size).skip(rank).step_by(world) {
            let rows: Vec<_> = chunk
                .iter()
                .map(|&i| {
                    self.val
                        .sample(i, self.seq_len, self.packed, self.pad_id, self.all_tokens)
                })
                .collect();
            let b = match &masking {
                Some(m) => {
                    let keys: Vec<u64> = chunk.iter().map(|&k| k as u64).collect();
                    Batch::masked(&rows, &keys, u64::MAX, m, &self.device)?
                }
                None => Batch::from_rows(&rows, &self.device)?,
            };
            let (s, h) = nll_and_hits(&self.model, &b)?;
            sum += s;
            weight += b.weight()?;
            hits += h as f64;
            predicted += b.predicted() as f64;
        }
        if let Some(raw) = raw {
            self.params.load(&raw.into_iter().collect())?;
        }
        if world > 1 {
            let mut b = [sum as f32, weight as f32, hits as f32, predicted as f32];
            self.comm.all_reduce_sum(&mut b)?;
            (sum, weight, hits, predicted) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
        }
        self.last_val_accuracy = (masking.is_some() && predicted > 0.0).then(|| hits / predicted);
        Ok((weight > 0.0).then(|| sum / weight))
    }

    /// Masked-token accuracy of the last evaluation (masked objectives).
    pub fn last_val_accuracy(&self) -> Option<f64> {
        self.last_val_accuracy
    }

    /// Stage a checkpoint in memory and upload it on a background thread while training
    /// goes on (DESIGN §6): the step stalls only for the serialization. One upload at a time;
    /// the checkpoint counts (and is reported) once its manifest is written.
    fn save_checkpoint(&mut self) -> Result<String> {
        if !self.is_leader() {
            let name = stackwise_common::checkpoint::step_dir(self.state.step);
            self.last_checkpoint = Some(name.clone());
            return Ok(name);
        }
        self.wait_pending_save()?;
        let staged = Instant::now();
        // The trainable weights, and a config.json for exactly the active layers. The frozen
        // tensors (as they are used, dequantized) do not change during a stage: they are
        // written once per stage as a shared `frozen.safetensors` that each checkpoint of the
        // stage references in its manifest (`stackwise ckpt export` makes a standalone folder).
        let weights = self.params.snapshot();
        let mut refs: Vec<_> = self.state.backup.iter().cloned().collect();
        let mut frozen_upload: Option<(String, Bytes)> = None;
        if !self.frozen.plain.is_empty() || !self.frozen.stored.is_empty() {
            match &self.state.frozen_shared {
                Some(entry) => refs.push(entry.clone()),
                None => {
                    let object = format!("frozen/stage-{:02}/frozen.safetensors", self.state.stage);
                    let bytes = hf::params_to_safetensors(&self.frozen.tensors()?)?;
                    frozen_upload = Some((object, Bytes::from(bytes)));
                }
            }
        }
        let mut model_cfg = self.model.cfg.clone();
        model_cfg.n_layers = self.model.active_layers();
        let mut files: Vec<(String, Bytes)> = vec![
            (
                "model.safetensors".into(),
                Bytes::from(hf::params_to_safetensors(&weights)?),
            ),
            (
                "config.json".into(),
                Bytes::from(serde_json::to_vec_pretty(&model_cfg.to_hf_json())?),
            ),
            ("tokenizer.json".into(), Bytes::from(self.tok.to_json()?)),
            (
                "optimizer.safetensors".into(),
                Bytes::from(hf::params_to_safetensors(&self.opt.state_tensors())?),
            ),
            (
                "trainer_state.json".into(),
                Bytes::from(serde_json::to_vec_pretty(&self.state)?),
            ),
        ];
        if let Some(ema) = &self.ema {
            files.push((
                "ema.safetensors".into(),
                Bytes::from(hf::params_to_safetensors(&ema.shadow)?),
            ));
        }
        let meta = CheckpointMeta {
            val_loss: self.state.last_val_loss,
            stage: Some(format!("{}: {}", self.state.stage, self.stage().name)),
        };
        let step = self.state.step;
        let name = stackwise_common::checkpoint::step_dir(step);
        let (ckpt, keep) = (self.ckpt.clone(), self.cfg.training.keep_last);
        let handle = std::thread::Builder::new()
            .name(format!("upload-{name}"))
            .spawn(move || -> Result<SavedCheckpoint> {
                // The shared frozen tensors are committed before any manifest names them.
                let frozen = match frozen_upload {
                    Some((object, bytes)) => {
                        let entry = ckpt.put_shared(&object, "frozen.safetensors", bytes)?;
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
                Ok(SavedCheckpoint { name, frozen })
            })
            .context("start the checkpoint upload thread")?;
        self.stall_seconds += staged.elapsed().as_secs_f64();
        tracing::debug!(checkpoint = %name, stall_ms = staged.elapsed().as_millis() as u64, "staged; uploading in the background");
        self.pending_save = Some((step, handle));
        Ok(name)
    }

    /// Wait for the background upload, if any; report the committed checkpoint.
    pub fn wait_pending_save(&mut self) -> Result<()> {
        let Some((step, handle)) = self.pending_save.take() else {
            return Ok(());
        };
        let name = match handle.join() {
            Ok(Ok(saved)) => {
                if saved.frozen.is_some() {
                    self.state.frozen_shared = saved.frozen;
                }
                saved.name
            }
            Ok(Err(e)) => {
                return Err(e.context(format!(
                    "checkpoint at step {step} could not be written to {}; the last complete checkpoint is {}",
                    self.run.uri(),
                    self.last_checkpoint.as_deref().unwrap_or("none")
                )));
            }
            Err(panic) => std::panic::resume_unwind(panic),
        };
        self.last_checkpoint = Some(name.clone());
        let uri = format!("{}/checkpoints/{name}", self.run.uri());
        self.emit(TrainEvent::Checkpoint { step, name, uri });
        Ok(())
    }

    /// Seconds the training loop spent staging checkpoints (the stall the upload costs).
    pub fn checkpoint_stall_seconds(&self) -> f64 {
        self.stall_seconds
    }

    /// Train until `training.steps` (or `until_step`, or early stopping).
    pub fn run(&mut self, opts: &RunOptions) -> Result<TrainSummary> {
        let t = self.cfg.training.clone();
        let total = self.plan.total_steps();
        let stop_at = opts.until_step.unwrap_or(total).min(total);
        let leader = self.is_leader();
        let mut rep = Reporter::new(
            &self.run,
            total,
            self.state.step,
            opts.progress && leader,
            leader,
        );
        let trainable = self.params.count();
        rep.line(&format!(
            "run {} | rank {}/{} | {} trainable parameters | {} stage(s) | {} train / {} validation tokens | {} samples of {} tokens{} | from step {}",
            self.run.uri(),
            self.comm.rank(),
            self.comm.world_size(),
            trainable,
            self.plan.stages.len(),
            self.train.tokens.len(),
            self.val.tokens.len(),
            self.train.num_samples(self.seq_len, self.packed),
            self.seq_len,
            if self.packed { " (packed)" } else { "" },
            self.state.step
        ));
        if self.state.stage > 0 && self.state.step == self.plan.stage_start(self.state.stage) {
            // Resumed at the checkpoint that ended the stage before.
            rep.line(&self.stage_line());
        }
        let started = Instant::now();
        let (mut window_tokens, mut window_start) = (0usize, Instant::now());
        let mut last_loss = None;
        let mut total_tokens = 0usize;
        let mut stop_requested = false;
        while self.state.step < stop_at && !self.state.stopped_early && !stop_requested {
            if self
                .abort
                .as_ref()
                .is_some_and(|a| a.load(Ordering::SeqCst))
            {
                return Err(Aborted.into());
            }
            if self.state.step == self.plan.stage_end(self.state.stage)
                && self.state.stage + 1 < self.plan.stages.len()
            {
                self.next_stage()?;
                rep.line(&self.stage_line());
            }
            if t.eval_every > 0
                && self.plan.stages.len() > 1
                && self.state.step == self.plan.stage_start(self.state.stage)
            {
                // Where the stage starts from: its objective (mask fraction) on the model
                // before its first step.
                if let Some(v) = self.evaluate()? {
                    let mut rec = json!({
                        "step": self.state.step, "stage": self.state.stage, "stage_start": true,
                        "val_loss": v,
                    });
                    if let Some(acc) = self.last_val_accuracy {
                        rec["val_masked_accuracy"] = acc.into();
                    }
                    rep.record(&rec);
                    if leader {
                        rep.line(&format!(
                            "stage {} starts at val {v:.4}{}",
                            self.state.stage + 1,
                            self.last_val_accuracy
                                .map_or(String::new(), |a| format!(" masked acc {a:.3}"))
                        ));
                    }
                }
            }
            let stage_end = self.plan.stage_end(self.state.stage);
            let lr = self
                .state
                .schedule
                .at(self.state.step - self.plan.stage_start(self.state.stage));
            let stats = self.train_step(lr)?;
            if stats.stop {
                stop_requested = true;
            }
            window_tokens += stats.tokens;
            total_tokens += stats.tokens;
            last_loss = Some(stats.loss);
            let step = self.state.step;

            let mut val = None;
            if t.eval_every > 0 && (step.is_multiple_of(t.eval_every) || step == stage_end) {
                val = self.evaluate()?;
                self.after_eval(val);
            }
            // Early stopping ends a stage that is not the last one, not the run: the step
            // count jumps to the stage's end, where the next stage starts.
            let ended_early =
                self.state.stopped_early && self.state.stage + 1 < self.plan.stages.len();
            if ended_early {
                self.state.stopped_early = false;
                self.state.step = stage_end;
                if leader {
                    rep.line(&format!(
                        "stage {} stops early at step {step}: no better validation loss in {} evaluations; stage {} starts",
                        self.state.stage + 1,
                        self.state.evals_since_best,
                        self.state.stage + 2
                    ));
                }
            }
            if t.eval_every > 0 && (step == stage_end || ended_early) {
                self.record_stage_result(step, ended_early, leader, &mut rep)?;
            }
            // Stage boundaries are checkpoints.
            if (t.checkpoint_every > 0 && step.is_multiple_of(t.checkpoint_every))
                || step == stop_at
                || step == stage_end
                || ended_early
                || self.state.stopped_early
                || stop_requested
            {
                self.save_checkpoint()?;
            }
            if self
                .pending_save
                .as_ref()
                .is_some_and(|(_, h)| h.is_finished())
            {
                self.wait_pending_save()?;
            }

            // Diagnostics only below this line.
            let tokens_per_s =
                window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
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
            }));
            if step.is_multiple_of(t.log_every.max(1)) || val.is_some() || step == stop_at {
                let mut rec = json!({
                    "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                    "tokens_per_s": tokens_per_s, "tokens_seen": self.state.tokens_seen, "skipped": stats.skipped,
                    "peak_rss_bytes": peak_rss_bytes(),
                });
                rec["stage"] = self.state.stage.into();
                let mut line = format!(
                    "step {step:>6}/{total}{} | loss {:.4} | lr {lr:.2e} | gnorm {:.3} | {tokens_per_s:.0} tok/s | peak mem {:.0} MiB",
                    if self.plan.stages.len() > 1 {
                        format!(" (stage {})", self.state.stage + 1)
                    } else {
                        String::new()
                    },
                    stats.loss,
                    stats.grad_norm,
                    peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
                );
                if let Some(v) = val {
                    rec["val_loss"] = v.into();
                    rec["val_ppl"] = v.exp().into();
                    match self.last_val_accuracy {
                        Some(acc) => {
                            rec["val_masked_accuracy"] = acc.into();
                            line.push_str(&format!(" | val {v:.4} masked acc {:.3}", acc));
                        }
                        None => line.push_str(&format!(" | val {v:.4} ppl {:.2}", v.exp())),
                    }
                }
                rep.record(&rec);
                if leader && (!rep.is_bar() || val.is_some()) {
                    rep.line(&line);
                }
                window_tokens = 0;
                window_start = Instant::now();
            }
            rep.progress(
                step,
                format!("loss {:.4} {tokens_per_s:.0} tok/s", stats.loss),
            );
        }
        self.wait_pending_save()?;
        rep.finish();
        if stop_requested {
            rep.line(&format!(
                "stopped on request at step {} with checkpoint {}; continue with --resume",
                self.state.step,
                self.last_checkpoint.as_deref().unwrap_or("-")
            ));
        }
        if self.state.stopped_early {
            rep.line(&format!(
                "early stopping at step {}: no better validation loss in {} evaluations",
                self.state.step, self.state.evals_since_best
            ));
        }
        let plan_done = self.state.step >= total || self.state.stopped_early;
        if leader && plan_done && self.state.stage_results.len() > 1 {
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
        Ok(TrainSummary {
            run_dir: self.run.uri().to_string(),
            step: self.state.step,
            train_loss: last_loss,
            val_loss: self.state.last_val_loss,
            best_val_loss: self.state.best_val_loss,
            last_checkpoint: self.last_checkpoint.clone(),
            tokens_per_s: total_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            stopped_early: self.state.stopped_early,
            stopped_on_request: stop_requested,
        })
    }

    /// At the end of a stage of a multi-stage masked plan: the validation masked loss at the
    /// plan's reference fractions, on which every stage's result compares (logged, kept in
    /// the trainer state and metrics.jsonl as `stage_end`).
    fn record_stage_result(
        &mut self,
        step: u64,
        stopped_early: bool,
        leader: bool,
        rep: &mut Reporter,
    ) -> Result<()> {
        let fractions = self.plan.reference_mask_fractions();
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
        if leader {
            let before = self.state.stage_results.last().map_or(String::new(), |r| {
                format!("; stage {} ended at {:.4}", r.stage + 1, r.val_loss)
            });
            rep.line(&format!(
                "stage {} ends: validation masked loss {v:.4}{} at the plan's fractions {:.2}-{:.2}{before}",
                self.state.stage + 1,
                result
                    .val_masked_accuracy
                    .map_or(String::new(), |a| format!(" (masked acc {a:.3})")),
                fractions[0],
                fractions[fractions.len() - 1],
            ));
        }
        // A resumed stage end (the checkpoint was written before a crash) replaces its entry.
        self.state.stage_results.retain(|r| r.stage != result.stage);
        self.state.stage_results.push(result);
        Ok(())
    }

    fn after_eval(&mut self, val: Option<f64>) {
        let Some(v) = val else { return };
        self.state.last_val_loss = Some(v);
        if self.state.best_val_loss.is_none_or(|b| v < b) {
            self.state.best_val_loss = Some(v);
            self.state.evals_since_best = 0;
        } else {
            self.state.evals_since_best += 1;
            if let Some(p) = self.cfg.training.patience
                && self.state.evals_since_best >= p
            {
                self.state.stopped_early = true;
            }
        }
    }
}
