//! The distributed runtime on real processes and real sockets over 127.0.0.1: data-parallel
//! equivalence, the shared token, generation fencing, leases, and a killed worker.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use stackwise_common::config::TrainingSection;
use stackwise_coordinator::{Coordinator, GroupOptions, JobSpec, OnWorkerLoss, Phase};
use stackwise_proto::model::{Fence, Report, StepMetrics, WorkerReport};
use stackwise_proto::{PROTOCOL_VERSION, pb};
use stackwise_worker::runtime::Target;

mod common;
use common::{KillOnDrop, bin, run, stderr, weights};

fn dataset(dir: &Path) -> PathBuf {
    common::dataset(dir, 40_000)
}

fn config(dir: &Path, data: &Path, steps: u64, batch: usize) -> PathBuf {
    let p = dir.join("dp.yaml");
    std::fs::write(
        &p,
        format!(
            "run: {{name: dp, output: {out}, seed: 11}}
model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
data: {{path: {data}}}
training: {{steps: {steps}, batch_size: {batch}, lr: 1.0e-3, warmup_steps: 1, eval_every: 5, eval_batches: 2, checkpoint_every: 5, log_every: 1}}
",
            out = dir.join("out").display(),
            data = data.display()
        ),
    )
    .unwrap();
    p
}

fn losses(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_workers_with_half_batches_equal_one_worker_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, 5, 8);
    for (workers, name) in [(1, "one"), (2, "two")] {
        let o = run(bin()
            .arg("launch")
            .arg(&cfg)
            .args(["--workers", &workers.to_string(), "--json", "--set"])
            .arg(format!("run.name={name}")));
        assert!(o.status.success(), "{workers} worker(s): {}", stderr(&o));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["step"], 5);
        assert_eq!(summary["workers"], workers);
        if workers == 2 {
            // Log lines carry the rank; the ring was used.
            let err = stderr(&o);
            assert!(
                err.contains("[rank 1]") && err.contains("ring backend"),
                "{err}"
            );
        }
    }
    let runs = dir.path().join("out/runs");
    let (one, two) = (
        weights(&runs.join("one/checkpoints/step-00000005/model.safetensors")),
        weights(&runs.join("two/checkpoints/step-00000005/model.safetensors")),
    );
    assert_eq!(one.len(), two.len());
    let mut worst = 0f32;
    for ((n1, a), (n2, b)) in one.iter().zip(&two) {
        assert_eq!(n1, n2);
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-6, "weights differ by {worst}");
    let (l1, l2) = (losses(&runs.join("one")), losses(&runs.join("two")));
    assert_eq!(l1.len(), 5);
    for (a, b) in l1.iter().zip(&l2) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "loss curves differ: {l1:?} vs {l2:?}"
        );
    }
    // The workers really ran as one group: rank 1 wrote nothing of its own.
    assert_eq!(
        std::fs::read_to_string(runs.join("two/metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        5
    );
}

#[test]
fn in_process_mode_trains_too() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, 3, 4);
    let o = run(bin()
        .arg("launch")
        .arg(&cfg)
        .args(["--workers", "2", "--in-process", "--json"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["step"], 3);
}

#[test]
fn a_killed_worker_stops_the_job_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, 100_000, 4);
    let mut child = KillOnDrop(
        bin()
            .arg("launch")
            .arg(&cfg)
            .args(["--workers", "2"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut pid = None;
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.strip_prefix("launch: started worker local-1 (pid ") {
            pid = Some(rest.trim_end_matches(')').to_string());
        }
        if line.starts_with("[rank 0] step") && line.contains("step      3/") {
            break;
        }
    }
    let pid = pid.unwrap_or_else(|| panic!("no pid in:\n{log}"));
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.0.wait().unwrap();
    let rest = rest.join("\n");
    assert!(!status.success());
    // Ranks follow registration order, so local-1 may be rank 0 or 1.
    assert!(
        rest.contains("error: worker local-1 (rank ")
            && rest.contains(&format!(
                "pid {pid}) was killed by signal 9 (SIGKILL); stopping the job"
            )),
        "{rest}"
    );
    assert!(rest.contains("error:"), "{rest}");
}

fn spec(dir: &Path, min: usize, lease_ms: u64) -> JobSpec {
    let training = TrainingSection {
        steps: 10,
        ..Default::default()
    };
    JobSpec {
        run_id: "fence".into(),
        config_yaml: "data: {path: nowhere}".into(),
        plan: stackwise_common::plan::plan(&training, 2).unwrap(),
        run_uri: dir.display().to_string(),
        batch_size: 4,
        group: GroupOptions {
            min_workers: min,
            max_workers: min,
            lease: Duration::from_millis(lease_ms),
            heartbeat: Duration::from_millis(lease_ms / 5),
            rendezvous_grace: Duration::ZERO,
            resume: false,
            on_worker_loss: OnWorkerLoss::Stop,
            until_step: None,
        },
    }
}

fn register_request() -> pb::RegisterRequest {
    pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        name: "fake".into(),
        capabilities: Some(pb::Capabilities {
            device_kind: "cpu".into(),
            device: "cpu".into(),
            ..Default::default()
        }),
        ring_address: "127.0.0.1:9".into(),
    }
}

