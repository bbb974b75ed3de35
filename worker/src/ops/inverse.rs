//! The inverse of a batch of small square matrices `(m, b, b)`, differentiable: what BOFT's
//! Cayley transform `(I - S)(I + S)^-1` needs (candle has no matrix inverse). Gauss-Jordan
//! with partial pivoting in f64 per matrix on the CPU; the backward is
//! `dA = -A^-T dY A^-T`, in candle ops.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::f32_slice;

struct BatchInverse;

/// The inverse of the row-major `b x b` matrix `m` (f64, Gauss-Jordan with partial
/// pivoting); none when it is singular.
pub(crate) fn invert(m: &[f64], b: usize) -> Option<Vec<f64>> {
    let mut m = m.to_vec();
    let mut inv = vec![0f64; b * b];
    for i in 0..b {
        inv[i * b + i] = 1.0;
    }
    for col in 0..b {
        let pivot =
            (col..b).max_by(|&x, &y| m[x * b + col].abs().total_cmp(&m[y * b + col].abs()))?;
        if m[pivot * b + col].abs() < 1e-300 {
            return None;
        }
        for k in 0..b {
            m.swap(col * b + k, pivot * b + k);
            inv.swap(col * b + k, pivot * b + k);
        }
        let p = m[col * b + col];
        for k in 0..b {
            m[col * b + k] /= p;
            inv[col * b + k] /= p;
        }
        for row in (0..b).filter(|&r| r != col) {
            let f = m[row * b + col];
            if f != 0.0 {
                for k in 0..b {
                    m[row * b + k] -= f * m[col * b + k];
                    inv[row * b + k] -= f * inv[col * b + k];
                }
            }
        }
    }
    Some(inv)
}

impl CustomOp1 for BatchInverse {
    fn name(&self) -> &'static str {
        "sw-batch-inverse"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, b, b2) = l.shape().dims3()?;
        if b != b2 {
            candle_core::bail!(
                "{}: matrices must be square, got {:?}",
                self.name(),
                l.dims()
            );
        }
        let a = f32_slice(s, l, self.name())?;
        let mut out = vec![0f32; a.len()];
        let singular = out
            .par_chunks_mut(b * b)
            .zip(a.par_chunks(b * b))
            .map(|(o, a)| {
                let m: Vec<f64> = a.iter().map(|&x| x as f64).collect();
                match invert(&m, b) {
                    Some(inv) => {
                        o.iter_mut().zip(inv).for_each(|(o, v)| *o = v as f32);
                        false
                    }
                    None => true,
                }
            })
            .reduce(|| false, |x, y| x || y);
        if singular {
            candle_core::bail!("{}: a matrix of the batch is singular", self.name());
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, inv: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv_t = inv.transpose(1, 2)?.contiguous()?;
        Ok(Some(inv_t.matmul(&g.contiguous()?)?.matmul(&inv_t)?.neg()?))
    }
}

/// `a^-1` for every matrix of `a (m, b, b)` (f32), with a backward pass. Off the CPU the small
/// matrices go to the CPU and back.
pub fn batch_inverse(a: &Tensor) -> Result<Tensor> {
    match a.device() {
        Device::Cpu => a.contiguous()?.apply_op1(BatchInverse),
        other => a
            .to_device(&Device::Cpu)?
            .contiguous()?
            .apply_op1(BatchInverse)?
            .to_device(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    #[test]
    fn inverse_and_its_gradient_match_the_identities() {
        let dev = Device::Cpu;
        let base = Tensor::eye(3, DType::F32, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let noise = Tensor::new(
            &[[[0.1f32, -0.3, 0.2], [0.4, 0.0, -0.1], [0.05, 0.2, 0.3]]],
            &dev,
        )
        .unwrap();
        let a = Var::from_tensor(&(base + noise).unwrap()).unwrap();
        let inv = batch_inverse(a.as_tensor()).unwrap();
        let eye = a.as_tensor().matmul(&inv).unwrap();
        let want = Tensor::eye(3, DType::F32, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert!(crate::ops::cpu::max_abs_diff(&eye, &want) < 1e-6);
        // d sum(W * A^-1) / dA = -A^-T W A^-T: check one entry by central differences.
        let w = Tensor::new(
            &[[[1f32, 2.0, -1.0], [0.5, -0.5, 3.0], [2.0, 1.0, 0.0]]],
            &dev,
        )
        .unwrap();
        let loss = |t: &Tensor| {
            (batch_inverse(t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let g = (batch_inverse(a.as_tensor()).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = g
            .get(a.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x: Vec<f32> = a.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for k in [0usize, 4, 7] {
            let h = 1e-3f32;
            let shifted = |d: f32| {
                let mut v = x.clone();
                v[k] += d;
                Tensor::from_vec(v, (1, 3, 3), &dev).unwrap()
            };
            let fd = (loss(&shifted(h)) - loss(&shifted(-h))) / (2.0 * h as f64);
            assert!(
                (fd - grad[k] as f64).abs() < 1e-2,
                "entry {k}: fd {fd}, grad {}",
                grad[k]
            );
        }
    }
}
