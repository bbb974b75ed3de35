//! Domain types of the protocol. Everything that arrives over the wire goes through
//! `TryFrom<pb::…>`, which checks required fields and ranges; `ProtoError` maps to gRPC codes.

use std::fmt;

use crate::{PROTOCOL_VERSION, pb};

/// Why a message or call was refused. Each variant has exactly one gRPC code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtoError {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("invalid {field}: {msg}")]
    Invalid { field: &'static str, msg: String },
    #[error(
        "protocol version {got} is not this coordinator's {want}; run the same stackwise version everywhere"
    )]
    Version { got: u32, want: u32 },
    #[error("missing or wrong token; pass the job's token with --token-file or STACKWISE_TOKEN")]
    Unauthenticated,
    #[error("message for run {got:?}, but this is run {expected:?}")]
    WrongRun { got: String, expected: String },
    #[error("stale generation {got}: the current generation is {current}")]
    StaleGeneration { got: u64, current: u64 },
    #[error(
        "unknown worker {0:?} (its lease expired or the coordinator restarted); register again"
    )]
    UnknownWorker(String),
    #[error("the job is over: {0}")]
    JobOver(String),
    #[error("the session secret does not match worker {0:?}'s registration")]
    WrongSessionSecret(String),
}

impl From<ProtoError> for tonic::Status {
    fn from(e: ProtoError) -> Self {
        let msg = e.to_string();
        match e {
            ProtoError::Missing(_) | ProtoError::Invalid { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            ProtoError::Version { .. } => tonic::Status::failed_precondition(msg),
            ProtoError::Unauthenticated => tonic::Status::unauthenticated(msg),
            ProtoError::WrongRun { .. } => tonic::Status::permission_denied(msg),
            ProtoError::StaleGeneration { .. } => tonic::Status::failed_precondition(msg),
            ProtoError::UnknownWorker(_) => tonic::Status::not_found(msg),
            ProtoError::JobOver(_) => tonic::Status::unavailable(msg),
            ProtoError::WrongSessionSecret(_) => tonic::Status::permission_denied(msg),
        }
    }
}

fn invalid(field: &'static str, msg: impl Into<String>) -> ProtoError {
    ProtoError::Invalid {
        field,
        msg: msg.into(),
    }
}

/// `(run_id, generation)`: carried by every command and report.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub run_id: String,
    pub generation: u64,
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/gen{}", self.run_id, self.generation)
    }
}

fn fence(run_id: String, generation: u64) -> Result<Fence, ProtoError> {
    if run_id.is_empty() {
        return Err(ProtoError::Missing("run_id"));
    }
    Ok(Fence { run_id, generation })
}

/// Device kind and size of a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    pub device_kind: DeviceKind,
    pub device: String,
    pub memory_bytes: u64,
    pub host: String,
    pub cpu_threads: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        }
    }
}

impl TryFrom<pb::Capabilities> for Capabilities {
    type Error = ProtoError;
    fn try_from(c: pb::Capabilities) -> Result<Self, ProtoError> {
        let device_kind = match c.device_kind.as_str() {
            "cpu" => DeviceKind::Cpu,
            "cuda" => DeviceKind::Cuda,
            other => {
                return Err(invalid(
                    "device_kind",
                    format!("{other:?}: use cpu or cuda"),
                ));
            }
        };
        Ok(Self {
            device_kind,
            device: c.device,
            memory_bytes: c.memory_bytes,
            host: c.host,
            cpu_threads: c.cpu_threads,
        })
    }
}

impl From<Capabilities> for pb::Capabilities {
    fn from(c: Capabilities) -> Self {
        Self {
            device_kind: c.device_kind.as_str().into(),
            device: c.device,
            memory_bytes: c.memory_bytes,
            host: c.host,
            cpu_threads: c.cpu_threads,
        }
    }
}

/// A validated `RegisterRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub name: String,
    pub capabilities: Capabilities,
    /// `host:port` of the worker's ring listener.
    pub ring_address: String,
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = ProtoError;
    fn try_from(r: pb::RegisterRequest) -> Result<Self, ProtoError> {
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(ProtoError::Version {
                got: r.protocol_version,
                want: PROTOCOL_VERSION,
            });
        }
        if r.name.len() > 128 {
            return Err(invalid("name", "longer than 128 bytes"));
        }
        let capabilities = r.capabilities.ok_or(ProtoError::Missing("capabilities"))?;
        let ring_address = r.ring_address;
        match ring_address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => {
                return Err(invalid(
                    "ring_address",
                    format!("{ring_address:?} is not host:port"),
                ));
            }
        }
        Ok(Self {
            name: r.name,
            capabilities: capabilities.try_into()?,
            ring_address,
        })
    }
}

