//! The checkpoint store: a run's `checkpoints/` folder. A checkpoint is a folder
//! `step-NNNNNNNN/` whose `MANIFEST.json` is written last and lists every file with its size
//! and sha256: without a manifest that verifies, it does not exist.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::manifest::{Manifest, ManifestEntry};
use super::policy::{CheckpointMeta, retention};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("checkpoint {name}: {msg}")]
    Invalid { name: String, msg: String },
    #[error(
        "{run} already has checkpoints ({names}); pass --resume to continue it, or set run.name to start a new run"
    )]
    AlreadyExists { run: String, names: String },
}

pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// The checkpoints of one run: `<run root>/checkpoints/`.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    pub store: Store,
}

/// A verified checkpoint's files.
pub struct LoadedCheckpoint {
    pub name: String,
    pub manifest: Manifest,
    pub files: BTreeMap<String, Bytes>,
}

impl CheckpointStore {
    /// `run`: the run's root (`<output>/runs/<run_id>`).
    pub fn new(run: &Store) -> Self {
        Self {
            store: run.child("checkpoints"),
        }
    }

    /// The `checkpoints/` store itself.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Write `files`, then the manifest (create-only). Returns the checkpoint's name.
    pub fn save(
        &self,
        step: u64,
        meta: CheckpointMeta,
        files: Vec<(String, Bytes)>,
    ) -> Result<String, CheckpointError> {
        self.save_with_refs(step, meta, files, Vec::new())
    }

    /// Write an object several checkpoints share (`object`, a path under `checkpoints/`
    /// outside the `step-*` folders) and return the manifest entry that references it as
    /// `file`. Checkpoints list it without writing it again; retention deletes it once no
    /// remaining checkpoint references it.
    pub fn put_shared(
        &self,
        object: &str,
        file: &str,
        bytes: Bytes,
    ) -> Result<ManifestEntry, CheckpointError> {
        self.store.put(object, bytes.clone())?;
        Ok(ManifestEntry {
            object: Some(object.to_string()),
            ..ManifestEntry::of(file, &bytes)
        })
    }

