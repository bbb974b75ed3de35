//! The decoder-only transformer: GPT-2 (Radford et al. 2019) and LLaMA (Touvron et al. 2023)
//! layouts with mixable options (MHA/GQA/MLA/kernel attention, causal/bidirectional,
//! learned/rotary positions, GELU/SwiGLU, LayerNorm/RMSNorm, tied/untied head,
//! sequential/parallel residual). `Transformer` (its blocks and `Mlp` in `block.rs`) loads by
//! the HF checkpoint keys (see `names`) and `forward`; the layers they use live beside it
//! (`linear.rs`, `attention.rs`, `rope.rs`, `kv_cache.rs`).

use std::sync::Arc;

use candle_core::{Device, Module, Result, Tensor};
use stackwise_common::config::{Family, ModelConfig, Positions};
use stackwise_common::tokenizer::Tok;

use super::block::Block;
use super::fuser::{Fusers, ScaffoldContext, ScaffoldInput};
use super::kv_cache::KvCache;
use super::linear::{INIT_STD, Norm};
use super::paged::{PageTable, PagedKvCache};
use super::params::{Init, ParamBuilder, Params};
use super::recompute::{self, GradSink};
use super::rope::Rope;
use crate::ops;

/// A decoder-only language model.
#[derive(Clone)]
pub struct Transformer {
    pub cfg: ModelConfig,
    tok_emb: Tensor, // (V, D)
    pos_emb: Option<Tensor>,
    blocks: Vec<Block>,
    norm_f: Norm,
    lm_head: Option<Tensor>, // (V, D) when untied
    /// The head as column strips of its (D, V) transpose, for decoding
    /// (`prepare_for_decoding`).
    head_t: Option<ops::Strips>,
    rope: Option<Rope>,
    /// Gradient checkpointing: blocks recompute their activations in the backward, and
    /// their parameters' gradients land here (`training.gradient_checkpointing`).
    pub recompute: Option<Arc<GradSink>>,
    /// A scaffold and its cross-attention fusers (`fuser.rs`): used by `hidden_fused` with
    /// a `ScaffoldContext`.
    pub fusion: Option<Arc<Fusion>>,
}

/// A scaffold model and the fusers through which a base attends to its hidden states.
#[derive(Clone)]
pub struct Fusion {
    pub scaffold: Transformer,
    pub fusers: Fusers,
}

impl Fusion {
    /// Run the scaffold over `input` once and project its final states for every fuser.
    pub fn context(&self, input: &ScaffoldInput, influence: f64) -> Result<ScaffoldContext> {
        let states = self.scaffold.hidden(&input.ids, 0, None)?;
        self.fusers.context(states, input, influence)
    }

    /// The trained influence: the default scaffold weight.
    pub fn influence(&self) -> f64 {
        self.fusers.influence
    }

    /// The scaffold's reading of one prompt (ids in the base's tokenizer `base`) at
    /// `weight` (default: the trained influence): what generation and serving decode with.
    pub fn prompt_context(
        &self,
        base: &Tok,
        prompt: &[u32],
        weight: Option<f64>,
    ) -> Result<ScaffoldContext> {
        let ids = self.prompt_ids(base, prompt)?;
        let input = ScaffoldInput::new(std::slice::from_ref(&ids), 0, 0, &self.scaffold.device())?;
        self.context(&input, weight.unwrap_or(self.influence()))
    }

    /// The scaffold's ids of a prompt given in the base's tokenizer `base`: re-encoded when
    /// the scaffold's tokenizer differs, cut to the scaffold's context (its end kept).
    pub fn prompt_ids(&self, base: &Tok, prompt: &[u32]) -> Result<Vec<u32>> {
        let msg =
            |e: stackwise_common::tokenizer::TokenizerError| candle_core::Error::Msg(e.to_string());
        let mut ids = match &self.fusers.tokenizer {
            None => prompt.to_vec(),
            Some(own) => own
                .encode(&base.decode(prompt).map_err(msg)?, false)
                .map_err(msg)?,
        };
        if ids.is_empty() {
            candle_core::bail!("the prompt tokenizes to nothing in the scaffold's tokenizer");
        }
        ids.drain(..ids.len().saturating_sub(self.scaffold.cfg.seq_len));
        Ok(ids)
    }
}