fn msg(generation: u64, worker: &str, report: Report) -> pb::WorkerMessage {
    WorkerReport {
        fence: Fence {
            run_id: "fence".into(),
            generation,
        },
        worker_id: worker.into(),
        report,
    }
    .into_pb()
}

fn hello(reg: &pb::RegisterResponse) -> Report {
    Report::Hello {
        session_secret: reg.session_secret.clone(),
    }
}

fn step_report(step: u64) -> Report {
    Report::Step(StepMetrics {
        stage: 0,
        step,
        total_steps: 10,
        loss: 1.0,
        lr: 1e-3,
        grad_norm: 1.0,
        tokens: 10,
        tokens_per_s: 10.0,
        val_loss: None,
        skipped: false,
        allreduce_seconds: 0.01,
    })
}

#[tokio::test]
async fn calls_without_the_token_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(
        spec(dir.path(), 1, 5000),
        "127.0.0.1:0",
        Some("s3cret".into()),
        None,
    )
    .await
    .unwrap();
    let url = format!("http://{}", coord.addr);
    for token in [None, Some("wrong".to_string())] {
        let mut c = Target {
            url: url.clone(),
            token,
            tls_ca: None,
        }
        .connect()
        .await
        .unwrap();
        let e = c.status(pb::StatusRequest {}).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = c.register(register_request()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    let mut ok = Target {
        url,
        token: Some("s3cret".into()),
        tls_ca: None,
    }
    .connect()
    .await
    .unwrap();
    assert_eq!(
        ok.status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .state,
        "waiting"
    );
    coord.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn stale_generation_reports_are_dropped_and_foreign_run_reports_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(spec(dir.path(), 1, 5000), "127.0.0.1:0", None, None)
        .await
        .unwrap();
    let target = Target {
        url: format!("http://{}", coord.addr),
        token: None,
        tls_ca: None,
    };
    let mut c = target.connect().await.unwrap();
    let reg = c.register(register_request()).await.unwrap().into_inner();
    let id = reg.worker_id.clone();
    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    up.send(msg(0, &id, hello(&reg))).unwrap();
    let mut down = c
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // The group of one forms: generation 1.
    let first = down.message().await.unwrap().unwrap();
    assert_eq!(first.generation, 1);
    assert!(matches!(
        first.body,
        Some(pb::coordinator_message::Body::RunStage(_))
    ));
    // A report of the current generation is accepted...
    up.send(msg(1, &id, step_report(1))).unwrap();
    // ...one from generation 0 is dropped: a late report of an aborted generation is
    // expected, and ending the session for it would make the worker re-register.
    up.send(msg(0, &id, step_report(2))).unwrap();
    up.send(msg(1, &id, step_report(3))).unwrap();
    for _ in 0..100 {
        if coord.status().step == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        coord.status().step,
        3,
        "the session went on after the stale report"
    );
    assert_eq!(
        coord.job().tokens_total,
        20,
        "the reports of steps 1 and 3 were applied (10 tokens each), the stale one not"
    );

    // Another run's report is refused, and ends the session.
    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    up.send(msg(0, &id, hello(&reg))).unwrap();
    let mut down = c
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut foreign = msg(1, &id, step_report(3));
    foreign.run_id = "other-run".into();
    up.send(foreign).unwrap();
    let e = down.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    coord.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_worker_that_stops_heartbeating_is_dropped_within_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_millis(600);
    let coord = Coordinator::start(spec(dir.path(), 2, 600), "127.0.0.1:0", None, None)
        .await
        .unwrap();
    let target = Target {
        url: format!("http://{}", coord.addr),
        token: None,
        tls_ca: None,
    };
    let mut c = target.connect().await.unwrap();
    let reg = c.register(register_request()).await.unwrap().into_inner();
    let id = reg.worker_id.clone();
    // Open the session and then say nothing more (the stream stays open).
    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    up.send(msg(0, &id, hello(&reg))).unwrap();
    let _down = c
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    tokio::time::sleep(lease / 2).await;
    assert_eq!(
        coord.status().workers.len(),
        1,
        "dropped before its lease ran out"
    );
    while !coord.status().workers.is_empty() {
        assert!(
            t0.elapsed() < lease + Duration::from_millis(400),
            "still listed after its lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t0.elapsed() >= lease);
    assert!(matches!(coord.phase(), Phase::Waiting { .. }));
    drop(up);
    coord.shutdown(Duration::ZERO).await;
}

#[test]
fn a_worker_with_a_wrong_token_is_refused_and_status_lists_workers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, 5, 4);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "right-token\n").unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let _coordinator = KillOnDrop(
        bin()
            .arg("coordinator")
            .arg("--config")
            .arg(&cfg)
            .args(["--bind", &format!("127.0.0.1:{port}"), "--min-workers", "2"])
            .arg("--token-file")
            .arg(&token_file)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let wrong = run(bin()
        .args(["worker", "--coordinator", &url, "--rejoin-timeout-s", "20"])
        .env("STACKWISE_TOKEN", "wrong-token"));
    assert!(!wrong.status.success());
    let err = stderr(&wrong);
    assert!(
        err.contains("UNAUTHENTICATED: missing or wrong token"),
        "{err}"
    );

    // One good worker joins (the job waits for two); status shows it.
    let _good = KillOnDrop(
        bin()
            .args(["worker", "--coordinator", &url, "--name", "good-one"])
            .arg("--token-file")
            .arg(&token_file)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut listed = String::new();
    for _ in 0..100 {
        let o = run(bin()
            .args(["status", "--coordinator", &url])
            .arg("--token-file")
            .arg(&token_file));
        listed = String::from_utf8_lossy(&o.stdout).to_string();
        if listed.contains("good-one") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        listed.contains("run dp | waiting")
            && listed.contains("stage 1/1 end-to-end")
            && listed.contains("good-one"),
        "{listed}"
    );
    assert!(
        listed.contains(
            "workers 1 alive (min 2, max 2) | all-reduce 0.000 s/step | checkpoints 0 committed, last - (-)"
        ),
        "{listed}"
    );
    let o = run(bin().args(["status", "--coordinator", &url]));
    assert!(!o.status.success(), "status without the token must fail");
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let tls = stackwise_coordinator::TlsFiles {
        cert_pem: ck.cert.pem().into_bytes(),
        key_pem: ck.signing_key.serialize_pem().into_bytes(),
    };
    let coord = Coordinator::start(
        spec(dir.path(), 1, 5000),
        "127.0.0.1:0",
        Some("t".into()),
        Some(tls),
    )
    .await
    .unwrap();
    let port = coord.addr.port();
    let mut c = Target {
        url: format!("https://localhost:{port}"),
        token: Some("t".into()),
        tls_ca: Some(ca),
    }
    .connect()
    .await
    .unwrap();
    assert_eq!(
        c.status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .run_id,
        "fence"
    );
    // Plain http to the TLS port does not get an answer.
    let plain = Target {
        url: format!("http://127.0.0.1:{port}"),
        token: Some("t".into()),
        tls_ca: None,
    };
    let answered = match plain.connect().await {
        Ok(mut c) => c.status(pb::StatusRequest {}).await.is_ok(),
        Err(_) => false,
    };
    assert!(!answered);
    coord.shutdown(Duration::ZERO).await;
}

fn term_config(dir: &Path, data: &Path) -> PathBuf {
    let cfg = dir.join("term.yaml");
    std::fs::write(
        &cfg,
        format!(
            "run: {{name: term, output: {out}, seed: 4}}
model: {{d_model: 96, n_layers: 2, n_heads: 4, seq_len: 64}}
data: {{path: {data}}}
training: {{steps: 500, batch_size: 8, lr: 1.0e-3, warmup_steps: 5, eval_every: 0, checkpoint_every: 10000, log_every: 1}}
",
            out = dir.join("out").display(),
            data = data.display()
        ),
    )
    .unwrap();
    cfg
}

/// The one checkpoint of the stopped run is at a step in 10..500; `--resume` then ends with
/// the weights of an uninterrupted run.
fn resume_matches_a_clean_run(dir: &Path, cfg: &Path) {
    let ckpts = dir.join("out/runs/term/checkpoints");
    let names: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names.len(),
        1,
        "one checkpoint, at the agreed step: {names:?}"
    );
    let step: u64 = names[0].trim_start_matches("step-").parse().unwrap();
    assert!((10..500).contains(&step), "{step}");
    let resumed = run(&mut common::launch(cfg, 2, &["--resume"]));
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let clean = run(&mut common::launch(cfg, 2, &["--set", "run.name=clean"]));
    assert!(clean.status.success(), "{}", stderr(&clean));
    let last = |run: &str| {
        weights(&dir.join(format!(
            "out/runs/{run}/checkpoints/step-00000500/model.safetensors"
        )))
    };
    assert!(last("term") == last("clean"), "resumed weights differ");
}

#[test]
fn sigterm_checkpoints_at_a_step_all_ranks_agree_on_and_resume_ends_with_the_clean_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = term_config(dir.path(), &data);
    let (mut child, rx) = common::start_until(common::launch(&cfg, 2, &[]), "step     10/500");
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let rest = rest.join("\n");
    assert_eq!(status.code(), Some(143), "{rest}");
    assert!(rest.contains("continue with --resume"), "{rest}");
    resume_matches_a_clean_run(dir.path(), &cfg);
}

