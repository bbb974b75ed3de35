//! `stackwise bench`: measurements of the binary itself on a device, each printing one JSON line
//! (as `vllm bench` does for vLLM). `bench/` runs them against a peer in the same invocation;
//! `bench/gpu/run.sh` carries this binary to a GPU machine and runs them there.
//!
//! - `train`: full training steps (forward, backward, clip, AdamW) of a GPT-2-style model on
//!   random tokens, through the `train::step` code the trainer runs; `--lora-r` trains LoRA
//!   factors on the frozen model instead.
//! - `generate`: greedy decoding with the KV cache from a model folder (or a random GPT-2), the
//!   path `stackwise generate` takes.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use stackwise_common::config::{Autocast, DeviceSpec, Precision};
use stackwise_common::plan::LoraSpec;
use stackwise_common::rng::Rng;
use stackwise_worker::comm::Local;
use stackwise_worker::generate::{SamplingConfig, generate};
use stackwise_worker::models::params::StagePolicy;
use stackwise_worker::models::{ParamBuilder, Params, RawModelConfig, Transformer, hf};
use stackwise_worker::objectives::{Batch, nll_sum};
use stackwise_worker::optim::adamw::clip_grad_norm;
use stackwise_worker::optim::{AdamW, AdamWConfig};
use stackwise_worker::train::step::train_step;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training tokens/s of full steps on random tokens (one JSON line).
    Train(TrainBenchArgs),
    /// Greedy decoding tokens/s with the KV cache (one JSON line).
    Generate(GenerateBenchArgs),
}

/// A GPT-2-style shape (defaults: the CPU benchmark's 6 layers, d=384, vocab 8192).
#[derive(Args, Debug, Clone)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    #[arg(long, default_value_t = 384)]
    pub d_model: usize,
    #[arg(long, default_value_t = 6)]
    pub heads: usize,
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Positions (the model's context).
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
}

impl ShapeArgs {
    fn random_model(&self, device: &candle_core::Device) -> Result<(Transformer, Params)> {
        let cfg = RawModelConfig {
            d_model: Some(self.d_model),
            n_layers: Some(self.layers),
            n_heads: Some(self.heads),
            vocab_size: Some(self.vocab),
            seq_len: Some(self.seq),
            ..Default::default()
        }
        .resolve(None)?;
        Ok(Transformer::init(&cfg, 1, device)?)
    }
}

#[derive(Args, Debug, Clone)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    pub shape: ShapeArgs,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Also time the phases of a step (forward, backward, clip, AdamW) and print them.
    #[arg(long)]
    pub phases: bool,
    /// Train LoRA adapters of this rank on a frozen base instead of every weight.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// The adapted projections (PEFT's suffix match).
    #[arg(long, value_delimiter = ',', default_value = "c_attn,c_proj")]
    pub lora_targets: Vec<String>,
    /// Recompute each block in the backward (gradient checkpointing).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Matrix products at bf16 or fp16 (`training.autocast`).
    #[arg(long, default_value = "off")]
    pub autocast: Autocast,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateBenchArgs {
    /// An HF model folder; without it, a randomly initialized model of the --layers ... shape.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Random prompt tokens.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens generated (no early stop at EOS).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed generations (after one short untimed warm-up).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

pub fn run(c: BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Train(a) => train(a),
        BenchCommand::Generate(a) => generate_bench(a),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn train(a: TrainBenchArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let dev = stackwise_worker::device::open(a.device)?;
    stackwise_worker::ops::autocast::set(a.autocast);
    let (mut model, mut params) = a.shape.random_model(&dev)?;
    if let Some(r) = a.lora_r {
        // PEFT's usual alpha = 2r; the base frozen at fp32, only the factors train.
        let spec = LoraSpec {
            targets: a.lora_targets.clone(),
            ..LoraSpec::new(r, 2.0 * r as f64)
        };
        let policy = StagePolicy {
            trainable_layers: Vec::new(),
            train_embeddings: false,
            train_head: false,
            precision: Precision::Fp32,
            lora: Some(spec.clone()),
            boft: None,
        };
        let base = params.tensors()?.into_iter().collect();
        let mut pb = ParamBuilder::for_stage(base, 1, policy, &dev);
        let mut lora_cfg = model.cfg.clone();
        lora_cfg.lora_scale = Some(spec.scale());
        model = Transformer::build(&lora_cfg, &mut pb, &dev)?;
        params = pb.finish_stage().0;
    }
    if a.gradient_checkpointing {
        let sink = stackwise_worker::models::recompute::GradSink::new(a.lora_r.is_some());
        model.recompute = Some(std::sync::Arc::new(sink));
    }
    let mut opt = AdamW::new(
        &params.vars,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )?;
    let (vocab, seq) = (a.shape.vocab, a.shape.seq);
    let mut rng = Rng::new(7);
    let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..a.batch)
        .map(|_| {
            let ids = (0..seq).map(|_| rng.below(vocab as u64) as u32).collect();
            (ids, vec![1.0; seq])
        })
        .collect();
    let batch = [Batch::from_rows(&rows, &dev)?];
    let mut times = Vec::new();
    let mut cpu_times = Vec::new();
    let mut loss = 0.0;
    for i in 0..=a.steps {
        let t = Instant::now();
        let cpu = process_cpu_seconds();
        // The step ends with the loss on the host, so on a GPU its time includes the kernels.
        loss = train_step(
            &model,
            &params,
            &mut opt,
            &batch,
            Some(1.0),
            1e-4,
            &mut Local,
        )?
        .loss;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
            cpu_times.push(process_cpu_seconds() - cpu);
        }
    }
    if a.phases {
        print_phases(&model, &params, &mut opt, &batch[0])?;
    }
    let s_per_step = median(times.clone());
    let flops =
        (a.lora_r.is_none() && !a.gradient_checkpointing).then(|| step_flops(&model.cfg, a.batch));
    println!(
        "{}",
        serde_json::json!({
            "impl": "stackwise", "device": a.device.to_string(), "autocast": format!("{:?}", a.autocast).to_lowercase(),
            "lora_r": a.lora_r, "batch": a.batch, "seq": seq, "s_per_step": s_per_step, "all_s_per_step": times,
            "tokens_per_s": (a.batch * seq) as f64 / s_per_step, "params": params.count(), "last_loss": loss,
            "matmul_flops_per_step": flops, "gflops": flops.map(|f| f / s_per_step / 1e9),
            "cpu_s_per_step": median(cpu_times), "simd": stackwise_worker::ops::simd_level(),
        })
    );
    Ok(())
}

