//! The serving engine: one thread that owns the models and steps every running sequence
//! between new arrivals (iteration-level scheduling, "continuous batching"). A request waits
//! until the KV memory it can need, `ceil((prompt + max_tokens) / page_size)` pages, is free,
//! so memory never runs out mid-sequence; its pages are returned the step it finishes or its
//! client goes away (its event channel closes). Each sequence keeps its own KV cache and is
//! computed on its own, so its tokens do not depend on what else runs; sampling is seeded per
//! request exactly as `stackwise generate` seeds it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use anyhow::Result;
use candle_core::{DType, Tensor};
use stackwise_common::rng::Rng;
use stackwise_common::tokenizer::Tok;

use crate::generate::SamplingConfig;
use crate::generate::sampling::{ends_with_repeat, pick};
use crate::models::{KvCache, ScaffoldContext, Transformer};

/// A model the engine serves (the base, or the base with an adapter).
pub struct ServedModel {
    pub model: Transformer,
    pub tok: Tok,
}

/// Why a sequence ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of text, or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// The first token of a sequence (its prefill) and every later one, with the text it
    /// adds (decoded as part of the whole output, so multi-byte characters come whole).
    Token {
        id: u32,
        text: String,
    },
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

pub struct GenerationRequest {
    /// Index into the engine's models.
    pub model: usize,
    pub prompt: Vec<u32>,
    pub sampling: SamplingConfig,
    /// A scaffold model's influence (default: its trained one).
    pub scaffold_weight: Option<f64>,
    /// Stop strings: the output ends before the first one it contains.
    pub stop: Vec<String>,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
}

/// KV memory in pages of `page_size` token positions.
#[derive(Debug, Clone, Copy)]
pub struct PagePool {
    pub page_size: usize,
    pub max_pages: usize,
}

impl PagePool {
    /// Pages a sequence of up to `tokens` positions holds.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }
}

/// Gauges and counters the HTTP layer exports.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub pages_used: AtomicUsize,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<GenerationRequest>,
    pub stats: Arc<EngineStats>,
    pub pool: PagePool,
}

struct Sequence {
    req: GenerationRequest,
    pages: usize,
    ctx: Vec<u32>,
    out: Vec<u32>,
    sent_text: String,
    cache: KvCache,
    rng: Rng,
    scaffold: Option<ScaffoldContext>,
}

impl Engine {
    /// Start the engine thread over `models`. `step_delay`: a pause after every step (for
    /// tests that need a request to stay in flight; none in service).
    pub fn start(
        models: Vec<ServedModel>,
        pool: PagePool,
        step_delay: Option<Duration>,
    ) -> Result<Self> {
        let (tx, rx) = channel();
        let stats = Arc::new(EngineStats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(models, pool, rx, s, step_delay))?;
        Ok(Self { tx, stats, pool })
    }

    /// Queue a request; its events arrive on its channel.
    pub fn submit(&self, req: GenerationRequest) -> Result<()> {
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx
            .send(req)
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))
    }
}

