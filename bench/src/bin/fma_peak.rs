//! The CPU's f32 FMA peak, measured: each thread runs independent chains of vector FMAs
//! (AVX-512 or AVX2 + FMA, whichever the CPU has; 16 / 12 accumulators, more than the FMA
//! latency x throughput, so the units never wait) for about half a second, on `--threads`
//! threads at once. Prints one JSON line: the instruction set, the threads and GFLOP/s.
//! `bench/train_throughput.sh` divides a training step's FLOP rate by it.

use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds each thread runs.
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
    /// Stop at AVX2 + FMA even where the CPU has AVX-512 (the peak of an AVX2 build).
    #[arg(long)]
    avx2: bool,
}

/// FLOPs done by one call of `chains` (per kernel: accumulators x lanes x 2 x iterations).
#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    pub const ITERS: usize = 1 << 16;

    /// 16 chains of 16-lane FMAs: 16 * 16 * 2 FLOPs an iteration.
    #[target_feature(enable = "avx512f")]
    pub fn avx512(seed: f32) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(seed); 16];
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    /// 12 chains of 8-lane FMAs: 12 * 8 * 2 FLOPs an iteration.
    #[target_feature(enable = "avx2,fma")]
    pub fn avx2(seed: f32) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(seed); 12];
        for _ in 0..ITERS {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        // SAFETY: `out` holds 8 f32, what an unaligned 256-bit store writes.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    #[cfg(not(target_arch = "x86_64"))]
    anyhow::bail!("the FMA probe is written for x86-64");
    #[cfg(target_arch = "x86_64")]
    {
        let (isa, flops_per_call, kernel): (&str, f64, fn(f32) -> f32) =
            if is_x86_feature_detected!("avx512f") && !a.avx2 {
                // SAFETY (both arms): the CPU has the features the kernel is compiled for.
                (
                    "avx512f",
                    (16 * 16 * 2 * kernels::ITERS) as f64,
                    |s| unsafe { kernels::avx512(s) },
                )
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                (
                    "avx2+fma",
                    (12 * 8 * 2 * kernels::ITERS) as f64,
                    |s| unsafe { kernels::avx2(s) },
                )
            } else {
                anyhow::bail!("no AVX2 + FMA on this CPU");
            };
        kernel(1.0); // warm up (clock ramp)
        let start = Instant::now();
        let calls: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.threads)
                .map(|t| {
                    s.spawn(move || {
                        let (mut n, mut sink) = (0u64, 0f32);
                        let t0 = Instant::now();
                        while t0.elapsed().as_secs_f64() < a.seconds {
                            sink += kernel(t as f32 + 1.0);
                            n += 1;
                        }
                        std::hint::black_box(sink);
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let secs = start.elapsed().as_secs_f64();
        let gflops = calls.iter().sum::<u64>() as f64 * flops_per_call / secs / 1e9;
        println!(
            "{}",
            serde_json::json!({"isa": isa, "threads": a.threads, "gflops": gflops})
        );
        Ok(())
    }
}
