//! The job's state machine (pure: no I/O, time passed in). The service feeds it
//! registrations, session events and reports; a reconcile tick moves observed toward intent:
//! forms generations, notices lost workers, finishes the job. Every method returns the
//! [`Action`]s it decided on; the service carries them out.

use std::collections::{BTreeMap, HashMap};

use stackwise_proto::model::{
    Backend, Command, DeviceKind, Fence, JobEnd, ProtoError, Registration, Report, RunStage,
    StageDone, WorkerReport,
};
use stackwise_proto::pb;
use tokio::time::{Duration, Instant};

use super::history::{History, Point};
use super::spec::{JobSpec, OnWorkerLoss};
use crate::membership::Membership;

/// What the job asks the service to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send `message` (a fenced command) on worker `to`'s session stream.
    Send {
        to: String,
        message: Box<pb::CoordinatorMessage>,
    },
    /// Find the run's newest checkpoint by reading manifests only, then report it with
    /// [`Job::checkpoint_found`].
    FindCheckpoint,
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

    /// How an ended job reads in a Shutdown (None while it runs).
    fn end(&self) -> Option<JobEnd> {
        match self {
            Phase::Finished => Some(JobEnd::Finished),
            Phase::Stopped(_) => Some(JobEnd::Stopped),
            Phase::Failed(_) => Some(JobEnd::Failed),
            _ => None,
        }
    }
}

/// How long the workers get to agree on a step and commit its checkpoint after a graceful
/// stop was asked, before the job stops without it.
pub const CHECKPOINT_STOP_TIMEOUT: Duration = Duration::from_secs(300);

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

/// `a, b, c`, or for a long list its first few and how many more: one log line stays short
/// at any world size.
fn brief_list(ids: &[String]) -> String {
    const SHOWN: usize = 8;
    if ids.len() <= SHOWN {
        return ids.join(", ");
    }
    format!(
        "{}, ... {} more, ..., {}",
        ids[..SHOWN - 1].join(", "),
        ids.len() - SHOWN,
        ids[ids.len() - 1]
    )
}

/// Where the checkpoint a new generation resumes from stands.
#[derive(Debug, Clone, Default, PartialEq)]
enum Discovery {
    /// Not looked up for the generation being formed.
    #[default]
    Idle,
    /// `FindCheckpoint` is out.
    Asked,
    /// The answer: the newest checkpoint (name, step), if any.
    Found(Option<(String, u64)>),
}

pub struct Job {
    pub spec: JobSpec,
    pub members: Membership,
    pub generation: u64,
    pub phase: Phase,
    /// Workers with an open session stream, by id, with the stream's session number, so
    /// that the end of an old stream does not drop a worker that already reconnected.
    sessions: HashMap<String, u64>,
    session_counter: u64,
    pub step: u64,
    pub loss: f64,
    pub val_loss: Option<f64>,
    /// Rank 0's learning rate and seconds in all-reduce at its last step report.
    pub lr: f64,
    pub allreduce_seconds: f64,
    pub last_checkpoint: Option<String>,
    /// Checkpoints reported committed, and when the last one was.
    pub checkpoints_committed: u64,
    pub last_checkpoint_at: Option<Instant>,
    /// Human-readable events for the launcher and logs ("generation 2 formed ...").
    pub events: Vec<String>,
    /// Also log events with `tracing` (off when the launcher prints them itself).
    pub log_events: bool,
    pub generations_formed: u64,
    /// Tokens processed by all ranks, and when the first and last step reports arrived.
    pub tokens_total: u64,
    pub steps_window: Option<(Instant, Instant)>,
    /// Rank 0's curves, for the dashboard.
    pub history: History,
    /// Random per coordinator instance: ring handshakes of a restarted coordinator's
    /// generations never match connections left over from before the restart.
    instance: u64,
    /// A graceful stop was asked (SIGTERM): why, and when.
    stop_requested: Option<(String, Instant)>,
    /// The stage being trained.
    pub stage: u32,
    /// A stage just ended at this committed checkpoint (name, step): the next generation
    /// starts the next stage from it.
    next_stage_from: Option<(String, u64)>,
    discovery: Discovery,
    /// Actions decided but not yet handed to the service.
    outbox: Vec<Action>,
    /// Per-worker events ("registered", "left: ...") not yet logged, by kind in order:
    /// each kind becomes one line per tick, so 1,024 joins are one line, not 1,024.
    pending_events: Vec<(String, Vec<String>)>,
}

