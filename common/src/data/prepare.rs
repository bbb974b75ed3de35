//! `stackwise data prepare`: text files, folders or JSONL (`text`, or `prompt` + `completion`)
//! → token shards (`<split>-NNNNN.bin` u32 tokens, `.mask` u8 loss flags, `.docs` u64 document
//! offsets) plus `index.json`, written last: a folder without `index.json` is not a dataset.
//!
//! It streams: a first pass checks every input and counts documents (`source::scan`), then
//! the inputs are tokenized a batch of chunks or records at a time, in parallel, and each
//! split's current shard is the only thing that grows. Memory is bounded by the shard size,
//! not the corpus.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use rayon::prelude::*;

use super::dataset::{ShardInfo, SplitIndex, TokenIndex, entropy_of_counts, fingerprint};
use super::error::DataError;
use super::source::{self, CHUNK_BYTES, JsonlRecords, Scan, TextChunks};
use crate::store::Store;
use crate::tokenizer::Tok;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Fraction of the data held out for validation.
    pub val_fraction: f64,
    /// In JSONL `text` records, tokens after this marker are the response (SFT loss mask).
    pub response_marker: Option<String>,
    /// Tokens per shard file: a shard closes at the first document end past this, and a
    /// document is cut when its shard reaches twice this.
    pub shard_tokens: usize,
    /// Bytes of text tokenized as one piece.
    pub chunk_bytes: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.05,
            response_marker: Some("### Response:".into()),
            shard_tokens: 1 << 23,
            chunk_bytes: CHUNK_BYTES,
        }
    }
}

/// Which split a piece of text goes to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    Train,
    Val,
    /// A record of a small dataset (under 20 documents): its last `val_fraction` of
    /// tokens is validation, the rest training.
    Tail,
}

/// What follows a piece: more of its document, the document's end, or its end with EOS.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    More,
    Doc,
    DocEos,
}

struct Piece {
    part: Part,
    text: String,
    flag: u8,
    end: End,
}

/// A split's shards, written as they fill.
struct SplitWriter<'a> {
    store: &'a Store,
    name: &'static str,
    shard_tokens: usize,
    shards: Vec<ShardInfo>,
    tokens: Vec<u8>,
    mask: Vec<u8>,
    offsets: Vec<u64>,
}

impl<'a> SplitWriter<'a> {
    fn new(store: &'a Store, name: &'static str, shard_tokens: usize) -> Self {
        Self {
            store,
            name,
            shard_tokens: shard_tokens.max(1),
            shards: Vec::new(),
            tokens: Vec::new(),
            mask: Vec::new(),
            offsets: vec![0],
        }
    }

    fn len(&self) -> usize {
        self.mask.len()
    }

    fn push(&mut self, mut ids: &[u32], flag: u8) -> Result<(), DataError> {
        while !ids.is_empty() {
            let room = 2 * self.shard_tokens - self.len();
            let (now, rest) = ids.split_at(room.min(ids.len()));
            for t in now {
                self.tokens.extend_from_slice(&t.to_le_bytes());
            }
            self.mask.extend(std::iter::repeat_n(flag, now.len()));
            ids = rest;
            if self.len() >= 2 * self.shard_tokens {
                self.end_doc()?;
                self.flush()?;
            }
        }
        Ok(())
    }

    fn end_doc(&mut self) -> Result<(), DataError> {
        let n = self.len() as u64;
        if self.offsets.last() != Some(&n) {
            self.offsets.push(n);
        }
        if self.len() >= self.shard_tokens {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        if self.len() == 0 {
            return Ok(());
        }
        let stem = format!("{}-{:05}", self.name, self.shards.len());
        let info = ShardInfo {
            stem: stem.clone(),
            tokens: self.len() as u64,
            docs: self.offsets.len() as u64 - 1,
        };
        // Recorded first, so a failed write is cleaned up too.
        self.shards.push(info);
        let offsets: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        self.store.put(
            &format!("{stem}.bin"),
            Bytes::from(std::mem::take(&mut self.tokens)),
        )?;
        self.store.put(
            &format!("{stem}.mask"),
            Bytes::from(std::mem::take(&mut self.mask)),
        )?;
        self.store
            .put(&format!("{stem}.docs"), Bytes::from(offsets))?;
        self.offsets = vec![0];
        Ok(())
    }

    fn finish(&mut self) -> Result<SplitIndex, DataError> {
        self.end_doc()?;
        self.flush()?;
        Ok(SplitIndex {
            tokens: self.shards.iter().map(|s| s.tokens).sum(),
            docs: self.shards.iter().map(|s| s.docs).sum(),
            shards: self.shards.clone(),
        })
    }

    fn remove(&self) {
        for s in &self.shards {
            for ext in ["bin", "mask", "docs"] {
                let _ = self.store.delete(&format!("{}.{ext}", s.stem));
            }
        }
    }
}

/// Adds `ids` to the per-id train counts.
fn count<'t>(counts: &mut [u64], ids: impl IntoIterator<Item = &'t u32>) {
    for &t in ids {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
        }
    }
}

