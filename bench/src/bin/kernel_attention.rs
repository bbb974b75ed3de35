//! Kernel (linear) attention: forward + backward time of the linear (chunked running-sum)
//! form against the quadratic form, the peer, at growing sequence lengths. The linear form's
//! time should grow about linearly with T (x4 per x4 in T); the quadratic's about x16.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use clap::Parser;
use stackwise_worker::models::kernel_attention::{kernel_attention, kernel_attention_quadratic};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096,16384")]
    t: Vec<usize>,
    /// Heads and head dimension (batch 1).
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Timed repetitions (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Also time the quadratic form up to this T (it needs T^2 memory per head).
    #[arg(long, default_value_t = 4096)]
    quadratic_up_to: usize,
}

type Attn = fn(&Tensor, &Tensor, &Tensor, bool) -> candle_core::Result<Tensor>;

/// Median seconds of one causal forward + backward.
fn time(f: Attn, t: usize, a: &Args) -> Result<f64> {
    let shape = (1, a.heads, t, a.head_dim);
    let q = Var::randn(0f32, 1.0, shape, &Device::Cpu)?;
    let k = Var::randn(0f32, 1.0, shape, &Device::Cpu)?;
    let v = Var::randn(0f32, 1.0, shape, &Device::Cpu)?;
    let mut secs = Vec::new();
    for rep in 0..=a.reps {
        let start = Instant::now();
        let y = f(&q, &k, &v, true)?;
        let grads = y.sum_all()?.backward()?;
        std::hint::black_box(grads.get(&q).is_some());
        if rep > 0 {
            secs.push(start.elapsed().as_secs_f64());
        }
    }
    secs.sort_by(f64::total_cmp);
    Ok(secs[secs.len() / 2])
}

fn main() -> Result<()> {
    let a = Args::parse();
    println!(
        "kernel attention, causal forward + backward, batch 1, {} heads x {} dims, median of {}",
        a.heads, a.head_dim, a.reps
    );
    println!(
        "{:>6} {:>12} {:>12} {:>10} {:>10}",
        "T", "linear ms", "quadratic ms", "speedup", "growth"
    );
    let mut last: Option<(usize, f64)> = None;
    for &t in &a.t {
        let lin = time(kernel_attention, t, &a)?;
        let quad = (t <= a.quadratic_up_to)
            .then(|| time(kernel_attention_quadratic, t, &a))
            .transpose()?;
        let growth = last.map_or("-".to_string(), |(t0, s0)| {
            format!("x{:.2} for x{}", lin / s0, t / t0)
        });
        println!(
            "{t:>6} {:>12.1} {:>12} {:>10} {:>10}",
            lin * 1e3,
            quad.map_or("-".into(), |q| format!("{:.1}", q * 1e3)),
            quad.map_or("-".into(), |q| format!("{:.1}x", q / lin)),
            growth
        );
        last = Some((t, lin));
    }
    Ok(())
}
