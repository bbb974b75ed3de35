//! Scaffold fusion end to end, through the binary: a frozen base (a tiny GPT-2 trained by
//! StackWise on random `a_i => b_j` pairs, so it cannot know any mapping) steered by a
//! LoRA-adapted scaffold (the tiny GPT-2 fixture) on a toy task, each prompt word mapped to a
//! fixed other word. The scaffold learns it; at `--scaffold-weight 0` the model is the base.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use stackwise_common::checkpoint::sha256_hex;

mod common;
use common::{bin, launch, max_abs_diff, ok, start_until, stderr, weights};

const WORDS: usize = 8;

/// The word each prompt word maps to (a fixed permutation).
const TARGET: [usize; WORDS] = [3, 1, 2, 7, 0, 4, 5, 6];

/// A word-level tokenizer over `=>`, `a0..a15`, `b0..b15` (id 0: `<|endoftext|>`).
fn word_tokenizer() -> String {
    let mut vocab = vec![
        "<|endoftext|>".to_string(),
        "<unk>".to_string(),
        "=>".to_string(),
    ];
    vocab.extend((0..16).map(|i| format!("a{i}")));
    vocab.extend((0..16).map(|i| format!("b{i}")));
    let entries: Vec<String> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| format!("\"{w}\": {i}"))
        .collect();
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,
        "added_tokens":[{{"id":0,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}],
        "normalizer":null,"pre_tokenizer":{{"type":"WhitespaceSplit"}},"post_processor":null,"decoder":null,
        "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"<unk>"}}}}"#,
        entries.join(",")
    )
}

struct Toy {
    /// The base: a checkpoint folder of a run trained on random pairs.
    base: PathBuf,
    /// The scaffold: the tiny GPT-2 fixture with the word tokenizer.
    scaffold: PathBuf,
    /// Prompt/completion pairs of the mapping, prepared (20 % validation).
    data: PathBuf,
}

fn prepare(inputs: &Path, tokenizer: &Path, out: &Path, val: &str) {
    ok(bin()
        .args(["data", "prepare"])
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .arg("--tokenizer")
        .arg(tokenizer)
        .args(["--val-fraction", val]));
}

fn toy(dir: &Path) -> Toy {
    let scaffold = dir.join("scaffold");
    std::fs::create_dir_all(&scaffold).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-tiny");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), scaffold.join(f)).unwrap();
    }
    let tok = scaffold.join("tokenizer.json");
    std::fs::write(&tok, word_tokenizer()).unwrap();

    // Random pairs: the base learns "=> is followed by some b", never which one.
    let mut noise = String::new();
    let mut x = 12345u64;
    for _ in 0..400 {
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % WORDS
        };
        let (i, j) = (next(), next());
        noise.push_str(&format!("{{\"text\": \"a{i} => b{j}\"}}\n"));
    }
    std::fs::write(dir.join("noise.jsonl"), noise).unwrap();
    prepare(&dir.join("noise.jsonl"), &tok, &dir.join("noise"), "0.05");
    let pre = dir.join("pre.yaml");
    std::fs::write(
        &pre,
        format!(
            "run: {{name: pre, output: {out}, seed: 1}}\n\
             model: {{family: gpt2, d_model: 64, n_layers: 2, n_heads: 4, seq_len: 16, vocab_size: 40}}\n\
             data: {{path: {data}}}\n\
             training: {{objective: clm, steps: 50, lr: 1.0e-2, batch_size: 8, eval_every: 0, checkpoint_every: 50, warmup_steps: 10}}\n",
            out = dir.join("out").display(),
            data = dir.join("noise").display()
        ),
    )
    .unwrap();
    ok(bin().arg("train").arg(&pre).arg("--no-progress"));
    let base = dir.join("out/runs/pre/checkpoints/step-00000050");

    let mut pairs = String::new();
    for _ in 0..20 {
        for (i, t) in TARGET.iter().enumerate() {
            pairs.push_str(&format!(
                "{{\"prompt\": \"a{i} =>\", \"completion\": \" b{t}\"}}\n"
            ));
        }
    }
    std::fs::write(dir.join("pairs.jsonl"), pairs).unwrap();
    let data = dir.join("pairs");
    prepare(&dir.join("pairs.jsonl"), &tok, &data, "0.2");
    Toy {
        base,
        scaffold,
        data,
    }
}

