//! What a scaffold stage trains (DESIGN: a frozen base steered by a LoRA-adapted scaffold
//! model through the fusers of `fuser.rs`): the scaffold frozen with LoRA on its targets, and
//! the fusers, trainable or frozen at their seeded init.

use std::collections::HashMap;

use candle_core::{Device, Result, Tensor};
use stackwise_common::config::{ModelConfig, Precision, ScaffoldPool};
use stackwise_common::plan::LoraSpec;

use super::decoder::{Fusion, Transformer};
use super::fuser::Fusers;
use super::params::{FrozenSet, ParamBuilder, Params, StagePolicy};

/// The prefix of the scaffold model's parameters inside a scaffold run's trainer.
pub const SCAFFOLD_PREFIX: &str = "scaffold.";

/// What a scaffold stage trains: the scaffold's LoRA, and the fusers when `train_fusers`.
pub struct TrainingParts {
    pub fusion: Fusion,
    /// Trainable parameters, named `scaffold.…` and `fusers.…`.
    pub params: Params,
    /// The scaffold's frozen weights (`scaffold.…`) and frozen fusers.
    pub frozen: FrozenSet,
}

/// What a scaffold stage builds from (`weights`: the scaffold's frozen weights, plus LoRA
/// factors when resuming; `fusers`: fuser tensors when resuming).
pub struct TrainingSetup<'a> {
    pub scaffold_cfg: &'a ModelConfig,
    pub weights: HashMap<String, Tensor>,
    pub fusers: HashMap<String, Tensor>,
    pub lora: &'a LoraSpec,
    pub train_fusers: bool,
    pub layers: &'a [usize],
    pub d_base: usize,
    pub heads: usize,
    pub pool: ScaffoldPool,
    pub influence: f64,
    pub seed: u64,
}

impl TrainingSetup<'_> {
    pub fn build(self, device: &Device) -> Result<TrainingParts> {
        let policy = StagePolicy {
            lora: Some(self.lora.clone()),
            ..StagePolicy::frozen(Precision::Fp32)
        };
        let mut sp = ParamBuilder::for_stage(self.weights, self.seed, policy, device);
        let scaffold = Transformer::build(self.scaffold_cfg, &mut sp, device)?;
        let (params, frozen, _) = sp.finish_stage();
        let mut fp = if self.train_fusers {
            ParamBuilder::trainable(self.fusers, self.seed, device)
        } else {
            let policy = StagePolicy::frozen(Precision::Fp32);
            ParamBuilder::for_stage(self.fusers, self.seed, policy, device)
        };
        let fusers = Fusers::build(
            &mut fp,
            self.layers,
            (self.d_base, self.scaffold_cfg.d_model),
            self.heads,
            self.pool,
            self.influence,
        )?;
        let fusion = Fusion { scaffold, fusers };
        let (fuser_params, fuser_frozen, _) = fp.finish_stage();
        let mut params = params.prefixed(SCAFFOLD_PREFIX);
        params.extend(fuser_params);
        let mut frozen = frozen.prefixed(SCAFFOLD_PREFIX);
        frozen.extend(fuser_frozen);
        Ok(TrainingParts {
            fusion,
            params,
            frozen,
        })
    }
}

