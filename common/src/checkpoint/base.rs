//! The frozen base of an adapter run, referenced from each checkpoint's manifest by where it
//! is and the sha256 of its weights, never copied into the run.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Precision;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseRef {
    /// The base model's folder (an absolute path).
    pub path: String,
    /// sha256 of its safetensors files, read in name order as one stream.
    pub sha256: String,
    /// How the trainer stored the base (`nf4` for QLoRA): loaders store it the same way, so
    /// the adapter sees the weights it was trained on.
    pub precision: Precision,
}

/// Files of a StackWise checkpoint folder that hold no model weights.
const NOT_WEIGHTS: [&str; 2] = ["optimizer.safetensors", "ema.safetensors"];

/// sha256 of the model's `*.safetensors` files in `dir` (a checkpoint folder's optimizer
/// and EMA state left out), in name order, as one stream.
pub fn weights_sha256(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("read the base model folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter(|p| {
            p.file_name()
                .is_none_or(|n| !NOT_WEIGHTS.contains(&n.to_string_lossy().as_ref()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .safetensors weights", dir.display());
    }
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("open {}", f.display()))?;
        std::io::copy(&mut file, &mut h).with_context(|| format!("read {}", f.display()))?;
    }
    Ok(hex::encode(h.finalize()))
}

impl BaseRef {
    pub fn of_dir(dir: &Path, precision: Precision) -> Result<Self> {
        let abs = std::path::absolute(dir).with_context(|| format!("resolve {}", dir.display()))?;
        Ok(Self {
            path: abs.to_string_lossy().into_owned(),
            sha256: weights_sha256(dir)?,
            precision,
        })
    }

    /// The base folder, checked to hold the weights the adapter was trained on.
    pub fn verified_dir(&self) -> Result<&Path> {
        let dir = Path::new(&self.path);
        let now = weights_sha256(dir)
            .with_context(|| format!("the adapter's base model {} is not readable", self.path))?;
        if now != self.sha256 {
            bail!(
                "the base model at {} changed since the adapter was trained: its weights' sha256 is {}, the checkpoint \
                 references {}; restore the original base",
                self.path,
                &now[..16],
                &self.sha256[..16]
            );
        }
        Ok(dir)
    }
}

/// A model folder named in a config (`init_from`, `scaffold.base`, `scaffold.scaffold`): an
/// HF or checkpoint folder as given, or a run folder's newest checkpoint whose manifest
/// verifies.
pub fn model_folder(path: &str) -> Result<String> {
    let p = Path::new(path);
    if p.join("config.json").exists() || !p.join("checkpoints").is_dir() {
        return Ok(path.to_string());
    }
    let run = crate::store::Store::open(path)?;
    let ck = super::CheckpointStore::new(&run)
        .load_latest()?
        .with_context(|| format!("{path}: no checkpoint with a valid manifest"))?;
    Ok(p.join("checkpoints")
        .join(&ck.name)
        .to_string_lossy()
        .into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_base_is_refused_with_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"weights").unwrap();
        let r = BaseRef::of_dir(dir.path(), Precision::Fp32).unwrap();
        assert!(r.verified_dir().is_ok());
        std::fs::write(dir.path().join("model.safetensors"), b"other").unwrap();
        let e = r.verified_dir().unwrap_err().to_string();
        assert!(e.contains("changed since the adapter was trained"), "{e}");
    }
}
