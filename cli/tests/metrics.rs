//! The coordinator's `/metrics` during a real 2-worker run: OpenMetrics text whose numbers
//! move as the job trains; then the run's loss plot.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;
use common::{bin, http_get};

/// Parse OpenMetrics text strictly enough to catch a malformed exposition: every sample
/// belongs to a family declared with `# TYPE`, every value is a number, `# EOF` ends it.
/// Returns the samples as `name{labels}` -> value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut families = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    for l in &lines[..lines.len() - 1] {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter"].contains(&kind), "{l}");
            families.insert(name.to_string(), kind.to_string());
        } else if l.starts_with("# HELP ") || l.starts_with("# UNIT ") {
        } else {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
            let name = key.split('{').next().unwrap();
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                families.contains_key(family),
                "sample {key} of an undeclared family"
            );
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("{l}"));
            samples.insert(key.to_string(), v);
        }
    }
    samples
}

#[test]
fn the_coordinator_serves_openmetrics_that_follow_a_real_two_worker_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 40_000);
    let cfg = common::tiny_job(
        dir.path(),
        "m",
        &data,
        "steps: 300, batch_size: 4, warmup_steps: 2, eval_every: 50, checkpoint_every: 20",
    );
    let (mut launch, addr) = common::launch_with_http(&cfg);
    assert_eq!(http_get(&addr, "/healthz"), "ok\n");

    let t = Instant::now();
    let (mut first, mut last) = (None, BTreeMap::new());
    while t.elapsed() < Duration::from_secs(120) {
        let m = parse(&http_get(&addr, "/metrics"));
        if m["stackwise_workers_in_generation"] == 2.0 && m["stackwise_step"] > 0.0 {
            let f = first.get_or_insert_with(|| m.clone());
            if m["stackwise_step"] >= f["stackwise_step"] + 10.0
                && m["stackwise_checkpoints_committed_total"] >= 1.0
            {
                last = m;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = first.expect("the job never ran on 2 workers");
    assert!(
        !last.is_empty(),
        "the step did not advance by 10 within 2 minutes"
    );
    assert_eq!(last["stackwise_job_state{state=\"running\"}"], 1.0);
    assert_eq!(last["stackwise_job_state{state=\"finished\"}"], 0.0);
    assert_eq!(last["stackwise_workers_alive"], 2.0);
    assert_eq!(last["stackwise_total_steps"], 300.0);
    assert!(last["stackwise_tokens_total"] > first["stackwise_tokens_total"]);
    assert!(last["stackwise_loss"].is_finite() && last["stackwise_learning_rate"] > 0.0);
    assert!(
        last["stackwise_allreduce_seconds"] > 0.0,
        "2 ranks all-reduce every step"
    );
    assert!(last["stackwise_seconds_since_checkpoint"] >= 0.0);
    assert!(launch.0.wait().unwrap().success());

    // The run's plot: written into the run at its end, and `stackwise plot` as PNG.
    let run = dir.path().join("out/runs/m");
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("m: step 300, loss "),
        "{}",
        &svg[..200]
    );
    let png = dir.path().join("loss.png");
    let o = common::ok(bin().arg("plot").arg(&run).arg("--out").arg(&png));
    assert!(common::stderr(&o).contains("validation points"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let o = common::run(bin().arg("plot").arg(dir.path()).arg("--out").arg(&png));
    assert!(
        !o.status.success() && common::stderr(&o).contains("has no metrics.jsonl"),
        "{}",
        common::stderr(&o)
    );
}
