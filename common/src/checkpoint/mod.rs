//! Checkpoints in object storage (DESIGN §6): a folder `<run>/checkpoints/step-NNNNNNNN/`
//! whose `MANIFEST.json`, written last, lists every file with its size and sha256. What the
//! files are (weights, optimizer, trainer state) is the worker's `checkpoint` module's
//! business; this layer only stores, lists, verifies and retires them.

pub mod base;
pub mod manifest;
pub mod policy;
pub mod store;

pub use base::{BaseRef, model_folder};
pub use manifest::{Manifest, ManifestEntry, sha256_hex};
pub use policy::{CheckpointMeta, retention};
pub use store::{CheckpointError, CheckpointStore, LoadedCheckpoint, step_dir};
