//! Shared pieces of the fused CPU kernels: storage access and the test comparison helper.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

/// The f32 data of a contiguous CPU input, or an error naming the kernel.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &'static str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: expected a contiguous input"),
        _ => candle_core::bail!("{op}: expected f32 storage"),
    }
}

/// True when the fused CPU kernels apply (f32 on the CPU); elsewhere ops use candle compositions.
pub(crate) fn fused_ok(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

/// Largest absolute difference between two tensors of the same shape (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes")
}

/// Gradients of `sum(y * probe)`: backpropagates an arbitrary upstream gradient `probe` (tests).
#[cfg(test)]
pub(crate) fn probe_grads(y: Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
    (y * probe)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("backward")
}
