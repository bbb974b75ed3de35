//! The inputs of `data prepare`, read in bounded memory: text files as chunks, JSONL files
//! record by record, a first pass that checks every input and counts its documents before
//! anything is written, and an evenly spread sample of the inputs for tokenizer training.
//!
//! A text chunk ends just after a newline that has a printable ASCII character on both
//! sides (`x\nY`). Byte-level BPE (GPT-2's pre-tokenizer, and what `data prepare` trains)
//! always splits there, so tokenizing chunk by chunk gives exactly the tokens of the whole
//! file. A chunk with no such newline (a very long line) ends at a character boundary.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::error::DataError;

/// Bytes a text chunk holds at most (tokenized as one piece).
pub const CHUNK_BYTES: usize = 256 << 10;

/// One input file, as the first pass found it.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub jsonl: bool,
    pub bytes: u64,
    /// Documents: 1 for a text file, its records for JSONL.
    pub docs: u64,
}

/// Every input, checked.
#[derive(Debug, Clone)]
pub struct Scan {
    pub files: Vec<InputFile>,
    pub docs: u64,
    pub bytes: u64,
}

/// A JSONL record's text, as (text, loss flag) parts: a prompt (0) and a response (1).
pub type Record = Vec<(String, u8)>;

fn file_error(path: &Path, msg: impl Into<String>) -> DataError {
    DataError::File {
        file: path.display().to_string(),
        msg: msg.into(),
    }
}

pub fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("ndjson")
    )
}

fn open(path: &Path) -> Result<File, DataError> {
    File::open(path).map_err(|e| file_error(path, e.to_string()))
}

fn not_utf8(path: &Path, line: usize, at: u64) -> DataError {
    DataError::Line {
        file: path.display().to_string(),
        line,
        msg: format!(
            "not valid UTF-8 (byte offset {at}); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ),
    }
}

/// Read a small file whole as UTF-8, naming the line of the first invalid byte.
pub fn read_utf8(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        not_utf8(path, line, at as u64)
    })
}

/// A text file as a sequence of chunks of at most `max` bytes, each with its byte offset.
/// A chunk never crosses `stop_at`: it ends there exactly (pass a cut point, see
/// [`val_cut`]).
pub struct TextChunks {
    path: PathBuf,
    file: File,
    carry: Vec<u8>,
    /// File offset of `carry[0]`, and the lines before it.
    offset: u64,
    line: usize,
    eof: bool,
    max: usize,
    stop_at: Option<u64>,
}

fn word_byte(b: u8) -> bool {
    b.is_ascii_graphic()
}

/// The last cut point `p <= limit` in `buf` (`buf[p-1]` is a newline between printable
/// ASCII bytes), if any.
fn last_cut(buf: &[u8], limit: usize) -> Option<usize> {
    let limit = limit.min(buf.len().saturating_sub(1));
    (2..=limit)
        .rev()
        .find(|&p| buf[p - 1] == b'\n' && word_byte(buf[p - 2]) && word_byte(buf[p]))
}

/// The first cut point `p >= from` in `buf`, if any.
fn first_cut(buf: &[u8], from: usize) -> Option<usize> {
    (from.max(2)..buf.len())
        .find(|&p| buf[p - 1] == b'\n' && word_byte(buf[p - 2]) && word_byte(buf[p]))
}

/// `p` moved back to the start of a UTF-8 character.
fn char_start(buf: &[u8], mut p: usize) -> usize {
    while p > 0 && p < buf.len() && buf[p] & 0xC0 == 0x80 {
        p -= 1;
    }
    p
}

impl TextChunks {
    pub fn open(path: &Path, max: usize, stop_at: Option<u64>) -> Result<Self, DataError> {
        Ok(Self {
            path: path.to_path_buf(),
            file: open(path)?,
            carry: Vec::new(),
            offset: 0,
            line: 0,
            eof: false,
            max: max.max(4),
            stop_at,
        })
    }

