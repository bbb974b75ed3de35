//! A Hugging Face model folder as `load_model_dir` reads it (`eval`, `generate`, `finetune
//! --model`, `init_from`): `config.json`, then `model.safetensors`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackwise_worker::models::hf::load_model_dir;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let p = split::parts(data, 2);
    let dir = split::scratch().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), p[0]).unwrap();
    std::fs::write(dir.join("model.safetensors"), p[1]).unwrap();
    let _ = load_model_dir(&dir, &candle_core::Device::Cpu);
});
