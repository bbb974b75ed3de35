//! `stackwise finetune --model BASE --data DATA --mode baseline|lora|qlora --out DIR`: the
//! fine-tuning modes of HF Trainer + PEFT scripts as one command. It writes the run's config
//! to `<out>/<name>.yaml` (a normal training config with `init_from` and `training.adapter`)
//! and trains it like `stackwise train`, or like `stackwise launch` with `--workers N`; the
//! same file resumes (`--resume`) or relaunches the run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_yaml::{Mapping, Value};
use stackwise_common::config::ModelConfig;
use stackwise_common::data::TokenIndex;
use stackwise_common::store::Store;

use super::args::{LossArgs, OutputArgs, Overrides, ResumeArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Every weight trains (full fine-tune).
    Baseline,
    /// LoRA adapters on the target projections; the base is frozen at fp32.
    Lora,
    /// LoRA on a base stored in NF4 (QLoRA's 4-bit levels), computing in f32.
    Qlora,
    /// Butterfly orthogonal adapters over the full width: 2x2 Givens blocks (BOFT block size
    /// 2) and enough butterfly factors to mix the width (`--butterfly-stages`).
    Butterfly,
    /// Independent rotations of `--butterfly-block-size` (default 256) feature blocks: BOFT
    /// with that block size and one factor.
    #[value(name = "butterfly_block")]
    ButterflyBlock,
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// The base: a Hugging Face model folder or a StackWise checkpoint folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A dataset made by `stackwise data prepare` with the base's tokenizer.
    #[arg(long)]
    pub data: String,
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Output root: the run goes to <out>/runs/<name>/, its config to <out>/<name>.yaml.
    #[arg(long)]
    pub out: PathBuf,
    /// Run name.
    #[arg(long, default_value = "finetune")]
    pub name: String,
    /// Optimizer steps.
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the training split (converted to steps from its sample count).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// A YAML config the flags are applied over (e.g. eval cadence, schedule).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Loss only after the prompt (`### Response:`); samples are whole documents.
    #[arg(long)]
    pub sft: bool,
    #[arg(long)]
    pub lr: Option<f64>,
    /// Global batch (sequences per optimizer step, across workers).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Tokens per sequence (default: the base's context length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<u64>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Recompute each block's activations in the backward instead of keeping them
    /// (training.gradient_checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Matrix products in bf16 with f32 master weights and optimizer state
    /// (training.autocast: bf16, as torch.autocast); meant for GPUs, slower on the CPU.
    #[arg(long, conflicts_with = "fp16")]
    pub bf16: bool,
    /// Matrix products in fp16 with f32 master weights and optimizer state
    /// (training.autocast: fp16).
    #[arg(long)]
    pub fp16: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training (PEFT's lora_dropout), e.g. 0.05.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Scale alpha / sqrt(r) instead of alpha / r.
    #[arg(long)]
    pub use_rslora: bool,
    /// qlora: double quantization, as bitsandbytes' bnb_4bit_use_double_quant (the NF4 block
    /// absmax values stored as 8-bit codes; base_precision nf4_dq).
    #[arg(long)]
    pub double_quant: bool,
    /// Projections to adapt, PEFT's suffix match (default: every attention and MLP linear).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub target_modules: Vec<String>,
    /// Butterfly modes: the rotation block size (default: 2 for butterfly, 256 for
    /// butterfly_block).
    #[arg(long)]
    pub butterfly_block_size: Option<usize>,
    /// Butterfly modes: the number of butterfly stages (BOFT factors). Default: butterfly,
    /// the most the base's widths allow (log2 of the largest power of two dividing them);
    /// butterfly_block, 1.
    #[arg(long)]
    pub butterfly_stages: Option<usize>,
    /// Butterfly modes: BOFT's multiplicative dropout while training (PEFT's boft_dropout):
    /// this share of one random factor's blocks becomes the identity, e.g. 0.1.
    #[arg(long, default_value_t = 0.0)]
    pub boft_dropout: f64,
    /// Data-parallel workers (as `stackwise launch --workers N`; only trainable parameters
    /// are all-reduced).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[command(flatten)]
    pub overrides: Overrides,
    #[command(flatten)]
    pub run: ResumeArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

fn set(root: &mut Value, path: &str, v: impl Into<Value>) {
    let mut node = root;
    for part in path.split('.') {
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        node = node
            .as_mapping_mut()
            .expect("a mapping")
            .entry(Value::String(part.into()))
            .or_insert(Value::Null);
    }
    *node = v.into();
}

/// The run's config tree: the `--config` file (if any) with the flags applied.
pub fn config_tree(a: &FinetuneArgs) -> Result<Value> {
    if a.double_quant && a.mode != Mode::Qlora {
        bail!("--double-quant quantizes a QLoRA base: use it with --mode qlora");
    }
    let mut root = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            serde_yaml::from_str(&text).with_context(|| format!("parse {}", p.display()))?
        }
        None => Value::Mapping(Mapping::new()),
    };
    let abs = |p: &Path| -> Result<String> {
        Ok(std::path::absolute(p)
            .with_context(|| format!("resolve {}", p.display()))?
            .to_string_lossy()
            .into_owned())
    };
    let data = if a.data.contains("://") {
        a.data.clone()
    } else {
        abs(Path::new(&a.data))?
    };
    set(&mut root, "run.name", a.name.as_str());
    set(&mut root, "run.output", abs(&a.out)?);
    set(&mut root, "init_from", abs(&a.model)?);
    set(&mut root, "data.path", data.as_str());
    if a.sft {
        set(&mut root, "training.objective", "sft");
    }
    if a.gradient_checkpointing {
        set(&mut root, "training.gradient_checkpointing", true);
    }
    if a.bf16 || a.fp16 {
        set(
            &mut root,
            "training.autocast",
            if a.bf16 { "bf16" } else { "fp16" },
        );
    }
    let u = |x: usize| Value::from(x as u64);
    for (key, v) in [
        ("training.lr", a.lr.map(Value::from)),
        ("training.batch_size", a.batch_size.map(u)),
        ("training.grad_accum", a.grad_accum.map(u)),
        ("training.seq_len", a.seq_len.map(u)),
        ("training.warmup_steps", a.warmup_steps.map(Value::from)),
        ("training.eval_every", a.eval_every.map(Value::from)),
        (
            "training.checkpoint_every",
            a.checkpoint_every.map(Value::from),
        ),
    ] {
        if let Some(v) = v {
            set(&mut root, key, v);
        }
    }
    if matches!(a.mode, Mode::Butterfly | Mode::ButterflyBlock) {
        let block = a
            .butterfly_block_size
            .unwrap_or(if a.mode == Mode::Butterfly { 2 } else { 256 });
        let stages = match (a.butterfly_stages, a.mode) {
            (Some(s), _) => s,
            (None, Mode::Butterfly) => full_width_stages(&a.model)?,
            (None, _) => 1,
        };
        set(&mut root, "training.adapter.method", "boft");
        set(&mut root, "training.adapter.boft_block_size", u(block));
        set(
            &mut root,
            "training.adapter.boft_n_butterfly_factor",
            u(stages),
        );
        set(&mut root, "training.adapter.boft_dropout", a.boft_dropout);
    } else if a.mode != Mode::Baseline {
        set(&mut root, "training.adapter.method", "lora");
        set(&mut root, "training.adapter.r", u(a.lora_r));
        set(&mut root, "training.adapter.lora_alpha", a.lora_alpha);
        set(&mut root, "training.adapter.lora_dropout", a.lora_dropout);
        set(&mut root, "training.adapter.use_rslora", a.use_rslora);
        let precision = match (a.mode, a.double_quant) {
            (Mode::Qlora, true) => "nf4_dq",
            (Mode::Qlora, false) => "nf4",
            _ => "fp32",
        };
        set(&mut root, "training.adapter.base_precision", precision);
    }
    if a.mode != Mode::Baseline && !a.target_modules.is_empty() {
        let t: Vec<Value> = a.target_modules.iter().map(|s| s.as_str().into()).collect();
        set(
            &mut root,
            "training.adapter.target_modules",
            Value::Sequence(t),
        );
    }
    Ok(root)
}