    fn fill(&mut self) -> Result<(), DataError> {
        // One byte past `max`, to see what follows a cut at `max`.
        let want = self.max + 1;
        while self.carry.len() < want && !self.eof {
            let have = self.carry.len();
            self.carry.resize(want, 0);
            let n = self
                .file
                .read(&mut self.carry[have..])
                .map_err(|e| file_error(&self.path, e.to_string()))?;
            self.carry.truncate(have + n);
            self.eof = n == 0;
        }
        Ok(())
    }

    fn next_chunk(&mut self) -> Result<Option<(u64, String)>, DataError> {
        self.fill()?;
        if self.carry.is_empty() {
            return Ok(None);
        }
        let stop = self
            .stop_at
            .filter(|&s| s > self.offset)
            .map(|s| (s - self.offset) as usize)
            .filter(|&s| s <= self.max && s < self.carry.len());
        let cut = match stop {
            Some(s) => s,
            None if self.carry.len() <= self.max => self.carry.len(),
            None => last_cut(&self.carry, self.max)
                .unwrap_or_else(|| char_start(&self.carry, self.max).max(1)),
        };
        let bytes: Vec<u8> = self.carry.drain(..cut).collect();
        let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = self.line + e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count();
            not_utf8(&self.path, line + 1, self.offset + at as u64)
        })?;
        let start = self.offset;
        self.offset += cut as u64;
        self.line += newlines;
        Ok(Some((start, text)))
    }
}

impl Iterator for TextChunks {
    type Item = Result<(u64, String), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().transpose()
    }
}

/// Where a text file's validation tail starts: the first cut point at or after the last
/// `fraction` of its bytes (the end of the file for `fraction == 0`).
pub fn val_cut(path: &Path, bytes: u64, fraction: f64) -> Result<u64, DataError> {
    let target = bytes - ((bytes as f64 * fraction).round() as u64).min(bytes);
    if target == 0 || target >= bytes {
        return Ok(target);
    }
    let mut f = open(path)?;
    let back = target.min(2);
    f.seek(SeekFrom::Start(target - back))
        .map_err(|e| file_error(path, e.to_string()))?;
    let mut buf = Vec::new();
    f.take(64 << 10)
        .read_to_end(&mut buf)
        .map_err(|e| file_error(path, e.to_string()))?;
    let at = first_cut(&buf, back as usize).unwrap_or_else(|| {
        // No newline near: the next character boundary.
        let mut p = back as usize;
        while p < buf.len() && buf[p] & 0xC0 == 0x80 {
            p += 1;
        }
        p
    });
    Ok((target - back + at as u64).min(bytes))
}

/// A JSONL file's records, with their line numbers (blank lines skipped).
pub struct JsonlRecords {
    path: PathBuf,
    reader: BufReader<File>,
    line: usize,
    offset: u64,
    buf: Vec<u8>,
    marker: Option<String>,
}

impl JsonlRecords {
    pub fn open(path: &Path, marker: Option<&str>) -> Result<Self, DataError> {
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, open(path)?),
            line: 0,
            offset: 0,
            buf: Vec::new(),
            marker: marker.map(str::to_string),
        })
    }

    fn next_record(&mut self) -> Result<Option<(usize, Record)>, DataError> {
        loop {
            self.buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| file_error(&self.path, e.to_string()))?;
            if n == 0 {
                return Ok(None);
            }
            self.line += 1;
            let line_start = self.offset;
            self.offset += n as u64;
            let text = std::str::from_utf8(&self.buf).map_err(|e| {
                not_utf8(&self.path, self.line, line_start + e.valid_up_to() as u64)
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let record =
                parse_record(text, self.marker.as_deref()).map_err(|msg| DataError::Line {
                    file: self.path.display().to_string(),
                    line: self.line,
                    msg,
                })?;
            return Ok(Some((self.line, record)));
        }
    }
}

