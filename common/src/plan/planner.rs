//! The planner (DESIGN §3): a pure function from the training config and the model depth
//! to the list of stages. No I/O; `stackwise plan CONFIG` prints its table.

pub use super::error::PlanError;
use super::error::err;
use super::types::{LoraSpec, Plan, StagePlan};
use crate::config::{
    AttentionMode, FusionMode, MaskSchedule, ModelConfig, Objective, Precision, ScheduleShape,
    TrainConfig, TrainingMode, TrainingSection,
};

/// Per-layer mask fractions of a schedule: layer 0 at `min`, the last layer at `max`.
pub fn schedule_fractions(s: &MaskSchedule, n_layers: usize) -> Vec<f64> {
    (0..n_layers)
        .map(|k| {
            let x = if n_layers == 1 {
                0.0
            } else {
                k as f64 / (n_layers - 1) as f64
            };
            match s.kind {
                ScheduleShape::Linear => s.min + (s.max - s.min) * x,
                ScheduleShape::Exponential => s.min * (s.max / s.min).powf(x),
                ScheduleShape::Cosine => {
                    s.min + (s.max - s.min) * (1.0 - (std::f64::consts::PI * x).cos()) / 2.0
                }
            }
        })
        .collect()
}

fn attention_of(o: Objective) -> AttentionMode {
    if o.is_masked() {
        AttentionMode::Bidirectional
    } else {
        AttentionMode::Causal
    }
}

/// The plan of a training config: its model depth from `model.n_layers` or the
/// `init_from` folder's config.json.
pub fn plan_config(cfg: &TrainConfig) -> anyhow::Result<Plan> {
    if let Some(s) = &cfg.scaffold {
        if cfg.init_from.is_some() || cfg.training.adapter.is_some() {
            anyhow::bail!(
                "scaffold: the base is scaffold.base; drop init_from and training.adapter"
            );
        }
        s.validate()?;
        let folder = |p: &str| -> anyhow::Result<ModelConfig> {
            let dir = crate::checkpoint::model_folder(p)?;
            Ok(ModelConfig::read_hf_dir(std::path::Path::new(&dir))?)
        };
        let base = folder(&s.base)?;
        s.validate_for(base.n_layers, base.d_model)?;
        let scaffold = folder(&s.scaffold)?;
        return Ok(super::finetune::scaffold_plan(
            &cfg.training,
            s,
            &base,
            &scaffold,
        )?);
    }
    let n_layers = match &cfg.init_from {
        Some(dir) => ModelConfig::read_hf_dir(std::path::Path::new(dir))?.n_layers,
        None => {
            cfg.model
                .resolve(Some(cfg.model.vocab_size.unwrap_or(1)))?
                .n_layers
        }
    };
    if cfg.training.adapter.is_some() && cfg.init_from.is_none() {
        anyhow::bail!(
            "training.adapter fine-tunes a base model: set init_from to its folder (an HF model or a StackWise checkpoint)"
        );
    }
    Ok(plan(&cfg.training, n_layers)?)
}

