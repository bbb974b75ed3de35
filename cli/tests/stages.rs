//! Staged training (the StackWise method) end to end: frozen layers and adapters, a
//! layer-wise run on two workers, and resume in the middle of a stage.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use stackwise_common::config::TrainConfig;
use stackwise_common::plan::plan_config;
use stackwise_worker::comm::Local;
use stackwise_worker::objectives::{Batch, Masking, Objective};
use stackwise_worker::train::{RunOptions, Trainer};

mod common;
use common::{bin, ok};

fn config(out: &Path, data: &Path, training: &str) -> TrainConfig {
    let yaml = format!(
        "run: {{name: st, output: {}, seed: 5}}
model: {{d_model: 32, n_layers: 3, n_heads: 4, seq_len: 32}}
data: {{path: {}}}
training: {{batch_size: 4, lr: 1.0e-2, warmup_steps: 1, eval_every: 100, eval_batches: 2, checkpoint_every: 100, log_every: 1, {training}}}
",
        out.display(),
        data.display()
    );
    serde_yaml::from_str(&yaml).unwrap()
}

/// Three one-layer fused blocks with time-step-masked diffusion, the frozen ones in NF4 with
/// QLoRA adapters.
fn fused_nf4_qlora(steps_per_stage: u64) -> String {
    format!(
        "mode: fused, total_blocks: 3, block_size: 1, steps_per_stage: {steps_per_stage}, \
         objective: diffusion, time_step_masking: true, quantization_type: nf4, \
         qlora_enabled: true, qlora_rank: 4"
    )
}

fn trainer(cfg: TrainConfig, opts: &RunOptions) -> Trainer {
    let plan = plan_config(&cfg).unwrap();
    let opts = RunOptions {
        plan: Some(plan),
        ..opts.clone()
    };
    Trainer::new(cfg, &opts).unwrap()
}

fn values(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<f32>> {
    t.iter()
        .map(|(k, v)| (k.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn until(step: u64) -> RunOptions {
    RunOptions {
        until_step: Some(step),
        ..Default::default()
    }
}

#[test]
fn frozen_layers_stay_bitwise_and_gradients_reach_every_trainable_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    let cfg = config(&dir.path().join("out"), &data, &fused_nf4_qlora(3));
    let mut t = trainer(cfg, &RunOptions::default());
    t.run(&until(3)).unwrap();
    let end_of_block_0 = values(&t.params().tensors().unwrap());
    t.run(&until(5)).unwrap(); // two steps into stage 1 (block 1)
    assert_eq!(t.stage().trainable, vec![1]);
    let frozen_before = values(&t.frozen().tensors().unwrap());
    assert!(frozen_before.contains_key("transformer.h.0.attn.c_attn.weight"));
    assert!(!frozen_before.contains_key("transformer.h.1.attn.c_attn.weight"));
    // Block 0 is stored as NF4 (its linears), within NF4's bound of the trained values.
    let q = &frozen_before["transformer.h.0.mlp.c_fc.weight"];
    let w = &end_of_block_0["transformer.h.0.mlp.c_fc.weight"];
    let bound = stackwise_worker::models::quant::nf4_max_relative_error();
    for (qb, wb) in q.chunks(64).zip(w.chunks(64)) {
        let m = wb.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            qb.iter()
                .zip(wb)
                .all(|(a, b)| (a - b).abs() <= bound * m * 1.0001)
        );
    }
    assert_ne!(q, w, "quantized");
    // Norms of the frozen block are kept as they are.
    assert_eq!(
        frozen_before["transformer.h.0.ln_1.weight"],
        end_of_block_0["transformer.h.0.ln_1.weight"]
    );
    t.run(&until(6)).unwrap();
    assert_eq!(
        frozen_before,
        values(&t.frozen().tensors().unwrap()),
        "frozen weights changed"
    );

    // Gradients of one masked batch reach every trainable parameter: block 1, the head and
    // the adapters on block 0 (whose B factor is no longer zero after the steps above).
    let names: Vec<String> = t.params().vars.keys().cloned().collect();
    assert!(names.iter().any(|n| n.contains("h.0.attn.c_attn.lora_A")));
    assert!(names.iter().any(|n| n.starts_with("transformer.h.1.")));
    assert!(!names.iter().any(|n| n.starts_with("transformer.wte")));
    let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..4)
        .map(|i| {
            (
                (0..32).map(|j| (i * 31 + j * 7) % 200).collect(),
                vec![1.0; 32],
            )
        })
        .collect();
    let m = Masking {
        objective: Objective::Diffusion,
        mask_id: 257,
        vocab: 257,
        fractions: vec![0.5],
        seed: 1,
    };
    let batch = Batch::masked(&rows, &[0, 1, 2, 3], 0, &m, &Device::Cpu).unwrap();
    let (_, _, grads) =
        stackwise_worker::train::step::gradients(t.model(), t.params(), &[batch], &mut Local)
            .unwrap();
    for name in &names {
        let g = grads
            .get(name)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "zero gradient for {name}");
    }
}

