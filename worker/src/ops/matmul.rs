//! Matrix products whose rows do not depend on the other rows (batch invariance: the rows a
//! serving batch packs together come out as each would alone; He and Thinking Machines Lab
//! 2025, "Defeating Nondeterminism in LLM Inference").
//!
//! candle's CPU matmul is gemm's, whose main kernel sums each output element over K in blocks
//! that depend on K alone, so a row's result does not depend on how many rows there are, with
//! two exceptions: one row goes to a matrix-vector kernel, and an output of at most 256
//! elements to a horizontal kernel, each summing in another order. `matmul_rows` pads the rows
//! so that every product takes the main kernel.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// The output size at or below which gemm takes its horizontal kernel (gemm-common 0.19).
const GEMM_HORIZONTAL_MAX: usize = 16 * 16;

/// `x (M, K) @ w (K, N)`, each row of the result computed by the same arithmetic whatever M
/// is (on the CPU; other devices multiply as they do, at the `autocast` dtype when one is set).
pub fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = w.dim(1)?;
    let rows = (GEMM_HORIZONTAL_MAX / n.max(1) + 1).max(2);
    if m >= rows || !x.device().is_cpu() {
        return super::autocast::matmul(x, w);
    }
    let pad = Tensor::zeros((rows - m, k), x.dtype(), x.device())?;
    super::autocast::matmul(&Tensor::cat(&[x, &pad], 0)?, w)?.narrow(0, 0, m)
}

/// Columns per strip: gemm's small-matrix path (m, n <= 64) for every strip.
const STRIP: usize = 64;

/// A weight `(K, N)` laid out for decoding a few rows at a time: `N / 64` strips of
/// `(K, 64)`, each contiguous, so a product streams the weight front to back. (Multiplying
/// the `(K, N)` matrix itself, gemm walks it 16 columns at a time, a row apart: a new page
/// every few loads, which bounds decoding by memory latency rather than bandwidth.) Rows are
/// multiplied 64 at a time, at least 2, so every strip's product takes gemm's main kernel with
/// K-blocks that depend on K alone: a row's result does not depend on the other rows.
#[derive(Clone)]
pub struct Strips {
    /// `(S, K, 64)`, the last strip padded with zero columns.
    strips: Tensor,
    n: usize,
}

impl Strips {
    pub fn new(w: &Tensor) -> Result<Self> {
        let (k, n) = w.dims2()?;
        let s = n.div_ceil(STRIP);
        let w = if s * STRIP > n {
            let pad = Tensor::zeros((k, s * STRIP - n), w.dtype(), w.device())?;
            Tensor::cat(&[w, &pad], 1)?
        } else {
            w.clone()
        };
        let strips = w.reshape((k, s, STRIP))?.transpose(0, 1)?.contiguous()?;
        Ok(Self { strips, n })
    }