/// The stages of a run of a model with `n_layers` layers.
pub fn plan(t: &TrainingSection, n_layers: usize) -> Result<Plan, PlanError> {
    if let Some(a) = &t.adapter {
        return super::finetune::adapter_plan(t, a, n_layers);
    }
    let masked = t.objective.is_masked();
    // Per-layer fractions when time-step masking is on.
    let layer_fractions: Option<Vec<f64>> = if t.time_step_masking {
        if !masked {
            return err(
                "time_step_masking",
                format!(
                    "needs a masked objective (mlm or diffusion), not {:?}",
                    t.objective
                ),
            );
        }
        let f = match &t.mask_fractions {
            Some(f) if f.len() != n_layers => {
                return err(
                    "mask_fractions",
                    format!(
                        "has {} fractions for {n_layers} layers; give one per layer",
                        f.len()
                    ),
                );
            }
            Some(f) => f.clone(),
            None => {
                let s = &t.mask_schedule;
                if !(0.0 < s.min && s.min <= s.max && s.max <= 1.0) {
                    return err(
                        "mask_schedule",
                        "needs 0 < min <= max <= 1, e.g. min 0.15, max 0.9",
                    );
                }
                schedule_fractions(s, n_layers)
            }
        };
        if let Some(bad) = f.iter().find(|&&x| !(x > 0.0 && x <= 1.0)) {
            return err(
                "mask_fractions",
                format!("{bad} is not in (0, 1]; a fraction is the share of tokens masked"),
            );
        }
        Some(f)
    } else {
        None
    };
    if t.objective == Objective::Mlm && !(t.mask_fraction > 0.0 && t.mask_fraction <= 1.0) {
        return err("mask_fraction", "must be in (0, 1], e.g. 0.15");
    }
    // The fractions a stage training `layers` uses.
    let fractions = |layers: &[usize]| -> Vec<f64> {
        match (&layer_fractions, t.objective) {
            (Some(f), _) => layers.iter().map(|&k| f[k]).collect(),
            (None, Objective::Mlm) => vec![t.mask_fraction],
            // Diffusion without time-step masking: t ~ U(0, 1] per sequence (MDLM).
            _ => Vec::new(),
        }
    };
    let adapters = t
        .qlora_enabled
        .then(|| LoraSpec::new(t.qlora_rank, t.qlora_alpha));
    if t.qlora_enabled && t.qlora_rank == 0 {
        return err("qlora_rank", "must be at least 1, e.g. 8");
    }

    // Pre-training stages as (name, trained layers, frozen layers).
    let groups: Vec<(String, Vec<usize>, Vec<usize>)> = match t.mode {
        TrainingMode::EndToEnd => vec![("end-to-end".into(), (0..n_layers).collect(), vec![])],
        TrainingMode::Layerwise => (0..n_layers)
            .map(|k| (format!("layer {k}"), vec![k], (0..k).collect()))
            .collect(),
        TrainingMode::Blockwise => {
            let Some(bs) = t.block_size.filter(|&b| b > 0) else {
                return err(
                    "block_size",
                    "blockwise mode needs block_size (layers per block), e.g. 2",
                );
            };
            (0..n_layers.div_ceil(bs))
                .map(|b| {
                    let layers: Vec<usize> = (b * bs..((b + 1) * bs).min(n_layers)).collect();
                    (
                        block_name(b, &layers),
                        layers.clone(),
                        (0..layers[0]).collect(),
                    )
                })
                .collect()
        }
        TrainingMode::Fused => {
            let (Some(nb), Some(bs)) = (t.total_blocks, t.block_size) else {
                return err(
                    "total_blocks",
                    "fused mode needs total_blocks and block_size (total_blocks * block_size = model.n_layers)",
                );
            };
            if nb == 0 || bs == 0 || nb * bs != n_layers {
                return err(
                    "total_blocks",
                    format!(
                        "total_blocks ({nb}) * block_size ({bs}) must equal model.n_layers ({n_layers})"
                    ),
                );
            }
            (0..nb)
                .map(|b| {
                    let block: Vec<usize> = (b * bs..(b + 1) * bs).collect();
                    match t.fusion_mode {
                        FusionMode::Frozen => (block_name(b, &block), block, (0..b * bs).collect()),
                        FusionMode::Trainable => (
                            format!("blocks 0-{b} (layers 0-{})", (b + 1) * bs - 1),
                            (0..(b + 1) * bs).collect(),
                            vec![],
                        ),
                    }
                })
                .collect()
        }
    };
    let n = groups.len() as u64;
    let per_stage = |i: u64| -> u64 {
        match t.steps_per_stage {
            Some(s) => s,
            None => t.steps / n + u64::from(i < t.steps % n),
        }
    };
    if t.steps_per_stage == Some(0) || (t.steps_per_stage.is_none() && t.steps < n) {
        return err(
            "steps",
            format!("{n} stages need at least one step each; raise steps (or set steps_per_stage)"),
        );
    }
    let mut stages: Vec<StagePlan> = groups
        .into_iter()
        .enumerate()
        .map(|(i, (name, trainable, frozen))| {
            let active = trainable.iter().chain(&frozen).max().map_or(0, |m| m + 1);
            let has_frozen = !frozen.is_empty();
            StagePlan {
                name,
                active_layers: active,
                mask_fractions: fractions(&trainable),
                train_embeddings: trainable.contains(&0),
                train_head: true,
                frozen_precision: if has_frozen {
                    t.quantization_type
                } else {
                    Precision::Fp32
                },
                adapters: adapters.clone().filter(|_| has_frozen),
                boft: None,
                scaffold: None,
                trainable,
                frozen,
                objective: t.objective,
                attention: attention_of(t.objective),
                steps: per_stage(i as u64),
                lr: t.lr,
            }
        })
        .collect();
    for (i, f) in t.finetune.iter().enumerate() {
        if f.objective.is_masked() {
            return err(
                "finetune",
                format!(
                    "stage {i}: a fine-tune stage is causal; use objective clm or sft, not {:?}",
                    f.objective
                ),
            );
        }
        if f.steps == 0 {
            return err("finetune", format!("stage {i}: steps must be at least 1"));
        }
        let lora = match f.adapters.as_deref() {
            None | Some("none") => false,
            Some("lora") => true,
            Some(other) => {
                return err(
                    "finetune",
                    format!("stage {i}: adapters {other:?}: use lora or none"),
                );
            }
        };
        let all: Vec<usize> = (0..n_layers).collect();
        let objective = match f.objective {
            Objective::Sft => "sft",
            _ => "clm",
        };
        stages.push(StagePlan {
            name: format!("fine-tune {objective}{}", if lora { " (lora)" } else { "" }),
            active_layers: n_layers,
            trainable: if lora { vec![] } else { all.clone() },
            frozen: if lora { all } else { vec![] },
            frozen_precision: if lora {
                f.precision.unwrap_or(Precision::Fp32)
            } else {
                Precision::Fp32
            },
            adapters: lora.then(|| LoraSpec::new(t.qlora_rank.max(1), t.qlora_alpha)),
            boft: None,
            scaffold: None,
            train_embeddings: !lora,
            train_head: !lora,
            objective: f.objective,
            attention: AttentionMode::Causal,
            mask_fractions: vec![],
            steps: f.steps,
            lr: f.lr.unwrap_or(t.lr),
        });
    }
    let mode = match t.mode {
        TrainingMode::EndToEnd => "end_to_end",
        TrainingMode::Layerwise => "layerwise",
        TrainingMode::Blockwise => "blockwise",
        TrainingMode::Fused => "fused",
    };
    Ok(Plan {
        mode: mode.into(),
        stages,
    })
}

