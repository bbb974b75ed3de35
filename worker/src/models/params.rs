//! Named parameters. Every trainable tensor is a candle `Var` stored under its Hugging Face
//! checkpoint key, so saving and loading needs no rename table.

use std::collections::{BTreeMap, HashMap};

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use stackwise_common::rng::Rng;

use super::quant::Frozen;
use stackwise_common::config::Precision;
use stackwise_common::plan::{BoftSpec, LoraSpec, StagePlan};

/// What a parameter belongs to, read from its checkpoint key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Token and position embeddings (and a tied head).
    Embeddings,
    /// Layer `i`'s weights (and its adapters).
    Layer(usize),
    /// The final norm and an untied LM head.
    Head,
}

pub fn group_of(name: &str) -> Group {
    for prefix in ["transformer.h.", "model.layers."] {
        if let Some(rest) = name.strip_prefix(prefix)
            && let Some(i) = rest.split('.').next().and_then(|i| i.parse().ok())
        {
            return Group::Layer(i);
        }
    }
    if name.contains(".wte.")
        || name.contains(".wpe.")
        || name.contains("embed_tokens")
        || name.contains("embed_positions")
    {
        Group::Embeddings
    } else {
        Group::Head
    }
}

/// Which parameters of a stage train, how frozen linears are stored, and their adapters.
#[derive(Debug, Clone)]
pub struct StagePolicy {
    pub trainable_layers: Vec<usize>,
    pub train_embeddings: bool,
    pub train_head: bool,
    pub precision: Precision,
    /// Adapters on the frozen linears it targets (PEFT's suffix match: `c_proj` matches
    /// `attn.c_proj` and `mlp.c_proj`).
    pub lora: Option<LoraSpec>,
    /// Butterfly orthogonal adapters on the frozen linears it targets.
    pub boft: Option<BoftSpec>,
}

impl StagePolicy {
    pub fn of(stage: &StagePlan) -> Self {
        Self {
            trainable_layers: stage.trainable.clone(),
            train_embeddings: stage.train_embeddings,
            train_head: stage.train_head,
            precision: stage.frozen_precision,
            lora: stage.adapters.clone(),
            boft: stage.boft.clone(),
        }
    }

    /// Nothing trains; linears stored at `precision`, no adapters.
    pub fn frozen(precision: Precision) -> Self {
        Self {
            trainable_layers: Vec::new(),
            train_embeddings: false,
            train_head: false,
            precision,
            lora: None,
            boft: None,
        }
    }

    /// Whether the linear `module` (its name without `.weight`) gets an adapter.
    pub fn targets(&self, module: &str) -> bool {
        self.lora.as_ref().is_some_and(|l| l.targets(module))
    }

    pub fn trains(&self, name: &str) -> bool {
        if name.contains(".lora_") || name.contains(".boft_") {
            return true;
        }
        match group_of(name) {
            Group::Embeddings => self.train_embeddings,
            Group::Head => self.train_head,
            Group::Layer(i) => self.trainable_layers.contains(&i),
        }
    }
}

/// A linear weight: trainable (or frozen at fp32) as a plain tensor, or frozen at a lower
/// precision and dequantized on the fly.
#[derive(Clone)]
pub enum Weight {
    Dense(Tensor),
    Frozen(Arc<Frozen>),
}

impl Weight {
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Frozen(f) => f.dense(),
        }
    }
}

/// The frozen part of a stage's model: plain tensors (norms, biases, embeddings, fp32
/// linears) and reduced-precision linears.
#[derive(Clone, Default)]
pub struct FrozenSet {
    pub plain: BTreeMap<String, Tensor>,
    pub stored: BTreeMap<String, Arc<Frozen>>,
}

impl FrozenSet {
    /// Every frozen tensor as f32 (reduced-precision ones dequantized).
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = self.plain.clone();
        for (k, f) in &self.stored {
            out.insert(k.clone(), f.dense()?);
        }
        Ok(out)
    }

    /// Number of frozen weights.
    pub fn count(&self) -> usize {
        self.plain.values().map(|t| t.elem_count()).sum::<usize>()
            + self.stored.values().map(|f| f.elem_count()).sum::<usize>()
    }

    pub fn bytes(&self) -> usize {
        self.plain
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>()
            + self.stored.values().map(|f| f.bytes()).sum::<usize>()
    }

    /// These tensors with `prefix` before each name.
    pub fn prefixed(self, prefix: &str) -> Self {
        let p = |k: String| format!("{prefix}{k}");
        Self {
            plain: self.plain.into_iter().map(|(k, v)| (p(k), v)).collect(),
            stored: self.stored.into_iter().map(|(k, v)| (p(k), v)).collect(),
        }
    }

    /// Add `other`'s tensors (names must differ).
    pub fn extend(&mut self, other: FrozenSet) {
        self.plain.extend(other.plain);
        self.stored.extend(other.stored);
    }

    /// Names of the weights stored at reduced precision.
    pub fn quantized_names(&self) -> Vec<String> {
        self.stored.keys().cloned().collect()
    }
}

