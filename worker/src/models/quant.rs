//! Frozen weights stored at reduced precision and dequantized to f32 on the fly (DESIGN §3).
//! candle's quantized matmul has no backward and its CPU matmul has no fp8, so a frozen
//! weight becomes a plain f32 tensor inside the forward: it is a constant, so no gradient is
//! kept for it, but the gradient still flows through the matmul to the input and on to the
//! trainable parameters (and adapters) before it.
//!
//! NF4 follows QLoRA (Dettmers et al. 2023): 16 levels at the quantiles of a normal
//! distribution, one f32 absmax per block of 64 weights, two codes per byte. With double
//! quantization ([`DoubleQuant`]) the absmax values are stored as 8-bit codes themselves.

use candle_core::{DType, Device, Result, Tensor};

use stackwise_common::config::Precision;

/// The 16 NF4 levels (bitsandbytes' `NF4` table).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per absmax block.
pub const NF4_BLOCK: usize = 64;

/// The largest error of an NF4 round trip relative to its block's absmax: half the widest
/// gap between adjacent levels.
pub fn nf4_max_relative_error() -> f32 {
    NF4_LEVELS
        .windows(2)
        .map(|w| (w[1] - w[0]) / 2.0)
        .fold(0.0, f32::max)
}

/// Absmax values per block of 256 in double quantization (bitsandbytes' `quantize_blockwise`
/// of the statistics).
pub const DQ_BLOCK: usize = 256;

/// QLoRA's double quantization of the NF4 block absmax values, as bitsandbytes stores them
/// (`compress_statistics=True`): `absmax[i] = code[codes[i]] * scales[i / 256] + offset`, where
/// `offset` is the mean absmax, `code` bitsandbytes' signed dynamic 8-bit map, and each scale
/// the largest `|absmax - offset|` of its block of 256. 8.125 bits per 64 weights instead of
/// 32: the base shrinks from 4.5 to about 4.127 bits a weight.
#[derive(Debug, Clone)]
pub struct DoubleQuant {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offset: f32,
}

/// bitsandbytes' signed dynamic 8-bit map, sorted.
pub fn dynamic_map() -> [f32; 256] {
    super::dynamic_map::DYNAMIC_MAP_BITS.map(f32::from_bits)
}

impl DoubleQuant {
    pub fn quantize(absmax: &[f32]) -> Self {
        let map = dynamic_map();
        let mean = absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64;
        let offset = mean as f32;
        let mut codes = Vec::with_capacity(absmax.len());
        let mut scales = Vec::with_capacity(absmax.len().div_ceil(DQ_BLOCK));
        for chunk in absmax.chunks(DQ_BLOCK) {
            let scale = chunk.iter().fold(0f32, |m, &a| m.max((a - offset).abs()));
            scales.push(scale);
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            codes.extend(
                chunk
                    .iter()
                    .map(|&a| nearest(&map, ((a - offset) * inv).clamp(-1.0, 1.0))),
            );
        }
        Self {
            codes,
            scales,
            offset,
        }
    }

    /// The absmax values, as bitsandbytes' `dequantize_blockwise` + offset gives them.
    pub fn values(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.scales[i / DQ_BLOCK] + self.offset)
            .collect()
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + 4
    }
}

/// The index of the value of the sorted `map` nearest to `x` (the lower one on a tie).
fn nearest(map: &[f32], x: f32) -> u8 {
    let i = map.partition_point(|&v| v < x).min(map.len() - 1);
    let below = i.saturating_sub(1);
    let pick = if i > 0 && (x - map[below]).abs() <= (map[i] - x).abs() {
        below
    } else {
        i
    };
    pick as u8
}

/// The block absmax values of NF4 weights: f32, or double-quantized.
#[derive(Debug, Clone)]
pub enum Absmax {
    F32(Vec<f32>),
    Double(DoubleQuant),
}