fn block_name(b: usize, layers: &[usize]) -> String {
    match layers {
        [one] => format!("block {b} (layer {one})"),
        _ => format!(
            "block {b} (layers {}-{})",
            layers[0],
            layers[layers.len() - 1]
        ),
    }
}

fn ranges(layers: &[usize]) -> String {
    if layers.is_empty() {
        return "-".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut start = layers[0];
    let mut prev = start;
    for &l in &layers[1..] {
        if l != prev + 1 {
            out.push(span(start, prev));
            start = l;
        }
        prev = l;
    }
    out.push(span(start, prev));
    out.join(",")
}

fn span(a: usize, b: usize) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

/// The stage table `stackwise plan` prints.
pub fn table(p: &Plan) -> String {
    let header = [
        "#",
        "stage",
        "trains",
        "frozen",
        "adapters",
        "objective",
        "attention",
        "mask",
        "steps",
        "lr",
    ];
    let rows: Vec<Vec<String>> = p
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut trains = vec![];
            if s.train_embeddings {
                trains.push("emb".to_string());
            }
            if !s.trainable.is_empty() {
                trains.push(format!("L{}", ranges(&s.trainable)));
            }
            if s.train_head {
                trains.push("head".to_string());
            }
            let frozen = if s.frozen.is_empty() {
                "-".to_string()
            } else {
                format!("L{} @{}", ranges(&s.frozen), s.frozen_precision.name())
            };
            let adapters = match &s.adapters {
                Some(a) => format!(
                    "{}lora r{} a{}",
                    if s.frozen_precision.is_nf4() { "q" } else { "" },
                    a.rank,
                    a.alpha
                ),
                None => "-".into(),
            };
            let mask = match (s.objective, s.mask_fractions.as_slice()) {
                (Objective::Diffusion, []) => "U(0,1]".to_string(),
                (_, []) => "-".to_string(),
                (_, f) => f
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(","),
            };
            vec![
                i.to_string(),
                s.name.clone(),
                if trains.is_empty() {
                    "adapters only".into()
                } else {
                    trains.join("+")
                },
                frozen,
                adapters,
                format!("{:?}", s.objective).to_lowercase(),
                format!("{:?}", s.attention).to_lowercase(),
                mask,
                s.steps.to_string(),
                format!("{:.1e}", s.lr),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out.push_str(&format!(
        "{} stages, {} steps ({} mode)\n",
        p.stages.len(),
        p.total_steps(),
        p.mode
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TrainingSection {
        TrainingSection {
            objective: Objective::Diffusion,
            steps: 120,
            ..Default::default()
        }
    }

    #[test]
    fn end_to_end_is_one_stage_training_everything() {
        let p = plan(&base(), 4).unwrap();
        assert_eq!(p.stages.len(), 1);
        let s = &p.stages[0];
        assert_eq!((s.trainable.clone(), s.frozen.len()), (vec![0, 1, 2, 3], 0));
        assert!(s.train_embeddings && s.train_head);
        assert_eq!(s.attention, AttentionMode::Bidirectional);
        assert_eq!(s.steps, 120);
        assert!(s.mask_fractions.is_empty(), "diffusion samples t ~ U(0,1]");
    }

    #[test]
    fn layerwise_trains_one_layer_per_stage_on_a_frozen_prefix() {
        let t = TrainingSection {
            mode: TrainingMode::Layerwise,
            time_step_masking: true,
            steps: 10,
            ..base()
        };
        let p = plan(&t, 3).unwrap();
        let rows: Vec<_> = p
            .stages
            .iter()
            .map(|s| {
                (
                    s.active_layers,
                    s.trainable.clone(),
                    s.frozen.clone(),
                    s.train_embeddings,
                    s.steps,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (1, vec![0], vec![], true, 4),
                (2, vec![1], vec![0], false, 3),
                (3, vec![2], vec![0, 1], false, 3),
            ]
        );
        // The default schedule: linear 0.15 -> 0.90.
        let f: Vec<f64> = p.stages.iter().map(|s| s.mask_fractions[0]).collect();
        assert!((f[0] - 0.15).abs() < 1e-12 && (f[1] - 0.525).abs() < 1e-12);
        assert!((f[2] - 0.90).abs() < 1e-12);
        assert_eq!(p.total_steps(), 10);
        assert_eq!((p.stage_start(1), p.stage_end(1)), (4, 7));
    }

    #[test]
    fn blockwise_groups_layers_and_keeps_a_short_last_block() {
        let t = TrainingSection {
            mode: TrainingMode::Blockwise,
            block_size: Some(2),
            steps_per_stage: Some(5),
            objective: Objective::Mlm,
            ..base()
        };
        let p = plan(&t, 5).unwrap();
        let got: Vec<_> = p
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.trainable.clone(), s.frozen.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("block 0 (layers 0-1)", vec![0, 1], vec![]),
                ("block 1 (layers 2-3)", vec![2, 3], vec![0, 1]),
                ("block 2 (layer 4)", vec![4], vec![0, 1, 2, 3]),
            ]
        );
        assert!(p.stages.iter().all(|s| s.mask_fractions == vec![0.15]));
        assert_eq!(p.total_steps(), 15);
        assert!(
            plan(
                &TrainingSection {
                    block_size: None,
                    ..t
                },
                5
            )
            .is_err()
        );
    }

    #[test]
    fn fused_frozen_quantizes_the_backbone_and_adds_qlora() {
        let fr = vec![
            0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99,
        ];
        let t = TrainingSection {
            mode: TrainingMode::Fused,
            total_blocks: Some(3),
            block_size: Some(4),
            quantization_type: Precision::Fp16,
            qlora_enabled: true,
            time_step_masking: true,
            mask_fractions: Some(fr.clone()),
            steps: 30,
            ..base()
        };
        let p = plan(&t, 12).unwrap();
        assert_eq!(p.stages.len(), 3);
        for (b, s) in p.stages.iter().enumerate() {
            assert_eq!(s.trainable, (4 * b..4 * b + 4).collect::<Vec<_>>());
            assert_eq!(s.frozen, (0..4 * b).collect::<Vec<_>>());
            assert_eq!(s.mask_fractions, fr[4 * b..4 * b + 4].to_vec());
            assert_eq!(s.active_layers, 4 * b + 4);
            assert_eq!(
                s.adapters.is_some(),
                b > 0,
                "adapters only on a frozen backbone"
            );
            assert_eq!(
                s.frozen_precision,
                if b > 0 {
                    Precision::Fp16
                } else {
                    Precision::Fp32
                }
            );
        }
        let table = table(&p);
        assert!(table.contains("L0-7 @fp16"), "{table}");
        assert!(table.contains("0.85,0.90,0.95,0.99"), "{table}");
        // Blocks must cover the model exactly.
        assert!(plan(&t, 10).is_err());
    }

    #[test]
    fn fused_trainable_trains_every_block_so_far() {
        let t = TrainingSection {
            mode: TrainingMode::Fused,
            fusion_mode: FusionMode::Trainable,
            total_blocks: Some(2),
            block_size: Some(2),
            steps: 4,
            ..base()
        };
        let p = plan(&t, 4).unwrap();
        assert_eq!(p.stages[1].trainable, vec![0, 1, 2, 3]);
        assert!(p.stages[1].frozen.is_empty() && p.stages[1].adapters.is_none());
    }

    #[test]
    fn finetune_stages_are_causal_and_lora_freezes_the_base() {
        let t = TrainingSection {
            mode: TrainingMode::Layerwise,
            steps: 2,
            finetune: vec![
                crate::config::FinetuneStage {
                    objective: Objective::Clm,
                    steps: 3,
                    lr: Some(1e-4),
                    adapters: Some("lora".into()),
                    precision: Some(Precision::Nf4),
                },
                crate::config::FinetuneStage {
                    objective: Objective::Sft,
                    steps: 2,
                    lr: None,
                    adapters: None,
                    precision: None,
                },
            ],
            ..base()
        };
        let p = plan(&t, 2).unwrap();
        assert_eq!(p.stages.len(), 4);
        let q = &p.stages[2];
        assert_eq!(q.attention, AttentionMode::Causal);
        assert!(q.trainable.is_empty() && q.frozen == vec![0, 1] && q.adapters.is_some());
        assert_eq!((q.frozen_precision, q.lr), (Precision::Nf4, 1e-4));
        let full = &p.stages[3];
        assert_eq!(full.trainable, vec![0, 1]);
        assert!(full.train_embeddings && full.adapters.is_none());
        assert!(table(&p).contains("qlora r8"));
    }

    #[test]
    fn schedules_run_from_min_to_max() {
        for kind in [
            ScheduleShape::Linear,
            ScheduleShape::Exponential,
            ScheduleShape::Cosine,
        ] {
            let f = schedule_fractions(
                &MaskSchedule {
                    kind,
                    min: 0.15,
                    max: 0.9,
                },
                6,
            );
            assert!((f[0] - 0.15).abs() < 1e-12 && (f[5] - 0.9).abs() < 1e-12);
            assert!(f.windows(2).all(|w| w[0] < w[1]), "{kind:?}: {f:?}");
        }
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let t = TrainingSection {
            time_step_masking: true,
            mask_fractions: Some(vec![0.5, 1.5]),
            ..base()
        };
        let e = plan(&t, 2).unwrap_err().to_string();
        assert!(e.contains("mask_fractions") && e.contains("1.5"), "{e}");
        let t = TrainingSection {
            time_step_masking: true,
            objective: Objective::Clm,
            ..base()
        };
        assert!(plan(&t, 2).unwrap_err().to_string().contains("masked"));
        let t = TrainingSection {
            mode: TrainingMode::Layerwise,
            steps: 2,
            ..base()
        };
        assert!(plan(&t, 3).unwrap_err().to_string().contains("3 stages"));
    }
}
