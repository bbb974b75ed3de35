//! Mixed precision for matrix products, as `torch.autocast(device_type, dtype=torch.bfloat16)`
//! has it: weights, activations, norms, softmax and the loss stay f32, and each matrix product
//! (projections, attention scores and mixing, the vocabulary head) multiplies bf16 (or f16) copies
//! of its f32 arguments and hands back f32. Gradients flow through the casts (candle's `to_dtype`
//! has a backward), so the optimizer keeps f32 master weights.
//!
//! The mode is per thread, as PyTorch's autocast state is: the thread that runs a model's forward
//! sets it (`training.autocast`, `--autocast`); the backward follows the casts the forward
//! recorded. Off by default. It works on every device, but is meant for GPUs: the CPU has no bf16
//! kernels faster than its f32 ones.

use std::cell::Cell;

use candle_core::{DType, Result, Tensor};
use stackwise_common::config::Autocast;

thread_local! {
    static MODE: Cell<Autocast> = const { Cell::new(Autocast::Off) };
}

/// Set this thread's autocast mode.
pub fn set(mode: Autocast) {
    MODE.with(|m| m.set(mode));
}

/// This thread's autocast mode.
pub fn get() -> Autocast {
    MODE.with(|m| m.get())
}

/// The dtype a product of `x` runs at: the autocast dtype, for f32 tensors.
fn compute_dtype(x: &Tensor) -> Option<DType> {
    if x.dtype() != DType::F32 {
        return None;
    }
    match get() {
        Autocast::Off => None,
        Autocast::Bf16 => Some(DType::BF16),
        Autocast::Fp16 => Some(DType::F16),
    }
}

/// `a.matmul(b)`, at the autocast dtype when one is set (f32 in, f32 out).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match compute_dtype(a) {
        Some(dt) => a
            .to_dtype(dt)?
            .matmul(&b.to_dtype(dt)?)?
            .to_dtype(DType::F32),
        None => a.matmul(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cpu::max_abs_diff as max_abs;
    use candle_core::{Device, Var};

    #[test]
    fn bf16_products_round_like_bf16_and_keep_f32_gradients() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (32, 48), &dev).unwrap()).unwrap();
        let b = Tensor::randn(0f32, 1.0, (48, 40), &dev).unwrap();
        let exact = a.as_tensor().matmul(&b).unwrap();
        set(Autocast::Bf16);
        let mixed = matmul(a.as_tensor(), &b).unwrap();
        set(Autocast::Off);
        assert_eq!(mixed.dtype(), DType::F32);
        // bf16 keeps 8 bits of mantissa: entries of size ~7 move by ~1e-2, not by f32 round-off.
        let d = max_abs(&mixed, &exact);
        assert!(d > 1e-3 && d < 0.25, "bf16 product differs from f32 by {d}");
        let g = mixed.sum_all().unwrap().backward().unwrap();
        let ga = g.get(a.as_tensor()).unwrap();
        assert_eq!(ga.dtype(), DType::F32);
        let want = exact.sum_all().unwrap().backward().unwrap();
        let d = max_abs(ga, want.get(a.as_tensor()).unwrap());
        assert!(d < 0.1, "gradient differs by {d}");
        // Off again: the plain product.
        assert_eq!(max_abs(&matmul(a.as_tensor(), &b).unwrap(), &exact), 0.0);
    }
}
