//! PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`, as
//! `PeftModel.save_pretrained` writes them), LoRA and BOFT: read the config and the tensors,
//! apply them to a base model's tensors (LoRA unmerged; BOFT merged, see `PeftAdapter::apply`),
//! or merge them into its weights.
//!
//! PEFT's key `base_model.model.<module>.lora_A.weight` is our `<module>.lora_A.weight`
//! (HF parameter names, so no rename table beyond the prefix). `target_modules` is a suffix
//! match, so on GPT-2 `c_proj` adapts both `attn.c_proj` and `mlp.c_proj`. The update is
//! `scale * B A` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`); for
//! GPT-2's `Conv1D`, whose weight is `[in, out]` (`fan_in_fan_out`), it is added transposed.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use stackwise_common::config::{Family, ModelConfig, default_targets};
use stackwise_common::plan::{BoftSpec, LoraSpec};

use super::boft;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// `dir/adapter_config.json`, parsed.
fn read_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("read {} (a PEFT adapter folder has one)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// The fields of a LoRA `adapter_config.json` StackWise reads (others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct LoraConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
}

/// PEFT writes `target_modules` as a list of suffixes or one regular expression.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    #[default]
    None,
    List(Vec<String>),
    Regex(String),
}

impl LoraConfig {
    /// The factor applied to `B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether the linear `module` is adapted (PEFT's suffix match).
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::List(list) => list
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::None | TargetModules::Regex(_) => false,
        }
    }
}

/// A LoRA adapter read from a PEFT folder: its config and factors by our parameter names.
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// `<module>.lora_A.weight (r, in)` and `<module>.lora_B.weight (out, r)`.
    pub factors: HashMap<String, Tensor>,
}

