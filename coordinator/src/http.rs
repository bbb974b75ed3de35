//! The coordinator's HTTP side (`--http-bind`): `GET /metrics`, the job in Prometheus
//! (OpenMetrics) text via prometheus-client; `GET /`, a live dashboard (one static page that
//! polls `GET /api/job`: the status, the run's curves and recent events as JSON); and
//! `GET /healthz` for probes. Each request reads the job once under its lock and renders
//! outside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::job::{Job, Phase};
use crate::service::Shared;

/// What one scrape reports, read from the job under its lock.
struct Snapshot {
    gauges: Vec<(&'static str, &'static str, f64)>,
    counters: Vec<(&'static str, &'static str, u64)>,
    state: &'static str,
}

fn snapshot(job: &Job, now: Instant) -> Snapshot {
    let ranks = match &job.phase {
        Phase::Running { ranks, .. } => ranks.len(),
        _ => 0,
    };
    let since_ckpt = job
        .last_checkpoint_at
        .map_or(f64::NAN, |t| now.duration_since(t).as_secs_f64());
    Snapshot {
        gauges: vec![
            ("step", "Global step of rank 0", job.step as f64),
            (
                "total_steps",
                "The step the job ends at",
                job.spec.target_step() as f64,
            ),
            (
                "loss",
                "Training loss of the last step (mean over the global batch)",
                job.loss,
            ),
            (
                "val_loss",
                "Last validation loss (NaN before the first evaluation)",
                job.val_loss.unwrap_or(f64::NAN),
            ),
            (
                "tokens_per_second",
                "Training tokens per second, all ranks",
                job.tokens_per_s(),
            ),
            ("learning_rate", "Learning rate of the last step", job.lr),
            (
                "allreduce_seconds",
                "Seconds rank 0 spent in collectives in its last step",
                job.allreduce_seconds,
            ),
            (
                "workers_alive",
                "Workers holding a lease",
                job.members.len() as f64,
            ),
            (
                "workers_connected",
                "Workers with an open session stream",
                job.connected() as f64,
            ),
            (
                "workers_in_generation",
                "Ranks of the running generation",
                ranks as f64,
            ),
            (
                "generation",
                "The current generation",
                job.generation as f64,
            ),
            (
                "stage",
                "The stage of the plan being trained (0-based)",
                job.stage as f64,
            ),
            (
                "seconds_since_checkpoint",
                "Seconds since the last committed checkpoint (NaN before the first)",
                since_ckpt,
            ),
        ],
        counters: vec![
            (
                "checkpoints_committed",
                "Checkpoints committed in this coordinator's lifetime",
                job.checkpoints_committed,
            ),
            (
                "tokens",
                "Training tokens processed by all ranks",
                job.tokens_total,
            ),
            (
                "generations_formed",
                "Generations formed (re-formations included)",
                job.generations_formed,
            ),
        ],
        state: job.phase.name(),
    }
}

fn render(s: Snapshot) -> String {
    let mut registry = Registry::with_prefix("stackwise");
    for (name, help, v) in s.gauges {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(v);
        registry.register(name, help, g);
    }
    for (name, help, v) in s.counters {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        registry.register(name, help, c);
    }
    let state = Family::<Vec<(String, String)>, Gauge>::default();
    for name in ["waiting", "running", "finished", "failed", "stopped"] {
        state
            .get_or_create(&vec![("state".to_string(), name.to_string())])
            .set(i64::from(name == s.state));
    }
    registry.register(
        "job_state",
        "1 for the job's state, 0 for the others",
        state,
    );
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let snap = snapshot(&shared.job(), Instant::now());
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        render(snap),
    )
}

/// Events the dashboard lists, newest last.
const DASHBOARD_EVENTS: usize = 50;

async fn api_job(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let (status, history, events) = {
        let job = shared.job();
        let from = job.events.len().saturating_sub(DASHBOARD_EVENTS);
        (
            job.status(Instant::now()),
            job.history.to_json(),
            job.events[from..].to_vec(),
        )
    };
    let mut v = crate::job::status_json(&status);
    v["history"] = history;
    v["events"] = events.into();
    Json(v)
}

/// Serve `/`, `/api/job`, `/metrics` and `/healthz` for `shared`'s job on `bind` (`stackwise coordinator
/// --http-bind`, `launch --http-bind`); returns the bound address and the server task.
pub async fn serve(shared: Arc<Shared>, bind: &str) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("bind the coordinator's HTTP endpoint to {bind}"))?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .route("/api/job", get(api_job))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the coordinator's HTTP endpoint stopped: {e}");
        }
    });
    Ok((addr, task))
}