/// How a parameter is initialised when it is not loaded from a checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal(f64),
    /// U(-bound, bound).
    Uniform(f64),
    Ones,
    Zeros,
}

/// Collects the model's parameters while it is built: each one is taken from `loaded` when
/// present (HF weights, a checkpoint) or created from a seeded init.
pub struct ParamBuilder {
    loaded: HashMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
    seed: u64,
    device: Device,
    /// When true every parameter must come from `loaded`.
    require_loaded: bool,
    /// A stage's freezing rules (none: everything trains).
    policy: Option<StagePolicy>,
    frozen: FrozenSet,
    /// LoRA scale of adapters found in `loaded` (inference on an adapted checkpoint).
    lora_scale: Option<f64>,
}

impl ParamBuilder {
    pub fn init(seed: u64, device: &Device) -> Self {
        Self {
            loaded: HashMap::new(),
            vars: BTreeMap::new(),
            seed,
            device: device.clone(),
            require_loaded: false,
            policy: None,
            frozen: FrozenSet::default(),
            lora_scale: None,
        }
    }

    /// Build a stage's model: tensors come from `loaded` when present (a checkpoint, the
    /// previous stage) and from the seeded init otherwise; `policy` says what trains.
    pub fn for_stage(
        loaded: HashMap<String, Tensor>,
        seed: u64,
        policy: StagePolicy,
        device: &Device,
    ) -> Self {
        let lora_scale = policy.lora.as_ref().map(|l| l.scale());
        Self {
            loaded,
            lora_scale,
            policy: Some(policy),
            ..Self::init(seed, device)
        }
    }

    /// Everything trains: tensors come from `loaded` when present, from the seeded init
    /// otherwise.
    pub fn trainable(loaded: HashMap<String, Tensor>, seed: u64, device: &Device) -> Self {
        Self {
            loaded,
            ..Self::init(seed, device)
        }
    }

    pub fn device(&self) -> Device {
        self.device.clone()
    }

    /// The scale of LoRA adapters present in the loaded tensors.
    pub fn set_lora_scale(&mut self, scale: Option<f64>) {
        self.lora_scale = scale;
    }

    fn trains(&self, name: &str) -> bool {
        self.policy.as_ref().is_none_or(|p| p.trains(name))
    }

