//! Trainer integration tests: exact resume, gradient accumulation, SFT masking, early stopping.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use stackwise_common::config::TrainConfig;
use stackwise_common::data::prepare::{PrepareOptions, prepare};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::{Tok, TokenizerKind};
use stackwise_worker::train::{RunOptions, Trainer};

fn dataset(dir: &Path, name: &str, text: &str, jsonl: bool) -> String {
    let src = dir.join(if jsonl {
        format!("{name}.jsonl")
    } else {
        format!("{name}.txt")
    });
    std::fs::write(&src, text).unwrap();
    let tok = Tok::train(TokenizerKind::Byte, &[String::new()], 0).unwrap();
    let out = dir.join(format!("{name}-data"));
    let store = Store::open(out.to_str().unwrap()).unwrap();
    prepare(
        &[src],
        &tok,
        &store,
        &PrepareOptions {
            val_fraction: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    out.to_string_lossy().to_string()
}

fn corpus() -> String {
    (0..300)
        .map(|i| format!("line {i}: the cat sat on the mat and the dog ran. "))
        .collect()
}

fn config(out: &Path, data: &str, extra: &str) -> TrainConfig {
    let yaml = format!(
        "run: {{name: r, output: {}, seed: 3}}
model: {{d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, family: llama, seq_len: 32}}
data: {{path: {data}}}
training: {{steps: 8, batch_size: 4, lr: 1.0e-2, warmup_steps: 2, eval_every: 4, eval_batches: 2, checkpoint_every: 100, log_every: 100, ema_decay: 0.9}}
",
        out.display()
    );
    let mut v: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let extra: serde_yaml::Value = serde_yaml::from_str(extra).unwrap_or(serde_yaml::Value::Null);
    if let serde_yaml::Value::Mapping(m) = extra {
        for (section, kv) in m {
            let serde_yaml::Value::Mapping(kv) = kv else {
                continue;
            };
            for (k, val) in kv {
                v[&section][&k] = val;
            }
        }
    }
    serde_yaml::from_value(v).unwrap()
}

fn weights(t: &Trainer) -> HashMap<String, Vec<f32>> {
    t.params()
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn n_steps_then_resume_then_n_steps_is_bitwise_equal_to_2n_steps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "c", &corpus(), false);
    let quiet = RunOptions::default();

    let straight_dir = dir.path().join("straight");
    let mut straight = Trainer::new(config(&straight_dir, &data, ""), &quiet).unwrap();
    let s = straight.run(&quiet).unwrap();
    assert_eq!(s.step, 8);

    let resumed_dir = dir.path().join("resumed");
    let first = RunOptions {
        until_step: Some(4),
        ..Default::default()
    };
    let mut a = Trainer::new(config(&resumed_dir, &data, ""), &first).unwrap();
    assert_eq!(a.run(&first).unwrap().step, 4);
    drop(a);
    let again = RunOptions {
        resume: true,
        ..Default::default()
    };
    let mut b = Trainer::new(config(&resumed_dir, &data, ""), &again).unwrap();
    let r = b.run(&again).unwrap();
    assert_eq!(r.step, 8);
    assert_eq!(
        weights(&straight),
        weights(&b),
        "weights differ after resume"
    );
    assert_eq!(
        s.train_loss.unwrap().to_bits(),
        r.train_loss.unwrap().to_bits()
    );
    assert_eq!(
        s.val_loss.unwrap().to_bits(),
        r.val_loss.unwrap().to_bits(),
        "EMA and eval resume too"
    );
    // The checkpoint files themselves are identical.
    let read = |d: &Path| {
        std::fs::read(d.join("runs/r/checkpoints/step-00000008/model.safetensors")).unwrap()
    };
    assert_eq!(read(&straight_dir), read(&resumed_dir));
    let ema = |d: &Path| {
        std::fs::read(d.join("runs/r/checkpoints/step-00000008/ema.safetensors")).unwrap()
    };
    assert_eq!(ema(&straight_dir), ema(&resumed_dir));
}

#[test]
fn gradient_accumulation_equals_one_large_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "c", &corpus(), false);
    let quiet = RunOptions::default();
    let mut big = Trainer::new(
        config(
            &dir.path().join("big"),
            &data,
            "training: {batch_size: 8, grad_accum: 1, steps: 4}",
        ),
        &quiet,
    )
    .unwrap();
    big.run(&quiet).unwrap();
    let mut acc = Trainer::new(
        config(
            &dir.path().join("acc"),
            &data,
            "training: {batch_size: 2, grad_accum: 4, steps: 4}",
        ),
        &quiet,
    )
    .unwrap();
    acc.run(&quiet).unwrap();
    let (a, b) = (weights(&big), weights(&acc));
    let mut max = 0f32;
    for (k, va) in &a {
        for (x, y) in va.iter().zip(&b[k]) {
            max = max.max((x - y).abs());
        }
    }
    assert!(max < 1e-5, "accumulated weights differ by {max}");
}