/// CPU time (user + system) of this process and all its threads so far. Beside wall time,
/// it shows a step's cost without the time a busy host took the cores away (steal time counts
/// in neither), though it also counts threads spinning while they wait for work.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// The FLOPs of a full training step's matrix products (GPT-2 layout: the four projections of a
/// block, attention scores and mixing over all T x T pairs as the model computes them, the
/// vocabulary head): the forward's 2 x M x K x N each, and twice that in the backward (the
/// inputs' and the weights' gradients).
fn step_flops(cfg: &stackwise_common::config::ModelConfig, batch: usize) -> f64 {
    let (d, t, l) = (cfg.d_model as f64, cfg.seq_len as f64, cfg.n_layers as f64);
    let tokens = batch as f64 * t;
    let weights = l * (4.0 * d * d + 2.0 * d * cfg.d_ff as f64) + cfg.vocab_size as f64 * d;
    let attention = l * 2.0 * 2.0 * batch as f64 * t * t * d;
    3.0 * (2.0 * tokens * weights + attention)
}

/// Where a step's time goes: the same work as `train_step`, split by phase.
fn print_phases(
    model: &Transformer,
    params: &Params,
    opt: &mut AdamW,
    batch: &Batch,
) -> Result<()> {
    let t = Instant::now();
    let loss = (nll_sum(model, batch)? / batch.weight()?)?;
    let _ = loss.to_scalar::<f32>()?;
    let fwd = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let g = loss.backward()?;
    let bwd = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut grads = params.grads(&g);
    // As in `train_step`: the rest of the gradient store is gone before the update.
    drop(g);
    clip_grad_norm(&mut grads, Some(1.0))?;
    let clip = t.elapsed().as_secs_f64();
    let t = Instant::now();
    opt.step(&grads, 1e-4)?;
    let adam = t.elapsed().as_secs_f64();
    eprintln!(
        "phases (s): forward {fwd:.3} | backward {bwd:.3} | clip {clip:.3} | adamw {adam:.3}"
    );
    Ok(())
}

fn generate_bench(a: GenerateBenchArgs) -> Result<()> {
    if a.rounds == 0 || a.new_tokens == 0 || a.prompt_tokens == 0 {
        bail!("--rounds, --new-tokens and --prompt-tokens must be at least 1");
    }
    let dev = stackwise_worker::device::open(a.device)?;
    let mut model = match &a.model {
        Some(dir) => hf::load_model_dir(dir, &dev)?.0,
        None => a.shape.random_model(&dev)?.0,
    };
    model.prepare_for_decoding()?;
    let (vocab, ctx) = (model.cfg.vocab_size, model.cfg.seq_len);
    if a.prompt_tokens + a.new_tokens > ctx {
        bail!(
            "--prompt-tokens {} + --new-tokens {} exceed the model's {ctx} positions",
            a.prompt_tokens,
            a.new_tokens
        );
    }
    let mut rng = Rng::new(11);
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    let cfg = SamplingConfig {
        temperature: 0.0,
        top_k: None,
        max_new_tokens: a.new_tokens,
        min_new_tokens: a.new_tokens,
        eos_token_id: None,
        ..Default::default()
    };
    generate(
        &model,
        &prompt,
        &SamplingConfig {
            max_new_tokens: 8,
            min_new_tokens: 8,
            ..cfg.clone()
        },
    )?;
    let mut rates = Vec::new();
    let mut tokens = Vec::new();
    for _ in 0..a.rounds {
        let g = generate(&model, &prompt, &cfg)?;
        rates.push(g.tokens_per_s);
        tokens = g.tokens;
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "stackwise", "device": a.device.to_string(), "prompt": prompt, "new_tokens": tokens.len(),
            "tokens": tokens, "tokens_per_s": median(rates.clone()), "all_tokens_per_s": rates,
        })
    );
    Ok(())
}
