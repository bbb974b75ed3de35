//! Checkpoints in a real S3-compatible server (s3s-fs on 127.0.0.1), exact resume at any world
//! size, and recovery from a killed worker and a killed coordinator, on real processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{KillOnDrop, bin, launch, ok, run, start_until};

fn dataset(dir: &Path) -> PathBuf {
    common::dataset(dir, 40_000)
}

const KEY: &str = "stackwise-test-key";
const SECRET: &str = "stackwise-test-secret-do-not-log";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The s3s-fs binary: $STACKWISE_S3S_FS, or target/s3s/bin/s3s-fs, installed there on first
/// use (`cargo install s3s-fs@0.14.1`, about 3 minutes; `.ci/run` does it up front).
fn s3s_fs() -> PathBuf {
    if let Ok(p) = std::env::var("STACKWISE_S3S_FS") {
        return PathBuf::from(p);
    }
    let root = workspace().join("target/s3s");
    let bin = root.join("bin/s3s-fs");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::File::create(root.join(".install.lock")).unwrap();
    lock.lock().unwrap();
    if !bin.exists() {
        eprintln!("installing s3s-fs 0.14.1 into {} (once)...", root.display());
        let st = Command::new(env!("CARGO"))
            .args([
                "install",
                "s3s-fs@0.14.1",
                "--features",
                "binary",
                "--locked",
                "--root",
            ])
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success(), "cargo install s3s-fs failed");
    }
    bin
}

struct S3 {
    child: Option<Child>,
    port: u16,
    root: tempfile::TempDir,
}

impl S3 {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bucket")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            child: None,
            port,
            root,
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let child = Command::new(s3s_fs())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", KEY, "--secret-key", SECRET])
            .arg(self.root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "s3s-fs did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn env(&self, c: &mut Command) {
        c.env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", self.port),
        )
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_REGION", "us-east-1");
    }

    /// Where s3s-fs keeps `s3://bucket/<key>` on disk.
    fn file(&self, key: &str) -> PathBuf {
        self.root.path().join("bucket").join(key)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(dir: &Path, data: &Path, output: &str, steps: u64, every: u64) -> PathBuf {
    let p = dir.join("job.yaml");
    std::fs::write(
        &p,
        format!(
            "run: {{name: job, output: {output}, seed: 5}}
model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
data: {{path: {data}}}
training: {{steps: {steps}, batch_size: 4, lr: 2.0e-3, warmup_steps: 2, eval_every: 0, checkpoint_every: {every}, keep_last: 2, log_every: 1}}
",
            data = data.display()
        ),
    )
    .unwrap();
    p
}

/// The bytes of every tensor of a model.safetensors.
fn tensors(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

fn final_weights(s3: Option<&S3>, out: &Path, run: &str, step: u64) -> Vec<(String, Vec<u8>)> {
    let rel = format!("runs/{run}/checkpoints/step-{step:08}/model.safetensors");
    let path = match s3 {
        Some(s) => s.file(&format!("exp/{rel}")),
        None => out.join(rel),
    };
    tensors(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[test]
fn checkpoints_in_s3_list_verify_and_skip_corrupt_ones_on_resume() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, "s3://bucket/exp", 6, 3);
    let mut c = launch(&cfg, 2, &[]);
    s3.env(&mut c);
    let o = ok(&mut c);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(!log.contains(SECRET), "the secret leaked into the log");
    // The objects are in the bucket; the manifest of each checkpoint is there.
    for step in [3, 6] {
        assert!(
            s3.file(&format!(
                "exp/runs/job/checkpoints/step-{step:08}/MANIFEST.json"
            ))
            .exists()
        );
    }
    let mut ls = bin();
    ls.args(["ckpt", "ls", "s3://bucket/exp/runs/job"]);
    s3.env(&mut ls);
    let out = String::from_utf8_lossy(&ok(&mut ls).stdout).to_string();
    assert!(
        out.contains("step-00000003") && out.contains("step-00000006") && out.contains("complete"),
        "{out}"
    );
    let verify = |uri: &str| {
        let mut v = bin();
        v.args(["ckpt", "verify", uri]);
        s3.env(&mut v);
        run(&mut v)
    };
    assert!(
        verify("s3://bucket/exp/runs/job/checkpoints/step-00000006")
            .status
            .success()
    );

    // One byte changed: verify fails naming the file; resume skips it with a warning.
    let model = s3.file("exp/runs/job/checkpoints/step-00000006/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&model, bytes).unwrap();
    let v = verify("s3://bucket/exp/runs/job/checkpoints/step-00000006");
    assert!(!v.status.success());
    let vout = String::from_utf8_lossy(&v.stdout);
    assert!(
        vout.contains("FAILED") && vout.contains("model.safetensors: sha256"),
        "{vout}"
    );
    let mut c = launch(
        &cfg,
        1,
        &["--resume", "--json", "--set", "training.steps=8"],
    );
    s3.env(&mut c);
    let o = ok(&mut c);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("step-00000006") && log.contains("skipping checkpoint"),
        "{log}"
    );
    assert!(log.contains("resuming from step-00000003"), "{log}");

    // A checkpoint without its manifest is skipped too.
    std::fs::remove_file(s3.file("exp/runs/job/checkpoints/step-00000008/MANIFEST.json")).unwrap();
    let mut c = launch(&cfg, 1, &["--resume", "--set", "training.steps=9"]);
    s3.env(&mut c);
    let log = String::from_utf8_lossy(&ok(&mut c).stderr).to_string();
    // The second run re-saved step 6 (intact now); step 8 has lost its manifest.
    assert!(
        log.contains("no MANIFEST.json") && log.contains("resuming from step-00000006"),
        "{log}"
    );
}

#[test]
fn a_dataset_prepared_into_s3_trains_exactly_like_the_same_dataset_on_disk() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let local = dataset(dir.path());
    // The same text and tokenizer, written straight to the bucket in small shards, so
    // samples are ranged reads that cross shard objects.
    let mut prep = bin();
    prep.args(["data", "prepare"])
        .arg(dir.path().join("m.txt"))
        .args(["--out", "s3://bucket/data", "--shard-tokens", "3000"])
        .arg("--tokenizer")
        .arg(local.join("tokenizer.json"));
    s3.env(&mut prep);
    ok(&mut prep);
    assert!(s3.file("data/train-00005.bin").exists());
    let mut weights = Vec::new();
    for (name, data) in [
        ("disk", local.as_path()),
        ("s3", Path::new("s3://bucket/data")),
    ] {
        let out = dir.path().join(name);
        let cfg = config(dir.path(), data, &out.to_string_lossy(), 4, 4);
        let mut c = launch(&cfg, 1, &[]);
        s3.env(&mut c);
        ok(&mut c);
        weights.push(final_weights(None, &out, "job", 4));
    }
    assert!(
        weights[0] == weights[1],
        "S3 ranged reads changed the samples"
    );
}

#[test]
fn bad_credentials_give_a_clear_error_without_the_secret() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, "s3://bucket/exp", 2, 1);
    let mut c = launch(&cfg, 1, &[]);
    s3.env(&mut c);
    c.env("AWS_SECRET_ACCESS_KEY", "not-the-secret-xyz");
    let o = run(&mut c);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("not-the-secret-xyz") && !err.contains(SECRET),
        "{err}"
    );
    assert!(
        err.contains("s3://bucket/exp") || err.contains("runs/job"),
        "{err}"
    );
}

