//! One running sequence of the engine: its context, its KV memory, its sampler, and what it
//! has sent. `accept` takes the next token's logits and turns them into events, detokenizing
//! incrementally (Hugging Face TGI's prefix/read offsets: each token decodes only a short
//! window, and a partial UTF-8 character waits for the token that completes it).

use anyhow::Result;
use candle_core::{DType, Tensor};
use stackwise_common::rng::Rng;
use stackwise_common::tokenizer::Tok;

use super::request::{Event, Finish, GenerationRequest, ServedModel};
use crate::generate::sampling::{ends_with_repeat, pick};
use crate::models::{KvCache, PageTable, ScaffoldContext};

/// Where a sequence keeps its keys and values.
pub(super) enum Kv {
    /// Pages of the engine's pool: decoded packed with the other paged sequences.
    Paged(PageTable),
    /// Its own growing cache (scaffold and MLA models): decoded alone.
    Contiguous(KvCache),
    /// None: the whole context is recomputed every token (`use_cache: false`).
    Recompute,
}

pub(super) struct Sequence {
    pub req: GenerationRequest,
    /// Pages reserved for it at admission.
    pub pages: usize,
    pub ctx: Vec<u32>,
    pub out: Vec<u32>,
    pub kv: Kv,
    rng: Rng,
    pub scaffold: Option<ScaffoldContext>,
    detok: Detokenizer,
}

impl Sequence {
    pub fn new(
        req: GenerationRequest,
        pages: usize,
        kv: Kv,
        scaffold: Option<ScaffoldContext>,
    ) -> Self {
        Self {
            rng: Rng::derive(req.sampling.seed, "sampling"),
            ctx: req.prompt.clone(),
            out: Vec::new(),
            detok: Detokenizer::default(),
            pages,
            kv,
            scaffold,
            req,
        }
    }

    /// The tokens the next forward must read: the prompt first, then the last token.
    pub fn pending(&self) -> &[u32] {
        let done = match &self.kv {
            Kv::Paged(t) => t.len(),
            Kv::Contiguous(c) => c.len(),
            Kv::Recompute => 0,
        };
        &self.ctx[done..]
    }

    /// Whether the context already fills the model (nothing more can be computed).
    pub fn full(&self, m: &ServedModel) -> bool {
        self.ctx.len() >= m.model.cfg.seq_len
    }

    /// One forward of a sequence that is not paged: the next token's logits.
    pub fn forward_alone(&mut self, m: &ServedModel) -> Result<Vec<f32>> {
        let model = &m.model;
        let device = model.device();
        let input = Tensor::new(self.pending(), &device)?.unsqueeze(0)?;
        let logits = match &mut self.kv {
            Kv::Contiguous(cache) => {
                let start = cache.len();
                model.forward_fused(&input, start, Some(cache), self.scaffold.as_ref())?
            }
            Kv::Recompute => model.forward_fused(&input, 0, None, self.scaffold.as_ref())?,
            Kv::Paged(_) => anyhow::bail!("a paged sequence is decoded in its batch"),
        };
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        Ok(last.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// Sample the next token from `logits` and send what it adds; `Some` once the sequence
    /// ends.
    pub fn accept(&mut self, tok: &Tok, logits: &[f32]) -> Result<Option<Finish>> {
        let cfg = &self.req.sampling;
        let next = pick(logits, &self.ctx, cfg, self.out.len(), &mut self.rng);
        self.ctx.push(next);
        self.out.push(next);
        if Some(next) == cfg.eos_token_id {
            // Counted, as `stackwise generate` counts it; a special token decodes to nothing.
            self.send(next, String::new());
            return Ok(Some(Finish::Stop));
        }
        if let Some(n) = cfg.stop_on_repeat_ngram
            && ends_with_repeat(&self.out, n)
        {
            self.out.truncate(self.out.len() - n);
            return Ok(Some(Finish::Stop));
        }
        let new = self.detok.next(tok, &self.out)?;
        if !self.req.stop.is_empty() {
            // A stop string may begin in text already sent: look from its longest reach back.
            let reach = self.req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
            let sent = &self.detok.sent;
            let mut from = sent.len().saturating_sub(reach);
            while !sent.is_char_boundary(from) {
                from -= 1;
            }
            let window = format!("{}{new}", &sent[from..]);
            if let Some(cut) = self
                .req
                .stop
                .iter()
                .filter_map(|s| window.find(s.as_str()))
                .min()
            {
                let tail = window[..cut].get(sent.len() - from..).unwrap_or("");
                if !tail.is_empty() {
                    self.send(next, tail.to_string());
                }
                return Ok(Some(Finish::Stop));
            }
        }
        self.detok.sent.push_str(&new);
        self.send(next, new);
        if self.out.len() >= self.req.sampling.max_new_tokens {
            return Ok(Some(Finish::Length));
        }
        Ok(None)
    }

    fn send(&self, id: u32, text: String) {
        let _ = self.req.events.send(Event::Token { id, text });
    }

    pub fn done(&self, finish: Finish) {
        let _ = self.req.events.send(Event::Done {
            finish,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.out.len(),
        });
    }
}

/// Incremental detokenization: `out[prefix..read]` was decoded last time; the new text is
/// what `out[prefix..]` decodes to beyond it. A window, not the whole output, is decoded per
/// token, and decoding from a token boundary a few tokens back keeps tokenizers whose
/// decoders look at neighbours (SentencePiece's leading space) right.
#[derive(Default)]
struct Detokenizer {
    prefix: usize,
    read: usize,
    sent: String,
}

impl Detokenizer {
    fn next(&mut self, tok: &Tok, out: &[u32]) -> Result<String> {
        let before = tok.decode(&out[self.prefix..self.read])?;
        let now = tok.decode(&out[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            // Decoded text is a prefix of what more tokens decode to, except mid-character.
            let new = now.get(before.len()..).unwrap_or("").to_string();
            self.prefix = self.read;
            self.read = out.len();
            return Ok(new);
        }
        Ok(String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_detokenization_equals_decoding_the_whole_output() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/assets/corpus");
        let text = std::fs::read_to_string(dir.join("macbeth.txt")).unwrap();
        let sample: String = text.chars().take(3000).collect();
        let kind = stackwise_common::tokenizer::TokenizerKind::Bpe;
        let tok = Tok::train(kind, std::slice::from_ref(&sample), 300).unwrap();
        // Multi-byte characters split across byte-level tokens come out whole.
        let head: String = sample.chars().take(400).collect();
        let input = format!("{head} — “Fair is foul” ☾ and foul is fair");
        let ids = tok.encode(&input, false).unwrap();
        let mut d = Detokenizer::default();
        let mut got = String::new();
        for n in 1..=ids.len() {
            let piece = d.next(&tok, &ids[..n]).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "a split character was sent: {piece:?}"
            );
            got.push_str(&piece);
        }
        assert_eq!(got, tok.decode(&ids).unwrap());
    }
}
