//! Adapters: small trainable modules on a frozen base, shared by training, generation and
//! serving. Today: LoRA factors on a projection (`lora.rs`: PEFT's layout; QLoRA when the base
//! is stored in NF4), butterfly orthogonal adapters (`boft.rs`: PEFT's BOFT math), and PEFT
//! adapter folders of both kinds (`peft.rs`: load, apply, merge). Scaffold fusers come here
//! too.

pub mod boft;
pub mod lora;
pub mod peft;

pub use boft::Boft;
pub use lora::Lora;
pub use peft::{BoftAdapter, LoraAdapter, PeftAdapter};