#[test]
fn resume_is_bitwise_and_any_world_size_sees_the_same_samples() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("out");
    let cfg = config(dir.path(), &data, &out.display().to_string(), 8, 4);
    ok(&mut launch(&cfg, 2, &["--set", "run.name=straight"]));
    ok(&mut launch(
        &cfg,
        2,
        &["--set", "run.name=resumed", "--until-step", "4"],
    ));
    ok(&mut launch(
        &cfg,
        2,
        &["--set", "run.name=resumed", "--resume"],
    ));
    assert_eq!(
        final_weights(None, &out, "straight", 8),
        final_weights(None, &out, "resumed", 8),
        "2x(4 + resume 4) must equal 8 steps bitwise"
    );
    // 2 workers, then 1 worker on the same global batch: the same samples in the same order,
    // so the weights agree up to the summation order of the gradient.
    ok(&mut launch(
        &cfg,
        2,
        &["--set", "run.name=shrunk", "--until-step", "4"],
    ));
    ok(&mut launch(
        &cfg,
        1,
        &["--set", "run.name=shrunk", "--resume"],
    ));
    let (a, b) = (
        final_weights(None, &out, "straight", 8),
        final_weights(None, &out, "shrunk", 8),
    );
    let mut worst = 0f32;
    for ((_, x), (_, y)) in a.iter().zip(&b) {
        for (p, q) in x.chunks_exact(4).zip(y.chunks_exact(4)) {
            let (p, q) = (
                f32::from_le_bytes(p.try_into().unwrap()),
                f32::from_le_bytes(q.try_into().unwrap()),
            );
            worst = worst.max((p - q).abs());
        }
    }
    assert!(worst < 1e-5, "2 -> 1 workers drifted by {worst}");
}

/// Start `cmd`, read its stderr until a line contains `marker`, and return the child with the
/// lines read so far (the rest keeps streaming into a thread).

#[test]
fn a_killed_worker_is_replaced_and_the_run_ends_with_the_same_weights() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, "s3://bucket/exp", 300, 10);
    let mut c = launch(&cfg, 2, &["--set", "run.name=clean"]);
    s3.env(&mut c);
    ok(&mut c);

    let mut c = launch(
        &cfg,
        2,
        &["--set", "run.name=killed", "--on-worker-loss", "recover"],
    );
    s3.env(&mut c);
    let (mut child, rx) = start_until(c, "step     25/");
    // Kill the worker that is rank 1 now.
    let pid = pid_of_rank(&rx, &child);
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.0.wait().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    let rest = rest.join("\n");
    assert!(status.success(), "{rest}");
    assert!(rest.contains("restarting it"), "{rest}");
    assert!(
        rest.contains("generation 2 formed") && rest.contains("resuming from step-"),
        "{rest}"
    );
    assert_eq!(
        final_weights(Some(&s3), Path::new(""), "clean", 300),
        final_weights(Some(&s3), Path::new(""), "killed", 300),
        "recovery must end with the weights of the clean run"
    );
}