/// The weights of `all` under `prefix`, with the prefix removed (into any map).
pub fn strip_prefix<'a, M>(
    all: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    prefix: &str,
) -> M
where
    M: FromIterator<(String, Tensor)>,
{
    all.into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fuser::{FUSER_PREFIX, ScaffoldInput};
    use crate::models::testing::{max_diff, tiny};
    use stackwise_common::config::{AttentionMode, Family};

    /// A frozen GPT-2 base (width 32) and a LLaMA scaffold of width 48 with LoRA, fused
    /// after both base layers.
    fn fused(train_fusers: bool, pool: ScaffoldPool) -> (Transformer, Params) {
        let dev = Device::Cpu;
        let base_cfg = tiny(Family::Gpt2, AttentionMode::Causal, None);
        let mut s_cfg = tiny(Family::Llama, AttentionMode::Causal, None);
        s_cfg.d_model = 48;
        s_cfg.head_dim = 12;
        s_cfg.d_ff = 96;
        let (_, sp) = Transformer::init(&s_cfg, 3, &dev).unwrap();
        let weights: HashMap<String, Tensor> = sp.tensors().unwrap().into_iter().collect();
        let mut bp = ParamBuilder::for_stage(
            HashMap::new(),
            1,
            StagePolicy::frozen(Precision::Fp32),
            &dev,
        );
        let mut base = Transformer::build(&base_cfg, &mut bp, &dev).unwrap();
        let lora = LoraSpec {
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            ..LoraSpec::new(4, 8.0)
        };
        let parts = TrainingSetup {
            scaffold_cfg: &s_cfg,
            weights,
            fusers: HashMap::new(),
            lora: &lora,
            train_fusers,
            layers: &[1, 0],
            d_base: 32,
            heads: 4,
            pool,
            influence: 1.0,
            seed: 5,
        }
        .build(&dev)
        .unwrap();
        base.fusion = Some(std::sync::Arc::new(parts.fusion));
        (base, parts.params)
    }

    fn prompts() -> ScaffoldInput {
        ScaffoldInput::new(&[vec![3, 4, 5], vec![7, 8]], 0, 0, &Device::Cpu).unwrap()
    }

    fn ids() -> Tensor {
        Tensor::new(&[[1u32, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]], &Device::Cpu).unwrap()
    }

    #[test]
    fn influence_zero_is_the_base_exactly_and_one_is_not() {
        for pool in [ScaffoldPool::None, ScaffoldPool::Mean] {
            let (m, _) = fused(false, pool);
            let f = m.fusion.as_ref().unwrap();
            let base = m.forward(&ids(), 0, None).unwrap();
            let zero = f.context(&prompts(), 0.0).unwrap();
            let at0 = m.forward_fused(&ids(), 0, None, Some(&zero)).unwrap();
            assert_eq!(max_diff(&base, &at0), 0.0, "{pool:?}");
            let one = f.context(&prompts(), 1.0).unwrap();
            let at1 = m.forward_fused(&ids(), 0, None, Some(&one)).unwrap();
            assert!(max_diff(&base, &at1) > 1e-3, "{pool:?}");
        }
    }

    #[test]
    fn padding_of_the_prompts_does_not_change_the_result() {
        let (m, _) = fused(false, ScaffoldPool::None);
        let f = m.fusion.as_ref().unwrap();
        let tight = f.context(&prompts(), 1.0).unwrap();
        let wide = ScaffoldInput::new(&[vec![3, 4, 5], vec![7, 8]], 9, 0, &Device::Cpu).unwrap();
        let wide = f.context(&wide, 1.0).unwrap();
        let a = m.forward_fused(&ids(), 0, None, Some(&tight)).unwrap();
        let b = m.forward_fused(&ids(), 0, None, Some(&wide)).unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
    }

    #[test]
    fn gradients_reach_only_the_scaffold_lora_and_trainable_fusers() {
        for train_fusers in [false, true] {
            let (m, params) = fused(train_fusers, ScaffoldPool::None);
            let names: Vec<&String> = params.vars.keys().collect();
            assert!(
                names
                    .iter()
                    .all(|n| n.contains(".lora_") || n.starts_with(FUSER_PREFIX))
            );
            assert_eq!(
                names.iter().any(|n| n.starts_with(FUSER_PREFIX)),
                train_fusers
            );
            let f = m.fusion.as_ref().unwrap();
            let ctx = f.context(&prompts(), 1.0).unwrap();
            let loss = m
                .forward_fused(&ids(), 0, None, Some(&ctx))
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let g = loss.backward().unwrap();
            for (name, var) in &params.vars {
                assert!(g.get(var.as_tensor()).is_some(), "{name} has no gradient");
            }
            // B starts at zero, so the LoRA's gradient is on B; A's follows once B moves.
            let b = params
                .vars
                .iter()
                .find(|(n, _)| n.ends_with("lora_B.weight"))
                .unwrap()
                .1;
            let gb = g
                .get(b.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert!(gb.to_scalar::<f32>().unwrap() > 0.0);
        }
    }

    #[test]
    fn the_fuser_gradient_matches_finite_differences() {
        let (m, params) = fused(true, ScaffoldPool::None);
        let f = m.fusion.as_ref().unwrap();
        let loss = |m: &Transformer| -> f64 {
            let ctx = m.fusion.as_ref().unwrap().context(&prompts(), 1.0).unwrap();
            let y = m.forward_fused(&ids(), 0, None, Some(&ctx)).unwrap();
            (y.sin()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()) as f64
        };
        let ctx = f.context(&prompts(), 1.0).unwrap();
        let y = m.forward_fused(&ids(), 0, None, Some(&ctx)).unwrap();
        let g = y.sin().unwrap().sum_all().unwrap().backward().unwrap();
        for name in [
            "fusers.0.v_proj.weight",
            "fusers.1.gate.weight",
            "fusers.0.q_proj.weight",
        ] {
            let var = params.get(name).unwrap();
            let analytic = g
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for i in [0usize, 7, 33] {
                let h = 1e-2f32;
                let mut v = orig.clone();
                v[i] += h;
                var.set(&Tensor::from_vec(v.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let up = loss(&m);
                v[i] -= 2.0 * h;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let down = loss(&m);
                var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let numeric = (up - down) / (2.0 * h as f64);
                assert!(
                    (numeric - analytic[i] as f64).abs() < 2e-2 * (1.0 + numeric.abs()),
                    "{name}[{i}]: numeric {numeric} analytic {}",
                    analytic[i]
                );
            }
        }
    }
}
