//! PEFT adapter folders against the PyTorch / PEFT fixtures (made by
//! `tests/fixtures/make_fixtures.py`): LoRA on GPT-2 (`gpt2-tiny-lora`: the adapted logits, the
//! merged weights, the LoRA gradients and 3 AdamW steps on the adapter alone) and BOFT with
//! real butterfly factors on LLaMA (`llama-tiny-boft`: the adapted logits and the merged
//! weights), within the fixtures' tolerances.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{max_abs, st};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use stackwise_common::config::{ModelConfig, Precision};
use stackwise_common::plan::LoraSpec;
use stackwise_worker::adapters::{LoraAdapter, PeftAdapter};
use stackwise_worker::golden;
use stackwise_worker::models::params::StagePolicy;
use stackwise_worker::models::{ParamBuilder, Transformer, hf};
use stackwise_worker::objectives::{Batch, mean_loss};
use stackwise_worker::optim::AdamW;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/gpt2-tiny-lora")
}

/// The base model's config and tensors (by the model's names), and the input batch.
fn base() -> Result<(ModelConfig, HashMap<String, Tensor>, Tensor, Batch)> {
    let dir = fixture();
    let cfg = ModelConfig::read_hf_dir(&dir)?;
    let tensors = hf::normalize_keys(&cfg, hf::read_safetensors_dir(&dir, &Device::Cpu)?);
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input_ids.json"))?)?;
    let rows: Vec<(Vec<u32>, Vec<f32>)> = ids
        .iter()
        .map(|r| (r.clone(), vec![1.0; r.len()]))
        .collect();
    let batch = Batch::from_rows(&rows, &Device::Cpu)?;
    Ok((cfg, tensors, Tensor::new(ids, &Device::Cpu)?, batch))
}

/// PEFT's names of the saved files drop the adapter name `.default`; gradients keep it.
fn peft_key(name: &str) -> String {
    format!("base_model.model.{name}")
}

#[test]
fn an_unmerged_lora_adapter_gives_peft_logits() -> Result<()> {
    let (mut cfg, mut tensors, ids, _) = base()?;
    let adapter = LoraAdapter::load(&fixture(), &Device::Cpu)?;
    // target_modules ["c_attn", "c_proj"] is a suffix match: three modules a block.
    assert_eq!(adapter.modules().len(), 2 * 3);
    assert!(adapter.modules().iter().any(|m| m.ends_with("mlp.c_proj")));
    assert_eq!(adapter.config.scale(), 2.0);
    adapter.apply(&mut tensors, &mut cfg)?;
    let (model, _) = hf::model_from_tensors(&cfg, tensors, &Device::Cpu)?;
    let logits = model.forward(&ids, 0, None)?;
    let want = &st(&fixture().join("logits.safetensors"))["logits"];
    let d = max_abs(&logits, want);
    assert!(d <= 2e-5, "logits with the adapter: max |diff| {d}");
    // The adapter matters: the base alone is far from these logits.
    let base_logits = &st(&fixture().join("base_logits.safetensors"))["logits"];
    assert!(max_abs(&logits, base_logits) > 0.1);
    println!("adapted logits max |diff| {d:.2e}");
    Ok(())
}

#[test]
fn merging_gives_peft_merge_and_unload() -> Result<()> {
    let (cfg, mut tensors, ids, _) = base()?;
    let adapter = LoraAdapter::load(&fixture(), &Device::Cpu)?;
    adapter.merge(&mut tensors, &cfg)?;
    let want = st(&fixture().join("merged_model.safetensors"));
    for (key, w) in &want {
        let got = tensors
            .get(key)
            .with_context(|| format!("merged model has no {key}"))?;
        let d = max_abs(got, w);
        assert!(d <= 1e-5, "merged {key}: max |diff| {d}");
    }
    let (merged, _) = hf::model_from_tensors(&cfg, tensors, &Device::Cpu)?;
    let want_logits = &st(&fixture().join("logits.safetensors"))["logits"];
    let d = max_abs(&merged.forward(&ids, 0, None)?, want_logits);
    assert!(d <= 2e-5, "merged logits: max |diff| {d}");
    Ok(())
}

