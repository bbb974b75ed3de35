//! The storage precision of frozen weights, which the planner, the adapter section and the
//! worker all speak.

use serde::{Deserialize, Serialize};

/// Storage precision of frozen linear weights; they are dequantized to f32 on the fly, so
/// gradients still flow through them to earlier trainable parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
    Fp8,
    Nf4,
    /// NF4 with QLoRA's double quantization (bitsandbytes' `compress_statistics`,
    /// `bnb_4bit_use_double_quant`): the block absmax values are themselves stored as 8-bit
    /// codes. For adapter fine-tunes (`adapter.double_quant`), whose base is re-read on resume.
    #[serde(rename = "nf4_dq")]
    Nf4Dq,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp8 => "fp8",
            Precision::Nf4 => "nf4",
            Precision::Nf4Dq => "nf4_dq",
        }
    }

    /// NF4 storage, with or without double quantization (QLoRA's base).
    pub fn is_nf4(self) -> bool {
        matches!(self, Precision::Nf4 | Precision::Nf4Dq)
    }

    /// Whether storing at this precision loses information (and so needs a backup).
    pub fn is_lossy(self) -> bool {
        self != Precision::Fp32
    }
}

/// Mixed precision of a step's matrix products (`training.autocast`), as `torch.autocast`:
/// f32 weights and activations, bf16 (or f16) products; meant for GPUs (on the CPU it is slower).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Autocast {
    #[default]
    #[serde(alias = "none", alias = "fp32")]
    Off,
    Bf16,
    Fp16,
}

impl std::str::FromStr for Autocast {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" | "fp32" => Ok(Autocast::Off),
            "bf16" => Ok(Autocast::Bf16),
            "fp16" => Ok(Autocast::Fp16),
            _ => Err(format!("autocast {s:?}: expected off, bf16 or fp16")),
        }
    }
}
