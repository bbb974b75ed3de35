//! The job: intent (what to run, how many workers, the current generation) and observed
//! state (members, their progress). The service feeds it reports; a reconcile tick moves
//! observed toward intent: forms generations, notices lost workers, finishes the job.

use std::collections::{BTreeMap, HashMap};

use stackwise_common::checkpoint::CheckpointStore;
use stackwise_common::store::Store;
use stackwise_proto::model::{
    Backend, Command, DeviceKind, Fence, ProtoError, Registration, Report, RunStage, StageDone,
    WorkerReport,
};
use stackwise_proto::pb;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{Duration, Instant};

use crate::membership::Membership;

/// What happens when a worker of the running generation is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnWorkerLoss {
    /// Stop the job with an error naming the worker.
    Stop,
    /// Abort the generation, re-form the group from the live workers and continue from the
    /// last committed checkpoint.
    Recover,
}

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub run_id: String,
    /// The resolved config every worker runs (paths made absolute).
    pub config_yaml: String,
    /// The planner's stages (JSON), sent to every worker with the config.
    pub plan_json: String,
    /// Where the run's checkpoints are (`<output>/runs/<name>`).
    pub run_uri: String,
    pub total_steps: u64,
    /// The global batch; the world size must divide it.
    pub batch_size: usize,
    pub min_workers: usize,
    pub max_workers: usize,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Once `min_workers` are there, wait this long for more (up to `max_workers`).
    pub rendezvous_grace: Duration,
    /// Continue the run from its newest valid checkpoint.
    pub resume: bool,
    pub on_worker_loss: OnWorkerLoss,
    /// Stop every rank at this step (with a checkpoint).
    pub until_step: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Waiting {
        enough_since: Option<Instant>,
    },
    Running {
        ranks: Vec<String>,
        done: BTreeMap<String, StageDone>,
    },
    Finished,
    Failed(String),
    Stopped(String),
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Waiting { .. } => "waiting",
            Phase::Running { .. } => "running",
            Phase::Finished => "finished",
            Phase::Failed(_) => "failed",
            Phase::Stopped(_) => "stopped",
        }
    }

    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed(_) | Phase::Stopped(_))
    }
}

fn instance_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

pub type Downlink = UnboundedSender<Result<pb::CoordinatorMessage, tonic::Status>>;

pub struct Job {
    pub spec: JobSpec,
    pub members: Membership,
    pub generation: u64,
    pub phase: Phase,
    /// Open session streams by worker, with a session number so that the end of an old
    /// stream does not drop a worker that already reconnected.
    links: HashMap<String, (u64, Downlink)>,
    sessions: u64,
    pub step: u64,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub last_checkpoint: Option<String>,
    /// Human-readable events for the launcher and logs ("generation 2 formed ...").
    pub events: Vec<String>,
    /// Also log events with `tracing` (off when the launcher prints them itself).
    pub log_events: bool,
    pub generations_formed: u64,
    /// Tokens processed by all ranks, and when the first and last step reports arrived.
    pub tokens_total: u64,
    pub steps_window: Option<(Instant, Instant)>,
    /// Random per coordinator instance: ring handshakes of a restarted coordinator's
    /// generations never match connections left over from before the restart.
    instance: u64,
    /// A graceful stop was asked (SIGTERM): why, and when.
    stop_requested: Option<(String, Instant)>,
    /// The plan's stage boundaries (global steps) and names, and the stage being trained.
    stages: Vec<(u64, u64, String)>,
    pub stage: u32,
    /// A stage just ended at this committed checkpoint (name, step): the next generation
    /// starts the next stage from it.
    next_stage_from: Option<(String, u64)>,
}

/// How long the workers get to agree on a step and commit its checkpoint after a graceful
/// stop was asked, before the job stops without it.
pub const CHECKPOINT_STOP_TIMEOUT: Duration = Duration::from_secs(300);

