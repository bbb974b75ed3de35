//! End-to-end tests of the `stackwise` binary: real processes, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;
use common::identity_tokenizer_json;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stackwise"));
    c.env("STACKWISE_LOG", "warn").env("RAYON_NUM_THREADS", "2");
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run stackwise");
    assert!(
        out.status.success(),
        "command failed: {cmd:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run stackwise");
    assert!(!out.status.success(), "expected failure: {cmd:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn eval_json_equals_pytorch_loss_on_the_reference_models() {
    for name in ["gpt2-tiny", "llama-tiny-gqa"] {
        let src = fixtures().join(name);
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("tokenizer.json"),
            identity_tokenizer_json(256),
        )
        .unwrap();
        let ids: Vec<Vec<u32>> =
            serde_json::from_str(&std::fs::read_to_string(src.join("input_ids.json")).unwrap())
                .unwrap();
        let text: String = ids
            .iter()
            .flatten()
            .map(|&i| char::from_u32(0x100 + i).unwrap())
            .collect();
        let data = dir.path().join("eval.txt");
        // Two blocks of 16, plus 5 tokens of an incomplete block that must be dropped.
        std::fs::write(&data, format!("{text}{}", "ĀāĂăĄ")).unwrap();
        let out = run_ok(
            bin()
                .args(["eval", "--model"])
                .arg(dir.path())
                .arg("--data")
                .arg(&data)
                .args(["--seq-len", "16", "--json"]),
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "exactly one JSON line: {stdout}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap())
                .unwrap();
        let want = expected["loss"].as_f64().unwrap();
        let got = v["loss"].as_f64().unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{name}: eval loss {got}, PyTorch {want}"
        );
        assert!((v["perplexity"].as_f64().unwrap() - want.exp()).abs() / want.exp() < 1e-4);
        assert_eq!(v["tokens"], 32);
        assert_eq!(v["blocks"], 2);
    }
}

fn write_corpus(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/macbeth.txt");
    let text = std::fs::read_to_string(src).unwrap();
    let p = dir.join("macbeth.txt");
    std::fs::write(&p, &text[..60_000]).unwrap();
    p
}

fn tiny_config(dir: &Path, data: &Path, steps: u32) -> PathBuf {
    let cfg = format!(
        "run: {{name: tiny, output: {out}, seed: 7}}
model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
data: {{path: {data}}}
training: {{steps: {steps}, batch_size: 4, lr: 3.0e-3, warmup_steps: 2, eval_every: 5, eval_batches: 2, checkpoint_every: 5, log_every: 5}}
",
        out = dir.display(),
        data = data.display()
    );
    let p = dir.join("tiny.yaml");
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn prepare_train_eval_generate_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let data = dir.path().join("data");
    run_ok(
        bin()
            .args(["data", "prepare"])
            .arg(&corpus)
            .arg("--out")
            .arg(&data)
            .args(["--vocab-size", "300"]),
    );
    assert!(data.join("index.json").exists() && data.join("tokenizer.json").exists());
    let cfg = tiny_config(dir.path(), &data, 10);
    // --set and STACKWISE_* overrides reach the config: 12 steps instead of 10.
    let out = run_ok(
        bin()
            .arg("train")
            .arg(&cfg)
            .args(["--set", "training.steps=12", "--json", "--no-progress"])
            .env("STACKWISE_TRAINING__LR", "2e-3"),
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["step"], 12);
    let run = dir.path().join("runs/tiny");
    let saved: String = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(saved.contains("lr: 0.002"), "{saved}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let recs: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        recs.iter().any(|r| r["val_loss"].is_f64()),
        "validation loss logged"
    );
    assert!(
        recs.iter()
            .all(|r| r["tokens_per_s"].as_f64().unwrap() > 0.0)
    );
    // A second plain `train` refuses to clobber the run.
    let err = run_err(bin().arg("train").arg(&cfg));
    assert!(
        err.contains("already has checkpoints") && err.contains("--resume"),
        "{err}"
    );

    // eval on the run folder (newest valid checkpoint).
    let out = run_ok(
        bin()
            .args(["eval", "--model"])
            .arg(&run)
            .arg("--data")
            .arg(&corpus)
            .args(["--seq-len", "32", "--json"]),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["loss"].as_f64().unwrap() < (300f64).ln(),
        "trained model beats uniform: {v}"
    );

    // Greedy generation: KV cache and full recompute give the same tokens.
    let sample = |extra: &[&str]| -> Value {
        let mut c = bin();
        c.args(["generate", "--model"]).arg(&run).args([
            "--prompt",
            "MACBETH.",
            "--greedy",
            "--max-new-tokens",
            "20",
            "--json",
        ]);
        c.args(extra);
        serde_json::from_slice(&run_ok(&mut c).stdout).unwrap()
    };
    let cached = sample(&[]);
    let uncached = sample(&["--no-cache"]);
    assert_eq!(cached["tokens"], uncached["tokens"]);
    assert_eq!(cached["tokens"].as_array().unwrap().len(), 20);
}

