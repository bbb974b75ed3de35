//! `stackwise serve` over real HTTP on 127.0.0.1: the tiny GPT-2 + LoRA fixture served as a
//! base and an adapter; results compared with `stackwise generate`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{KillOnDrop, bin, identity_tokenizer_json, ok};

/// The fixture's base (with a tokenizer) and its PEFT LoRA adapter folder.
fn fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-tiny-lora");
    let base = dir.join("tiny");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), base.join(f)).unwrap();
    }
    std::fs::write(base.join("tokenizer.json"), identity_tokenizer_json(256)).unwrap();
    (base, src)
}

/// A running server and its address.
struct Server {
    child: KillOnDrop,
    addr: String,
}

fn serve(base: &Path, extra: &[&str]) -> Server {
    let mut child: Child = bin()
        .arg("serve")
        .arg("--model")
        .arg(base)
        .args(["--bind", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines();
    let addr = loop {
        let l = lines.next().expect("serve exited").unwrap();
        if let Some(rest) = l.split("on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Server {
        child: KillOnDrop(child),
        addr,
    }
}

/// A response: status, headers (lower-case names) and the body (de-chunked).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

fn send(addr: &str, method: &str, path: &str, body: &[u8]) -> TcpStream {
    try_send(addr, method, path, body).unwrap()
}

fn try_send(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    Ok(s)
}

fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
        rest = &rest[eol + 2 + size + 2..];
    }
}

fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> Reply {
    try_request(addr, method, path, body).unwrap()
}

fn try_request(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<Reply> {
    let mut s = try_send(addr, method, path, body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let payload = &raw[split + 4..];
    let body = if chunked {
        dechunk(payload)
    } else {
        payload.to_vec()
    };
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    })
}

fn post(addr: &str, path: &str, body: &Value) -> Reply {
    request(addr, "POST", path, body.to_string().as_bytes())
}

/// `stackwise generate --greedy` on `prompt`: (tokens, text).
fn generate(base: &Path, adapter: Option<&Path>, prompt: &str, n: usize) -> (Vec<u64>, String) {
    generate_with(base, adapter, prompt, n, &["--greedy"])
}

fn generate_with(
    base: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    n: usize,
    extra: &[&str],
) -> (Vec<u64>, String) {
    let mut c = bin();
    c.args(["generate", "--model"]).arg(base);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let out = ok(c
        .args([
            "--prompt",
            prompt,
            "--max-new-tokens",
            &n.to_string(),
            "--json",
        ])
        .args(extra));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    (tokens, v["text"].as_str().unwrap().to_string())
}

/// Text spelled in the identity tokenizer's characters (id i = U+0100 + i).
fn spell(ids: &[u32]) -> String {
    ids.iter()
        .map(|&i| char::from_u32(0x100 + i).unwrap())
        .collect()
}

#[test]
fn completions_stream_and_adapters_equal_generate_and_bad_requests_get_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = fixture(dir.path());
    let adapter_arg = format!("lora={}", adapter.display());
    let s = serve(&base, &["--adapter", &adapter_arg, "--page-size", "16"]);
    let a = s.addr.as_str();
    let prompt = spell(&[10, 20, 30, 40, 50]);

    let models = request(a, "GET", "/v1/models", b"").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "lora"]);
    assert_eq!(request(a, "GET", "/health", b"").status, 200);

    // Greedy equals `stackwise generate --greedy`, token for token.
    let (tokens, text) = generate(&base, None, &prompt, 12);
    let g = post(
        a,
        "/generate",
        &json!({"prompt": prompt, "max_new_tokens": 12, "temperature": 0}),
    );
    assert_eq!(g.status, 200, "{}", g.body);
    let g = g.json();
    let served: Vec<u64> = g["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    assert_eq!(served, tokens);
    assert_eq!(g["text"], text.as_str());
    let c = post(
        a,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .json();
    assert_eq!(c["choices"][0]["text"], text.as_str());
    assert_eq!(c["usage"]["completion_tokens"], tokens.len());
    assert_eq!(c["object"], "text_completion");

    // The same, streamed: chunks that add up to it, usage, then [DONE].
    let st = post(
        a,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 12,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(st.status, 200);
    assert!(
        st.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let ev = st.events();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        tokens.len()
    );
    let gs = post(
        a,
        "/generate_stream",
        &json!({"prompt": prompt, "max_new_tokens": 12, "temperature": 0}),
    );
    let ids: Vec<u64> = gs
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).unwrap()["token"].as_u64())
        .collect();
    assert_eq!(ids, tokens);

    // Chat: the plain template, streamed or not.
    let chat_prompt = format!("user: {prompt}\nassistant:");
    let (_, chat_text) = generate(&base, None, &chat_prompt, 8);
    let ch = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8, "temperature": 0}),
    )
    .json();
    assert_eq!(ch["choices"][0]["message"]["content"], chat_text.as_str());
    let chs = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8, "temperature": 0, "stream": true}),
    );
    let deltas: String = chs
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(deltas, chat_text);

    // An adapter by name equals `generate --adapter`; the base is unaffected by it.
    let (lora_tokens, lora_text) = generate(&base, Some(&adapter), &prompt, 12);
    let l = post(
        a,
        "/v1/completions",
        &json!({"model": "lora", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    )
    .json();
    assert_eq!(l["choices"][0]["text"], lora_text.as_str());
    let _ = lora_tokens;

    // A seeded sample is reproducible and equals `generate --seed` (the same generator); the
    // adapter's sample differs from the base's, so the adapter is applied.
    let sampled = |model: &str| {
        post(
            a,
            "/v1/completions",
            &json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 7}),
        )
        .json()["choices"][0]["text"]
            .clone()
    };
    let flags = ["--temperature", "1", "--top-k", "0", "--seed", "7"];
    assert_eq!(sampled("tiny"), sampled("tiny"));
    assert_eq!(
        sampled("tiny"),
        generate_with(&base, None, &prompt, 12, &flags).1.as_str()
    );
    assert_eq!(
        sampled("lora"),
        generate_with(&base, Some(&adapter), &prompt, 12, &flags)
            .1
            .as_str()
    );
    assert_ne!(sampled("lora"), sampled("tiny"));

    // 8 concurrent greedy streams each equal the single one.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (a, prompt) = (s.addr.clone(), prompt.clone());
            std::thread::spawn(move || {
                let model = if i % 2 == 0 { "tiny" } else { "lora" };
                let r = post(
                    &a,
                    "/v1/completions",
                    &json!({"model": model, "prompt": prompt, "max_tokens": 12,
                    "temperature": 0, "stream": true}),
                );
                let text: String = r
                    .events()
                    .iter()
                    .filter(|e| *e != "[DONE]")
                    .filter_map(|e| {
                        serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect();
                (model, text)
            })
        })
        .collect();
    for h in handles {
        let (model, t) = h.join().unwrap();
        assert_eq!(
            t,
            *if model == "tiny" { &text } else { &lora_text },
            "{model}"
        );
    }

    // Bad input: 4xx naming the field or limit, never a 5xx.
    let bad = |path: &str, body: &[u8]| request(a, "POST", path, body);
    assert_eq!(bad("/v1/completions", b"{not json").status, 400);
    let wrong = bad(
        "/v1/completions",
        br#"{"model": "tiny", "prompt": "x", "max_tokens": "many"}"#,
    );
    assert_eq!(wrong.status, 422);
    assert!(wrong.body.contains("invalid type"), "{}", wrong.body);
    let empty = post(
        a,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "", "max_tokens": 4}),
    );
    assert_eq!(empty.status, 400);
    assert_eq!(empty.json()["error"]["param"], "prompt");
    let huge = post(
        a,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 1_000_000}),
    );
    assert_eq!(huge.status, 400);
    let msg = huge.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("prompt (5 tokens) + max_tokens (1,000,000) must be <= 64"),
        "{msg}"
    );
    let unknown = post(
        a,
        "/v1/completions",
        &json!({"model": "gpt-9", "prompt": prompt}),
    );
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("\\\"tiny\\\""), "{}", unknown.body);
    assert_eq!(
        post(
            a,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "n": 2})
        )
        .status,
        400
    );
    assert_eq!(
        post(
            a,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "temperature": -1})
        )
        .status,
        400
    );
    assert_eq!(
        post(
            a,
            "/generate",
            &json!({"prompt": prompt, "scaffold_weight": 0.5})
        )
        .status,
        400
    );
    // Too large: 413. The server may answer and close before it has read the whole body,
    // and then the client sees its connection reset instead of the answer (seen in CI).
    let big = vec![b' '; 2 << 20];
    match try_request(a, "POST", "/v1/completions", &big) {
        Ok(r) => assert_eq!(r.status, 413),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
    }
    let chat_empty = post(
        a,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": []}),
    );
    assert_eq!(chat_empty.status, 400);

    // /metrics is Prometheus text with the counters the requests moved.
    let m = request(a, "GET", "/metrics", b"").body;
    for name in [
        "stackwise_requests_total{route=\"/v1/completions\",status=\"200\"}",
        "stackwise_generation_tokens_total",
        "stackwise_time_to_first_token_seconds_bucket",
        "stackwise_inter_token_latency_seconds_count",
        "stackwise_kv_pages_free",
        "stackwise_num_requests_waiting",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    assert!(
        m.contains("stackwise_requests_total{route=\"/v1/completions\",status=\"404\"} 1"),
        "{m}"
    );
    assert!(m.trim_end().ends_with("# EOF"));
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[test]
fn a_disconnect_frees_its_pages_the_limit_answers_429_and_sigterm_lets_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = fixture(dir.path());
    let s = serve(
        &base,
        &[
            "--max-concurrent-requests",
            "1",
            "--page-size",
            "16",
            "--debug-step-delay-ms",
            "40",
        ],
    );
    let a = s.addr.as_str();
    let prompt = spell(&[1, 2, 3]);
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": true}).to_string();

    // A stream in flight holds ceil((3 + 40) / 16) = 3 pages, and the only request slot.
    let mut st = send(a, "POST", "/v1/completions", body.as_bytes());
    // Wait for its first token: the sequence is running.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("data:") {
        let mut buf = [0u8; 256];
        let n = st.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let m = request(a, "GET", "/metrics", b"").body;
    assert_eq!(gauge(&m, "stackwise_kv_pages_used"), 3.0);
    let busy = post(
        a,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 4}),
    );
    assert_eq!(busy.status, 429);
    assert_eq!(busy.header("retry-after"), Some("1"));

    // The client goes away: its sequence stops and its pages come back within a step or two.
    drop(st);
    let t = Instant::now();
    loop {
        let m = request(a, "GET", "/metrics", b"").body;
        if gauge(&m, "stackwise_kv_pages_used") == 0.0
            && gauge(&m, "stackwise_num_requests_running") == 0.0
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "pages not freed:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        post(
            a,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": prompt, "max_tokens": 2})
        )
        .status,
        200
    );

    // SIGTERM while a stream runs: it finishes ([DONE]) and the server exits cleanly.
    let a2 = s.addr.clone();
    let b2 = body.clone();
    let stream = std::thread::spawn(move || {
        let mut st = send(&a2, "POST", "/v1/completions", b2.as_bytes());
        let mut raw = Vec::new();
        st.read_to_end(&mut raw).unwrap();
        String::from_utf8_lossy(&raw).to_string()
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut child = s.child;
    // SAFETY: a plain kill(2) of the child we started.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let out = stream.join().unwrap();
    assert!(out.contains("[DONE]"), "{out}");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn sequences_batched_over_pages_each_equal_generate_and_generate_paged_equals_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = fixture(dir.path());
    // Pages of 4 positions: every sequence spans several, and the prompts differ in length.
    let s = serve(&base, &["--page-size", "4", "--debug-step-delay-ms", "5"]);
    let prompts: Vec<Vec<u32>> = [1usize, 3, 7, 12, 20, 2, 9, 5]
        .iter()
        .map(|&n| (0..n as u32).map(|i| (i * 37 + n as u32) % 256).collect())
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (a, prompt) = (s.addr.clone(), spell(p));
            std::thread::spawn(move || {
                // Half greedy, half sampled with a seed of their own.
                let body = if i % 2 == 0 {
                    json!({"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0})
                } else {
                    json!({"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": i})
                };
                let r = post(&a, "/v1/completions", &body);
                assert_eq!(r.status, 200, "{}", r.body);
                r.json()["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let served: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (p, got)) in prompts.iter().zip(&served).enumerate() {
        let seed = i.to_string();
        let flags: Vec<&str> = if i % 2 == 0 {
            vec!["--greedy"]
        } else {
            vec!["--temperature", "1", "--top-k", "0", "--seed", &seed]
        };
        let (_, want) = generate_with(&base, None, &spell(p), 16, &flags);
        assert_eq!(got, &want, "sequence {i} (prompt of {} tokens)", p.len());
    }
    // They ran packed: more than one sequence per forward pass on average.
    let m = request(&s.addr, "GET", "/metrics", b"").body;
    let batches = gauge(&m, "stackwise_engine_batches_total");
    let seqs = gauge(&m, "stackwise_engine_batched_sequences_total");
    assert!(
        seqs / batches > 1.5,
        "{seqs} sequences in {batches} batches"
    );
    assert_eq!(gauge(&m, "stackwise_kv_pages_used"), 0.0);

    // `generate --paged` (the original's demo flags, and pages of 4) equals the contiguous
    // cache token for token, and says what it used.
    let prompt = spell(&prompts[3]);
    let (want, _) = generate(&base, None, &prompt, 12);
    for flags in [
        &["--paged", "--page-size", "64", "--max-pages", "6"][..],
        &["--paged", "--page-size", "4", "--max-pages", "6"],
    ] {
        let mut all = vec!["--greedy"];
        all.extend_from_slice(flags);
        assert_eq!(
            generate_with(&base, None, &prompt, 12, &all).0,
            want,
            "{flags:?}"
        );
    }
    let out = ok(bin()
        .args(["generate", "--model"])
        .arg(&base)
        .args(["--prompt", &prompt, "--max-new-tokens", "4", "--greedy"])
        .args(["--paged", "--page-size", "4", "--max-pages", "6"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tok/s (paged KV cache, 6 pages of 4)"),
        "{err}"
    );
    // Too few pages for prompt + new tokens: a clear error, before any work.
    let small = bin()
        .args(["generate", "--model"])
        .arg(&base)
        .args(["--prompt", &prompt, "--max-new-tokens", "12", "--greedy"])
        .args(["--paged", "--page-size", "4", "--max-pages", "5"])
        .output()
        .unwrap();
    assert!(!small.status.success());
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(
        err.contains("24 positions need 6 pages of 4 tokens") && err.contains("--max-pages"),
        "{err}"
    );
}

#[test]
fn chat_uses_the_model_folders_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = fixture(dir.path());
    // Literal parts in the identity tokenizer's characters: Ā (id 0) ends a message, ā (id 1)
    // opens the reply; a system message is refused by the template itself.
    let template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}{{ m['content'] }}\u{100}{% endfor %}{% if add_generation_prompt %}\u{101}{% endif %}";
    std::fs::write(
        base.join("tokenizer_config.json"),
        json!({ "chat_template": template }).to_string(),
    )
    .unwrap();
    let s = serve(&base, &[]);
    let (a, b) = (spell(&[10, 20, 30]), spell(&[40, 50]));
    let (_, want) = generate(&base, None, &format!("{a}\u{100}{b}\u{100}\u{101}"), 8);
    let chat = |messages: Value| {
        post(
            &s.addr,
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}),
        )
    };
    let r = chat(json!([{"role": "user", "content": a}, {"role": "assistant", "content": b}]));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 8);
    let refused = chat(json!([{"role": "system", "content": a}]));
    assert_eq!(refused.status, 400);
    assert_eq!(refused.json()["error"]["message"], "no system messages");
}
