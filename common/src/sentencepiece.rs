//! SentencePiece `.model` files: the protobuf (`sentencepiece_model.proto`, the fields read
//! here) decoded with prost, and turned into a `tokenizers` pipeline that gives the same ids:
//! the model's precompiled normalization, whitespace handling (`▁`, the dummy prefix), and a
//! Unigram or BPE model with byte fallback. Checked against the `sentencepiece` package on
//! models it trained (`tests/fixtures/sentencepiece`).

use prost::Message;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, Tokenizer};

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Piece {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    #[prost(int32, optional, tag = "3")]
    pub kind: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TrainerSpec {
    /// UNIGRAM 1, BPE 2, WORD 3, CHAR 4.
    #[prost(int32, optional, tag = "3")]
    pub model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    pub unk_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    pub add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    pub remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    pub escape_whitespaces: Option<bool>,
}

const UNIGRAM: i32 = 1;
const BPE_TYPE: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNKNOWN: i32 = 2;

/// The `tokenizers` equivalent of the SentencePiece model in `bytes`.
pub fn tokenizer(bytes: &[u8]) -> Result<Tokenizer, String> {
    let proto = ModelProto::decode(bytes).map_err(|e| format!("not a SentencePiece model: {e}"))?;
    if proto.pieces.is_empty() {
        return Err("a SentencePiece model with no pieces".into());
    }
    let trainer = proto.trainer_spec.clone().unwrap_or_default();
    let norm = proto.normalizer_spec.clone().unwrap_or_default();
    let byte_fallback = trainer.byte_fallback.unwrap_or(false);
    let pieces: Vec<(String, f64, i32)> = proto
        .pieces
        .iter()
        .map(|p| {
            (
                p.piece.clone().unwrap_or_default(),
                p.score.unwrap_or(0.0) as f64,
                p.kind.unwrap_or(1),
            )
        })
        .collect();
    let unk_id = pieces
        .iter()
        .position(|p| p.2 == UNKNOWN)
        .or(trainer.unk_id.map(|u| u as usize));
    let model: ModelWrapper = match trainer.model_type.unwrap_or(UNIGRAM) {
        UNIGRAM => Unigram::from(
            pieces.iter().map(|(p, s, _)| (p.clone(), *s)).collect(),
            unk_id,
            byte_fallback,
        )
        .map_err(|e| e.to_string())?
        .into(),
        BPE_TYPE => bpe(&pieces, unk_id, byte_fallback)?.into(),
        other => {
            return Err(format!(
                "SentencePiece model_type {other} (WORD / CHAR) is not supported; use unigram or bpe"
            ));
        }
    };
    let mut tok = Tokenizer::new(model);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if let Some(map) = norm
        .precompiled_charsmap
        .as_deref()
        .filter(|m| !m.is_empty())
    {
        normalizers.push(
            Precompiled::from(map)
                .map_err(|e| format!("precompiled_charsmap: {e}"))?
                .into(),
        );
    }
    if norm.remove_extra_whitespaces.unwrap_or(true) {
        // SentencePiece drops leading and trailing spaces and folds runs of them into one.
        normalizers.push(Strip::new(true, true).into());
        normalizers.push(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
                " ",
            )
            .map_err(|e| e.to_string())?
            .into(),
        );
    }
    tok.with_normalizer(Some(Sequence::new(normalizers)))
        .map_err(|e| e.to_string())?;
    let prepend = if norm.add_dummy_prefix.unwrap_or(true) {
        PrependScheme::Always
    } else {
        PrependScheme::Never
    };
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', prepend, true)));
    // `▁` back to spaces, byte pieces to bytes, one string, then the dummy prefix's space off.
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(|e| e.to_string())?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if prepend == PrependScheme::Always {
        decoders.push(tokenizers::decoders::strip::Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    let specials: Vec<AddedToken> = pieces
        .iter()
        .filter(|p| p.2 == CONTROL || p.2 == UNKNOWN || p.2 == USER_DEFINED)
        .map(|(p, _, kind)| AddedToken::from(p.clone(), *kind != USER_DEFINED))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| e.to_string())?;
    Ok(tok)
}

/// A BPE model from SentencePiece pieces: the vocabulary by id, and the merges every piece
/// can be built by, ordered by the merged piece's score (as transformers' converter does).
fn bpe(
    pieces: &[(String, f64, i32)],
    unk_id: Option<usize>,
    byte_fallback: bool,
) -> Result<BPE, String> {
    let vocab: Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.0.clone(), i as u32))
        .collect();
    let mut merges: Vec<(String, String, f64, u32, u32)> = Vec::new();
    for (piece, score, _) in pieces {
        let chars: Vec<(usize, char)> = piece.char_indices().collect();
        for &(at, _) in chars.iter().skip(1) {
            let (l, r) = (&piece[..at], &piece[at..]);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((l.to_string(), r.to_string(), *score, li, ri));
            }
        }
    }
    // Highest score first; ties by the ids of the parts.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.3.cmp(&b.3)).then(a.4.cmp(&b.4)));
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges.into_iter().map(|(l, r, ..)| (l, r)).collect())
        .byte_fallback(byte_fallback)
        .fuse_unk(true);
    if let Some(u) = unk_id {
        builder = builder.unk_token(pieces[u].0.clone());
    }
    builder.build().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids and decoded text of every probe equal the `sentencepiece` package's, for a unigram
    /// and a BPE model it trained (`tests/fixtures/make_sentencepiece.py`).
    #[test]
    fn ids_and_decoding_match_the_sentencepiece_package() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/sentencepiece");
        for kind in ["unigram", "bpe"] {
            let tok =
                tokenizer(&std::fs::read(dir.join(format!("{kind}.model"))).unwrap()).unwrap();
            let want: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join(format!("{kind}.json"))).unwrap(),
            )
            .unwrap();
            assert_eq!(
                tok.get_vocab_size(true),
                want["vocab_size"].as_u64().unwrap() as usize
            );
            for p in want["probes"].as_array().unwrap() {
                let text = p["text"].as_str().unwrap();
                let ids: Vec<u32> = tok.encode(text, false).unwrap().get_ids().to_vec();
                let expect: Vec<u32> = p["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(ids, expect, "{kind}: {text:?}");
                assert_eq!(
                    tok.decode(&ids, true).unwrap(),
                    p["decoded"].as_str().unwrap(),
                    "{kind}: {text:?}"
                );
                // The pipeline survives tokenizer.json (what datasets and checkpoints keep).
                let again = Tokenizer::from_bytes(tok.to_string(false).unwrap()).unwrap();
                assert_eq!(again.encode(text, false).unwrap().get_ids(), ids.as_slice());
            }
            let via_load = crate::tokenizer::Tok::load(&dir.join(format!("{kind}.model"))).unwrap();
            assert_eq!(
                via_load.eos_id(),
                Some(want["eos_id"].as_u64().unwrap() as u32)
            );
        }
    }
}
