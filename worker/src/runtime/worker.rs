//! The worker process (`stackwise worker`): registers with the coordinator, keeps its lease
//! with heartbeats, runs the stages it is told to on a training thread, streams progress,
//! and reconnects with backoff when the coordinator goes away. Work stops at once when the
//! session is lost (a worker without a lease must not keep training) or on Abort.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use stackwise_proto::model::JobEnd;

use super::backoff::Backoff;
use super::options::{Terminate, WorkerOptions, local_host_towards};
use super::session::session;
use super::stage::RingSide;
use crate::comm::RingListener;

/// Errors that retrying cannot fix.
fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tonic::Status>().is_some_and(|s| {
            matches!(
                s.code(),
                tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::InvalidArgument
            ) || (s.code() == tonic::Code::FailedPrecondition
                && s.message().contains("protocol version"))
        })
    })
}

/// The job stopped at a checkpoint before its end (a coordinator or worker got SIGTERM):
/// `stackwise worker` exits with [`JobStopped::EXIT_CODE`], not 0, so that a restart policy
/// (Docker's `on-failure`, a Kubernetes Job's `OnFailure`) brings the worker back for the
/// resumed job, while a finished job's workers exit 0 and stay down.
#[derive(Debug, thiserror::Error)]
#[error(
    "the job stopped before its end ({0}); exiting {code} so that a restart policy brings this worker back for the resumed job",
    code = JobStopped::EXIT_CODE
)]
pub struct JobStopped(pub String);

impl JobStopped {
    /// EX_TEMPFAIL: try again later.
    pub const EXIT_CODE: u8 = 75;
}

/// Run until the coordinator says Shutdown or cannot be reached for `rejoin_timeout`: Ok
/// when the job finished, [`JobStopped`] when it stopped to be resumed, an error otherwise.
pub async fn run_worker(opts: WorkerOptions) -> Result<()> {
    let ring_side = Arc::new(RingSide {
        listener: RingListener::bind(&opts.ring_bind)
            .with_context(|| format!("bind the ring listener to {}", opts.ring_bind))?,
        token: opts.target.token.clone(),
    });
    let port = ring_side.listener.local_addr()?.port();
    let term = Arc::new(Terminate::default());
    if opts.graceful_sigterm {
        let mut sig = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listen for SIGTERM")?;
        let term = term.clone();
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                if term.asked.swap(true, Ordering::SeqCst) {
                    eprintln!("SIGTERM again: exiting without a checkpoint");
                    std::process::exit(143);
                }
                tracing::warn!(
                    "SIGTERM: asking every rank to checkpoint after the same step, then stopping"
                );
                term.notify.notify_waiters();
            }
        });
    }
    let mut backoff = Backoff::reconnect();
    let mut failing_since: Option<Instant> = None;
    loop {
        let mut registered = false;
        if term.asked.load(Ordering::SeqCst) && !registered {
            bail!("SIGTERM while not connected to the coordinator: exiting");
        }
        // Found again for every session: a container or pod that rejoins may have a new
        // address.
        let host = opts
            .advertise_host
            .clone()
            .or_else(|| local_host_towards(&opts.target.url))
            .unwrap_or_else(|| "127.0.0.1".into());
        let ring_address = format!("{host}:{port}");
        match session(&opts, &ring_side, &ring_address, &mut registered, &term).await {
            Ok((reason, JobEnd::Finished)) => {
                tracing::info!("shutting down: {reason}");
                return Ok(());
            }
            Ok((reason, JobEnd::Stopped)) => return Err(JobStopped(reason).into()),
            Ok((reason, JobEnd::Failed)) => bail!("the job failed: {reason}"),
            Err(e) if is_fatal(&e) => {
                let unauthenticated = e.chain().any(|c| {
                    c.downcast_ref::<tonic::Status>()
                        .is_some_and(|s| s.code() == tonic::Code::Unauthenticated)
                });
                if unauthenticated {
                    bail!(
                        "the coordinator at {} refused this worker (UNAUTHENTICATED: missing or wrong token); \
                         pass the job's token with --token-file or STACKWISE_TOKEN",
                        opts.target.url
                    );
                }
                return Err(e);
            }
            Err(e) => {
                if registered {
                    failing_since = None;
                    backoff.reset();
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > opts.rejoin_timeout {
                    bail!(
                        "gave up on the coordinator at {} after {:?}: {e:#}",
                        opts.target.url,
                        opts.rejoin_timeout
                    );
                }
                let wait = backoff.next_wait();
                tracing::warn!("coordinator session ended ({e:#}); reconnecting in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