impl Absmax {
    pub fn values(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Absmax::F32(v) => std::borrow::Cow::Borrowed(v),
            Absmax::Double(d) => std::borrow::Cow::Owned(d.values()),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Absmax::F32(v) => 4 * v.len(),
            Absmax::Double(d) => d.bytes(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Nf4 {
    /// Two 4-bit codes per byte, low nibble first.
    pub codes: Vec<u8>,
    pub absmax: Absmax,
    pub len: usize,
}

fn nearest_level(x: f32) -> u8 {
    // Levels are sorted: the first level above the midpoint decides.
    let mut best = 0u8;
    let mut err = f32::INFINITY;
    for (i, &l) in NF4_LEVELS.iter().enumerate() {
        let e = (x - l).abs();
        if e < err {
            err = e;
            best = i as u8;
        }
    }
    best
}

impl Nf4 {
    pub fn quantize(w: &[f32]) -> Self {
        let blocks = w.len().div_ceil(NF4_BLOCK);
        let mut absmax = Vec::with_capacity(blocks);
        let mut codes = vec![0u8; w.len().div_ceil(2)];
        for (b, chunk) in w.chunks(NF4_BLOCK).enumerate() {
            let m = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
            absmax.push(m);
            let inv = if m > 0.0 { 1.0 / m } else { 0.0 };
            for (j, &x) in chunk.iter().enumerate() {
                let i = b * NF4_BLOCK + j;
                let c = nearest_level(x * inv);
                codes[i / 2] |= if i.is_multiple_of(2) { c } else { c << 4 };
            }
        }
        Self {
            codes,
            absmax: Absmax::F32(absmax),
            len: w.len(),
        }
    }

    /// NF4 with double quantization: the codes are those of [`Nf4::quantize`], the absmax
    /// values go to 8 bits ([`DoubleQuant`]), as bitsandbytes' `quantize_4bit(...,
    /// compress_statistics=True)` does.
    pub fn quantize_double(w: &[f32]) -> Self {
        let mut q = Self::quantize(w);
        if let Absmax::F32(a) = &q.absmax {
            q.absmax = Absmax::Double(DoubleQuant::quantize(a));
        }
        q
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax.values();
        (0..self.len)
            .map(|i| {
                let byte = self.codes[i / 2];
                let c = if i.is_multiple_of(2) {
                    byte & 0x0f
                } else {
                    byte >> 4
                };
                NF4_LEVELS[c as usize] * absmax[i / NF4_BLOCK]
            })
            .collect()
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + self.absmax.bytes()
    }
}

/// NF4 codes held on a device, dequantized there with tensor ops: no host loop and no copy of
/// the f32 weight to the device each forward. (candle has no bitwise ops, so a byte's two codes
/// come out as `hi = floor(b / 16)` and `lo = b - 16 hi`, exact in f32.)
#[derive(Debug, Clone)]
pub struct Nf4OnDevice {
    /// `(len / 2)` u8, two codes per byte, low nibble first (as [`Nf4::codes`]).
    codes: Tensor,
    /// `(blocks, 1)` f32.
    absmax: Tensor,
    /// The 16 levels, f32.
    levels: Tensor,
}

impl Nf4OnDevice {
    pub fn new(q: &Nf4, device: &Device) -> Result<Self> {
        Ok(Self {
            codes: Tensor::from_slice(&q.codes, q.codes.len(), device)?,
            absmax: {
                let a = q.absmax.values();
                Tensor::from_slice(&a, (a.len(), 1), device)?
            },
            levels: Tensor::from_slice(&NF4_LEVELS, 16, device)?,
        })
    }

    /// The `len` weights, equal bit for bit to [`Nf4::dequantize`].
    pub fn dequantize(&self, len: usize) -> Result<Tensor> {
        let bytes = self.codes.to_dtype(DType::F32)?;
        let hi = (&bytes / 16.0)?.floor()?;
        let lo = (&bytes - (&hi * 16.0)?)?;
        let codes = Tensor::stack(&[lo, hi], 1)?
            .flatten_all()?
            .to_dtype(DType::U32)?;
        let mut w = self.levels.index_select(&codes, 0)?;
        let blocks = self.absmax.dim(0)?;
        let padded = blocks * NF4_BLOCK;
        if w.dim(0)? < padded {
            let pad = Tensor::zeros(padded - w.dim(0)?, DType::F32, w.device())?;
            w = Tensor::cat(&[&w, &pad], 0)?;
        }
        w.narrow(0, 0, padded)?
            .reshape((blocks, NF4_BLOCK))?
            .broadcast_mul(&self.absmax)?
            .flatten_all()?
            .narrow(0, 0, len)
    }
}

/// A frozen linear weight at its storage precision.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// f32, bf16, f16 or fp8 (e4m3) storage.
    Cast(Tensor),
    Nf4 {
        q: Nf4,
        shape: Vec<usize>,
        device: Device,
        /// Off the CPU: the codes on the device (on the CPU the host loop is the faster path).
        on_device: Option<Nf4OnDevice>,
    },
}

impl Frozen {
    pub fn new(w: &Tensor, precision: Precision) -> Result<Self> {
        let w = w.detach();
        Ok(match precision {
            Precision::Fp32 => Frozen::Cast(w.to_dtype(DType::F32)?),
            Precision::Bf16 => Frozen::Cast(w.to_dtype(DType::BF16)?),
            Precision::Fp16 => Frozen::Cast(w.to_dtype(DType::F16)?),
            Precision::Fp8 => Frozen::Cast(w.to_dtype(DType::F8E4M3)?),
            Precision::Nf4 | Precision::Nf4Dq => {
                let host = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let q = if precision == Precision::Nf4Dq {
                    Nf4::quantize_double(&host)
                } else {
                    Nf4::quantize(&host)
                };
                let on_device = match w.device() {
                    Device::Cpu => None,
                    d => Some(Nf4OnDevice::new(&q, d)?),
                };
                Frozen::Nf4 {
                    q,
                    shape: w.dims().to_vec(),
                    device: w.device().clone(),
                    on_device,
                }
            }
        })
    }

    /// The weight as an f32 tensor (a constant: no gradient is kept for it).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Frozen::Cast(t) if t.dtype() == DType::F32 => Ok(t.clone()),
            Frozen::Cast(t) => t.to_dtype(DType::F32),
            Frozen::Nf4 {
                on_device: Some(d),
                q,
                shape,
                ..
            } => d.dequantize(q.len)?.reshape(shape.as_slice()),
            Frozen::Nf4 {
                q, shape, device, ..
            } => Tensor::from_vec(q.dequantize(), shape.as_slice(), device),
        }
    }

