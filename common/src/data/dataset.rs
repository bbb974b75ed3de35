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
    /// The content fingerprint ([`fingerprint`]), computed when the dataset was prepared
    /// (older datasets lack it: training then computes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Entropy in nats of the empirical token distribution.
pub fn unigram_entropy(tokens: impl Iterator<Item = u32>, vocab: usize) -> f64 {
    let mut counts = vec![0u64; vocab];
    for t in tokens {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
        }
    }
    entropy_of_counts(&counts)
}

/// Entropy in nats of the distribution that `counts` (one a token id) give.
pub fn entropy_of_counts(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum()
}

/// A shard of a split: its stem and where its tokens sit in the split's token stream.
#[derive(Debug, Clone)]
struct Shard {
    stem: String,
    start: u64,
    tokens: u64,
}

/// One split, read where it lies: tokens and loss masks stay in the shards (local files or
/// an object store) and samples are read as byte ranges, so memory does not grow with the
/// corpus; the document offsets (8 bytes a document) are held.
#[derive(Debug, Clone)]
pub struct SplitData {
    store: Store,
    shards: Vec<Shard>,
    tokens: u64,
    vocab_size: usize,
    /// Document start offsets, plus the end.
    doc_offsets: Vec<u64>,
}

/// A training sample: ids and per-token loss flags, both `seq_len` long.
pub type Sample = (Vec<u32>, Vec<f32>);

/// Token ids and their loss flags, as stored.
pub type Tokens = (Vec<u32>, Vec<u8>);

/// Bytes read at once when a split is streamed (fingerprint).
const STREAM_BYTES: u64 = 16 << 20;

fn le_u32s(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

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

    /// Open a split: every shard's files are checked against the index by size, and its
    /// document offsets are read and checked. Tokens are read (and their ids checked)
    /// when samples are.
    pub fn load_split(&self, store: &Store, split: &SplitIndex) -> Result<SplitData, DataError> {
        let err = |msg: String| DataError::Index {
            uri: store.uri().to_string(),
            msg,
        };
        let mut out = SplitData {
            store: store.clone(),
            shards: Vec::with_capacity(split.shards.len()),
            tokens: 0,
            vocab_size: self.vocab_size,
            doc_offsets: vec![0],
        };
        for s in &split.shards {
            let size = |ext: &str| -> Result<u64, DataError> {
                store
                    .size(&format!("{}.{ext}", s.stem))?
                    .ok_or_else(|| err(format!("shard {}.{ext} is missing", s.stem)))
            };
            let (bin, mask) = (size("bin")?, size("mask")?);
            // The offsets are read whole anyway: their length needs no request of its own.
            let docs = store
                .get(&format!("{}.docs", s.stem))?
                .ok_or_else(|| err(format!("shard {}.docs is missing", s.stem)))?;
            let sizes = (bin, mask, docs.len() as u64);
            let want = s
                .tokens
                .checked_mul(4)
                .zip(s.docs.checked_add(1).and_then(|d| d.checked_mul(8)));
            if want.is_none_or(|(bin, docs)| sizes != (bin, s.tokens, docs)) {
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
            let base = out.tokens;
            out.doc_offsets
                .extend(offsets.iter().skip(1).map(|o| base + o));
            out.shards.push(Shard {
                stem: s.stem.clone(),
                start: base,
                tokens: s.tokens,
            });
            out.tokens += s.tokens;
        }
        Ok(out)
    }
}

/// A fingerprint of a dataset's content: the sha256 of its vocabulary size and the tokens,
/// document boundaries and loss masks of both splits (not of where it was prepared from).
/// Streams the shards; `data prepare` stores it in `index.json`, so training need not.
pub fn fingerprint(vocab_size: usize, splits: &[&SplitData]) -> Result<String, DataError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((vocab_size as u64).to_le_bytes());
    for s in splits {
        h.update(s.tokens.to_le_bytes());
        for shard in &s.shards {
            s.stream(&shard.stem, "bin", shard.tokens * 4, |bytes| {
                s.check_ids(&shard.stem, le_u32s(bytes))?;
                h.update(bytes);
                Ok(())
            })?;
        }
        for o in &s.doc_offsets {
            h.update(o.to_le_bytes());
        }
        for shard in &s.shards {
            s.stream(&shard.stem, "mask", shard.tokens, |bytes| {
                h.update(bytes);
                Ok(())
            })?;
        }
    }
    Ok(hex::encode(h.finalize()))
}

impl SplitData {
    pub fn num_tokens(&self) -> u64 {
        self.tokens
    }

    pub fn num_docs(&self) -> usize {
        self.doc_offsets.len() - 1
    }

    /// Number of samples of `seq_len` tokens.
    pub fn num_samples(&self, seq_len: usize, packed: bool) -> usize {
        if packed {
            (self.tokens / seq_len as u64) as usize
        } else {
            self.num_docs()
        }
    }

