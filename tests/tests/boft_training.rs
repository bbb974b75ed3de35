//! Trainable (unmerged) BOFT against PEFT (`fixtures/llama-tiny-boft`, 3 real butterfly
//! factors of 4x4 blocks): the logits with the adapter computed on the fly, the gradients of
//! `boft_R` and `boft_s`, and 3 AdamW steps on them with the base frozen; and the original
//! butterfly's 2x2 Givens stages as BOFT with block size 2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{max_abs, st};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use stackwise_common::config::{ModelConfig, Precision};
use stackwise_common::plan::BoftSpec;
use stackwise_worker::adapters::{Boft, PeftAdapter};
use stackwise_worker::golden;
use stackwise_worker::models::params::StagePolicy;
use stackwise_worker::models::{ParamBuilder, Transformer, hf};
use stackwise_worker::objectives::{Batch, mean_loss};
use stackwise_worker::optim::AdamW;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-tiny-boft")
}

fn policy(factors: usize, block_size: usize, targets: &[&str]) -> StagePolicy {
    StagePolicy {
        trainable_layers: Vec::new(),
        train_embeddings: false,
        train_head: false,
        precision: Precision::Fp32,
        lora: None,
        boft: Some(BoftSpec {
            block_size,
            block_num: 0,
            factors,
            dropout: 0.0,
            targets: targets.iter().map(|t| t.to_string()).collect(),
        }),
    }
}

#[test]
fn trainable_boft_gives_peft_logits_gradients_and_three_adamw_steps() -> Result<()> {
    let dir = fixture();
    let cfg = ModelConfig::read_hf_dir(&dir)?;
    let mut tensors = hf::normalize_keys(&cfg, hf::read_safetensors_dir(&dir, &Device::Cpu)?);
    let before = tensors.clone();
    let PeftAdapter::Boft(adapter) = PeftAdapter::load(&dir, &Device::Cpu)? else {
        panic!("a BOFT folder")
    };
    for (module, (r, s)) in &adapter.params {
        tensors.insert(format!("{module}.boft_R"), r.clone());
        tensors.insert(format!("{module}.boft_s"), s.clone());
    }
    let mut p = ParamBuilder::for_stage(
        tensors,
        0,
        policy(3, 4, &["q_proj", "v_proj", "down_proj"]),
        &Device::Cpu,
    );
    let model = Transformer::build(&cfg, &mut p, &Device::Cpu)?;
    let (params, frozen, unused) = p.finish_stage();
    assert!(unused.is_empty(), "unused tensors: {unused:?}");
    assert_eq!(
        params.vars.len(),
        2 * adapter.params.len(),
        "only BOFT trains"
    );

    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input_ids.json"))?)?;
    let logits = model.forward(&Tensor::new(ids.clone(), &Device::Cpu)?, 0, None)?;
    let d = max_abs(&logits, &st(&dir.join("logits.safetensors"))["logits"]);
    assert!(d <= 2e-5, "unmerged BOFT logits: max |diff| {d}");

    let rows: Vec<(Vec<u32>, Vec<f32>)> = ids
        .iter()
        .map(|r| (r.clone(), vec![1.0; r.len()]))
        .collect();
    let batch = Batch::from_rows(&rows, &Device::Cpu)?;
    let peft_key = |name: &str| format!("base_model.model.{name}");
    let grads = mean_loss(&model, &batch)?.backward()?;
    let want = st(&dir.join("grads_step0.safetensors"));
    for (name, var) in &params.vars {
        let key = peft_key(&format!("{name}.default"));
        let got = grads.get(var.as_tensor()).context("no gradient")?;
        let d = max_abs(got, want.get(&key).with_context(|| format!("no {key}"))?);
        assert!(d <= 1e-5, "grad {name}: max |diff| {d}");
    }

    let mut opt = AdamW::new(&params.vars, golden::FIXTURE_ADAMW)?;
    for _ in 0..3 {
        let g = mean_loss(&model, &batch)?.backward()?;
        let named = params.grads(&g);
        opt.step(&named, 1e-3)?;
    }
    let want = st(&dir.join("adapter_after_3_steps/adapter_model.safetensors"));
    for (name, var) in &params.vars {
        let d = max_abs(var.as_tensor(), &want[&peft_key(name)]);
        assert!(d <= 1e-5, "{name} after 3 steps: max |diff| {d}");
    }
    for (name, t) in frozen.tensors()? {
        assert_eq!(max_abs(&t, &before[&name]), 0.0, "{name} moved");
    }
    Ok(())
}