/// Names of the embedding tables, which differ by family.
pub mod names {
    use super::Family;

    pub fn tok_emb(f: Family) -> &'static str {
        match f {
            Family::Gpt2 => "transformer.wte.weight",
            Family::Llama => "model.embed_tokens.weight",
        }
    }

    pub fn pos_emb(f: Family) -> &'static str {
        match f {
            Family::Gpt2 => "transformer.wpe.weight",
            Family::Llama => "model.embed_positions.weight",
        }
    }

    pub fn norm_f(f: Family) -> &'static str {
        match f {
            Family::Gpt2 => "transformer.ln_f",
            Family::Llama => "model.norm",
        }
    }

    pub const LM_HEAD: &str = "lm_head.weight";
}

impl Transformer {
    pub fn build(cfg: &ModelConfig, p: &mut ParamBuilder, device: &Device) -> Result<Self> {
        Self::build_layers(cfg, p, device, cfg.n_layers)
    }

    /// A model of the first `active` layers of `cfg` (a layer-wise stage): the same
    /// parameter names and initialisation as the full model, the later layers left out.
    pub fn build_layers(
        cfg: &ModelConfig,
        p: &mut ParamBuilder,
        device: &Device,
        active: usize,
    ) -> Result<Self> {
        let f = cfg.family;
        let tok_emb = p.get(
            names::tok_emb(f),
            &[cfg.vocab_size, cfg.d_model],
            Init::Normal(INIT_STD),
        )?;
        let pos_emb = match cfg.positions {
            Positions::Learned => Some(p.get(
                names::pos_emb(f),
                &[cfg.seq_len, cfg.d_model],
                Init::Normal(0.01),
            )?),
            Positions::Rope => None,
        };
        let blocks = (0..active.min(cfg.n_layers))
            .map(|i| Block::load(p, i, cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm_f = Norm::load(p, names::norm_f(f), cfg)?;
        let lm_head = if cfg.tie_embeddings {
            None
        } else {
            Some(p.get(
                names::LM_HEAD,
                &[cfg.vocab_size, cfg.d_model],
                Init::Normal(INIT_STD),
            )?)
        };
        let rope = match cfg.positions {
            Positions::Rope => Some(Rope::new(cfg, device)?),
            Positions::Learned => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            tok_emb,
            pos_emb,
            blocks,
            norm_f,
            lm_head,
            head_t: None,
            rope,
            recompute: None,
            fusion: None,
        })
    }

    /// Block `i` on `x` from position 0 without a cache: recomputed in the backward when
    /// gradient checkpointing is on. `constant_input`: no parameter upstream of `x` trains.
    fn block_at_zero(&self, i: usize, x: &Tensor, constant_input: bool) -> Result<Tensor> {
        match &self.recompute {
            Some(sink) => recompute::block_forward(
                i,
                &self.blocks[i],
                x,
                self.rope.as_ref(),
                sink,
                constant_input,
            ),
            None => self.blocks[i].forward(x, self.rope.as_ref(), 0, None),
        }
    }

    /// A freshly initialised model (seeded) and its parameters.
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<(Self, Params)> {
        let mut p = ParamBuilder::init(seed, device);
        let model = Self::build(cfg, &mut p, device)?;
        Ok((model, p.finish().0))
    }

    /// Final hidden states `(B, T, D)` for tokens `ids (B, T)` at positions `start..start+T`.
    pub fn hidden(
        &self,
        ids: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.hidden_fused(ids, start, cache, None)
    }

    /// `hidden`, with the fusers of `self.fusion` applied after their layers when `ctx` (the
    /// scaffold's reading of the prompts) is given.
    pub fn hidden_fused(
        &self,
        ids: &Tensor,
        start: usize,
        mut cache: Option<&mut KvCache>,
        ctx: Option<&ScaffoldContext>,
    ) -> Result<Tensor> {
        let fused = match (&self.fusion, ctx) {
            (Some(f), Some(c)) => Some((f, c)),
            _ => None,
        };
        let mut x = self.embed(ids, start)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = match cache.as_deref_mut() {
                None if start == 0 => {
                    let constant = i == 0
                        && self
                            .recompute
                            .as_ref()
                            .is_some_and(|s| s.constant_embeddings);
                    self.block_at_zero(i, &x, constant)?
                }
                c => block.forward(&x, self.rope.as_ref(), start, c.map(|c| &mut c.layers[i]))?,
            };
            if let Some((f, c)) = fused
                && let Some(j) = f.fusers.fuser_after(i)
            {
                x = f.fusers.apply(j, &x, c)?;
            }
        }
        self.norm_f.forward(&x)
    }

