//! `stackwise serve`: an HTTP endpoint (the original's `/generate` and OpenAI's API) over a
//! model and any number of adapters on the same base, unmerged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use clap::Args;
use stackwise_worker::adapters::PeftAdapter;
use stackwise_worker::models::PagedKvCache;
use stackwise_worker::models::{ModelConfig, hf};
use stackwise_worker::serve::{Engine, PagePool, ServedModel};

use crate::serve::api::Limits;
use crate::serve::chat::ChatTemplate;
use crate::serve::metrics::Metrics;
use crate::serve::{App, ModelInfo, router};

#[derive(Args)]
pub struct ServeArgs {
    /// HF model folder, checkpoint folder or run folder (a scaffold run serves its fusion).
    #[arg(long)]
    pub model: PathBuf,
    /// Also serve the base with this PEFT adapter, as model NAME (repeatable). The adapters
    /// share the base's weights; LoRA runs unmerged, BOFT is merged into its own copy of the
    /// projections it rotates.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// The base's model name in the API (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub bind: String,
    /// Use the EMA weights when the checkpoint has them.
    #[arg(long)]
    pub ema: bool,
    /// Token positions per KV page.
    #[arg(long, default_value_t = 64)]
    pub page_size: usize,
    /// KV pages in all, allocated at start (default: enough for --max-concurrent-requests
    /// sequences of --max-total-tokens). A request waits until its pages are free.
    #[arg(long)]
    pub max_pages: Option<usize>,
    /// Size the KV pages by memory instead of --max-pages (keys and values in the model's
    /// dtype).
    #[arg(long, value_name = "MIB", conflicts_with = "max_pages")]
    pub kv_memory_mib: Option<usize>,
    /// Longest prompt in tokens (default: the model's context - 1).
    #[arg(long)]
    pub max_input_tokens: Option<usize>,
    /// Longest prompt + max_tokens (default: the model's context).
    #[arg(long)]
    pub max_total_tokens: Option<usize>,
    /// Requests in flight at once; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent_requests: usize,
    /// Largest request body (413 above it).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// A non-streaming request still running after this long gets 504 and is cancelled.
    #[arg(long, default_value_t = 600)]
    pub request_timeout_s: u64,
    /// After SIGTERM / Ctrl-C, in-flight requests get this long to finish.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout_s: u64,
    /// Tests only: pause after every engine step, so requests stay in flight.
    #[arg(long, hide = true)]
    pub debug_step_delay_ms: Option<u64>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let device = candle_core::Device::Cpu;
    let base = super::model_source::weights(&a.model, a.ema, &device)?;
    let seq_len = base.cfg.seq_len;
    let base_name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    // The base and each adapter: a model sharing the base's tensors, and what the HTTP
    // layer knows of it.
    let build = |name: String, cfg: &ModelConfig, w: HashMap<String, Tensor>| -> Result<_> {
        let (mut model, _) = hf::model_from_tensors(cfg, w, &device)
            .with_context(|| format!("load {name} from {}", base.source))?;
        model.fusion = base.fusion.clone();
        model.prepare_for_decoding()?;
        let info = ModelInfo {
            name,
            tok: base.tok.clone(),
            seq_len,
            scaffold: model.fusion.is_some(),
            eos: base.tok.eos_id().or(cfg.eos_token_id),
        };
        Ok((info, model))
    };
    let mut served = vec![build(base_name, &base.cfg, base.weights.clone())?];
    for spec in &a.adapters {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec:?}: give NAME=DIR");
        };
        if served.iter().any(|(i, _)| i.name == name) {
            bail!("--adapter {spec:?}: the name {name:?} is taken");
        }
        let (mut w, mut cfg) = (base.weights.clone(), base.cfg.clone());
        PeftAdapter::load(std::path::Path::new(dir), &device)?
            .apply(&mut w, &mut cfg)
            .with_context(|| format!("apply the adapter {dir} to {}", base.source))?;
        served.push(build(name.to_string(), &cfg, w)?);
    }
    let limits = Limits {
        max_input_tokens: a.max_input_tokens.unwrap_or(seq_len - 1),
        max_total_tokens: a.max_total_tokens.unwrap_or(seq_len),
    };
    if a.page_size == 0 || a.max_concurrent_requests == 0 {
        bail!("--page-size and --max-concurrent-requests must be at least 1");
    }
    let cfg = &base.cfg;
    let page_bytes = PagedKvCache::page_bytes(cfg, a.page_size, served[0].1.dtype());
    let max_pages = match (a.max_pages, a.kv_memory_mib) {
        (Some(p), _) => p,
        (None, Some(mib)) => (mib << 20) / page_bytes.max(1),
        (None, None) => {
            a.max_concurrent_requests * limits.max_total_tokens.min(seq_len).div_ceil(a.page_size)
        }
    };
    let pool = PagePool {
        page_size: a.page_size,
        max_pages,
    };
    let longest = pool.pages_for(limits.max_total_tokens.min(seq_len));
    if max_pages < longest {
        bail!(
            "{max_pages} KV pages of {} tokens hold fewer than one sequence of --max-total-tokens {} ({longest} pages); \
             raise --max-pages (or --kv-memory-mib) or lower --max-total-tokens",
            a.page_size,
            limits.max_total_tokens
        );
    }
    let (infos, models): (Vec<_>, Vec<_>) = served
        .into_iter()
        .map(|(info, model)| {
            let tok = info.tok.clone();
            (info, ServedModel { model, tok })
        })
        .unzip();
    let names: Vec<String> = infos.iter().map(|i| i.name.clone()).collect();
    let delay = a.debug_step_delay_ms.map(Duration::from_millis);
    // The folder the weights came from (a run's latest valid checkpoint), else the one given.
    let mut chat = ChatTemplate::load(std::path::Path::new(&base.source))?;
    if chat.is_plain() {
        chat = ChatTemplate::load(&a.model)?;
    }
    if !chat.is_plain() {
        eprintln!("chat prompts use the model's chat template");
    }
    let engine = Arc::new(Engine::start(models, pool, delay)?);
    let paged = engine.paged;
    let app = Arc::new(App {
        engine,
        models: infos,
        limits,
        chat,
        metrics: Metrics::new(),
        permits: Arc::new(tokio::sync::Semaphore::new(a.max_concurrent_requests)),
        max_concurrent: a.max_concurrent_requests,
        request_timeout: Duration::from_secs(a.request_timeout_s),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.bind)
            .await
            .with_context(|| format!("bind {}", a.bind))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving {} on http://{addr} | models {} | KV {} {} pages of {} tokens ({:.1} MiB) | limits: input {}, total {}, concurrent {}",
            base.source,
            names.join(", "),
            if paged { "cache in" } else { "budget of" },
            pool.max_pages,
            pool.page_size,
            (pool.max_pages * page_bytes) as f64 / (1 << 20) as f64,
            limits.max_input_tokens.min(seq_len - 1),
            limits.max_total_tokens.min(seq_len),
            a.max_concurrent_requests
        );
        let grace = Duration::from_secs(a.shutdown_timeout_s);
        axum::serve(listener, router(app, a.max_body_bytes))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!(
                    "shutting down: no new connections; in-flight requests have {} s",
                    grace.as_secs()
                );
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    eprintln!("shutdown deadline reached: cancelling the rest");
                    std::process::exit(0);
                });
            })
            .await?;
        eprintln!("stopped");
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
