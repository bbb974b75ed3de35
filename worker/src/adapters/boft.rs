//! Butterfly orthogonal fine-tuning (BOFT; Liu et al. 2024, "Parameter-Efficient Orthogonal
//! Finetuning via Butterfly Factorization") as PEFT computes it (`peft/tuners/boft/layer.py`):
//!
//! ```text
//! per factor i:  S = (R_i - R_i^T) / 2 per block,  C = (I - S)(I + S)^-1   (Cayley, orthogonal)
//!                M_i = P_i blockdiag(C) P_i^T      (P_i: the i-th butterfly permutation)
//! Q = M_{N-1} ... M_1 M_0                          (an orthogonal rotation of the input side)
//! y = (base(x Q) - b) * s + b,      merged: W' = diag(s) W Q^T
//! ```
//!
//! `boft_R` is `[N, block_num, b, b]`; the number of factors `N` comes from its shape, not from
//! the config (PEFT without its CUDA extension silently uses one; see the fixtures' README).

use candle_core::{DType, Device, Result, Tensor};

/// A trainable BOFT adapter on one projection: `boft_R (N, blocks, b, b)` and
/// `boft_s (out, 1)`, with the butterfly permutation of each factor. The rotation is
/// rebuilt from `boft_R` in candle ops on every forward, so gradients reach both.
#[derive(Clone)]
pub struct Boft {
    pub r: Tensor,
    pub s: Tensor,
    /// Factor `i`'s permutation as an index: row `k` of `P_i A P_i^T` is row `perm[k]` of `A`.
    perms: Vec<Tensor>,
    inverse_perms: Vec<Tensor>,
    /// PEFT's multiplicative dropout while training (`ops::dropout`'s scope): in one random
    /// factor, `floor(dropout * blocks)` random blocks become the identity.
    dropout: f64,
    /// The adapted module's `ops::dropout::module_key`: its dropout draws are its own.
    module: u64,
}

impl Boft {
    pub fn new(r: Tensor, s: Tensor) -> Result<Self> {
        let (factors, blocks, b, _) = r.dims4()?;
        let n = blocks * b;
        let (mut perms, mut inverse_perms) = (Vec::new(), Vec::new());
        for i in 0..factors {
            let p = butterfly_perm(n, blocks >> i, b / 2, factors);
            let mut inv = vec![0u32; n];
            for (k, &x) in p.iter().enumerate() {
                inv[x] = k as u32;
            }
            let p: Vec<u32> = p.into_iter().map(|x| x as u32).collect();
            perms.push(Tensor::from_vec(p, n, r.device())?);
            inverse_perms.push(Tensor::from_vec(inv, n, r.device())?);
        }
        Ok(Self {
            r,
            s,
            perms,
            inverse_perms,
            dropout: 0.0,
            module: 0,
        })
    }

    /// This adapter with multiplicative dropout `p` while training, drawn for `module`.
    pub fn with_dropout(mut self, p: f64, module: &str) -> Self {
        self.dropout = p;
        self.module = crate::ops::dropout::module_key(module);
        self
    }

    /// `Q (n, n) = M_{N-1} ... M_0`, `M_i = P_i blockdiag(cayley(R_i)) P_i^T`, differentiable.
    pub fn rotation(&self) -> Result<Tensor> {
        let (_, blocks, b, _) = self.r.dims4()?;
        let (n, dev) = (blocks * b, self.r.device());
        let cayley = self.cayley_blocks()?;
        // blockdiag(C)[k b + x, l b + y] = C[k, x, y] if k == l: a (blocks, blocks) identity
        // mask broadcast over the blocks, laid out as (blocks, b, blocks, b).
        let mask = Tensor::eye(blocks, DType::F32, dev)?.reshape((blocks, blocks, 1, 1))?;
        let mut q: Option<Tensor> = None;
        for (i, perm) in self.perms.iter().enumerate() {
            let dense = cayley
                .get(i)?
                .unsqueeze(1)?
                .broadcast_mul(&mask)?
                .permute((0, 2, 1, 3))?
                .reshape((n, n))?;
            let m = dense.index_select(perm, 0)?.index_select(perm, 1)?;
            q = Some(match q {
                None => m,
                Some(q) => m.matmul(&q)?,
            });
        }
        Ok(q.expect("at least one factor"))
    }

