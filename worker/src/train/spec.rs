//! The run spec: a training config resolved and validated once, at start (STYLE
//! "Configuration"): the device, the dataset and tokenizer, the full model's config and
//! initial weights, the stage plan, the mask token, the sequence length and the stores.
//! Everything the trainer needs to know that does not change while it runs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use stackwise_common::checkpoint::{BaseRef, CheckpointStore, model_folder};
use stackwise_common::config::{
    DeviceSpec, ModelConfig, Objective, Precision, ScaffoldSection, TrainConfig,
    require_world_divides_batch,
};
use stackwise_common::data::dataset::fingerprint;
use stackwise_common::data::{SplitData, TokenIndex};
use stackwise_common::plan::{Plan, plan_config};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::Tok;

use crate::models::hf;

pub struct RunSpec {
    pub cfg: TrainConfig,
    pub plan: Plan,
    /// The full model's config (all layers, vocabulary with the mask token).
    pub model_cfg: ModelConfig,
    /// Weights of an `init_from` model (layers a stage has not reached yet come from here).
    pub initial: HashMap<String, Tensor>,
    /// The frozen base of an adapter run (`training.adapter`): `init_from`, referenced by
    /// path and sha256 from every checkpoint instead of copied into it.
    pub base: Option<BaseRef>,
    /// A scaffold run's scaffold model (`scaffold:`); its base is `initial` / `base`.
    pub scaffold: Option<ScaffoldRun>,
    pub device: Device,
    pub train: SplitData,
    pub val: SplitData,
    pub tok: Tok,
    /// The mask token of masked objectives.
    pub mask_id: Option<u32>,
    pub seq_len: usize,
    /// Samples are packed `seq_len` windows of the token stream (else one per document).
    pub packed: bool,
    pub pad_id: u32,
    /// The dataset's content fingerprint (`data::dataset::fingerprint`).
    pub data_fingerprint: String,
    /// The run's root (`<output>/runs/<name>`) and its checkpoints.
    pub run: Store,
    pub ckpt: CheckpointStore,
}