#[test]
fn early_stopping_ends_a_stage_and_the_next_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    // A learning rate too small to move an f32 weight: every evaluation equals the first,
    // so with patience 1 each stage stops at its second evaluation.
    let out = dir.path().join("out");
    let mut cfg = config(
        &out,
        &data,
        "mode: layerwise, steps_per_stage: 10, objective: diffusion, time_step_masking: true, \
         patience: 1",
    );
    cfg.training.eval_every = 1;
    cfg.training.lr = 1.0e-30;
    let mut t = trainer(cfg, &RunOptions::default());
    let s = t.run(&RunOptions::default()).unwrap();
    // Stage 1 stops at step 2 and stage 2 starts at its planned first step, 10; the last
    // stage's early stop ends the run.
    assert_eq!(s.step, 22);
    assert!(s.stopped_early);
    let run = out.join("runs/st");
    let ends: Vec<(u64, u64, bool)> = metrics(&run)
        .iter()
        .filter(|r| r["stage_end"] == true)
        .map(|r| {
            assert!(r["val_loss_reference"].as_f64().unwrap().is_finite());
            (
                r["stage"].as_u64().unwrap(),
                r["step"].as_u64().unwrap(),
                r["stopped_early"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(ends, vec![(0, 2, true), (1, 12, true)]);
    let stages: HashMap<u64, usize> =
        metrics(&run)
            .iter()
            .filter(|r| r["loss"].is_number())
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r["stage"].as_u64().unwrap()).or_default() += 1;
                m
            });
    assert_eq!(stages, HashMap::from([(0, 2), (1, 2), (2, 2)]));
    for step in ["step-00000010", "step-00000020", "step-00000022"] {
        assert!(run.join("checkpoints").join(step).exists(), "{step}");
    }
}

#[test]
fn resume_in_the_middle_of_stage_2_of_3_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    let training = &fused_nf4_qlora(4);
    let straight_out = dir.path().join("straight");
    let mut straight = trainer(
        config(&straight_out, &data, training),
        &RunOptions::default(),
    );
    let s = straight.run(&RunOptions::default()).unwrap();
    assert_eq!(s.step, 12);

    let resumed_out = dir.path().join("resumed");
    let mut a = trainer(config(&resumed_out, &data, training), &until(6));
    a.run(&until(6)).unwrap();
    drop(a);
    let again = RunOptions {
        resume: true,
        ..Default::default()
    };
    let mut b = trainer(config(&resumed_out, &data, training), &again);
    assert_eq!(b.stage().trainable, vec![1], "resumed inside stage 2");
    let r = b.run(&again).unwrap();
    assert_eq!(r.step, 12);
    assert_eq!(
        s.train_loss.unwrap().to_bits(),
        r.train_loss.unwrap().to_bits()
    );
    let file = |out: &Path, f: &str| {
        std::fs::read(out.join(format!("runs/st/checkpoints/step-00000012/{f}"))).unwrap()
    };
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file(&straight_out, f) == file(&resumed_out, f),
            "{f} differs after resume"
        );
    }
    // Each stage with a quantized backbone has its full-precision backup, referenced by
    // the stage's checkpoints.
    for stage in ["01", "02"] {
        let p = resumed_out.join(format!(
            "runs/st/checkpoints/backups/stage-{stage}/model.safetensors"
        ));
        assert!(p.exists(), "{}", p.display());
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&file(&resumed_out, "MANIFEST.json")).unwrap();
    let refs: Vec<&str> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["object"].as_str())
        .collect();
    assert_eq!(
        refs,
        vec![
            "backups/stage-02/model.safetensors",
            "frozen/stage-02/frozen.safetensors"
        ]
    );
    let frozen = |out: &Path| {
        std::fs::read(out.join("runs/st/checkpoints/frozen/stage-02/frozen.safetensors")).unwrap()
    };
    assert!(frozen(&straight_out) == frozen(&resumed_out));
}

