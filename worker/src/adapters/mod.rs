//! Adapters: small trainable modules on a frozen base, shared by training, generation and
//! serving. Today: LoRA factors on a projection (`lora.rs`: PEFT's layout; QLoRA when the base
//! is stored in NF4) and PEFT adapter folders (`peft.rs`: load, apply unmerged, merge).
//! Butterfly (BOFT) adapters and scaffold fusers come here too.

pub mod lora;
pub mod peft;

pub use lora::Lora;
pub use peft::LoraAdapter;
