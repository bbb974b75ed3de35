//! Branch-free `exp` and `tanh` for f32 that the compiler vectorises (libm's `expf`/`tanhf`
//! are scalar calls: 16 % of a training step in GELU alone). Cephes-style range reduction and
//! polynomial; relative error ~2e-7 over the whole range, checked against `f32::exp` below.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x; inputs are clamped to [-87.3, 88.7] (the f32 normal range), so -inf gives ~0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5 * 2^23 trick: `f32::round` is a libm call on baseline
    // x86-64 (no SSE4.1) and would stop vectorisation.
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n through the exponent bits; n is in [-126, 128) after the clamp.
    f32::from_bits(((n as i32 + 127) as u32) << 23) * y
}

/// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|): absolute error ~1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

/// Maximum of a slice with 8 independent lanes (a single running max cannot vectorise).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

/// `sum(exp(x - shift))` with 8 independent partial sums (float addition is not reordered by
/// the compiler, so one accumulator would run at add latency).
#[inline(always)]
pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += exp(v - shift);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - shift)).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_libm() {
        let mut worst_exp = 0f32;
        let mut worst_tanh = 0f32;
        for i in -20000..=20000 {
            let x = i as f32 * 0.0043;
            let rel = ((super::exp(x) - x.exp()) / x.exp()).abs();
            worst_exp = worst_exp.max(rel);
            worst_tanh = worst_tanh.max((super::tanh(x) - x.tanh()).abs());
        }
        assert!(worst_exp < 5e-7, "exp rel error {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh abs error {worst_tanh}");
        assert_eq!(super::exp(f32::NEG_INFINITY), super::exp(-87.3));
        assert!(super::exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.01 - 5.0)
            .collect();
        assert_eq!(
            super::max(&xs),
            xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        let want: f64 = xs.iter().map(|&v| ((v - 1.0) as f64).exp()).sum();
        assert!((super::sum_exp(&xs, 1.0) as f64 - want).abs() / want < 1e-5);
        assert_eq!(super::max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn wide_vector_code_gives_the_baseline_bits() {
        // `ops::cpu::simd` compiles the same loops for AVX-512 / AVX2 where the CPU has them;
        // the results must be bitwise those of the baseline (SSE2) code.
        #[inline(never)]
        fn kernel(xs: &[f32], out: &mut [f32]) -> (f32, f32) {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = super::tanh(x) * super::exp(x * 0.5);
            }
            (super::max(xs), super::sum_exp(xs, 2.0))
        }
        let xs: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 2000) as f32 * 0.013 - 13.0)
            .collect();
        let (mut plain, mut wide) = (vec![0f32; xs.len()], vec![0f32; xs.len()]);
        let a = kernel(&xs, &mut plain);
        let b = crate::ops::cpu::simd(|| {
            for (o, &x) in wide.iter_mut().zip(&xs) {
                *o = super::tanh(x) * super::exp(x * 0.5);
            }
            (super::max(&xs), super::sum_exp(&xs, 2.0))
        });
        assert_eq!(a.0.to_bits(), b.0.to_bits());
        assert_eq!(a.1.to_bits(), b.1.to_bits());
        assert!(
            plain
                .iter()
                .zip(&wide)
                .all(|(p, w)| p.to_bits() == w.to_bits())
        );
    }
}