/// What the coordinator does: each stage in a fresh trainer, started from the checkpoint
/// that ended the stage before.
#[test]
fn a_trainer_per_stage_resumed_at_each_boundary_matches_one_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    let training = &fused_nf4_qlora(3);
    let straight_out = dir.path().join("straight");
    let mut straight = trainer(
        config(&straight_out, &data, training),
        &RunOptions::default(),
    );
    straight.run(&RunOptions::default()).unwrap();

    let staged_out = dir.path().join("staged");
    for (stage, end) in [(0, 3), (1, 6), (2, 9)] {
        let opts = RunOptions {
            resume: stage > 0,
            until_step: Some(end),
            ..Default::default()
        };
        let mut t = trainer(config(&staged_out, &data, training), &opts);
        assert_eq!(t.stage().trainable, vec![stage], "starts stage {stage}");
        assert_eq!(t.run(&opts).unwrap().step, end);
    }
    let file = |out: &Path, f: &str| {
        std::fs::read(out.join(format!("runs/st/checkpoints/step-00000009/{f}"))).unwrap()
    };
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            file(&straight_out, f) == file(&staged_out, f),
            "{f} differs"
        );
    }
    for f in [
        "backups/stage-02/model.safetensors",
        "frozen/stage-02/frozen.safetensors",
    ] {
        let read = |out: &Path| std::fs::read(out.join("runs/st/checkpoints").join(f)).unwrap();
        assert!(read(&straight_out) == read(&staged_out), "{f} differs");
    }
}