/// A scaffold config over `toy` (fused after the base's last layer).
fn config(dir: &Path, toy: &Toy, name: &str, steps: u64, every: u64) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "run: {{name: {name}, output: {out}, seed: 42}}\n\
             scaffold:\n  base: {base}\n  scaffold: {scaffold}\n  cross_attn_layers: [1]\n  lora: {{r: 8, alpha: 16}}\n\
             data: {{path: {data}}}\n\
             training: {{objective: sft, steps: {steps}, lr: 3.0e-3, batch_size: 4, seq_len: 16, eval_every: {every}, \
             checkpoint_every: {every}, warmup_steps: 0, log_every: 1}}\n",
            out = dir.join("out").display(),
            base = toy.base.display(),
            scaffold = toy.scaffold.display(),
            data = toy.data.display(),
        ),
    )
    .unwrap();
    path
}

fn sha(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Greedy token ids of `generate` on `prompt`.
fn greedy(model: &Path, prompt: &str, extra: &[&str]) -> Vec<u64> {
    let out = ok(bin()
        .args(["generate", "--model"])
        .arg(model)
        .args([
            "--prompt",
            prompt,
            "--greedy",
            "--max-new-tokens",
            "3",
            "--json",
        ])
        .args(extra));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// `b{t}`'s id in the word tokenizer.
fn b_id(t: usize) -> u64 {
    (3 + 16 + t) as u64
}

#[test]
fn a_scaffold_learns_what_the_frozen_base_cannot_and_weight_zero_is_the_base_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let toy = toy(dir.path());
    let (base_sha, scaffold_sha) = (
        sha(&toy.base.join("model.safetensors")),
        sha(&toy.scaffold.join("model.safetensors")),
    );
    let cfg = config(dir.path(), &toy, "sc", 400, 100);
    let out = ok(bin().arg("train").arg(&cfg).arg("--no-progress"));
    let log = stderr(&out);
    assert!(log.contains("the base alone: val"), "{log}");
    assert!(log.contains("sample 1: \"a"), "{log}");

    let run = dir.path().join("out/runs/sc");
    let m = metrics(&run);
    let base_loss = m.iter().find_map(|r| r["base_val_loss"].as_f64()).unwrap();
    let last = m.iter().rev().find_map(|r| r["val_loss"].as_f64()).unwrap();
    assert!(
        last < 0.85 * base_loss,
        "fused validation loss {last} is not well below the base's {base_loss}"
    );
    // The loss counts the completion (b word + end of text), never the prompt.
    let step = m
        .iter()
        .find(|r| r["step"] == 1 && r.get("loss").is_some())
        .unwrap();
    assert_eq!(step["loss_tokens"].as_f64().unwrap(), (4 * 2) as f64);

    // Neither model changed; the checkpoint references both and holds the adapter + fusers.
    assert_eq!(sha(&toy.base.join("model.safetensors")), base_sha);
    assert_eq!(sha(&toy.scaffold.join("model.safetensors")), scaffold_sha);
    let ck = run.join("checkpoints/step-00000400");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["base"]["sha256"], base_sha.as_str());
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("scaffold.json")).unwrap()).unwrap();
    assert_eq!(meta["scaffold"]["sha256"], scaffold_sha.as_str());
    let peft: Value = serde_json::from_str(
        &std::fs::read_to_string(ck.join("scaffold_adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(
        peft["target_modules"],
        serde_json::json!(["c_attn", "c_proj", "c_fc"])
    );
    let fusers = weights(&ck.join("fusers.safetensors"));
    assert!(fusers.iter().any(|(n, _)| n == "fusers.1.gate.weight"));
    assert!(!ck.join("frozen.safetensors").exists());

    // Greedy: weight 0 is the base token for token; the trained influence maps the words.
    let (mut fused_right, mut base_right) = (0, 0);
    for (i, &t) in TARGET.iter().enumerate() {
        let prompt = format!("a{i} =>");
        let base = greedy(&toy.base, &prompt, &[]);
        assert_eq!(
            greedy(&run, &prompt, &["--scaffold-weight", "0"]),
            base,
            "{prompt}"
        );
        fused_right += usize::from(greedy(&run, &prompt, &[])[0] == b_id(t));
        base_right += usize::from(base[0] == b_id(t));
    }
    assert!(
        fused_right >= WORDS - 1 && base_right <= 2,
        "fused {fused_right}/{WORDS}, base {base_right}/{WORDS} mapped right"
    );
    let e = bin()
        .args(["generate", "--model"])
        .arg(&toy.base)
        .args(["--prompt", "a1 =>", "--scaffold-weight", "0.5"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(
        stderr(&e).contains("not a scaffold model"),
        "{}",
        stderr(&e)
    );
}

/// `chat` with `lines` on a pipe: its stdout lines and stderr.
fn chat(model: &Path, config: Option<&Path>, lines: &str) -> (Vec<String>, String) {
    let mut c: Command = bin();
    c.args(["chat", "--greedy", "--max-new-tokens", "3", "--model"])
        .arg(model);
    if let Some(cfg) = config {
        c.arg("--config").arg(cfg);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let log = stderr(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    (stdout.lines().map(str::to_string).collect(), log)
}

#[test]
fn scaffold_runs_resume_bitwise_two_workers_match_one_and_chat_trains_from_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let toy = toy(dir.path());
    let ck = |name: &str, step: u64| {
        dir.path()
            .join(format!("out/runs/{name}/checkpoints/step-{step:08}"))
    };
    // Straight through, and stopped at step 20 then resumed: the same bytes.
    ok(bin()
        .arg("train")
        .arg(config(dir.path(), &toy, "a", 40, 20))
        .arg("--no-progress"));
    let b = config(dir.path(), &toy, "b", 40, 20);
    ok(bin()
        .arg("train")
        .arg(&b)
        .args(["--no-progress", "--until-step", "20"]));
    ok(bin()
        .arg("train")
        .arg(&b)
        .args(["--no-progress", "--resume"]));
    for f in [
        "model.safetensors",
        "fusers.safetensors",
        "optimizer.safetensors",
        "scaffold_adapter/adapter_model.safetensors",
    ] {
        assert_eq!(sha(&ck("a", 40).join(f)), sha(&ck("b", 40).join(f)), "{f}");
    }

    // Two workers, each with half of every batch, train the adapter one worker trains.
    ok(&mut launch(&config(dir.path(), &toy, "w2", 40, 20), 2, &[]));
    let (one, two) = (
        weights(&ck("a", 40).join("scaffold_adapter/adapter_model.safetensors")),
        weights(&ck("w2", 40).join("scaffold_adapter/adapter_model.safetensors")),
    );
    assert_eq!(one.len(), two.len());
    for ((n, x), (_, y)) in one.iter().zip(&two) {
        let d = x
            .iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "{n}: {d}");
    }

    // The original validates every epoch: 128 training pairs in batches of 4 are 32 steps
    // an epoch, so a 70-step run validates after steps 32 and 64, and at its end (and the
    // base alone before training); with patience 2 that is "2 epochs without improvement".
    ok(bin()
        .arg("train")
        .arg(config(dir.path(), &toy, "epochs", 70, 1000))
        .args(["--no-progress", "--set", "training.eval_strategy=epoch"]));
    let evals: Vec<u64> = metrics(&dir.path().join("out/runs/epochs"))
        .iter()
        .filter(|r| r["val_loss"].is_f64())
        .filter_map(|r| r["step"].as_u64())
        .collect();
    assert_eq!(evals, vec![0, 32, 64, 70]);

    // A base stored in NF4 (QLoRA's storage) trains and generates; its file stays as it was.
    let before = sha(&toy.base.join("model.safetensors"));
    let nf4 = config(dir.path(), &toy, "nf4", 10, 10);
    ok(bin().arg("train").arg(&nf4).args([
        "--no-progress",
        "--set",
        "scaffold.base_precision=nf4",
    ]));
    let run = dir.path().join("out/runs/nf4");
    assert!(!greedy(&run, "a1 =>", &[]).is_empty());
    assert_eq!(sha(&toy.base.join("model.safetensors")), before);

    // training.autocast: bf16, on the CPU too (as the original): bf16 products give losses
    // close to the f32 run's but not equal, and the base stays as it was.
    let losses = |name: &str, extra: &[&str]| -> Vec<f64> {
        ok(bin()
            .arg("train")
            .arg(config(dir.path(), &toy, name, 10, 10))
            .arg("--no-progress")
            .args(extra));
        metrics(&dir.path().join(format!("out/runs/{name}")))
            .iter()
            .filter_map(|r| r["loss"].as_f64())
            .collect()
    };
    let f32_losses = losses("f32", &[]);
    let bf16_losses = losses("bf16", &["--set", "training.autocast=bf16"]);
    let worst = max_abs_diff(&f32_losses, &bf16_losses);
    assert!(
        worst > 1e-6 && worst < 5e-2,
        "bf16 {bf16_losses:?} vs f32 {f32_losses:?}"
    );
    assert_eq!(sha(&toy.base.join("model.safetensors")), before);
    // scaffold.lora.dropout (the original's 0.1): the same run with dropout trains another
    // adapter, and its PEFT folder says so.
    ok(bin()
        .arg("train")
        .arg(config(dir.path(), &toy, "dropout", 10, 10))
        .args(["--no-progress", "--set", "scaffold.lora.dropout=0.1"]));
    let adapter = |name: &str| ck(name, 10).join("scaffold_adapter");
    assert_ne!(
        sha(&adapter("dropout").join("adapter_model.safetensors")),
        sha(&adapter("f32").join("adapter_model.safetensors"))
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter("dropout").join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["lora_dropout"], 0.1, "{cfg}");

    // chat from a pipe: one response line per prompt, no prompt marks; `train` runs one more
    // cycle of the config and continues from its checkpoint; `quit` ends the loop.
    let run = dir.path().join("out/runs/a");
    let (lines, log) = chat(
        &run,
        Some(&config(dir.path(), &toy, "a", 40, 20)),
        "a1 =>\n\ntrain\na2 =>\nquit\na3 =>\n",
    );
    assert_eq!(lines.len(), 2, "{lines:?}\n{log}");
    assert!(lines.iter().all(|l| l.starts_with('b')), "{lines:?}");
    assert!(!log.lines().any(|l| l.starts_with("> ")), "{log}");
    assert!(log.contains("training cycle: steps 40..80"), "{log}");
    assert!(ck("a", 80).join("MANIFEST.json").exists());
    // Any model, and `exit`; end of input also ends it.
    let (lines, _) = chat(&toy.base, None, "a1 =>\nexit\n");
    assert_eq!(lines.len(), 1);
    let (lines, _) = chat(&toy.base, None, "a1 =>\na2 =>\n");
    assert_eq!(lines.len(), 2);
}

/// Every line a launcher printed until it exits (its reader thread ends at end of stream).
fn drain(rx: &std::sync::mpsc::Receiver<String>) -> String {
    let mut lines = Vec::new();
    while let Ok(l) = rx.recv_timeout(std::time::Duration::from_secs(60)) {
        lines.push(l);
    }
    lines.join("\n")
}

#[test]
fn a_killed_scaffold_worker_is_replaced_and_the_run_ends_with_the_clean_runs_weights() {
    let dir = tempfile::tempdir().unwrap();
    let toy = toy(dir.path());
    let steps = 160;
    ok(&mut launch(
        &config(dir.path(), &toy, "clean", steps, 20),
        2,
        &[],
    ));
    let killed = config(dir.path(), &toy, "killed", steps, 20);
    let (mut child, rx) = start_until(
        launch(&killed, 2, &["--on-worker-loss", "recover"]),
        "step     30/",
    );
    let out = Command::new("pgrep")
        .args(["-P", &child.0.id().to_string()])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u32>().ok())
        .next_back()
        .expect("the launcher has worker processes");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.0.wait().unwrap();
    let log = drain(&rx);
    assert!(status.success(), "{log}");
    assert!(log.contains("restarting it"), "{log}");
    assert!(log.contains("resuming from step-"), "{log}");
    let ck = |name: &str| {
        dir.path()
            .join(format!("out/runs/{name}/checkpoints/step-{steps:08}"))
    };
    for f in [
        "fusers.safetensors",
        "scaffold_adapter/adapter_model.safetensors",
    ] {
        let (a, b) = (ck("clean").join(f), ck("killed").join(f));
        let listing = |p: &Path| {
            std::fs::read_dir(p.parent().unwrap().parent().unwrap())
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        assert!(
            a.exists() && b.exists(),
            "{f}: clean has [{}], killed has [{}]\n{log}",
            listing(&a),
            listing(&b)
        );
        assert_eq!(
            sha(&a),
            sha(&b),
            "{f}: recovery must end with the clean run's weights"
        );
    }
}
