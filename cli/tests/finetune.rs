//! `stackwise finetune` on a real Hugging Face GPT-2 folder (the tiny fixture): the run's
//! checkpoints hold the adapter as a PEFT folder and reference the frozen base by sha256;
//! eval, merge and resume work on them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use stackwise_common::checkpoint::sha256_hex;

mod common;
use common::{bin, identity_tokenizer_json, max_abs_diff, ok, run, stderr, weights};

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

/// `finetune`'s command with another `--mode`.
fn with_mode(c: Command, mode: &str) -> Command {
    let mut out = bin();
    let mut args = c.get_args().map(|a| a.to_owned()).collect::<Vec<_>>();
    let i = args.iter().position(|a| a == "--mode").unwrap();
    args[i + 1] = mode.into();
    out.args(args);
    out
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

/// The adapter file a 12-step `finetune` into `out` ends with.
fn adapter_file(out: &Path) -> PathBuf {
    out.join("runs/finetune/checkpoints/step-00000012/adapter/adapter_model.safetensors")
}

/// That file's bytes.
fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(adapter_file(out)).unwrap()
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
    // `ckpt export` of an adapter run: the base with the adapter merged, a plain HF folder.
    let exported = dir.path().join("exported");
    ok(bin().args(["ckpt", "export"]).arg(&run_dir).arg(&exported));
    let names: Vec<String> = weights(&exported.join("model.safetensors"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(!names.iter().any(|n| n.contains("lora")), "{names:?}");
    let e = eval_loss(&exported, None, &text);
    assert!(
        (e - adapted).abs() < 1e-4,
        "exported {e}, unmerged {adapted}"
    );

    // Stopped at step 6 and resumed: the same adapter, bit for bit.
    let out2 = dir.path().join("out2");
    ok(&mut finetune(&base, &data, &out2, &["--until-step", "6"]));
    ok(&mut finetune(&base, &data, &out2, &["--resume"]));
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

#[test]
fn two_workers_train_the_same_adapter_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let adapter = |workers: &str| {
        let out = dir.path().join(format!("w{workers}"));
        ok(&mut finetune(
            &base,
            &data,
            &out,
            &["--workers", workers, "--until-step", "6"],
        ));
        weights(
            &out.join("runs/finetune/checkpoints/step-00000006/adapter/adapter_model.safetensors"),
        )
    };
    let (one, two) = (adapter("1"), adapter("2"));
    assert_eq!(one.len(), two.len());
    // The data-parallel run all-reduces the adapter's gradients: the same factors, up to
    // float summation order.
    let worst = one
        .iter()
        .zip(&two)
        .flat_map(|((n1, a), (n2, b))| {
            assert_eq!(n1, n2);
            a.iter().zip(b).map(|(x, y)| (x - y).abs())
        })
        .fold(0f32, f32::max);
    assert!(worst <= 1e-6, "1 vs 2 workers: max |diff| {worst}");
    // And they moved: B starts at zero.
    assert!(
        one.iter()
            .any(|(n, v)| n.contains("lora_B") && v.iter().any(|x| *x != 0.0))
    );
}

#[test]
fn baseline_trains_every_weight_and_qlora_with_and_without_double_quant_evaluates_on_its_nf4_base()
{
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let plain = eval_loss(&base, None, &text);

    let full = dir.path().join("full");
    ok(&mut with_mode(
        finetune(&base, &data, &full, &[]),
        "baseline",
    ));
    let ck = full.join("runs/finetune/checkpoints/step-00000012");
    assert!(!ck.join("adapter").exists());
    let names: Vec<String> = weights(&ck.join("model.safetensors"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n == "transformer.h.0.attn.c_attn.weight"),
        "{names:?}"
    );
    assert!(eval_loss(&full.join("runs/finetune"), None, &text) < plain - 0.05);

    let q = dir.path().join("qlora");
    ok(&mut with_mode(finetune(&base, &data, &q, &[]), "qlora"));
    let ck = q.join("runs/finetune/checkpoints/step-00000012");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(manifest["base"]["precision"], "nf4");
    // The run evaluates on the NF4 base its adapter saw; the fp32 base with the same adapter
    // is close but not the same model.
    let on_run = eval_loss(&q.join("runs/finetune"), None, &text);
    let on_fp32 = eval_loss(&base, Some(&ck.join("adapter")), &text);
    assert!(on_run < plain - 0.05, "qlora {on_run}, base {plain}");
    let gap = (on_run - on_fp32).abs();
    assert!(
        gap > 1e-6 && gap < 0.05,
        "nf4 base {on_run}, fp32 base {on_fp32}"
    );

    // Double quantization (bnb_4bit_use_double_quant): another base, as the manifest says;
    // it trains, evaluates on the base it trained on, and resumes bit for bit.
    let dq = dir.path().join("qlora-dq");
    ok(&mut with_mode(
        finetune(&base, &data, &dq, &["--double-quant"]),
        "qlora",
    ));
    let dq_run = dq.join("runs/finetune");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dq_run.join("checkpoints/step-00000012/MANIFEST.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["base"]["precision"], "nf4_dq");
    let on_dq = eval_loss(&dq_run, None, &text);
    assert!(on_dq < plain - 0.05, "qlora dq {on_dq}, base {plain}");
    assert!(
        adapter(&dq) != adapter(&q),
        "double quantization changed nothing"
    );
    let dq2 = dir.path().join("qlora-dq2");
    ok(&mut with_mode(
        finetune(&base, &data, &dq2, &["--double-quant", "--until-step", "6"]),
        "qlora",
    ));
    ok(&mut with_mode(
        finetune(&base, &data, &dq2, &["--double-quant", "--resume"]),
        "qlora",
    ));
    assert!(adapter(&dq) == adapter(&dq2), "resumed adapter differs");
    // Only QLoRA has a 4-bit base to double-quantize.
    let o = run(&mut finetune(
        &base,
        &data,
        &dir.path().join("x"),
        &["--double-quant"],
    ));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--mode qlora"), "{}", stderr(&o));
}

#[test]
fn butterfly_modes_train_boft_on_gpt2_conv1d_and_evaluate_unmerged_as_merged() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let plain = eval_loss(&base, None, &text);
    for (mode, extra, shape) in [
        // Full width: 2x2 Givens blocks, 6 stages mix all 64 features of c_attn's input.
        ("butterfly", vec![], vec![6, 32, 2, 2]),
        // Independent rotations of 32-feature blocks.
        (
            "butterfly_block",
            vec!["--butterfly-block-size", "32"],
            vec![1, 2, 32, 32],
        ),
    ] {
        let out = dir.path().join(mode);
        let mut c = with_mode(finetune(&base, &data, &out, &[]), mode);
        ok(c.args(extra));
        let run_dir = out.join("runs/finetune");
        let adapter = run_dir.join("checkpoints/step-00000012/adapter");
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "BOFT", "{mode}");
        let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let r = st
            .tensor("base_model.model.transformer.h.0.attn.c_attn.boft_R")
            .unwrap();
        assert_eq!(r.shape(), shape.as_slice(), "{mode}");
        // The run evaluates through the trainable (unmerged) path, `--adapter` merges on
        // load: the same loss, and better than the base.
        let on_run = eval_loss(&run_dir, None, &text);
        let merged = eval_loss(&base, Some(&adapter), &text);
        assert!(
            (on_run - merged).abs() < 1e-5,
            "{mode}: run {on_run}, merged {merged}"
        );
        assert!(on_run < plain - 0.02, "{mode}: {on_run} vs base {plain}");
    }
}

#[test]
fn epochs_become_steps_from_the_training_split() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let out = dir.path().join("out");
    ok(bin()
        .args(["finetune", "--mode", "lora", "--model"])
        .arg(&base)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--epochs", "0.25", "--batch-size", "4", "--seq-len", "32"])
        .args([
            "--eval-every",
            "0",
            "--checkpoint-every",
            "1000",
            "--warmup-steps",
            "1",
        ])
        .arg("--no-progress"));
    // 19,000 training tokens make 593 packed samples of 32; a quarter of them in batches of
    // 4 is ceil(148.25 / 4) = 38 steps.
    let cfg = std::fs::read_to_string(out.join("finetune.yaml")).unwrap();
    assert!(cfg.contains("steps: 38"), "{cfg}");
    assert!(
        out.join("runs/finetune/checkpoints/step-00000038/adapter")
            .exists()
    );
}

