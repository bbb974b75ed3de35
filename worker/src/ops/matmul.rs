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

/// The output size at or below which gemm takes its horizontal kernel (gemm-common 0.19).
const GEMM_HORIZONTAL_MAX: usize = 16 * 16;

/// `x (M, K) @ w (K, N)`, each row of the result computed by the same arithmetic whatever M
/// is (on the CPU; other devices multiply as they do).
pub fn matmul_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = w.dim(1)?;
    let rows = (GEMM_HORIZONTAL_MAX / n.max(1) + 1).max(2);
    if m >= rows || !x.device().is_cpu() {
        return x.matmul(w);
    }
    let pad = Tensor::zeros((rows - m, k), x.dtype(), x.device())?;
    Tensor::cat(&[x, &pad], 0)?.matmul(w)?.narrow(0, 0, m)
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
            }
        }
    }
}