/// How the ranks of a generation exchange gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// World size 1: nothing to exchange.
    Local,
    /// TCP ring between the workers (CPU).
    Ring,
    /// NCCL (CUDA); the unique id is relayed by the coordinator.
    Nccl,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Ring => "ring",
            Self::Nccl => "nccl",
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        match s {
            "local" => Ok(Self::Local),
            "ring" => Ok(Self::Ring),
            "nccl" => Ok(Self::Nccl),
            other => Err(invalid(
                "backend",
                format!("{other:?}: use local, ring or nccl"),
            )),
        }
    }
}

/// Bytes of a generation's ring nonce.
pub const RING_NONCE_BYTES: usize = 32;

/// What a worker is told to run in a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStage {
    pub rank: u32,
    pub world_size: u32,
    /// The ring's next hop: rank + 1's listener (ring backend only).
    pub next_peer: String,
    pub backend: Backend,
    pub stage: u32,
    pub stage_name: String,
    pub config_yaml: String,
    pub resume_checkpoint: Option<String>,
    pub until_step: Option<u64>,
    pub ring_tag: u64,
    /// The stage plan as JSON (none = one end-to-end stage).
    pub plan_json: Option<String>,
    /// The generation's ring key material (see the proto).
    pub ring_nonce: Vec<u8>,
}

impl TryFrom<pb::RunStage> for RunStage {
    type Error = ProtoError;
    fn try_from(r: pb::RunStage) -> Result<Self, ProtoError> {
        if r.world_size == 0 {
            return Err(invalid("world_size", "must be at least 1"));
        }
        if r.rank >= r.world_size {
            return Err(invalid(
                "rank",
                format!("{} is not below world_size {}", r.rank, r.world_size),
            ));
        }
        let backend: Backend = r.backend.parse()?;
        if backend == Backend::Ring && r.next_peer.is_empty() {
            return Err(ProtoError::Missing("next_peer"));
        }
        if backend == Backend::Ring && r.ring_nonce.len() != RING_NONCE_BYTES {
            return Err(invalid(
                "ring_nonce",
                format!(
                    "{} bytes; a ring needs {RING_NONCE_BYTES}",
                    r.ring_nonce.len()
                ),
            ));
        }
        if backend == Backend::Local && r.world_size != 1 {
            return Err(invalid("backend", "local needs world_size 1"));
        }
        if r.config_yaml.trim().is_empty() {
            return Err(ProtoError::Missing("config_yaml"));
        }
        Ok(Self {
            rank: r.rank,
            world_size: r.world_size,
            next_peer: r.next_peer,
            backend,
            stage: r.stage,
            stage_name: r.stage_name,
            config_yaml: r.config_yaml,
            resume_checkpoint: (!r.resume_checkpoint.is_empty()).then_some(r.resume_checkpoint),
            until_step: (r.until_step > 0).then_some(r.until_step),
            ring_tag: r.ring_tag,
            plan_json: (!r.plan_json.is_empty()).then_some(r.plan_json),
            ring_nonce: r.ring_nonce,
        })
    }
}

impl From<RunStage> for pb::RunStage {
    fn from(r: RunStage) -> Self {
        Self {
            rank: r.rank,
            world_size: r.world_size,
            next_peer: r.next_peer,
            backend: r.backend.as_str().into(),
            stage: r.stage,
            stage_name: r.stage_name,
            config_yaml: r.config_yaml,
            resume_checkpoint: r.resume_checkpoint.unwrap_or_default(),
            until_step: r.until_step.unwrap_or(0),
            ring_tag: r.ring_tag,
            plan_json: r.plan_json.unwrap_or_default(),
            ring_nonce: r.ring_nonce,
        }
    }
}

/// How a job ended, as Shutdown tells the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Every step ran.
    Finished,
    /// Stopped at a checkpoint (SIGTERM, Ctrl-C): a resumed job continues from it.
    Stopped,
    /// Failed; resuming may not help.
    Failed,
}