impl RunSpec {
    /// Resolve `cfg` for one rank of a group of `world`. `plan`: the coordinator's (none:
    /// plan it here, with the same pure planner). `fresh`: the run starts at step 0, so it
    /// must not have checkpoints already.
    pub fn resolve(
        mut cfg: TrainConfig,
        plan: Option<Plan>,
        world: usize,
        fresh: bool,
    ) -> Result<Self> {
        cfg.training.validate()?;
        require_world_divides_batch(cfg.training.batch_size, world..=world)?;
        if let Some(storage) = &mut cfg.storage {
            // A worker's secret comes from its environment (the coordinator never sends it).
            storage.resolve_secret_env();
            stackwise_common::store::configure_s3(Some(storage.clone()));
        }
        let device_spec: DeviceSpec = cfg.run.device.parse()?;
        let device = crate::device::open(device_spec)?;
        let data_store = Store::open(&cfg.data.path)?;
        let (index, mut tok) = TokenIndex::open(&data_store)?;
        let train = index.load_split(&data_store, &index.train)?;
        let val = index.load_split(&data_store, &index.validation)?;
        // prepare records the fingerprint; older prepared folders hash their tokens here.
        let data_fingerprint = match &index.fingerprint {
            Some(f) => f.clone(),
            None => fingerprint(index.vocab_size, &[&train, &val])?,
        };

        // The full model's config, and its weights when it starts from an HF folder (a
        // scaffold run's base).
        let init_from = match &cfg.scaffold {
            Some(s) => Some(model_folder(&s.base)?),
            None => cfg.init_from.clone(),
        };
        let (mut model_cfg, initial) = match &init_from {
            Some(dir) => {
                let mut model_cfg = ModelConfig::read_hf_dir(Path::new(dir))?;
                if let Some(mode) = cfg.model.attention_mode {
                    model_cfg.attention_mode = mode;
                }
                let initial = folder_weights(&model_cfg, dir, &device)
                    .with_context(|| format!("load init_from {dir}"))?;
                (model_cfg, initial)
            }
            None => (cfg.model.resolve(Some(index.vocab_size))?, HashMap::new()),
        };
        let base_precision = match (&cfg.training.adapter, &cfg.scaffold) {
            (Some(a), _) => Some(a.base_precision),
            (None, Some(s)) => Some(s.base_precision),
            (None, None) => None,
        };
        let base = match (base_precision, &init_from) {
            (Some(p), Some(dir)) => Some(BaseRef::of_dir(Path::new(dir), p)?),
            _ => None,
        };
        let scaffold = match &cfg.scaffold {
            Some(s) => Some(ScaffoldRun::open(s, &tok, &device)?),
            None => None,
        };
        let plan = match plan {
            Some(p) => p,
            None => plan_config(&cfg)?,
        };
        plan.validate()?;
        let masked = plan.stages.iter().any(|s| s.objective.is_masked());
        let mask_id = if masked {
            let id = tok.ensure_mask_token()?;
            if init_from.is_none() && cfg.model.vocab_size.is_none() {
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
        if init_from.is_none() {
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
                init_from.as_deref().unwrap_or_default(),
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
        // Token-budget batching samples whole documents of variable length.
        let budget = cfg.training.tokens_per_step.is_some();
        if budget && cfg.data.packing == Some(true) {
            bail!(
                "training.tokens_per_step samples whole documents (padding masked), not packed windows: \
                 set data.packing: false or leave it unset"
            );
        }
        let packed = !budget
            && cfg
                .data
                .packing
                .unwrap_or(plan.stages[0].objective != Objective::Sft);
        if train.num_samples(seq_len, packed) == 0 {
            bail!(
                "{}: the training split has {} tokens, fewer than one sequence of {seq_len}; lower training.seq_len or add data",
                cfg.data.path,
                train.num_tokens()
            );
        }
        let run = Store::open(&cfg.run.output)?.child(&format!("runs/{}", cfg.run.name));
        let ckpt = CheckpointStore::new(&run);
        ckpt.require_resume_if_any(!fresh, run.uri())?;
        let pad_id = tok.eos_id().unwrap_or(0);
        Ok(Self {
            cfg,
            plan,
            model_cfg,
            initial,
            base,
            scaffold,
            device,
            train,
            val,
            tok,
            mask_id,
            seq_len,
            packed,
            pad_id,
            data_fingerprint,
            run,
            ckpt,
        })
    }

    /// Training samples of `seq_len` tokens in the split.
    pub fn train_samples(&self) -> usize {
        self.train.num_samples(self.seq_len, self.packed)
    }
}

/// The weights of the model folder `dir` (config `cfg`) by the model's parameter names.
fn folder_weights(
    cfg: &ModelConfig,
    dir: &str,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let tensors = hf::read_safetensors_dir(Path::new(dir), device)?;
    let (_, params) = hf::model_from_tensors(cfg, tensors, device)?;
    Ok(params.tensors()?.into_iter().collect())
}

/// A scaffold run's scaffold: its config and frozen weights, the reference every checkpoint
/// keeps to it, and how it reads the data's prompts.
pub struct ScaffoldRun {
    pub section: ScaffoldSection,
    pub cfg: ModelConfig,
    pub weights: HashMap<String, Tensor>,
    /// Its folder (path and weights' sha256).
    pub source: BaseRef,
    /// The scaffold's own tokenizer when it differs from the data's: prompts are decoded
    /// and re-encoded with it.
    pub tokenizer: Option<Tok>,
}

impl ScaffoldRun {
    fn open(s: &ScaffoldSection, data_tok: &Tok, device: &Device) -> Result<Self> {
        let dir = model_folder(&s.scaffold)?;
        let cfg = ModelConfig::read_hf_dir(Path::new(&dir))?;
        let weights = folder_weights(&cfg, &dir, device)
            .with_context(|| format!("load the scaffold {dir}"))?;
        let own = Tok::load(Path::new(&dir))
            .with_context(|| format!("scaffold {dir}: the model folder needs its tokenizer"))?;
        let tokenizer = (own.to_json()? != data_tok.to_json()?).then_some(own);
        if tokenizer.is_some() {
            tracing::info!(
                scaffold = %dir,
                "the scaffold's tokenizer differs from the data's: prompts are re-encoded for it"
            );
        }
        Ok(Self {
            section: s.clone(),
            cfg,
            weights,
            source: BaseRef::of_dir(Path::new(&dir), Precision::Fp32)?,
            tokenizer,
        })
    }
}