    /// `x (M, K) @ w`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let s = self.strips.dim(0)?;
        let mut parts = Vec::with_capacity(m.div_ceil(STRIP));
        for start in (0..m).step_by(STRIP) {
            let rows = STRIP.min(m - start);
            let mut chunk = x.narrow(0, start, rows)?;
            if rows < 2 {
                let pad = Tensor::zeros((2 - rows, k), x.dtype(), x.device())?;
                chunk = Tensor::cat(&[&chunk, &pad], 0)?;
            }
            let padded = chunk.dim(0)?;
            // Each strip's product is too small for gemm to share out, so the strips are
            // shared out instead: a group of consecutive strips per thread.
            let groups = rayon::current_num_threads().clamp(1, s);
            let per = s.div_ceil(groups);
            let chunk = &chunk;
            let ys = (0..s)
                .step_by(per)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|g| {
                    let n = per.min(s - g);
                    chunk
                        .unsqueeze(0)?
                        .broadcast_as((n, padded, k))?
                        .matmul(&self.strips.narrow(0, g, n)?) // (n, rows, 64)
                })
                .collect::<Result<Vec<_>>>()?;
            let y = Tensor::cat(&ys, 0)?
                .transpose(0, 1)?
                .reshape((padded, s * STRIP))?;
            parts.push(y.narrow(0, 0, rows)?.narrow(1, 0, self.n)?);
        }
        Tensor::cat(&parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::rand;

    #[test]
    fn a_rows_product_does_not_depend_on_the_other_rows() {
        // Weights as models hold them: (in, out) row-major (GPT-2's Conv1D), (out, in)
        // transposed (nn.Linear), a column slice (a fused projection); K below and above
        // gemm's 512 block; outputs narrower than 256 / M (LoRA's rank, a tiny vocabulary).
        for (k, n) in [
            (384, 1152),
            (1536, 384),
            (384, 8192),
            (32, 50),
            (384, 8),
            (8, 384),
        ] {
            let base = rand(&[n, k], 2);
            let sliced = rand(&[k, 3 * n], 3);
            let weights = [
                rand(&[k, n], 1),
                base.t().unwrap(),
                sliced.narrow(1, n, n).unwrap(),
            ];
            let x = rand(&[40, k], 4);
            for w in &weights {
                let alone: Vec<Tensor> = (0..40)
                    .map(|i| matmul_rows(&x.narrow(0, i, 1).unwrap(), w).unwrap())
                    .collect();
                for m in [2, 3, 7, 16, 40] {
                    let got = matmul_rows(&x.narrow(0, 0, m).unwrap(), w).unwrap();
                    for (i, a) in alone.iter().enumerate().take(m) {
                        let row: Vec<f32> = got.get(i).unwrap().to_vec1().unwrap();
                        let want: Vec<f32> = a.get(0).unwrap().to_vec1().unwrap();
                        assert_eq!(row, want, "k {k} n {n} m {m} row {i}");
                    }
                }
                // The strip layout: row-invariant too (up to 150 rows, past a 64-row chunk),
                // and the same product.
                let strips = Strips::new(&w.contiguous().unwrap()).unwrap();
                let x = rand(&[150, k], 5);
                let alone: Vec<Vec<f32>> = (0..150)
                    .map(|i| {
                        let r = strips.matmul(&x.narrow(0, i, 1).unwrap()).unwrap();
                        r.get(0).unwrap().to_vec1().unwrap()
                    })
                    .collect();
                for m in [2, 5, 64, 65, 150] {
                    let got = strips.matmul(&x.narrow(0, 0, m).unwrap()).unwrap();
                    for (i, a) in alone.iter().enumerate().take(m) {
                        let row: Vec<f32> = got.get(i).unwrap().to_vec1().unwrap();
                        assert_eq!(&row, a, "strips k {k} n {n} m {m} row {i}");
                    }
                }
                let plain = x.matmul(w).unwrap();
                let got = strips.matmul(&x).unwrap();
                let diff = crate::models::testing::max_diff(&plain, &got);
                assert!(diff < 1e-3, "k {k} n {n}: {diff}");
            }
        }
    }

    #[test]
    fn batched_small_products_equal_one_product_at_a_time() {
        // The patched candle matmul (third_party/patch_candle_matmul.py) runs the batches of
        // small products in parallel, each single-threaded, into an unfilled destination: the
        // numbers must be those of each product alone, and a k = 0 product must be zeros.
        let dev = candle_core::Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 6, 37, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 6, 41, 16), &dev).unwrap();
        let scores = q.matmul(&k.t().unwrap()).unwrap();
        assert_eq!(scores.dims(), &[2, 6, 37, 41]);
        for b in 0..2 {
            for h in 0..6 {
                let one = |t: &Tensor| t.get(b).unwrap().get(h).unwrap();
                let alone = one(&q).matmul(&one(&k).t().unwrap()).unwrap();
                let got = one(&scores);
                let (a, g) = (
                    alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert!(a.iter().zip(&g).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
        let empty = Tensor::zeros((3, 4, 0), candle_core::DType::F32, &dev)
            .unwrap()
            .matmul(&Tensor::zeros((3, 0, 5), candle_core::DType::F32, &dev).unwrap())
            .unwrap();
        let v = empty.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v.len(), 60);
        assert!(v.iter().all(|&x| x == 0.0));
    }
}