impl TryFrom<i32> for JobEnd {
    type Error = ProtoError;
    fn try_from(v: i32) -> Result<Self, ProtoError> {
        match pb::JobEnd::try_from(v) {
            Ok(pb::JobEnd::Finished) => Ok(JobEnd::Finished),
            Ok(pb::JobEnd::Stopped) => Ok(JobEnd::Stopped),
            Ok(pb::JobEnd::Failed) => Ok(JobEnd::Failed),
            _ => Err(ProtoError::Missing("shutdown.end")),
        }
    }
}

impl From<JobEnd> for pb::JobEnd {
    fn from(e: JobEnd) -> Self {
        match e {
            JobEnd::Finished => pb::JobEnd::Finished,
            JobEnd::Stopped => pb::JobEnd::Stopped,
            JobEnd::Failed => pb::JobEnd::Failed,
        }
    }
}

/// A command from the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    RunStage(Box<RunStage>),
    Checkpoint {
        step: u64,
    },
    Abort {
        reason: String,
    },
    Shutdown {
        reason: String,
        end: JobEnd,
    },
    NcclId(Vec<u8>),
    /// The heartbeat `seq` renewed the lease.
    HeartbeatAck {
        seq: u64,
    },
}

impl TryFrom<pb::CoordinatorMessage> for (Fence, Command) {
    type Error = ProtoError;
    fn try_from(m: pb::CoordinatorMessage) -> Result<Self, ProtoError> {
        use pb::coordinator_message::Body;
        let f = fence(m.run_id, m.generation)?;
        let cmd = match m.body.ok_or(ProtoError::Missing("body"))? {
            Body::RunStage(r) => Command::RunStage(Box::new(r.try_into()?)),
            Body::Checkpoint(c) => Command::Checkpoint { step: c.step },
            Body::Abort(a) => Command::Abort { reason: a.reason },
            Body::Shutdown(s) => Command::Shutdown {
                end: s.end.try_into()?,
                reason: s.reason,
            },
            Body::NcclId(n) => Command::NcclId(nccl_id(n.id)?),
            Body::HeartbeatAck(a) => Command::HeartbeatAck { seq: a.seq },
        };
        Ok((f, cmd))
    }
}

impl Command {
    pub fn into_pb(self, fence: &Fence) -> pb::CoordinatorMessage {
        use pb::coordinator_message::Body;
        let body = match self {
            Command::RunStage(r) => Body::RunStage((*r).into()),
            Command::Checkpoint { step } => Body::Checkpoint(pb::CheckpointNow { step }),
            Command::Abort { reason } => Body::Abort(pb::Abort { reason }),
            Command::Shutdown { reason, end } => Body::Shutdown(pb::Shutdown {
                reason,
                end: pb::JobEnd::from(end).into(),
            }),
            Command::NcclId(id) => Body::NcclId(pb::NcclId { id }),
            Command::HeartbeatAck { seq } => Body::HeartbeatAck(pb::HeartbeatAck { seq }),
        };
        pb::CoordinatorMessage {
            run_id: fence.run_id.clone(),
            generation: fence.generation,
            body: Some(body),
        }
    }
}

/// NCCL's unique id is 128 bytes.
pub const NCCL_ID_BYTES: usize = 128;

fn nccl_id(id: Vec<u8>) -> Result<Vec<u8>, ProtoError> {
    if id.len() != NCCL_ID_BYTES {
        return Err(invalid(
            "nccl_id",
            format!("{} bytes, expected {NCCL_ID_BYTES}", id.len()),
        ));
    }
    Ok(id)
}

/// Step metrics of one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    pub stage: u32,
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub val_loss: Option<f64>,
    pub skipped: bool,
    /// Seconds spent in collectives since the last report.
    pub allreduce_seconds: f64,
}

/// The result of a finished stage on one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDone {
    pub stage: u32,
    pub step: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub last_checkpoint: Option<String>,
    pub stopped_early: bool,
    pub stopped_on_request: bool,
}

/// A report from a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Opens a session; carries the secret of the worker's registration.
    Hello {
        session_secret: String,
    },
    Heartbeat {
        step: u64,
        /// 1, 2, ... within a session; echoed by [`Command::HeartbeatAck`].
        seq: u64,
    },
    Step(StepMetrics),
    Checkpoint {
        step: u64,
        name: String,
        uri: String,
    },
    StageDone(StageDone),
    NcclId(Vec<u8>),
    Failed {
        message: String,
    },
}

