//! `stackwise ckpt ls | inspect | verify URI`: checkpoints in any store (path, file://, s3://).

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use stackwise_common::checkpoint::{CheckpointError, CheckpointStore, Manifest};
use stackwise_common::store::Store;
use stackwise_worker::adapters::LoraAdapter;
use stackwise_worker::checkpoint as layout;
use stackwise_worker::models::hf;

#[derive(Subcommand)]
pub enum CkptCommand {
    /// List runs (given the output root) or a run's checkpoints (given a run URI).
    Ls {
        /// e.g. ./out, ./out/runs/NAME, s3://bucket/prefix/runs/NAME
        uri: String,
    },
    /// Step, stage, metrics, data cursor, files and tensors of one checkpoint.
    Inspect {
        /// e.g. s3://bucket/prefix/runs/NAME/checkpoints/step-00001000 (or a run: its newest)
        uri: String,
    },
    /// Check every file of a checkpoint (or of every checkpoint of a run) against its manifest.
    Verify { uri: String },
    /// Write a checkpoint (or a run's newest valid one) as a standalone Hugging Face folder:
    /// model.safetensors with every tensor (a stage's shared frozen tensors included),
    /// config.json, tokenizer.json.
    Export {
        /// A checkpoint or run URI (path, file://, s3://).
        uri: String,
        /// Output folder.
        out: std::path::PathBuf,
        /// Export the EMA weights when the checkpoint has them.
        #[arg(long)]
        ema: bool,
    },
}

