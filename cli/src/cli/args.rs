//! Argument groups several subcommands share (flattened with clap's `#[command(flatten)]`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use stackwise_coordinator::OnWorkerLoss;
use stackwise_worker::runtime::Target;
use tokio::time::Duration;

/// `--set KEY=VALUE` config overrides.
#[derive(Args, Debug, Clone, Default)]
pub struct Overrides {
    /// Override a config key, e.g. --set training.lr=1e-3 (repeatable; applied after
    /// STACKWISE_* environment variables).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Where a run starts and stops.
#[derive(Args, Debug, Clone, Default)]
pub struct ResumeArgs {
    /// Continue the run from its newest valid checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Stop with a checkpoint at this step (the LR schedule still spans training.steps).
    #[arg(long, value_name = "STEP")]
    pub until_step: Option<u64>,
}

/// How a long command reports.
#[derive(Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Plain log lines even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Leases and what happens when a worker is lost.
#[derive(Args, Debug, Clone)]
pub struct LossArgs {
    /// A worker silent for this long is dropped.
    #[arg(long, default_value_t = 10_000)]
    pub lease_ms: u64,
    /// stop: end the job when a worker is lost; recover: re-form the group and continue from
    /// the last checkpoint.
    #[arg(long, value_enum, default_value_t = OnWorkerLoss::Stop)]
    pub on_worker_loss: OnWorkerLoss,
}

impl LossArgs {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

/// The model `eval` and `generate` read.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// HF model folder, checkpoint folder or run folder (its newest checkpoint that verifies).
    #[arg(long)]
    pub model: PathBuf,
    /// Use the EMA weights when the checkpoint has them.
    #[arg(long)]
    pub ema: bool,
    /// A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply to
    /// the model: LoRA unmerged, BOFT merged on load.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Where the model runs: cpu, or cuda:N with a `--features cuda` build.
    #[arg(long, default_value = "cpu")]
    pub device: stackwise_common::config::DeviceSpec,
}

impl ModelArgs {
    pub fn load(&self) -> Result<super::model_source::LoadedModel> {
        let device = stackwise_worker::device::open(self.device)?;
        super::model_source::load(&self.model, self.ema, self.adapter.as_deref(), &device)
    }

    /// `load`, laid out for generation as `stackwise serve` lays it out (so both decode the
    /// same numbers).
    pub fn load_for_decoding(&self) -> Result<super::model_source::LoadedModel> {
        let mut m = self.load()?;
        m.model.prepare_for_decoding()?;
        Ok(m)
    }
}

/// A coordinator to connect to.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorTarget {
    /// The coordinator, e.g. http://10.0.0.1:50051 (https:// with TLS). Without it: from
    /// STACKWISE_COORDINATOR, else torchrun's MASTER_ADDR and MASTER_PORT (default 50051).
    #[arg(long, env = "STACKWISE_COORDINATOR")]
    pub coordinator: Option<String>,
    /// File holding the shared token (else STACKWISE_TOKEN).
    #[arg(long, env = "STACKWISE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) for an https coordinator with a private CA.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

impl CoordinatorTarget {
    pub fn target(&self) -> Result<Target> {
        let url = match &self.coordinator {
            Some(url) => url.clone(),
            None => coordinator_from_env(|k| std::env::var(k).ok()).ok_or_else(|| {
                anyhow::anyhow!(
                    "no coordinator: pass --coordinator URL, or set STACKWISE_COORDINATOR, \
                     or MASTER_ADDR (and MASTER_PORT) as torchrun does"
                )
            })?,
        };
        Ok(Target {
            url,
            token: Target::token_from(self.token_file.as_deref())?,
            tls_ca: self.tls_ca.clone(),
        })
    }
}

/// The coordinator's URL from torchrun's conventions: `MASTER_ADDR` and `MASTER_PORT`
/// (default 50051), over plain http (TLS needs --coordinator https://...).
fn coordinator_from_env(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let host = var("MASTER_ADDR").filter(|h| !h.is_empty())?;
    let port = var("MASTER_PORT").unwrap_or_else(|| "50051".into());
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    Some(format!("http://{host}:{port}"))
}

/// A worker's default name: `worker-INDEX` where the platform numbers the workers
/// (Kubernetes Indexed Jobs: JOB_COMPLETION_INDEX; torchrun: RANK), else `HOST-PID`.
pub fn default_worker_name(var: impl Fn(&str) -> Option<String>) -> String {
    if let Some(i) = var("JOB_COMPLETION_INDEX").or_else(|| var("RANK")) {
        return format!("worker-{i}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_coordinator_comes_from_torchruns_master_addr_and_port() {
        assert_eq!(
            coordinator_from_env(vars(&[
                ("MASTER_ADDR", "coord.ns.svc"),
                ("MASTER_PORT", "6000")
            ])),
            Some("http://coord.ns.svc:6000".into())
        );
        assert_eq!(
            coordinator_from_env(vars(&[("MASTER_ADDR", "10.0.0.7")])),
            Some("http://10.0.0.7:50051".into())
        );
        assert_eq!(
            coordinator_from_env(vars(&[("MASTER_ADDR", "fd00::7")])),
            Some("http://[fd00::7]:50051".into())
        );
        assert_eq!(coordinator_from_env(vars(&[("MASTER_PORT", "1")])), None);
    }

    #[test]
    fn a_worker_is_named_after_its_completion_index_or_rank() {
        assert_eq!(
            default_worker_name(vars(&[("JOB_COMPLETION_INDEX", "3")])),
            "worker-3"
        );
        assert_eq!(default_worker_name(vars(&[("RANK", "5")])), "worker-5");
        let plain = default_worker_name(vars(&[]));
        assert!(
            plain.ends_with(&format!("-{}", std::process::id())),
            "{plain}"
        );
    }
}