#[test]
fn sigterm_to_one_worker_checkpoints_and_stops_the_job_resumably() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = term_config(dir.path(), &data);
    let (mut child, rx) = common::start_until(common::launch(&cfg, 2, &[]), "step     10/500");
    let pid = worker_pid(&child);
    // SAFETY: a plain kill(2) of a worker process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.0.wait().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let rest = rest.join("\n");
    assert!(!status.success(), "{rest}");
    assert!(
        rest.contains("a worker was asked to stop (SIGTERM)")
            && rest.contains("continue with --resume"),
        "{rest}"
    );
    resume_matches_a_clean_run(dir.path(), &cfg);
}

/// The pid of a worker process of the `launch` in `child` (a child of it).
fn worker_pid(child: &KillOnDrop) -> i32 {
    let parent = child.0.id();
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains("worker"))
        })
        .unwrap_or_else(|| panic!("no worker child of {parent}: {children:?}"))
}

#[test]
fn a_panic_on_a_training_thread_fails_the_job_naming_the_worker_and_the_cause() {
    // The panic is injected by the worker runtime (STACKWISE_FAULT_PANIC_AT_STEP) on every
    // worker: with one worker nothing else would ever end the job.
    for workers in [1usize, 2] {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        let cfg = config(dir.path(), &data, 100_000, 4);
        let started = std::time::Instant::now();
        let out = run(bin()
            .arg("launch")
            .arg(&cfg)
            .args(["--workers", &workers.to_string(), "--no-progress"])
            .env("STACKWISE_FAULT_PANIC_AT_STEP", "3"));
        let log = stderr(&out);
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains("failed: the training thread panicked: injected fault at step 3")
                && log.contains("error: worker "),
            "{workers} worker(s):\n{log}"
        );
        // Reported at once, well within the 10 s lease.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
    }
}

