//! Comparison with the PyTorch / transformers reference fixtures (`tests/fixtures/*`, made by
//! `tests/fixtures/make_fixtures.py`): forward logits and loss, gradients at the initial weights,
//! and 3 AdamW steps, on any device and at any autocast setting. The golden tests run it on the
//! CPU at float32 tolerances; `stackwise selfcheck` runs it on a GPU at the tolerances TF32 or
//! bf16 products allow, and reports every difference it measured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::models::hf;
use crate::objectives::{Batch, mean_loss};
use crate::optim::{AdamW, AdamWConfig};

/// The optimizer the fixtures' 3 training steps used: `torch.optim.AdamW(lr=1e-3, betas=(0.9,
/// 0.999), eps=1e-8, weight_decay=0.0)`.
pub const FIXTURE_ADAMW: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.0,
};

/// Largest differences a fixture may show.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerances {
    pub logits: f32,
    pub loss: f64,
    /// On gradients, as `torch.allclose` on each parameter: |difference| <= grad_abs + grad_rel *
    /// max |reference| (a gradient's scale differs between parameters by orders of magnitude).
    pub grad_abs: f32,
    pub grad_rel: f32,
    pub train_loss: f64,
    pub weights: f32,
    /// The key slice of GPT-2's `c_attn.bias`: its gradient is analytically zero, so Adam turns
    /// round-off into O(lr) moves there (fixtures README).
    pub key_bias: f32,
}

impl Tolerances {
    /// float32 on the CPU: the fixtures README's figures.
    pub fn fp32() -> Self {
        Self {
            logits: 2e-5,
            loss: 1e-5,
            grad_abs: 1e-5,
            grad_rel: 0.0,
            train_loss: 1e-4,
            weights: 5e-5,
            key_bias: 3e-3,
        }
    }

    /// float32 on a GPU: other summation orders (cuBLAS, candle's CUDA reductions), no TF32.
    pub fn gpu_fp32() -> Self {
        Self {
            logits: 1e-4,
            loss: 1e-4,
            grad_abs: 1e-5,
            grad_rel: 1e-3,
            train_loss: 2e-4,
            weights: 1e-4,
            key_bias: 3e-3,
        }
    }

    /// bf16 matrix products (8 mantissa bits, relative step 2^-8 = 3.9e-3): about 1% on logits
    /// and gradients; an Adam step moves a weight by at most lr = 1e-3 whatever the gradient's
    /// error, so after 3 steps weights may differ by up to 2 * 3 * lr.
    pub fn bf16() -> Self {
        Self {
            logits: 5e-2,
            loss: 1e-2,
            grad_abs: 1e-4,
            grad_rel: 5e-2,
            train_loss: 1e-2,
            weights: 6e-3,
            key_bias: 6e-3,
        }
    }
}

/// What one fixture showed; `failures` is empty when every difference is within tolerance.
#[derive(Debug, Clone, Serialize)]
pub struct FixtureReport {
    pub name: String,
    pub logits_max_abs: f32,
    pub loss_abs: Option<f64>,
    pub grads_max_abs: Option<f32>,
    /// The largest gradient difference relative to its parameter's max |reference|.
    pub grads_max_rel: Option<f32>,
    pub train_losses_max_abs: Option<f64>,
    pub loss_after_3_steps_abs: Option<f64>,
    pub weights_after_3_steps_max_abs: Option<f32>,
    pub failures: Vec<String>,
}

/// The model fixture folders (those holding an `expected.json` and a model's `config.json`;
/// not, e.g., `nf4-double-quant`) under `root`, sorted.
pub fn fixture_dirs(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("read fixtures folder {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").exists() && p.join("config.json").exists())
        .collect();
    dirs.sort();
    Ok(dirs)
}

fn expected(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("expected.json");
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
    )?)
}

fn input_ids(dir: &Path) -> Result<Vec<Vec<u32>>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("input_ids.json"),
    )?)?)
}

fn load_st(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).with_context(|| path.display().to_string())
}

/// max |a - b|.
fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?;
    Ok(d.to_scalar()?)
}