#[test]
fn frozen_tensors_are_written_once_per_stage_and_export_makes_a_standalone_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    let out = dir.path().join("out");
    let mut cfg = config(
        &out,
        &data,
        "mode: layerwise, steps_per_stage: 4, objective: diffusion, keep_last: 20",
    );
    cfg.training.checkpoint_every = 1;
    let mut t = trainer(cfg, &RunOptions::default());
    t.run(&RunOptions::default()).unwrap();
    let ck = out.join("runs/st/checkpoints");
    let manifest = |step: u64| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(ck.join(format!("step-{step:08}/MANIFEST.json"))).unwrap(),
        )
        .unwrap()
    };
    // Steps 9-12 are stage 2 (layer 2 on frozen layers 0-1): each references one object.
    for step in 9..=12 {
        let m = manifest(step);
        let frozen: Vec<&serde_json::Value> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["path"] == "frozen.safetensors")
            .collect();
        assert_eq!(frozen.len(), 1, "step {step}");
        assert_eq!(frozen[0]["object"], "frozen/stage-02/frozen.safetensors");
        assert!(
            !ck.join(format!("step-{step:08}/frozen.safetensors"))
                .exists()
        );
        let own = std::fs::read(ck.join(format!("step-{step:08}/model.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&own).unwrap();
        assert!(
            st.names()
                .iter()
                .all(|n| !n.starts_with("transformer.h.0.")),
            "step {step}"
        );
    }
    let v = common::run(bin().args(["ckpt", "verify"]).arg(ck.join("step-00000012")));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // export: one standalone folder with every tensor, which generate loads as it is.
    let exported = dir.path().join("exported");
    ok(bin()
        .args(["ckpt", "export"])
        .arg(ck.join("step-00000012"))
        .arg(&exported));
    let bytes = std::fs::read(exported.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.names().iter().any(|n| n.starts_with("transformer.h.0.")));
    assert!(st.names().iter().any(|n| n.starts_with("transformer.h.2.")));
    ok(bin().args(["generate", "--model"]).arg(&exported).args([
        "--prompt",
        "A",
        "--max-new-tokens",
        "4",
    ]));
    // A corrupted shared object fails the verification of the checkpoints that use it.
    let shared = ck.join("frozen/stage-02/frozen.safetensors");
    let mut b = std::fs::read(&shared).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&shared, b).unwrap();
    let o = common::run(bin().args(["ckpt", "verify"]).arg(ck.join("step-00000010")));
    assert!(!o.status.success());
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(listing.contains("frozen.safetensors"), "{listing}");
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn layerwise_config(dir: &Path, data: &Path) -> PathBuf {
    let p = dir.join("lw.yaml");
    std::fs::write(
        &p,
        format!(
            "run: {{name: lw, output: {}, seed: 9}}
model: {{d_model: 32, n_layers: 3, n_heads: 4, seq_len: 32}}
data: {{path: {}}}
training: {{mode: layerwise, objective: diffusion, time_step_masking: true, steps_per_stage: 30, batch_size: 8, lr: 1.0e-2, warmup_steps: 2, eval_every: 15, eval_batches: 4, checkpoint_every: 100, log_every: 1}}
",
            dir.join("out").display(),
            data.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn layerwise_on_two_workers_completes_every_stage_and_lowers_the_masked_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 40_000);
    let cfg = layerwise_config(dir.path(), &data);
    let plan = ok(bin().arg("plan").arg(&cfg));
    let table = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(
        table.contains("layer 2") && table.contains("L0-1 @fp32"),
        "{table}"
    );
    assert!(table.contains("0.15") && table.contains("0.90"), "{table}");
    let launch = ok(bin()
        .arg("launch")
        .arg(&cfg)
        .args(["--workers", "2", "--no-progress"]));
    // The coordinator runs the plan stage by stage: one generation per stage, each started
    // from the checkpoint that ended the one before.
    let log = String::from_utf8_lossy(&launch.stderr).to_string();
    for (generation, stage, from) in [
        (1, "1/3 layer 0", "from the start"),
        (2, "2/3 layer 1", "resuming from step-00000030"),
        (3, "3/3 layer 2", "resuming from step-00000060"),
    ] {
        let line = log
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "generation {generation} formed for stage {stage}:"
                ))
            })
            .unwrap_or_else(|| panic!("no generation {generation} for stage {stage}:\n{log}"));
        assert!(line.contains(from), "{line}");
    }
    let run = dir.path().join("out/runs/lw");
    let m = metrics(&run);
    let mut by_stage: HashMap<u64, Vec<&serde_json::Value>> = HashMap::new();
    for r in &m {
        by_stage
            .entry(r["stage"].as_u64().unwrap())
            .or_default()
            .push(r);
    }
    assert_eq!(by_stage.len(), 3, "all three stages ran");
    for stage in 0..3 {
        let rs = &by_stage[&stage];
        let vals: Vec<f64> = rs.iter().filter_map(|r| r["val_loss"].as_f64()).collect();
        assert_eq!(
            vals.len(),
            3,
            "stage {stage} evaluated at its start, mid-way and at its end"
        );
        assert_eq!(rs[0]["stage_start"], true);
        assert!(
            vals[2] < vals[0],
            "stage {stage}: validation masked loss {} -> {}",
            vals[0],
            vals[2]
        );
        assert!(
            rs.iter()
                .all(|r| r["val_loss"].is_null() || r["val_masked_accuracy"].as_f64().is_some())
        );
    }
    assert_eq!(m.last().unwrap()["step"], 90);
    // Each stage's result on one scale: the plan's fractions (each stage's own rises).
    let ends: Vec<&serde_json::Value> = m.iter().filter(|r| r["stage_end"] == true).collect();
    assert_eq!(ends.len(), 3, "{ends:?}");
    for (stage, r) in ends.iter().enumerate() {
        assert_eq!(r["stage"], stage as u64);
        assert_eq!(
            r["reference_mask_fractions"],
            serde_json::json!([0.15, 0.525, 0.9])
        );
        assert!(r["val_loss_reference"].as_f64().unwrap().is_finite());
    }
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(run.join("checkpoints/step-00000090/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["stage_results"].as_array().unwrap().len(), 3);
    // The stage boundaries are checkpoints; the last one is a 3-layer model the diffusion
    // sampler generates from.
    let ls = ok(bin().args(["ckpt", "ls"]).arg(&run));
    let listing = String::from_utf8_lossy(&ls.stdout).to_string();
    for step in ["step-00000060", "step-00000090"] {
        assert!(listing.contains(step), "{listing}");
    }
    let g = ok(bin().args(["generate", "--model"]).arg(&run).args([
        "--prompt",
        "MACBETH.",
        "--max-new-tokens",
        "16",
        "--json",
    ]));
    let out: serde_json::Value = serde_json::from_slice(&g.stdout).unwrap();
    assert_eq!(out["tokens"].as_array().unwrap().len(), 16);
    assert_eq!(out["sampler"], "diffusion");
}

#[test]
fn the_activation_cache_gives_the_same_training_and_hits_after_the_first_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 2_500); // ~70 samples: an epoch is ~18 steps
    let mut results = Vec::new();
    for cache in ["none", "memory", "disk", "store"] {
        let out = dir.path().join(cache);
        let cfg = config(
            &out,
            &data,
            &format!(
                "mode: layerwise, steps_per_stage: 30, objective: diffusion, time_step_masking: true, \
                 mask_seeds: 1, activation_cache: {cache}, activation_cache_dir: {}",
                dir.path().join("disk-cache").display()
            ),
        );
        let mut t = trainer(cfg, &RunOptions::default());
        t.run(&until(45)).unwrap(); // 15 steps into stage 1 (layer 1 on frozen layer 0)
        t.run(&until(60)).unwrap(); // through a second epoch
        let stats = t.activation_cache_stats();
        match cache {
            "none" => assert_eq!(stats, None),
            _ => {
                let (hits, misses) = stats.unwrap();
                assert!(
                    hits > 0 && misses > 0,
                    "{cache}: {hits} hits, {misses} misses"
                );
            }
        }
        let mut w = values(&t.params().tensors().unwrap());
        w.extend(values(&t.frozen().tensors().unwrap()));
        results.push((cache, w));
    }
    for (cache, w) in &results[1..] {
        assert!(*w == results[0].1, "{cache} cache changed the training");
    }
    // Entries live under the fingerprint of what produced them.
    let caches: Vec<_> = std::fs::read_dir(dir.path().join("store/runs/st/activation-cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    assert!(caches[0].join("stage-01/rank-0").exists());
}

#[test]
fn a_new_run_of_the_same_name_never_reads_another_runs_cached_activations() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 2_500);
    let run = |seed: u64, out: &str, until_step: u64, cache: &str| {
        let cache_dir = dir.path().join(cache);
        let mut cfg = config(
            &dir.path().join(out),
            &data,
            &format!(
                "mode: layerwise, steps_per_stage: 30, objective: diffusion, time_step_masking: true, \
                 mask_seeds: 1, activation_cache: disk, activation_cache_dir: {}",
                cache_dir.display()
            ),
        );
        cfg.run.seed = seed;
        let mut t = trainer(cfg, &RunOptions::default());
        t.run(&until(until_step)).unwrap();
        t.activation_cache_stats().unwrap()
    };
    // What a run of seed 6 hits on its own (samples its stage 1 sees twice).
    let alone = run(6, "alone", 60, "own-cache");
    // A first run fills the shared cache of stage 1 through more than an epoch.
    let (hits, _) = run(5, "a", 60, "shared");
    assert!(hits > 0);
    // Same name, same cache folder, other weights (seed): only its own entries hit.
    assert_eq!(
        run(6, "b", 60, "shared"),
        alone,
        "(hits, misses) with another run's cache"
    );
}

