//! `stackwise serve`: the HTTP layer (axum) over the serving engine
//! (`stackwise_worker::serve`). Routes: the original's `POST /generate` and
//! `/generate_stream` (SSE), OpenAI's `POST /v1/completions` and `/v1/chat/completions`
//! (plain or `stream: true`), `GET /v1/models`, `/health` and `/metrics` (Prometheus).

pub mod api;
pub mod chat;
pub mod metrics;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use stackwise_common::tokenizer::Tok;
use stackwise_worker::serve::{Engine, Event, GenerationRequest};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;

use api::{ApiError, Limits, Sampling};
use metrics::Metrics;

/// What the HTTP layer knows of a served model (the engine owns the weights).
pub struct ModelInfo {
    pub name: String,
    pub tok: Tok,
    pub seq_len: usize,
    pub scaffold: bool,
    pub eos: Option<u32>,
}

pub struct App {
    pub engine: Arc<Engine>,
    pub models: Vec<ModelInfo>,
    pub limits: Limits,
    /// How chat messages become a prompt (the model's template, or the plain one).
    pub chat: chat::ChatTemplate,
    pub metrics: Metrics,
    pub permits: Arc<Semaphore>,
    pub max_concurrent: usize,
    pub request_timeout: Duration,
}

pub fn router(app: Arc<App>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(app)
}

fn error(app: &App, route: &str, e: ApiError) -> Response {
    app.metrics.request(route, e.status);
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = (status, axum::Json(e.body())).into_response();
    if e.status == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    r
}

fn ok_json(app: &App, route: &str, v: Value) -> Response {
    app.metrics.request(route, 200);
    axum::Json(v).into_response()
}

/// One prompt, checked and ready for the engine.
struct Job {
    model: usize,
    prompts: Vec<Vec<u32>>,
    sampling: stackwise_worker::generate::SamplingConfig,
    stop: Vec<String>,
    scaffold_weight: Option<f64>,
}