/// The pid of a launched worker process (children of the launcher), any rank.
fn pid_of_rank(_rx: &std::sync::mpsc::Receiver<String>, launcher: &KillOnDrop) -> u32 {
    let out = Command::new("pgrep")
        .args(["-P", &launcher.0.id().to_string()])
        .output()
        .unwrap();
    let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    *pids.last().expect("the launcher has worker processes")
}

#[test]
fn a_restarted_coordinator_reloads_the_run_and_workers_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let out = dir.path().join("out");
    let cfg = config(dir.path(), &data, &out.display().to_string(), 300, 10);
    ok(&mut launch(&cfg, 2, &["--set", "run.name=clean"]));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let coordinator = |resume: bool| {
        let mut c = bin();
        c.arg("coordinator")
            .arg("--config")
            .arg(&cfg)
            .args([
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--min-workers",
                "2",
                "--set",
                "run.name=restarted",
            ])
            .args([
                "--rendezvous-grace-ms",
                "0",
                "--lease-ms",
                "3000",
                "--heartbeat-ms",
                "300",
            ])
            .env("STACKWISE_TOKEN", "tok");
        if resume {
            c.arg("--resume");
        }
        c
    };
    let (mut first, _rx) = start_until(coordinator(false), "listening on");
    let workers: Vec<KillOnDrop> = (0..2)
        .map(|i| {
            KillOnDrop(
                bin()
                    .args([
                        "--threads",
                        "1",
                        "worker",
                        "--coordinator",
                        &url,
                        "--name",
                        &format!("w{i}"),
                    ])
                    .args(["--rejoin-timeout-s", "60", "--advertise-host", "127.0.0.1"])
                    .env("STACKWISE_TOKEN", "tok")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // Let it checkpoint at least once, then kill the coordinator.
    let ck = out.join("runs/restarted/checkpoints/step-00000020/MANIFEST.json");
    let t = Instant::now();
    while !ck.exists() {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint 20");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = first.0.kill();
    let _ = first.0.wait();
    // A new coordinator on the same address reloads the run; the workers find it.
    let mut second = coordinator(true);
    let o = second.stdin(Stdio::null()).output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("resuming from step-"), "{log}");
    for mut w in workers {
        let st = w.0.wait().unwrap();
        assert!(
            st.success(),
            "a worker failed after the coordinator restart"
        );
    }
    assert_eq!(
        final_weights(None, &out, "clean", 300),
        final_weights(None, &out, "restarted", 300),
        "the restarted run must end with the weights of the clean run"
    );
}

#[test]
fn an_s3_outage_during_training_is_retried_and_the_run_completes() {
    let mut s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, "s3://bucket/exp", 300, 10);
    let mut c = launch(&cfg, 2, &["--set", "run.name=clean"]);
    s3.env(&mut c);
    ok(&mut c);

    let mut c = launch(&cfg, 2, &["--set", "run.name=outage"]);
    s3.env(&mut c);
    let (mut child, rx) = start_until(c, "step     40/");
    s3.stop();
    std::thread::sleep(Duration::from_millis(1500));
    s3.restart();
    let status = child.0.wait().unwrap();
    let log: Vec<String> = rx.try_iter().collect();
    assert!(status.success(), "{}", log.join("\n"));
    // The outage hit an upload, which backed off and retried.
    assert!(
        log.iter().any(|l| l.contains("backing off")),
        "{}",
        log.join("\n")
    );
    let mut v = bin();
    v.args(["ckpt", "verify", "s3://bucket/exp/runs/outage"]);
    s3.env(&mut v);
    ok(&mut v);
    assert_eq!(
        final_weights(Some(&s3), Path::new(""), "clean", 300),
        final_weights(Some(&s3), Path::new(""), "outage", 300),
        "an outage must not change the result"
    );
}

#[test]
fn credentials_from_the_config_without_any_aws_environment() {
    let s3 = S3::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path());
    let cfg = config(dir.path(), &data, "s3://bucket/cfgcreds", 3, 3);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "storage: {{endpoint: \"http://127.0.0.1:{}\", region: us-east-1, access_key_id: {KEY}, secret_access_key: {SECRET}}}\n",
        s3.port
    ));
    std::fs::write(&cfg, text).unwrap();
    let mut c = launch(&cfg, 2, &[]);
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ] {
        c.env_remove(k);
    }
    let o = ok(&mut c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains(SECRET), "the secret was printed: {err}");
    assert!(
        s3.file("cfgcreds/runs/job/checkpoints/step-00000003/MANIFEST.json")
            .exists()
    );
    // The config kept with the run has the secret redacted.
    let stored = std::fs::read_to_string(s3.file("cfgcreds/runs/job/config.yaml")).unwrap();
    assert!(
        stored.contains("<redacted>") && !stored.contains(SECRET),
        "{stored}"
    );
}