    /// Token (and learned position) embeddings `(B, T, D)`.
    pub fn embed(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if start + t > self.cfg.seq_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's seq_len {}",
                start + t,
                self.cfg.seq_len
            )
        }
        let mut x = self.tok_emb.embedding(&ids.flatten_all()?)?.reshape((
            ids.dim(0)?,
            t,
            self.cfg.d_model,
        ))?;
        if let Some(pe) = &self.pos_emb {
            x = ops::add_bias(&x, &pe.narrow(0, start, t)?)?;
        }
        Ok(x)
    }

    /// The input of layer `upto`: embeddings and layers `0..upto` (an activation-cache entry).
    pub fn prefix(&self, ids: &Tensor, upto: usize) -> Result<Tensor> {
        let mut x = self.embed(ids, 0)?;
        for block in &self.blocks[..upto] {
            x = block.forward(&x, self.rope.as_ref(), 0, None)?;
        }
        Ok(x.detach())
    }

    /// Final hidden states from the input `x (B, T, D)` of layer `from`.
    pub fn hidden_after(&self, x: &Tensor, from: usize) -> Result<Tensor> {
        let mut x = x.clone();
        for i in from..self.blocks.len() {
            // The input of layer `from` comes from the activation cache: a constant.
            x = self.block_at_zero(i, &x, i == from)?;
        }
        self.norm_f.forward(&x)
    }

    /// Lay the weights out for generation and serving: every dense projection and the LM
    /// head as column strips (`ops::Strips`), which gemm streams front to back when a few rows
    /// decode (the tied head otherwise multiplies as a transposed (V, D) table). Every decoder
    /// of the same model must call it or none: the layouts round differently. Off the CPU the
    /// weights stay as they are (cuBLAS reads them at full bandwidth as they lie).
    pub fn prepare_for_decoding(&mut self) -> Result<()> {
        if !self.device().is_cpu() {
            return Ok(());
        }
        for b in &mut self.blocks {
            b.prepare_for_decoding()?;
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.tok_emb);
        self.head_t = Some(ops::Strips::new(&head.t()?.detach())?);
        Ok(())
    }

    /// Project hidden states `(.., D)` to vocabulary logits `(.., V)`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.tok_emb);
        let dims = hidden.dims().to_vec();
        let d = dims[dims.len() - 1];
        let y = match &self.head_t {
            Some(h) => h.matmul(&hidden.reshape(((), d))?)?,
            None => ops::matmul_rows(&hidden.reshape(((), d))?, &head.t()?)?,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.cfg.vocab_size;
        y.reshape(out)
    }

    /// Layers in the forward pass (fewer than `cfg.n_layers` in a layer-wise stage).
    pub fn active_layers(&self) -> usize {
        self.blocks.len()
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.tok_emb.device().clone()
    }

    /// The dtype it computes in (its embeddings').
    pub fn dtype(&self) -> candle_core::DType {
        self.tok_emb.dtype()
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.logits(&self.hidden(ids, start, cache)?)
    }

    /// Logits `(B, V)` of the last new token of each of B sequences, run packed into one
    /// batch over the paged cache `kv`. Each entry: the sequence's new tokens (its whole
    /// prompt first, then one at a time) and its page table, which gains their positions.
    pub fn forward_paged(
        &self,
        seqs: &mut [(&[u32], &mut PageTable)],
        kv: &PagedKvCache,
    ) -> Result<Tensor> {
        if self.fusion.is_some() {
            candle_core::bail!("a scaffold model decodes with its contiguous cache, not pages");
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut last = Vec::with_capacity(seqs.len());
        for (tokens, table) in seqs.iter_mut() {
            let start = kv.extend(table, tokens.len())?;
            if start + tokens.len() > self.cfg.seq_len {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's seq_len {}",
                    start + tokens.len(),
                    self.cfg.seq_len
                )
            }
            ids.extend_from_slice(tokens);
            positions.extend((start..start + tokens.len()).map(|p| p as u32));
            last.push(ids.len() as u32 - 1);
        }
        let device = self.device();
        let n = ids.len();
        let mut x = self
            .tok_emb
            .embedding(&Tensor::new(ids.as_slice(), &device)?)?
            .reshape((1, n, self.cfg.d_model))?;
        if let Some(pe) = &self.pos_emb {
            let pos = Tensor::new(positions.as_slice(), &device)?;
            x = ops::add_bias(&x, &pe.index_select(&pos, 0)?)?;
        }
        let tables: Vec<(usize, &PageTable)> = seqs
            .iter()
            .map(|(tokens, table)| (table.len() - tokens.len(), &**table))
            .collect();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward_paged(&x, self.rope.as_ref(), &tables, kv.layer(i))?;
        }
        let x = self.norm_f.forward(&x)?;
        let x = x
            .squeeze(0)?
            .index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
        self.logits(&x)
    }

    /// `forward` with the scaffold's context (see `hidden_fused`).
    pub fn forward_fused(
        &self,
        ids: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
        ctx: Option<&ScaffoldContext>,
    ) -> Result<Tensor> {
        self.logits(&self.hidden_fused(ids, start, cache, ctx)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_diff, tiny as tiny_with};
    use stackwise_common::config::AttentionMode;

    fn ids() -> Tensor {
        Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap()
    }

    #[test]
    fn causal_attention_ignores_the_future_and_bidirectional_does_not() {
        for (family, kind) in [Family::Gpt2, Family::Llama]
            .into_iter()
            .flat_map(|f| [None, Some("mla"), Some("kernel")].map(|k| (f, k)))
        {
            for mode in [AttentionMode::Causal, AttentionMode::Bidirectional] {
                let (m, _) =
                    Transformer::init(&tiny_with(family, mode, kind), 1, &Device::Cpu).unwrap();
                let a = m.forward(&ids(), 0, None).unwrap();
                let changed = Tensor::new(&[[1u32, 5, 9, 3, 7, 40]], &Device::Cpu).unwrap();
                let b = m.forward(&changed, 0, None).unwrap();
                let prefix = max_diff(&a.narrow(1, 0, 5).unwrap(), &b.narrow(1, 0, 5).unwrap());
                match mode {
                    AttentionMode::Causal => assert_eq!(prefix, 0.0, "{family:?} {kind:?}"),
                    AttentionMode::Bidirectional => assert!(prefix > 1e-6, "{family:?} {kind:?}"),
                }
            }
        }
    }

    #[test]
    fn kv_cache_gives_the_same_logits_as_a_full_forward() {
        for (family, kind) in [Family::Gpt2, Family::Llama]
            .into_iter()
            .flat_map(|f| [None, Some("mla"), Some("kernel")].map(|k| (f, k)))
        {
            let cfg = tiny_with(family, AttentionMode::Causal, kind);
            let (m, _) = Transformer::init(&cfg, 2, &Device::Cpu).unwrap();
            let full = m.forward(&ids(), 0, None).unwrap();
            let mut cache = KvCache::new(cfg.n_layers);
            let first = m
                .forward(&ids().narrow(1, 0, 4).unwrap(), 0, Some(&mut cache))
                .unwrap();
            let mut last = first.narrow(1, 3, 1).unwrap();
            for pos in 4..6 {
                last = m
                    .forward(&ids().narrow(1, pos, 1).unwrap(), pos, Some(&mut cache))
                    .unwrap();
            }
            assert_eq!(cache.len(), 6);
            assert!(max_diff(&full.narrow(1, 5, 1).unwrap(), &last) < 1e-5);
            assert!(max_diff(&full.narrow(1, 0, 4).unwrap(), &first) < 1e-5);
        }
    }
}
