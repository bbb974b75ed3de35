//! `stackwise selfcheck`: this build, on a device, against the PyTorch reference fixtures
//! (`stackwise_worker::golden`), and on CUDA a world-size-1 NCCL all-reduce. One JSON report on
//! stdout; exit status 1 when any difference is over its tolerance.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use stackwise_common::config::{Autocast, DeviceSpec};
use stackwise_worker::golden::{self, Tolerances};

#[derive(Args, Debug)]
pub struct SelfcheckArgs {
    /// Folder of reference fixtures (a checkout's tests/fixtures).
    #[arg(long, default_value = "tests/fixtures")]
    pub fixtures: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Matrix products at bf16 (the tolerances widen to bf16's).
    #[arg(long, default_value = "off")]
    pub autocast: Autocast,
}

pub fn run(a: SelfcheckArgs) -> Result<()> {
    let device = stackwise_worker::device::open(a.device)?;
    stackwise_worker::ops::autocast::set(a.autocast);
    let tol = match (a.device, a.autocast) {
        (DeviceSpec::Cpu, Autocast::Off) => Tolerances::fp32(),
        (_, Autocast::Off) => Tolerances::gpu_fp32(),
        _ => Tolerances::bf16(),
    };
    let dirs = golden::fixture_dirs(&a.fixtures)?;
    if dirs.is_empty() {
        bail!(
            "no fixtures (folders with an expected.json and a config.json) in {}",
            a.fixtures.display()
        );
    }
    let mut reports = Vec::new();
    for dir in &dirs {
        reports.push(golden::check_fixture(dir, &device, &tol)?);
    }
    let nccl = nccl_smoke(a.device);
    let mut failures: Vec<String> = reports.iter().flat_map(|r| r.failures.clone()).collect();
    match &nccl {
        Some(Err(e)) => failures.push(format!("nccl: {e}")),
        Some(Ok(v)) if v["ok"] != true => {
            failures.push("nccl: the buffer came back changed".into())
        }
        _ => {}
    }
    let report = serde_json::json!({
        "device": a.device.to_string(),
        "autocast": format!("{:?}", a.autocast).to_lowercase(),
        "tolerances": tol,
        "fixtures": reports,
        "nccl": match &nccl {
            None => serde_json::Value::Null,
            Some(Ok(v)) => v.clone(),
            Some(Err(e)) => serde_json::json!({"ok": false, "error": e}),
        },
        "ok": failures.is_empty(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !failures.is_empty() {
        bail!("selfcheck failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// On CUDA: a world-size-1 NCCL communicator all-reduces and broadcasts 4M floats, which must
/// come back unchanged. `None` on the CPU.
#[cfg(feature = "cuda")]
fn nccl_smoke(device: DeviceSpec) -> Option<Result<serde_json::Value, String>> {
    use stackwise_worker::comm::Comm;
    use stackwise_worker::comm::nccl::{Nccl, new_id};
    use std::time::{Duration, Instant};
    let DeviceSpec::Cuda(ordinal) = device else {
        return None;
    };
    let run = || -> Result<serde_json::Value, stackwise_worker::comm::CommError> {
        let id = new_id()?;
        let timeout = Duration::from_secs(60);
        let mut comm = Nccl::new(ordinal, 0, 1, &id, timeout, timeout)?;
        let want: Vec<f32> = (0..4 << 20).map(|i| (i % 1000) as f32 * 0.5).collect();
        let mut buf = want.clone();
        let t = Instant::now();
        comm.all_reduce_sum(&mut buf)?;
        let all_reduce_s = t.elapsed().as_secs_f64();
        let same = buf == want;
        comm.broadcast(&mut buf, 0)?;
        Ok(serde_json::json!({
            "ok": same && buf == want, "world_size": comm.world_size(), "elements": want.len(),
            "all_reduce_s": all_reduce_s,
        }))
    };
    Some(run().map_err(|e| e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn nccl_smoke(_device: DeviceSpec) -> Option<Result<serde_json::Value, String>> {
    None
}