/// Tensor `name` of a checkpoint: from its own model.safetensors or its stage's shared
/// frozen tensors.
fn checkpoint_tensor(out: &Path, step: u64, name: &str) -> Vec<f32> {
    let ck = out.join("runs/st/checkpoints");
    let mut files = vec![ck.join(format!("step-{step:08}/model.safetensors"))];
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ck.join(format!("step-{step:08}/MANIFEST.json"))).unwrap(),
    )
    .unwrap();
    for f in m["files"].as_array().unwrap() {
        if f["path"] == "frozen.safetensors" {
            files.push(ck.join(f["object"].as_str().unwrap()));
        }
    }
    for file in files {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        if let Ok(t) = st.tensor(name) {
            return t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
        }
    }
    panic!("checkpoint {step} has no {name}")
}

#[test]
fn a_later_stage_unfreezes_from_the_full_precision_backup_not_the_quantized_values() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::dataset(dir.path(), 20_000);
    let out = dir.path().join("out");
    // Blocks of one layer, NF4 backbone; then a full fine-tune whose learning rate is too
    // small to move any weight, so its checkpoint shows where the unfrozen weights came from.
    let cfg = config(
        &out,
        &data,
        "mode: fused, total_blocks: 3, block_size: 1, steps_per_stage: 2, objective: diffusion, \
         quantization_type: nf4, keep_last: 10, \
         finetune: [{objective: clm, steps: 1, lr: 1.0e-30}]",
    );
    let mut t = trainer(cfg, &RunOptions::default());
    assert_eq!(t.run(&RunOptions::default()).unwrap().step, 7);
    let name = "transformer.h.0.mlp.c_fc.weight";
    let trained = checkpoint_tensor(&out, 2, name); // end of block 0, before quantizing
    let quantized = checkpoint_tensor(&out, 6, name); // as used while frozen (NF4)
    let unfrozen = checkpoint_tensor(&out, 7, name); // the fine-tune stage
    assert_ne!(trained, quantized);
    assert!(
        unfrozen == trained,
        "unfrozen from the rounded values, not the backup"
    );
}
