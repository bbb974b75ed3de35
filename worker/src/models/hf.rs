//! Hugging Face model folders: `config.json` + `model.safetensors` (or a sharded
//! `model.safetensors.index.json`), and the reverse, an export transformers can load.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

use super::decoder::{Transformer, names};
use super::params::{ParamBuilder, Params};
use stackwise_common::config::{Family, ModelConfig};

/// Buffers some checkpoints carry that are not parameters.
fn is_buffer(key: &str) -> bool {
    key.ends_with(".attn.bias") && !key.contains("c_attn")
        || key.ends_with(".attn.masked_bias")
        || key.ends_with("rotary_emb.inv_freq")
}

/// Bring keys to the layout the model uses: hub GPT-2 checkpoints omit `transformer.`.
fn normalize_key(cfg: &ModelConfig, key: &str) -> String {
    match cfg.family {
        Family::Gpt2 if !key.starts_with("transformer.") && key != names::LM_HEAD => {
            format!("transformer.{key}")
        }
        _ => key.to_string(),
    }
}

/// An HF model's tensors by the names the model uses: buffers dropped, keys normalized.
pub fn normalize_keys(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(k, t)| (normalize_key(cfg, &k), t))
        .collect()
}

/// Read every tensor of a safetensors model in `dir` (single file or sharded index).
pub fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return candle_core::safetensors::load(&single, device)
            .with_context(|| format!("read {}", single.display()));
    }
    if index.exists() {
        let text =
            std::fs::read_to_string(&index).with_context(|| format!("read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort();
        files.dedup();
        let mut out = HashMap::new();
        for f in files {
            // A shard is a file name in the model folder, never a path out of it.
            let plain = Path::new(f).components().count() == 1
                && matches!(
                    Path::new(f).components().next(),
                    Some(std::path::Component::Normal(_))
                );
            if !plain {
                bail!(
                    "{}: weight_map names {f:?}; shards must be files in the model folder",
                    index.display()
                );
            }
            let p = dir.join(f);
            out.extend(
                candle_core::safetensors::load(&p, device)
                    .with_context(|| format!("read shard {}", p.display()))?,
            );
        }
        return Ok(out);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json (PyTorch .bin weights are not supported; \
         convert with `model.save_pretrained(dir, safe_serialization=True)`)",
        dir.display()
    )
}

/// Build a model from HF tensors (already read), keeping only what the config uses.
pub fn model_from_tensors(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<(Transformer, Params)> {
    let mut loaded = normalize_keys(cfg, tensors);
    if cfg.tie_embeddings {
        // transformers may write the tied head too; it is the embedding table.
        loaded.remove(names::LM_HEAD);
    }
    let mut p = ParamBuilder::from_tensors(loaded, device);
    p.set_lora_scale(cfg.lora_scale);
    let model = Transformer::build(cfg, &mut p, device)?;
    let (params, unused) = p.finish();
    if !unused.is_empty() {
        tracing::warn!(count = unused.len(), first = %unused[0], "checkpoint tensors not used by the model");
    }
    Ok((model, params))
}

/// Load an HF folder (or a StackWise checkpoint folder, which has the same files).
pub fn load_model_dir(dir: &Path, device: &Device) -> Result<(Transformer, Params)> {
    let cfg = ModelConfig::read_hf_dir(dir)?;
    let tensors = read_safetensors_dir(dir, device)?;
    model_from_tensors(&cfg, tensors, device)
        .with_context(|| format!("load model from {}", dir.display()))
}

/// Serialize parameters as HF `model.safetensors` bytes (with `format: pt` metadata).
pub fn params_to_safetensors(params: &BTreeMap<String, Tensor>) -> Result<Vec<u8>> {
    let tensors: Vec<(&String, Tensor)> = params
        .iter()
        .map(|(k, t)| {
            let t = if t.dtype() == DType::F32 {
                t.clone()
            } else {
                t.to_dtype(DType::F32)?
            };
            Ok((k, t.contiguous()?))
        })
        .collect::<Result<_>>()?;
    if tensors
        .iter()
        .all(|(_, t)| matches!(t.device(), Device::Cpu))
    {
        return f32_safetensors(&tensors);
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::tensor::serialize(tensors, Some(meta))?)
}

/// The safetensors format written with one copy per tensor straight from candle's CPU
/// storage (the generic path converts through intermediate vectors). This is the training
/// stall of a checkpoint: 1.5 GB of GPT-2-small weights and AdamW state in well under a second.
fn f32_safetensors(tensors: &[(&String, Tensor)]) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, t) in tensors {
        let bytes = t.elem_count() * 4;
        header.insert(
            (*name).clone(),
            serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The data starts 8-byte aligned: pad the header with spaces, as safetensors does.
    while (8 + head.len()) % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for (_, t) in tensors {
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            bail!("expected a CPU tensor");
        };
        let data = crate::ops::cpu::f32_slice(cpu, layout, "safetensors")?;
        // SAFETY: f32 has no padding and any alignment suits u8.
        let raw = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), data.len() * 4) };
        out.extend_from_slice(raw);
    }
    Ok(out)
}

/// Write `config.json` + `model.safetensors` (+ `tokenizer.json` when given) into `dir`.
pub fn export_dir(
    cfg: &ModelConfig,
    params: &Params,
    tokenizer_json: Option<&str>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let bytes = params_to_safetensors(&params.tensors()?)?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
    let config = serde_json::to_string_pretty(&cfg.to_hf_json())?;
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    if let Some(tok) = tokenizer_json {
        write_atomic(&dir.join("tokenizer.json"), tok.as_bytes())?;
    }
    Ok(())
}

/// Write via a temporary file and rename, so a crash never leaves a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod safetensors_tests {
    use super::*;

    #[test]
    fn a_weight_map_pointing_out_of_the_model_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for shard in [
            "../outside.safetensors",
            "/etc/passwd",
            "sub/dir.safetensors",
        ] {
            let index = serde_json::json!({"metadata": {}, "weight_map": {"w": shard}});
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                index.to_string(),
            )
            .unwrap();
            let e = read_safetensors_dir(dir.path(), &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("shards must be files in the model folder"),
                "{shard}: {e}"
            );
        }
    }

    #[test]
    fn the_fast_writer_reads_back_with_the_safetensors_crate() {
        let dev = candle_core::Device::Cpu;
        let mut m = BTreeMap::new();
        m.insert(
            "b.weight".to_string(),
            Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        );
        m.insert(
            "a".to_string(),
            Tensor::new(&[1.5f32, -2.0, 7.0], &dev).unwrap(),
        );
        // A transposed (strided) tensor is written in its logical order.
        m.insert(
            "c".to_string(),
            Tensor::arange(0f32, 6., &dev)
                .unwrap()
                .reshape((2, 3))
                .unwrap()
                .t()
                .unwrap(),
        );
        let bytes = params_to_safetensors(&m).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let back = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
        for (k, v) in &m {
            let got = back[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                got,
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{k}"
            );
            assert_eq!(back[k].dims(), v.dims());
        }
        let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1;
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
}