    /// `save`, with `refs` (from `put_shared`) listed in the manifest as they are.
    pub fn save_with_refs(
        &self,
        step: u64,
        meta: CheckpointMeta,
        files: Vec<(String, Bytes)>,
        refs: Vec<ManifestEntry>,
    ) -> Result<String, CheckpointError> {
        let name = step_dir(step);
        // Files upload (and hash) concurrently; the manifest waits for all of them.
        let entries: Vec<ManifestEntry> = std::thread::scope(|scope| {
            let jobs: Vec<_> = files
                .iter()
                .map(|(file, bytes)| {
                    let (store, name) = (&self.store, &name);
                    scope.spawn(move || -> Result<ManifestEntry, CheckpointError> {
                        store.put(&format!("{name}/{file}"), bytes.clone())?;
                        Ok(ManifestEntry::of(file, bytes))
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| j.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<_, _>>()
        })?;
        let mut entries = entries;
        entries.extend(refs);
        let manifest = Manifest::new(step, meta, entries);
        // A manifest from an earlier, interrupted attempt at this step is stale: replace it.
        self.store.delete(&format!("{name}/MANIFEST.json"))?;
        self.store.put_new(
            &format!("{name}/MANIFEST.json"),
            Bytes::from(manifest.to_json()),
        )?;
        Ok(name)
    }

    /// Names of checkpoint folders present (complete or not), oldest first.
    pub fn list_names(&self) -> Result<Vec<String>, CheckpointError> {
        let mut names: Vec<String> = self
            .store
            .list("")?
            .into_iter()
            .filter_map(|(p, _)| p.split('/').next().map(str::to_string))
            .filter(|n| n.starts_with("step-"))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Read and verify one checkpoint: manifest present and every file's size and sha256 match.
    pub fn load(&self, name: &str) -> Result<LoadedCheckpoint, CheckpointError> {
        let invalid = |msg: String| CheckpointError::Invalid {
            name: name.to_string(),
            msg,
        };
        let raw = self
            .store
            .get(&format!("{name}/MANIFEST.json"))?
            .ok_or_else(|| invalid("no MANIFEST.json (torn or unfinished save)".into()))?;
        let manifest =
            Manifest::from_json(&raw).map_err(|e| invalid(format!("MANIFEST.json: {e}")))?;
        let mut files = BTreeMap::new();
        for entry in &manifest.files {
            let location = match &entry.object {
                Some(o) => o.clone(),
                None => format!("{name}/{}", entry.path),
            };
            let bytes = self
                .store
                .get(&location)?
                .ok_or_else(|| invalid(format!("{} is missing ({location})", entry.path)))?;
            entry.verify(&bytes).map_err(invalid)?;
            files.insert(entry.path.clone(), bytes);
        }
        Ok(LoadedCheckpoint {
            name: name.to_string(),
            manifest,
            files,
        })
    }

    /// The newest checkpoint that verifies; torn or corrupt ones are skipped with a warning.
    pub fn load_latest(&self) -> Result<Option<LoadedCheckpoint>, CheckpointError> {
        self.first_valid(self.list_names()?.iter().rev())
    }

    /// The first of `names` that verifies; the ones before it are skipped with a warning.
    fn first_valid<'a>(
        &self,
        names: impl Iterator<Item = &'a String>,
    ) -> Result<Option<LoadedCheckpoint>, CheckpointError> {
        for name in names {
            match self.load(name) {
                Ok(c) => return Ok(Some(c)),
                Err(CheckpointError::Invalid { name, msg }) => {
                    tracing::warn!(checkpoint = %name, "skipping checkpoint: {msg}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The newest checkpoint with a manifest, found by reading manifests only (no file is
    /// downloaded or hashed: verification happens where the weights are loaded). Folders
    /// without a readable manifest are skipped with a warning.
    pub fn newest_manifest(&self) -> Result<Option<(String, Manifest)>, CheckpointError> {
        for name in self.list_names()?.iter().rev() {
            let Some(raw) = self.store.get(&format!("{name}/MANIFEST.json"))? else {
                tracing::warn!(checkpoint = %name, "skipping checkpoint: no MANIFEST.json (torn or unfinished save)");
                continue;
            };
            match Manifest::from_json(&raw) {
                Ok(m) => return Ok(Some((name.clone(), m))),
                Err(e) => {
                    tracing::warn!(checkpoint = %name, "skipping checkpoint: MANIFEST.json: {e}")
                }
            }
        }
        Ok(None)
    }

    /// The newest checkpoint older than `name` that verifies (the fallback when `name`
    /// itself fails verification at load time).
    pub fn load_latest_before(
        &self,
        name: &str,
    ) -> Result<Option<LoadedCheckpoint>, CheckpointError> {
        let names = self.list_names()?;
        self.first_valid(names.iter().rev().filter(|n| n.as_str() < name))
    }

    /// A run that already has checkpoints continues only with `--resume`: refuse to start it
    /// again from step 0 on top of them.
    pub fn require_resume_if_any(
        &self,
        resume: bool,
        run_uri: &str,
    ) -> Result<(), CheckpointError> {
        let existing = self.list_names()?;
        if resume || existing.is_empty() {
            return Ok(());
        }
        Err(CheckpointError::AlreadyExists {
            run: run_uri.to_string(),
            names: existing.join(", "),
        })
    }

    /// Manifests of every complete checkpoint (not re-hashing the files).
    pub fn manifests(&self) -> Result<Vec<(String, Manifest)>, CheckpointError> {
        let mut out = Vec::new();
        for name in self.list_names()? {
            if let Some(raw) = self.store.get(&format!("{name}/MANIFEST.json"))?
                && let Ok(m) = Manifest::from_json(&raw)
            {
                out.push((name, m));
            }
        }
        Ok(out)
    }

    /// Delete the checkpoints the retention policy drops (manifest first, so a half-deleted
    /// checkpoint is never mistaken for a complete one), then the shared objects
    /// (`put_shared`) no remaining checkpoint references. Call it after the newest manifest
    /// is committed: a shared object written for a checkpoint not yet committed would go.
    pub fn apply_retention(&self, keep_last: usize) -> Result<Vec<String>, CheckpointError> {
        let all = self.manifests()?;
        let metas: Vec<(String, CheckpointMeta)> = all
            .iter()
            .map(|(n, m)| (n.clone(), m.meta.clone()))
            .collect();
        let drop = retention(&metas, keep_last);
        for name in &drop {
            self.store.delete(&format!("{name}/MANIFEST.json"))?;
            for (path, _) in self.store.list(name)? {
                self.store.delete(&path)?;
            }
        }
        if !drop.is_empty() {
            let referenced: std::collections::HashSet<&str> = all
                .iter()
                .filter(|(n, _)| !drop.contains(n))
                .flat_map(|(_, m)| m.files.iter().filter_map(|f| f.object.as_deref()))
                .collect();
            for (path, _) in self.store.list("")? {
                if !path.starts_with("step-") && !referenced.contains(path.as_str()) {
                    tracing::debug!(object = %path, "retention removed a shared object no checkpoint references");
                    self.store.delete(&path)?;
                }
            }
        }
        Ok(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(val: Option<f64>) -> CheckpointMeta {
        CheckpointMeta {
            val_loss: val,
            ..CheckpointMeta::default()
        }
    }

    #[test]
    fn retention_deletes_shared_objects_once_no_checkpoint_references_them() {
        let dir = tempfile::tempdir().unwrap();
        let run = Store::open(dir.path().to_str().unwrap()).unwrap();
        let ck = CheckpointStore::new(&run);
        let file = |s: &str| vec![("model.safetensors".to_string(), Bytes::from(s.to_string()))];
        let a = ck
            .put_shared(
                "frozen/stage-01/frozen.safetensors",
                "frozen.safetensors",
                Bytes::from("a"),
            )
            .unwrap();
        ck.save_with_refs(10, meta(None), file("ten"), vec![a.clone()])
            .unwrap();
        ck.save_with_refs(20, meta(None), file("twenty"), vec![a])
            .unwrap();
        let b = ck
            .put_shared(
                "frozen/stage-02/frozen.safetensors",
                "frozen.safetensors",
                Bytes::from("b"),
            )
            .unwrap();
        ck.save_with_refs(30, meta(None), file("thirty"), vec![b])
            .unwrap();
        let shared = |name: &str| ck.store.get(name).unwrap().is_some();
        // step 20 still references stage 1's object.
        assert_eq!(ck.apply_retention(2).unwrap(), vec!["step-00000010"]);
        assert!(shared("frozen/stage-01/frozen.safetensors"));
        assert_eq!(ck.apply_retention(1).unwrap(), vec!["step-00000020"]);
        assert!(!shared("frozen/stage-01/frozen.safetensors"));
        assert!(shared("frozen/stage-02/frozen.safetensors"));
        let latest = ck.load_latest().unwrap().unwrap();
        assert_eq!(latest.files["frozen.safetensors"], Bytes::from("b"));
    }

    #[test]
    fn torn_and_corrupt_checkpoints_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let run = Store::open(dir.path().to_str().unwrap()).unwrap();
        let ck = CheckpointStore::new(&run);
        let file = |s: &str| vec![("model.safetensors".to_string(), Bytes::from(s.to_string()))];
        ck.save(10, meta(None), file("ten")).unwrap();
        ck.save(20, meta(None), file("twenty")).unwrap();
        assert_eq!(ck.load_latest().unwrap().unwrap().name, "step-00000020");
        // One byte changed: skipped.
        ck.store
            .put("step-00000020/model.safetensors", Bytes::from("twentY"))
            .unwrap();
        assert_eq!(ck.load_latest().unwrap().unwrap().name, "step-00000010");
        // A newer save whose manifest never landed: skipped.
        ck.store
            .put("step-00000030/model.safetensors", Bytes::from("x"))
            .unwrap();
        let latest = ck.load_latest().unwrap().unwrap();
        assert_eq!(latest.name, "step-00000010");
        assert_eq!(latest.files["model.safetensors"].as_ref(), b"ten");
    }

    #[test]
    fn retention_deletes_old_ones_but_keeps_the_best() {
        let dir = tempfile::tempdir().unwrap();
        let run = Store::open(dir.path().to_str().unwrap()).unwrap();
        let ck = CheckpointStore::new(&run);
        for (step, val) in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)] {
            ck.save(step, meta(Some(val)), vec![("a".into(), Bytes::from("x"))])
                .unwrap();
        }
        let dropped = ck.apply_retention(2).unwrap();
        assert_eq!(
            dropped,
            vec!["step-00000001".to_string(), "step-00000003".to_string()]
        );
        assert_eq!(
            ck.list_names().unwrap(),
            vec!["step-00000002", "step-00000004", "step-00000005"]
        );
    }
}

/// Storage faults: a wrapper store that fails chosen calls.
#[cfg(test)]
mod fault_tests {
    use std::ops::Range;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use futures::stream::BoxStream;
    use object_store::local::LocalFileSystem;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
        PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
    };

    use super::*;

    /// Fails every put whose path contains one of `fail_puts` (while it is listed).
    #[derive(Debug)]
    struct Faulty {
        inner: LocalFileSystem,
        fail_puts: Mutex<Vec<String>>,
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty({})", self.inner)
        }
    }

    impl Faulty {
        fn check(&self, location: &Path) -> Result<()> {
            let failing = self.fail_puts.lock().unwrap();
            if failing
                .iter()
                .any(|f| location.as_ref().contains(f.as_str()))
            {
                return Err(object_store::Error::Generic {
                    store: "faulty",
                    source: format!("injected failure writing {location}").into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Result<PutResult> {
            self.check(location)?;
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> Result<Box<dyn MultipartUpload>> {
            self.check(location)?;
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
            self.inner.get_opts(location, options).await
        }
        async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
            self.inner.get_ranges(location, ranges).await
        }
        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(locations)
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        fn list_with_offset(
            &self,
            prefix: Option<&Path>,
            offset: &Path,
        ) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list_with_offset(prefix, offset)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
        async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
            self.inner.rename_opts(from, to, options).await
        }
    }

    #[test]
    fn a_failed_save_never_replaces_the_last_good_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(Faulty {
            inner: LocalFileSystem::new_with_prefix(dir.path()).unwrap(),
            fail_puts: Mutex::new(Vec::new()),
        });
        let store = Store::from_object_store(faulty.clone(), "faulty://run");
        let ckpts = CheckpointStore::new(&store);
        let files = |tag: &str| {
            vec![(
                "model.safetensors".to_string(),
                Bytes::from(tag.to_string()),
            )]
        };
        ckpts
            .save(1, CheckpointMeta::default(), files("one"))
            .unwrap();

        // A tensor file fails: the save fails, no manifest, step 1 stays the newest valid one.
        faulty
            .fail_puts
            .lock()
            .unwrap()
            .push("step-00000002/model".into());
        let e = ckpts
            .save(2, CheckpointMeta::default(), files("two"))
            .unwrap_err();
        assert!(e.to_string().contains("injected failure"), "{e}");
        assert_eq!(ckpts.load_latest().unwrap().unwrap().name, "step-00000001");

        // The manifest itself fails: still not a checkpoint.
        faulty.fail_puts.lock().unwrap().clear();
        faulty
            .fail_puts
            .lock()
            .unwrap()
            .push("step-00000003/MANIFEST".into());
        assert!(
            ckpts
                .save(3, CheckpointMeta::default(), files("three"))
                .is_err()
        );
        let latest = ckpts.load_latest().unwrap().unwrap();
        assert_eq!(latest.name, "step-00000001");
        assert_eq!(&latest.files["model.safetensors"][..], b"one");

        // Once the store recovers, the next save commits.
        faulty.fail_puts.lock().unwrap().clear();
        ckpts
            .save(4, CheckpointMeta::default(), files("four"))
            .unwrap();
        assert_eq!(ckpts.load_latest().unwrap().unwrap().name, "step-00000004");
    }
}
