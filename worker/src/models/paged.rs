//! A paged KV cache (Kwon et al. 2023, vLLM's PagedAttention): the keys and values of every
//! layer live in one pool of fixed-size pages, allocated once; a sequence holds a page table
//! (which pages, in order, hold its positions) and gives its pages back when it ends. Memory
//! is claimed at start, so it cannot run out later, and sequences of any length share it
//! without fragmentation. `Transformer::forward_paged` runs several sequences' new tokens
//! packed into one batch over the pool: every projection is one matmul for all of them.
//!
//! Attention reads a sequence's keys by gathering its slots, then runs the same code as the
//! contiguous cache (`attention.rs`), so both give the same numbers.

use candle_core::{DType, Device, Result, Tensor};
use stackwise_common::config::{AttentionKind, ModelConfig};

/// Which pages hold a sequence's positions, and how many positions it has.
#[derive(Debug, Default)]
pub struct PageTable {
    pages: Vec<u32>,
    len: usize,
}

impl PageTable {
    /// Positions written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages held.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }
}

/// One layer's keys and values: `(pages * page_size, n_kv_heads * head_dim)` each, a row a
/// position slot.
pub struct PagedLayer {
    k: Tensor,
    v: Tensor,
    page_size: usize,
}

impl PagedLayer {
    fn slot(&self, table: &PageTable, pos: usize) -> usize {
        table.pages[pos / self.page_size] as usize * self.page_size + pos % self.page_size
    }

    /// Store rows `(T, C)` of keys and values for positions `start..start + T`.
    pub(super) fn write(
        &self,
        table: &PageTable,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let t = k.dim(0)?;
        let mut i = 0;
        while i < t {
            let pos = start + i;
            // The run of positions left in this page.
            let n = (self.page_size - pos % self.page_size).min(t - i);
            let slot = self.slot(table, pos);
            self.k
                .slice_set(&k.narrow(0, i, n)?.contiguous()?, 0, slot)?;
            self.v
                .slice_set(&v.narrow(0, i, n)?.contiguous()?, 0, slot)?;
            i += n;
        }
        Ok(())
    }

    /// The keys and values of all the sequence's positions, `(len, C)` each.
    pub(super) fn read(&self, table: &PageTable) -> Result<(Tensor, Tensor)> {
        let slots: Vec<u32> = (0..table.len).map(|p| self.slot(table, p) as u32).collect();
        let slots = Tensor::new(slots.as_slice(), self.k.device())?;
        Ok((
            self.k.index_select(&slots, 0)?,
            self.v.index_select(&slots, 0)?,
        ))
    }
}

/// The page pool of all layers and its free list.
pub struct PagedKvCache {
    layers: Vec<PagedLayer>,
    page_size: usize,
    max_pages: usize,
    free: Vec<u32>,
}

impl PagedKvCache {
    /// Whether a model of `cfg` can decode over pages (MLA caches a latent instead).
    pub fn supports(cfg: &ModelConfig) -> bool {
        cfg.attention != AttentionKind::Mla
    }

    /// Bytes of one page over all layers (keys and values).
    pub fn page_bytes(cfg: &ModelConfig, page_size: usize, dtype: DType) -> usize {
        2 * cfg.n_layers * cfg.kv_dim() * page_size * dtype.size_in_bytes()
    }