#[test]
fn lora_dropout_trains_another_adapter_resumes_bitwise_and_recomputes_the_same_masks() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let drop = ["--lora-dropout", "0.1"];
    let (plain, dropped) = (dir.path().join("plain"), dir.path().join("dropped"));
    ok(&mut finetune(&base, &data, &plain, &[]));
    ok(&mut finetune(&base, &data, &dropped, &drop));
    assert!(
        adapter(&plain) != adapter(&dropped),
        "dropout changed nothing"
    );
    let cfg = std::fs::read_to_string(
        dropped.join("runs/finetune/checkpoints/step-00000012/adapter/adapter_config.json"),
    )
    .unwrap();
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    assert_eq!(cfg["lora_dropout"], 0.1);

    // Stopped at step 6 and resumed: the masks are drawn again, the adapter is the same.
    let resumed = dir.path().join("resumed");
    ok(&mut finetune(
        &base,
        &data,
        &resumed,
        &[&drop[..], &["--until-step", "6"]].concat(),
    ));
    ok(&mut finetune(
        &base,
        &data,
        &resumed,
        &[&drop[..], &["--resume"]].concat(),
    ));
    assert!(
        adapter(&dropped) == adapter(&resumed),
        "resumed adapter differs"
    );

    // Blocks recomputed in the backward draw the forward's masks: the same gradients.
    let ckpt = dir.path().join("ckpt");
    ok(&mut finetune(
        &base,
        &data,
        &ckpt,
        &[&drop[..], &["--gradient-checkpointing"]].concat(),
    ));
    let (a, b) = (
        weights(&adapter_file(&dropped)),
        weights(&adapter_file(&ckpt)),
    );
    assert_eq!(a.len(), b.len());
    for ((k, x), (_, y)) in a.iter().zip(&b) {
        assert!(max_abs_diff(x, y) < 1e-5, "{k}: {}", max_abs_diff(x, y));
    }
}

