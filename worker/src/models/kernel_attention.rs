//! Kernel (linear) attention (Katharopoulos et al. 2020, "Transformers are RNNs") with the
//! positive feature map `phi(x) = elu(x) + 1`:
//!
//! ```text
//! y_i = phi(q_i) S_i / (phi(q_i) . z_i + eps),   S_i = sum_j phi(k_j) v_j^T,   z_i = sum_j phi(k_j)
//! ```
//!
//! over the keys `j` query `i` sees. Bidirectional: the global sums, once. Causal: the running
//! sums, by chunks of `CHUNK` positions — inside a chunk its masked `(C, C)` form, across
//! chunks the state carried from before — so the cost is `O(T C d + T d^2)` instead of the
//! `O(T^2 d)` of the quadratic form.

use candle_core::{Device, Result, Tensor};

/// Positions per chunk of the causal form.
pub const CHUNK: usize = 64;

const EPS: f64 = 1e-6;

/// `elu(x) + 1`: the positive feature map of linear attention.
fn feature_map(x: &Tensor) -> Result<Tensor> {
    x.elu(1.0)? + 1.0
}

/// (T, S) 0/1 mask: query `i` (at position `S - T + i`) sees keys `0..=S - T + i`.
fn causal_ones(t: usize, s: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..s).map(move |j| if j <= s - t + i { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, s), device)
}

/// Linear attention of `q (B, H, T, d)` over `k, v (B, H, S, d)`; with `S > T` the queries
/// are the last `T` positions (incremental decoding with a KV cache).
pub fn kernel_attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Result<Tensor> {
    kernel_attention_chunked(q, k, v, causal, CHUNK)
}

/// `kernel_attention` with causal chunks of `chunk` positions.
pub fn kernel_attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    chunk: usize,
) -> Result<Tensor> {
    let (t, s) = (q.dim(2)?, k.dim(2)?);
    let (fq, fk) = (feature_map(q)?, feature_map(k)?);
    // Keys every query sees: all of them (bidirectional, or one query at the end), or the
    // prefix before the first query.
    let shared = if !causal || t == 1 { s } else { s - t };
    let prefix = (shared > 0)
        .then(|| -> Result<(Tensor, Tensor)> {
            let (pk, pv) = (fk.narrow(2, 0, shared)?, v.narrow(2, 0, shared)?);
            Ok((pk.t()?.matmul(&pv)?, pk.sum_keepdim(2)?)) // (B, H, d, dv), (B, H, 1, d)
        })
        .transpose()?;
    match prefix {
        Some((state, z)) if shared == s => {
            let num = fq.matmul(&state)?; // (B, H, T, dv)
            let den = (fq.broadcast_mul(&z)?.sum_keepdim(3)? + EPS)?; // (B, H, T, 1)
            num.broadcast_div(&den)
        }
        _ => causal_by_chunks(
            &fq,
            &fk.narrow(2, shared, t)?,
            &v.narrow(2, shared, t)?,
            prefix,
            chunk.clamp(1, t),
        ),
    }
}

/// Causal linear attention of feature-mapped `fq, fk (B, H, T, d)` and `v (B, H, T, dv)`,
/// after the keys summed in `prefix`. All chunks at once: the masked `(C, C)` form inside
/// each, and each chunk's state (the sums over the chunks before it) from a prefix sum of the
/// chunks' own sums. No op narrows a chunk out of the sequence, whose gradient would be
/// padded to the whole sequence once per chunk.
fn causal_by_chunks(
    fq: &Tensor,
    fk: &Tensor,
    v: &Tensor,
    prefix: Option<(Tensor, Tensor)>,
    chunk: usize,
) -> Result<Tensor> {
    let (b, h, t, d) = fq.dims4()?;
    let dv = v.dim(3)?;
    let n = t.div_ceil(chunk);
    // Zero-padded to whole chunks: a zero key adds nothing to any sum.
    let pad = |x: &Tensor| -> Result<Tensor> {
        let extra = n * chunk - t;
        let x = if extra == 0 {
            x.clone()
        } else {
            let z = Tensor::zeros((b, h, extra, x.dim(3)?), x.dtype(), x.device())?;
            Tensor::cat(&[x, &z], 2)?
        };
        x.reshape((b * h, n, chunk, x.dim(3)?)) // (BH, n, C, ·)
    };
    let (q, k, v) = (pad(fq)?, pad(fk)?, pad(v)?);
    let ones = causal_ones(chunk, chunk, q.device())?;
    let a = q.matmul(&k.t()?)?.broadcast_mul(&ones)?; // (BH, n, C, C)
    let kv = k.t()?.matmul(&v)?; // (BH, n, d, dv): each chunk's own sums
    let zk = k.sum_keepdim(2)?; // (BH, n, 1, d)
    let mut state = (prefix_sum(&kv, 1)? - &kv)?; // the chunks before each one
    let mut z = (prefix_sum(&zk, 1)? - &zk)?;
    if let Some((s0, z0)) = prefix {
        state = state.broadcast_add(&s0.reshape((b * h, 1, d, dv))?)?;
        z = z.broadcast_add(&z0.reshape((b * h, 1, 1, d))?)?;
    }
    let num = (q.matmul(&state)? + a.matmul(&v)?)?; // (BH, n, C, dv)
    let den = ((q.matmul(&z.t()?)? + a.sum_keepdim(3)?)? + EPS)?; // (BH, n, C, 1)
    num.broadcast_div(&den)?
        .reshape((b, h, n * chunk, dv))?
        .narrow(2, 0, t)
}