/// max |t|.
fn max_of(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

/// A LoRA fixture: the base model alone must give `base_logits` (the adapter is checked by the
/// adapter tests), and it has no full-model training reference.
pub fn is_lora(dir: &Path) -> bool {
    dir.join("adapter_config.json").exists()
}

/// Compare one fixture on `device` (at the process's autocast setting) with `tol`.
pub fn check_fixture(dir: &Path, device: &Device, tol: &Tolerances) -> Result<FixtureReport> {
    let name = dir
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let exp = expected(dir)?;
    let (model, params) = hf::load_model_dir(dir, device).with_context(|| name.clone())?;
    let ids = input_ids(dir)?;
    let rows: Vec<(Vec<u32>, Vec<f32>)> = ids
        .iter()
        .map(|r| (r.clone(), vec![1.0; r.len()]))
        .collect();
    let batch = Batch::from_rows(&rows, device)?;
    let mut r = FixtureReport {
        name: name.clone(),
        logits_max_abs: 0.0,
        loss_abs: None,
        grads_max_abs: None,
        grads_max_rel: None,
        train_losses_max_abs: None,
        loss_after_3_steps_abs: None,
        weights_after_3_steps_max_abs: None,
        failures: Vec::new(),
    };
    let fail = |what: String| format!("{name}: {what}");
    let mut failures = Vec::new();

    let logits = model.forward(&Tensor::new(ids.clone(), device)?, 0, None)?;
    let reference = if is_lora(dir) {
        "base_logits.safetensors"
    } else {
        "logits.safetensors"
    };
    let want = load_st(&dir.join(reference), device)?;
    r.logits_max_abs = max_abs(&logits, &want["logits"])?;
    if r.logits_max_abs > tol.logits {
        failures.push(fail(format!(
            "logits max |diff| {:.3e} > {:.0e}",
            r.logits_max_abs, tol.logits
        )));
    }
    if is_lora(dir) {
        r.failures = failures;
        return Ok(r);
    }
    let loss = mean_loss(&model, &batch)?;
    let want_loss = exp["loss"].as_f64().context("expected.json: loss")?;
    let d = (loss.to_scalar::<f32>()? as f64 - want_loss).abs();
    r.loss_abs = Some(d);
    if d > tol.loss {
        failures.push(fail(format!("loss |diff| {d:.3e} > {:.0e}", tol.loss)));
    }

    // Gradients at the initial weights.
    let grads = loss.backward()?;
    let want_grads = load_st(&dir.join("grads_step0.safetensors"), device)?;
    if want_grads.len() != params.vars.len() {
        failures.push(fail(format!(
            "{} parameters, the reference has gradients for {}",
            params.vars.len(),
            want_grads.len()
        )));
    }
    let (mut worst_abs, mut worst_rel) = (0f32, 0f32);
    for (key, want) in &want_grads {
        let var = params
            .get(key)
            .with_context(|| format!("{name}: no parameter {key}"))?;
        let got = grads
            .get(var.as_tensor())
            .with_context(|| format!("{name}: no grad for {key}"))?;
        let (d, scale) = (max_abs(got, want)?, max_of(want)?);
        let limit = tol.grad_abs + tol.grad_rel * scale;
        if d > limit {
            failures.push(fail(format!("grad {key} max |diff| {d:.3e} > {limit:.3e}")));
        }
        worst_abs = worst_abs.max(d);
        worst_rel = worst_rel.max(d / scale.max(1e-12));
    }
    r.grads_max_abs = Some(worst_abs);
    r.grads_max_rel = Some(worst_rel);

    // Three AdamW steps on the same batch.
    let mut opt = AdamW::new(&params.vars, FIXTURE_ADAMW)?;
    let want_losses: Vec<f64> = exp["train_losses"]
        .as_array()
        .context("expected.json: train_losses")?
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    let mut worst = 0f64;
    for want in &want_losses {
        let loss = mean_loss(&model, &batch)?;
        worst = worst.max((loss.to_scalar::<f32>()? as f64 - want).abs());
        let g = loss.backward()?;
        let named = params.grads(&g);
        opt.step(&named, 1e-3)?;
    }
    r.train_losses_max_abs = Some(worst);
    if worst > tol.train_loss {
        failures.push(fail(format!(
            "train losses max |diff| {worst:.3e} > {:.0e}",
            tol.train_loss
        )));
    }
    let after = mean_loss(&model, &batch)?.to_scalar::<f32>()? as f64;
    let d = (after
        - exp["loss_after_3_steps"]
            .as_f64()
            .context("loss_after_3_steps")?)
    .abs();
    r.loss_after_3_steps_abs = Some(d);
    if d > tol.train_loss {
        failures.push(fail(format!(
            "loss after 3 steps |diff| {d:.3e} > {:.0e}",
            tol.train_loss
        )));
    }

    let want_w = load_st(&dir.join("weights_after_3_steps.safetensors"), device)?;
    let n_embd = model.cfg.d_model;
    let mut worst = 0f32;
    for (key, want) in &want_w {
        let got = params
            .get(key)
            .with_context(|| format!("{name}: no parameter {key}"))?
            .as_tensor();
        if key.ends_with("attn.c_attn.bias") {
            let slice = |t: &Tensor, i: usize| t.narrow(0, i * n_embd, n_embd);
            let d_qv = max_abs(&slice(got, 0)?, &slice(want, 0)?)?
                .max(max_abs(&slice(got, 2)?, &slice(want, 2)?)?);
            let d_k = max_abs(&slice(got, 1)?, &slice(want, 1)?)?;
            if d_qv > tol.weights {
                failures.push(fail(format!(
                    "{key} (q, v) max |diff| {d_qv:.3e} > {:.0e}",
                    tol.weights
                )));
            }
            if d_k > tol.key_bias {
                failures.push(fail(format!(
                    "{key} (k) max |diff| {d_k:.3e} > {:.0e}",
                    tol.key_bias
                )));
            }
            worst = worst.max(d_qv);
            continue;
        }
        let d = max_abs(got, want)?;
        if d > tol.weights {
            failures.push(fail(format!(
                "weight {key} after 3 steps max |diff| {d:.3e} > {:.0e}",
                tol.weights
            )));
        }
        worst = worst.max(d);
    }
    r.weights_after_3_steps_max_abs = Some(worst);
    r.failures = failures;
    Ok(r)
}
