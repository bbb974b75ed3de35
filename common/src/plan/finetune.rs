//! The one-stage plans of fine-tunes on a frozen base: PEFT adapters (`training.adapter`) and
//! scaffold fusion (`scaffold:`).

use super::error::{PlanError, err};
use super::types::{BoftSpec, LoraSpec, Plan, ScaffoldStage, StagePlan};
use crate::config::{
    AdapterMethod, AdapterSection, AttentionMode, FuserMode, ModelConfig, Objective, Precision,
    ScaffoldSection, TrainingMode, TrainingSection, default_targets,
};

/// The one stage of an adapter fine-tune: every layer frozen (at the base's storage
/// precision), only the adapters train.
pub(super) fn adapter_plan(
    t: &TrainingSection,
    a: &AdapterSection,
    n_layers: usize,
) -> Result<Plan, PlanError> {
    if t.mode != TrainingMode::EndToEnd || t.qlora_enabled || !t.finetune.is_empty() {
        return err(
            "adapter",
            "an adapter fine-tune is one stage over the whole model: drop training.mode, qlora_enabled and finetune",
        );
    }
    if t.objective.is_masked() {
        return err(
            "adapter",
            format!(
                "fine-tunes causally: use objective clm or sft, not {:?}",
                t.objective
            ),
        );
    }
    let kind = match (a.method, a.base_precision) {
        (AdapterMethod::Boft, _) => "butterfly",
        (AdapterMethod::Lora, p) if p.is_nf4() => "qlora",
        (AdapterMethod::Lora, _) => "lora",
    };
    let lora = (a.method == AdapterMethod::Lora).then(|| LoraSpec {
        rank: a.r,
        alpha: a.lora_alpha,
        dropout: a.lora_dropout,
        rslora: a.use_rslora,
        targets: a.target_modules.clone(),
    });
    let boft = (a.method == AdapterMethod::Boft).then(|| BoftSpec {
        block_size: a.boft_block_size,
        block_num: a.boft_block_num,
        factors: a.boft_n_butterfly_factor,
        dropout: a.boft_dropout,
        targets: a.target_modules.clone(),
    });
    let objective = if t.objective == Objective::Sft {
        "sft"
    } else {
        "clm"
    };
    Ok(Plan {
        mode: "finetune".into(),
        stages: vec![StagePlan {
            adapters: lora,
            boft,
            ..frozen_base_stage(
                t,
                format!("fine-tune {objective} ({kind})"),
                n_layers,
                a.base_precision,
            )
        }],
    })
}

/// The one stage of a scaffold run: the whole base frozen, the scaffold's LoRA trains (and
/// the fusers, when trainable).
pub fn scaffold_plan(
    t: &TrainingSection,
    s: &ScaffoldSection,
    base: &ModelConfig,
    scaffold: &ModelConfig,
) -> Result<Plan, PlanError> {
    if t.mode != TrainingMode::EndToEnd || t.qlora_enabled || !t.finetune.is_empty() {
        return err(
            "mode",
            "a scaffold run is one stage (the scaffold's LoRA): drop training.mode, qlora_enabled and finetune",
        );
    }
    if t.objective != Objective::Sft {
        return err(
            "objective",
            format!(
                "a scaffold run trains on prompt/completion data, the loss on the completion only: set \
                 training.objective: sft (not {:?})",
                t.objective
            ),
        );
    }
    if t.gradient_checkpointing {
        return err(
            "gradient_checkpointing",
            "is not supported with a scaffold yet; set false",
        );
    }
    let targets = if s.lora.target_modules.is_empty() {
        default_targets(scaffold.family)
    } else {
        s.lora.target_modules.clone()
    };
    let lora = LoraSpec {
        rank: s.lora.r,
        alpha: s.lora.alpha,
        dropout: s.lora.dropout,
        rslora: false,
        targets,
    };
    Ok(Plan {
        mode: "scaffold".into(),
        stages: vec![StagePlan {
            scaffold: Some(ScaffoldStage {
                lora,
                train_fusers: s.fusers == FuserMode::Trainable,
            }),
            ..frozen_base_stage(
                t,
                format!(
                    "scaffold {:?} (LoRA r {}, fusers after layers {:?}, {})",
                    t.objective,
                    s.lora.r,
                    s.cross_attn_layers,
                    if s.fusers == FuserMode::Trainable {
                        "fusers train"
                    } else {
                        "fusers frozen"
                    }
                )
                .to_lowercase(),
                base.n_layers,
                s.base_precision,
            )
        }],
    })
}

/// One stage over the whole frozen base (`n_layers` layers stored at `precision`), causal,
/// with the run's steps and learning rate; the caller says what trains.
fn frozen_base_stage(
    t: &TrainingSection,
    name: String,
    n_layers: usize,
    precision: Precision,
) -> StagePlan {
    StagePlan {
        name,
        active_layers: n_layers,
        trainable: vec![],
        frozen: (0..n_layers).collect(),
        frozen_precision: precision,
        adapters: None,
        boft: None,
        scaffold: None,
        train_embeddings: false,
        train_head: false,
        objective: t.objective,
        attention: AttentionMode::Causal,
        mask_fractions: vec![],
        steps: t.steps,
        lr: t.lr,
    }
}
