//! Tokenizer files as `Tok::load` reads them: `tokenizer.json` or a SentencePiece `.model`
//! (first byte even: JSON, odd: SentencePiece), then an encode/decode round of some text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stackwise_common::tokenizer::Tok;

#[path = "split.rs"]
mod split;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let p = split::parts(rest, 2);
    let file = split::scratch().join(if kind % 2 == 0 {
        "tokenizer.json"
    } else {
        "tokenizer.model"
    });
    std::fs::write(&file, p[0]).unwrap();
    if let Ok(tok) = Tok::load(&file) {
        let text = String::from_utf8_lossy(p[1]);
        if let Ok(ids) = tok.encode(&text, true) {
            let _ = tok.decode(&ids);
        }
        let _ = tok.decode(&[0, 1, 2, u32::MAX]);
        let _ = tok.vocab_size();
        let _ = tok.eos_id();
    }
});
