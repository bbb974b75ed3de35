//! Model configuration: the native YAML `model:` section and Hugging Face `config.json`
//! (GPT-2 and LLaMA families) resolved into one validated [`ModelConfig`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which checkpoint-key layout the model uses. The family fixes parameter *names*; the
/// options below (norm, MLP, positions, …) can be mixed freely within a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `transformer.h.{i}.attn.c_attn` … (HF `GPT2LMHeadModel`, Conv1D weights `[in, out]`).
    Gpt2,
    /// `model.layers.{i}.self_attn.q_proj` … (HF `LlamaForCausalLM`, Linear weights `[out, in]`).
    Llama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionMode {
    Causal,
    Bidirectional,
}

/// The attention mechanism. `softmax` is MHA (or GQA with fewer kv heads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    #[default]
    Softmax,
    /// Multi-head latent attention (DeepSeek-V2): keys and values from a low-rank latent,
    /// with a decoupled rotary part shared by the heads.
    Mla,
    /// Linear (kernel) attention (Katharopoulos et al. 2020): `phi(q) (phi(k)^T v)` with
    /// `phi = elu + 1`, normalised by `phi(q) sum(phi(k))`.
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    Learned,
    Rope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// tanh approximation (`gelu_new` in transformers).
    Gelu,
    /// exact erf GELU (`gelu` in transformers).
    GeluErf,
    Relu,
    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    Swiglu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

/// Resolved, validated model configuration used by the model code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    /// Longest sequence the model accepts (learned position table size, RoPE limit).
    pub seq_len: usize,
    pub attention_mode: AttentionMode,
    #[serde(default)]
    pub attention: AttentionKind,
    /// MLA: rank of the key/value latent.
    #[serde(default)]
    pub mla_kv_rank: usize,
    /// MLA: dimension of the decoupled rotary part of queries and keys.
    #[serde(default)]
    pub mla_rope_dim: usize,
    pub positions: Positions,
    pub rope_theta: f64,
    pub activation: Activation,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    pub parallel_residual: bool,
    /// Biases on the attention and MLP projections.
    pub bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// The mask token of a model trained with a masked objective (the diffusion sampler
    /// starts from it).
    #[serde(default)]
    pub mask_token_id: Option<u32>,
    /// `alpha / r` of the LoRA adapters a checkpoint carries.
    #[serde(default)]
    pub lora_scale: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("model.{field}: {msg}")]
    Invalid { field: &'static str, msg: String },
    #[error(
        "config.json: unsupported model_type {0:?}; StackWise loads gpt2 and llama-style models (llama, mistral, qwen2)"
    )]
    UnsupportedModelType(String),
    #[error("config.json: missing field {0:?}")]
    Missing(&'static str),
    #[error("read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("in {path}")]
    In {
        path: String,
        #[source]
        source: Box<ConfigError>,
    },
}

fn invalid(field: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        msg: msg.into(),
    }
}

/// The `model:` section of a StackWise YAML config, before defaults and validation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelConfig {
    /// `gpt2` (default) or `llama`: key layout plus that family's default options.
    pub family: Option<Family>,
    pub d_model: Option<usize>,
    pub n_layers: Option<usize>,
    pub n_heads: Option<usize>,
    pub n_kv_heads: Option<usize>,
    pub d_ff: Option<usize>,
    /// Taken from the tokenizer when absent.
    pub vocab_size: Option<usize>,
    pub seq_len: Option<usize>,
    pub attention_mode: Option<AttentionMode>,
    /// `mha`, `gqa` (with `n_kv_heads`), `mla` or `kernel`.
    pub attention_type: Option<String>,
    /// MLA: rank of the key/value latent (default d_model / 4).
    pub mla_kv_rank: Option<usize>,
    /// MLA: rotary dimension of queries and keys (default head_dim / 2, even).
    pub mla_rope_dim: Option<usize>,
    pub positions: Option<Positions>,
    pub rope_theta: Option<f64>,
    pub activation: Option<Activation>,
    pub norm: Option<NormKind>,
    pub norm_eps: Option<f64>,
    pub tie_embeddings: Option<bool>,
    pub parallel_residual: Option<bool>,
    pub bias: Option<bool>,
}

