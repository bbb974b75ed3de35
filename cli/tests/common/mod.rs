//! Helpers shared by the integration tests: the `stackwise` binary, a byte-level dataset
//! of part of Macbeth, and a guard that kills a child process when a test ends.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stackwise"));
    c.env("STACKWISE_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("STACKWISE_TOKEN");
    c
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run stackwise")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `stackwise launch CFG --workers N --no-progress EXTRA...`.
pub fn launch(cfg: &Path, workers: usize, extra: &[&str]) -> Command {
    let mut c = bin();
    c.arg("launch")
        .arg(cfg)
        .args(["--workers", &workers.to_string(), "--no-progress"])
        .args(extra);
    c
}

/// Run and assert success, showing stderr otherwise.
pub fn ok(cmd: &mut Command) -> Output {
    let o = run(cmd);
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// A byte-level dataset of the first `chars` characters of Macbeth in `dir/data`.
pub fn dataset(dir: &Path, chars: usize) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/macbeth.txt");
    let text = std::fs::read_to_string(src).unwrap();
    let corpus = dir.join("m.txt");
    std::fs::write(&corpus, &text[..chars.min(text.len())]).unwrap();
    let data = dir.join("data");
    ok(bin()
        .args(["data", "prepare"])
        .arg(&corpus)
        .arg("--out")
        .arg(&data)
        .args(["--train-tokenizer", "byte"]));
    data
}

/// A char-level tokenizer whose id `i` is the single character U+0100+i, so any id sequence
/// below 256 is spelled by a text that tokenizes back to exactly those ids.
pub fn identity_tokenizer_json(vocab: usize) -> String {
    let entries: Vec<String> = (0..vocab)
        .map(|i| {
            format!(
                "{}: {i}",
                serde_json::to_string(&char::from_u32(0x100 + i as u32).unwrap().to_string())
                    .unwrap()
            )
        })
        .collect();
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
        "pre_tokenizer":{{"type":"Split","pattern":{{"Regex":"(?s)."}},"behavior":"Isolated","invert":false}},
        "post_processor":null,"decoder":{{"type":"Fuse"}},
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"{}"}}}}"#,
        entries.join(","),
        char::from_u32(0x100).unwrap()
    )
}

/// The f32 tensors of a safetensors file, sorted by name.
pub fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The largest |a[i] - b[i]| of two equally long series (weights, per-step losses).
pub fn max_abs_diff<T: Into<f64> + Copy>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len(), "series of different lengths");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x.into() - y.into()).abs())
        .fold(0.0, f64::max)
}

/// Kills the process when the test ends, also when it panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `cmd` and wait (up to 2 minutes) for a stderr line containing `marker`; the rest
/// of stderr keeps coming on the returned channel.
pub fn start_until(
    mut cmd: Command,
    marker: &str,
) -> (KillOnDrop, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let child = KillOnDrop(child);
    let t = Instant::now();
    let mut seen = Vec::new();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no {marker:?} in:\n{}", seen.join("\n")));
        let hit = l.contains(marker);
        seen.push(l);
        if hit {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120));
    }
    (child, rx)
}

/// `GET path` over plain HTTP/1.1; asserts a 200 and returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// `dir/NAME.yaml`: a tiny model (d_model 32, 2 layers, 2 heads, 32 tokens) on `data`, its
/// run in `dir/out`, with `training` as the training section's fields (e.g. "steps: 6,
/// batch_size: 4").
pub fn tiny_job(dir: &Path, name: &str, data: &Path, training: &str) -> PathBuf {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "run: {{name: {name}, output: {}}}\nmodel: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}\n\
             data: {{path: {}}}\ntraining: {{{training}}}\n",
            dir.join("out").display(),
            data.display()
        ),
    )
    .unwrap();
    cfg
}

/// `stackwise launch CFG --workers 2 --no-progress --http-bind 127.0.0.1:0`, and the address
/// of its HTTP endpoint (dashboard, /metrics) from the line it prints. stderr keeps draining.
pub fn launch_with_http(cfg: &Path) -> (KillOnDrop, String) {
    let mut child = launch(cfg, 2, &["--http-bind", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let child = KillOnDrop(child);
    let addr = loop {
        let l = lines
            .next()
            .expect("launch printed no dashboard address")
            .unwrap();
        if let Some((_, rest)) = l.split_once("dashboard http://") {
            break rest.split('/').next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}