impl Job {
    pub fn new(spec: JobSpec) -> Self {
        let stages = match serde_json::from_str::<stackwise_worker::train::Plan>(&spec.plan_json) {
            Ok(p) => (0..p.stages.len())
                .map(|i| (p.stage_start(i), p.stage_end(i), p.stages[i].name.clone()))
                .collect(),
            Err(_) => vec![(0, spec.total_steps, "end-to-end".to_string())],
        };
        Self {
            stages,
            stage: 0,
            next_stage_from: None,
            members: Membership::new(spec.lease),
            spec,
            generation: 0,
            phase: Phase::Waiting { enough_since: None },
            links: HashMap::new(),
            sessions: 0,
            step: 0,
            loss: f64::NAN,
            val_loss: None,
            last_checkpoint: None,
            events: Vec::new(),
            log_events: true,
            generations_formed: 0,
            tokens_total: 0,
            steps_window: None,
            instance: instance_nonce(),
            stop_requested: None,
        }
    }

    /// "2/3 block 1 (layers 4-7)": the stage rank 0 trains, from the plan.
    pub fn stage_name(&self) -> String {
        let name = self
            .stages
            .get(self.stage as usize)
            .map(|s| s.2.clone())
            .unwrap_or_default();
        format!("{}/{} {name}", self.stage + 1, self.stages.len())
    }

    /// The step the job ends at: `until_step`, or the end of the plan.
    fn target_step(&self) -> u64 {
        self.spec
            .until_step
            .unwrap_or(self.spec.total_steps)
            .min(self.spec.total_steps)
    }

    /// The stage that trains from global step `step`: the first not yet finished there (a
    /// checkpoint at a stage's end starts the next one).
    fn stage_at(&self, step: u64) -> u32 {
        self.stages
            .iter()
            .position(|&(_, end, _)| step < end)
            .unwrap_or(self.stages.len().saturating_sub(1)) as u32
    }

    /// Stop gracefully: the running ranks agree on a step, checkpoint it, and end their
    /// stage; then the job stops (resumable with `--resume`). Without a running
    /// generation the job stops at once.
    pub fn checkpoint_and_stop(&mut self, reason: String, now: Instant) {
        if self.phase.is_over() || self.stop_requested.is_some() {
            return;
        }
        if !matches!(self.phase, Phase::Running { .. }) {
            self.finish(Phase::Stopped(reason));
            return;
        }
        self.event(format!(
            "{reason}: asking the workers for a checkpoint, then stopping"
        ));
        self.broadcast(Command::Checkpoint { step: self.step });
        self.stop_requested = Some((reason, now));
    }

    fn fence(&self) -> Fence {
        Fence {
            run_id: self.spec.run_id.clone(),
            generation: self.generation,
        }
    }

    fn event(&mut self, msg: String) {
        if self.log_events {
            tracing::info!("{msg}");
        }
        self.events.push(msg);
    }

    pub fn register(&mut self, reg: Registration, now: Instant) -> Result<String, ProtoError> {
        if self.phase.is_over() {
            return Err(ProtoError::JobOver(self.phase.name().into()));
        }
        let name = reg.name.clone();
        let host = reg.capabilities.host.clone();
        let id = self.members.register(reg, now);
        self.event(format!("worker {id} ({name} on {host}) registered"));
        Ok(id)
    }

    /// A session stream opened: commands for `id` go to `link`. Returns the session number.
    pub fn attach(&mut self, id: &str, link: Downlink, now: Instant) -> Result<u64, ProtoError> {
        self.members.touch(id, now)?;
        self.sessions += 1;
        self.links.insert(id.to_string(), (self.sessions, link));
        if self.phase.is_over() {
            let reason = self.phase.name().to_string();
            self.send(id, Command::Shutdown { reason });
        }
        Ok(self.sessions)
    }

    /// Workers with an open session stream.
    pub fn connected(&self) -> usize {
        self.links.len()
    }

    fn send(&mut self, id: &str, cmd: Command) {
        let msg = cmd.into_pb(&self.fence());
        if let Some((_, link)) = self.links.get(id)
            && link.send(Ok(msg)).is_err()
        {
            self.links.remove(id);
        }
    }

    fn broadcast(&mut self, cmd: Command) {
        let ids: Vec<String> = self.links.keys().cloned().collect();
        for id in ids {
            self.send(&id, cmd.clone());
        }
    }

