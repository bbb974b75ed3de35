//! Adapters: small trainable modules on a frozen base, shared by training, generation and
//! serving. Today: LoRA factors on a projection (PEFT's layout and init; QLoRA when the base is
//! stored in NF4). Butterfly (BOFT) adapters and scaffold fusers come here too.

pub mod lora;

pub use lora::Lora;