    fn index_error(&self, msg: String) -> DataError {
        DataError::Index {
            uri: self.store.uri().to_string(),
            msg,
        }
    }

    fn check_ids(&self, stem: &str, ids: impl Iterator<Item = u32>) -> Result<(), DataError> {
        let mut ids = ids;
        match ids.find(|&t| t as usize >= self.vocab_size) {
            Some(bad) => Err(self.index_error(format!(
                "shard {stem}: token id {bad} >= vocab_size {}",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// `f` over an object's bytes `0..len`, a piece at a time.
    fn stream(
        &self,
        stem: &str,
        ext: &str,
        len: u64,
        mut f: impl FnMut(&[u8]) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let name = format!("{stem}.{ext}");
        let mut at = 0;
        while at < len {
            let end = (at + STREAM_BYTES).min(len);
            let piece = self.store.get_ranges(&[(name.clone(), at..end)])?;
            f(&piece[0])?;
            at = end;
        }
        Ok(())
    }

    /// Tokens and loss flags of each token range, read concurrently across shards.
    pub fn read(&self, ranges: &[std::ops::Range<u64>]) -> Result<Vec<Tokens>, DataError> {
        // (range, shard, token range inside the shard) per piece.
        let mut pieces = Vec::new();
        for (r, range) in ranges.iter().enumerate() {
            if range.start > range.end || range.end > self.tokens {
                return Err(self.index_error(format!(
                    "tokens {range:?} are outside the split's {}",
                    self.tokens
                )));
            }
            let first = self
                .shards
                .partition_point(|s| s.start + s.tokens <= range.start);
            for (k, s) in self.shards.iter().enumerate().skip(first) {
                if s.start >= range.end {
                    break;
                }
                let lo = range.start.max(s.start) - s.start;
                let hi = range.end.min(s.start + s.tokens) - s.start;
                if hi > lo {
                    pieces.push((r, k, lo..hi));
                }
            }
        }
        let requests: Vec<(String, std::ops::Range<u64>)> = pieces
            .iter()
            .flat_map(|(_, k, t)| {
                let stem = &self.shards[*k].stem;
                [
                    (format!("{stem}.bin"), t.start * 4..t.end * 4),
                    (format!("{stem}.mask"), t.clone()),
                ]
            })
            .collect();
        let bytes = self.store.get_ranges(&requests)?;
        let mut out: Vec<Tokens> = ranges
            .iter()
            .map(|r| {
                let n = (r.end - r.start) as usize;
                (Vec::with_capacity(n), Vec::with_capacity(n))
            })
            .collect();
        for ((r, k, _), pair) in pieces.iter().zip(bytes.chunks_exact(2)) {
            let ids: Vec<u32> = le_u32s(&pair[0]).collect();
            self.check_ids(&self.shards[*k].stem, ids.iter().copied())?;
            out[*r].0.extend(ids);
            out[*r].1.extend_from_slice(&pair[1]);
        }
        Ok(out)
    }

    /// Every token and loss flag of the split (for tests and small splits).
    pub fn read_all(&self) -> Result<Tokens, DataError> {
        let all = std::iter::once(0..self.tokens).collect::<Vec<_>>();
        Ok(self.read(&all)?.remove(0))
    }

    /// Samples `indices`. `all_tokens`: every real token counts in the loss (`clm`),
    /// ignoring the stored SFT mask; padding never counts.
    pub fn samples(
        &self,
        indices: &[usize],
        seq_len: usize,
        packed: bool,
        pad_id: u32,
        all_tokens: bool,
    ) -> Result<Vec<Sample>, DataError> {
        let ranges: Vec<std::ops::Range<u64>> = indices
            .iter()
            .map(|&i| {
                if packed {
                    (i * seq_len) as u64..((i + 1) * seq_len) as u64
                } else {
                    let s = self.doc_offsets[i];
                    s..self.doc_offsets[i + 1].min(s + seq_len as u64)
                }
            })
            .collect();
        Ok(self
            .read(&ranges)?
            .into_iter()
            .map(|(mut ids, mask)| {
                let mut mask: Vec<f32> = mask
                    .iter()
                    .map(|&m| if all_tokens { 1.0 } else { m as f32 })
                    .collect();
                ids.resize(seq_len, pad_id);
                mask.resize(seq_len, 0.0);
                (ids, mask)
            })
            .collect())
    }

    /// Sample `i` (see [`Self::samples`]).
    pub fn sample(
        &self,
        i: usize,
        seq_len: usize,
        packed: bool,
        pad_id: u32,
        all_tokens: bool,
    ) -> Result<Sample, DataError> {
        Ok(self
            .samples(&[i], seq_len, packed, pad_id, all_tokens)?
            .remove(0))
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
