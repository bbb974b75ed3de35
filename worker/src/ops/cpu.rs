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

/// The f32 data of a contiguous CPU tensor, from its `Tensor::storage_and_layout` guard;
/// an error naming the kernel for any other storage.
pub(crate) fn storage_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    op: &'static str,
) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(s) => f32_slice(s, l, op),
        _ => candle_core::bail!("{op}: expected a CPU tensor"),
    }
}

/// Runs `f` compiled for the widest vector instructions this CPU has, chosen at run time
/// (AVX-512 or AVX2 + FMA on x86-64, through `pulp`): the default build stays portable
/// (baseline x86-64 is SSE2, four lanes) and the fused kernels' loops still vectorise to the
/// machine. Only the width changes: Rust neither fuses multiply-adds nor reorders float sums,
/// so the results are bitwise those of the baseline code. Call it inside each parallel task.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// The vector level `simd` runs at on this CPU: `avx512` (in a build with the `avx512`
/// feature, the default), `avx2` (with FMA) or `baseline`
/// (printed beside benchmark figures).
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    match pulp::Arch::new() {
        #[cfg(feature = "avx512")]
        pulp::Arch::V4(_) => "avx512",
        pulp::Arch::V3(_) => "avx2",
        _ => "baseline",
    }
    #[cfg(not(target_arch = "x86_64"))]
    "baseline"
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

#[cfg(test)]
mod tests {
    /// The fused kernels' loops run at the widest level the CPU has: fails when run-time
    /// dispatch is lost (pulp's `x86-v4` feature dropped, or its detection broken).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_dispatches_to_the_widest_level_this_cpu_has() {
        use std::arch::is_x86_feature_detected as has;
        let v3 = has!("avx")
            && has!("avx2")
            && has!("fma")
            && has!("bmi1")
            && has!("bmi2")
            && has!("lzcnt")
            && has!("popcnt")
            && has!("sse4.2");
        // A build without the `avx512` feature stops at AVX2.
        let v4 = cfg!(feature = "avx512")
            && v3
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512cd")
            && has!("avx512dq")
            && has!("avx512vl");
        let want = if v4 {
            "avx512"
        } else if v3 {
            "avx2"
        } else {
            "baseline"
        };
        assert_eq!(super::simd_level(), want);
    }
}