impl RawModelConfig {
    /// Apply family defaults and validate. `vocab_from_tokenizer` fills a missing `vocab_size`.
    pub fn resolve(&self, vocab_from_tokenizer: Option<usize>) -> Result<ModelConfig, ConfigError> {
        let family = self.family.unwrap_or(Family::Gpt2);
        let gpt2 = family == Family::Gpt2;
        let d_model = self.d_model.unwrap_or(256);
        let n_heads = self.n_heads.unwrap_or(4);
        let attention = match self.attention_type.as_deref() {
            Some("mla") => AttentionKind::Mla,
            Some("kernel") | Some("linear") => AttentionKind::Kernel,
            _ => AttentionKind::Softmax,
        };
        let n_kv_heads = match (self.attention_type.as_deref(), self.n_kv_heads) {
            (Some("mla"), Some(k)) if k != n_heads => {
                return Err(invalid(
                    "n_kv_heads",
                    "MLA shares one latent across all heads; leave n_kv_heads unset",
                ));
            }
            (Some("mla"), _) => n_heads,
            (Some("kernel") | Some("linear"), k) => k.unwrap_or(n_heads),
            (None | Some("mha"), None) => n_heads,
            (Some("mha"), Some(k)) if k != n_heads => {
                return Err(invalid(
                    "n_kv_heads",
                    format!(
                        "attention_type mha needs n_kv_heads = n_heads ({n_heads}), got {k}; use attention_type: gqa"
                    ),
                ));
            }
            (Some("gqa"), None) => {
                return Err(invalid(
                    "n_kv_heads",
                    "attention_type gqa needs n_kv_heads (a divisor of n_heads)",
                ));
            }
            (None | Some("mha") | Some("gqa"), Some(k)) => k,
            (Some(other), _) => {
                return Err(invalid(
                    "attention_type",
                    format!("{other:?} is not an attention type; use mha, gqa, mla or kernel"),
                ));
            }
        };
        let vocab_size = match self.vocab_size.or(vocab_from_tokenizer) {
            Some(v) => v,
            None => {
                return Err(invalid(
                    "vocab_size",
                    "not set and no tokenizer to take it from; set model.vocab_size",
                ));
            }
        };
        let d_ff = self
            .d_ff
            .unwrap_or(if self.activation == Some(Activation::Swiglu) || !gpt2 {
                // LLaMA keeps the parameter count of a 4x GELU MLP: 2/3 * 4d, rounded up to 64.
                (8 * d_model / 3).div_ceil(64) * 64
            } else {
                4 * d_model
            });
        let cfg = ModelConfig {
            family,
            vocab_size,
            d_model,
            n_layers: self.n_layers.unwrap_or(4),
            n_heads,
            n_kv_heads,
            head_dim: d_model.checked_div(n_heads).unwrap_or(0),
            d_ff,
            seq_len: self.seq_len.unwrap_or(256),
            attention_mode: self.attention_mode.unwrap_or(AttentionMode::Causal),
            attention,
            mla_kv_rank: match attention {
                AttentionKind::Mla => self.mla_kv_rank.unwrap_or((d_model / 4).max(8)),
                _ => 0,
            },
            mla_rope_dim: match attention {
                AttentionKind::Mla => self
                    .mla_rope_dim
                    .unwrap_or((d_model.checked_div(n_heads).unwrap_or(0) / 2).max(2) & !1),
                _ => 0,
            },
            positions: self.positions.unwrap_or(if gpt2 {
                Positions::Learned
            } else {
                Positions::Rope
            }),
            rope_theta: self.rope_theta.unwrap_or(10_000.0),
            activation: self.activation.unwrap_or(if gpt2 {
                Activation::Gelu
            } else {
                Activation::Swiglu
            }),
            norm: self.norm.unwrap_or(if gpt2 {
                NormKind::LayerNorm
            } else {
                NormKind::RmsNorm
            }),
            norm_eps: self.norm_eps.unwrap_or(if gpt2 { 1e-5 } else { 1e-6 }),
            tie_embeddings: self.tie_embeddings.unwrap_or(gpt2),
            parallel_residual: self.parallel_residual.unwrap_or(false),
            bias: self.bias.unwrap_or(gpt2),
            bos_token_id: None,
            eos_token_id: None,
            mask_token_id: None,
            lora_scale: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl ModelConfig {
    /// The `config.json` of a Hugging Face model folder.
    pub fn read_hf_dir(dir: &std::path::Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown.clone(),
            source,
        })?;
        Self::from_hf_json(&v).map_err(|e| ConfigError::In {
            path: shown,
            source: Box::new(e),
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("d_ff", self.d_ff),
            ("vocab_size", self.vocab_size),
            ("seq_len", self.seq_len),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.head_dim * self.n_heads != self.d_model && self.family == Family::Gpt2 {
            let suggestion = (1..=self.d_model)
                .filter(|h| self.d_model.is_multiple_of(*h))
                .min_by_key(|&h| (h.abs_diff(self.n_heads), std::cmp::Reverse(h)))
                .unwrap_or(1);
            return Err(invalid(
                "n_heads",
                format!(
                    "n_heads ({}) must divide d_model ({}); try n_heads = {suggestion}",
                    self.n_heads, self.d_model
                ),
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(invalid(
                "n_kv_heads",
                format!(
                    "n_kv_heads ({}) must divide n_heads ({}); try n_kv_heads = 1 or {}",
                    self.n_kv_heads, self.n_heads, self.n_heads
                ),
            ));
        }
        if self.positions == Positions::Rope && !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "positions",
                format!(
                    "rotary positions need an even head_dim, got {}",
                    self.head_dim
                ),
            ));
        }
        if self.attention == AttentionKind::Mla
            && (self.mla_kv_rank == 0
                || self.mla_rope_dim == 0
                || !self.mla_rope_dim.is_multiple_of(2))
        {
            return Err(invalid(
                "mla_rope_dim",
                format!(
                    "MLA needs mla_kv_rank >= 1 and an even mla_rope_dim >= 2 (got {} and {})",
                    self.mla_kv_rank, self.mla_rope_dim
                ),
            ));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(invalid("norm_eps", "must be > 0, e.g. 1e-5"));
        }
        Ok(())
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Parse a Hugging Face `config.json` (transformers 4.x or 5.x) of a GPT-2 or LLaMA-style model.
    pub fn from_hf_json(v: &Value) -> Result<Self, ConfigError> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let u = |k: &'static str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let f = |k: &'static str| v.get(k).and_then(Value::as_f64);
        let b = |k: &'static str| v.get(k).and_then(Value::as_bool);
        let req = |k: &'static str| u(k).ok_or(ConfigError::Missing(k));
        let token = |k: &'static str| match v.get(k) {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
            _ => None,
        };
        // StackWise-only options (bidirectional attention, parallel residual, …) ride along.
        let sw = v.get("stackwise");
        let sw_get = |k: &str| sw.and_then(|s| s.get(k)).cloned();
        let attention_mode = sw_get("attention_mode")
            .and_then(|x| serde_json::from_value(x).ok())
            .unwrap_or(AttentionMode::Causal);
        let cfg = match model_type {
            "gpt2" => {
                let d_model = req("n_embd")?;
                let n_heads = req("n_head")?;
                let activation = match v.get("activation_function").and_then(Value::as_str) {
                    None | Some("gelu_new") | Some("gelu_pytorch_tanh") | Some("gelu_fast") => {
                        Activation::Gelu
                    }
                    Some("gelu") => Activation::GeluErf,
                    Some("relu") => Activation::Relu,
                    Some(other) => {
                        return Err(invalid(
                            "activation",
                            format!("activation_function {other:?} is not supported"),
                        ));
                    }
                };
                if b("scale_attn_by_inverse_layer_idx") == Some(true) {
                    return Err(invalid(
                        "attention",
                        "scale_attn_by_inverse_layer_idx is not supported",
                    ));
                }
                ModelConfig {
                    family: Family::Gpt2,
                    vocab_size: req("vocab_size")?,
                    d_model,
                    n_layers: req("n_layer")?,
                    n_heads,
                    n_kv_heads: sw_get("n_kv_heads")
                        .and_then(|x| x.as_u64())
                        .map_or(n_heads, |x| x as usize),
                    head_dim: d_model / n_heads.max(1),
                    d_ff: u("n_inner").unwrap_or(4 * d_model),
                    seq_len: u("n_positions").or(u("n_ctx")).unwrap_or(1024),
                    attention_mode,
                    attention: AttentionKind::Softmax,
                    mla_kv_rank: 0,
                    mla_rope_dim: 0,
                    positions: Positions::Learned,
                    rope_theta: 10_000.0,
                    activation,
                    norm: NormKind::LayerNorm,
                    norm_eps: f("layer_norm_epsilon").unwrap_or(1e-5),
                    tie_embeddings: b("tie_word_embeddings").unwrap_or(true),
                    parallel_residual: false,
                    bias: true,
                    bos_token_id: token("bos_token_id"),
                    eos_token_id: token("eos_token_id"),
                    mask_token_id: None,
                    lora_scale: None,
                }
            }
            "llama" | "mistral" | "qwen2" => {
                let d_model = req("hidden_size")?;
                let n_heads = req("num_attention_heads")?;
                let rope_theta = v
                    .get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
                    .or(f("rope_theta"))
                    .unwrap_or(10_000.0);
                let scaling = v.get("rope_scaling").filter(|s| !s.is_null()).or_else(|| {
                    v.get("rope_parameters")
                        .and_then(|r| r.get("rope_type"))
                        .filter(|t| t.as_str() != Some("default"))
                });
                if let Some(s) = scaling {
                    return Err(invalid(
                        "positions",
                        format!("rope scaling {s} is not supported"),
                    ));
                }
                let act = v
                    .get("hidden_act")
                    .and_then(Value::as_str)
                    .unwrap_or("silu");
                if act != "silu" {
                    return Err(invalid(
                        "activation",
                        format!("hidden_act {act:?} is not supported (silu only)"),
                    ));
                }
                let attention_bias = b("attention_bias").unwrap_or(model_type == "qwen2");
                if attention_bias != b("mlp_bias").unwrap_or(false) && model_type != "qwen2" {
                    return Err(invalid("bias", "attention_bias and mlp_bias must agree"));
                }
                if model_type == "qwen2" {
                    return Err(invalid(
                        "bias",
                        "qwen2 (q/k/v bias without o bias) is not supported yet",
                    ));
                }
                ModelConfig {
                    family: Family::Llama,
                    vocab_size: req("vocab_size")?,
                    d_model,
                    n_layers: req("num_hidden_layers")?,
                    n_heads,
                    n_kv_heads: u("num_key_value_heads").unwrap_or(n_heads),
                    head_dim: u("head_dim").unwrap_or(d_model / n_heads.max(1)),
                    d_ff: req("intermediate_size")?,
                    seq_len: u("max_position_embeddings").unwrap_or(2048),
                    attention_mode,
                    attention: AttentionKind::Softmax,
                    mla_kv_rank: 0,
                    mla_rope_dim: 0,
                    positions: Positions::Rope,
                    rope_theta,
                    activation: Activation::Swiglu,
                    norm: NormKind::RmsNorm,
                    norm_eps: f("rms_norm_eps").unwrap_or(1e-6),
                    tie_embeddings: b("tie_word_embeddings").unwrap_or(false),
                    parallel_residual: false,
                    bias: attention_bias,
                    bos_token_id: token("bos_token_id"),
                    eos_token_id: token("eos_token_id"),
                    mask_token_id: None,
                    lora_scale: None,
                }
            }
            other => return Err(ConfigError::UnsupportedModelType(other.to_string())),
        };
        let cfg = match sw {
            // A StackWise-written config.json records every option exactly.
            Some(s) if s.get("family").is_some() => {
                serde_json::from_value::<ModelConfig>(s.clone())
                    .map_err(|e| invalid("stackwise", e.to_string()))?
            }
            _ => cfg,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// A Hugging Face `config.json` for this model. Options transformers has no field for
    /// are kept under `"stackwise"` so a StackWise reload is exact.
    pub fn to_hf_json(&self) -> Value {
        let mut v = match self.family {
            Family::Gpt2 => serde_json::json!({
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": self.vocab_size,
                "n_embd": self.d_model,
                "n_layer": self.n_layers,
                "n_head": self.n_heads,
                "n_inner": self.d_ff,
                "n_positions": self.seq_len,
                "n_ctx": self.seq_len,
                "activation_function": match self.activation {
                    Activation::GeluErf => "gelu",
                    Activation::Relu => "relu",
                    _ => "gelu_new",
                },
                "layer_norm_epsilon": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            }),
            Family::Llama => serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab_size,
                "hidden_size": self.d_model,
                "intermediate_size": self.d_ff,
                "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads,
                "head_dim": self.head_dim,
                "max_position_embeddings": self.seq_len,
                "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta,
                "hidden_act": "silu",
                "attention_bias": self.bias,
                "mlp_bias": self.bias,
                "tie_word_embeddings": self.tie_embeddings,
            }),
        };
        if let Some(id) = self.bos_token_id {
            v["bos_token_id"] = id.into();
        }
        if let Some(id) = self.eos_token_id {
            v["eos_token_id"] = id.into();
        }
        v["torch_dtype"] = "float32".into();
        v["stackwise"] = serde_json::to_value(self).expect("ModelConfig serializes");
        v
    }

    /// True when transformers would build exactly this model from `to_hf_json` alone.
    pub fn is_hf_compatible(&self) -> bool {
        let common = self.attention_mode == AttentionMode::Causal
            && !self.parallel_residual
            && self.attention == AttentionKind::Softmax;
        match self.family {
            Family::Gpt2 => {
                common
                    && self.positions == Positions::Learned
                    && self.norm == NormKind::LayerNorm
                    && self.bias
                    && self.n_kv_heads == self.n_heads
                    && self.activation != Activation::Swiglu
            }
            Family::Llama => {
                common
                    && self.positions == Positions::Rope
                    && self.norm == NormKind::RmsNorm
                    && self.activation == Activation::Swiglu
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_heads_must_divide_d_model_and_the_error_suggests_a_fix() {
        let raw = RawModelConfig {
            d_model: Some(512),
            n_heads: Some(6),
            vocab_size: Some(100),
            ..Default::default()
        };
        let err = raw.resolve(None).unwrap_err().to_string();
        assert!(
            err.contains("n_heads (6) must divide d_model (512); try n_heads = 8"),
            "{err}"
        );
    }

    #[test]
    fn gqa_needs_a_divisor() {
        let raw = RawModelConfig {
            family: Some(Family::Llama),
            d_model: Some(64),
            n_heads: Some(4),
            n_kv_heads: Some(3),
            vocab_size: Some(100),
            ..Default::default()
        };
        let err = raw.resolve(None).unwrap_err().to_string();
        assert!(err.starts_with("model.n_kv_heads"), "{err}");
    }

    #[test]
    fn vocab_comes_from_the_tokenizer() {
        let cfg = RawModelConfig::default().resolve(Some(321)).unwrap();
        assert_eq!(cfg.vocab_size, 321);
        assert!(RawModelConfig::default().resolve(None).is_err());
    }

    #[test]
    fn hf_json_round_trips_with_stackwise_options() {
        let raw = RawModelConfig {
            family: Some(Family::Llama),
            d_model: Some(64),
            n_heads: Some(4),
            n_kv_heads: Some(2),
            attention_mode: Some(AttentionMode::Bidirectional),
            vocab_size: Some(99),
            ..Default::default()
        };
        let cfg = raw.resolve(None).unwrap();
        let back = ModelConfig::from_hf_json(&cfg.to_hf_json()).unwrap();
        assert_eq!(cfg, back);
        assert!(!cfg.is_hf_compatible());
    }

    #[test]
    fn llama_rope_theta_from_4x_and_5x_layouts() {
        let base = serde_json::json!({"model_type":"llama","hidden_size":64,"num_attention_heads":4,
            "num_hidden_layers":2,"intermediate_size":128,"vocab_size":256});
        let mut v4 = base.clone();
        v4["rope_theta"] = 500000.0.into();
        assert_eq!(ModelConfig::from_hf_json(&v4).unwrap().rope_theta, 500000.0);
        let mut v5 = base.clone();
        v5["rope_parameters"] = serde_json::json!({"rope_theta": 1234.0, "rope_type": "default"});
        assert_eq!(ModelConfig::from_hf_json(&v5).unwrap().rope_theta, 1234.0);
    }
}