impl LoraAdapter {
    /// Read `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_config(dir, read_config(dir)?, device)
    }

    /// The adapter of `dir` whose `adapter_config.json` is `raw`.
    fn from_config(dir: &Path, raw: serde_json::Value, device: &Device) -> Result<Self> {
        let path = dir.join(CONFIG);
        let shown = path.display();
        let peft_type = raw.get("peft_type").and_then(|t| t.as_str()).unwrap_or("");
        if peft_type != "LORA" {
            bail!(
                "{shown}: peft_type {peft_type:?} is not a LoRA adapter (PeftAdapter::load reads LORA and BOFT)"
            );
        }
        let config: LoraConfig =
            serde_json::from_value(raw).with_context(|| format!("parse {shown}"))?;
        if config.r == 0 {
            bail!("{shown}: r is 0; a LoRA adapter has rank >= 1");
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            bail!("{shown}: per-module rank_pattern / alpha_pattern are not supported yet");
        }
        if config.bias.as_deref().is_some_and(|b| b != "none") {
            bail!(
                "{shown}: bias {:?}: only bias \"none\" is supported",
                config.bias
            );
        }
        if let TargetModules::Regex(r) = &config.target_modules {
            bail!(
                "{shown}: target_modules as a regular expression ({r:?}) is not supported; list the module names"
            );
        }
        let weights = dir.join(WEIGHTS);
        let raw = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("read {}", weights.display()))?;
        let mut factors = HashMap::new();
        for (key, t) in raw {
            let name = key
                .strip_prefix(PREFIX)
                .unwrap_or(&key)
                .replace(".default.", ".");
            let Some(module) = name
                .strip_suffix(".lora_A.weight")
                .or_else(|| name.strip_suffix(".lora_B.weight"))
            else {
                bail!(
                    "{}: {key} is not a LoRA factor (lora_A / lora_B)",
                    weights.display()
                );
            };
            if !config.targets(module) {
                bail!(
                    "{}: {key} adapts {module}, which target_modules {:?} does not name",
                    weights.display(),
                    config.target_modules
                );
            }
            factors.insert(name, t);
        }
        if factors.is_empty() {
            bail!("{}: no LoRA factors", weights.display());
        }
        Ok(Self { config, factors })
    }

    /// The adapted modules (names without `.weight`), sorted.
    pub fn modules(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .factors
            .keys()
            .filter_map(|k| k.strip_suffix(".lora_A.weight").map(str::to_string))
            .collect();
        m.sort();
        m
    }

    /// Check the factors against the base model's tensors: every adapted module exists, and
    /// `A (r, in)`, `B (out, r)` fit its weight.
    fn check(&self, base: &HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        for module in self.modules() {
            let w = base.get(&format!("{module}.weight")).with_context(|| {
                format!("the adapter adapts {module}, which the base model does not have")
            })?;
            let (a, b) = (self.factor(&module, "A")?, self.factor(&module, "B")?);
            let (rows, cols) = w.dims2()?;
            let (d_out, d_in) = if conv1d(cfg) {
                (cols, rows)
            } else {
                (rows, cols)
            };
            if a.dims() != [self.config.r, d_in] || b.dims() != [d_out, self.config.r] {
                bail!(
                    "{module}: lora_A {:?} and lora_B {:?} do not fit its weight {:?} with r = {}",
                    a.dims(),
                    b.dims(),
                    w.dims(),
                    self.config.r
                );
            }
        }
        Ok(())
    }

    fn factor(&self, module: &str, which: &str) -> Result<&Tensor> {
        self.factors
            .get(&format!("{module}.lora_{which}.weight"))
            .with_context(|| format!("{module}: lora_{which} is missing"))
    }

    /// Add the factors to `base` (unmerged: the model computes `base(x) + scale (x A^T) B^T`)
    /// and record their scale in `cfg`.
    pub fn apply(&self, base: &mut HashMap<String, Tensor>, cfg: &mut ModelConfig) -> Result<()> {
        self.check(base, cfg)?;
        base.extend(self.factors.iter().map(|(k, v)| (k.clone(), v.clone())));
        cfg.lora_scale = Some(self.config.scale());
        Ok(())
    }

    /// Merge the adapter into `base`'s weights: `W += scale * B A` (transposed for `Conv1D`).
    pub fn merge(&self, base: &mut HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        self.add_delta(base, cfg, 1.0)
    }

    /// Undo `merge`: `W -= scale * B A` (transposed for `Conv1D`).
    pub fn unmerge(&self, merged: &mut HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        self.add_delta(merged, cfg, -1.0)
    }

    /// `W += sign * scale * B A` (transposed for `Conv1D`) for every adapted module.
    fn add_delta(
        &self,
        w: &mut HashMap<String, Tensor>,
        cfg: &ModelConfig,
        sign: f64,
    ) -> Result<()> {
        self.check(w, cfg)?;
        let scale = sign * self.config.scale();
        for module in self.modules() {
            let delta = (self
                .factor(&module, "B")?
                .matmul(self.factor(&module, "A")?)?
                * scale)?;
            let delta = if conv1d(cfg) { delta.t()? } else { delta };
            let key = format!("{module}.weight");
            let updated = (&w[&key] + delta.to_dtype(w[&key].dtype())?)?;
            w.insert(key, updated);
        }
        Ok(())
    }

    /// The adapter a run trained: `spec`'s options and the `*.lora_[AB].weight` tensors of
    /// `trained` (other tensors are ignored).
    pub fn from_trained<'a>(
        spec: &LoraSpec,
        cfg: &ModelConfig,
        trained: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    ) -> Self {
        let targets = if spec.targets.is_empty() {
            default_targets(cfg.family)
        } else {
            spec.targets.clone()
        };
        let config = LoraConfig {
            peft_type: "LORA".into(),
            r: spec.rank,
            lora_alpha: spec.alpha,
            lora_dropout: spec.dropout,
            use_rslora: spec.rslora,
            fan_in_fan_out: conv1d(cfg),
            target_modules: TargetModules::List(targets),
            bias: None,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
        };
        let factors = trained
            .into_iter()
            .filter(|(k, _)| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Self { config, factors }
    }

    /// Take the LoRA factors (`*.lora_[AB].weight`) out of a checkpoint's `weights`, whose
    /// `config.json` gave their scale: the adapter they form, if any.
    pub fn take_from(
        weights: &mut HashMap<String, Tensor>,
        cfg: &ModelConfig,
    ) -> Result<Option<Self>> {
        let names: Vec<String> = weights
            .keys()
            .filter(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
            .cloned()
            .collect();
        let Some(first_a) = names.iter().find(|k| k.ends_with(".lora_A.weight")) else {
            return Ok(None);
        };
        let scale = cfg
            .lora_scale
            .context("the weights have LoRA factors but config.json has no lora_scale")?;
        let rank = weights[first_a].dim(0)?;
        let factors: HashMap<String, Tensor> = names
            .iter()
            .map(|k| (k.clone(), weights.remove(k).expect("listed")))
            .collect();
        let spec = LoraSpec::new(rank, scale * rank as f64);
        Ok(Some(Self::from_trained(&spec, cfg, &factors)))
    }

    /// `adapter_config.json` and `adapter_model.safetensors` as PEFT writes them (keys
    /// `base_model.model.<module>.lora_A.weight`), which `PeftModel.from_pretrained` loads.
    /// `base`: the base model's path, recorded as `base_model_name_or_path`.
    pub fn files(
        &self,
        cfg: &ModelConfig,
        base: Option<&str>,
    ) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let c = &self.config;
        let targets = match &c.target_modules {
            TargetModules::List(l) => l.clone(),
            _ => Vec::new(),
        };
        let base_model_class = base_model_class(cfg);
        let config = serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.r, "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout, "use_rslora": c.use_rslora, "fan_in_fan_out": c.fan_in_fan_out,
            "target_modules": targets, "bias": "none", "base_model_name_or_path": base,
            "inference_mode": true, "init_lora_weights": true, "modules_to_save": null,
            "rank_pattern": {}, "alpha_pattern": {},
            "auto_mapping": {"base_model_class": base_model_class},
        });
        let tensors: BTreeMap<String, Tensor> = self
            .factors
            .iter()
            .map(|(k, t)| {
                Ok((
                    format!("{PREFIX}{k}"),
                    t.to_dtype(candle_core::DType::F32)?.contiguous()?,
                ))
            })
            .collect::<Result<_>>()?;
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(vec![
            (CONFIG, serde_json::to_vec_pretty(&config)?),
            (
                WEIGHTS,
                safetensors::tensor::serialize(&tensors, Some(meta))?,
            ),
        ])
    }

    /// Write the folder `files` describes to `dir`.
    pub fn save(&self, dir: &Path, cfg: &ModelConfig, base: Option<&str>) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for (name, bytes) in self.files(cfg, base)? {
            let path = dir.join(name);
            std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    }
}