#[test]
fn the_original_butterfly_is_boft_with_2x2_blocks_orthogonal_with_its_parameter_count() -> Result<()>
{
    // The original: `stages` stages of 2x2 Givens rotations on d features, stage s pairing
    // (i, i + 2^s) in blocks of 2^(s+1). As BOFT: block size 2, `stages` factors.
    let (d, stages) = (64usize, 6usize);
    let r =
        (Tensor::randn(0f32, 0.5, (stages, d / 2, 2, 2), &Device::Cpu)?).to_dtype(DType::F32)?;
    let boft = Boft::new(r.clone(), Tensor::ones((d, 1), DType::F32, &Device::Cpu)?)?;
    let q = boft.rotation()?;
    let eye = Tensor::eye(d, DType::F32, &Device::Cpu)?;
    assert!(max_abs(&q.t()?.matmul(&q)?, &eye) < 1e-5, "Q is orthogonal");
    // Six stages mix all 64 features: no entry of Q is structurally zero.
    let zeros = q
        .abs()?
        .lt(1e-12)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert_eq!(zeros, 0.0, "every feature reaches every other");
    // One angle a pair a stage: the skew part of each 2x2 block has one free entry.
    assert_eq!(r.elem_count(), stages * (d / 2) * 4);
    assert_eq!(stages * d / 2, 192, "the original's parameter count");
    // Stage 0 alone pairs neighbours: (0, 1) rotate together, 0 and 2 do not meet.
    let one = Boft::new(
        r.narrow(0, 0, 1)?,
        Tensor::ones((d, 1), DType::F32, &Device::Cpu)?,
    )?;
    let q0 = one.rotation()?.to_vec2::<f32>()?;
    assert!(q0[0][1].abs() > 1e-3 && q0[0][2] == 0.0);
    // And the same rotation as the merge path (f64 Cayley) computes.
    let merged_path = stackwise_worker::adapters::boft::rotation(&r)?;
    assert!(max_abs(&q, &merged_path) < 1e-5);
    Ok(())
}

#[test]
fn boft_on_gpt2_conv1d_merges_as_it_trains_and_unmerges_to_the_base() -> Result<()> {
    use stackwise_worker::adapters::BoftAdapter;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpt2-tiny");
    let cfg = ModelConfig::read_hf_dir(&dir)?;
    let base = hf::normalize_keys(&cfg, hf::read_safetensors_dir(&dir, &Device::Cpu)?);
    let module = "transformer.h.0.mlp.c_fc"; // Conv1D [64, 256]
    let r = Tensor::randn(0f32, 0.3, (2, 16, 4, 4), &Device::Cpu)?;
    let s = (Tensor::randn(0f32, 0.1, (256, 1), &Device::Cpu)? + 1.0)?;
    let adapter = BoftAdapter {
        factors: 2,
        block_size: 4,
        dropout: 0.0,
        params: HashMap::from([(module.to_string(), (r.clone(), s.clone()))]),
    };
    let mut w = base.clone();
    adapter.merge(&mut w, &cfg)?;
    let key = format!("{module}.weight");
    // Merged = what the trainable layer computes: Q W diag(s) in the [in, out] layout,
    // i.e. the nn.Linear map diag(s) W^T Q^T transposed.
    let q = stackwise_worker::adapters::boft::rotation(&r)?;
    let want = stackwise_worker::adapters::boft::merge(&base[&key].t()?, &q, &s)?.t()?;
    assert!(max_abs(&w[&key], &want) < 1e-5);
    assert!(
        max_abs(&w[&key], &base[&key]) > 1e-2,
        "the adapter changes the weight"
    );
    adapter.unmerge(&mut w, &cfg)?;
    assert!(
        max_abs(&w[&key], &base[&key]) <= 1e-6,
        "merge -> unmerge restores the base"
    );
    Ok(())
}