/// Butterfly stages of 2x2 blocks that fit every projection input of the base: a layer of
/// `d` inputs takes `s` stages when `2^s` divides `d`, and `log2(d)` of them mix all of it.
fn full_width_stages(base: &Path) -> Result<usize> {
    let cfg = ModelConfig::read_hf_dir(base)?;
    let widths = [cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim];
    Ok(widths
        .iter()
        .map(|w| w.trailing_zeros() as usize)
        .min()
        .unwrap_or(1)
        .max(1))
}

/// Optimizer steps for `epochs` passes over the training split.
fn steps_for_epochs(root: &Value, base: &Path, epochs: f64) -> Result<u64> {
    if !(epochs > 0.0 && epochs.is_finite()) {
        bail!("--epochs must be a positive number, e.g. 1 or 0.5");
    }
    let t = &root["training"];
    let sft = t["objective"].as_str() == Some("sft");
    let seq_len = match t["seq_len"].as_u64() {
        Some(s) => s as usize,
        None => ModelConfig::read_hf_dir(base)?.seq_len,
    };
    let batch = t["batch_size"].as_u64().unwrap_or(8) as usize
        * t["grad_accum"].as_u64().unwrap_or(1) as usize;
    let packed = root["data"]["packing"].as_bool().unwrap_or(!sft);
    let store = Store::open(root["data"]["path"].as_str().unwrap_or_default())?;
    let (index, _) = TokenIndex::open(&store)?;
    let samples = index
        .load_split(&store, &index.train)?
        .num_samples(seq_len, packed);
    Ok(((samples as f64 * epochs) / batch as f64).ceil().max(1.0) as u64)
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let mut root = config_tree(&a)?;
    let steps = match (a.steps, a.epochs) {
        (Some(s), _) => Some(s),
        (None, Some(e)) => Some(steps_for_epochs(&root, &a.model, e)?),
        (None, None) => None,
    };
    if let Some(s) = steps {
        set(&mut root, "training.steps", s);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("create {}", a.out.display()))?;
    let path = a.out.join(format!("{}.yaml", a.name));
    std::fs::write(&path, serde_yaml::to_string(&root)?)
        .with_context(|| format!("write {}", path.display()))?;
    let shown = path.display();
    eprintln!(
        "finetune ({:?}): config {shown} (continue with --resume; `stackwise launch {shown} --workers N` relaunches it)",
        a.mode
    );
    if a.workers > 1 {
        return super::dist::run_launch(super::dist::LaunchArgs {
            config: path,
            workers: a.workers,
            device: crate::launch::LaunchDevice::Cpu,
            in_process: false,
            overrides: a.overrides,
            run: a.run,
            threads_per_worker: None,
            loss: LossArgs {
                lease_ms: 10_000,
                on_worker_loss: stackwise_coordinator::OnWorkerLoss::Stop,
            },
            max_restarts: 3,
            http_bind: None,
            output: a.output,
        });
    }
    super::train::run(super::train::TrainArgs {
        config: path,
        overrides: a.overrides,
        run: a.run,
        output: a.output,
    })
}