    /// Check a report's fence and apply it.
    pub fn on_report(&mut self, r: WorkerReport, now: Instant) -> Result<(), ProtoError> {
        if r.fence.run_id != self.spec.run_id {
            return Err(ProtoError::WrongRun {
                got: r.fence.run_id,
                expected: self.spec.run_id.clone(),
            });
        }
        let member = self.members.touch(&r.worker_id, now)?;
        let rank = member.rank;
        if r.report.is_fenced() && (r.fence.generation != self.generation || rank.is_none()) {
            return Err(ProtoError::StaleGeneration {
                got: r.fence.generation,
                current: self.generation,
            });
        }
        match r.report {
            Report::Hello | Report::Heartbeat { .. } => {}
            Report::Step(s) => {
                self.tokens_total += s.tokens;
                self.steps_window = Some(
                    self.steps_window
                        .map_or((now, now), |(first, _)| (first, now)),
                );
                let m = self.members.get_mut(&r.worker_id).expect("touched above");
                m.step = s.step;
                m.loss = s.loss;
                m.tokens_per_s = s.tokens_per_s;
                if rank == Some(0) {
                    self.step = s.step;
                    self.stage = s.stage;
                    self.loss = s.loss;
                    if s.val_loss.is_some() {
                        self.val_loss = s.val_loss;
                    }
                }
            }
            Report::Checkpoint { name, .. } => self.last_checkpoint = Some(name),
            Report::StageDone(d) => {
                if let Phase::Running { done, .. } = &mut self.phase {
                    done.insert(r.worker_id, d);
                }
            }
            Report::NcclId(id) => {
                if rank == Some(0)
                    && let Phase::Running { ranks, .. } = &self.phase
                {
                    for other in ranks.clone().iter().skip(1) {
                        self.send(other, Command::NcclId(id.clone()));
                    }
                }
            }
            Report::Failed { message } => {
                let name = self
                    .members
                    .get(&r.worker_id)
                    .map(|m| m.name.clone())
                    .unwrap_or_default();
                self.generation_lost(format!(
                    "worker {} ({name}, rank {}) failed: {message}",
                    r.worker_id,
                    rank.unwrap_or(0)
                ));
            }
        }
        Ok(())
    }

    /// Session `session` of `id` ended (the process died or the network broke).
    pub fn stream_closed(&mut self, id: &str, session: u64) {
        if self.links.get(id).is_some_and(|(s, _)| *s != session) {
            return; // an older stream of a worker that has reconnected
        }
        self.links.remove(id);
        if self.phase.is_over() {
            self.members.remove(id);
            return;
        }
        if let Some(m) = self.members.remove(id) {
            self.lost(
                m.id,
                m.name,
                m.rank,
                "its stream closed (process exited or network lost)",
            );
        }
    }

    fn lost(&mut self, id: String, name: String, rank: Option<u32>, why: &str) {
        self.links.remove(&id);
        match rank {
            Some(r) if matches!(self.phase, Phase::Running { .. }) => {
                self.generation_lost(format!("worker {id} ({name}, rank {r}) lost: {why}"));
            }
            _ => self.event(format!("worker {id} ({name}) left: {why}")),
        }
    }

    fn generation_lost(&mut self, why: String) {
        match self.spec.on_worker_loss {
            OnWorkerLoss::Stop => {
                let msg = format!("{why}; stopping the job");
                self.finish(Phase::Failed(msg));
            }
            OnWorkerLoss::Recover => {
                self.event(format!(
                    "{why}; aborting generation {} and re-forming the group",
                    self.generation
                ));
                self.broadcast(Command::Abort { reason: why });
                self.clear_ranks();
                self.phase = Phase::Waiting { enough_since: None };
            }
        }
    }

    /// The generation is over: no member holds a rank until the next one forms.
    fn clear_ranks(&mut self) {
        let ids: Vec<String> = self.members.members().map(|m| m.id.clone()).collect();
        for id in ids {
            if let Some(m) = self.members.get_mut(&id) {
                m.rank = None;
            }
        }
    }

    /// End the job; every worker is told to shut down.
    pub fn finish(&mut self, phase: Phase) {
        if self.phase.is_over() {
            return;
        }
        let reason = match &phase {
            Phase::Failed(m) | Phase::Stopped(m) => m.clone(),
            _ => "the job is finished".into(),
        };
        self.event(format!("job {}: {reason}", phase.name()));
        self.phase = phase;
        self.broadcast(Command::Shutdown { reason });
    }

