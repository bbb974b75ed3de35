//! Reading a prepared dataset back (`index.json` + shards) and cutting it into samples.
//! Packed samples (pre-training, `clm`): the token stream cut into consecutive blocks of
//! `seq_len` tokens, as HF `run_clm` groups texts. Per-document samples (`sft`): one document
//! each, truncated to `seq_len` and padded with EOS that carries no loss.

use serde::{Deserialize, Serialize};

use super::error::DataError;
use crate::store::Store;
use crate::tokenizer::Tok;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardInfo {
    pub stem: String,
    pub tokens: u64,
    pub docs: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SplitIndex {
    pub tokens: u64,
    pub docs: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenIndex {
    pub format: u32,
    pub vocab_size: usize,
    pub eos_id: Option<u32>,
    pub sources: Vec<String>,
    pub train: SplitIndex,
    pub validation: SplitIndex,
    /// Entropy (nats/token) of the train split's unigram distribution: the loss of a model
    /// that ignores context, so a trained model must land well below it.
    #[serde(default)]
    pub unigram_entropy: Option<f64>,
}

/// Entropy in nats of the empirical token distribution.
pub fn unigram_entropy(tokens: impl Iterator<Item = u32>, vocab: usize) -> f64 {
    let mut counts = vec![0u64; vocab];
    let mut n = 0u64;
    for t in tokens {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
            n += 1;
        }
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum()
}

/// One split in memory.
#[derive(Debug, Clone, Default)]
pub struct SplitData {
    pub tokens: Vec<u32>,
    pub mask: Vec<u8>,
    /// Document start offsets, plus the end.
    pub doc_offsets: Vec<u64>,
}

/// A training sample: ids and per-token loss flags, both `seq_len` long.
pub type Sample = (Vec<u32>, Vec<f32>);

impl TokenIndex {
    pub fn open(store: &Store) -> Result<(Self, Tok), DataError> {
        let err = |msg: String| DataError::Index {
            uri: store.uri().to_string(),
            msg,
        };
        let raw = store.get("index.json")?.ok_or_else(|| {
            err("no index.json: not a prepared dataset (or its preparation did not finish); run `stackwise data prepare`".into())
        })?;
        let index: TokenIndex =
            serde_json::from_slice(&raw).map_err(|e| err(format!("index.json: {e}")))?;
        let tok_bytes = store
            .get("tokenizer.json")?
            .ok_or_else(|| err("tokenizer.json is missing".into()))?;
        let tok =
            Tok::from_json_bytes(&tok_bytes).map_err(|e| err(format!("tokenizer.json: {e}")))?;
        Ok((index, tok))
    }

    pub fn load_split(&self, store: &Store, split: &SplitIndex) -> Result<SplitData, DataError> {
        let err = |msg: String| DataError::Index {
            uri: store.uri().to_string(),
            msg,
        };
        let mut out = SplitData {
            doc_offsets: vec![0],
            ..Default::default()
        };
        for s in &split.shards {
            let get = |ext: &str| -> Result<bytes::Bytes, DataError> {
                store
                    .get(&format!("{}.{ext}", s.stem))?
                    .ok_or_else(|| err(format!("shard {}.{ext} is missing", s.stem)))
            };
            let (bin, mask, docs) = (get("bin")?, get("mask")?, get("docs")?);
            if bin.len() as u64 != s.tokens * 4
                || mask.len() as u64 != s.tokens
                || docs.len() as u64 != (s.docs + 1) * 8
            {
                return Err(err(format!(
                    "shard {} does not match its index (truncated?)",
                    s.stem
                )));
            }
            let offsets: Vec<u64> = docs
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let in_order = offsets.windows(2).all(|w| w[0] <= w[1]);
            if offsets.first() != Some(&0) || offsets.last() != Some(&s.tokens) || !in_order {
                return Err(err(format!(
                    "shard {}.docs: document offsets must rise from 0 to its {} tokens; re-run `stackwise data prepare`",
                    s.stem, s.tokens
                )));
            }
            let base = out.tokens.len() as u64;
            out.tokens.extend(
                bin.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            out.mask.extend_from_slice(&mask);
            out.doc_offsets
                .extend(offsets.iter().skip(1).map(|o| base + o));
        }
        if let Some(&bad) = out.tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(err(format!(
                "token id {bad} >= vocab_size {}",
                self.vocab_size
            )));
        }
        Ok(out)
    }
}

/// A fingerprint of a dataset's content: the sha256 of its vocabulary size and the tokens,
/// document boundaries and loss masks of both splits (not of where it was prepared from).
pub fn fingerprint(vocab_size: usize, splits: &[&SplitData]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((vocab_size as u64).to_le_bytes());
    for s in splits {
        h.update((s.tokens.len() as u64).to_le_bytes());
        for t in &s.tokens {
            h.update(t.to_le_bytes());
        }
        for o in &s.doc_offsets {
            h.update(o.to_le_bytes());
        }
        h.update(&s.mask);
    }
    hex::encode(h.finalize())
}

impl SplitData {
    pub fn num_docs(&self) -> usize {
        self.doc_offsets.len() - 1
    }

    /// Number of samples of `seq_len` tokens.
    pub fn num_samples(&self, seq_len: usize, packed: bool) -> usize {
        if packed {
            self.tokens.len() / seq_len
        } else {
            self.num_docs()
        }
    }

    /// Sample `i`. `all_tokens`: every real token counts in the loss (`clm`), ignoring the
    /// stored SFT mask; padding never counts.
    pub fn sample(
        &self,
        i: usize,
        seq_len: usize,
        packed: bool,
        pad_id: u32,
        all_tokens: bool,
    ) -> Sample {
        let (start, end) = if packed {
            (i * seq_len, (i + 1) * seq_len)
        } else {
            let s = self.doc_offsets[i] as usize;
            (s, (self.doc_offsets[i + 1] as usize).min(s + seq_len))
        };
        let mut ids = self.tokens[start..end].to_vec();
        let mut mask: Vec<f32> = self.mask[start..end]
            .iter()
            .map(|&m| if all_tokens { 1.0 } else { m as f32 })
            .collect();
        ids.resize(seq_len, pad_id);
        mask.resize(seq_len, 0.0);
        (ids, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_entropy_of_uniform_and_constant_streams() {
        assert!(
            (unigram_entropy([0u32, 1, 2, 3].into_iter().cycle().take(400), 8) - 4f64.ln()).abs()
                < 1e-12
        );
        assert_eq!(unigram_entropy([5u32; 10].into_iter(), 8), 0.0);
    }
}
