//! Tokenizers (the HF `tokenizers` crate): load a `tokenizer.json` or GPT-2's `vocab.json` /
//! `encoder.json` + `merges.txt` / `vocab.bpe`, and train byte-level BPE, byte or char tokenizers.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

pub const EOS: &str = "<|endoftext|>";
/// The mask token StackWise adds for masked objectives when a tokenizer has none.
pub const MASK: &str = "<|mask|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("load tokenizer from {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("train tokenizer: {0}")]
    Train(String),
    #[error("tokenize: {0}")]
    Encode(String),
}

/// The kinds `stackwise tokenizer train` can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// Byte-level BPE (GPT-2 style) of a given vocabulary size.
    Bpe,
    /// 256 byte tokens, no merges.
    Byte,
    /// One token per distinct character of the corpus.
    Char,
}

impl std::str::FromStr for TokenizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bpe" => Ok(Self::Bpe),
            "byte" => Ok(Self::Byte),
            "char" => Ok(Self::Char),
            _ => Err(format!(
                "unknown tokenizer kind {s:?}; use bpe, byte or char"
            )),
        }
    }
}

/// A tokenizer plus the ids the trainer needs.
#[derive(Clone)]
pub struct Tok {
    pub inner: Tokenizer,
}

impl Tok {
    /// A `tokenizer.json`'s bytes, parsed. The JSON is checked first, and a panic inside
    /// `tokenizers` is caught: its deserializer panics on some malformed files (found by
    /// fuzzing: `DecoderHelper::deserialize(..).expect("Helper")`), which must be an error.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| format!("not valid JSON: {e}"))?;
        match std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes)) {
            Ok(Ok(inner)) => Ok(Self { inner }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(p) => Err(format!(
                "malformed (the tokenizers library failed on it: {})",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic")
            )),
        }
    }
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tok(vocab {})", self.vocab_size())
    }
}

