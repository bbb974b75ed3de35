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
}

impl ModelArgs {
    pub fn load(&self) -> Result<super::model_source::LoadedModel> {
        let device = candle_core::Device::Cpu;
        super::model_source::load(&self.model, self.ema, self.adapter.as_deref(), &device)
    }
}

/// A coordinator to connect to.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorTarget {
    /// The coordinator, e.g. http://10.0.0.1:50051 (https:// with TLS).
    #[arg(long)]
    pub coordinator: String,
    /// File holding the shared token (else STACKWISE_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) for an https coordinator with a private CA.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
}

impl CoordinatorTarget {
    pub fn target(&self) -> Result<Target> {
        Ok(Target {
            url: self.coordinator.clone(),
            token: Target::token_from(self.token_file.as_deref())?,
            tls_ca: self.tls_ca.clone(),
        })
    }
}
