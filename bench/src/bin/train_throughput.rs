//! Training throughput of one full step (forward, backward, clip, AdamW) of a GPT-2-style model
//! on random tokens, through the same `train::step` code the trainer runs; with `--lora-r`, of
//! LoRA adapters on the frozen model (what `stackwise finetune --mode lora` trains). Prints one
//! JSON line.

use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use clap::Parser;
use stackwise_common::config::Precision;
use stackwise_common::plan::LoraSpec;
use stackwise_common::rng::Rng;
use stackwise_worker::comm::Local;
use stackwise_worker::models::params::StagePolicy;
use stackwise_worker::models::{ParamBuilder, Params};
use stackwise_worker::models::{RawModelConfig, Transformer};
use stackwise_worker::objectives::Batch;
use stackwise_worker::objectives::nll_sum;
use stackwise_worker::optim::adamw::clip_grad_norm;
use stackwise_worker::optim::{AdamW, AdamWConfig};
use stackwise_worker::train::step::train_step;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 6)]
    layers: usize,
    #[arg(long, default_value_t = 384)]
    d_model: usize,
    #[arg(long, default_value_t = 6)]
    heads: usize,
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (after one untimed warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Also time the phases of a step (forward, backward, clip, AdamW) and print them.
    #[arg(long)]
    phases: bool,
    /// Train LoRA adapters of this rank on a frozen base instead of every weight.
    #[arg(long)]
    lora_r: Option<usize>,
    /// Recompute each block in the backward (gradient checkpointing).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The adapted projections (PEFT's suffix match).
    #[arg(long, value_delimiter = ',', default_value = "c_attn,c_proj")]
    lora_targets: Vec<String>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    stackwise_worker::alloc::tune_for_training();
    let cfg = RawModelConfig {
        d_model: Some(a.d_model),
        n_layers: Some(a.layers),
        n_heads: Some(a.heads),
        vocab_size: Some(a.vocab),
        seq_len: Some(a.seq),
        ..Default::default()
    }
    .resolve(None)?;
    let dev = Device::Cpu;
    let (mut model, mut params) = Transformer::init(&cfg, 1, &dev)?;
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
        let mut lora_cfg = cfg.clone();
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
    let mut rng = Rng::new(7);
    let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..a.batch)
        .map(|_| {
            (
                (0..a.seq)
                    .map(|_| rng.below(a.vocab as u64) as u32)
                    .collect(),
                vec![1.0; a.seq],
            )
        })
        .collect();
    let batch = [Batch::from_rows(&rows, &dev)?];
    let mut times = Vec::new();
    let mut loss = 0.0;
    for i in 0..=a.steps {
        let t = Instant::now();
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
        }
    }
    if a.phases {
        print_phases(&model, &params, &mut opt, &batch[0])?;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "stackwise", "lora_r": a.lora_r, "s_per_step": median, "all_s_per_step": times,
            "tokens_per_s": (a.batch * a.seq) as f64 / median, "params": params.count(), "last_loss": loss,
        })
    );
    Ok(())
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
    let mut grads: std::collections::HashMap<String, candle_core::Tensor> = params
        .vars
        .iter()
        .filter_map(|(n, v)| g.get(v.as_tensor()).map(|t| (n.clone(), t.clone())))
        .collect();
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