impl Job {
    pub fn new(spec: JobSpec) -> Self {
        Self {
            stage: 0,
            next_stage_from: None,
            members: Membership::new(spec.group.lease),
            spec,
            generation: 0,
            phase: Phase::Waiting { enough_since: None },
            sessions: HashMap::new(),
            session_counter: 0,
            step: 0,
            loss: f64::NAN,
            val_loss: None,
            lr: f64::NAN,
            allreduce_seconds: 0.0,
            last_checkpoint: None,
            checkpoints_committed: 0,
            last_checkpoint_at: None,
            events: Vec::new(),
            log_events: true,
            generations_formed: 0,
            tokens_total: 0,
            steps_window: None,
            history: History::default(),
            instance: instance_nonce(),
            stop_requested: None,
            discovery: Discovery::Idle,
            outbox: Vec::new(),
            pending_events: Vec::new(),
        }
    }

    fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.outbox)
    }

    /// "2/3 block 1 (layers 4-7)": the stage rank 0 trains, from the plan.
    pub fn stage_name(&self) -> String {
        let stages = &self.spec.plan.stages;
        let name = stages
            .get(self.stage as usize)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        format!("{}/{} {name}", self.stage + 1, stages.len())
    }

    /// The step the job ends at: `until_step`, or the end of the plan.
    pub(super) fn target_step(&self) -> u64 {
        self.spec.target_step()
    }

    /// The stage that trains from global step `step`: the first not yet finished there (a
    /// checkpoint at a stage's end starts the next one).
    fn stage_at(&self, step: u64) -> u32 {
        let plan = &self.spec.plan;
        (0..plan.stages.len())
            .position(|i| step < plan.stage_end(i))
            .unwrap_or(plan.stages.len().saturating_sub(1)) as u32
    }

    /// Stop gracefully: the running ranks agree on a step, checkpoint it, and end their
    /// stage; then the job stops (resumable with `--resume`). Without a running
    /// generation the job stops at once.
    pub fn checkpoint_and_stop(&mut self, reason: String, now: Instant) -> Vec<Action> {
        if self.phase.is_over() || self.stop_requested.is_some() {
            return Vec::new();
        }
        if !matches!(self.phase, Phase::Running { .. }) {
            return self.finish(Phase::Stopped(reason));
        }
        self.event(format!(
            "{reason}: asking the workers for a checkpoint, then stopping"
        ));
        self.broadcast(Command::Checkpoint { step: self.step });
        self.stop_requested = Some((reason, now));
        self.take_actions()
    }

    fn fence(&self) -> Fence {
        Fence {
            run_id: self.spec.run_id.clone(),
            generation: self.generation,
        }
    }

    fn event(&mut self, msg: String) {
        self.flush_worker_events();
        self.push_event(msg);
    }

    fn push_event(&mut self, msg: String) {
        if self.log_events {
            tracing::info!("{msg}");
        }
        self.events.push(msg);
    }

    /// `who` (a worker) had an event of `kind`; logged with the others of its kind at the
    /// next tick or event.
    fn worker_event(&mut self, kind: String, who: String) {
        match self.pending_events.last_mut() {
            Some((k, ws)) if *k == kind => ws.push(who),
            _ => self.pending_events.push((kind, vec![who])),
        }
    }

    fn flush_worker_events(&mut self) {
        for (kind, who) in std::mem::take(&mut self.pending_events) {
            self.push_event(match who.as_slice() {
                [one] => format!("worker {one} {kind}"),
                _ => format!("{} workers {kind}: {}", who.len(), brief_list(&who)),
            });
        }
    }

    /// Add a worker; returns its id and the session secret its session hello must carry.
    pub fn register(
        &mut self,
        reg: Registration,
        now: Instant,
    ) -> Result<(String, String), ProtoError> {
        if self.phase.is_over() {
            return Err(ProtoError::JobOver(self.phase.name().into()));
        }
        let name = reg.name.clone();
        let host = reg.capabilities.host.clone();
        let secret = stackwise_proto::random_hex(32);
        let id = self.members.register(reg, secret.clone(), now);
        self.worker_event("registered".into(), format!("{id} ({name} on {host})"));
        Ok((id, secret))
    }

    /// A session stream of `id` opened with `secret`: commands for it go there from now on.
    /// Returns the session number (for `stream_closed`) and the actions. A secret other
    /// than the one issued at registration is refused, so no one takes over a worker's
    /// session by its listed id.
    pub fn attach(
        &mut self,
        id: &str,
        secret: &str,
        now: Instant,
    ) -> Result<(u64, Vec<Action>), ProtoError> {
        let member = self
            .members
            .get(id)
            .ok_or_else(|| ProtoError::UnknownWorker(id.to_string()))?;
        if !stackwise_proto::constant_time_eq(member.session_secret.as_bytes(), secret.as_bytes()) {
            return Err(ProtoError::WrongSessionSecret(id.to_string()));
        }
        self.members.touch(id, now)?;
        self.session_counter += 1;
        self.sessions.insert(id.to_string(), self.session_counter);
        if let Some(end) = self.phase.end() {
            let reason = self.phase.name().to_string();
            self.send(id, Command::Shutdown { reason, end });
        }
        Ok((self.session_counter, self.take_actions()))
    }

    /// Workers with an open session stream.
    pub fn connected(&self) -> usize {
        self.sessions.len()
    }

    fn send(&mut self, id: &str, cmd: Command) {
        if self.sessions.contains_key(id) {
            let message = Box::new(cmd.into_pb(&self.fence()));
            self.outbox.push(Action::Send {
                to: id.to_string(),
                message,
            });
        }
    }

    fn broadcast(&mut self, cmd: Command) {
        let mut ids: Vec<String> = self.sessions.keys().cloned().collect();
        ids.sort();
        for id in ids {
            self.send(&id, cmd.clone());
        }
    }

    /// Check a report's fence and apply it.
    pub fn on_report(&mut self, r: WorkerReport, now: Instant) -> Result<Vec<Action>, ProtoError> {
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
            Report::Hello { .. } => {}
            Report::Heartbeat { seq, .. } => self.send(&r.worker_id, Command::HeartbeatAck { seq }),
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
                    self.lr = s.lr;
                    self.allreduce_seconds = s.allreduce_seconds;
                    if s.val_loss.is_some() {
                        self.val_loss = s.val_loss;
                    }
                    let (step, loss, lr, tokens_per_s) =
                        (s.step, s.loss, s.lr, self.tokens_per_s());
                    let point = Point {
                        step,
                        loss,
                        tokens_per_s,
                        lr,
                    };
                    self.history.record(point, s.val_loss);
                }
            }
            Report::Checkpoint { name, .. } => {
                self.last_checkpoint = Some(name);
                self.checkpoints_committed += 1;
                self.last_checkpoint_at = Some(now);
            }
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
        Ok(self.take_actions())
    }

    /// Session `session` of `id` ended (the process died or the network broke).
    pub fn stream_closed(&mut self, id: &str, session: u64) -> Vec<Action> {
        if self.sessions.get(id).is_some_and(|s| *s != session) {
            return Vec::new(); // an older stream of a worker that has reconnected
        }
        self.sessions.remove(id);
        if self.phase.is_over() {
            self.members.remove(id);
            return Vec::new();
        }
        if let Some(m) = self.members.remove(id) {
            self.lost(
                m.id,
                m.name,
                m.rank,
                "its stream closed (process exited or network lost)",
            );
        }
        self.take_actions()
    }

    fn lost(&mut self, id: String, name: String, rank: Option<u32>, why: &str) {
        self.sessions.remove(&id);
        match rank {
            Some(r) if matches!(self.phase, Phase::Running { .. }) => {
                self.generation_lost(format!("worker {id} ({name}, rank {r}) lost: {why}"));
            }
            _ => self.worker_event(format!("left: {why}"), format!("{id} ({name})")),
        }
    }

    fn generation_lost(&mut self, why: String) {
        match self.spec.group.on_worker_loss {
            OnWorkerLoss::Stop => {
                let msg = format!("{why}; stopping the job");
                self.end(Phase::Failed(msg));
            }
            OnWorkerLoss::Recover => {
                self.event(format!(
                    "{why}; aborting generation {} and re-forming the group",
                    self.generation
                ));
                self.broadcast(Command::Abort { reason: why });
                self.clear_ranks();
                self.discovery = Discovery::Idle;
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
    pub fn finish(&mut self, phase: Phase) -> Vec<Action> {
        self.end(phase);
        self.take_actions()
    }

    fn end(&mut self, phase: Phase) {
        if self.phase.is_over() {
            return;
        }
        let reason = match &phase {
            Phase::Failed(m) | Phase::Stopped(m) => m.clone(),
            _ => "the job is finished".into(),
        };
        self.event(format!("job {}: {reason}", phase.name()));
        let end = phase.end().expect("an ending phase");
        self.phase = phase;
        self.broadcast(Command::Shutdown { reason, end });
    }

    /// Move toward the intent: expire leases, form a generation, notice completion.
    pub fn reconcile(&mut self, now: Instant) -> Vec<Action> {
        self.flush_worker_events();
        for m in self.members.expire(now) {
            let why = format!(
                "missed its lease ({:?} without a heartbeat)",
                self.spec.group.lease
            );
            self.lost(m.id, m.name, m.rank, &why);
        }
        match &self.phase {
            Phase::Waiting { .. } => self.reconcile_waiting(now),
            Phase::Running { ranks, done } if done.len() == ranks.len() => self.stage_done(now),
            Phase::Running { .. }
                if self
                    .stop_requested
                    .as_ref()
                    .is_some_and(|(_, at)| now.duration_since(*at) > CHECKPOINT_STOP_TIMEOUT) =>
            {
                let (reason, _) = self.stop_requested.take().expect("checked");
                let msg = format!(
                    "{reason}: the workers did not checkpoint within {CHECKPOINT_STOP_TIMEOUT:?}; stopped; \
                     --resume continues from {}",
                    self.last_checkpoint.as_deref().unwrap_or("the start")
                );
                self.end(Phase::Stopped(msg));
            }
            _ => {}
        }
        self.take_actions()
    }

    /// Every rank reported its stage done: stop (if asked), start the next stage, or finish.
    fn stage_done(&mut self, now: Instant) {
        let Phase::Running { done, .. } = &self.phase else {
            return;
        };
        let step = done.values().map(|d| d.step).max().unwrap_or(0);
        let ckpt = done.values().find_map(|d| d.last_checkpoint.clone());
        let asked_by_worker = done.values().any(|d| d.stopped_on_request);
        let stopped_early = done.values().any(|d| d.stopped_early);
        self.step = step;
        let requested = self.stop_requested.take().or_else(|| {
            asked_by_worker.then(|| ("a worker was asked to stop (SIGTERM)".to_string(), now))
        });
        let outcome = match requested {
            Some((reason, _)) if step < self.spec.total_steps() => {
                let ckpt = ckpt.unwrap_or_else(|| "-".into());
                Phase::Stopped(format!(
                    "{reason}: stopped at step {step} with checkpoint {ckpt}; continue with --resume"
                ))
            }
            // The stage ended at its boundary checkpoint: the next one starts with the
            // workers there now (a group re-formed between stages, joiners included).
            _ if step < self.target_step() && !stopped_early => {
                let Some(ckpt) = ckpt else {
                    let msg = format!(
                        "stage {} ended at step {step} without a checkpoint",
                        self.stage_name()
                    );
                    self.end(Phase::Failed(msg));
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
                return;
            }
            _ => Phase::Finished,
        };
        self.end(outcome);
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
            .filter(|m| self.sessions.contains_key(&m.id))
            .count();
        if n < self.spec.group.min_workers {
            self.phase = Phase::Waiting { enough_since: None };
            return;
        }
        let since = enough_since.unwrap_or(now);
        self.phase = Phase::Waiting {
            enough_since: Some(since),
        };
        // Between stages the group re-forms at once from the workers that are there.
        let between_stages = self.next_stage_from.is_some();
        if n >= self.spec.group.max_workers
            || between_stages
            || now.duration_since(since) >= self.spec.group.rendezvous_grace
        {
            self.start_generation();
        }
    }

    /// The newest checkpoint, once the service has looked it up (manifests only).
    pub fn checkpoint_found(
        &mut self,
        found: Result<Option<(String, u64)>, String>,
        now: Instant,
    ) -> Vec<Action> {
        if self.discovery != Discovery::Asked {
            return Vec::new();
        }
        match found {
            Ok(c) => {
                self.discovery = Discovery::Found(c);
                self.reconcile_waiting(now);
            }
            Err(e) => {
                self.discovery = Discovery::Idle;
                let msg = format!("cannot read the run's checkpoints: {e}");
                self.end(Phase::Failed(msg));
            }
        }
        self.take_actions()
    }

    /// The checkpoint the next generation resumes from: the one that ended the last stage,
    /// or (a resumed run, a re-formed group) the newest one, which the service looks up
    /// first. `Err(())` while that lookup is out.
    fn resume_point(&mut self) -> Result<Option<(String, u64)>, ()> {
        if let Some(from) = self.next_stage_from.take() {
            return Ok(Some(from));
        }
        if !(self.spec.group.resume || self.generations_formed > 0) {
            return Ok(None);
        }
        match std::mem::take(&mut self.discovery) {
            Discovery::Found(c) => Ok(c),
            Discovery::Idle => {
                self.discovery = Discovery::Asked;
                self.outbox.push(Action::FindCheckpoint);
                Err(())
            }
            Discovery::Asked => {
                self.discovery = Discovery::Asked;
                Err(())
            }
        }
    }

    fn start_generation(&mut self) {
        let Ok(resume) = self.resume_point() else {
            return;
        };
        let (group, sessions) = (&self.spec.group, &self.sessions);
        let Some(ranks) = self.members.form(
            group.min_workers,
            group.max_workers,
            self.spec.batch_size,
            |id| sessions.contains_key(id),
        ) else {
            let n = self.members.len();
            let msg = format!(
                "no group of {}..={} of the {n} workers divides the global batch {}",
                group.min_workers, group.max_workers, self.spec.batch_size
            );
            self.end(Phase::Failed(msg));
            return;
        };
        // Each generation trains one stage of the plan (or what is left of it).
        self.stage = self.stage_at(resume.as_ref().map_or(0, |r| r.1));
        let until_step = self
            .spec
            .plan
            .stage_end(self.stage as usize)
            .min(self.target_step());
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
            brief_list(&ranks),
            backend.as_str(),
            resume
                .as_deref()
                .map_or("from the start".to_string(), |c| format!(
                    "resuming from {c}"
                )),
        ));
        let plan_json = serde_json::to_string(&self.spec.plan).expect("a plan serializes");
        let ring_nonce = stackwise_proto::random_bytes(stackwise_proto::model::RING_NONCE_BYTES);
        for (rank, id) in ranks.iter().enumerate() {
            let cmd = RunStage {
                rank: rank as u32,
                world_size: world,
                next_peer: peers[(rank + 1) % peers.len()].clone(),
                backend,
                stage: self.stage,
                stage_name: self.stage_name(),
                config_yaml: self.spec.config_yaml.clone(),
                resume_checkpoint: resume.clone(),
                until_step: Some(until_step),
                ring_tag: self.instance ^ self.generation.rotate_left(32),
                plan_json: Some(plan_json.clone()),
                ring_nonce: ring_nonce.clone(),
            };
            self.send(id, Command::RunStage(Box::new(cmd)));
        }
        self.phase = Phase::Running {
            ranks,
            done: BTreeMap::new(),
        };
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
