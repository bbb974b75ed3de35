//! `stackwise adapter merge | inspect`: PEFT adapter folders (LoRA, BOFT).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Subcommand;
use stackwise_worker::adapters::PeftAdapter;
use stackwise_worker::models::hf;

use super::model_source;

#[derive(Subcommand)]
pub enum AdapterCommand {
    /// Merge a LoRA or BOFT adapter into its base model and write a plain Hugging Face folder
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
    let peft = PeftAdapter::load(adapter, &device)?;
    peft.merge(&mut base.weights, &base.cfg)
        .with_context(|| format!("merge {} into {}", adapter.display(), base.source))?;
    let mut cfg = base.cfg.clone();
    cfg.lora_scale = None;
    let (_, params) = hf::model_from_tensors(&cfg, base.weights, &device)?;
    hf::export_dir(&cfg, &params, Some(&base.tok.to_json()?), out)?;
    let (kind, what) = peft.describe();
    println!(
        "merged {} ({kind}: {what}, {} modules) into {}: wrote {}",
        adapter.display(),
        peft.modules_and_parameters().0.len(),
        base.source,
        out.display()
    );
    Ok(())
}

fn inspect(dir: &std::path::Path, json: bool) -> Result<()> {
    let peft = PeftAdapter::load(dir, &Device::Cpu)?;
    let (modules, params) = peft.modules_and_parameters();
    let (kind, what) = peft.describe();
    if json {
        let mut v =
            serde_json::json!({"kind": kind, "modules": modules, "trainable_parameters": params});
        match &peft {
            PeftAdapter::Lora(a) => {
                let c = &a.config;
                v["r"] = c.r.into();
                v["lora_alpha"] = c.lora_alpha.into();
                v["scale"] = c.scale().into();
                v["use_rslora"] = c.use_rslora.into();
                v["lora_dropout"] = c.lora_dropout.into();
                v["fan_in_fan_out"] = c.fan_in_fan_out.into();
            }
            PeftAdapter::Boft(a) => {
                v["butterfly_factors"] = a.factors.into();
                v["block_size"] = a.block_size.into();
                v["dropout"] = a.dropout.into();
            }
        }
        println!("{v}");
        return Ok(());
    }
    println!("{}: {kind}, {what}", dir.display());
    println!("{} modules, {params} trainable parameters", modules.len());
    for m in &modules {
        println!("  {m}");
    }
    Ok(())
}
