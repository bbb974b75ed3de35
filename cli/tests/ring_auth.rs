//! The ring's ports under attack during a real run: a coordinator and two worker processes
//! on 127.0.0.1, with idle, garbage and wrong-MAC connections made to both ring ports from
//! before the workers start until the job ends. The run must end bitwise equal to an
//! undisturbed one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{KillOnDrop, bin, weights};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(dir: &Path, data: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!(
            "run: {{name: {name}, output: {out}, seed: 5}}
model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
data: {{path: {data}}}
training: {{steps: 150, batch_size: 8, lr: 1.0e-3, warmup_steps: 1, eval_every: 50, eval_batches: 2, checkpoint_every: 50, log_every: 10}}
",
            out = dir.display(),
            data = data.display()
        ),
    )
    .unwrap();
    p
}

/// One round of unwanted visitors on `port`; returns how many connected.
fn disturb(port: u16, round: usize) -> usize {
    let addr = format!("127.0.0.1:{port}");
    let mut connected = 0;
    // Idle: connect and say nothing (held open until the next round).
    let idle = TcpStream::connect(&addr).ok();
    connected += idle.is_some() as usize;
    // Garbage of odd sizes.
    if let Ok(mut s) = TcpStream::connect(&addr) {
        connected += 1;
        let junk: Vec<u8> = (0..(17 + round * 131) % 5000).map(|i| i as u8).collect();
        let _ = s.write_all(&junk);
    }
    // A well-formed ring hello (magic "STKWRING", rank 0 of 2) with a nonce, then a wrong
    // MAC for whatever the listener answers.
    if let Ok(mut s) = TcpStream::connect(&addr) {
        connected += 1;
        let mut frame = Vec::new();
        frame.extend_from_slice(&0x5354_4b57_5249_4e47u64.to_le_bytes());
        frame.extend_from_slice(&(round as u64).to_le_bytes());
        frame.extend_from_slice(&1u64.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&2u32.to_le_bytes());
        frame.extend_from_slice(&[7u8; 16]);
        let _ = s.write_all(&frame);
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut reply = [0u8; 48];
        let _ = s.read_exact(&mut reply);
        let _ = s.write_all(&[0xEE; 32]);
    }
    std::thread::sleep(Duration::from_millis(20));
    drop(idle);
    connected
}

/// Run `cfg` as a coordinator and two worker processes, with strangers on both ring ports
/// from before the workers start until the job ends when `disturbed`. Returns how many
/// stranger connections were made.
fn run_job(dir: &Path, cfg: &Path, disturbed: bool) -> usize {
    let token = dir.join("token");
    std::fs::write(&token, "ring-test-token\n").unwrap();
    let coord_port = free_port();
    let ring_ports = [free_port(), free_port()];
    let stop = Arc::new(AtomicBool::new(!disturbed));
    let visits = Arc::new(AtomicUsize::new(0));
    let disturbers: Vec<_> = ring_ports
        .iter()
        .map(|&port| {
            let (stop, visits) = (stop.clone(), visits.clone());
            std::thread::spawn(move || {
                let mut round = 0;
                while !stop.load(Ordering::SeqCst) {
                    visits.fetch_add(disturb(port, round), Ordering::SeqCst);
                    round += 1;
                }
            })
        })
        .collect();
    let url = format!("http://127.0.0.1:{coord_port}");
    let mut coordinator = KillOnDrop(
        bin()
            .arg("coordinator")
            .arg("--config")
            .arg(cfg)
            .args(["--bind", &format!("127.0.0.1:{coord_port}")])
            .args(["--min-workers", "2", "--max-workers", "2"])
            .arg("--token-file")
            .arg(&token)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _workers: Vec<_> = ring_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            KillOnDrop(
                bin()
                    .args(["worker", "--coordinator", &url, "--name", &format!("w{i}")])
                    .args(["--ring-bind", &format!("127.0.0.1:{port}")])
                    .arg("--token-file")
                    .arg(&token)
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = coordinator.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the job did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, Ordering::SeqCst);
    for d in disturbers {
        d.join().unwrap();
    }
    assert!(
        status.success(),
        "the job failed (disturbed: {disturbed}): {status}"
    );
    visits.load(Ordering::SeqCst)
}

#[test]
fn strangers_on_the_ring_ports_during_a_run_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 40_000);
    let final_weights = |name: &str| -> Vec<(String, Vec<u32>)> {
        weights(&dir.path().join(format!(
            "runs/{name}/checkpoints/step-00000150/model.safetensors"
        )))
        .into_iter()
        .map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect()))
        .collect()
    };
    let clean = config(dir.path(), &data, "clean");
    assert_eq!(run_job(dir.path(), &clean, false), 0);
    let disturbed = config(dir.path(), &data, "disturbed");
    let visits = run_job(dir.path(), &disturbed, true);
    assert!(visits >= 30, "only {visits} stranger connections were made");

    let (a, b) = (final_weights("clean"), final_weights("disturbed"));
    assert_eq!(a.len(), b.len());
    let differing: Vec<&String> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| &x.0)
        .collect();
    assert!(
        differing.is_empty(),
        "the disturbed run's weights differ from the undisturbed run's in {differing:?}"
    );
}
