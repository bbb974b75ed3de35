//! A prepared dataset as training reads it: `index.json` and one shard's `.bin`, `.mask`
//! and `.docs` (stem `train-00000`), then samples cut from each split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackwise_common::data::TokenIndex;
use stackwise_common::store::Store;
use stackwise_common::tokenizer::{Tok, TokenizerKind};

#[path = "split.rs"]
mod split;

fn tokenizer_json() -> &'static str {
    static JSON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    JSON.get_or_init(|| {
        Tok::train(TokenizerKind::Byte, &[], 0)
            .and_then(|t| t.to_json())
            .expect("byte tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let p = split::parts(data, 4);
    let dir = split::scratch().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    std::fs::write(dir.join("index.json"), p[0]).unwrap();
    for (ext, bytes) in [("bin", p[1]), ("mask", p[2]), ("docs", p[3])] {
        std::fs::write(dir.join(format!("train-00000.{ext}")), bytes).unwrap();
    }
    static STORE: std::sync::OnceLock<Store> = std::sync::OnceLock::new();
    let store = STORE.get_or_init(|| Store::open(dir.to_str().unwrap()).unwrap());
    // The whole of `TokenIndex::open` (the tokenizer too) on a few inputs; on the rest its
    // index parse alone, as the tokenizer has a target of its own.
    let index = if p[0].len() % 16 == 0 {
        match TokenIndex::open(store) {
            Ok((index, _)) => index,
            Err(_) => return,
        }
    } else {
        match serde_json::from_slice::<TokenIndex>(p[0]) {
            Ok(index) => index,
            Err(_) => return,
        }
    };
    for split in [&index.train, &index.validation] {
        let Ok(d) = index.load_split(store, split) else {
            continue;
        };
        for seq_len in [1, 7, 64] {
            for packed in [true, false] {
                let n = d.num_samples(seq_len, packed);
                for i in [0, n / 2, n.saturating_sub(1)] {
                    // Token ids are checked as samples are read: bad ones are an error.
                    if let Some(Ok((ids, mask))) =
                        (i < n).then(|| d.sample(i, seq_len, packed, 0, !packed))
                    {
                        assert_eq!((ids.len(), mask.len()), (seq_len, seq_len));
                    }
                }
            }
        }
    }
});