    /// Number of weights.
    pub fn elem_count(&self) -> usize {
        match self {
            Frozen::Cast(t) => t.elem_count(),
            Frozen::Nf4 { shape, .. } => shape.iter().product(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Frozen::Cast(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Frozen::Nf4 { q, .. } => q.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stackwise_common::rng::Rng;
    use std::collections::HashMap;

    fn weights(n: usize) -> Vec<f32> {
        let mut rng = Rng::new(3);
        (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
    }

    #[test]
    fn nf4_round_trip_stays_within_half_a_level_gap_of_each_block_absmax() {
        let w = weights(64 * 50 + 17); // a short last block too
        let q = Nf4::quantize(&w);
        let back = q.dequantize();
        let bound = nf4_max_relative_error();
        assert!((bound - 0.1519).abs() < 1e-3, "{bound}");
        for (b, (chunk, got)) in w.chunks(NF4_BLOCK).zip(back.chunks(NF4_BLOCK)).enumerate() {
            let m = q.absmax.values()[b];
            for (x, y) in chunk.iter().zip(got) {
                assert!((x - y).abs() <= bound * m * (1.0 + 1e-6), "{x} vs {y}");
            }
            // The block's largest weight is exact (it maps to level ±1).
            let i = (0..chunk.len())
                .max_by(|&a, &c| chunk[a].abs().total_cmp(&chunk[c].abs()))
                .unwrap();
            assert_eq!(chunk[i], got[i]);
        }
        // Mean error is far below the bound for normal weights.
        let rms = (w
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / w.len() as f32)
            .sqrt();
        assert!(rms < 0.004, "rms error {rms}");
        assert_eq!(q.bytes(), w.len().div_ceil(2) + 4 * w.len().div_ceil(64));
    }

    /// bitsandbytes' own quantization of one weight (`tests/fixtures/make_nf4.py`).
    fn bnb_fixture() -> HashMap<String, Tensor> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/nf4-double-quant/nf4_dq.safetensors"
        );
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn double_quantization_stores_what_bitsandbytes_stores_and_dequantizes_as_it_does() {
        let fx = bnb_fixture();
        assert_eq!(
            dynamic_map().to_vec(),
            f32s(&fx["code"]),
            "the dynamic map is bitsandbytes' table"
        );
        let w = f32s(&fx["weight"]);
        let q = Nf4::quantize_double(&w);
        // The 4-bit codes: bitsandbytes packs the first of two in the high nibble.
        let packed = fx["packed"].to_vec1::<u8>().unwrap();
        let ours: Vec<u8> = q.codes.iter().map(|b| b.rotate_left(4)).collect(); // nibbles swapped
        assert_eq!(ours, packed);
        let Absmax::Double(dq) = &q.absmax else {
            panic!("not double-quantized")
        };
        assert_eq!(dq.codes, fx["absmax_codes"].to_vec1::<u8>().unwrap());
        let want_scales = f32s(&fx["absmax_scales"]);
        assert_eq!(dq.scales.len(), want_scales.len());
        for (a, b) in dq.scales.iter().zip(&want_scales) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "scale {a} vs {b}");
        }
        let offset = f32s(&fx["offset"])[0];
        assert!((dq.offset - offset).abs() <= 1e-6 * offset, "offset");
        let want = f32s(&fx["dequantized"]);
        let got = q.dequantize();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-7, "dequantized weights differ by {worst}");
        // Double quantization costs accuracy: its dequantized weights are not single NF4's.
        let single = Nf4::quantize(&w).dequantize();
        assert!(single.iter().zip(&got).any(|(a, b)| a != b));
        // 19,700 weights: 9,850 code bytes, 308 absmax codes, 2 scales and the offset.
        assert_eq!(q.bytes(), 9850 + 308 + 2 * 4 + 4);
        assert_eq!(Nf4::quantize(&w).bytes(), 9850 + 308 * 4);
    }

    #[test]
    fn single_nf4_equals_bitsandbytes_without_double_quantization() {
        let w = f32s(&bnb_fixture()["weight"]);
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/nf4-double-quant/nf4.safetensors"
        );
        let want =
            f32s(&candle_core::safetensors::load(path, &Device::Cpu).unwrap()["dequantized"]);
        assert_eq!(Nf4::quantize(&w).dequantize(), want);
    }

