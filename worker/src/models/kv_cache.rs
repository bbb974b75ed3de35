//! The KV cache of incremental decoding: per layer, the keys and values of the positions
//! seen so far (for MLA, its latent and rotary key).

use candle_core::Tensor;

/// Keys and values of earlier positions, per layer: (B, n_kv_heads, S, head_dim).
#[derive(Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
        }
    }

    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