/// A byte-tokenized dataset of the corpus in `dir/data`; returns a 5-step config for it.
fn byte_dataset_and_config(dir: &Path) -> PathBuf {
    let corpus = write_corpus(dir);
    let data = dir.join("data");
    run_ok(
        bin()
            .args(["data", "prepare"])
            .arg(&corpus)
            .arg("--out")
            .arg(&data)
            .args(["--train-tokenizer", "byte"]),
    );
    tiny_config(dir, &data, 5)
}

#[test]
fn bad_configs_name_the_field_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = byte_dataset_and_config(dir.path());
    let err = run_err(bin().arg("train").arg(&cfg).args([
        "--set",
        "model.d_model=30",
        "--set",
        "model.n_heads=4",
    ]));
    assert!(
        err.contains("n_heads (4) must divide d_model (30)") && err.contains("try n_heads ="),
        "{err}"
    );
    for (set, want) in [
        ("training.lrr=1", "unknown field `lrr`"),
        ("training.warmup_steps=50", "training.warmup_steps"),
        ("data.path=/nonexistent/data", "no index.json"),
    ] {
        let err = run_err(bin().arg("train").arg(&cfg).args(["--set", set]));
        assert!(err.contains(want), "--set {set}: {err}");
    }
    // Non-UTF-8 input to data prepare names the file and line.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine\nfine\n\xff\xfe broken\n").unwrap();
    let err = run_err(
        bin()
            .args(["data", "prepare"])
            .arg(&bad)
            .arg("--out")
            .arg(dir.path().join("d2")),
    );
    assert!(err.contains("bad.txt:3: not valid UTF-8"), "{err}");
    assert!(!dir.path().join("d2/index.json").exists());
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        &["train"][..],
        &["data", "prepare"],
        &["tokenizer", "train"],
        &["eval"],
        &["generate"],
        &["quickstart"],
        &["launch"],
        &["coordinator"],
        &["worker"],
        &["status"],
        &["selfcheck"],
        &["bench", "train"],
        &["bench", "generate"],
    ] {
        let out = run_ok(bin().args(sub).arg("--help"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{sub:?}"
        );
    }
}

