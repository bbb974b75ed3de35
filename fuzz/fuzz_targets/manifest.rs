//! `MANIFEST.json` of a checkpoint: parsed, validated, and verified against the folder's
//! files, through the checkpoint store that `--resume`, `ckpt verify` and `eval` use.
//! Input: the manifest, then the bytes of `model.safetensors`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackwise_common::checkpoint::{CheckpointStore, Manifest};
use stackwise_common::store::Store;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let p = split::parts(data, 2);
    if let Ok(m) = Manifest::from_json(p[0]) {
        for f in &m.files {
            let _ = f.verify(p[1]);
        }
    }
    let run = split::scratch().join("run");
    let ck = run.join("checkpoints/step-00000001");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("MANIFEST.json"), p[0]).unwrap();
    std::fs::write(ck.join("model.safetensors"), p[1]).unwrap();
    static STORE: std::sync::OnceLock<Store> = std::sync::OnceLock::new();
    let store = STORE.get_or_init(|| Store::open(run.to_str().unwrap()).unwrap());
    let ckpts = CheckpointStore::new(store);
    let _ = ckpts.newest_manifest();
    let _ = ckpts.load("step-00000001");
});