/// transformers' class of a family's causal LM (PEFT's `auto_mapping`).
fn base_model_class(cfg: &ModelConfig) -> &'static str {
    match cfg.family {
        Family::Gpt2 => "GPT2LMHeadModel",
        Family::Llama => "LlamaForCausalLM",
    }
}

/// GPT-2's projections are `Conv1D`s: weights `[in, out]`.
fn conv1d(cfg: &ModelConfig) -> bool {
    cfg.family == Family::Gpt2
}

/// A PEFT adapter folder of either kind.
pub enum PeftAdapter {
    Lora(LoraAdapter),
    Boft(BoftAdapter),
}

impl PeftAdapter {
    /// Read `dir`, LoRA or BOFT by its `peft_type`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let raw = read_config(dir)?;
        match raw.get("peft_type").and_then(|t| t.as_str()) {
            Some("LORA") => Ok(Self::Lora(LoraAdapter::from_config(dir, raw, device)?)),
            Some("BOFT") => Ok(Self::Boft(BoftAdapter::from_config(dir, &raw, device)?)),
            other => bail!(
                "{}: peft_type {other:?}; StackWise reads LORA and BOFT adapters",
                dir.join(CONFIG).display()
            ),
        }
    }

    /// Apply the adapter to `base`: LoRA unmerged (the model computes `base(x) + scale x A^T
    /// B^T`); BOFT merged into the weights, which computes the same outputs (unmerged BOFT,
    /// for training it or serving several adapters on one base, is not built yet).
    pub fn apply(&self, base: &mut HashMap<String, Tensor>, cfg: &mut ModelConfig) -> Result<()> {
        match self {
            Self::Lora(a) => a.apply(base, cfg),
            Self::Boft(a) => a.merge(base, cfg),
        }
    }

    /// Merge the adapter into `base`'s weights.
    pub fn merge(&self, base: &mut HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        match self {
            Self::Lora(a) => a.merge(base, cfg),
            Self::Boft(a) => a.merge(base, cfg),
        }
    }

    /// Undo `merge` on merged weights.
    pub fn unmerge(&self, merged: &mut HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        match self {
            Self::Lora(a) => a.unmerge(merged, cfg),
            Self::Boft(a) => a.unmerge(merged, cfg),
        }
    }

    /// "lora" or "boft", and a one-line description.
    pub fn describe(&self) -> (&'static str, String) {
        match self {
            Self::Lora(a) => (
                "lora",
                format!(
                    "r {} alpha {} (scale {:.4})",
                    a.config.r,
                    a.config.lora_alpha,
                    a.config.scale()
                ),
            ),
            Self::Boft(a) => (
                "boft",
                format!(
                    "{} butterfly factor(s) of {}x{} blocks",
                    a.factors, a.block_size, a.block_size
                ),
            ),
        }
    }

    /// The adapted modules, sorted, and the adapter's parameter count.
    pub fn modules_and_parameters(&self) -> (Vec<String>, usize) {
        match self {
            Self::Lora(a) => (
                a.modules(),
                a.factors.values().map(|t| t.elem_count()).sum(),
            ),
            Self::Boft(a) => {
                let mut m: Vec<String> = a.params.keys().cloned().collect();
                m.sort();
                let n = a
                    .params
                    .values()
                    .map(|(r, s)| r.elem_count() + s.elem_count())
                    .sum();
                (m, n)
            }
        }
    }
}

