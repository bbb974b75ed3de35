//! Data: `source` reads the inputs in bounded memory; `prepare` turns text / JSONL into
//! token shards with an index; `dataset` reads them back as byte ranges and cuts samples;
//! `cursor` orders samples as a pure function of `(seed, epoch)`.

pub mod cursor;
pub mod dataset;
pub mod error;
pub mod prepare;
pub mod source;

pub use cursor::{Cursor, rank_rows};
pub use dataset::{Sample, SplitData, TokenIndex};
pub use error::DataError;
pub use prepare::{PrepareOptions, prepare, prepare_scanned};
pub use source::{Scan, scan};
