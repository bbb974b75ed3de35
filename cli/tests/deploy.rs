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
    let cfg = dir.path().join("job.yaml");
    std::fs::write(
        &cfg,
        format!(
            "run: {{name: slurm, output: {}}}\nmodel: {{d_model: 32, n_layers: 1, n_heads: 2, seq_len: 16}}\n\
             data: {{path: {}}}\ntraining: {{steps: 6, batch_size: 4, warmup_steps: 1, checkpoint_every: 3}}\n",
            dir.path().join("out").display(),
            data.display()
        ),
    )
    .unwrap();
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
