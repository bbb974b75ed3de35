//! The matmuls of one GPT-2-style training step (6 layers, d=384, vocab 8192, 2048 tokens),
//! forward and backward, timed as candle runs them: backward operands are transposed views.
//! Tells how much of a step is matrix multiplication and how fast each layout runs.

use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time(f: impl Fn() -> candle_core::Result<Tensor>) -> Result<f64> {
    f()?;
    let t = Instant::now();
    for _ in 0..3 {
        f()?;
    }
    Ok(t.elapsed().as_secs_f64() / 3.0)
}

fn main() -> Result<()> {
    stackwise_worker::alloc::tune_for_training();
    let dev = Device::Cpu;
    let (n, d, v, layers) = (2048, 384, 8192, 6);
    // (in, out) of every Conv1D projection in a block, then the tied head.
    let shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)];
    let (mut fwd, mut bwd_x, mut bwd_w) = (0.0, 0.0, 0.0);
    for &(i, o) in &shapes {
        let x = Tensor::randn(0f32, 1.0, (n, i), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (i, o), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (n, o), &dev)?;
        fwd += layers as f64 * time(|| x.matmul(&w))?;
        bwd_x += layers as f64 * time(|| g.matmul(&w.t()?))?;
        bwd_w += layers as f64 * time(|| x.t()?.matmul(&g))?;
    }
    let h = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
    let wte = Tensor::randn(0f32, 1.0, (v, d), &dev)?;
    let gl = Tensor::randn(0f32, 1.0, (n, v), &dev)?;
    let head_f = time(|| h.matmul(&wte.t()?))?;
    let head_bx = time(|| gl.matmul(&wte))?;
    let head_bw = time(|| gl.t()?.matmul(&h))?;
    // Attention: (B*H, T, hd) x (B*H, hd, T) and back.
    let q = Tensor::randn(0f32, 1.0, (8, 6, 256, 64), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (8, 6, 256, 64), &dev)?;
    let p = Tensor::randn(0f32, 1.0, (8, 6, 256, 256), &dev)?;
    let att_f = layers as f64 * (time(|| q.matmul(&k.t()?))? + time(|| p.matmul(&k))?);
    let att_b = layers as f64
        * (time(|| p.matmul(&k))?
            + time(|| p.t()?.matmul(&q))?
            + time(|| p.matmul(&k))?
            + time(|| q.matmul(&k.t()?))?);
    println!(
        "{}",
        serde_json::json!({
            "forward_linear_s": fwd, "backward_dx_s": bwd_x, "backward_dw_s": bwd_w,
            "head_forward_s": head_f, "head_backward_dx_s": head_bx, "head_backward_dw_s": head_bw,
            "attention_forward_s": att_f, "attention_backward_s": att_b,
            "total_forward_s": fwd + head_f + att_f, "total_backward_s": bwd_x + bwd_w + head_bx + head_bw + att_b,
        })
    );
    Ok(())
}