    /// Move toward the intent: expire leases, form a generation, notice completion.
    pub fn reconcile(&mut self, now: Instant) {
        for m in self.members.expire(now) {
            let why = format!(
                "missed its lease ({:?} without a heartbeat)",
                self.spec.lease
            );
            self.lost(m.id, m.name, m.rank, &why);
        }
        match &self.phase {
            Phase::Waiting { .. } => self.reconcile_waiting(now),
            Phase::Running { ranks, done } if done.len() == ranks.len() => {
                let step = done.values().map(|d| d.step).max().unwrap_or(0);
                self.step = step;
                let asked_by_worker = done.values().any(|d| d.stopped_on_request);
                let requested = self.stop_requested.take().or_else(|| {
                    asked_by_worker
                        .then(|| ("a worker was asked to stop (SIGTERM)".to_string(), now))
                });
                let stopped_early = done.values().any(|d| d.stopped_early);
                match requested {
                    Some((reason, _)) if step < self.spec.total_steps => {
                        let ckpt = done
                            .values()
                            .find_map(|d| d.last_checkpoint.clone())
                            .unwrap_or_else(|| "-".into());
                        self.finish(Phase::Stopped(format!(
                            "{reason}: stopped at step {step} with checkpoint {ckpt}; continue with --resume"
                        )));
                    }
                    // The stage ended at its boundary checkpoint: the next one starts with the
                    // workers there now (a group re-formed between stages, joiners included).
                    _ if step < self.target_step() && !stopped_early => {
                        let Some(ckpt) = done.values().find_map(|d| d.last_checkpoint.clone())
                        else {
                            self.finish(Phase::Failed(format!(
                                "stage {} ended at step {step} without a checkpoint",
                                self.stage_name()
                            )));
                            return;
                        };
                        self.event(format!(
                            "stage {} done at step {step} (checkpoint {ckpt})",
                            self.stage_name()
                        ));
                        self.next_stage_from = Some((ckpt, step));
                        self.clear_ranks();
                        self.phase = Phase::Waiting { enough_since: None };
                        self.reconcile_waiting(now);
                    }
                    _ => self.finish(Phase::Finished),
                }
            }
            Phase::Running { .. }
                if self
                    .stop_requested
                    .as_ref()
                    .is_some_and(|(_, at)| now.duration_since(*at) > CHECKPOINT_STOP_TIMEOUT) =>
            {
                let (reason, _) = self.stop_requested.take().expect("checked");
                self.finish(Phase::Stopped(format!(
                    "{reason}: the workers did not checkpoint within {CHECKPOINT_STOP_TIMEOUT:?}; stopped; \
                     --resume continues from {}",
                    self.last_checkpoint.as_deref().unwrap_or("the start")
                )));
            }
            _ => {}
        }
    }

    /// Form a generation once enough workers are connected (and the rendezvous grace for
    /// more has passed, unless `max_workers` are there).
    fn reconcile_waiting(&mut self, now: Instant) {
        let Phase::Waiting { enough_since } = self.phase else {
            return;
        };
        // Only workers whose session stream is open can be told what to run.
        let n = self
            .members
            .members()
            .filter(|m| self.links.contains_key(&m.id))
            .count();
        if n < self.spec.min_workers {
            self.phase = Phase::Waiting { enough_since: None };
            return;
        }
        let since = enough_since.unwrap_or(now);
        self.phase = Phase::Waiting {
            enough_since: Some(since),
        };
        // Between stages the group re-forms at once from the workers that are there.
        let between_stages = self.next_stage_from.is_some();
        if n >= self.spec.max_workers
            || between_stages
            || now.duration_since(since) >= self.spec.rendezvous_grace
        {
            self.start_generation();
        }
    }

    fn newest_checkpoint(&self) -> Result<Option<(String, u64)>, String> {
        let store = Store::open(&self.spec.run_uri).map_err(|e| e.to_string())?;
        CheckpointStore::new(&store)
            .load_latest()
            .map(|c| c.map(|c| (c.name, c.manifest.step)))
            .map_err(|e| e.to_string())
    }

