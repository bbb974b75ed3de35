//! LoRA (Hu et al. 2021) in PEFT's layout: `A (r, in)`, `B (out, r)`, and the projection
//! becomes `y = base(x) + scale * (x A^T) B^T` with `scale = alpha / r`. The factors are built
//! by `ParamBuilder::lora` (kaiming-uniform A, zero B, as PEFT initializes them).

use candle_core::{Result, Tensor};

#[derive(Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    /// PEFT's `lora_dropout` on the adapter's input, while training (`ops::dropout`).
    pub dropout: f64,
    /// The adapted module's `ops::dropout::module_key`: its dropout masks are its own.
    pub module: u64,
}

impl Lora {
    /// `scale * (x A^T) B^T` for `x (N, in)`: what the adapter adds to the base output `(N, out)`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        self.delta_from(&self.hidden(x)?)
    }

    /// The adapter's hidden state `scale * dropout(x) A^T`, `(N, r)`: the slices of a fused
    /// projection share it (`columns`), so it is computed once for all of them. The scale is
    /// applied here, on r columns, rather than on the `(N, out)` delta: the same numbers when
    /// it is a power of two (PEFT's usual `lora_alpha = 2 r`), within rounding otherwise.
    pub fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        let x = crate::ops::dropout::apply(x, self.dropout, self.module)?;
        crate::ops::matmul_rows(&x, &self.a.t()?)? * self.scale
    }

    /// What the adapter adds given its hidden state `h` ([`Lora::hidden`]): `h B^T`.
    pub fn delta_from(&self, h: &Tensor) -> Result<Tensor> {
        crate::ops::matmul_rows(h, &self.b.t()?)
    }

    /// The adapter of output features `start..start + len` (a slice of a fused projection).
    pub fn columns(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            a: self.a.clone(),
            b: self.b.narrow(0, start, len)?,
            scale: self.scale,
            // Slices of one projection share its input, so they share its dropout mask too
            // (PEFT applies one dropout to c_attn's input).
            dropout: self.dropout,
            module: self.module,
        })
    }
}
