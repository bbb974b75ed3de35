//! `stackwise data prepare`: text files, folders or JSONL (`text`, or `prompt` + `completion`)
//! → token shards (`<split>-NNNNN.bin` u32 tokens, `.mask` u8 loss flags, `.docs` u64 document
//! offsets) plus `index.json`, written last: a folder without `index.json` is not a dataset.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde_json::Value;

use super::dataset::{ShardInfo, SplitIndex, TokenIndex, unigram_entropy};
use super::error::DataError;
use crate::store::Store;
use crate::tokenizer::Tok;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Fraction of the data held out for validation.
    pub val_fraction: f64,
    /// In JSONL `text` records, tokens after this marker are the response (SFT loss mask).
    pub response_marker: Option<String>,
    /// Tokens per shard file.
    pub shard_tokens: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            val_fraction: 0.05,
            response_marker: Some("### Response:".into()),
            shard_tokens: 1 << 26,
        }
    }
}

/// A tokenized document: ids and per-token loss flags.
#[derive(Debug, Clone, Default)]
pub struct Doc {
    pub tokens: Vec<u32>,
    pub mask: Vec<u8>,
}

impl Doc {
    fn push(&mut self, ids: &[u32], flag: u8) {
        self.tokens.extend_from_slice(ids);
        self.mask.extend(std::iter::repeat_n(flag, ids.len()));
    }
}

/// Expand folders (recursively, sorted) into files.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut stack = vec![p.clone()];
            while let Some(d) = stack.pop() {
                let rd = std::fs::read_dir(&d).map_err(|e| DataError::File {
                    file: d.display().to_string(),
                    msg: e.to_string(),
                })?;
                for e in rd.flatten() {
                    let path = e.path();
                    let hidden = path
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
                    if hidden {
                        continue;
                    } else if path.is_dir() {
                        stack.push(path);
                    } else {
                        files.push(path);
                    }
                }
            }
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(DataError::File {
                file: p.display().to_string(),
                msg: "no such file or folder".into(),
            });
        }
    }
    files.sort();
    if files.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::NoInputs(names.join(", ")));
    }
    Ok(files)
}

/// Read a file as UTF-8, naming the line of the first invalid byte.
pub fn read_utf8(path: &Path) -> Result<String, DataError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| DataError::File {
        file: file.clone(),
        msg: e.to_string(),
    })?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        DataError::Line { file, line, msg: format!("not valid UTF-8 (byte offset {at}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") }
    })
}

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("ndjson")
    )
}

/// Tokenize one input file into documents.
pub fn tokenize_file(path: &Path, tok: &Tok, opts: &PrepareOptions) -> Result<Vec<Doc>, DataError> {
    let file = path.display().to_string();
    let text = read_utf8(path)?;
    if text.trim().is_empty() {
        return Err(DataError::File {
            file,
            msg: "is empty; remove it or give it some text".into(),
        });
    }
    let eos = tok.eos_id();
    let finish = |mut d: Doc| {
        if let Some(e) = eos {
            d.push(&[e], 1);
        }
        d
    };
    if !is_jsonl(path) {
        let mut d = Doc::default();
        d.push(&tok.encode(&text, false)?, 1);
        return Ok(vec![finish(d)]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| DataError::Line {
            file: file.clone(),
            line: line_no,
            msg,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let field = |k: &str| -> Result<Option<&str>, DataError> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(err(format!("field {k:?} must be a string"))),
            }
        };
        let mut d = Doc::default();
        match (field("text")?, field("prompt")?, field("completion")?) {
            (Some(t), _, _) => match opts
                .response_marker
                .as_deref()
                .and_then(|m| t.find(m).map(|at| at + m.len()))
            {
                Some(split) => {
                    d.push(&tok.encode(&t[..split], false)?, 0);
                    d.push(&tok.encode(&t[split..], false)?, 1);
                }
                None => d.push(&tok.encode(t, false)?, 1),
            },
            (None, Some(p), Some(c)) => {
                d.push(&tok.encode(p, false)?, 0);
                d.push(&tok.encode(c, false)?, 1);
            }
            (None, Some(_), None) => {
                return Err(err("record has \"prompt\" but no \"completion\"".into()));
            }
            (None, None, Some(_)) => {
                return Err(err("record has \"completion\" but no \"prompt\"".into()));
            }
            (None, None, None) => {
                return Err(err(
                    "record needs a \"text\" field, or \"prompt\" and \"completion\"".into(),
                ));
            }
        }
        if d.tokens.is_empty() {
            return Err(err("record tokenizes to nothing".into()));
        }
        docs.push(finish(d));
    }
    if docs.is_empty() {
        return Err(DataError::File {
            file,
            msg: "has no records".into(),
        });
    }
    Ok(docs)
}

