//! Ring all-reduce bus bandwidth between processes on this machine.
//!   allreduce --world 2 --sizes-mib 1,16,64,256 --iters 5
//! starts `world` copies of itself (one per rank, joined by the ring over 127.0.0.1: its links
//! through shared memory, or TCP with STACKWISE_RING_SHM=0) and
//! prints one JSON line per size: median seconds and bus bandwidth, 2(w-1)/w * bytes / time,
//! the figure NCCL and torch.distributed benchmarks report. Every rank also checks one
//! all-reduce per size element by element against the exact sum.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use stackwise_worker::comm::{Comm, Ring, RingKey, RingListener, RingOptions, Seat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2)]
    world: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    sizes_mib: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Internal: run as this rank with these ring ports.
    #[arg(long, hide = true)]
    rank: Option<usize>,
    #[arg(long, hide = true, value_delimiter = ',')]
    ports: Vec<u16>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    match a.rank {
        Some(rank) => run_rank(&a, rank),
        None => {
            // Reserve ports, then hand them to the ranks (each binds its own).
            let ports: Vec<u16> = (0..a.world)
                .map(|_| {
                    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                        .local_addr()?
                        .port())
                })
                .collect::<Result<_>>()?;
            let list = ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let exe = std::env::current_exe()?;
            let sizes = a
                .sizes_mib
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let children: Vec<_> = (0..a.world)
                .map(|r| {
                    Command::new(&exe)
                        .args(["--world", &a.world.to_string(), "--sizes-mib", &sizes])
                        .args([
                            "--iters",
                            &a.iters.to_string(),
                            "--rank",
                            &r.to_string(),
                            "--ports",
                            &list,
                        ])
                        .stdout(if r == 0 {
                            Stdio::inherit()
                        } else {
                            Stdio::null()
                        })
                        .spawn()
                        .context("start a rank")
                })
                .collect::<Result<_>>()?;
            for mut c in children {
                let st = c.wait()?;
                anyhow::ensure!(st.success(), "a rank failed: {st}");
            }
            Ok(())
        }
    }
}

fn run_rank(a: &Args, rank: usize) -> Result<()> {
    let listener = RingListener::bind(&format!("127.0.0.1:{}", a.ports[rank]))?;
    let peers: Vec<String> = a.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut ring = Ring::connect(
        &listener,
        Seat {
            next_peer: &peers[(rank + 1) % peers.len()],
            rank,
            world: peers.len(),
        },
        1,
        1,
        &RingOptions {
            key: RingKey::derive(None, b"allreduce benchmark"),
            connect_timeout: Duration::from_secs(30),
            collective_timeout: Duration::from_secs(600),
            shared_memory: RingOptions::shared_memory_from_env(),
        },
        Arc::default(),
    )?;
    let w = a.world as f64;
    for &mib in &a.sizes_mib {
        let n = mib * (1 << 20) / 4;
        let mut buf: Vec<f32> = (0..n).map(|i| (i % 97) as f32 + rank as f32).collect();
        ring.all_reduce_sum(&mut buf)?; // warm-up
        let mut times = Vec::new();
        for _ in 0..a.iters {
            ring.barrier()?;
            let t = Instant::now();
            ring.all_reduce_sum(&mut buf)?;
            times.push(t.elapsed().as_secs_f64());
        }
        // Correctness: small integers sum exactly in f32, so the result is known.
        for (i, v) in buf.iter_mut().enumerate() {
            *v = (i % 97) as f32 + rank as f32;
        }
        ring.all_reduce_sum(&mut buf)?;
        let ranks = a.world as f32 * (a.world as f32 - 1.0) / 2.0;
        let wrong = buf
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != a.world as f32 * (i % 97) as f32 + ranks)
            .count();
        anyhow::ensure!(
            wrong == 0,
            "rank {rank}: {wrong} of {n} sums wrong at {mib} MiB"
        );
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        let bytes = (n * 4) as f64;
        if rank == 0 {
            println!(
                "{}",
                serde_json::json!({"impl": "stackwise-ring", "transport": ring.transport(), "world": a.world, "mib": mib, "seconds": med,
                    "busbw_gbps": 2.0 * (w - 1.0) / w * bytes / med / 1e9, "sums_exact": true})
            );
        }
    }
    Ok(())
}