impl Iterator for JsonlRecords {
    type Item = Result<(usize, Record), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// One JSONL line: `{"text"}` (the loss starts after `marker` when it is there) or
/// `{"prompt", "completion"}`.
pub fn parse_record(line: &str, marker: Option<&str>) -> Result<Record, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let field = |k: &str| -> Result<Option<&str>, String> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("field {k:?} must be a string")),
        }
    };
    let parts = match (field("text")?, field("prompt")?, field("completion")?) {
        (Some(t), _, _) => match marker.and_then(|m| t.find(m).map(|at| at + m.len())) {
            Some(split) => vec![(t[..split].to_string(), 0), (t[split..].to_string(), 1)],
            None => vec![(t.to_string(), 1)],
        },
        (None, Some(p), Some(c)) => vec![(p.to_string(), 0), (c.to_string(), 1)],
        (None, Some(_), None) => return Err("record has \"prompt\" but no \"completion\"".into()),
        (None, None, Some(_)) => return Err("record has \"completion\" but no \"prompt\"".into()),
        (None, None, None) => {
            return Err("record needs a \"text\" field, or \"prompt\" and \"completion\"".into());
        }
    };
    if parts.iter().all(|(t, _)| t.is_empty()) {
        return Err("record tokenizes to nothing".into());
    }
    Ok(parts)
}

/// Expand folders (recursively, sorted) into files.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut stack = vec![p.clone()];
            while let Some(d) = stack.pop() {
                let rd = std::fs::read_dir(&d).map_err(|e| file_error(&d, e.to_string()))?;
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
            return Err(file_error(p, "no such file or folder"));
        }
    }
    files.sort();
    if files.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::NoInputs(names.join(", ")));
    }
    Ok(files)
}

/// The first pass: every input is read once (UTF-8, JSON and record fields checked) and its
/// documents counted, so a bad input fails before anything is written.
pub fn scan(inputs: &[PathBuf], marker: Option<&str>) -> Result<Scan, DataError> {
    let mut files = Vec::new();
    for path in collect_inputs(inputs)? {
        let bytes = std::fs::metadata(&path)
            .map_err(|e| file_error(&path, e.to_string()))?
            .len();
        let jsonl = is_jsonl(&path);
        let docs = if jsonl {
            let mut n = 0u64;
            for r in JsonlRecords::open(&path, marker)? {
                r?;
                n += 1;
            }
            if n == 0 {
                return Err(file_error(&path, "has no records"));
            }
            n
        } else {
            let mut blank = true;
            for c in TextChunks::open(&path, 4 << 20, None)? {
                blank &= c?.1.trim().is_empty();
            }
            if blank {
                return Err(file_error(
                    &path,
                    "is empty; remove it or give it some text",
                ));
            }
            1
        };
        files.push(InputFile {
            path,
            jsonl,
            bytes,
            docs,
        });
    }
    Ok(Scan {
        docs: files.iter().map(|f| f.docs).sum(),
        bytes: files.iter().map(|f| f.bytes).sum(),
        files,
    })
}

/// Window of a sample read from one place in a file.
const WINDOW: u64 = 1 << 20;

/// Whole lines of `path` from about `start`, about `len` bytes (lossy UTF-8; the first pass
/// checked the file).
fn window(path: &Path, start: u64, len: u64) -> Result<String, DataError> {
    let mut f = open(path)?;
    f.seek(SeekFrom::Start(start))
        .map_err(|e| file_error(path, e.to_string()))?;
    let mut buf = Vec::new();
    f.take(len)
        .read_to_end(&mut buf)
        .map_err(|e| file_error(path, e.to_string()))?;
    let from = if start == 0 {
        0
    } else {
        buf.iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |p| p + 1)
    };
    let to = if (buf.len() as u64) < len {
        buf.len()
    } else {
        buf.iter()
            .rposition(|&b| b == b'\n')
            .map_or(buf.len(), |p| p + 1)
    };
    Ok(String::from_utf8_lossy(&buf[from..to.max(from)]).into_owned())
}