impl App {
    fn model_named(&self, name: Option<&str>, field: &'static str) -> Result<usize, ApiError> {
        match name {
            None => Ok(0),
            Some(n) => self
                .models
                .iter()
                .position(|m| m.name == n)
                .ok_or_else(|| ApiError {
                    status: 404,
                    message: format!(
                        "{field} {n:?} does not exist; this server serves {}",
                        self.models
                            .iter()
                            .map(|m| format!("{:?}", m.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    param: Some(field),
                }),
        }
    }

    fn limits_for(&self, model: usize) -> Limits {
        let seq = self.models[model].seq_len;
        Limits {
            max_input_tokens: self.limits.max_input_tokens.min(seq.saturating_sub(1)),
            max_total_tokens: self.limits.max_total_tokens.min(seq),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn job(
        &self,
        model: usize,
        texts: &[String],
        field: &'static str,
        s: &Sampling,
        stop: Vec<String>,
        scaffold_weight: Option<f64>,
        n: usize,
    ) -> Result<Job, ApiError> {
        s.check()?;
        if n != 1 {
            return Err(ApiError::bad(
                "n",
                format!("n = {n}: this server returns one choice per prompt; send n = 1"),
            ));
        }
        let info = &self.models[model];
        if let Some(w) = scaffold_weight {
            if !(0.0..=1.0).contains(&w) {
                return Err(ApiError::bad(
                    "scaffold_weight",
                    format!("scaffold_weight must be in [0, 1], got {w}"),
                ));
            }
            if !info.scaffold {
                return Err(ApiError::bad(
                    "scaffold_weight",
                    format!("model {:?} is not a scaffold model", info.name),
                ));
            }
        }
        if texts.is_empty() {
            return Err(ApiError::bad(field, format!("{field} must not be empty")));
        }
        let limits = self.limits_for(model);
        let prompts = texts
            .iter()
            .map(|t| api::encode_prompt(&info.tok, t, s.max_tokens, limits, field))
            .collect::<Result<Vec<_>, _>>()?;
        let stop_on_repeat = info.scaffold.then_some(3);
        Ok(Job {
            model,
            prompts,
            sampling: s.config(info.eos, stop_on_repeat),
            stop,
            scaffold_weight,
        })
    }

    fn permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError {
                status: 429,
                message: format!(
                    "{} requests are running (--max-concurrent-requests); retry after 1 s",
                    self.max_concurrent
                ),
                param: None,
            })
    }

    /// Submit prompt `i` of `job`; its events come on the returned channel.
    fn submit(&self, job: &Job, i: usize) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.metrics
            .prompt_tokens
            .inc_by(job.prompts[i].len() as u64);
        self.engine
            .submit(GenerationRequest {
                model: job.model,
                prompt: job.prompts[i].clone(),
                sampling: job.sampling.clone(),
                scaffold_weight: job.scaffold_weight,
                stop: job.stop.clone(),
                events: tx,
            })
            .map_err(|e| ApiError {
                status: 503,
                message: e.to_string(),
                param: None,
            })?;
        Ok(rx)
    }
}

/// A finished generation.
struct Output {
    text: String,
    tokens: Vec<u32>,
    finish: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// Latency bookkeeping of one sequence.
struct Clock {
    arrived: Instant,
    last: Option<Instant>,
}

impl Clock {
    fn new() -> Self {
        Self {
            arrived: Instant::now(),
            last: None,
        }
    }

    fn token(&mut self, m: &Metrics) {
        let now = Instant::now();
        match self.last {
            None => m
                .time_to_first_token
                .observe((now - self.arrived).as_secs_f64()),
            Some(t) => m.inter_token_latency.observe((now - t).as_secs_f64()),
        }
        m.generation_tokens.inc();
        self.last = Some(now);
    }
}

async fn collect(app: &App, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Output, ApiError> {
    let mut out = Output {
        text: String::new(),
        tokens: Vec::new(),
        finish: "stop",
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    let mut clock = Clock::new();
    let deadline = tokio::time::sleep(app.request_timeout);
    tokio::pin!(deadline);
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = &mut deadline => return Err(ApiError {
                status: 504,
                message: format!("the request ran past --request-timeout-s ({} s)", app.request_timeout.as_secs()),
                param: None,
            }),
        };
        match ev {
            Some(Event::Token { id, text }) => {
                clock.token(&app.metrics);
                out.tokens.push(id);
                out.text.push_str(&text);
            }
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                out.finish = finish.as_str();
                out.prompt_tokens = prompt_tokens;
                out.completion_tokens = completion_tokens;
                return Ok(out);
            }
            Some(Event::Error(e)) => {
                return Err(ApiError {
                    status: 500,
                    message: e,
                    param: None,
                });
            }
            None => {
                return Err(ApiError {
                    status: 503,
                    message: "the engine stopped".into(),
                    param: None,
                });
            }
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "{prefix}-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    )
}

fn original_job(app: &App, body: &[u8]) -> Result<Job, ApiError> {
    let b: api::GenerateBody = api::parse(body)?;
    let model = app.model_named(b.adapter.as_deref(), "adapter")?;
    let s = Sampling {
        temperature: b.temperature,
        top_p: b.top_p,
        top_k: (b.top_k > 0).then_some(b.top_k),
        repetition_penalty: b.repetition_penalty,
        max_tokens: b.max_new_tokens,
        min_tokens: b.min_new_tokens,
        seed: b.seed,
        use_cache: b.use_cache,
    };
    app.job(
        model,
        &[b.prompt],
        "prompt",
        &s,
        b.stop,
        b.scaffold_weight,
        1,
    )
}

/// The original body's job, and a request slot for it.
fn original_admit(app: &App, body: &[u8]) -> Result<(Job, OwnedSemaphorePermit), ApiError> {
    let job = original_job(app, body)?;
    Ok((job, app.permit()?))
}

async fn generate(State(app): State<Arc<App>>, body: Bytes) -> Response {
    const ROUTE: &str = "/generate";
    let (job, _permit) = match original_admit(&app, &body) {
        Ok(a) => a,
        Err(e) => return error(&app, ROUTE, e),
    };
    let out = match app.submit(&job, 0) {
        Ok(rx) => collect(&app, rx).await,
        Err(e) => Err(e),
    };
    match out {
        Ok(o) => ok_json(
            &app,
            ROUTE,
            json!({"text": o.text, "tokens": o.tokens, "finish_reason": o.finish,
                   "usage": usage(o.prompt_tokens, o.completion_tokens)}),
        ),
        Err(e) => error(&app, ROUTE, e),
    }
}

/// SSE of a job's events, rendered by `render` (`None`: nothing to send for this event);
/// `[DONE]` ends OpenAI streams. The permit is held until the stream ends or is dropped (a
/// client that goes away drops it, which closes the engine's channel and frees its pages).
fn sse(
    app: Arc<App>,
    rx: mpsc::UnboundedReceiver<Event>,
    permit: OwnedSemaphorePermit,
    mut render: impl FnMut(&Event) -> Vec<Value> + Send + 'static,
    done_marker: bool,
) -> impl Stream<Item = Result<Sse, Infallible>> {
    let mut clock = Clock::new();
    let events = UnboundedReceiverStream::new(rx).flat_map(move |ev| {
        if matches!(ev, Event::Token { .. }) {
            clock.token(&app.metrics);
        }
        let _held = &permit;
        let frames: Vec<Result<Sse, Infallible>> = render(&ev)
            .into_iter()
            .map(|v| Ok(Sse::default().data(v.to_string())))
            .collect();
        futures::stream::iter(frames)
    });
    let done = futures::stream::iter(done_marker.then(|| Ok(Sse::default().data("[DONE]"))));
    events.chain(done)
}

async fn generate_stream(State(app): State<Arc<App>>, body: Bytes) -> Response {
    const ROUTE: &str = "/generate_stream";
    let (job, permit) = match original_admit(&app, &body) {
        Ok(a) => a,
        Err(e) => return error(&app, ROUTE, e),
    };
    let rx = match app.submit(&job, 0) {
        Ok(rx) => rx,
        Err(e) => return error(&app, ROUTE, e),
    };
    app.metrics.request(ROUTE, 200);
    let render = |ev: &Event| match ev {
        Event::Token { id, text } => vec![json!({"token": id, "text": text})],
        Event::Done {
            finish,
            prompt_tokens,
            completion_tokens,
        } => vec![
            json!({"finish_reason": finish.as_str(), "usage": usage(*prompt_tokens, *completion_tokens)}),
        ],
        Event::Error(e) => vec![json!({"error": e})],
    };
    axum::response::Sse::new(sse(app.clone(), rx, permit, render, false))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn openai_sampling(c: &api::OpenAiCommon) -> Sampling {
    Sampling {
        temperature: c.temperature,
        top_p: c.top_p,
        top_k: None,
        repetition_penalty: 1.0,
        max_tokens: c.max_completion_tokens.or(c.max_tokens).unwrap_or(16),
        min_tokens: c.min_tokens,
        seed: c.seed.unwrap_or(0),
        use_cache: true,
    }
}

/// OpenAI's completions and chat completions: one code path, two shapes.
async fn openai(app: Arc<App>, body: Bytes, chat: bool) -> Response {
    let route = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let parsed = if chat {
        api::parse::<api::ChatBody>(&body).and_then(|b| {
            if b.messages.is_empty() {
                return Err(ApiError::bad("messages", "messages must not be empty"));
            }
            let prompt = app
                .chat
                .render(&b.messages)
                .map_err(|e| ApiError::bad("messages", e))?;
            Ok((vec![prompt], b.common))
        })
    } else {
        api::parse::<api::CompletionBody>(&body).map(|b| (b.prompt.into_vec(), b.common))
    };
    let (texts, mut common) = match parsed {
        Ok(p) => p,
        Err(e) => return error(&app, route, e),
    };
    let stop = common
        .stop
        .take()
        .map(api::OneOrMany::into_vec)
        .unwrap_or_default();
    let s = openai_sampling(&common);
    let field = if chat { "messages" } else { "prompt" };
    let job = app
        .model_named(Some(&common.model), "model")
        .and_then(|m| app.job(m, &texts, field, &s, stop, common.scaffold_weight, common.n));
    let job = match job {
        Ok(j) => j,
        Err(e) => return error(&app, route, e),
    };
    if common.stream && job.prompts.len() > 1 {
        return error(
            &app,
            route,
            ApiError::bad(
                "prompt",
                "stream: true takes one prompt; send a list without stream",
            ),
        );
    }
    let permit = match app.permit() {
        Ok(p) => p,
        Err(e) => return error(&app, route, e),
    };
    let (id, created, name) = (
        request_id(if chat { "chatcmpl" } else { "cmpl" }),
        now_s(),
        app.models[job.model].name.clone(),
    );
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    if common.stream {
        let rx = match app.submit(&job, 0) {
            Ok(rx) => rx,
            Err(e) => return error(&app, route, e),
        };
        app.metrics.request(route, 200);
        let include_usage = common.stream_options.is_some_and(|o| o.include_usage);
        let chunk_object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut first = chat;
        let render = move |ev: &Event| {
            let chunk = |choice: Value| json!({"id": id, "object": chunk_object, "created": created, "model": name, "choices": [choice]});
            let mut out = Vec::new();
            if first {
                first = false;
                out.push(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null})));
            }
            match ev {
                Event::Token { text, .. } if text.is_empty() => {}
                Event::Token { text, .. } => out.push(chunk(if chat {
                    json!({"index": 0, "delta": {"content": text}, "finish_reason": null})
                } else {
                    json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})
                })),
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    out.push(chunk(if chat {
                        json!({"index": 0, "delta": {}, "finish_reason": finish.as_str()})
                    } else {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish.as_str()})
                    }));
                    if include_usage {
                        out.push(json!({"id": id, "object": chunk_object, "created": created, "model": name,
                            "choices": [], "usage": usage(*prompt_tokens, *completion_tokens)}));
                    }
                }
                Event::Error(e) => {
                    out.push(json!({"error": {"message": e, "type": "server_error"}}))
                }
            }
            out
        };
        return axum::response::Sse::new(sse(app.clone(), rx, permit, render, true))
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let _permit = permit;
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for i in 0..job.prompts.len() {
        let out = match app.submit(&job, i) {
            Ok(rx) => collect(&app, rx).await,
            Err(e) => Err(e),
        };
        let o = match out {
            Ok(o) => o,
            Err(e) => return error(&app, route, e),
        };
        prompt_tokens += o.prompt_tokens;
        completion_tokens += o.completion_tokens;
        choices.push(if chat {
            json!({"index": i, "message": {"role": "assistant", "content": o.text}, "finish_reason": o.finish, "logprobs": null})
        } else {
            json!({"index": i, "text": o.text, "logprobs": null, "finish_reason": o.finish})
        });
    }
    ok_json(
        &app,
        route,
        json!({"id": id, "object": object, "created": created, "model": name, "choices": choices,
               "usage": usage(prompt_tokens, completion_tokens)}),
    )
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    openai(app, body, false).await
}

async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    openai(app, body, true).await
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> = app
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "stackwise", "max_model_len": m.seq_len}))
        .collect();
    ok_json(&app, "/v1/models", json!({"object": "list", "data": data}))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    ok_json(&app, "/health", json!({"status": "ok"}))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    app.metrics.request("/metrics", 200);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(&app.engine),
    )
        .into_response()
}
