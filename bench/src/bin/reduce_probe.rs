//! Probe: cost of the reductions and layout copies candle's backward performs per step.
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn time(label: &str, reps: usize, f: impl Fn() -> candle_core::Result<Tensor>) -> Result<()> {
    f()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    println!(
        "{label:40} {:8.2} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    Ok(())
}

fn main() -> Result<()> {
    stackwise_worker::alloc::tune_for_training();
    let dev = Device::Cpu;
    let g = Tensor::randn(0f32, 1.0, (2048, 1536), &dev)?;
    time("sum over rows (2048,1536) dim0", 10, || g.sum_keepdim(0))?;
    time("sum over rows via ones matmul", 10, || {
        Tensor::ones((1, 2048), candle_core::DType::F32, &dev)?.matmul(&g)
    })?;
    let g3 = Tensor::randn(0f32, 1.0, (8, 256, 1536), &dev)?;
    time("sum (8,256,1536) dims 0,1", 10, || g3.sum_keepdim((0, 1)))?;
    let x = Tensor::randn(0f32, 1.0, (8, 256, 6, 64), &dev)?;
    time("transpose(1,2).contiguous (8,256,6,64)", 10, || {
        x.transpose(1, 2)?.contiguous()
    })?;
    let a = Tensor::randn(0f32, 1.0, (2048, 1536), &dev)?;
    time("add (2048,1536)", 10, || &a + &g)?;
    time("zeros_like (2048,1536)", 10, || a.zeros_like())?;
    Ok(())
}
