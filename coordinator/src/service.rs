//! The gRPC service: a thin tonic layer over the pure [`Job`]. Each RPC applies its message
//! to the job under a short lock and then carries out the job's actions outside it: sends on
//! the workers' session streams, and checkpoint lookups (manifests only) on a blocking
//! thread. Also here: the shared-token check, TLS, and the reconcile ticker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use stackwise_common::checkpoint::CheckpointStore;
use stackwise_common::store::Store;
use stackwise_proto::model::{ProtoError, Registration, Report, WorkerReport};
use stackwise_proto::pb::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use stackwise_proto::{AUTH_HEADER, pb};
use tokio::sync::mpsc::Sender;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::job::{Action, Job, JobSpec, Phase};

pub type Downlink = Sender<Result<pb::CoordinatorMessage, Status>>;

/// Commands queued for one worker at most; a worker that lets them pile up is not reading
/// its session, and the session is closed.
const DOWNLINK_CAPACITY: usize = 256;

/// The largest gRPC message the coordinator sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// The job and the session streams its actions go out on.
pub struct Shared {
    job: Mutex<Job>,
    /// Open session streams by worker, with the session number the job gave them.
    links: Mutex<HashMap<String, (u64, Downlink)>>,
    run_uri: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a bug; keep serving the state as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The run's newest checkpoint (name, step), from its manifests alone.
fn newest_checkpoint(run_uri: &str) -> Result<Option<(String, u64)>, String> {
    let store = Store::open(run_uri).map_err(|e| e.to_string())?;
    CheckpointStore::new(&store)
        .newest_manifest()
        .map(|c| c.map(|(name, m)| (name, m.step)))
        .map_err(|e| e.to_string())
}

impl Shared {
    /// The job, for reading (or for changes that decide no action).
    pub fn job(&self) -> MutexGuard<'_, Job> {
        lock(&self.job)
    }

    /// Apply `f` to the job and carry out the actions it returns.
    pub fn apply<R>(self: &Arc<Self>, f: impl FnOnce(&mut Job) -> (R, Vec<Action>)) -> R {
        let (r, actions) = f(&mut self.job());
        self.perform(actions);
        r
    }

    /// Carry out the job's actions (never under the job's lock).
    fn perform(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send { to, message } => {
                    let full = {
                        let mut links = lock(&self.links);
                        match links.get(&to).map(|(s, l)| (*s, l.try_send(Ok(*message)))) {
                            Some((session, Err(TrySendError::Full(_)))) => Some(session),
                            Some((_, Err(TrySendError::Closed(_)))) => {
                                // The stream is gone; its reader reports the close to the job.
                                links.remove(&to);
                                None
                            }
                            _ => None,
                        }
                    };
                    if let Some(session) = full {
                        tracing::warn!(worker = %to, "{DOWNLINK_CAPACITY} commands unread: closing its session");
                        close_session(self, &to, session);
                    }
                }
                Action::FindCheckpoint => {
                    let shared = self.clone();
                    tokio::task::spawn_blocking(move || {
                        let found = newest_checkpoint(&shared.run_uri);
                        shared.apply(|job| ((), job.checkpoint_found(found, Instant::now())));
                    });
                }
            }
        }
    }
}

struct Service {
    shared: Arc<Shared>,
}

/// Session `session` of `id` is over: unlink it and tell the job.
fn close_session(shared: &Arc<Shared>, id: &str, session: u64) {
    {
        let mut links = lock(&shared.links);
        if links.get(id).is_some_and(|(s, _)| *s == session) {
            links.remove(id);
        }
    }
    shared.apply(|job| ((), job.stream_closed(id, session)));
}

#[tonic::async_trait]
impl CoordinatorRpc for Service {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let reg: Registration = req.into_inner().try_into()?;
        let mut job = self.shared.job();
        let (worker_id, session_secret) = job.register(reg, Instant::now())?;
        Ok(Response::new(pb::RegisterResponse {
            run_id: job.spec.run_id.clone(),
            worker_id,
            lease_ms: job.spec.group.lease.as_millis() as u64,
            heartbeat_ms: job.spec.group.heartbeat.as_millis() as u64,
            session_secret,
        }))
    }

    type SessionStream = ReceiverStream<Result<pb::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session ended before its hello"))?;
        let hello = WorkerReport::try_from(first)?;
        let Report::Hello { session_secret } = &hello.report else {
            return Err(Status::invalid_argument(
                "the first message of a session must be hello",
            ));
        };
        let secret = session_secret.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(DOWNLINK_CAPACITY);
        let id = hello.worker_id.clone();
        let shared = self.shared.clone();
        let (session, actions) = {
            let mut job = shared.job();
            let (session, more) = job.attach(&id, &secret, Instant::now())?;
            let mut actions = job.on_report(hello, Instant::now())?;
            // The link is in place before the job's lock is released: nothing sent to this
            // session can be lost between attaching and listening.
            lock(&shared.links).insert(id.clone(), (session, tx.clone()));
            actions.extend(more);
            (session, actions)
        };
        shared.perform(actions);
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        let applied = WorkerReport::try_from(m).and_then(|r| {
                            if r.worker_id != id {
                                return Err(ProtoError::Invalid {
                                    field: "worker_id",
                                    msg: format!("{} on the session of {id}", r.worker_id),
                                });
                            }
                            let actions = shared.job().on_report(r, Instant::now())?;
                            shared.perform(actions);
                            Ok(())
                        });
                        match applied {
                            Ok(()) => {}
                            // A report of a generation that has just ended (e.g. a
                            // survivor's failure after the abort) is expected: drop it.
                            Err(e @ ProtoError::StaleGeneration { .. }) => {
                                tracing::debug!(worker = %id, "dropped a report: {e}");
                            }
                            Err(e) => {
                                tracing::warn!(worker = %id, "refused a report: {e}");
                                // Ends this stream with the error, and the worker with it:
                                // it registers again, and no member is left behind that
                                // never heartbeats.
                                let _ = tx.try_send(Err(e.into()));
                                close_session(&shared, &id, session);
                                return;
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        close_session(&shared, &id, session);
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(self.shared.job().status(Instant::now())))
    }

    async fn stop(
        &self,
        req: Request<pb::StopRequest>,
    ) -> Result<Response<pb::StopResponse>, Status> {
        let reason = req.into_inner().reason;
        let reason = if reason.is_empty() {
            "stopped by request".to_string()
        } else {
            reason
        };
        self.shared
            .apply(|job| ((), job.finish(Phase::Stopped(reason))));
        Ok(Response::new(pb::StopResponse {}))
    }
}

