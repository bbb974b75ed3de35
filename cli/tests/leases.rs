//! Leases seen from the worker's side, on real processes: a coordinator that stops
//! answering heartbeats (here SIGSTOP: the process hangs, its sockets stay open) costs the
//! worker its lease, so the worker ends the session instead of working on, and rejoins once
//! the coordinator answers again.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{bin, start_until};

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, marker: &str, limit: Duration) -> String {
    let t = Instant::now();
    let mut seen = Vec::new();
    while t.elapsed() < limit {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            if l.contains(marker) {
                return l;
            }
            seen.push(l);
        }
    }
    panic!("no {marker:?} within {limit:?} in:\n{}", seen.join("\n"));
}

#[test]
fn a_worker_whose_heartbeats_go_unanswered_for_a_lease_ends_its_session_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    let cfg = common::tiny_job(
        dir.path(),
        "hang",
        &data,
        "steps: 5, batch_size: 2, warmup_steps: 1",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Two workers wanted and one comes: the job waits, and only heartbeats flow.
    let mut coordinator = bin();
    coordinator
        .args(["coordinator", "--config"])
        .arg(&cfg)
        .args(["--bind", &format!("127.0.0.1:{port}"), "--min-workers", "2"])
        .args(["--lease-ms", "1500", "--heartbeat-ms", "300"])
        .env("STACKWISE_TOKEN", "t0ken");
    let (coordinator, _) = start_until(coordinator, "listening on");
    let mut worker = bin();
    worker
        .args([
            "worker",
            "--coordinator",
            &format!("http://127.0.0.1:{port}"),
        ])
        .env("STACKWISE_TOKEN", "t0ken")
        .env("RUST_LOG", "info");
    let (_worker, lines) = start_until(worker, "registered");
    std::thread::sleep(Duration::from_secs(2)); // heartbeats are answered: still in session
    let t = Instant::now();
    signal(coordinator.0.id(), "-STOP");
    let gone = wait_line(&lines, "answered no heartbeat", Duration::from_secs(15));
    let after = t.elapsed();
    signal(coordinator.0.id(), "-CONT");
    assert!(gone.contains("1.5s (the lease)"), "{gone}");
    assert!(
        after >= Duration::from_millis(1000),
        "the worker must wait out its lease (about 1.5 s after the last answer), not {after:?}"
    );
    wait_line(&lines, "registered", Duration::from_secs(30));
}
