//! Dropout on an adapter's input while training (PEFT's `lora_dropout`), reproducible: a mask
//! depends only on the step's seed, the micro-batch and the module, never on a global RNG, so a
//! resumed run draws the masks the uninterrupted run drew, and a block recomputed in the
//! backward (gradient checkpointing) draws the forward's mask again.
//!
//! The trainer opens a [`TrainingScope`] around each micro-batch's forward and backward; outside
//! one (evaluation, generation, serving) dropout is the identity.

use std::cell::Cell;

use candle_core::{Result, Tensor};
use stackwise_common::rng::Rng;

thread_local! {
    static SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// While alive, adapter dropout is on with masks drawn from `seed`; dropped, it is off again.
pub struct TrainingScope {
    before: Option<u64>,
}

impl TrainingScope {
    /// The scope of micro-batch `micro` of optimizer step `step` on `rank`.
    pub fn enter(step: u64, micro: usize, rank: usize) -> Self {
        let seed = Rng::derive(step, &format!("dropout/{rank}/{micro}")).next_u64();
        let before = SEED.with(|s| s.replace(Some(seed)));
        Self { before }
    }
}

impl Drop for TrainingScope {
    fn drop(&mut self) {
        SEED.with(|s| s.set(self.before));
    }
}

/// A module's key for its dropout draws: a hash of its name (FNV-1a).
pub fn module_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The draws of `module` (a [`module_key`]) in the scope of `seed`.
fn draws(seed: u64, module: u64) -> Rng {
    let mut rng = Rng::new(seed ^ module);
    rng.next_u64();
    rng
}

/// `x` with each entry zeroed with probability `p` and the rest scaled by `1 / (1 - p)`, inside
/// a training scope; `x` itself outside one or when `p` is 0. `module` (a [`module_key`]) keeps
/// each layer's masks independent of every other layer's.
pub fn apply(x: &Tensor, p: f64, module: u64) -> Result<Tensor> {
    let Some(seed) = SEED.with(|s| s.get()).filter(|_| p > 0.0) else {
        return Ok(x.clone());
    };
    if p >= 1.0 {
        return x.zeros_like();
    }
    let mut rng = draws(seed, module);
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.uniform() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * mask
}

/// BOFT's multiplicative dropout (PEFT's `MultiplicativeDropoutLayer`), inside a training
/// scope and for `p > 0`: a `(factors x blocks)` keep mask, 1 everywhere but at
/// `floor(p * blocks)` random blocks of one random factor, which become the identity.
pub fn block_mask(p: f64, factors: usize, blocks: usize, module: u64) -> Option<Vec<f32>> {
    let seed = SEED.with(|s| s.get()).filter(|_| p > 0.0)?;
    let mut rng = draws(seed, module);
    let factor = rng.below(factors as u64) as usize;
    // A uniform random subset of the factor's blocks (a partial Fisher-Yates shuffle).
    let mut order: Vec<usize> = (0..blocks).collect();
    let dropped = ((p * blocks as f64) as usize).min(blocks);
    for i in 0..dropped {
        let j = i + rng.below((blocks - i) as u64) as usize;
        order.swap(i, j);
    }
    let mut mask = vec![1f32; factors * blocks];
    for &k in &order[..dropped] {
        mask[factor * blocks + k] = 0.0;
    }
    Some(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn masks_are_reproducible_per_scope_and_module_and_off_outside_training() {
        let x = Tensor::ones((64, 128), candle_core::DType::F32, &Device::Cpu).unwrap();
        let vals = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            vals(apply(&x, 0.25, module_key("a")).unwrap()),
            vals(x.clone())
        );
        let (a1, a2, b, other_step) = {
            let _s = TrainingScope::enter(7, 0, 0);
            let a1 = vals(apply(&x, 0.25, module_key("a")).unwrap());
            let a2 = vals(apply(&x, 0.25, module_key("a")).unwrap());
            let b = vals(apply(&x, 0.25, module_key("b")).unwrap());
            drop(_s);
            let _t = TrainingScope::enter(8, 0, 0);
            (a1, a2, b, vals(apply(&x, 0.25, module_key("a")).unwrap()))
        };
        assert_eq!(a1, a2, "the same scope and module draw the same mask");
        assert_ne!(a1, b);
        assert_ne!(a1, other_step);
        // About a quarter dropped; the kept ones scaled so the mean stays 1.
        let dropped = a1.iter().filter(|&&v| v == 0.0).count() as f64 / a1.len() as f64;
        assert!((dropped - 0.25).abs() < 0.03, "{dropped}");
        assert!(a1.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        // The scope ended: off again.
        assert_eq!(vals(apply(&x, 0.25, module_key("a")).unwrap()), vals(x));
    }

    #[test]
    fn boft_block_masks_drop_a_share_of_one_factor_only_while_training() {
        assert!(block_mask(0.5, 3, 8, 7).is_none());
        let _s = TrainingScope::enter(3, 1, 0);
        assert!(block_mask(0.0, 3, 8, 7).is_none());
        let m = block_mask(0.5, 3, 8, 7).unwrap();
        assert_eq!(m, block_mask(0.5, 3, 8, 7).unwrap());
        let zeros: Vec<usize> = (0..24).filter(|&i| m[i] == 0.0).collect();
        assert_eq!(zeros.len(), 4, "{m:?}");
        assert!(
            zeros.iter().all(|&i| i / 8 == zeros[0] / 8),
            "one factor only: {m:?}"
        );
    }
}
