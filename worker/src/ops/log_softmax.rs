//! Log-softmax composed from candle ops (so it has a backward).

use candle_core::{D, Result, Tensor};

/// Log-softmax over the last dimension (composed, differentiable).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let diff = x.broadcast_sub(&max)?;
    let lse = diff.exp()?.sum_keepdim(D::Minus1)?.log()?;
    diff.broadcast_sub(&lse)
}