/// Loss of the trainer's model on `text` (all positions), tokenized with the dataset's tokenizer.
fn text_loss(t: &Trainer, data: &str, text: &str) -> f32 {
    let (_, tok) = stackwise_common::data::TokenIndex::open(&Store::open(data).unwrap()).unwrap();
    let ids = tok.encode(text, false).unwrap();
    let rows = vec![(ids.clone(), vec![1.0; ids.len()])];
    let b = stackwise_worker::objectives::Batch::from_rows(&rows, &Device::Cpu).unwrap();
    stackwise_worker::objectives::mean_loss(t.model(), &b)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn sft_trains_only_on_the_response_and_clm_on_everything() {
    let dir = tempfile::tempdir().unwrap();
    // The response is always "yes"; the prompts share a fixed, learnable pattern.
    let rows: String = (0..60)
        .map(|i| {
            format!(
                "{{\"prompt\": \"please answer {} \", \"completion\": \"yes\"}}\n",
                i % 10
            )
        })
        .collect();
    let data = dataset(dir.path(), "s", &rows, true);
    let quiet = RunOptions::default();
    let run = |name: &str, objective: &str| {
        let extra = format!("training: {{objective: {objective}, steps: 60, lr: 1.0e-2}}");
        let mut t = Trainer::new(config(&dir.path().join(name), &data, &extra), &quiet).unwrap();
        let s = t.run(&quiet).unwrap();
        (t, s)
    };
    let (sft, s) = run("sft", "sft");
    // Only "yes" + EOS are targets: they are learnt almost perfectly.
    assert!(s.val_loss.unwrap() < 0.3, "sft val loss {:?}", s.val_loss);
    let (clm, _) = run("clm", "clm");
    // The prompt was never a target under sft, but is under clm (which ignores the SFT mask).
    let (prompt_sft, prompt_clm) = (
        text_loss(&sft, &data, "please answer 3 "),
        text_loss(&clm, &data, "please answer 3 "),
    );
    assert!(
        prompt_sft > 1.5,
        "sft must not learn the prompt: {prompt_sft}"
    );
    assert!(
        prompt_clm < prompt_sft / 2.0,
        "clm must learn the prompt: {prompt_clm} vs sft {prompt_sft}"
    );
}

#[test]
fn early_stopping_halts_when_validation_stops_improving() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "c", &corpus(), false);
    let quiet = RunOptions::default();
    // A huge learning rate makes validation loss worse after the first evaluation.
    let cfg = config(
        &dir.path().join("es"),
        &data,
        "training: {steps: 200, eval_every: 2, patience: 2, lr: 3.0, grad_clip: null, ema_decay: null}",
    );
    let mut t = Trainer::new(cfg, &quiet).unwrap();
    let s = t.run(&quiet).unwrap();
    assert!(s.stopped_early, "{s:?}");
    assert!(s.step < 200);
    assert!(
        s.last_checkpoint.is_some(),
        "a checkpoint is written when stopping"
    );
}

#[test]
fn resuming_on_a_changed_dataset_is_an_error_naming_both_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "c", &corpus(), false);
    let out = dir.path().join("run");
    let first = RunOptions {
        until_step: Some(4),
        ..Default::default()
    };
    let mut a = Trainer::new(config(&out, &data, ""), &first).unwrap();
    assert_eq!(a.run(&first).unwrap().step, 4);
    drop(a);
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    let err = |cfg| match Trainer::new(cfg, &resume) {
        Ok(_) => panic!("resumed on other data"),
        Err(e) => format!("{e:#}"),
    };
    // The corpus is re-prepared smaller in the same place.
    std::fs::remove_dir_all(&data).unwrap();
    let lines: String = corpus().chars().take(1500).collect();
    assert_eq!(dataset(dir.path(), "c", &lines, false), data);
    let e = err(config(&out, &data, ""));
    assert!(
        e.contains("the data changed") && e.contains(&data) && e.contains("allow_data_change"),
        "{e}"
    );
    // Allowed explicitly, it continues (the cursor is still inside the smaller data).
    let allowed = config(&out, &data, "training: {allow_data_change: true}");
    let mut b = Trainer::new(allowed, &resume).unwrap();
    assert_eq!(b.run(&resume).unwrap().step, 8);
    drop(b);
    // A dataset smaller than the cursor is refused even then, instead of indexing past it.
    std::fs::remove_dir_all(&data).unwrap();
    let tiny: String = corpus().chars().take(300).collect();
    dataset(dir.path(), "c", &tiny, false);
    let again = RunOptions {
        resume: true,
        until_step: Some(8),
        ..Default::default()
    };
    std::fs::remove_dir_all(out.join("runs/r/checkpoints/step-00000008")).unwrap();
    let e = match Trainer::new(
        config(&out, &data, "training: {allow_data_change: true}"),
        &again,
    ) {
        Ok(_) => panic!("resumed past the data"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("data cursor") && e.contains("training samples"),
        "{e}"
    );
}