    #[test]
    fn a_double_quantized_frozen_weight_dequantizes_on_the_device_as_on_the_host() {
        let t = Tensor::from_vec(weights(64 * 300 + 9), (1, 64 * 300 + 9), &Device::Cpu).unwrap();
        let Frozen::Nf4 { q, .. } = Frozen::new(&t, Precision::Nf4Dq).unwrap() else {
            panic!("not nf4")
        };
        assert!(matches!(q.absmax, Absmax::Double(_)));
        let on = Nf4OnDevice::new(&q, &Device::Cpu).unwrap();
        let got = on.dequantize(q.len).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, q.dequantize());
    }

    #[test]
    fn dequantizing_on_the_device_equals_the_host_loop_bit_for_bit() {
        // Odd lengths: a byte with one code, and a short last block.
        for n in [64 * 3, 64 * 5 + 17, 1, 129] {
            let q = Nf4::quantize(&weights(n));
            let on = Nf4OnDevice::new(&q, &Device::Cpu).unwrap();
            let got = on.dequantize(n).unwrap().to_vec1::<f32>().unwrap();
            let want = q.dequantize();
            assert_eq!(got.len(), want.len());
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n = {n}"
            );
        }
    }

    #[test]
    fn requantizing_a_dequantized_weight_is_exact() {
        // Resume re-quantizes frozen weights from the checkpoint's dequantized values.
        let w = weights(64 * 8);
        let once = Nf4::quantize(&w).dequantize();
        assert_eq!(Nf4::quantize(&once).dequantize(), once);
        let t = Tensor::from_vec(w, (8, 64), &Device::Cpu).unwrap();
        for p in [Precision::Bf16, Precision::Fp16, Precision::Fp8] {
            let a = Frozen::new(&t, p).unwrap().dense().unwrap();
            let b = Frozen::new(&a, p).unwrap().dense().unwrap();
            let d: f32 = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(d, 0.0, "{p:?}");
        }
    }

    #[test]
    fn storage_shrinks_with_precision() {
        let t = Tensor::from_vec(weights(64 * 64), (64, 64), &Device::Cpu).unwrap();
        let bytes: Vec<usize> = [
            Precision::Fp32,
            Precision::Fp16,
            Precision::Fp8,
            Precision::Nf4,
        ]
        .iter()
        .map(|&p| Frozen::new(&t, p).unwrap().bytes())
        .collect();
        assert_eq!(bytes, vec![16384, 8192, 4096, 2048 + 256]);
    }
}