#[test]
fn a_checkpoint_folder_loads_only_when_its_manifest_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = byte_dataset_and_config(dir.path());
    run_ok(bin().arg("train").arg(&cfg).arg("--no-progress"));
    let ck = dir.path().join("runs/tiny/checkpoints/step-00000005");
    let sample = |model: &Path| {
        bin()
            .args(["generate", "--model"])
            .arg(model)
            .args(["--prompt", "A", "--max-new-tokens", "3"])
            .output()
            .unwrap()
    };
    assert!(sample(&ck).status.success());
    // One byte changed in the weights: refused, naming the file.
    let weights = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    let out = sample(&ck);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model.safetensors: sha256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No manifest: a torn save, refused.
    std::fs::remove_file(ck.join("MANIFEST.json")).unwrap();
    let out = sample(&ck);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("torn save"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn eval_with_a_peft_lora_adapter_and_its_merge_give_peft_loss() {
    let src = fixtures().join("gpt2-tiny-lora");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), base.join(f)).unwrap();
    }
    std::fs::write(base.join("tokenizer.json"), identity_tokenizer_json(256)).unwrap();
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(src.join("input_ids.json")).unwrap())
            .unwrap();
    let text: String = ids
        .iter()
        .flatten()
        .map(|&i| char::from_u32(0x100 + i).unwrap())
        .collect();
    let data = dir.path().join("eval.txt");
    std::fs::write(&data, text).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    let want = expected["loss"].as_f64().unwrap();
    let eval = |model: &Path, adapter: Option<&Path>| -> f64 {
        let mut c = bin();
        c.args(["eval", "--model"])
            .arg(model)
            .arg("--data")
            .arg(&data);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        let out = run_ok(c.args(["--seq-len", "16", "--json"]));
        let v: Value = serde_json::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let adapted = eval(&base, Some(&src));
    assert!(
        ((adapted - want) / want).abs() < 1e-5,
        "eval --adapter {adapted}, PEFT {want}"
    );
    let plain = eval(&base, None);
    assert!(
        (plain - expected["base_loss"].as_f64().unwrap()).abs() < 1e-4,
        "{plain}"
    );

    let merged = dir.path().join("merged");
    run_ok(
        bin()
            .args(["adapter", "merge", "--model"])
            .arg(&base)
            .arg("--adapter")
            .arg(&src)
            .arg("--out")
            .arg(&merged),
    );
    let m = eval(&merged, None);
    assert!(
        ((m - want) / want).abs() < 1e-5,
        "merged model {m}, PEFT {want}"
    );
    let out = run_ok(bin().args(["adapter", "inspect", "--json"]).arg(&src));
    let v: Value = serde_json::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["r"].as_u64()),
        (Some("lora"), Some(4))
    );
    assert_eq!(v["modules"].as_array().unwrap().len(), 6);
    // 2 blocks x (c_attn 4x(64+192) + attn.c_proj 4x(64+64) + mlp.c_proj 4x(256+64)).
    assert_eq!(v["trainable_parameters"], 2 * (1024 + 512 + 1280));
}

#[test]
fn eval_with_a_peft_boft_adapter_gives_peft_loss() {
    let src = fixtures().join("llama-tiny-boft");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer.json"),
        identity_tokenizer_json(256),
    )
    .unwrap();
    let ids: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(src.join("input_ids.json")).unwrap())
            .unwrap();
    let text: String = ids
        .iter()
        .flatten()
        .map(|&i| char::from_u32(0x100 + i).unwrap())
        .collect();
    let data = dir.path().join("eval.txt");
    std::fs::write(&data, text).unwrap();
    let out = run_ok(
        bin()
            .args(["eval", "--model"])
            .arg(dir.path())
            .arg("--adapter")
            .arg(&src)
            .arg("--data")
            .arg(&data)
            .args(["--seq-len", "16", "--json", "--no-special-tokens"]),
    );
    let v: Value = serde_json::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("expected.json")).unwrap()).unwrap();
    let (got, want) = (
        v["loss"].as_f64().unwrap(),
        expected["loss"].as_f64().unwrap(),
    );
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "eval --adapter (BOFT) {got}, PEFT {want}"
    );
    let out = run_ok(bin().args(["adapter", "inspect", "--json"]).arg(&src));
    let v: Value = serde_json::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["butterfly_factors"].as_u64()),
        (Some("boft"), Some(3))
    );
}