    /// The Cayley blocks of every factor, `(N, blocks, b, b)`, differentiable in `boft_R`.
    fn cayley_blocks(&self) -> Result<Tensor> {
        let (factors, blocks, b, _) = self.r.dims4()?;
        let r = self.r.reshape((factors * blocks, b, b))?;
        let skew = ((&r - r.transpose(1, 2)?)? * 0.5)?;
        let eye = Tensor::eye(b, DType::F32, self.r.device())?
            .unsqueeze(0)?
            .broadcast_as((factors * blocks, b, b))?;
        let c = (&eye - &skew)?
            .matmul(&crate::ops::batch_inverse(&(&eye + &skew)?)?)?
            .reshape((factors, blocks, b, b))?;
        // PEFT's MultiplicativeDropoutLayer: blocks of one factor replaced by the identity.
        match crate::ops::dropout::block_mask(self.dropout, factors, blocks, self.module) {
            None => Ok(c),
            Some(mask) => {
                let keep = Tensor::from_vec(mask, (factors, blocks, 1, 1), self.r.device())?;
                let eye = Tensor::eye(b, DType::F32, self.r.device())?.reshape((1, 1, b, b))?;
                c.broadcast_mul(&keep)?
                    .broadcast_add(&eye.broadcast_mul(&(1.0 - &keep)?)?)
            }
        }
    }

    /// `W Q^T` for `W (rows, n)`, one factor at a time: `W M_0^T M_1^T ...`. Each
    /// `M_i^T = P_i blockdiag(C_i)^T P_i^T` is applied as a column gather, a batched product
    /// with the `b x b` blocks and the inverse gather: `rows * n * b` multiply-adds a factor
    /// instead of the `n^3` of forming `Q`.
    fn rotate_columns(&self, w: &Tensor) -> Result<Tensor> {
        let (_, blocks, b, _) = self.r.dims4()?;
        let rows = w.dim(0)?;
        let cayley = self.cayley_blocks()?;
        let mut w = w.clone();
        for (i, (perm, inverse)) in self.perms.iter().zip(&self.inverse_perms).enumerate() {
            // V[:, j] = W[:, perm^-1(j)]; U = V blockdiag(C)^T; result[:, c] = U[:, perm(c)].
            let v = w
                .index_select(inverse, 1)?
                .reshape((rows, blocks, b))?
                .transpose(0, 1)?;
            let u = v.matmul(&cayley.get(i)?.transpose(1, 2)?)?; // (blocks, rows, b)
            w = u
                .transpose(0, 1)?
                .reshape((rows, blocks * b))?
                .index_select(perm, 1)?;
        }
        Ok(w)
    }

    /// The adapted weight: `diag(s) W Q^T` for an `nn.Linear` weight `(out, in)`, and the same
    /// map in GPT-2's `Conv1D` layout `(in, out)`: `Q W diag(s)`. The factors rotate whichever
    /// is smaller, the weight or the identity (then `Q^T` multiplies the weight once).
    pub fn apply(&self, w: &Tensor, conv1d: bool) -> Result<Tensor> {
        let n = self.perms.first().map_or(0, |p| p.dim(0).unwrap_or(0));
        let out = if conv1d { w.dim(1)? } else { w.dim(0)? };
        let rotated = if out <= n {
            let rows = if conv1d {
                w.t()?.contiguous()?
            } else {
                w.clone()
            };
            self.rotate_columns(&rows)?
        } else {
            let qt = self.rotate_columns(&Tensor::eye(n, DType::F32, w.device())?)?;
            if conv1d {
                w.t()?.matmul(&qt)?
            } else {
                w.matmul(&qt)?
            }
        };
        if conv1d {
            rotated.t()?.broadcast_mul(&self.s.t()?)
        } else {
            rotated.broadcast_mul(&self.s)
        }
    }
}

/// The butterfly permutation of PEFT's `block_butterfly_perm(n, blocks, r, factors - 1)`: the
/// row of `P` that is 1 in column `perm[row]`.
pub fn butterfly_perm(n: usize, blocks: usize, r: usize, factors: usize) -> Vec<usize> {
    if factors <= 1 {
        return (0..n).collect();
    }
    let block = n / blocks;
    // Inside a block of `block` features, runs of `r`: the even runs first, then the odd.
    let runs = block / r;
    let order: Vec<usize> = (0..runs)
        .step_by(2)
        .chain((1..runs).step_by(2))
        .flat_map(|run| run * r..run * r + r)
        .collect();
    (0..n)
        .step_by(block)
        .flat_map(|start| order.iter().map(move |&o| start + o))
        .collect()
}

/// `(I - S)(I + S)^-1` of the skew part `S = (m - m^T) / 2` of a `b x b` row-major block.
pub fn cayley(m: &[f64], b: usize) -> Vec<f64> {
    let s = |i: usize, j: usize| 0.5 * (m[i * b + j] - m[j * b + i]);
    let eye = |i: usize, j: usize| if i == j { 1.0 } else { 0.0 };
    // I + S is invertible for skew S: its eigenvalues are 1 + i*y.
    let i_plus_s: Vec<f64> = (0..b * b)
        .map(|k| eye(k / b, k % b) + s(k / b, k % b))
        .collect();
    let inv = crate::ops::inverse::invert(&i_plus_s, b).expect("I + S is invertible");
    (0..b * b)
        .map(|k| {
            let (i, j) = (k / b, k % b);
            (0..b).map(|l| (eye(i, l) - s(i, l)) * inv[l * b + j]).sum()
        })
        .collect()
}

