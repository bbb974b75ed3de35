//! `stackwise finetune` on a real Hugging Face GPT-2 folder (the tiny fixture): the run's
//! checkpoints hold the adapter as a PEFT folder and reference the frozen base by sha256;
//! eval, merge and resume work on them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use stackwise_common::checkpoint::sha256_hex;

mod common;
use common::{bin, identity_tokenizer_json, ok, run, stderr};

/// The tiny GPT-2 with a tokenizer, and Macbeth spelled in its 256 ids (one per byte).
fn base_and_text(dir: &Path) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2-tiny");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), base.join(f)).unwrap();
    }
    std::fs::write(base.join("tokenizer.json"), identity_tokenizer_json(256)).unwrap();
    let play =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/corpus/macbeth.txt"))
            .unwrap();
    let text: String = play[..20_000]
        .iter()
        .map(|&b| char::from_u32(0x100 + b as u32).unwrap())
        .collect();
    let path = dir.join("text.txt");
    std::fs::write(&path, text).unwrap();
    (base, path)
}

fn prepare(text: &Path, base: &Path, out: &Path) {
    ok(bin()
        .args(["data", "prepare"])
        .arg(text)
        .arg("--out")
        .arg(out)
        .arg("--tokenizer")
        .arg(base.join("tokenizer.json")));
}

fn finetune(base: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = bin();
    c.args(["finetune", "--mode", "lora", "--model"])
        .arg(base)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--lr",
            "1e-2",
        ])
        .args([
            "--warmup-steps",
            "1",
            "--eval-every",
            "6",
            "--checkpoint-every",
            "6",
        ])
        .args(["--target-modules", "c_attn,c_proj", "--no-progress"])
        .args(extra);
    c
}

fn eval_loss(model: &Path, adapter: Option<&Path>, text: &Path) -> f64 {
    let mut c = bin();
    c.args(["eval", "--model"])
        .arg(model)
        .arg("--data")
        .arg(text);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    let out = ok(c.args(["--seq-len", "32", "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["loss"].as_f64().unwrap()
}

fn sha256(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

#[test]
fn a_lora_finetune_writes_peft_folders_over_a_referenced_base_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let base_sha = sha256(&base.join("model.safetensors"));

    let out = dir.path().join("out");
    ok(&mut finetune(&base, &data, &out, &[]));
    let run_dir = out.join("runs/finetune");
    let ck = run_dir.join("checkpoints/step-00000012");

    // The adapter as PEFT writes it: GPT-2's Conv1D layout, the suffix targets.
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(ck.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["fan_in_fan_out"], true);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["c_attn", "c_proj"])
    );
    // The base is referenced by path and sha256, not copied: no frozen tensors in the run.
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["base"]["sha256"], base_sha.as_str());
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"adapter/adapter_model.safetensors"),
        "{files:?}"
    );
    assert!(!files.iter().any(|f| f.contains("frozen")), "{files:?}");
    assert!(!run_dir.join("checkpoints/frozen").exists());
    // Training left the base bitwise unchanged.
    assert_eq!(sha256(&base.join("model.safetensors")), base_sha);

    // eval on the run (its base through the manifest) = eval of base + the PEFT folder, and
    // the adapter learned something.
    let on_run = eval_loss(&run_dir, None, &text);
    let adapted = eval_loss(&base, Some(&ck.join("adapter")), &text);
    let plain = eval_loss(&base, None, &text);
    assert!(
        (on_run - adapted).abs() < 1e-6,
        "run {on_run}, base + adapter {adapted}"
    );
    assert!(adapted < plain - 0.05, "adapted {adapted}, base {plain}");
    let merged = dir.path().join("merged");
    ok(bin()
        .args(["adapter", "merge", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(ck.join("adapter"))
        .arg("--out")
        .arg(&merged));
    let m = eval_loss(&merged, None, &text);
    assert!((m - adapted).abs() < 1e-4, "merged {m}, unmerged {adapted}");

    // Stopped at step 6 and resumed: the same adapter, bit for bit.
    let out2 = dir.path().join("out2");
    ok(&mut finetune(&base, &data, &out2, &["--until-step", "6"]));
    ok(&mut finetune(&base, &data, &out2, &["--resume"]));
    let adapter = |o: &Path| {
        std::fs::read(
            o.join("runs/finetune/checkpoints/step-00000012/adapter/adapter_model.safetensors"),
        )
        .unwrap()
    };
    assert!(adapter(&out) == adapter(&out2), "resumed adapter differs");

    // A changed base is refused by name, not silently used.
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gpt2-tiny/weights_after_3_steps.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    let o = run(bin()
        .args(["eval", "--model"])
        .arg(&run_dir)
        .arg("--data")
        .arg(&text)
        .args(["--seq-len", "32"]));
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("changed since the adapter was trained"),
        "{}",
        stderr(&o)
    );
}