#[test]
fn a_sentencepiece_model_prepares_data_trains_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = write_corpus(dir.path());
    let data = dir.path().join("data");
    let spm = fixtures().join("sentencepiece/unigram.model");
    run_ok(
        bin()
            .args(["data", "prepare"])
            .arg(&corpus)
            .arg("--out")
            .arg(&data)
            .arg("--tokenizer")
            .arg(&spm),
    );
    let cfg = tiny_config(dir.path(), &data, 6);
    run_ok(bin().arg("train").arg(&cfg).arg("--no-progress"));
    let run = dir.path().join("runs/tiny");
    // The checkpoint's tokenizer.json is the SentencePiece pipeline: its vocabulary (400) and
    // its pieces in the sample.
    let tok: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-00000006/tokenizer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tok["model"]["type"], "Unigram");
    let out = run_ok(bin().args(["generate", "--model"]).arg(&run).args([
        "--prompt",
        "When shall we",
        "--max-new-tokens",
        "8",
        "--json",
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = v["tokens"].as_array().unwrap();
    assert!(
        tokens.len() == 8 && tokens.iter().all(|t| t.as_u64().unwrap() < 400),
        "{v}"
    );
    assert!(!v["text"].as_str().unwrap().trim().is_empty(), "{v}");
}

#[test]
fn selfcheck_passes_on_the_fixtures_and_fails_on_a_perturbed_model() {
    // f32: the CPU tolerances; bf16 autocast: bf16 products, visibly not f32, within bf16's.
    let out = run_ok(bin().args(["selfcheck", "--fixtures"]).arg(fixtures()));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["device"], "cpu");
    assert!(r["fixtures"].as_array().unwrap().len() >= 3, "{r}");
    let out = run_ok(
        bin()
            .args(["selfcheck", "--autocast", "bf16", "--fixtures"])
            .arg(fixtures()),
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let gpt2 = r["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "gpt2-tiny")
        .unwrap();
    let d = gpt2["logits_max_abs"].as_f64().unwrap();
    assert!(
        d > 1e-4 && d < 5e-2,
        "bf16 logits differ from PyTorch f32 by {d}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("gpt2-tiny");
    std::fs::create_dir(&bad).unwrap();
    for e in std::fs::read_dir(fixtures().join("gpt2-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let mut w =
        candle_core::safetensors::load(bad.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let key = "transformer.h.1.attn.c_proj.weight";
    let t = (w[key].clone() * 1.02).unwrap();
    w.insert(key.into(), t);
    candle_core::safetensors::save(&w, bad.join("model.safetensors")).unwrap();
    let err = run_err(bin().args(["selfcheck", "--fixtures"]).arg(dir.path()));
    assert!(
        err.contains("selfcheck failed") && err.contains("gpt2-tiny: logits"),
        "{err}"
    );
}

#[test]
fn bench_train_and_generate_print_one_json_line() {
    let out = run_ok(bin().args([
        "bench",
        "train",
        "--layers",
        "1",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--vocab",
        "64",
        "--seq",
        "16",
        "--batch",
        "2",
        "--steps",
        "2",
    ]));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["impl"], "stackwise");
    assert_eq!(r["all_s_per_step"].as_array().unwrap().len(), 2);
    assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // Random tokens over 64 ids: the loss starts near ln 64 = 4.16.
    let loss = r["last_loss"].as_f64().unwrap();
    assert!((3.0..5.5).contains(&loss), "{r}");

    let out = run_ok(
        bin()
            .args([
                "bench",
                "generate",
                "--new-tokens",
                "5",
                "--prompt-tokens",
                "3",
                "--rounds",
                "1",
                "--model",
            ])
            .arg(fixtures().join("gpt2-tiny")),
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["new_tokens"], 5, "{r}");
    assert!(
        r["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_u64().unwrap() < 256),
        "{r}"
    );
    let err = run_err(
        bin()
            .args(["bench", "generate", "--new-tokens", "300", "--model"])
            .arg(fixtures().join("gpt2-tiny")),
    );
    assert!(err.contains("exceed the model's 64 positions"), "{err}");
}

#[test]
fn training_with_bf16_autocast_follows_the_f32_run_closely_but_not_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = byte_dataset_and_config(dir.path());
    let losses = |name: &str, autocast: &str| -> Vec<f64> {
        let out = run_ok(bin().arg("train").arg(&cfg).args([
            "--set",
            &format!("run.name={name}"),
            "--set",
            &format!("training.autocast={autocast}"),
            "--set",
            "training.log_every=1",
            "--json",
            "--no-progress",
        ]));
        let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["step"], 5, "{summary}");
        let metrics =
            std::fs::read_to_string(dir.path().join(format!("runs/{name}/metrics.jsonl"))).unwrap();
        metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let f32_run = losses("f32", "off");
    let bf16_run = losses("bf16", "bf16");
    assert!(f32_run.len() >= 5, "{f32_run:?}");
    let worst = common::max_abs_diff(&f32_run, &bf16_run);
    assert!(
        worst > 1e-6 && worst < 2e-2,
        "bf16 losses {bf16_run:?} vs f32 {f32_run:?}"
    );
    let saved = std::fs::read_to_string(dir.path().join("runs/bf16/config.yaml")).unwrap();
    assert!(saved.contains("autocast: bf16"), "{saved}");
}