/// The rotation `Q (n, n)` of the input side from `boft_R [N, block_num, b, b]`.
pub fn rotation(boft_r: &Tensor) -> Result<Tensor> {
    let (factors, blocks, b, _) = boft_r.dims4()?;
    let n = blocks * b;
    let r: Vec<f64> = boft_r
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut q = Tensor::eye(n, DType::F64, &Device::Cpu)?;
    for i in 0..factors {
        let mut dense = vec![0f64; n * n];
        for k in 0..blocks {
            let off = (i * blocks + k) * b * b;
            let c = cayley(&r[off..off + b * b], b);
            for row in 0..b {
                for col in 0..b {
                    dense[(k * b + row) * n + k * b + col] = c[row * b + col];
                }
            }
        }
        let perm = butterfly_perm(n, blocks >> i, b / 2, factors);
        // P A P^T: rows and columns of the block diagonal taken in the permutation's order.
        let m: Vec<f64> = (0..n * n)
            .map(|k| dense[perm[k / n] * n + perm[k % n]])
            .collect();
        let m = Tensor::from_vec(m, (n, n), &Device::Cpu)?;
        q = m.matmul(&q)?;
    }
    q.to_dtype(DType::F32)?.to_device(boft_r.device())
}

/// `W' = diag(s) W Q^T` for a Linear weight `W (out, in)` and `boft_s (out, 1)`.
pub fn merge(weight: &Tensor, q: &Tensor, boft_s: &Tensor) -> Result<Tensor> {
    weight
        .matmul(&q.t()?)?
        .broadcast_mul(&boft_s.to_dtype(weight.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_is_orthogonal_and_2x2_cayley_blocks_are_givens_rotations() {
        let r = crate::models::testing::rand(&[3, 4, 4, 4], 7);
        let q = rotation(&r).unwrap();
        let qtq = q.t().unwrap().matmul(&q).unwrap();
        let eye = Tensor::eye(16, DType::F32, &Device::Cpu).unwrap();
        assert!(crate::models::testing::max_diff(&qtq, &eye) < 1e-5);
        // b = 2: S = [[0, -t], [t, 0]]; (I - S)(I + S)^-1 = [[1 - t^2, 2t], [-2t, 1 - t^2]] /
        // (1 + t^2), the rotation by -theta with theta = 2 atan(t): a Givens rotation.
        let t: f64 = 0.3;
        let c = cayley(&[0.0, -t, t, 0.0], 2);
        let theta = 2.0 * t.atan();
        let want = [theta.cos(), theta.sin(), -theta.sin(), theta.cos()];
        for (a, b) in c.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{c:?} vs {want:?}");
        }
    }

    #[test]
    fn the_factored_weight_rotation_equals_the_dense_one_in_both_layouts() {
        let r = crate::models::testing::rand(&[3, 4, 4, 4], 11);
        let s = (crate::models::testing::rand(&[24, 1], 12) + 1.0).unwrap();
        let w = crate::models::testing::rand(&[24, 16], 13);
        let boft = Boft::new(r.clone(), s.clone()).unwrap();
        let dense = merge(&w, &rotation(&r).unwrap(), &s).unwrap();
        let linear = boft.apply(&w, false).unwrap();
        assert!(crate::models::testing::max_diff(&linear, &dense) < 1e-5);
        let conv = boft
            .apply(&w.t().unwrap().contiguous().unwrap(), true)
            .unwrap();
        assert!(crate::models::testing::max_diff(&conv.t().unwrap(), &dense) < 1e-5);
        let q = boft.rotation().unwrap();
        assert!(crate::models::testing::max_diff(&q, &rotation(&r).unwrap()) < 1e-5);
    }

    #[test]
    fn butterfly_permutations_follow_peft() {
        // PEFT, n 16, block size 4 (r 2): factor 0 keeps each block of 4 in place as
        // runs [0,1] [2,3] -> evens then odds of 2 runs = identity; factor 1 works on blocks of
        // 8: runs [0,1],[2,3],[4,5],[6,7] -> [0,1],[4,5],[2,3],[6,7].
        assert_eq!(butterfly_perm(16, 4, 2, 3), (0..16).collect::<Vec<_>>());
        assert_eq!(
            butterfly_perm(16, 2, 2, 3),
            vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
        );
        assert_eq!(butterfly_perm(8, 4, 1, 1), (0..8).collect::<Vec<_>>());
    }
}
