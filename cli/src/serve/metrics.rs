//! `GET /metrics`: Prometheus text (prometheus-client) — requests by route and status, prompt
//! and generated tokens, time to first token and inter-token latency, running and waiting
//! sequences, KV pages used and free, packed batches and the sequences in them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use stackwise_worker::serve::Engine;

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    running: Gauge,
    waiting: Gauge,
    pages_used: Gauge,
    pages_free: Gauge,
    batches: Counter,
    batched_sequences: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stackwise");
        let requests = Family::<Labels, Counter>::default();
        let prompt_tokens = Counter::default();
        let generation_tokens = Counter::default();
        let time_to_first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let inter_token_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let (running, waiting, pages_used, pages_free) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        registry.register(
            "generation_tokens",
            "Generated tokens",
            generation_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From arrival to the first generated token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            inter_token_latency.clone(),
        );
        registry.register(
            "num_requests_running",
            "Sequences being generated",
            running.clone(),
        );
        registry.register(
            "num_requests_waiting",
            "Requests waiting for KV pages",
            waiting.clone(),
        );
        registry.register(
            "kv_pages_used",
            "KV cache pages held by sequences",
            pages_used.clone(),
        );
        registry.register("kv_pages_free", "KV cache pages free", pages_free.clone());
        let (batches, batched_sequences) = (Counter::default(), Counter::default());
        registry.register(
            "engine_batches",
            "Packed forward passes over the paged KV cache (one a model a step)",
            batches.clone(),
        );
        registry.register(
            "engine_batched_sequences",
            "Sequences in those passes (divided by engine_batches: the mean batch)",
            batched_sequences.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            generation_tokens,
            time_to_first_token,
            inter_token_latency,
            running,
            waiting,
            pages_used,
            pages_free,
            batches,
            batched_sequences,
        }
    }

    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("route".to_string(), route.to_string()),
                ("status".to_string(), status.to_string()),
            ])
            .inc();
    }

    /// The text exposition, with the engine's gauges read now.
    pub fn render(&self, engine: &Arc<Engine>) -> String {
        let s = &engine.stats;
        let used = s.pages_used.load(Ordering::SeqCst);
        self.running.set(s.running.load(Ordering::SeqCst) as i64);
        self.waiting.set(s.waiting.load(Ordering::SeqCst) as i64);
        self.pages_used.set(used as i64);
        self.pages_free
            .set(engine.pool.max_pages.saturating_sub(used) as i64);
        let catch_up = |c: &Counter, total: usize| c.inc_by((total as u64).saturating_sub(c.get()));
        catch_up(&self.batches, s.batches.load(Ordering::SeqCst));
        catch_up(
            &self.batched_sequences,
            s.batched_sequences.load(Ordering::SeqCst),
        );
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