#[test]
fn a_corrupt_shard_fails_the_job_naming_the_worker_and_the_shard() {
    for workers in [1usize, 2] {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        let shard = std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "bin"))
            .expect("a shard");
        let bytes = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
        let cfg = config(dir.path(), &data, 10, 4);
        let started = std::time::Instant::now();
        let out = run(bin().arg("launch").arg(&cfg).args([
            "--workers",
            &workers.to_string(),
            "--no-progress",
        ]));
        let log = stderr(&out);
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains("error: worker ") && log.contains("does not match its index (truncated?)"),
            "{workers} worker(s):\n{log}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn session_and_stop_without_the_token_are_refused_and_the_job_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(
        spec(dir.path(), 1, 5000),
        "127.0.0.1:0",
        Some("s3cret".into()),
        None,
    )
    .await
    .unwrap();
    let url = format!("http://{}", coord.addr);
    for token in [None, Some("wrong".to_string())] {
        let mut c = Target {
            url: url.clone(),
            token,
            tls_ca: None,
        }
        .connect()
        .await
        .unwrap();
        let e = c
            .stop(pb::StopRequest {
                reason: "a stranger".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel::<pb::WorkerMessage>();
        let e = c
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(
        coord.phase().name(),
        "waiting",
        "the refused Stop stopped nothing"
    );
    coord.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_session_cannot_be_opened_for_another_worker_by_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(spec(dir.path(), 2, 5000), "127.0.0.1:0", None, None)
        .await
        .unwrap();
    let target = Target {
        url: format!("http://{}", coord.addr),
        token: None,
        tls_ca: None,
    };
    let mut c = target.connect().await.unwrap();
    let victim = c.register(register_request()).await.unwrap().into_inner();
    let intruder = c.register(register_request()).await.unwrap().into_inner();
    assert_ne!(victim.session_secret, intruder.session_secret);
    for secret in [String::new(), intruder.session_secret.clone()] {
        let (up, rx) = tokio::sync::mpsc::unbounded_channel();
        let hello = Report::Hello {
            session_secret: secret,
        };
        up.send(msg(0, &victim.worker_id, hello)).unwrap();
        let e = c
            .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("session secret"), "{}", e.message());
    }
    assert_eq!(coord.job().connected(), 0, "no session was opened");
    let (up, rx) = tokio::sync::mpsc::unbounded_channel();
    up.send(msg(0, &victim.worker_id, hello(&victim))).unwrap();
    let _down = c
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap();
    assert_eq!(coord.job().connected(), 1);
    coord.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn a_session_that_never_says_hello_is_cut_off_within_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(spec(dir.path(), 1, 1000), "127.0.0.1:0", None, None)
        .await
        .unwrap();
    let mut c = Target {
        url: format!("http://{}", coord.addr),
        token: None,
        tls_ca: None,
    }
    .connect()
    .await
    .unwrap();
    let (_up, rx) = tokio::sync::mpsc::unbounded_channel::<pb::WorkerMessage>();
    let started = tokio::time::Instant::now();
    let e = c
        .session(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Cancelled, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The coordinator goes on serving.
    let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.state, "waiting");
    coord.shutdown(Duration::ZERO).await;
}
