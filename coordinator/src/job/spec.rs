//! What a job is asked to do: the resolved config and its typed, validated plan, where its
//! checkpoints go, and how its worker group forms ([`GroupOptions`]).

use anyhow::{Context, Result, bail};
use stackwise_common::checkpoint::CheckpointStore;
use stackwise_common::config::{TrainConfig, absolutize, require_world_divides_batch};
use stackwise_common::plan::{Plan, plan_config};
use stackwise_common::store::Store;
use tokio::time::Duration;

/// What happens when a worker of the running generation is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnWorkerLoss {
    /// Stop the job with an error naming the worker.
    Stop,
    /// Abort the generation, re-form the group from the live workers and continue from the
    /// last committed checkpoint.
    Recover,
}

/// How the worker group forms and what it does on failure (flags of `coordinator` and
/// `launch`).
#[derive(Debug, Clone)]
pub struct GroupOptions {
    pub min_workers: usize,
    pub max_workers: usize,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Once `min_workers` are there, wait this long for more (up to `max_workers`).
    pub rendezvous_grace: Duration,
    /// Continue the run from its newest checkpoint.
    pub resume: bool,
    pub on_worker_loss: OnWorkerLoss,
    /// Stop every rank at this step (with a checkpoint).
    pub until_step: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub run_id: String,
    /// The resolved config every worker runs (paths made absolute).
    pub config_yaml: String,
    /// The planner's stages, sent to every worker with the config.
    pub plan: Plan,
    /// Where the run's checkpoints are (`<output>/runs/<name>`).
    pub run_uri: String,
    /// The global batch; the world size must divide it.
    pub batch_size: usize,
    pub group: GroupOptions,
}

impl JobSpec {
    pub fn total_steps(&self) -> u64 {
        self.plan.total_steps()
    }

    /// The step the job ends at: `until_step`, or the end of the plan.
    pub fn target_step(&self) -> u64 {
        let total = self.total_steps();
        self.group.until_step.unwrap_or(total).min(total)
    }
}

/// A job from a loaded config: checked (group, batch, heartbeat vs lease, existing
/// checkpoints) and planned.
pub fn job_spec(mut cfg: TrainConfig, group: GroupOptions) -> Result<JobSpec> {
    cfg.training.validate()?;
    if group.min_workers == 0 || group.max_workers < group.min_workers {
        bail!(
            "workers: need 1 <= min_workers <= max_workers (got {}..={})",
            group.min_workers,
            group.max_workers
        );
    }
    let batch = cfg.training.batch_size;
    require_world_divides_batch(batch, group.min_workers..=group.max_workers)?;
    if group.heartbeat >= group.lease {
        bail!(
            "the heartbeat interval ({:?}) must be shorter than the lease ({:?})",
            group.heartbeat,
            group.lease
        );
    }
    absolutize(&mut cfg)?;
    let run_uri = format!(
        "{}/runs/{}",
        cfg.run.output.trim_end_matches('/'),
        cfg.run.name
    );
    let run = Store::open(&cfg.run.output)?.child(&format!("runs/{}", cfg.run.name));
    CheckpointStore::new(&run).require_resume_if_any(group.resume, run.uri())?;
    let plan = plan_config(&cfg)?;
    // What the workers get carries no credentials: they read the S3 secret from their own
    // environment (`launch` hands it to its workers that way).
    let mut wire = cfg.clone();
    wire.storage = wire.storage.map(|s| s.for_workers().0);
    Ok(JobSpec {
        run_id: cfg.run.name.clone(),
        config_yaml: serde_yaml::to_string(&wire).context("serialize the config")?,
        plan,
        run_uri,
        batch_size: batch,
        group,
    })
}