/// JSONL documents of `len(i)` characters each (byte tokenizer: one token a character).
fn documents(len: impl Fn(usize) -> usize) -> String {
    (0..120)
        .map(|i| {
            let text: String = (0..len(i))
                .map(|k| (b'a' + ((i + k) % 26) as u8) as char)
                .collect();
            format!("{{\"text\": \"{text}\"}}\n")
        })
        .collect()
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("runs/r/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss_tokens").is_some())
        .collect()
}

#[test]
fn token_budget_steps_exactly_when_the_budget_is_reached_and_equals_one_big_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), "eq", &documents(|_| 14), true);
    let quiet = RunOptions::default();
    let budget = |dir: &Path, tokens: usize, steps: u64| {
        let extra = format!(
            "training: {{batch_size: 1, tokens_per_step: {tokens}, steps: {steps}, log_every: 1}}"
        );
        let mut t = Trainer::new(config(dir, &data, &extra), &quiet).unwrap();
        t.run(&quiet).unwrap();
        t
    };
    // Every document has the same number of loss tokens L: a budget of 40 takes ceil(40 / L)
    // documents, the fewest whose tokens reach it.
    let out = dir.path().join("budget");
    budget(&out, 40, 4);
    let recs = metrics(&out);
    assert_eq!(recs.len(), 4);
    let per_doc =
        recs[0]["loss_tokens"].as_f64().unwrap() / recs[0]["micro_batches"].as_f64().unwrap();
    assert!(per_doc >= 10.0, "{per_doc} loss tokens a document");
    for r in &recs {
        let (tokens, micro) = (
            r["loss_tokens"].as_f64().unwrap(),
            r["micro_batches"].as_u64().unwrap(),
        );
        assert_eq!(micro, (40.0 / per_doc).ceil() as u64, "{r}");
        assert!(tokens >= 40.0 && tokens - per_doc < 40.0, "{r}");
    }
    // A budget of exactly 3 documents' tokens = one batch of those 3 documents.
    let three = dir.path().join("three");
    let a = budget(&three, 3 * per_doc as usize, 4);
    assert!(metrics(&three).iter().all(|r| r["micro_batches"] == 3));
    let mut b = Trainer::new(
        config(
            &dir.path().join("big"),
            &data,
            "training: {batch_size: 3, steps: 4}\ndata: {packing: false}",
        ),
        &quiet,
    )
    .unwrap();
    b.run(&quiet).unwrap();
    let (wa, wb) = (weights(&a), weights(&b));
    let worst = wa
        .iter()
        .flat_map(|(k, v)| v.iter().zip(&wb[k]).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-5,
        "token budget vs one batch: max |diff| {worst}"
    );
}

#[test]
fn token_budget_runs_resume_exactly_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    // Documents of 5..30 characters: steps take different numbers of micro-batches.
    let data = dataset(dir.path(), "var", &documents(|i| 5 + (i * 7) % 26), true);
    let cfg = |d: &Path| {
        config(
            d,
            &data,
            "training: {batch_size: 2, tokens_per_step: 60, steps: 6, log_every: 1}",
        )
    };
    let quiet = RunOptions::default();
    let mut straight = Trainer::new(cfg(&dir.path().join("s")), &quiet).unwrap();
    straight.run(&quiet).unwrap();
    let micro: Vec<u64> = metrics(&dir.path().join("s"))
        .iter()
        .map(|r| r["micro_batches"].as_u64().unwrap())
        .collect();
    assert!(
        micro.iter().any(|&m| m != micro[0]),
        "variable steps: {micro:?}"
    );
    let stop = RunOptions {
        until_step: Some(3),
        ..Default::default()
    };
    let mut a = Trainer::new(cfg(&dir.path().join("r")), &stop).unwrap();
    a.run(&stop).unwrap();
    drop(a);
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    let mut b = Trainer::new(cfg(&dir.path().join("r")), &resume).unwrap();
    b.run(&resume).unwrap();
    assert_eq!(
        weights(&straight),
        weights(&b),
        "resumed token-budget run differs"
    );
}
