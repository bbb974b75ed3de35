//! The serving engine: one thread that owns the models and steps every running sequence
//! between new arrivals (iteration-level scheduling, "continuous batching", Yu et al. 2022).
//!
//! - Memory: a paged KV cache (`models::paged`) of `--max-pages` pages, allocated at start. A
//!   request waits until the pages it can need, `ceil((prompt + max_tokens) / page_size)`,
//!   are free, so memory never runs out mid-sequence; its pages go back the step it finishes
//!   or its client goes away (its event channel closes).
//! - Batching: every step, the new tokens of all paged sequences of one model (a new
//!   request's whole prompt, the others' last token) run packed as one batch: each
//!   projection is one matmul for all of them. Requests for different adapters are grouped
//!   per step, one batch per adapter. Scaffold and MLA models keep a contiguous cache per
//!   sequence and step each alone; so do `use_cache: false` requests.
//! - A sequence's attention reads only its own pages, and every product is row-invariant
//!   (`ops::matmul_rows`: a row's arithmetic does not depend on the rows beside it), so a
//!   sequence's tokens do not depend on the batch and equal `stackwise generate`'s; sampling
//!   is seeded per request exactly as `stackwise generate` seeds it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use anyhow::Result;
use candle_core::DType;

use super::request::{Event, Finish, GenerationRequest, ServedModel};
use super::sequence::{Kv, Sequence};
use crate::models::{KvCache, PagedKvCache, Transformer};

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
    /// Packed forward passes over the pages, and the sequences they held in all.
    pub batches: AtomicUsize,
    pub batched_sequences: AtomicUsize,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<GenerationRequest>,
    pub stats: Arc<EngineStats>,
    pub pool: PagePool,
    /// Whether the pages hold the KV cache (false: they budget contiguous caches).
    pub paged: bool,
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
        let kv = match models.first() {
            Some(first) if models.iter().all(|m| pageable(&m.model)) => {
                let m = &first.model;
                Some(PagedKvCache::new(
                    &m.cfg,
                    pool.page_size,
                    pool.max_pages,
                    m.dtype(),
                    &m.device(),
                )?)
            }
            _ => None,
        };
        let paged = kv.is_some();
        let s = stats.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(models, pool, kv, rx, s, step_delay))?;
        Ok(Self {
            tx,
            stats,
            pool,
            paged,
        })
    }

    /// Queue a request; its events arrive on its channel.
    pub fn submit(&self, req: GenerationRequest) -> Result<()> {
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx
            .send(req)
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))
    }
}

/// Whether `m` decodes over pages: softmax or kernel attention, no scaffold.
fn pageable(m: &Transformer) -> bool {
    m.fusion.is_none() && PagedKvCache::supports(&m.cfg)
}

fn run(
    models: Vec<ServedModel>,
    pool: PagePool,
    mut kv: Option<PagedKvCache>,
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
            if let Some(seq) = admit(&models, kv.as_mut(), req, need) {
                used += need;
                running.push(seq);
            }
        }
        stats.running.store(running.len(), Ordering::SeqCst);
        stats.pages_used.store(used, Ordering::SeqCst);
        // One token of every running sequence; finished and abandoned ones free their pages.
        let finished = step_all(&models, kv.as_ref(), &mut running, &stats);
        let mut i = 0;
        running.retain_mut(|seq| {
            let keep = match &finished[i] {
                Ok(None) => !seq.req.events.is_closed(),
                Ok(Some(finish)) => {
                    seq.done(*finish);
                    false
                }
                Err(e) => {
                    let _ = seq.req.events.send(Event::Error(e.clone()));
                    false
                }
            };
            i += 1;
            if !keep {
                used -= seq.pages;
                if let (Kv::Paged(t), Some(kv)) =
                    (std::mem::replace(&mut seq.kv, Kv::Recompute), kv.as_mut())
                {
                    kv.release(t);
                }
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

/// A running sequence for `req`, with `need` pages reserved (taken from the pool when paged);
/// `None` when it cannot run, and the request is told why.
fn admit(
    models: &[ServedModel],
    kv: Option<&mut PagedKvCache>,
    req: GenerationRequest,
    need: usize,
) -> Option<Sequence> {
    let refuse = |req: GenerationRequest, e: String| {
        let _ = req.events.send(Event::Error(e));
        None
    };
    let served = &models[req.model];
    let m = &served.model;
    let scaffold = match &m.fusion {
        Some(f) => match f.prompt_context(&served.tok, &req.prompt, req.scaffold_weight) {
            Ok(c) => Some(c),
            Err(e) => return refuse(req, e.to_string()),
        },
        None => None,
    };
    let cache = match kv {
        _ if !req.sampling.use_cache => Kv::Recompute,
        Some(kv) => match kv.allocate(need) {
            Some(t) => Kv::Paged(t),
            None => return refuse(req, "the KV pool has fewer free pages than admitted".into()),
        },
        None => Kv::Contiguous(KvCache::new(m.cfg.n_layers)),
    };
    Some(Sequence::new(req, need, cache, scaffold))
}

/// One step of every running sequence, in order: `Some` for those that end.
fn step_all(
    models: &[ServedModel],
    kv: Option<&PagedKvCache>,
    running: &mut [Sequence],
    stats: &EngineStats,
) -> Vec<std::result::Result<Option<Finish>, String>> {
    let mut logits: Vec<Option<Result<Vec<f32>>>> = running.iter().map(|_| None).collect();
    // Paged sequences, one packed batch per model.
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, seq) in running.iter().enumerate() {
        if matches!(seq.kv, Kv::Paged(_)) && !seq.full(&models[seq.req.model]) {
            groups.entry(seq.req.model).or_default().push(i);
        }
    }
    if let Some(kv) = kv {
        for (model, members) in &groups {
            let rows = forward_group(&models[*model].model, kv, running, members);
            stats.batches.fetch_add(1, Ordering::SeqCst);
            stats
                .batched_sequences
                .fetch_add(members.len(), Ordering::SeqCst);
            match rows {
                Ok(rows) => {
                    for (&i, row) in members.iter().zip(rows) {
                        logits[i] = Some(Ok(row));
                    }
                }
                Err(e) => {
                    for &i in members {
                        logits[i] = Some(Err(anyhow::anyhow!("{e:#}")));
                    }
                }
            }
        }
    }
    running
        .iter_mut()
        .zip(logits)
        .map(|(seq, l)| {
            let m = &models[seq.req.model];
            if seq.full(m) {
                return Ok(Some(Finish::Length));
            }
            let l = match l {
                Some(l) => l,
                None => seq.forward_alone(m),
            };
            l.and_then(|l| seq.accept(&m.tok, &l))
                .map_err(|e| format!("{e:#}"))
        })
        .collect()
}

/// The next-token logits of the sequences `members` of `running`, run as one batch.
fn forward_group(
    model: &Transformer,
    kv: &PagedKvCache,
    running: &mut [Sequence],
    members: &[usize],
) -> Result<Vec<Vec<f32>>> {
    let mut batch = Vec::with_capacity(members.len());
    for (i, seq) in running.iter_mut().enumerate() {
        if members.contains(&i)
            && let Kv::Paged(table) = &mut seq.kv
        {
            let done = table.len();
            batch.push((&seq.ctx[done..], table));
        }
    }
    let logits = model.forward_paged(&mut batch, kv)?;
    Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
}
