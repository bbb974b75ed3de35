//! Training objectives (DESIGN §3). `clm`: next-token cross-entropy; `sft`: the same,
//! restricted to the response tokens by a per-token loss mask built at `data prepare` time;
//! `mlm`: BERT-style masked-token prediction; `diffusion`: mask-diffusion (MDLM / LLaDA):
//! each sequence draws a time `t`, each token is replaced by the mask token with probability
//! `t`, and the loss is the cross-entropy on the masked tokens weighted by `1/t`, normalised
//! by the number of tokens. Masks are drawn from a generator keyed by (seed, salt, sample
//! index), so every rank, world size and resume sees the same masks.

pub mod batch;
pub mod loss;

pub use batch::{Batch, MIN_T, Masking};
pub use loss::{Totals, mean_loss, nll_and_hits, nll_sum, predicted_logits};
pub use stackwise_common::config::Objective;