impl Report {
    /// Reports that belong to a generation's work and are refused when stale. Hello and
    /// heartbeats only keep the lease alive and are accepted from any generation.
    pub fn is_fenced(&self) -> bool {
        !matches!(self, Report::Hello { .. } | Report::Heartbeat { .. })
    }
}

/// A validated `WorkerMessage`: fence, worker id, report.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerReport {
    pub fence: Fence,
    pub worker_id: String,
    pub report: Report,
}

fn finite(field: &'static str, v: f64) -> Result<f64, ProtoError> {
    // NaN/inf losses are legitimate reports (a skipped step); only the rate must be sane.
    if v.is_nan() || v < 0.0 {
        return Err(invalid(field, format!("{v} is not a non-negative number")));
    }
    Ok(v)
}

impl TryFrom<pb::WorkerMessage> for WorkerReport {
    type Error = ProtoError;
    fn try_from(m: pb::WorkerMessage) -> Result<Self, ProtoError> {
        use pb::worker_message::Body;
        let fence = fence(m.run_id, m.generation)?;
        if m.worker_id.is_empty() {
            return Err(ProtoError::Missing("worker_id"));
        }
        let report = match m.body.ok_or(ProtoError::Missing("body"))? {
            Body::Hello(h) => Report::Hello {
                session_secret: h.session_secret,
            },
            Body::Heartbeat(h) => Report::Heartbeat {
                step: h.step,
                seq: h.seq,
            },
            Body::Step(s) => Report::Step(StepMetrics {
                stage: s.stage,
                step: s.step,
                total_steps: s.total_steps,
                loss: s.loss,
                lr: s.lr,
                grad_norm: s.grad_norm,
                tokens: s.tokens,
                tokens_per_s: finite("tokens_per_s", s.tokens_per_s)?,
                val_loss: s.val_loss,
                skipped: s.skipped,
                allreduce_seconds: finite("allreduce_seconds", s.allreduce_seconds)?,
            }),
            Body::Checkpoint(c) => {
                if c.name.is_empty() {
                    return Err(ProtoError::Missing("checkpoint.name"));
                }
                Report::Checkpoint {
                    step: c.step,
                    name: c.name,
                    uri: c.uri,
                }
            }
            Body::StageDone(d) => Report::StageDone(StageDone {
                stage: d.stage,
                step: d.step,
                train_loss: d.train_loss,
                val_loss: d.val_loss,
                last_checkpoint: (!d.last_checkpoint.is_empty()).then_some(d.last_checkpoint),
                stopped_early: d.stopped_early,
                stopped_on_request: d.stopped_on_request,
            }),
            Body::NcclId(n) => Report::NcclId(nccl_id(n.id)?),
            Body::Failed(f) => Report::Failed { message: f.message },
        };
        Ok(Self {
            fence,
            worker_id: m.worker_id,
            report,
        })
    }
}

