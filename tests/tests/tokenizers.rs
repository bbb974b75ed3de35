//! GPT-2's original BPE files load and encode exactly as the reference encoder
//! (`tests/fixtures-tokenizers/gpt2-bpe/make.sh` produced the expected ids with it).

use std::path::Path;

use stackwise_common::tokenizer::Tok;

#[test]
fn gpt2_bpe_files_match_the_reference_encoder() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures-tokenizers/gpt2-bpe");
    let tok = Tok::load(&dir).expect("load encoder.json + vocab.bpe from the folder");
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.eos_id(), Some(50256));
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        assert_eq!(tok.decode(&got).unwrap(), text, "round trip {text:?}");
    }
}