    fn start_generation(&mut self) {
        let links = &self.links;
        let Some(ranks) = self.members.form(
            self.spec.min_workers,
            self.spec.max_workers,
            self.spec.batch_size,
            |id| links.contains_key(id),
        ) else {
            let n = self.members.len();
            let msg = format!(
                "no group of {}..={} of the {n} workers divides the global batch {}",
                self.spec.min_workers, self.spec.max_workers, self.spec.batch_size
            );
            self.finish(Phase::Failed(msg));
            return;
        };
        // The next stage starts from the checkpoint that ended the last one; a re-formed
        // group, or a resumed run, continues from the newest valid checkpoint.
        let resume = if let Some(from) = self.next_stage_from.take() {
            Some(from)
        } else if self.spec.resume || self.generations_formed > 0 {
            match self.newest_checkpoint() {
                Ok(c) => c,
                Err(e) => {
                    self.finish(Phase::Failed(format!(
                        "cannot read the run's checkpoints: {e}"
                    )));
                    return;
                }
            }
        } else {
            None
        };
        // Each generation trains one stage of the plan (or what is left of it).
        self.stage = self.stage_at(resume.as_ref().map_or(0, |r| r.1));
        let until_step = self.stages[self.stage as usize].1.min(self.target_step());
        let resume = resume.map(|r| r.0);
        self.generation += 1;
        self.generations_formed += 1;
        let world = ranks.len() as u32;
        let cuda = ranks
            .iter()
            .filter_map(|id| self.members.get(id))
            .all(|m| m.caps.device_kind == DeviceKind::Cuda);
        let backend = match (world, cuda) {
            (1, _) => Backend::Local,
            (_, true) => Backend::Nccl,
            _ => Backend::Ring,
        };
        let peers: Vec<String> = ranks
            .iter()
            .filter_map(|id| self.members.get(id).map(|m| m.ring_address.clone()))
            .collect();
        self.event(format!(
            "generation {} formed for stage {}: {world} worker(s) [{}], {} backend, {}",
            self.generation,
            self.stage_name(),
            ranks.join(", "),
            backend.as_str(),
            resume
                .as_deref()
                .map_or("from the start".to_string(), |c| format!(
                    "resuming from {c}"
                )),
        ));
        for (rank, id) in ranks.clone().iter().enumerate() {
            let cmd = RunStage {
                rank: rank as u32,
                world_size: world,
                peers: peers.clone(),
                backend,
                stage: self.stage,
                stage_name: self.stage_name(),
                config_yaml: self.spec.config_yaml.clone(),
                resume_checkpoint: resume.clone(),
                until_step: Some(until_step),
                ring_tag: self.instance ^ self.generation.rotate_left(32),
                plan_json: (!self.spec.plan_json.is_empty()).then(|| self.spec.plan_json.clone()),
            };
            self.send(id, Command::RunStage(Box::new(cmd)));
        }
        self.phase = Phase::Running {
            ranks,
            done: BTreeMap::new(),
        };
    }