#[test]
fn boft_dropout_trains_another_adapter_and_resumes_bitwise() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let boft = |out: &Path, extra: &[&str]| {
        let mut c = with_mode(finetune(&base, &data, out, extra), "butterfly_block");
        ok(c.args(["--butterfly-block-size", "8", "--butterfly-stages", "2"]));
    };
    let drop = ["--boft-dropout", "0.5"];
    let (plain, dropped, resumed) = (
        dir.path().join("plain"),
        dir.path().join("dropped"),
        dir.path().join("resumed"),
    );
    boft(&plain, &[]);
    boft(&dropped, &drop);
    assert!(
        adapter(&plain) != adapter(&dropped),
        "dropout changed nothing"
    );
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(
            dropped.join("runs/finetune/checkpoints/step-00000012/adapter/adapter_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["boft_dropout"], 0.5);
    boft(&resumed, &[&drop[..], &["--until-step", "6"]].concat());
    boft(&resumed, &[&drop[..], &["--resume"]].concat());
    assert!(
        adapter(&dropped) == adapter(&resumed),
        "resumed adapter differs"
    );
    // Evaluation has no dropout: the run evaluates as its merged adapter does.
    let run = dropped.join("runs/finetune");
    let adapter_dir = run.join("checkpoints/step-00000012/adapter");
    let (on_run, merged) = (
        eval_loss(&run, None, &text),
        eval_loss(&base, Some(&adapter_dir), &text),
    );
    assert!(
        (on_run - merged).abs() < 1e-5,
        "run {on_run}, merged {merged}"
    );
}

#[test]
fn bf16_and_fp16_flags_compute_at_reduced_precision_with_f32_master_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (base, text) = base_and_text(dir.path());
    let data = dir.path().join("data");
    prepare(&text, &base, &data);
    let step6 = |out: &Path| {
        weights(
            &out.join("runs/finetune/checkpoints/step-00000006/adapter/adapter_model.safetensors"),
        )
    };
    let plain = dir.path().join("plain");
    ok(&mut finetune(&base, &data, &plain, &["--until-step", "6"]));
    for flag in ["--bf16", "--fp16"] {
        let out = dir.path().join(flag.trim_start_matches('-'));
        ok(&mut finetune(
            &base,
            &data,
            &out,
            &[flag, "--until-step", "6"],
        ));
        let cfg = std::fs::read_to_string(out.join("finetune.yaml")).unwrap();
        assert!(
            cfg.contains(&format!("autocast: {}", flag.trim_start_matches('-'))),
            "{cfg}"
        );
        // Reduced-precision products train a close but different adapter; what is saved is
        // the f32 master copy.
        let (a, b) = (step6(&plain), step6(&out));
        let worst = a
            .iter()
            .zip(&b)
            .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max);
        assert!(worst > 0.0 && worst < 0.05, "{flag}: max |diff| {worst}");
    }
    let o = run(&mut finetune(
        &base,
        &data,
        &dir.path().join("both"),
        &["--bf16", "--fp16"],
    ));
    assert!(!o.status.success());
}