/// The shared-token check run before every RPC.
#[derive(Clone)]
pub struct TokenCheck {
    expected: Option<Arc<str>>,
}

impl TokenCheck {
    /// `None`: no authentication (only with `--insecure-no-auth`).
    pub fn new(token: Option<String>) -> Self {
        Self {
            expected: token.map(|t| Arc::from(format!("Bearer {t}").as_str())),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get(AUTH_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if stackwise_proto::constant_time_eq(given, expected.as_bytes()) {
            Ok(req)
        } else {
            Err(ProtoError::Unauthenticated.into())
        }
    }
}

/// TLS material for the server (PEM).
#[derive(Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// A running coordinator: the gRPC server plus the reconcile ticker.
pub struct Coordinator {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    stop_server: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    ticker: JoinHandle<()>,
}

impl Coordinator {
    /// Bind `bind` (e.g. `0.0.0.0:50051`, or port 0 for any) and start serving the job.
    pub async fn start(
        spec: JobSpec,
        bind: &str,
        token: Option<String>,
        tls: Option<TlsFiles>,
    ) -> Result<Self> {
        stackwise_proto::install_tls_provider();
        spec.plan.validate().context("the job's plan")?;
        // Every handler must answer within a worker's lease (at least 1 s): a session whose
        // hello does not come by then is from a worker that would be lost anyway.
        let rpc_timeout = spec
            .group
            .lease
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("bind the coordinator to {bind}"))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            run_uri: spec.run_uri.clone(),
            job: Mutex::new(Job::new(spec)),
            links: Mutex::new(HashMap::new()),
        });
        // Explicit bounds: control messages are small (a RunStage carries the config and the
        // plan), so 16 MiB either way is generous; each connection (one per worker) carries
        // at most a handful of concurrent RPCs.
        let server = CoordinatorServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let service =
            tonic::service::interceptor::InterceptedService::new(server, TokenCheck::new(token));
        let mut builder = tonic::transport::Server::builder();
        if let Some(t) = tls {
            let identity = tonic::transport::Identity::from_pem(t.cert_pem, t.key_pem);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .context("TLS configuration")?;
        }
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            builder
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .timeout(rpc_timeout)
                .max_concurrent_streams(Some(64))
                .concurrency_limit_per_connection(32)
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                }),
        );
        let tick = shared.clone();
        let ticker = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                tick.apply(|job| ((), job.reconcile(Instant::now())));
            }
        });
        Ok(Self {
            shared,
            addr,
            stop_server: Some(stop_tx),
            server,
            ticker,
        })
    }

    /// The job, for reading.
    pub fn job(&self) -> MutexGuard<'_, Job> {
        self.shared.job()
    }

    pub fn phase(&self) -> Phase {
        self.job().phase.clone()
    }

    pub fn status(&self) -> pb::JobStatus {
        self.job().status(Instant::now())
    }

    pub fn stop_job(&self, reason: String) {
        self.shared
            .apply(|job| ((), job.finish(Phase::Stopped(reason))));
    }

    /// End the job as failed (e.g. the launcher saw a worker process die).
    pub fn fail_job(&self, reason: String) {
        self.shared
            .apply(|job| ((), job.finish(Phase::Failed(reason))));
    }

    /// Graceful stop: checkpoint at a step all ranks agree on, then stop.
    pub fn checkpoint_and_stop(&self, reason: String) {
        self.shared
            .apply(|job| ((), job.checkpoint_and_stop(reason, Instant::now())));
    }

    /// Wait until the job is over.
    pub async fn wait_over(&self) -> Phase {
        loop {
            let p = self.phase();
            if p.is_over() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Give workers up to `grace` to close their streams after Shutdown, then stop serving.
    pub async fn shutdown(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.job().connected() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.ticker.abort();
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.server).await;
        self.server.abort();
    }
}