impl Tok {
    /// `path`: a `tokenizer.json`, a SentencePiece `.model`, a folder holding either
    /// (`tokenizer.json` first, then `tokenizer.model`), or GPT-2's two BPE files.
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        let err = |msg: String| TokenizerError::Load {
            path: path.display().to_string(),
            msg,
        };
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let spm = if path.is_dir() {
            path.join("tokenizer.model")
        } else {
            path.to_path_buf()
        };
        let is_model = |p: &Path| p.is_file() && p.extension().is_some_and(|e| e == "model");
        if (!file.exists() || is_model(path)) && is_model(&spm) {
            let bytes = std::fs::read(&spm).map_err(|e| err(e.to_string()))?;
            let inner = crate::sentencepiece::tokenizer(&bytes).map_err(err)?;
            return Ok(Self { inner });
        }
        if file.exists() {
            let bytes = std::fs::read(&file).map_err(|e| err(e.to_string()))?;
            return Self::from_json_bytes(&bytes).map_err(err);
        }
        if path.is_dir() {
            let pick = |names: &[&str]| names.iter().map(|n| path.join(n)).find(|p| p.exists());
            if let (Some(vocab), Some(merges)) = (
                pick(&["vocab.json", "encoder.json"]),
                pick(&["merges.txt", "vocab.bpe"]),
            ) {
                return Self::from_gpt2_files(&vocab, &merges).map_err(|e| err(e.to_string()));
            }
        }
        Err(err(
            "no tokenizer.json, and no vocab.json/encoder.json + merges.txt/vocab.bpe pair".into(),
        ))
    }

    /// GPT-2's original BPE files (`encoder.json` + `vocab.bpe`, or `vocab.json` + `merges.txt`).
    pub fn from_gpt2_files(vocab: &Path, merges: &Path) -> Result<Self, TokenizerError> {
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| TokenizerError::Load {
                path: vocab.display().to_string(),
                msg: e.to_string(),
            })?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        Ok(Self { inner })
    }

    /// Train a tokenizer of `kind` on in-memory texts. `vocab_size` is used by `bpe` only.
    pub fn train(
        kind: TokenizerKind,
        texts: &[String],
        vocab_size: usize,
    ) -> Result<Self, TokenizerError> {
        Self::train_from_iter(kind, texts.iter(), vocab_size)
    }

    /// [`Self::train`] on texts that stream by (one at a time in memory).
    pub fn train_from_iter<I, S>(
        kind: TokenizerKind,
        texts: I,
        vocab_size: usize,
    ) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let special = vec![AddedToken::from(EOS, true)];
        let inner = match kind {
            TokenizerKind::Bpe | TokenizerKind::Byte => {
                let vocab_size = if kind == TokenizerKind::Byte {
                    257
                } else {
                    vocab_size
                };
                if vocab_size < 257 {
                    return Err(TokenizerError::Train(format!(
                        "vocab_size {vocab_size} is below the 256 bytes + {EOS}; use at least 257"
                    )));
                }
                let trainer = BpeTrainerBuilder::new()
                    .vocab_size(vocab_size)
                    .min_frequency(2)
                    .show_progress(false)
                    .special_tokens(special)
                    .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                    .build();
                let mut trainer: tokenizers::models::TrainerWrapper = trainer.into();
                let mut t = Tokenizer::new(BPE::default());
                t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
                t.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
                t.train(&mut trainer, texts)
                    .map_err(|e| TokenizerError::Train(e.to_string()))?;
                t
            }
            TokenizerKind::Char => {
                let mut chars = std::collections::BTreeSet::new();
                for t in texts {
                    chars.extend(t.as_ref().chars());
                }
                let mut vocab: HashMap<String, u32> = HashMap::new();
                vocab.insert("<unk>".into(), 0);
                for c in chars {
                    let n = vocab.len() as u32;
                    vocab.entry(c.to_string()).or_insert(n);
                }
                let wl = WordLevel::builder()
                    .vocab(vocab.into_iter().collect())
                    .unk_token("<unk>".into())
                    .build()
                    .map_err(|e| TokenizerError::Train(e.to_string()))?;
                let mut t = Tokenizer::new(wl);
                let split = Split::new(
                    SplitPattern::Regex("(?s).".into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| TokenizerError::Train(e.to_string()))?;
                t.with_pre_tokenizer(Some(split));
                t.with_decoder(Some(Fuse::new()));
                t.add_special_tokens(special.clone())
                    .map_err(|e| TokenizerError::Train(e.to_string()))?;
                t
            }
        };
        Ok(Self { inner })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_id(&self) -> Option<u32> {
        ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| self.inner.token_to_id(t))
    }

    /// The mask token of masked objectives (`<mask>`, `[MASK]` or `<|mask|>`); when the
    /// tokenizer has none, `<|mask|>` is added as a special token (at id `vocab_size`).
    pub fn ensure_mask_token(&mut self) -> Result<u32, TokenizerError> {
        if let Some(id) = ["<mask>", "[MASK]", MASK]
            .iter()
            .find_map(|t| self.inner.token_to_id(t))
        {
            return Ok(id);
        }
        self.inner
            .add_special_tokens(vec![AddedToken::from(MASK, true)])
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        self.inner
            .token_to_id(MASK)
            .ok_or_else(|| TokenizerError::Encode("adding the mask token failed".into()))
    }

    /// Token ids of `text`; `special`: add the tokenizer's own special tokens (BOS…), as HF's
    /// `tokenizer(text)` does by default.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, special)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(true)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzer finds (`fuzz/run.sh`, target `tokenizer`): each made `tokenizers` panic.
    #[test]
    fn malformed_tokenizer_files_are_errors_not_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fuzz");
        for name in [
            "tokenizer-decoder-panic.json",
            "tokenizer-decoder-panic-2.json",
        ] {
            let found = std::fs::read(dir.join(name)).unwrap();
            let e = Tok::from_json_bytes(&found).expect_err("refused");
            assert!(e.contains("not valid JSON"), "{name}: {e}");
        }
        let found = std::fs::read(dir.join("tokenizer-decoder-panic.json")).unwrap();
        // Valid JSON whose decoder matches no decoder type is an error of its own.
        let mut v: serde_json::Value = serde_json::from_str(
            &Tok::train(TokenizerKind::Byte, &[], 0)
                .unwrap()
                .to_json()
                .unwrap(),
        )
        .unwrap();
        for decoder in [
            serde_json::json!({"type": 7}),
            serde_json::json!({"no type": true}),
            serde_json::json!([1, 2]),
        ] {
            v["decoder"] = decoder;
            let bytes = serde_json::to_vec(&v).unwrap();
            let e = Tok::from_json_bytes(&bytes).expect_err("refused");
            assert!(e.contains("did not match any variant"), "{e}");
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &found).unwrap();
        let e = Tok::load(f.path()).expect_err("refused").to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    fn corpus() -> Vec<String> {
        vec!["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n".repeat(20), "Ünïcødé — ok?\n".into()]
    }

    #[test]
    fn every_kind_round_trips_text() {
        for kind in [TokenizerKind::Bpe, TokenizerKind::Byte, TokenizerKind::Char] {
            let tok = Tok::train(kind, &corpus(), 300).unwrap();
            let text = "To be, or not — Ünïcødé?\n  t";
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "{kind:?}");
            assert!(tok.eos_id().is_some());
            let again = Tok {
                inner: Tokenizer::from_bytes(tok.to_json().unwrap()).unwrap(),
            };
            assert_eq!(
                again.encode(text, false).unwrap(),
                ids,
                "{kind:?} after save/load"
            );
        }
    }

    #[test]
    fn bpe_merges_shrink_the_sequence() {
        let bpe = Tok::train(TokenizerKind::Bpe, &corpus(), 300).unwrap();
        let byte = Tok::train(TokenizerKind::Byte, &corpus(), 0).unwrap();
        let text = "To be, or not to be, that is the question";
        assert_eq!(byte.vocab_size(), 257);
        assert!(bpe.encode(text, false).unwrap().len() < byte.encode(text, false).unwrap().len());
    }

    #[test]
    fn a_mask_token_is_added_once_when_missing() {
        let mut tok = Tok::train(TokenizerKind::Byte, &corpus(), 0).unwrap();
        let n = tok.vocab_size();
        let id = tok.ensure_mask_token().unwrap();
        assert_eq!((id as usize, tok.vocab_size()), (n, n + 1));
        assert_eq!(tok.ensure_mask_token().unwrap(), id);
        // Decoding skips it like any special token.
        let mut ids = tok.encode("ab", false).unwrap();
        ids.insert(1, id);
        assert_eq!(tok.decode(&ids).unwrap(), "ab");
    }

    #[test]
    fn too_small_a_vocab_is_refused() {
        assert!(Tok::train(TokenizerKind::Bpe, &corpus(), 100).is_err());
    }
}