/// Split documents into train / validation. JSONL records: every k-th record (k = 1/fraction);
/// a single long document (a text file): its last `fraction` of tokens.
pub fn split_docs(docs: Vec<Doc>, frac: f64) -> (Vec<Doc>, Vec<Doc>) {
    if frac <= 0.0 {
        return (docs, vec![]);
    }
    if docs.len() >= 20 {
        let k = (1.0 / frac).round().max(2.0) as usize;
        let (mut train, mut val) = (vec![], vec![]);
        for (i, d) in docs.into_iter().enumerate() {
            if i % k == k - 1 {
                val.push(d)
            } else {
                train.push(d)
            }
        }
        return (train, val);
    }
    let (mut train, mut val) = (vec![], vec![]);
    for d in docs {
        let cut =
            d.tokens.len() - ((d.tokens.len() as f64 * frac).round() as usize).min(d.tokens.len());
        val.push(Doc {
            tokens: d.tokens[cut..].to_vec(),
            mask: d.mask[cut..].to_vec(),
        });
        train.push(Doc {
            tokens: d.tokens[..cut].to_vec(),
            mask: d.mask[..cut].to_vec(),
        });
    }
    (train, val)
}

fn write_split(
    store: &Store,
    name: &str,
    docs: &[Doc],
    shard_tokens: usize,
) -> Result<SplitIndex, DataError> {
    let mut shards = Vec::new();
    let mut i = 0;
    while i < docs.len() {
        let (mut toks, mut mask, mut offs) = (Vec::<u8>::new(), Vec::<u8>::new(), vec![0u64]);
        let mut n = 0usize;
        let mut n_docs = 0usize;
        while i < docs.len() && (n == 0 || n + docs[i].tokens.len() <= shard_tokens) {
            for t in &docs[i].tokens {
                toks.extend_from_slice(&t.to_le_bytes());
            }
            mask.extend_from_slice(&docs[i].mask);
            n += docs[i].tokens.len();
            offs.push(n as u64);
            n_docs += 1;
            i += 1;
        }
        let stem = format!("{name}-{:05}", shards.len());
        let docs_bytes: Vec<u8> = offs.iter().flat_map(|o| o.to_le_bytes()).collect();
        store.put(&format!("{stem}.bin"), Bytes::from(toks))?;
        store.put(&format!("{stem}.mask"), Bytes::from(mask))?;
        store.put(&format!("{stem}.docs"), Bytes::from(docs_bytes))?;
        shards.push(ShardInfo {
            stem,
            tokens: n as u64,
            docs: n_docs as u64,
        });
    }
    Ok(SplitIndex {
        tokens: shards.iter().map(|s| s.tokens).sum(),
        docs: shards.iter().map(|s| s.docs).sum(),
        shards,
    })
}

/// Tokenize `inputs` and write the dataset to `out`. Returns its index.
pub fn prepare(
    inputs: &[PathBuf],
    tok: &Tok,
    out: &Store,
    opts: &PrepareOptions,
) -> Result<TokenIndex, DataError> {
    let files = collect_inputs(inputs)?;
    let mut docs = Vec::new();
    for f in &files {
        docs.extend(tokenize_file(f, tok, opts)?);
        tracing::debug!(file = %f.display(), docs = docs.len(), "tokenized");
    }
    let (train, val) = split_docs(docs, opts.val_fraction);
    // Any earlier index goes first, so a crash below never leaves an old index over new shards.
    out.delete("index.json")?;
    out.put("tokenizer.json", Bytes::from(tok.to_json()?))?;
    let index = TokenIndex {
        format: 1,
        vocab_size: tok.vocab_size(),
        eos_id: tok.eos_id(),
        sources: files.iter().map(|f| f.display().to_string()).collect(),
        unigram_entropy: Some(unigram_entropy(
            train.iter().flat_map(|d| d.tokens.iter().copied()),
            tok.vocab_size(),
        )),
        train: write_split(out, "train", &train, opts.shard_tokens)?,
        validation: write_split(out, "validation", &val, opts.shard_tokens)?,
    };
    let json = serde_json::to_vec_pretty(&index).expect("index serializes");
    out.put("index.json", Bytes::from(json))?;
    Ok(index)
}

#[cfg(test)]
mod tests {
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
        let docs = tokenize_file(&p, &tok(), &PrepareOptions::default()).unwrap();
        assert_eq!(docs[0].mask, vec![0, 0, 1, 1, 1]); // + eos
        let marker_end = "Q ### Response:".len();
        assert!(docs[1].mask[..marker_end].iter().all(|&m| m == 0));
        assert!(docs[1].mask[marker_end..].iter().all(|&m| m == 1));
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
        assert!(!index.train.shards.is_empty());
        let (again, tok2) = TokenIndex::open(&store).unwrap();
        let train = again.load_split(&store, &again.train).unwrap();
        let val = again.load_split(&store, &again.validation).unwrap();
        let total = text.len() + 1; // bytes + eos
        assert_eq!(train.tokens.len() + val.tokens.len(), total);
        assert_eq!(val.tokens.len(), (total as f64 * 0.1).round() as usize);
        let joined: Vec<u32> = train.tokens.iter().chain(&val.tokens).copied().collect();
        assert_eq!(tok2.decode(&joined).unwrap(), text);
        let (ids, mask) = train.sample(1, 16, true, 0, false);
        assert_eq!(ids, train.tokens[16..32]);
        assert!(mask.iter().all(|&m| m == 1.0));
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