/// `(run, Some(checkpoint name))` for a checkpoint URI, `(run, None)` otherwise.
fn split(uri: &str) -> (String, Option<String>) {
    let u = uri.trim_end_matches('/');
    if let Some(i) = u.rfind("/checkpoints/") {
        let name = &u[i + "/checkpoints/".len()..];
        if name.starts_with("step-") && !name.contains('/') {
            return (u[..i].to_string(), Some(name.to_string()));
        }
    }
    (u.to_string(), None)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn total(m: &Manifest) -> u64 {
    m.files.iter().map(|f| f.bytes).sum()
}

pub fn run(c: CkptCommand) -> Result<()> {
    match c {
        CkptCommand::Ls { uri } => ls(&uri),
        CkptCommand::Inspect { uri } => inspect(&uri),
        CkptCommand::Verify { uri } => verify(&uri),
        CkptCommand::Export { uri, out, ema } => export(&uri, &out, ema),
    }
}

fn export(uri: &str, out: &std::path::Path, ema: bool) -> Result<()> {
    let (run_uri, name) = split(uri);
    let c = CheckpointStore::new(&Store::open(&run_uri)?);
    let ck = match name {
        Some(n) => c.load(&n)?,
        None => c
            .load_latest()?
            .with_context(|| format!("{uri}: no checkpoint with a valid manifest"))?,
    };
    let device = candle_core::Device::Cpu;
    let mut weights = layout::load_weights(&ck, ema, &device)?;
    let mut cfg = layout::model_config(&ck)?;
    // An adapter run exports the base with its adapter merged: a plain HF model.
    let merged = match LoraAdapter::take_from(&mut weights, &cfg)? {
        Some(lora) => {
            lora.merge(&mut weights, &cfg)?;
            cfg.lora_scale = None;
            true
        }
        None => false,
    };
    let sorted: std::collections::BTreeMap<String, candle_core::Tensor> =
        weights.into_iter().collect();
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    hf::write_atomic(
        &out.join(layout::MODEL),
        &hf::params_to_safetensors(&sorted)?,
    )?;
    hf::write_atomic(
        &out.join(layout::CONFIG),
        &serde_json::to_vec_pretty(&cfg.to_hf_json())?,
    )?;
    let tokenizer = ck
        .files
        .get(layout::TOKENIZER)
        .with_context(|| format!("checkpoint {} has no {}", ck.name, layout::TOKENIZER))?;
    hf::write_atomic(&out.join(layout::TOKENIZER), tokenizer)?;
    println!(
        "exported {run_uri}/checkpoints/{} ({} tensors{}) to {}",
        ck.name,
        sorted.len(),
        if merged { ", LoRA adapter merged" } else { "" },
        out.display()
    );
    Ok(())
}

fn ls(uri: &str) -> Result<()> {
    let (run_uri, name) = split(uri);
    if name.is_some() {
        return inspect(uri);
    }
    let store = Store::open(&run_uri)?;
    let ckpts = CheckpointStore::new(&store);
    let names = ckpts.list_names()?;
    if !names.is_empty() {
        print_run(&run_uri, &ckpts, &names)?;
        return Ok(());
    }
    // An output root: its runs.
    let mut runs: Vec<String> = store
        .list("runs")?
        .into_iter()
        .filter_map(|(p, _)| {
            p.strip_prefix("runs/")
                .and_then(|r| r.split('/').next())
                .map(str::to_string)
        })
        .collect();
    runs.dedup();
    if runs.is_empty() {
        bail!(
            "{uri}: no checkpoints and no runs/ here; give an output root, a run or a checkpoint URI"
        );
    }
    for r in runs {
        let run = store.child(&format!("runs/{r}"));
        let c = CheckpointStore::new(&run);
        let names = c.list_names()?;
        print_run(run.uri(), &c, &names)?;
    }
    Ok(())
}

fn print_run(run_uri: &str, c: &CheckpointStore, names: &[String]) -> Result<()> {
    println!("{run_uri}");
    let manifests: std::collections::BTreeMap<String, Manifest> =
        c.manifests()?.into_iter().collect();
    println!(
        "  {:<16} {:>8} {:>6} {:>11} {:>10}  state",
        "CHECKPOINT", "STEP", "FILES", "SIZE", "VAL LOSS"
    );
    for n in names {
        match manifests.get(n) {
            Some(m) => println!(
                "  {:<16} {:>8} {:>6} {:>11} {:>10}  complete",
                n,
                m.step,
                m.files.len(),
                human(total(m)),
                m.meta.val_loss.map_or("-".into(), |v| format!("{v:.4}"))
            ),
            None => println!(
                "  {n:<16} {:>8} {:>6} {:>11} {:>10}  torn (no manifest)",
                "-", "-", "-", "-"
            ),
        }
    }
    Ok(())
}

fn inspect(uri: &str) -> Result<()> {
    let (run_uri, name) = split(uri);
    let store = Store::open(&run_uri)?;
    let c = CheckpointStore::new(&store);
    let name = match name {
        Some(n) => n,
        None => c
            .list_names()?
            .into_iter()
            .rev()
            .find(|n| c.manifests().is_ok_and(|ms| ms.iter().any(|(m, _)| m == n)))
            .with_context(|| format!("{uri}: no complete checkpoint"))?,
    };
    let raw = c
        .store()
        .get(&format!("{name}/MANIFEST.json"))?
        .with_context(|| {
            format!("{run_uri}/checkpoints/{name}: no MANIFEST.json (torn or unfinished save)")
        })?;
    let m = Manifest::from_json(&raw).map_err(|e| anyhow::anyhow!("MANIFEST.json: {e}"))?;
    println!("checkpoint {run_uri}/checkpoints/{name}");
    println!(
        "  step {} | stage {} | val loss {} | format {}",
        m.step,
        m.meta.stage.as_deref().unwrap_or("-"),
        m.meta.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
        m.format_version
    );
    if let Some(state) = c
        .store()
        .get(&format!("{name}/{}", layout::TRAINER_STATE))?
    {
        let v: serde_json::Value = serde_json::from_slice(&state).context(layout::TRAINER_STATE)?;
        println!(
            "  data cursor epoch {} index {} | tokens seen {} | skipped steps {}",
            v["cursor"]["epoch"], v["cursor"]["index"], v["tokens_seen"], v["skipped_steps"]
        );
    }
    if let Some(cfg) = c.store().get(&format!("{name}/{}", layout::CONFIG))? {
        let v: serde_json::Value = serde_json::from_slice(&cfg).context(layout::CONFIG)?;
        let keys = [
            "model_type",
            "n_layer",
            "num_hidden_layers",
            "n_embd",
            "hidden_size",
            "n_head",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "n_positions",
            "max_position_embeddings",
        ];
        let parts: Vec<String> = keys
            .iter()
            .filter_map(|k| v.get(*k).map(|x| format!("{k}={x}")))
            .collect();
        println!("  config: {}", parts.join(" "));
    }
    println!("  files:");
    for f in &m.files {
        println!(
            "    {:<24} {:>11}  sha256 {}…",
            f.path,
            human(f.bytes),
            f.sha256.get(..16).unwrap_or(&f.sha256)
        );
    }
    println!("    {:<24} {:>11}", "total", human(total(&m)));
    if let Some(bytes) = c.store().get(&format!("{name}/{}", layout::MODEL))? {
        let st = safetensors::SafeTensors::deserialize(&bytes).context(layout::MODEL)?;
        let mut tensors: Vec<_> = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let params: usize = tensors
            .iter()
            .map(|(_, t)| t.shape().iter().product::<usize>())
            .sum();
        println!("  tensors ({}, {params} parameters):", tensors.len());
        for (n, t) in &tensors {
            println!("    {n:<48} {:?} {:?}", t.dtype(), t.shape());
        }
    }
    Ok(())
}

fn verify(uri: &str) -> Result<()> {
    let (run_uri, name) = split(uri);
    let store = Store::open(&run_uri)?;
    let c = CheckpointStore::new(&store);
    let names = match name {
        Some(n) => vec![n],
        None => c.list_names()?,
    };
    if names.is_empty() {
        bail!("{uri}: no checkpoints");
    }
    let mut bad = 0;
    for n in &names {
        match c.load(n) {
            Ok(l) => println!(
                "ok      {run_uri}/checkpoints/{n}: {} files, {} verified",
                l.files.len(),
                human(total(&l.manifest))
            ),
            Err(CheckpointError::Invalid { name, msg }) => {
                bad += 1;
                println!("FAILED  {run_uri}/checkpoints/{name}: {msg}");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if bad > 0 {
        bail!("{bad} of {} checkpoint(s) failed verification", names.len());
    }
    Ok(())
}
