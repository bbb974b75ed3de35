//! `stackwise data prepare` on a JSONL file: records (`text`, `prompt`/`completion`,
//! `messages`), SFT masks, the split and the shards, then reading the dataset back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackwise_common::data::{PrepareOptions, TokenIndex, prepare};
use stackwise_common::store::Store;
use stackwise_common::tokenizer::{Tok, TokenizerKind};

#[path = "split.rs"]
mod split;

fn byte_tokenizer() -> &'static Tok {
    static TOK: std::sync::OnceLock<Tok> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Tok::train(TokenizerKind::Byte, &[], 0).expect("byte tokenizer"))
}

fuzz_target!(|data: &[u8]| {
    let dir = split::scratch();
    let input = dir.join("in.jsonl");
    std::fs::write(&input, data).unwrap();
    let out = dir.join("prepared");
    let store = Store::open(out.to_str().unwrap()).unwrap();
    let opts = PrepareOptions {
        val_fraction: 0.2,
        shard_tokens: 64,
        ..Default::default()
    };
    if let Ok(index) = prepare(&[input], byte_tokenizer(), &store, &opts) {
        let (back, _) = TokenIndex::open(&store).expect("a prepared dataset opens");
        for split in [&back.train, &back.validation] {
            let d = back
                .load_split(&store, split)
                .expect("a prepared split loads");
            let (ids, mask) = d.read_all().expect("its tokens read back");
            assert_eq!((ids.len() as u64, mask.len() as u64), (split.tokens, split.tokens));
        }
        assert_eq!(back.train.tokens, index.train.tokens);
    }
});
