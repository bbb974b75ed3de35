//! `MANIFEST.json`: every file of a checkpoint with its size and sha256, and a format version.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::policy::CheckpointMeta;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// Where the bytes are when they are shared with other checkpoints instead of written
    /// again (a path under `checkpoints/`, e.g. a stage's full-precision backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

impl ManifestEntry {
    pub fn of(path: &str, data: &[u8]) -> Self {
        Self {
            path: path.to_string(),
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
            object: None,
        }
    }

    pub fn verify(&self, data: &[u8]) -> Result<(), String> {
        if data.len() as u64 != self.bytes {
            return Err(format!(
                "{}: {} bytes, manifest says {}",
                self.path,
                data.len(),
                self.bytes
            ));
        }
        let got = hex::encode(Sha256::digest(data));
        if got != self.sha256 {
            return Err(format!(
                "{}: sha256 {got} does not match the manifest's {}",
                self.path, self.sha256
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub step: u64,
    #[serde(flatten)]
    pub meta: CheckpointMeta,
    pub files: Vec<ManifestEntry>,
}

impl Manifest {
    pub fn new(step: u64, meta: CheckpointMeta, files: Vec<ManifestEntry>) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step,
            meta,
            files,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("manifest serializes")
    }

    pub fn from_json(raw: &[u8]) -> Result<Self, String> {
        let m: Manifest = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        if m.format_version > FORMAT_VERSION {
            return Err(format!(
                "format_version {} is newer than this build reads ({FORMAT_VERSION})",
                m.format_version
            ));
        }
        Ok(m)
    }
}