/// A BOFT adapter: per adapted Linear, `boft_R [N, block_num, b, b]` (`block_num` = its input
/// features / b) and `boft_s [out, 1]`.
pub struct BoftAdapter {
    /// Butterfly factors and block size, from `boft_R`'s shape (the same for every module).
    pub factors: usize,
    pub block_size: usize,
    pub dropout: f64,
    pub params: HashMap<String, (Tensor, Tensor)>,
}

impl BoftAdapter {
    /// Read `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_config(dir, &read_config(dir)?, device)
    }

    /// The adapter of `dir` whose `adapter_config.json` is `raw`.
    fn from_config(dir: &Path, raw: &serde_json::Value, device: &Device) -> Result<Self> {
        let dropout = raw
            .get("boft_dropout")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        let weights = dir.join(WEIGHTS);
        let tensors = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("read {}", weights.display()))?;
        let mut params: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (key, t) in tensors {
            let name = key
                .strip_prefix(PREFIX)
                .unwrap_or(&key)
                .replace(".default", "");
            if let Some(m) = name.strip_suffix(".boft_R") {
                params.entry(m.to_string()).or_default().0 = Some(t);
            } else if let Some(m) = name.strip_suffix(".boft_s") {
                params.entry(m.to_string()).or_default().1 = Some(t);
            } else {
                bail!(
                    "{}: {key} is not a BOFT parameter (boft_R / boft_s)",
                    weights.display()
                );
            }
        }
        let mut out = HashMap::new();
        let mut shape = None;
        for (module, (r, s)) in params {
            let (Some(r), Some(s)) = (r, s) else {
                bail!(
                    "{}: {module} needs both boft_R and boft_s",
                    weights.display()
                );
            };
            let (n, blocks, b, b2) = r.dims4().with_context(|| format!("{module}.boft_R"))?;
            if b != b2 || shape.is_some_and(|sh| sh != (n, b)) {
                bail!(
                    "{module}.boft_R has shape {:?}; every module needs [N, blocks, b, b] with the same N and b",
                    r.dims()
                );
            }
            if n > 1 && (b % 2 != 0 || blocks % (1 << (n - 1)) != 0) {
                bail!(
                    "{module}.boft_R {:?}: {n} butterfly factors need an even block size and a block count divisible by 2^{}",
                    r.dims(),
                    n - 1
                );
            }
            shape = Some((n, b));
            out.insert(module, (r, s));
        }
        let Some((factors, block_size)) = shape else {
            bail!("{}: no BOFT parameters", weights.display());
        };
        Ok(Self {
            factors,
            block_size,
            dropout,
            params: out,
        })
    }

    /// The adapter a run trained: the `*.boft_R` / `*.boft_s` tensors of `trained`.
    pub fn from_trained<'a>(
        spec: &BoftSpec,
        trained: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    ) -> Result<Self> {
        let mut params: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (k, t) in trained {
            if let Some(m) = k.strip_suffix(".boft_R") {
                params.entry(m.to_string()).or_default().0 = Some(t.clone());
            } else if let Some(m) = k.strip_suffix(".boft_s") {
                params.entry(m.to_string()).or_default().1 = Some(t.clone());
            }
        }
        let params = params
            .into_iter()
            .map(|(m, rs)| match rs {
                (Some(r), Some(s)) => Ok((m, (r, s))),
                _ => bail!("{m}: a BOFT adapter needs both boft_R and boft_s"),
            })
            .collect::<Result<HashMap<_, _>>>()?;
        let block_size = match params.values().next() {
            Some((r, _)) => r.dim(2)?,
            None => spec.block_size,
        };
        Ok(Self {
            factors: spec.factors.max(1),
            block_size,
            dropout: spec.dropout,
            params,
        })
    }

    /// `adapter_config.json` (PEFT's `BOFTConfig`) and `adapter_model.safetensors` (keys
    /// `base_model.model.<module>.boft_R` / `.boft_s`). PEFT loads it on `nn.Linear` models;
    /// GPT-2's `Conv1D` has no PEFT BOFT, so there only StackWise reads it (and `adapter merge`).
    pub fn files(
        &self,
        spec: &BoftSpec,
        cfg: &ModelConfig,
        base: Option<&str>,
    ) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let targets = if spec.targets.is_empty() {
            default_targets(cfg.family)
        } else {
            spec.targets.clone()
        };
        let config = serde_json::json!({
            "peft_type": "BOFT", "task_type": "CAUSAL_LM", "boft_block_size": spec.block_size,
            "boft_block_num": spec.block_num, "boft_n_butterfly_factor": self.factors,
            "boft_dropout": self.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": false, "init_weights": true, "inference_mode": true,
            "modules_to_save": null, "base_model_name_or_path": base,
            "auto_mapping": {"base_model_class": base_model_class(cfg)},
        });
        let mut tensors = BTreeMap::new();
        for (m, (r, s)) in &self.params {
            tensors.insert(
                format!("{PREFIX}{m}.boft_R"),
                r.to_dtype(candle_core::DType::F32)?.contiguous()?,
            );
            tensors.insert(
                format!("{PREFIX}{m}.boft_s"),
                s.to_dtype(candle_core::DType::F32)?.contiguous()?,
            );
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        Ok(vec![
            (CONFIG, serde_json::to_vec_pretty(&config)?),
            (
                WEIGHTS,
                safetensors::tensor::serialize(&tensors, Some(meta))?,
            ),
        ])
    }

    /// `W' = diag(s) W Q^T` for every adapted `nn.Linear`; for GPT-2's `Conv1D` weights
    /// `[in, out]` the same map, `W' = Q W diag(s)`.
    pub fn merge(&self, base: &mut HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        for (module, (r, s)) in &self.params {
            let key = format!("{module}.weight");
            let w = base.get(&key).with_context(|| {
                format!("the adapter adapts {module}, which the base model does not have")
            })?;
            let (rows, cols) = w.dims2()?;
            let (out, inp) = if conv1d(cfg) {
                (cols, rows)
            } else {
                (rows, cols)
            };
            if r.dim(1)? * self.block_size != inp || s.dims() != [out, 1] {
                bail!(
                    "{module}: boft_R {:?} / boft_s {:?} do not fit its weight {:?}",
                    r.dims(),
                    s.dims(),
                    w.dims()
                );
            }
            let merged = super::Boft::new(r.clone(), s.clone())?.apply(w, conv1d(cfg))?;
            base.insert(key, merged);
        }
        Ok(())
    }

    /// Undo `merge`: `W = diag(1/s) W' Q` (Q is orthogonal; `Q^T W' diag(1/s)` for `Conv1D`).
    pub fn unmerge(&self, merged: &mut HashMap<String, Tensor>, cfg: &ModelConfig) -> Result<()> {
        for (module, (r, s)) in &self.params {
            let key = format!("{module}.weight");
            let w = merged
                .get(&key)
                .with_context(|| format!("the merged model has no {key}"))?;
            let q = boft::rotation(r)?;
            let s = s.to_dtype(w.dtype())?;
            let base = if conv1d(cfg) {
                q.t()?.matmul(&w.broadcast_div(&s.t()?)?)?
            } else {
                w.broadcast_div(&s)?.matmul(&q)?
            };
            merged.insert(key, base);
        }
        Ok(())
    }
}