/// Tokenized pieces go to the split writers, in input order.
struct Sink<'a> {
    tok: &'a Tok,
    frac: f64,
    train: SplitWriter<'a>,
    val: SplitWriter<'a>,
    /// The record being gathered for a `Part::Tail` split.
    tail: (Vec<u32>, Vec<u8>),
    /// Train tokens by id (the unigram entropy).
    counts: Vec<u64>,
    batch: Vec<Piece>,
    batch_bytes: usize,
    max_batch_bytes: usize,
    done_bytes: u64,
    total_bytes: u64,
    started: Instant,
    reported: Instant,
}

impl Sink<'_> {
    fn add(&mut self, piece: Piece) -> Result<(), DataError> {
        self.batch_bytes += piece.text.len();
        self.batch.push(piece);
        if self.batch_bytes >= self.max_batch_bytes || self.batch.len() >= 4096 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DataError> {
        let batch = std::mem::take(&mut self.batch);
        let tok = self.tok;
        let ids: Vec<Vec<u32>> = batch
            .par_iter()
            .map(|p| tok.encode(&p.text, false))
            .collect::<Result<_, _>>()?;
        for (p, ids) in batch.iter().zip(ids) {
            self.write(p, &ids)?;
        }
        self.done_bytes += self.batch_bytes as u64;
        self.batch_bytes = 0;
        if self.reported.elapsed().as_secs() >= 10 {
            self.reported = Instant::now();
            let secs = self.started.elapsed().as_secs_f64();
            tracing::info!(
                "tokenized {:.0} of {:.0} MB ({:.1} MB/s)",
                self.done_bytes as f64 / 1e6,
                self.total_bytes as f64 / 1e6,
                self.done_bytes as f64 / 1e6 / secs
            );
        }
        Ok(())
    }

    fn write(&mut self, p: &Piece, ids: &[u32]) -> Result<(), DataError> {
        let eos = match (p.end, self.tok.eos_id()) {
            (End::DocEos, Some(e)) => Some(e),
            _ => None,
        };
        let ids_and_eos = ids.iter().copied().chain(eos);
        if p.part == Part::Tail {
            self.tail.0.extend(ids_and_eos.clone());
            self.tail
                .1
                .extend(ids.iter().map(|_| p.flag).chain(eos.map(|_| 1)));
            if p.end != End::More {
                let (ids, mask) = std::mem::take(&mut self.tail);
                let n = ids.len();
                let cut = n - ((n as f64 * self.frac).round() as usize).min(n);
                self.write_doc(Part::Train, &ids[..cut], &mask[..cut])?;
                self.write_doc(Part::Val, &ids[cut..], &mask[cut..])?;
            }
            return Ok(());
        }
        let w = if p.part == Part::Train {
            count(&mut self.counts, ids.iter().chain(&eos));
            &mut self.train
        } else {
            &mut self.val
        };
        w.push(ids, p.flag)?;
        if let Some(e) = eos {
            w.push(&[e], 1)?;
        }
        if p.end != End::More {
            w.end_doc()?;
        }
        Ok(())
    }

    /// A whole document (of a `Tail` record) into `part`; empty ones are dropped.
    fn write_doc(&mut self, part: Part, ids: &[u32], mask: &[u8]) -> Result<(), DataError> {
        if ids.is_empty() {
            return Ok(());
        }
        let w = if part == Part::Train {
            count(&mut self.counts, ids);
            &mut self.train
        } else {
            &mut self.val
        };
        // Runs of one flag, so `push` sees slices.
        let mut at = 0;
        while at < ids.len() {
            let run = mask[at..].iter().take_while(|&&m| m == mask[at]).count();
            w.push(&ids[at..at + run], mask[at])?;
            at += run;
        }
        w.end_doc()
    }
}

