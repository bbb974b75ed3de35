//! `stackwise adapter merge | inspect`: PEFT LoRA adapter folders.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Subcommand;
use stackwise_worker::adapters::LoraAdapter;
use stackwise_worker::models::hf;

use super::model_source;

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Merge a LoRA adapter into its base model and write a plain Hugging Face folder
    /// (config.json, model.safetensors, tokenizer.json) that transformers loads.
    Merge {
        /// The base: an HF folder, a checkpoint folder or a run folder.
        #[arg(long)]
        model: PathBuf,
        /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Kind, rank, alpha and scale, targets, adapted modules and trainable parameters of an
    /// adapter folder.
    Inspect {
        /// The PEFT adapter folder.
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(c: AdapterCommand) -> Result<()> {
    match c {
        AdapterCommand::Merge {
            model,
            adapter,
            out,
        } => merge(&model, &adapter, &out),
        AdapterCommand::Inspect { dir, json } => inspect(&dir, json),
    }
}

fn merge(model: &std::path::Path, adapter: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let device = Device::Cpu;
    let mut base = model_source::weights(model, false, &device)?;
    let lora = LoraAdapter::load(adapter, &device)?;
    lora.merge(&mut base.weights, &base.cfg)
        .with_context(|| format!("merge {} into {}", adapter.display(), base.source))?;
    let mut cfg = base.cfg.clone();
    cfg.lora_scale = None;
    let (_, params) = hf::model_from_tensors(&cfg, base.weights, &device)?;
    hf::export_dir(&cfg, &params, Some(&base.tok.to_json()?), out)?;
    println!(
        "merged {} ({} modules, r {}) into {}: wrote {}",
        adapter.display(),
        lora.modules().len(),
        lora.config.r,
        base.source,
        out.display()
    );
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let lora = LoraAdapter::load(dir, &Device::Cpu)?;
    let params: usize = lora.factors.values().map(|t| t.elem_count()).sum();
    let modules = lora.modules();
    let c = &lora.config;
    if json {
        println!(
            "{}",
            serde_json::json!({"kind": "lora", "r": c.r, "lora_alpha": c.lora_alpha, "scale": c.scale(),
                "use_rslora": c.use_rslora, "lora_dropout": c.lora_dropout, "fan_in_fan_out": c.fan_in_fan_out,
                "target_modules": format!("{:?}", c.target_modules), "modules": modules,
                "trainable_parameters": params})
        );
        return Ok(());
    }
    println!(
        "{}: LoRA r {} alpha {} (scale {:.4}{})",
        dir.display(),
        c.r,
        c.lora_alpha,
        c.scale(),
        if c.use_rslora { ", rsLoRA" } else { "" }
    );
    println!(
        "targets {:?}: {} modules, {params} trainable parameters",
        c.target_modules,
        modules.len()
    );
    for m in &modules {
        println!("  {m}");
    }
    Ok(())
}