impl WorkerReport {
    pub fn into_pb(self) -> pb::WorkerMessage {
        use pb::worker_message::Body;
        let body = match self.report {
            Report::Hello { session_secret } => Body::Hello(pb::Hello { session_secret }),
            Report::Heartbeat { step, seq } => Body::Heartbeat(pb::Heartbeat { step, seq }),
            Report::Step(s) => Body::Step(pb::StepMetrics {
                stage: s.stage,
                step: s.step,
                total_steps: s.total_steps,
                loss: s.loss,
                lr: s.lr,
                grad_norm: s.grad_norm,
                tokens: s.tokens,
                tokens_per_s: s.tokens_per_s,
                val_loss: s.val_loss,
                skipped: s.skipped,
                allreduce_seconds: s.allreduce_seconds,
            }),
            Report::Checkpoint { step, name, uri } => {
                Body::Checkpoint(pb::CheckpointReport { step, name, uri })
            }
            Report::StageDone(d) => Body::StageDone(pb::StageDone {
                stage: d.stage,
                step: d.step,
                train_loss: d.train_loss,
                val_loss: d.val_loss,
                last_checkpoint: d.last_checkpoint.unwrap_or_default(),
                stopped_early: d.stopped_early,
                stopped_on_request: d.stopped_on_request,
            }),
            Report::NcclId(id) => Body::NcclId(pb::NcclId { id }),
            Report::Failed { message } => Body::Failed(pb::WorkerFailed { message }),
        };
        pb::WorkerMessage {
            run_id: self.fence.run_id,
            generation: self.fence.generation,
            worker_id: self.worker_id,
            body: Some(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> pb::RunStage {
        RunStage {
            rank: 1,
            world_size: 2,
            next_peer: "127.0.0.1:2".into(),
            backend: Backend::Ring,
            stage: 0,
            stage_name: "end_to_end".into(),
            config_yaml: "data: {path: x}".into(),
            resume_checkpoint: None,
            until_step: None,
            ring_tag: 0,
            plan_json: Some("{}".into()),
            ring_nonce: vec![9; RING_NONCE_BYTES],
        }
        .into()
    }

    #[test]
    fn run_stage_round_trips_and_is_validated() {
        let back: RunStage = stage().try_into().unwrap();
        assert_eq!(back.rank, 1);
        assert_eq!(back.resume_checkpoint, None);
        let bad_rank = pb::RunStage { rank: 2, ..stage() };
        assert!(matches!(
            RunStage::try_from(bad_rank),
            Err(ProtoError::Invalid { field: "rank", .. })
        ));
        let no_peer = pb::RunStage {
            next_peer: String::new(),
            ..stage()
        };
        assert!(matches!(
            RunStage::try_from(no_peer),
            Err(ProtoError::Missing("next_peer"))
        ));
        let bad_backend = pb::RunStage {
            backend: "mpi".into(),
            ..stage()
        };
        assert!(RunStage::try_from(bad_backend).is_err());
        let short_nonce = pb::RunStage {
            ring_nonce: vec![1; 8],
            ..stage()
        };
        assert!(matches!(
            RunStage::try_from(short_nonce),
            Err(ProtoError::Invalid {
                field: "ring_nonce",
                ..
            })
        ));
    }

    #[test]
    fn messages_without_fence_or_body_are_refused() {
        let m = pb::WorkerMessage {
            run_id: String::new(),
            generation: 1,
            worker_id: "w".into(),
            body: Some(pb::worker_message::Body::Hello(pb::Hello::default())),
        };
        assert_eq!(
            WorkerReport::try_from(m.clone()),
            Err(ProtoError::Missing("run_id"))
        );
        let m = pb::WorkerMessage {
            run_id: "r".into(),
            body: None,
            ..m
        };
        assert_eq!(WorkerReport::try_from(m), Err(ProtoError::Missing("body")));
        let short_id = pb::CoordinatorMessage {
            run_id: "r".into(),
            generation: 1,
            body: Some(pb::coordinator_message::Body::NcclId(pb::NcclId {
                id: vec![0; 3],
            })),
        };
        assert!(<(Fence, Command)>::try_from(short_id).is_err());
    }

    #[test]
    fn registration_checks_version_and_address() {
        let ok = pb::RegisterRequest {
            protocol_version: PROTOCOL_VERSION,
            name: "w0".into(),
            capabilities: Some(pb::Capabilities {
                device_kind: "cpu".into(),
                ..Default::default()
            }),
            ring_address: "10.0.0.2:4000".into(),
        };
        assert!(Registration::try_from(ok.clone()).is_ok());
        let old = pb::RegisterRequest {
            protocol_version: 0,
            ..ok.clone()
        };
        assert!(matches!(
            Registration::try_from(old),
            Err(ProtoError::Version { .. })
        ));
        let addr = pb::RegisterRequest {
            ring_address: "nohost".into(),
            ..ok
        };
        assert!(matches!(
            Registration::try_from(addr),
            Err(ProtoError::Invalid {
                field: "ring_address",
                ..
            })
        ));
    }

    #[test]
    fn every_error_has_its_grpc_code() {
        use tonic::Code;
        let cases = [
            (ProtoError::Missing("x"), Code::InvalidArgument),
            (ProtoError::Unauthenticated, Code::Unauthenticated),
            (
                ProtoError::StaleGeneration { got: 1, current: 2 },
                Code::FailedPrecondition,
            ),
            (
                ProtoError::WrongRun {
                    got: "a".into(),
                    expected: "b".into(),
                },
                Code::PermissionDenied,
            ),
            (ProtoError::UnknownWorker("w".into()), Code::NotFound),
            (ProtoError::JobOver("done".into()), Code::Unavailable),
            (
                ProtoError::WrongSessionSecret("w".into()),
                Code::PermissionDenied,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(tonic::Status::from(e).code(), code);
        }
    }
}