#[test]
fn lora_gradients_and_three_adamw_steps_match_peft_with_the_base_frozen() -> Result<()> {
    let (mut cfg, mut tensors, _, batch) = base()?;
    let adapter = LoraAdapter::load(&fixture(), &Device::Cpu)?;
    let before = tensors.clone();
    adapter.apply(&mut tensors, &mut cfg)?;
    // Only the adapter trains: every layer, the embeddings and the head are frozen.
    let policy = StagePolicy {
        trainable_layers: Vec::new(),
        train_embeddings: false,
        train_head: false,
        precision: Precision::Fp32,
        lora: Some(LoraSpec {
            targets: vec!["c_attn".into(), "c_proj".into()],
            ..LoraSpec::new(adapter.config.r, adapter.config.lora_alpha)
        }),
        boft: None,
    };
    let mut p = ParamBuilder::for_stage(tensors, 0, policy, &Device::Cpu);
    let model = Transformer::build(&cfg, &mut p, &Device::Cpu)?;
    let (params, frozen, unused) = p.finish_stage();
    assert!(unused.is_empty(), "unused tensors: {unused:?}");
    assert_eq!(
        params.vars.len(),
        adapter.factors.len(),
        "only the LoRA factors train"
    );

    let grads = mean_loss(&model, &batch)?.backward()?;
    let want = st(&fixture().join("grads_step0.safetensors"));
    for (name, var) in &params.vars {
        let key = peft_key(&name.replace(".weight", ".default.weight"));
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
    let want = st(&fixture().join("adapter_after_3_steps/adapter_model.safetensors"));
    for (name, var) in &params.vars {
        let d = max_abs(var.as_tensor(), &want[&peft_key(name)]);
        assert!(d <= 1e-5, "{name} after 3 steps: max |diff| {d}");
    }
    // The frozen base is bitwise unchanged.
    for (name, t) in frozen.tensors()? {
        assert_eq!(max_abs(&t, &before[&name]), 0.0, "{name} moved");
    }
    Ok(())
}

#[test]
fn a_bad_adapter_folder_is_refused_naming_the_problem() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let err = |d: &Path| match LoraAdapter::load(d, &Device::Cpu) {
        Ok(_) => panic!("loaded a bad adapter"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err(dir.path()).contains("adapter_config.json"));
    let boft = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-tiny-boft");
    assert!(err(&boft).contains("is not a LoRA adapter"));
    // An adapter for another model does not fit the base.
    let (mut cfg, _, _, _) = base()?;
    let adapter = LoraAdapter::load(&fixture(), &Device::Cpu)?;
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-tiny-gqa");
    let mut other = hf::read_safetensors_dir(&llama, &Device::Cpu)?;
    let e = adapter.apply(&mut other, &mut cfg).unwrap_err().to_string();
    assert!(e.contains("which the base model does not have"), "{e}");
    Ok(())
}

#[test]
fn a_boft_adapter_with_three_butterfly_factors_gives_peft_logits_and_merge() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-tiny-boft");
    let mut cfg = ModelConfig::read_hf_dir(&dir)?;
    let mut tensors = hf::normalize_keys(&cfg, hf::read_safetensors_dir(&dir, &Device::Cpu)?);
    let adapter = PeftAdapter::load(&dir, &Device::Cpu)?;
    let PeftAdapter::Boft(boft) = &adapter else {
        panic!("a BOFT folder")
    };
    // The factors come from boft_R's shape: 3, of 4x4 blocks (16 on q_proj's 64 input
    // features, 32 on down_proj's 128).
    assert_eq!((boft.factors, boft.block_size), (3, 4));
    assert_eq!(boft.params["model.layers.0.mlp.down_proj"].0.dim(1)?, 32);
    assert_eq!(adapter.modules_and_parameters().0.len(), 2 * 3);
    adapter.apply(&mut tensors, &mut cfg)?;
    let want = st(&dir.join("merged_model.safetensors"));
    for (key, w) in &want {
        let d = max_abs(&tensors[key], w);
        assert!(d <= 1e-5, "merged {key}: max |diff| {d}");
    }
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input_ids.json"))?)?;
    let (model, _) = hf::model_from_tensors(&cfg, tensors, &Device::Cpu)?;
    let logits = model.forward(&Tensor::new(ids, &Device::Cpu)?, 0, None)?;
    let d = max_abs(&logits, &st(&dir.join("logits.safetensors"))["logits"]);
    assert!(d <= 2e-5, "BOFT logits: max |diff| {d}");
    let base = &st(&dir.join("base_logits.safetensors"))["logits"];
    assert!(max_abs(&logits, base) > 0.1, "the adapter matters");
    println!("BOFT logits max |diff| {d:.2e}");
    Ok(())
}

#[test]
fn merge_then_unmerge_restores_the_base_for_lora_and_boft() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for name in ["gpt2-tiny-lora", "llama-tiny-boft"] {
        let dir = root.join(name);
        let cfg = ModelConfig::read_hf_dir(&dir)?;
        let base = hf::normalize_keys(&cfg, hf::read_safetensors_dir(&dir, &Device::Cpu)?);
        let adapter = PeftAdapter::load(&dir, &Device::Cpu)?;
        let mut w = base.clone();
        adapter.merge(&mut w, &cfg)?;
        adapter.unmerge(&mut w, &cfg)?;
        let worst = base
            .iter()
            .map(|(k, t)| max_abs(t, &w[k]))
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{name}: merge -> unmerge max |diff| {worst}");
    }
    Ok(())
}

#[test]
fn a_saved_lora_folder_loads_back_identically() -> Result<()> {
    let (cfg, ..) = base()?;
    let adapter = LoraAdapter::load(&fixture(), &Device::Cpu)?;
    let out = tempfile::tempdir()?;
    adapter.save(out.path(), &cfg, None)?;
    let again = LoraAdapter::load(out.path(), &Device::Cpu)?;
    assert_eq!(again.config.scale(), adapter.config.scale());
    assert_eq!(again.modules(), adapter.modules());
    for (k, t) in &adapter.factors {
        assert_eq!(max_abs(t, &again.factors[k]), 0.0, "{k}");
    }
    // PEFT's key names, as the fixture has them.
    let saved = st(&out.path().join("adapter_model.safetensors"));
    let want = st(&fixture().join("adapter_model.safetensors"));
    let (mut a, mut b): (Vec<_>, Vec<_>) = (saved.keys().collect(), want.keys().collect());
    a.sort();
    b.sort();
    assert_eq!(a, b);
    Ok(())
}