/// Inclusive prefix sum along `dim` in `log2(n)` shifted adds (Hillis & Steele), each
/// linear in the tensor's size, forward and backward.
fn prefix_sum(x: &Tensor, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let mut acc = x.clone();
    let mut step = 1;
    while step < n {
        let zeros = acc.narrow(dim, 0, step)?.zeros_like()?;
        let shifted = Tensor::cat(&[&zeros, &acc.narrow(dim, 0, n - step)?], dim)?;
        acc = (acc + shifted)?;
        step *= 2;
    }
    Ok(acc)
}

/// The quadratic form, `O(T S d)`: `a_ij = phi(q_i) . phi(k_j)` over the visible keys, then
/// `y_i = sum_j a_ij v_j / (sum_j a_ij + eps)`. The reference the linear form is checked and
/// benchmarked against.
pub fn kernel_attention_quadratic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> Result<Tensor> {
    let (t, s) = (q.dim(2)?, k.dim(2)?);
    let a = feature_map(q)?.matmul(&feature_map(k)?.t()?)?; // (B, H, T, S)
    let a = if causal && t > 1 {
        a.broadcast_mul(&causal_ones(t, s, q.device())?)?
    } else {
        a
    };
    let den = (a.sum_keepdim(3)? + EPS)?;
    a.matmul(v)?.broadcast_div(&den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_diff, rand};
    use candle_core::Var;

    fn to3(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
        // (1, H, T, d) -> [h][t][d]
        t.squeeze(0).unwrap().to_vec3().unwrap()
    }

    #[test]
    fn kernel_attention_matches_the_recurrent_form() {
        // Naive reference: running sums S = sum phi(k_j) v_j^T and z = sum phi(k_j), read by
        // phi(q_i) (causal: after adding key i; bidirectional: after all keys).
        let (h, t, d) = (2, 7, 5);
        let (q, k, v) = (
            rand(&[1, h, t, d], 1),
            rand(&[1, h, t, d], 2),
            rand(&[1, h, t, d], 3),
        );
        let phi = |x: f32| if x > 0.0 { x + 1.0 } else { x.exp() };
        for causal in [true, false] {
            let got = to3(&kernel_attention(&q, &k, &v, causal).unwrap());
            let (q, k, v) = (to3(&q), to3(&k), to3(&v));
            for hh in 0..h {
                for i in 0..t {
                    let upto = if causal { i + 1 } else { t };
                    let mut s = vec![vec![0f32; d]; d];
                    let mut z = vec![0f32; d];
                    for j in 0..upto {
                        for a in 0..d {
                            z[a] += phi(k[hh][j][a]);
                            for c in 0..d {
                                s[a][c] += phi(k[hh][j][a]) * v[hh][j][c];
                            }
                        }
                    }
                    let den: f32 = (0..d).map(|a| phi(q[hh][i][a]) * z[a]).sum::<f32>() + 1e-6;
                    for c in 0..d {
                        let num: f32 = (0..d).map(|a| phi(q[hh][i][a]) * s[a][c]).sum();
                        let want = num / den;
                        assert!(
                            (got[hh][i][c] - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "causal {causal} h{hh} t{i} c{c}: {} vs {want}",
                            got[hh][i][c]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn chunks_a_kv_prefix_and_gradients_match_the_quadratic_form() {
        // 13 queries in chunks of 4 (a ragged last chunk), with and without 4 cached keys
        // before them; forward and the gradients of q, k and v.
        for (t, s) in [(13, 13), (13, 17), (1, 9)] {
            for causal in [true, false] {
                let q = Var::from_tensor(&rand(&[1, 2, t, 5], 11)).unwrap();
                let k = Var::from_tensor(&rand(&[1, 2, s, 5], 12)).unwrap();
                let v = Var::from_tensor(&rand(&[1, 2, s, 3], 13)).unwrap();
                let w = rand(&[1, 2, t, 3], 14);
                let lin = kernel_attention_chunked(&q, &k, &v, causal, 4).unwrap();
                let quad = kernel_attention_quadratic(&q, &k, &v, causal).unwrap();
                assert!(max_diff(&lin, &quad) < 1e-5, "T {t} S {s} causal {causal}");
                let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let (gl, gq) = (grads(&lin), grads(&quad));
                for x in [&q, &k, &v] {
                    let (a, b) = (
                        gl.get(x.as_tensor()).unwrap(),
                        gq.get(x.as_tensor()).unwrap(),
                    );
                    assert!(max_diff(a, b) < 1e-4, "grad T {t} S {s} causal {causal}");
                }
            }
        }
    }
}