/// About `budget` bytes of the inputs for tokenizer training (all of them when they are
/// smaller): each file gives its share, as windows spread evenly through it. JSONL
/// records give their text fields. Streams: one window in memory at a time.
pub fn sample<'a>(
    scan: &'a Scan,
    budget: u64,
    marker: Option<&'a str>,
) -> impl Iterator<Item = Result<String, DataError>> + Send + 'a {
    let scale = (budget as f64 / scan.bytes.max(1) as f64).min(1.0);
    scan.files.iter().flat_map(move |f| {
        let share = ((f.bytes as f64 * scale).ceil() as u64).min(f.bytes);
        let windows = share.div_ceil(WINDOW).max(1);
        let len = if windows == 1 { share } else { WINDOW };
        let stride = f.bytes / windows;
        (0..windows).flat_map(move |w| {
            let texts = window(&f.path, w * stride, len).map(|text| {
                if !f.jsonl {
                    return vec![text];
                }
                text.lines()
                    .filter_map(|l| parse_record(l, marker).ok())
                    .flat_map(|r| r.into_iter().map(|(t, _)| t))
                    .collect()
            });
            match texts {
                Ok(t) => t.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cut_between_words_and_rejoin_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.txt");
        let text = "First line here.\nSecond  line\n\n  indented\nlast é line\nand more words\n"
            .repeat(30);
        std::fs::write(&p, &text).unwrap();
        let chunks: Vec<(u64, String)> = TextChunks::open(&p, 50, None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(chunks.len() > 30);
        let mut at = 0u64;
        for (start, c) in &chunks {
            assert_eq!(*start, at);
            assert!(c.len() <= 50);
            at += c.len() as u64;
        }
        let joined: String = chunks.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(joined, text);
        // Every chunk but the last ends at a "x\nY" cut.
        for (start, c) in &chunks[..chunks.len() - 1] {
            let end = (*start as usize) + c.len();
            let b = text.as_bytes();
            assert_eq!(b[end - 1], b'\n', "{c:?}");
            assert!(b[end - 2].is_ascii_graphic() && b[end].is_ascii_graphic());
        }
        // A stop point is honoured exactly.
        let cut = val_cut(&p, text.len() as u64, 0.1).unwrap();
        assert!(cut >= text.len() as u64 * 9 / 10);
        let starts: Vec<u64> = TextChunks::open(&p, 50, Some(cut))
            .unwrap()
            .map(|c| c.unwrap().0)
            .collect();
        assert!(starts.contains(&cut));
    }

    #[test]
    fn bad_utf8_names_the_line_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.txt");
        std::fs::write(&p, b"one\ntwo\nthr\xe9e\nfour\n").unwrap();
        let e = TextChunks::open(&p, 6, None)
            .unwrap()
            .find_map(Result::err)
            .unwrap()
            .to_string();
        assert!(
            e.contains("l.txt:3: not valid UTF-8 (byte offset 11)"),
            "{e}"
        );
    }

    #[test]
    fn the_sample_spreads_over_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let line = "alpha beta gamma delta\n";
        std::fs::write(&a, line.repeat(200_000)).unwrap(); // 4.6 MB
        let b = dir.path().join("b.jsonl");
        std::fs::write(&b, "{\"text\": \"omega psi\"}\n".repeat(1000)).unwrap();
        let s = scan(&[a, b], None).unwrap();
        assert_eq!(s.docs, 1001);
        let texts: Vec<String> = sample(&s, 2 << 20, None).collect::<Result<_, _>>().unwrap();
        let bytes: usize = texts.iter().map(String::len).sum();
        assert!((1 << 20..=3 << 20).contains(&bytes), "{bytes}");
        assert!(
            texts
                .iter()
                .all(|t| t.is_empty() || t.starts_with("alpha") || t == "omega psi")
        );
        assert!(
            texts.iter().any(|t| t == "omega psi"),
            "JSONL gives its text fields"
        );
    }
}