    /// A pool of `max_pages` pages of `page_size` positions for a model of `cfg`, allocated
    /// now (zeroed).
    pub fn new(
        cfg: &ModelConfig,
        page_size: usize,
        max_pages: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !Self::supports(cfg) {
            candle_core::bail!("a paged KV cache needs softmax or kernel attention, not MLA");
        }
        if page_size == 0 || max_pages == 0 {
            candle_core::bail!("a paged KV cache needs a page size and a page count of at least 1");
        }
        let rows = max_pages * page_size;
        let layers = (0..cfg.n_layers)
            .map(|_| {
                Ok(PagedLayer {
                    k: Tensor::zeros((rows, cfg.kv_dim()), dtype, device)?,
                    v: Tensor::zeros((rows, cfg.kv_dim()), dtype, device)?,
                    page_size,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            page_size,
            max_pages,
            free: (0..max_pages as u32).rev().collect(),
        })
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn max_pages(&self) -> usize {
        self.max_pages
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages a sequence of `positions` positions needs.
    pub fn pages_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.page_size)
    }

    /// A table of `pages` free pages, or `None` when fewer are free.
    pub fn allocate(&mut self, pages: usize) -> Option<PageTable> {
        if pages > self.free.len() {
            return None;
        }
        let pages = self.free.split_off(self.free.len() - pages);
        Some(PageTable { pages, len: 0 })
    }

    /// Give a sequence's pages back.
    pub fn release(&mut self, table: PageTable) {
        self.free.extend(table.pages);
    }

    pub(super) fn layer(&self, i: usize) -> &PagedLayer {
        &self.layers[i]
    }

    /// Check that `table` has room for `t` more positions, and count them as written.
    pub(super) fn extend(&self, table: &mut PageTable, t: usize) -> Result<usize> {
        let start = table.len;
        if t == 0 {
            candle_core::bail!("a sequence in a paged batch has no new tokens");
        }
        if t > 1 && start > 0 {
            candle_core::bail!(
                "only a sequence's first chunk (its prompt) may have several tokens"
            );
        }
        if start + t > table.pages.len() * self.page_size {
            candle_core::bail!(
                "{} positions do not fit the sequence's {} pages of {}",
                start + t,
                table.pages.len(),
                self.page_size
            );
        }
        table.len += t;
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::tiny;
    use crate::models::{KvCache, Transformer};
    use stackwise_common::config::{AttentionMode, Family};

    fn row(t: &Tensor, i: usize) -> Vec<f32> {
        t.get(i).unwrap().to_vec1().unwrap()
    }

    /// Logits of the last token after each step of `steps` with a contiguous cache.
    fn contiguous(m: &Transformer, steps: &[&[u32]]) -> Vec<Vec<f32>> {
        let mut cache = KvCache::new(m.cfg.n_layers);
        steps
            .iter()
            .map(|ids| {
                let start = cache.len();
                let x = Tensor::new(*ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let l = m
                    .forward(&x, start, Some(&mut cache))
                    .unwrap()
                    .squeeze(0)
                    .unwrap();
                row(&l, ids.len() - 1)
            })
            .collect()
    }

    #[test]
    fn pages_give_the_contiguous_caches_logits_alone_and_packed_with_others() {
        // Three sequences across page boundaries (page size 3), stepped together: each
        // sequence's logits equal its own contiguous-cache decoding, bit for bit.
        let seqs: [&[&[u32]]; 3] = [
            &[&[1, 5, 9, 3], &[7], &[2], &[4]],
            &[&[8], &[6], &[1], &[3]],
            &[&[2, 4, 6, 8, 10, 12, 14], &[16], &[18], &[20]],
        ];
        for (family, kind, decoding) in [Family::Gpt2, Family::Llama]
            .into_iter()
            .flat_map(|f| [None, Some("kernel")].map(|k| (f, k)))
            .flat_map(|(f, k)| [false, true].map(|d| (f, k, d)))
        {
            let cfg = tiny(family, AttentionMode::Causal, kind);
            let (mut m, _) = Transformer::init(&cfg, 3, &Device::Cpu).unwrap();
            if decoding {
                // The strip layout generation and serving use.
                m.prepare_for_decoding().unwrap();
            }
            let want: Vec<_> = seqs.iter().map(|s| contiguous(&m, s)).collect();
            let mut kv = PagedKvCache::new(&cfg, 3, 12, DType::F32, &Device::Cpu).unwrap();
            // A page used and given back first: stale contents must never be read.
            let mut stale = kv.allocate(2).unwrap();
            m.forward_paged(&mut [(&[9, 9, 9, 9, 9][..], &mut stale)], &kv)
                .unwrap();
            kv.release(stale);
            let mut tables: Vec<PageTable> = (0..3).map(|_| kv.allocate(4).unwrap()).collect();
            assert_eq!(kv.free_pages(), 0);
            assert!(kv.allocate(1).is_none());
            for step in 0..4 {
                let mut batch: Vec<(&[u32], &mut PageTable)> = seqs
                    .iter()
                    .zip(tables.iter_mut())
                    .map(|(s, t)| (s[step], t))
                    .collect();
                let logits = m.forward_paged(&mut batch, &kv).unwrap();
                for (i, w) in want.iter().enumerate() {
                    assert_eq!(
                        row(&logits, i),
                        w[step],
                        "{family:?} {kind:?} seq {i} step {step}"
                    );
                }
            }
            assert_eq!(tables[2].len(), 10);
            for t in tables {
                kv.release(t);
            }
            assert_eq!(kv.free_pages(), 12);
        }
    }

    #[test]
    fn a_sequence_cannot_outgrow_its_pages_or_restart_a_prompt() {
        let cfg = tiny(Family::Llama, AttentionMode::Causal, None);
        let (m, _) = Transformer::init(&cfg, 3, &Device::Cpu).unwrap();
        let mut kv = PagedKvCache::new(&cfg, 2, 4, DType::F32, &Device::Cpu).unwrap();
        let mut t = kv.allocate(1).unwrap();
        let e = m
            .forward_paged(&mut [(&[1, 2, 3][..], &mut t)], &kv)
            .unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
        m.forward_paged(&mut [(&[1, 2][..], &mut t)], &kv).unwrap();
        let mut t2 = kv.allocate(2).unwrap();
        m.forward_paged(&mut [(&[1][..], &mut t2)], &kv).unwrap();
        let e = m
            .forward_paged(&mut [(&[1, 2][..], &mut t2)], &kv)
            .unwrap_err();
        assert!(e.to_string().contains("first chunk"), "{e}");
        let mla = tiny(Family::Llama, AttentionMode::Causal, Some("mla"));
        assert!(PagedKvCache::new(&mla, 2, 4, DType::F32, &Device::Cpu).is_err());
    }
}