    /// Mean training throughput of the job so far (all ranks), from the step reports.
    pub fn mean_tokens_per_s(&self) -> Option<f64> {
        let (first, last) = self.steps_window?;
        let secs = last.duration_since(first).as_secs_f64();
        (secs > 0.0).then(|| self.tokens_total as f64 / secs)
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
        let tokens_per_s = workers
            .iter()
            .filter(|w| w.rank >= 0)
            .map(|w| w.tokens_per_s)
            .sum();
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
            min_workers: self.spec.min_workers as u32,
            max_workers: self.spec.max_workers as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackwise_proto::model::Capabilities;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    type Inbox = UnboundedReceiver<Result<pb::CoordinatorMessage, tonic::Status>>;

    fn layerwise_spec(layers: usize, steps: u64, min: usize, max: usize) -> JobSpec {
        let t = stackwise_worker::train::config::TrainingSection {
            mode: stackwise_worker::train::config::TrainingMode::Layerwise,
            steps,
            ..Default::default()
        };
        let plan = crate::plan::plan(&t, layers).unwrap();
        JobSpec {
            run_id: "r".into(),
            config_yaml: "run: {name: r}".into(),
            total_steps: plan.total_steps(),
            plan_json: serde_json::to_string(&plan).unwrap(),
            run_uri: String::new(),
            batch_size: 4,
            min_workers: min,
            max_workers: max,
            lease: Duration::from_secs(60),
            heartbeat: Duration::from_millis(100),
            rendezvous_grace: Duration::ZERO,
            resume: false,
            on_worker_loss: OnWorkerLoss::Stop,
            until_step: None,
        }
    }

    fn join(job: &mut Job, name: &str, now: Instant) -> (String, Inbox) {
        let reg = Registration {
            name: name.into(),
            capabilities: Capabilities {
                device_kind: DeviceKind::Cpu,
                device: "cpu".into(),
                memory_bytes: 1 << 30,
                host: "localhost".into(),
                cpu_threads: 1,
            },
            ring_address: format!("127.0.0.1:{}", 7000 + name.len()),
        };
        let id = job.register(reg, now).unwrap();
        let (tx, rx) = unbounded_channel();
        job.attach(&id, tx, now).unwrap();
        (id, rx)
    }

    /// The RunStage commands waiting in an inbox.
    fn run_stages(inbox: &mut Inbox) -> Vec<RunStage> {
        let mut out = Vec::new();
        while let Ok(Ok(m)) = inbox.try_recv() {
            if let Ok((_, Command::RunStage(r))) = <(Fence, Command)>::try_from(m) {
                out.push(*r);
            }
        }
        out
    }

    fn stage_done(job: &mut Job, id: &str, step: u64, now: Instant) {
        let r = WorkerReport {
            fence: job.fence(),
            worker_id: id.into(),
            report: Report::StageDone(StageDone {
                stage: job.stage,
                step,
                train_loss: None,
                val_loss: None,
                last_checkpoint: Some(format!("step-{step:08}")),
                stopped_early: false,
                stopped_on_request: false,
            }),
        };
        job.on_report(r, now).unwrap();
    }

    #[test]
    fn each_stage_is_a_generation_from_the_last_boundary_and_joiners_take_part_in_the_next() {
        let now = Instant::now();
        let mut job = Job::new(layerwise_spec(2, 4, 1, 2));
        job.log_events = false;
        let (a, mut inbox_a) = join(&mut job, "a", now);
        job.reconcile(now);
        let first = run_stages(&mut inbox_a);
        assert_eq!(first.len(), 1);
        assert_eq!(
            (first[0].stage, first[0].world_size, first[0].until_step),
            (0, 1, Some(2))
        );
        assert_eq!(first[0].resume_checkpoint, None);
        // A second worker joins while stage 1 trains: it waits for the next stage.
        let (b, mut inbox_b) = join(&mut job, "bb", now);
        job.reconcile(now);
        assert!(run_stages(&mut inbox_b).is_empty());
        stage_done(&mut job, &a, 2, now);
        job.reconcile(now);
        assert_eq!(job.generation, 2);
        for inbox in [&mut inbox_a, &mut inbox_b] {
            let next = run_stages(inbox);
            assert_eq!(next.len(), 1);
            assert_eq!(
                (next[0].stage, next[0].world_size, next[0].until_step),
                (1, 2, Some(4))
            );
            assert_eq!(next[0].resume_checkpoint.as_deref(), Some("step-00000002"));
        }
        assert_eq!(job.status(now).stage_name, "2/2 layer 1");
        stage_done(&mut job, &a, 4, now);
        assert_eq!(job.phase.name(), "running", "rank 1 is not done yet");
        stage_done(&mut job, &b, 4, now);
        job.reconcile(now);
        assert_eq!(job.phase, Phase::Finished);
    }

    #[test]
    fn the_status_names_the_stage_rank_0_trains_from_the_plan() {
        let t = stackwise_worker::train::config::TrainingSection {
            mode: stackwise_worker::train::config::TrainingMode::Layerwise,
            steps: 4,
            ..Default::default()
        };
        let plan = crate::plan::plan(&t, 2).unwrap();
        let spec = JobSpec {
            run_id: "r".into(),
            config_yaml: String::new(),
            plan_json: serde_json::to_string(&plan).unwrap(),
            run_uri: String::new(),
            total_steps: 4,
            batch_size: 1,
            min_workers: 1,
            max_workers: 1,
            lease: Duration::from_secs(1),
            heartbeat: Duration::from_millis(100),
            rendezvous_grace: Duration::ZERO,
            resume: false,
            on_worker_loss: OnWorkerLoss::Stop,
            until_step: None,
        };
        let mut job = Job::new(spec);
        assert_eq!(job.stage_name(), "1/2 layer 0");
        job.stage = 1;
        assert_eq!(job.status(Instant::now()).stage_name, "2/2 layer 1");
    }
}
