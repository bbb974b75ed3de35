//! What the job shows: its status (the Status RPC, `stackwise status`, the dashboard) and
//! throughput, read from its state.

use serde_json::{Value, json};
use stackwise_proto::pb;
use tokio::time::Instant;

use super::machine::{Job, Phase};

impl Job {
    /// Mean training throughput of the job so far (all ranks), from the step reports.
    pub fn mean_tokens_per_s(&self) -> Option<f64> {
        let (first, last) = self.steps_window?;
        let secs = last.duration_since(first).as_secs_f64();
        (secs > 0.0).then(|| self.tokens_total as f64 / secs)
    }

    /// Training tokens per second now: the sum of the current ranks' last rates.
    pub fn tokens_per_s(&self) -> f64 {
        self.members
            .members()
            .filter(|m| m.rank.is_some())
            .map(|m| m.tokens_per_s)
            .sum()
    }

    /// The status RPC's answer.
    pub fn status(&self, now: Instant) -> pb::JobStatus {
        let workers = self
            .members
            .members()
            .map(|m| pb::WorkerStatus {
                worker_id: m.id.clone(),
                name: m.name.clone(),
                rank: m.rank.map_or(-1, |r| r as i32),
                host: m.caps.host.clone(),
                device: m.caps.device.clone(),
                state: match (&self.phase, m.rank) {
                    (Phase::Running { done, .. }, Some(_)) if done.contains_key(&m.id) => "done",
                    (Phase::Running { .. }, Some(_)) => "training",
                    _ => "idle",
                }
                .into(),
                step: m.step,
                loss: m.loss,
                tokens_per_s: m.tokens_per_s,
                last_seen_ms_ago: now.duration_since(m.last_seen).as_millis() as u64,
            })
            .collect::<Vec<_>>();
        let tokens_per_s = self.tokens_per_s();
        pb::JobStatus {
            run_id: self.spec.run_id.clone(),
            generation: self.generation,
            state: self.phase.name().into(),
            stage: self.stage,
            stage_name: self.stage_name(),
            step: self.step,
            total_steps: self.target_step(),
            loss: self.loss,
            tokens_per_s,
            val_loss: self.val_loss,
            workers,
            message: match &self.phase {
                Phase::Failed(m) | Phase::Stopped(m) => m.clone(),
                _ => String::new(),
            },
            min_workers: self.spec.group.min_workers as u32,
            max_workers: self.spec.group.max_workers as u32,
            lr: self.lr,
            allreduce_seconds: self.allreduce_seconds,
            checkpoints_committed: self.checkpoints_committed,
            last_checkpoint: self.last_checkpoint.clone().unwrap_or_default(),
            seconds_since_checkpoint: self
                .last_checkpoint_at
                .map(|t| now.duration_since(t).as_secs_f64()),
            stages: self.spec.plan.stages.len() as u32,
        }
    }
}

/// A status as JSON: `stackwise status --json` and the dashboard's `/api/job` (NaN as null).
pub fn status_json(s: &pb::JobStatus) -> Value {
    let num = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    let workers: Vec<_> = s
        .workers
        .iter()
        .map(|w| {
            json!({"worker_id": w.worker_id, "name": w.name, "rank": w.rank, "host": w.host,
                "device": w.device, "state": w.state, "step": w.step, "loss": num(w.loss),
                "tokens_per_s": num(w.tokens_per_s), "last_seen_ms_ago": w.last_seen_ms_ago})
        })
        .collect();
    json!({"run_id": s.run_id, "state": s.state, "generation": s.generation,
        "stage": s.stage_name, "stage_index": s.stage, "stages": s.stages, "step": s.step,
        "total_steps": s.total_steps, "loss": num(s.loss), "val_loss": s.val_loss.map(num),
        "tokens_per_s": num(s.tokens_per_s), "lr": num(s.lr),
        "allreduce_seconds": num(s.allreduce_seconds),
        "checkpoints_committed": s.checkpoints_committed, "last_checkpoint": s.last_checkpoint,
        "seconds_since_checkpoint": s.seconds_since_checkpoint.map(num),
        "min_workers": s.min_workers, "max_workers": s.max_workers,
        "workers_alive": s.workers.len(), "message": s.message, "workers": workers})
}