/// Tokenize `inputs` and write the dataset to `out`. Returns its index.
pub fn prepare(
    inputs: &[PathBuf],
    tok: &Tok,
    out: &Store,
    opts: &PrepareOptions,
) -> Result<TokenIndex, DataError> {
    let scan = source::scan(inputs, opts.response_marker.as_deref())?;
    prepare_scanned(&scan, tok, out, opts)
}

/// [`prepare`] of inputs already checked by [`source::scan`].
pub fn prepare_scanned(
    scan: &Scan,
    tok: &Tok,
    out: &Store,
    opts: &PrepareOptions,
) -> Result<TokenIndex, DataError> {
    // Any earlier index goes first, so a crash below never leaves an old index over new shards.
    out.delete("index.json")?;
    let mut sink = Sink {
        tok,
        frac: opts.val_fraction,
        train: SplitWriter::new(out, "train", opts.shard_tokens),
        val: SplitWriter::new(out, "validation", opts.shard_tokens),
        tail: Default::default(),
        counts: vec![0; tok.vocab_size()],
        batch: Vec::new(),
        batch_bytes: 0,
        max_batch_bytes: opts.chunk_bytes * 2 * rayon::current_num_threads(),
        done_bytes: 0,
        total_bytes: scan.bytes,
        started: Instant::now(),
        reported: Instant::now(),
    };
    let written = feed(scan, opts, &mut sink).and_then(|()| {
        let train = sink.train.finish()?;
        let validation = sink.val.finish()?;
        out.put("tokenizer.json", Bytes::from(tok.to_json()?))?;
        let mut index = TokenIndex {
            format: 1,
            vocab_size: tok.vocab_size(),
            eos_id: tok.eos_id(),
            sources: scan
                .files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect(),
            unigram_entropy: Some(entropy_of_counts(&sink.counts)),
            train,
            validation,
            fingerprint: None,
        };
        let splits = [
            index.load_split(out, &index.train)?,
            index.load_split(out, &index.validation)?,
        ];
        index.fingerprint = Some(fingerprint(index.vocab_size, &[&splits[0], &splits[1]])?);
        Ok(index)
    });
    let index = match written {
        Ok(index) => index,
        Err(e) => {
            sink.train.remove();
            sink.val.remove();
            let _ = out.delete("tokenizer.json");
            return Err(e);
        }
    };
    let json = serde_json::to_vec_pretty(&index).expect("index serializes");
    out.put("index.json", Bytes::from(json))?;
    let secs = sink.started.elapsed().as_secs_f64();
    tracing::info!(
        "prepared {:.0} MB in {secs:.1} s ({:.1} MB/s)",
        scan.bytes as f64 / 1e6,
        scan.bytes as f64 / 1e6 / secs
    );
    Ok(index)
}

