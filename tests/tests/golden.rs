//! Golden tests against PyTorch / transformers reference fixtures (`tests/fixtures/*`, made by
//! `tests/fixtures/make_fixtures.py`). Every fixture folder present is tested: a new reference
//! case is a new folder. Tolerances are those the fixtures' README states for float32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};
use stackwise_worker::golden::{self, Tolerances};
use stackwise_worker::models::hf;

fn fixture_dirs() -> Vec<PathBuf> {
    // STACKWISE_FIXTURES points at another set, e.g. one fresh from make_fixtures.py.
    let root = std::env::var_os("STACKWISE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    let dirs = golden::fixture_dirs(&root).expect("tests/fixtures exists");
    assert!(
        dirs.len() >= 3,
        "expected the gpt2, llama and lora fixtures in {}",
        root.display()
    );
    dirs
}

fn input_ids(dir: &Path) -> Result<Tensor> {
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("input_ids.json"))?)?;
    Ok(Tensor::new(ids, &Device::Cpu)?)
}

fn load_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Logits and loss; gradients at the initial weights; 3 AdamW steps: the train losses, the loss
/// after them and every weight (`stackwise_worker::golden`, which `stackwise selfcheck` runs on
/// GPUs), on the CPU at the fixtures README's float32 tolerances.
#[test]
fn logits_gradients_and_three_adamw_steps_match_pytorch() -> Result<()> {
    for dir in fixture_dirs() {
        let r = golden::check_fixture(&dir, &Device::Cpu, &Tolerances::fp32())?;
        assert!(r.failures.is_empty(), "{:#?}", r.failures);
        if !golden::is_lora(&dir) {
            assert!(
                r.weights_after_3_steps_max_abs.is_some(),
                "{}: the training steps were not compared",
                r.name
            );
        }
        println!("{}: {}", r.name, serde_json::to_string(&r)?);
    }
    Ok(())
}

#[test]
fn export_then_reload_gives_identical_logits() -> Result<()> {
    for dir in fixture_dirs().into_iter().filter(|d| !golden::is_lora(d)) {
        let (model, params) = hf::load_model_dir(&dir, &Device::Cpu)?;
        let out = tempfile::tempdir()?;
        hf::export_dir(&model.cfg, &params, None, out.path())?;
        let (again, _) = hf::load_model_dir(out.path(), &Device::Cpu)?;
        let ids = input_ids(&dir)?;
        let d = max_abs(
            &model.forward(&ids, 0, None)?,
            &again.forward(&ids, 0, None)?,
        );
        assert_eq!(d, 0.0);
        // A tied GPT-2 head is not written, as transformers does.
        let saved = load_st(&out.path().join("model.safetensors"));
        assert_eq!(
            saved.contains_key("lm_head.weight"),
            !model.cfg.tie_embeddings
        );
    }
    Ok(())
}

#[test]
fn a_sharded_safetensors_index_loads_like_a_single_file() -> Result<()> {
    let src = fixture_dirs()
        .into_iter()
        .find(|d| d.ends_with("llama-tiny-gqa"))
        .expect("llama fixture");
    let tensors = load_st(&src.join("model.safetensors"));
    let out = tempfile::tempdir()?;
    std::fs::copy(src.join("config.json"), out.path().join("config.json"))?;
    // Split the tensors over two shards, with the index transformers writes.
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: HashMap<&String, Tensor> =
            part.iter().map(|k| (*k, tensors[*k].clone())).collect();
        candle_core::safetensors::save(&shard, out.path().join(file))?;
        for k in part {
            weight_map.insert((*k).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        out.path().join("model.safetensors.index.json"),
        index.to_string(),
    )?;
    let (sharded, _) = hf::load_model_dir(out.path(), &Device::Cpu)?;
    let (single, _) = hf::load_model_dir(&src, &Device::Cpu)?;
    let ids = input_ids(&src)?;
    assert_eq!(
        max_abs(
            &sharded.forward(&ids, 0, None)?,
            &single.forward(&ids, 0, None)?
        ),
        0.0
    );
    Ok(())
}
