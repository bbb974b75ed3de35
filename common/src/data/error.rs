//! Errors of data preparation and loading, naming the file (and line) or the dataset.

use crate::store::StoreError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    #[error("{file}:{line}: {msg}")]
    Line {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("no input files found in {0}; give text files, folders of them, or .jsonl files")]
    NoInputs(String),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("dataset {uri}: {msg}")]
    Index { uri: String, msg: String },
}
