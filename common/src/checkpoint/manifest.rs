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

/// The lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

impl ManifestEntry {
    pub fn of(path: &str, data: &[u8]) -> Self {
        Self {
            path: path.to_string(),
            bytes: data.len() as u64,
            sha256: sha256_hex(data),
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
        let got = sha256_hex(data);
        if got != self.sha256 {
            return Err(format!(
                "{}: sha256 {got} does not match the manifest's {}",
                self.path, self.sha256
            ));
        }
        Ok(())
    }
}

/// A relative path without `..`, empty or absolute parts.
fn relative_inside(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\\')
        && p.split('/')
            .all(|part| !part.is_empty() && part != ".." && part != ".")
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
        for f in &m.files {
            let hex = f.sha256.len() == 64 && f.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                return Err(format!(
                    "{}: sha256 {:?} is not 64 hex digits",
                    f.path, f.sha256
                ));
            }
            for p in std::iter::once(&f.path).chain(&f.object) {
                if !relative_inside(p) {
                    return Err(format!(
                        "file path {p:?} must be a relative path inside the checkpoints folder"
                    ));
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_with_bad_hashes_or_paths_are_refused() {
        let good = Manifest::new(
            3,
            CheckpointMeta::default(),
            vec![ManifestEntry::of("model.safetensors", b"x")],
        );
        assert!(Manifest::from_json(&good.to_json()).is_ok());
        let with =
            |f: ManifestEntry| Manifest::new(3, CheckpointMeta::default(), vec![f]).to_json();
        let short = ManifestEntry {
            sha256: "abc".into(),
            ..ManifestEntry::of("model.safetensors", b"x")
        };
        assert!(
            Manifest::from_json(&with(short))
                .unwrap_err()
                .contains("64 hex digits")
        );
        for bad in ["../secret", "/etc/passwd", "a//b", ""] {
            let e = Manifest::from_json(&with(ManifestEntry::of(bad, b"x"))).unwrap_err();
            assert!(e.contains("relative path"), "{bad}: {e}");
        }
        let shared = ManifestEntry {
            object: Some("../../elsewhere".into()),
            ..ManifestEntry::of("frozen.safetensors", b"x")
        };
        assert!(Manifest::from_json(&with(shared)).is_err());
        assert!(
            Manifest::from_json(&with(ManifestEntry::of(
                "adapter/adapter_model.safetensors",
                b"x"
            )))
            .is_ok()
        );
    }
}