    /// A linear weight: a trainable `Var`, or frozen (at the stage's precision).
    pub fn linear_weight(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Weight> {
        let t = self.get(name, shape, init)?;
        if self.trains(name) {
            return Ok(Weight::Dense(t));
        }
        let precision = self
            .policy
            .as_ref()
            .map_or(Precision::Fp32, |p| p.precision);
        if precision == Precision::Fp32 {
            return Ok(Weight::Dense(t));
        }
        self.frozen.plain.remove(name);
        let f = Arc::new(Frozen::new(&t, precision)?);
        self.frozen.stored.insert(name.to_string(), f.clone());
        Ok(Weight::Frozen(f))
    }

    /// LoRA factors `A (r, d_in)` and `B (d_out, r)` and their scale for the linear `name`
    /// (without `.weight`): created for a frozen linear when the stage has adapters, or taken
    /// from the loaded tensors when they hold them.
    pub fn lora(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Option<(Tensor, Tensor, f64, f64)>> {
        let (a_name, b_name) = (
            format!("{name}.lora_A.weight"),
            format!("{name}.lora_B.weight"),
        );
        let wanted = match &self.policy {
            Some(p) => p.lora.is_some() && !p.trains(&format!("{name}.weight")) && p.targets(name),
            None => false,
        };
        let present = self.loaded.contains_key(&a_name) || self.vars.contains_key(&a_name);
        if !wanted && !present {
            return Ok(None);
        }
        let rank = match (&self.policy, self.loaded.get(&a_name)) {
            (Some(policy), _) if wanted => policy.lora.as_ref().map_or(0, |l| l.rank),
            (_, Some(t)) => t.dim(0)?,
            _ => 0,
        };
        let Some(scale) = self.lora_scale else {
            candle_core::bail!(
                "{a_name}: the checkpoint has LoRA adapters but its config.json has no lora_scale"
            )
        };
        // PEFT's init: A kaiming-uniform (`a = sqrt(5)`: bound 1/sqrt(d_in)), B zero, so the
        // adapted model starts equal to the base.
        let a = self.get(
            &a_name,
            &[rank, d_in],
            Init::Uniform(1.0 / (d_in as f64).sqrt()),
        )?;
        let b = self.get(&b_name, &[d_out, rank], Init::Zeros)?;
        // Dropout is a training setting of the stage's adapters; loaded ones only evaluate.
        let dropout = match &self.policy {
            Some(p) if wanted => p.lora.as_ref().map_or(0.0, |l| l.dropout),
            _ => 0.0,
        };
        Ok(Some((a, b, scale, dropout)))
    }

    /// BOFT parameters `boft_R (N, blocks, b, b)` (zeros: the identity rotation) and `boft_s
    /// (d_out, 1)` (ones) for the linear `name`: created for a frozen linear the stage's BOFT
    /// targets, or taken from the loaded tensors when they hold them.
    pub fn boft(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Option<(Tensor, Tensor, f64)>> {
        let (r_name, s_name) = (format!("{name}.boft_R"), format!("{name}.boft_s"));
        let spec = match &self.policy {
            Some(p) if !p.trains(&format!("{name}.weight")) => {
                p.boft.as_ref().filter(|b| b.targets(name)).cloned()
            }
            _ => None,
        };
        let shape = match (&spec, self.loaded.get(&r_name), self.vars.get(&r_name)) {
            (Some(spec), _, _) => {
                let (blocks, b) = spec
                    .layout(d_in)
                    .map_err(|e| candle_core::Error::Msg(format!("BOFT on {name}: {e}")))?;
                vec![spec.factors.max(1), blocks, b, b]
            }
            (None, Some(t), _) => t.dims().to_vec(),
            (None, None, Some(v)) => v.dims().to_vec(),
            (None, None, None) => return Ok(None),
        };
        let r = self.get(&r_name, &shape, Init::Zeros)?;
        let s = self.get(&s_name, &[d_out, 1], Init::Ones)?;
        // Dropout is a training setting of the stage's adapters; loaded ones only evaluate.
        let dropout = spec.as_ref().map_or(0.0, |b| b.dropout);
        Ok(Some((r, s, dropout)))
    }

    pub fn from_tensors(loaded: HashMap<String, Tensor>, device: &Device) -> Self {
        Self {
            loaded,
            require_loaded: true,
            ..Self::init(0, device)
        }
    }

    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if let Some(v) = self.vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        if let Some(t) = self.frozen.plain.get(name) {
            return Ok(t.clone());
        }
        let t = match self.loaded.remove(name) {
            Some(t) => {
                if t.dims() != shape {
                    candle_core::bail!(
                        "parameter {name}: checkpoint has shape {:?}, the config needs {shape:?}",
                        t.dims()
                    )
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None if self.require_loaded => {
                candle_core::bail!("parameter {name} ({shape:?}) is missing from the checkpoint")
            }
            None => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Ones => vec![1.0; n],
                    Init::Zeros => vec![0.0; n],
                    Init::Normal(std) => {
                        let mut rng = Rng::derive(self.seed, name);
                        (0..n).map(|_| (rng.normal() * std) as f32).collect()
                    }
                    Init::Uniform(bound) => {
                        let mut rng = Rng::derive(self.seed, name);
                        (0..n)
                            .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                            .collect()
                    }
                };
                Tensor::from_vec(data, shape, &self.device)?
            }
        };
        if !self.trains(name) {
            let t = t.detach();
            self.frozen.plain.insert(name.to_string(), t.clone());
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }

    /// The parameters, and the names of loaded tensors the model did not use.
    pub fn finish(self) -> (Params, Vec<String>) {
        let (params, _, unused) = self.finish_stage();
        (params, unused)
    }

    /// The trainable parameters, the frozen tensors, and the unused loaded names.
    pub fn finish_stage(self) -> (Params, FrozenSet, Vec<String>) {
        let mut unused: Vec<String> = self.loaded.into_keys().collect();
        unused.sort();
        (Params { vars: self.vars }, self.frozen, unused)
    }
}

/// A model's parameters by checkpoint key, in a stable (sorted) order.
#[derive(Clone, Default)]
pub struct Params {
    pub vars: BTreeMap<String, Var>,
}

impl Params {
    /// These parameters with `prefix` before each name.
    pub fn prefixed(self, prefix: &str) -> Self {
        Self {
            vars: self
                .vars
                .into_iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v))
                .collect(),
        }
    }

    /// Add `other`'s parameters (names must differ).
    pub fn extend(&mut self, other: Params) {
        self.vars.extend(other.vars);
    }

    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// The gradients `store` holds for these parameters, by name (what `AdamW::step` takes).
    pub fn grads(&self, store: &candle_core::backprop::GradStore) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .filter_map(|(n, v)| store.get(v.as_tensor()).map(|t| (n.clone(), t.clone())))
            .collect()
    }

    /// Every parameter's current value without a copy: each tensor shares its storage with
    /// the parameter, so the next (in-place) optimizer step changes it too. Serialize it
    /// right away; use `tensors` for values that must outlive the step.
    pub fn snapshot(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// Copies of every parameter's current value.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach())))
            .collect()
    }

    /// Overwrite values from `tensors`; every parameter must be present with its shape.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let Some(t) = tensors.get(name) else {
                candle_core::bail!("parameter {name} is missing")
            };
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "parameter {name}: shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}