fn run(
    models: Vec<ServedModel>,
    pool: PagePool,
    rx: Receiver<GenerationRequest>,
    stats: Arc<EngineStats>,
    step_delay: Option<Duration>,
) {
    let mut waiting: VecDeque<GenerationRequest> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    let mut used = 0usize;
    loop {
        // New arrivals join between steps; with nothing to do, wait for one.
        let first = if running.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(Duration::ZERO) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) if running.is_empty() => return,
                Err(RecvTimeoutError::Disconnected) => None,
            }
        };
        waiting.extend(first);
        waiting.extend(rx.try_iter());
        // Admission by free pages, in arrival order.
        while let Some(req) = waiting.front() {
            if req.events.is_closed() {
                waiting.pop_front();
                stats.waiting.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let need = pool.pages_for(req.prompt.len() + req.sampling.max_new_tokens);
            if used + need > pool.max_pages {
                break;
            }
            let req = waiting.pop_front().expect("front");
            stats.waiting.fetch_sub(1, Ordering::SeqCst);
            used += need;
            let served = &models[req.model];
            let m = &served.model;
            let scaffold = match &m.fusion {
                Some(f) => match f.prompt_context(&served.tok, &req.prompt, req.scaffold_weight) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let _ = req.events.send(Event::Error(e.to_string()));
                        used -= need;
                        continue;
                    }
                },
                None => None,
            };
            running.push(Sequence {
                rng: Rng::derive(req.sampling.seed, "sampling"),
                ctx: req.prompt.clone(),
                out: Vec::new(),
                sent_text: String::new(),
                cache: KvCache::new(m.cfg.n_layers),
                pages: need,
                scaffold,
                req,
            });
        }
        stats.running.store(running.len(), Ordering::SeqCst);
        stats.pages_used.store(used, Ordering::SeqCst);
        // One step of every running sequence; finished and abandoned ones free their pages.
        running.retain_mut(|seq| {
            let keep = match step(&models[seq.req.model], seq) {
                Ok(None) => !seq.req.events.is_closed(),
                Ok(Some(finish)) => {
                    let _ = seq.req.events.send(Event::Done {
                        finish,
                        prompt_tokens: seq.req.prompt.len(),
                        completion_tokens: seq.out.len(),
                    });
                    false
                }
                Err(e) => {
                    let _ = seq.req.events.send(Event::Error(format!("{e:#}")));
                    false
                }
            };
            if !keep {
                used -= seq.pages;
            }
            keep
        });
        stats.running.store(running.len(), Ordering::SeqCst);
        stats.pages_used.store(used, Ordering::SeqCst);
        if let Some(d) = step_delay
            && !running.is_empty()
        {
            std::thread::sleep(d);
        }
    }
}

/// One token of `seq` (its whole prompt first); `Some` once it ends.
fn step(m: &ServedModel, seq: &mut Sequence) -> Result<Option<Finish>> {
    let model = &m.model;
    let cfg = &seq.req.sampling;
    if seq.ctx.len() >= model.cfg.seq_len {
        return Ok(Some(Finish::Length));
    }
    let device = model.device();
    let logits = if cfg.use_cache {
        let start = seq.cache.len();
        let input = Tensor::new(&seq.ctx[start..], &device)?.unsqueeze(0)?;
        model.forward_fused(&input, start, Some(&mut seq.cache), seq.scaffold.as_ref())?
    } else {
        let input = Tensor::new(seq.ctx.as_slice(), &device)?.unsqueeze(0)?;
        model.forward_fused(&input, 0, None, seq.scaffold.as_ref())?
    };
    let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
    let last: Vec<f32> = last.to_dtype(DType::F32)?.to_vec1()?;
    let next = pick(&last, &seq.ctx, cfg, seq.out.len(), &mut seq.rng);
    seq.ctx.push(next);
    seq.out.push(next);
    if Some(next) == cfg.eos_token_id {
        // Counted, as `stackwise generate` counts it; a special token decodes to nothing.
        let _ = seq.req.events.send(Event::Token {
            id: next,
            text: String::new(),
        });
        return Ok(Some(Finish::Stop));
    }
    if let Some(n) = cfg.stop_on_repeat_ngram
        && ends_with_repeat(&seq.out, n)
    {
        seq.out.truncate(seq.out.len() - n);
        return Ok(Some(Finish::Stop));
    }
    let text = m.tok.decode(&seq.out)?;
    if let Some(cut) = seq
        .req
        .stop
        .iter()
        .filter_map(|s| text.find(s.as_str()))
        .min()
    {
        let tail = text[..cut].get(seq.sent_text.len()..).unwrap_or("");
        if !tail.is_empty() {
            let _ = seq.req.events.send(Event::Token {
                id: next,
                text: tail.to_string(),
            });
        }
        return Ok(Some(Finish::Stop));
    }
    // Send the text this token completes (a partial UTF-8 character waits for the next).
    let new = match text.get(seq.sent_text.len()..) {
        Some(t) if !t.ends_with('\u{FFFD}') => t.to_string(),
        _ => String::new(),
    };
    seq.sent_text.push_str(&new);
    let _ = seq.req.events.send(Event::Token {
        id: next,
        text: new,
    });
    if seq.out.len() >= cfg.max_new_tokens {
        return Ok(Some(Finish::Length));
    }
    Ok(None)
}