/// Every input as pieces, in order. With 20 documents or more every k-th document
/// (k = 1/fraction) is validation; with fewer, the last `fraction` of each: of a text
/// file's bytes (from a cut point), of a record's tokens.
fn feed(scan: &Scan, opts: &PrepareOptions, sink: &mut Sink) -> Result<(), DataError> {
    let frac = opts.val_fraction;
    let k = (1.0 / frac).round().max(2.0) as u64;
    let by_document = frac > 0.0 && scan.docs >= 20;
    let mut doc = 0u64;
    let mut next_part = || {
        let part = match () {
            _ if frac <= 0.0 => Part::Train,
            _ if !by_document => Part::Tail,
            _ if doc % k == k - 1 => Part::Val,
            _ => Part::Train,
        };
        doc += 1;
        part
    };
    for f in &scan.files {
        if f.jsonl {
            for r in JsonlRecords::open(&f.path, opts.response_marker.as_deref())? {
                let (_, parts) = r?;
                let part = next_part();
                let last = parts.len() - 1;
                for (i, (text, flag)) in parts.into_iter().enumerate() {
                    let end = if i == last { End::DocEos } else { End::More };
                    sink.add(Piece {
                        part,
                        text,
                        flag,
                        end,
                    })?;
                }
            }
            continue;
        }
        let part = next_part();
        let cut = match part {
            Part::Tail => source::val_cut(&f.path, f.bytes, frac)?,
            _ => f.bytes,
        };
        let mut chunks = TextChunks::open(&f.path, opts.chunk_bytes, Some(cut))?.peekable();
        while let Some(c) = chunks.next() {
            let (start, text) = c?;
            let next = chunks.peek().map(|n| n.as_ref().map_or(0, |n| n.0));
            let (part, end) = match (part, next) {
                (Part::Tail, Some(n)) if start < cut && n >= cut => (Part::Train, End::Doc),
                (Part::Tail, _) if start < cut => (Part::Train, End::More),
                (Part::Tail, next) => (
                    Part::Val,
                    if next.is_none() {
                        End::DocEos
                    } else {
                        End::More
                    },
                ),
                (part, None) => (part, End::DocEos),
                (part, Some(_)) => (part, End::More),
            };
            // A file whose validation tail is empty ends in training, with its EOS.
            let end = if next.is_none() { End::DocEos } else { end };
            sink.add(Piece {
                part,
                text,
                flag: 1,
                end,
            })?;
        }
    }
    sink.flush()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::tokenizer::TokenizerKind;

    fn tok() -> Tok {
        Tok::train(TokenizerKind::Byte, &["abc".into()], 0).unwrap()
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn bad_inputs_name_the_file_and_line_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("out");
        let out = Store::open(out_dir.to_str().unwrap()).unwrap();
        let opts = PrepareOptions::default();
        let cases: Vec<(PathBuf, &str)> = vec![
            (
                write(dir.path(), "latin1.txt", b"line one\ncaf\xe9\n"),
                "latin1.txt:2: not valid UTF-8",
            ),
            (
                write(dir.path(), "empty.txt", b"  \n"),
                "empty.txt: is empty",
            ),
            (
                write(
                    dir.path(),
                    "a.jsonl",
                    b"{\"text\": \"ok\"}\n\n{\"prompt\": \"q\"}\n",
                ),
                "a.jsonl:3: record has \"prompt\" but no \"completion\"",
            ),
            (
                write(dir.path(), "b.jsonl", b"{\"txt\": \"x\"}\n"),
                "b.jsonl:1: record needs a \"text\" field",
            ),
            (
                write(dir.path(), "c.jsonl", b"{\"text\": 3}\n"),
                "c.jsonl:1: field \"text\" must be a string",
            ),
            (
                write(dir.path(), "d.jsonl", b"{oops\n"),
                "d.jsonl:1: invalid JSON",
            ),
        ];
        for (path, want) in cases {
            let err = prepare(&[path], &tok(), &out, &opts)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        assert!(
            out.list("").unwrap().is_empty(),
            "nothing may be written for bad input"
        );
    }

    #[test]
    fn sft_masks_cover_only_the_response() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "s.jsonl",
            b"{\"prompt\": \"ab\", \"completion\": \"cd\"}\n{\"text\": \"Q ### Response: A\"}\n",
        );
        let store = Store::open(dir.path().join("ds").to_str().unwrap()).unwrap();
        let opts = PrepareOptions {
            val_fraction: 0.0,
            ..Default::default()
        };
        let index = prepare(&[p], &tok(), &store, &opts).unwrap();
        let train = index.load_split(&store, &index.train).unwrap();
        let (_, mask) = train.read_all().unwrap();
        assert_eq!(train.num_docs(), 2);
        assert_eq!(mask[..5], [0, 0, 1, 1, 1]); // + eos
        let marker_end = 5 + "Q ### Response:".len();
        assert!(mask[5..marker_end].iter().all(|&m| m == 0));
        assert!(mask[marker_end..].iter().all(|&m| m == 1));
        assert_eq!(mask.len(), marker_end + " A".len() + 1);
    }

    #[test]
    fn prepare_then_load_round_trips_and_splits() {
        let dir = tempfile::tempdir().unwrap();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let f = dir.path().join("t.txt");
        std::fs::write(&f, &text).unwrap();
        let tok = Tok::train(TokenizerKind::Byte, std::slice::from_ref(&text), 0).unwrap();
        let store = Store::open(dir.path().join("ds").to_str().unwrap()).unwrap();
        let opts = PrepareOptions {
            val_fraction: 0.1,
            shard_tokens: 500,
            ..Default::default()
        };
        let index = prepare(&[f], &tok, &store, &opts).unwrap();
        assert!(index.train.shards.len() > 1, "{:?}", index.train.shards);
        let (again, tok2) = TokenIndex::open(&store).unwrap();
        let train = again.load_split(&store, &again.train).unwrap();
        let val = again.load_split(&store, &again.validation).unwrap();
        // One file: its last 10 % of bytes (no newline to cut at) is validation, + EOS.
        assert_eq!(train.num_tokens(), 1620);
        assert_eq!(val.num_tokens(), 180 + 1);
        let (t, _) = train.read_all().unwrap();
        let (v, _) = val.read_all().unwrap();
        let joined: Vec<u32> = t.iter().chain(&v).copied().collect();
        assert_eq!(tok2.decode(&joined).unwrap(), text);
        let (ids, mask) = train.sample(1, 16, true, 0, false).unwrap();
        assert_eq!(ids, t[16..32]);
        assert!(mask.iter().all(|&m| m == 1.0));
        // Samples that straddle shard files read across them.
        let (ids, _) = train.sample(31, 16, true, 0, false).unwrap();
        assert_eq!(ids, t[496..512]);
        assert_eq!(
            again.fingerprint,
            Some(fingerprint(again.vocab_size, &[&train, &val]).unwrap())
        );
        // An unfinished dataset (no index) is refused.
        store.delete("index.json").unwrap();
        assert!(
            TokenIndex::open(&store)
                .unwrap_err()
                .to_string()
                .contains("no index.json")
        );
    }

    #[test]
    fn chunked_bpe_tokens_equal_the_whole_file_encoded_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\
                    It is the east, and Juliet is the sun.\n\n  JULIET:\nAy me!\n"
            .repeat(50);
        let f = write(dir.path(), "play.txt", text.as_bytes());
        let tok = Tok::train(TokenizerKind::Bpe, std::slice::from_ref(&text), 300).unwrap();
        let store = Store::open(dir.path().join("ds").to_str().unwrap()).unwrap();
        let opts = PrepareOptions {
            val_fraction: 0.0,
            chunk_bytes: 64,
            ..Default::default()
        };
        let index = prepare(&[f], &tok, &store, &opts).unwrap();
        let (ids, _) = index
            .load_split(&store, &index.train)
            .unwrap()
            .read_all()
            .unwrap();
        let mut whole = tok.encode(&text, false).unwrap();
        whole.extend(tok.eos_id());
        assert_eq!(ids, whole);
    }

    #[test]
    fn a_failure_midway_removes_the_shards_already_written() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.txt", "good text\n".repeat(200).as_bytes());
        let b = write(dir.path(), "b.txt", b"fine for now\n");
        let out_dir = dir.path().join("ds");
        let store = Store::open(out_dir.to_str().unwrap()).unwrap();
        let opts = PrepareOptions {
            val_fraction: 0.0,
            shard_tokens: 100,
            chunk_bytes: 64,
            ..Default::default()
        };
        let scan = source::scan(&[a, b.clone()], None).unwrap();
        // The file changes after the check: tokenizing it fails after a.txt's shards exist.
        std::fs::write(&b, b"caf\xe9\n").unwrap();
        let e = prepare_scanned(&scan, &tok(), &store, &opts)
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.txt:1: not valid UTF-8"), "{e}");
        assert!(store.list("").unwrap().is_empty(), "{:?}", store.list(""));
    }

    #[test]
    fn document_offsets_outside_the_shard_are_refused_not_sliced() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.jsonl");
        std::fs::write(
            &f,
            "{\"text\": \"one doc\"}\n{\"text\": \"another doc\"}\n".repeat(20),
        )
        .unwrap();
        let tok = Tok::train(TokenizerKind::Byte, &["one another doc".into()], 0).unwrap();
        let store = Store::open(dir.path().join("ds").to_str().unwrap()).unwrap();
        let index = prepare(&[f], &tok, &store, &PrepareOptions::default()).unwrap();
        let stem = &index.train.shards[0].stem;
        let docs = store.get(&format!("{stem}.docs")).unwrap().unwrap();
        // The second offset points far past the shard's tokens.
        let mut bad = docs.to_vec();
        bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        store
            .put(&format!("{stem}.docs"), Bytes::from(bad))
            .unwrap();
        let (again, _) = TokenIndex::open(&store).unwrap();
        let e = again
            .load_split(&store, &again.train)
            .unwrap_err()
            .to_string();
        assert!(e.contains("document offsets must rise"), "{e}");
    }
}
