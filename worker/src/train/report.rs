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
        let remote = (write_metrics && metrics_path.is_none()).then(|| (run.clone(), Vec::new()));
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
