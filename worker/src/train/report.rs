//! Diagnostics: a progress bar on a terminal or plain log lines otherwise, `metrics.jsonl`,
//! peak memory.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use stackwise_common::store::Store;

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub struct Reporter {
    bar: Option<ProgressBar>,
    metrics_path: Option<std::path::PathBuf>,
    remote: Option<(Store, Vec<u8>)>,
}

impl Reporter {
    /// `run`: the run's store; metrics go to `metrics.jsonl` there when `write_metrics`.
    pub fn new(
        run: &Store,
        total_steps: u64,
        start_step: u64,
        progress: bool,
        write_metrics: bool,
    ) -> Self {
        let bar = (progress && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total_steps);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(start_step);
            b
        });
        let metrics_path = run
            .local_path()
            .filter(|_| write_metrics)
            .map(|p| p.join("metrics.jsonl"));
        // An object store cannot append: the whole file is uploaded each flush, starting
        // from what a resumed run had recorded up to its checkpoint.
        let remote = (write_metrics && metrics_path.is_none()).then(|| {
            let before = match run.get("metrics.jsonl") {
                Ok(Some(b)) if start_step > 0 => records_up_to(&b, start_step),
                Ok(_) => Vec::new(),
                Err(e) => {
                    tracing::warn!("read the run's metrics.jsonl: {e}");
                    Vec::new()
                }
            };
            (run.clone(), before)
        });
        Self {
            bar,
            metrics_path,
            remote,
        }
    }

    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Append one record to `metrics.jsonl`.
    pub fn record(&mut self, v: &Value) {
        let mut line = serde_json::to_vec(v).expect("metrics serialize");
        line.push(b'\n');
        if let Some(p) = &self.metrics_path {
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| f.write_all(&line));
            if let Err(e) = r {
                tracing::warn!("write {}: {e}", p.display());
            }
        } else if let Some((_, buf)) = &mut self.remote {
            buf.extend_from_slice(&line);
        }
    }

    /// Upload buffered metrics (object stores cannot append).
    pub fn flush(&mut self) {
        if let Some((store, buf)) = &self.remote
            && let Err(e) = store.put("metrics.jsonl", bytes::Bytes::from(buf.clone()))
        {
            tracing::warn!("upload metrics.jsonl: {e}");
        }
    }

    pub fn progress(&self, step: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(msg);
        }
    }

    /// A line that must not be torn by the bar.
    pub fn line(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.flush();
    }
}

/// The lines of a `metrics.jsonl` whose step is at most `step` (the checkpoint a run resumes
/// from); lines without a step are kept, a torn last line is not.
fn records_up_to(jsonl: &[u8], step: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for line in jsonl.split(|b| *b == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if v["step"].as_u64().is_none_or(|s| s <= step) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

/// One optimizer step as the log and `metrics.jsonl` show it.
pub struct StepReport {
    pub step: u64,
    pub total: u64,
    pub stages: usize,
    pub stage: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub skipped: bool,
    pub tokens_per_s: f64,
    pub tokens_seen: u64,
    /// The step's loss tokens (all ranks) and micro-batches.
    pub loss_tokens: f64,
    pub micro_batches: usize,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
}

impl StepReport {
    /// The `metrics.jsonl` record and the log line.
    pub fn render(&self) -> (Value, String) {
        let peak = peak_rss_bytes();
        let mut rec = serde_json::json!({
            "step": self.step, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens_per_s, "tokens_seen": self.tokens_seen, "skipped": self.skipped,
            "peak_rss_bytes": peak, "loss_tokens": self.loss_tokens, "micro_batches": self.micro_batches,
        });
        rec["stage"] = self.stage.into();
        let mut line = format!(
            "step {:>6}/{}{} | loss {:.4} | lr {:.2e} | gnorm {:.3} | {:.0} tok/s | peak mem {:.0} MiB",
            self.step,
            self.total,
            if self.stages > 1 {
                format!(" (stage {})", self.stage + 1)
            } else {
                String::new()
            },
            self.loss,
            self.lr,
            self.grad_norm,
            self.tokens_per_s,
            peak.unwrap_or(0) as f64 / (1 << 20) as f64
        );
        if let Some(v) = self.val_loss {
            rec["val_loss"] = v.into();
            rec["val_ppl"] = v.exp().into();
            match self.val_accuracy {
                Some(acc) => {
                    rec["val_masked_accuracy"] = acc.into();
                    line.push_str(&format!(" | val {v:.4} masked acc {acc:.3}"));
                }
                None => line.push_str(&format!(" | val {v:.4} ppl {:.2}", v.exp())),
            }
        }
        (rec, line)
    }
}

/// "stage 2/3: block 1 (layers 4-7) | 265600 trainable parameters | diffusion at mask
/// fraction 0.65 | 100 steps".
pub fn stage_line(
    stage: usize,
    stages: usize,
    plan: &stackwise_common::plan::StagePlan,
    trainable: usize,
) -> String {
    format!(
        "stage {}/{stages}: {} | {trainable} trainable parameters | {} | {} steps",
        stage + 1,
        plan.name,
        match plan.eval_fraction() {
            Some(f) => format!("{:?} at mask fraction {f:.2}", plan.objective),
            None => format!("{:?}", plan.objective),
        }
        .to_lowercase(),
        plan.steps
    )
}

/// "stage 2 ends: validation masked loss … at the plan's fractions …; stage 1 ended at …".
pub fn stage_end_line(
    result: &super::state::StageResult,
    fractions: &[f64],
    before: Option<&super::state::StageResult>,
) -> String {
    let before = before.map_or(String::new(), |r| {
        format!("; stage {} ended at {:.4}", r.stage + 1, r.val_loss)
    });
    format!(
        "stage {} ends: validation masked loss {:.4}{} at the plan's fractions {:.2}-{:.2}{before}",
        result.stage + 1,
        result.val_loss,
        result
            .val_masked_accuracy
            .map_or(String::new(), |a| format!(" (masked acc {a:.3})")),
        fractions[0],
        fractions[fractions.len() - 1],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_its_metrics_up_to_the_checkpoint() {
        let before = b"{\"step\":1,\"loss\":3}\n{\"event\":\"x\"}\n{\"step\":2,\"loss\":2}\n{\"step\":3,\"loss\":1}\n{\"step\":4,";
        let kept = String::from_utf8(records_up_to(before, 2)).unwrap();
        assert_eq!(
            kept,
            "{\"step\":1,\"loss\":3}\n{\"event\":\"x\"}\n{\"step\":2,\"loss\":2}\n"
        );
    }
}
