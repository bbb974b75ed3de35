//! deploy/: the Slurm batch script run for real with stand-ins for `srun` and `scontrol`
//! (tests/slurm-standins) that start its tasks on this machine: the coordinator on the
//! "first node", one worker per task, the token in the job's shared directory, and a real
//! 2-worker training run to its last checkpoint.

use std::path::Path;
use std::process::{Command, Stdio};

mod common;

#[test]
fn the_slurm_script_runs_a_coordinator_and_one_worker_per_task_to_the_end_of_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 30_000);
    let cfg = common::tiny_job(
        dir.path(),
        "slurm",
        &data,
        "steps: 6, batch_size: 4, warmup_steps: 1, checkpoint_every: 3",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let standins = root.join("tests/slurm-standins");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new("bash")
        .arg(root.join("deploy/slurm/stackwise.sbatch"))
        .arg(&cfg)
        .env(
            "PATH",
            format!("{}:{}", standins.display(), std::env::var("PATH").unwrap()),
        )
        .env("SLURM_JOB_NODELIST", "localhost,otherhost")
        .env("SLURM_NTASKS", "2")
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_SUBMIT_DIR", dir.path())
        .env("STACKWISE_DEVICE", "cpu")
        .env("STACKWISE_BIN", env!("CARGO_BIN_EXE_stackwise"))
        .env("STACKWISE_PORT", port.to_string())
        .env_remove("STACKWISE_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "coordinator on localhost:{port}, 2 worker(s) on cpu"
        )),
        "{stdout}"
    );
    assert!(stderr.contains("done: run slurm | step 6"), "{stderr}");
    let token = dir.path().join(".stackwise-4242/token");
    let meta = std::fs::metadata(&token).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.len() >= 32);
    assert!(
        dir.path()
            .join("out/runs/slurm/checkpoints/step-00000006/MANIFEST.json")
            .exists()
    );
    // Both tasks became workers of the one generation.
    assert!(stderr.contains("2 worker(s)"), "{stderr}");
}

/// What a Kubernetes pod or a torchrun-style launcher gives a worker, and nothing else: the
/// coordinator from MASTER_ADDR / MASTER_PORT, the name from JOB_COMPLETION_INDEX. A job
/// stopped by SIGTERM to the coordinator makes its worker exit 75 (a restart policy brings
/// it back); the resumed job finishes and the worker exits 0.
#[test]
fn a_worker_configured_by_environment_alone_exits_75_for_a_stopped_job_and_0_when_it_is_done() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 30_000);
    let cfg = common::tiny_job(
        dir.path(),
        "env",
        &data,
        "steps: 100000, batch_size: 4, warmup_steps: 1, checkpoint_every: 1000",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let coordinator = |extra: &[&str]| {
        let mut c = common::bin();
        c.args(["coordinator", "--config"])
            .arg(&cfg)
            .args(["--bind", &format!("127.0.0.1:{port}"), "--resume"])
            .args(extra)
            .env("STACKWISE_TOKEN", "env-t0ken");
        c
    };
    let worker = || {
        let mut w = common::bin();
        w.arg("worker")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("JOB_COMPLETION_INDEX", "3")
            .env("STACKWISE_TOKEN", "env-t0ken")
            .env_remove("STACKWISE_COORDINATOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        w
    };

    let (mut first, lines) = common::start_until(coordinator(&[]), "listening on");
    let w = worker().spawn().unwrap();
    let t = std::time::Instant::now();
    let registered = loop {
        let l = lines.recv_timeout(Duration::from_secs(60)).unwrap();
        if l.contains("registered") {
            break l;
        }
    };
    assert!(registered.contains("(worker-3 on "), "{registered}");
    // Let it train a little, then stop the job as a pod eviction would.
    while !std::fs::read_to_string(dir.path().join("out/runs/env/metrics.jsonl"))
        .is_ok_and(|m| m.lines().count() >= 2)
    {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-TERM", &first.0.id().to_string()])
        .status()
        .unwrap();
    assert!(
        !first.0.wait().unwrap().success(),
        "a stopped job's coordinator exits 1"
    );
    let out = w.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("exiting 75"), "{err}");

    // The restarted coordinator resumes at the checkpoint and ends the job where it said.
    let ckpt = std::fs::read_dir(dir.path().join("out/runs/env/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .max()
        .expect("SIGTERM left a checkpoint");
    let step: u64 = ckpt.trim_start_matches("step-").parse().unwrap();
    let until = (step + 5).to_string();
    let (mut second, _lines) =
        common::start_until(coordinator(&["--until-step", &until]), "listening on");
    let out = worker().output().unwrap();
    assert!(second.0.wait().unwrap().success());
    assert!(
        out.status.success(),
        "a worker of a finished job exits 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
