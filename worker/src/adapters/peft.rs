//! PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`, as
//! `PeftModel.save_pretrained` writes them) for LoRA: read the config and the factors, apply
//! them to a base model's tensors unmerged, or merge them into its weights.
//!
//! PEFT's key `base_model.model.<module>.lora_A.weight` is our `<module>.lora_A.weight`
//! (HF parameter names, so no rename table beyond the prefix). `target_modules` is a suffix
//! match, so on GPT-2 `c_proj` adapts both `attn.c_proj` and `mlp.c_proj`. The update is
//! `scale * B A` with `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`); for
//! GPT-2's `Conv1D`, whose weight is `[in, out]` (`fan_in_fan_out`), it is added transposed.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use stackwise_common::config::{Family, ModelConfig};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

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
        let path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (a PEFT adapter folder has one)", path.display()))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let shown = path.display();
        let peft_type = raw.get("peft_type").and_then(|t| t.as_str()).unwrap_or("");
        if peft_type != "LORA" {
            bail!(
                "{shown}: peft_type {peft_type:?}; StackWise loads LORA adapters (BOFT is not supported yet)"
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
        self.check(base, cfg)?;
        let scale = self.config.scale();
        for module in self.modules() {
            let delta = (self
                .factor(&module, "B")?
                .matmul(self.factor(&module, "A")?)?
                * scale)?;
            let delta = if conv1d(cfg) { delta.t()? } else { delta };
            let key = format!("{module}.weight");
            let w = &base[&key];
            let merged = (w + delta.to_dtype(w.dtype())?)?;
            base.insert(key, merged);
        }
        Ok(())
    }
}

/// GPT-2's projections are `Conv1D`s: weights `[in, out]`.
fn conv1d(cfg: &ModelConfig) -> bool {
    cfg.family == Family::Gpt2
}
