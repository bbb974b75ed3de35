//! The activation cache of a layer-wise stage (DESIGN §3): the input of the first trainable
//! layer, computed by the frozen prefix, kept per sample and mask seed so a later epoch
//! reads it instead of running the prefix again. Each worker caches the rows it trains on
//! (sharded by worker); an entry is the raw little-endian f32 `(T, D)` block.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};
use stackwise_common::config::ActivationCacheKind;
use stackwise_common::store::Store;

enum Backend {
    Memory(HashMap<String, Vec<f32>>),
    Disk(PathBuf),
    Store(Store),
}

pub struct ActivationCache {
    backend: Backend,
    /// The layer whose input is cached (the number of frozen prefix layers).
    pub layer: usize,
    pub hits: u64,
    pub misses: u64,
}

impl ActivationCache {
    /// A cache for stage `stage` (input of layer `layer`) on rank `rank`, under the
    /// `fingerprint` of what produces its entries (a run reads only its own).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: ActivationCacheKind,
        dir: Option<&str>,
        run: &Store,
        run_id: &str,
        fingerprint: &str,
        stage: usize,
        layer: usize,
        rank: usize,
    ) -> Result<Option<Self>> {
        let fp = &fingerprint[..fingerprint.len().min(16)];
        let shard = format!("{fp}/stage-{stage:02}/rank-{rank}");
        let backend = match kind {
            ActivationCacheKind::None => return Ok(None),
            ActivationCacheKind::Memory => Backend::Memory(HashMap::new()),
            ActivationCacheKind::Disk => {
                let root = match dir {
                    Some(d) => PathBuf::from(d),
                    None => std::env::temp_dir().join("stackwise-activation-cache"),
                };
                let p = root.join(run_id).join(&shard);
                std::fs::create_dir_all(&p)
                    .with_context(|| format!("create the activation cache {}", p.display()))?;
                Backend::Disk(p)
            }
            ActivationCacheKind::Store => {
                Backend::Store(run.child(&format!("activation-cache/{shard}")))
            }
        };
        Ok(Some(Self {
            backend,
            layer,
            hits: 0,
            misses: 0,
        }))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let bytes: Option<Vec<u8>> = match &self.backend {
            Backend::Memory(m) => return Ok(m.get(key).cloned()),
            Backend::Disk(dir) => match std::fs::read(dir.join(key)) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).context("read the activation cache"),
            },
            Backend::Store(s) => s.get(key)?.map(|b| b.to_vec()),
        };
        Ok(bytes.map(|b| {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }))
    }

    fn put(&mut self, key: String, v: Vec<f32>) -> Result<()> {
        let bytes = || -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        match &mut self.backend {
            Backend::Memory(m) => {
                m.insert(key, v);
            }
            Backend::Disk(dir) => {
                // Write then rename, so a crash never leaves a short entry behind.
                let tmp = dir.join(format!(".{key}.tmp"));
                std::fs::write(&tmp, bytes()).context("write the activation cache")?;
                std::fs::rename(&tmp, dir.join(&key)).context("write the activation cache")?;
            }
            Backend::Store(s) => s.put(&key, Bytes::from(bytes()))?,
        }
        Ok(())
    }

    /// The input of `self.layer` for each row: cached entries are read, the others computed
    /// by `compute` (rows of `ids` → `(n, T, D)`) and stored. `keys[i]` names row `i`'s
    /// sample and mask seed.
    pub fn inputs(
        &mut self,
        ids: &Tensor,
        keys: &[String],
        compute: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        device: &Device,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut rows: Vec<Option<Vec<f32>>> = Vec::with_capacity(b);
        for k in keys {
            rows.push(self.get(k)?);
        }
        let missing: Vec<u32> = (0..b as u32)
            .filter(|&i| rows[i as usize].is_none())
            .collect();
        self.hits += (b - missing.len()) as u64;
        self.misses += missing.len() as u64;
        if !missing.is_empty() {
            let idx = Tensor::new(missing.as_slice(), ids.device())?;
            let x = compute(&ids.index_select(&idx, 0)?)?; // (m, T, D)
            for (j, &i) in missing.iter().enumerate() {
                let v: Vec<f32> = x.get(j)?.flatten_all()?.to_vec1()?;
                self.put(keys[i as usize].clone(), v.clone())?;
                rows[i as usize] = Some(v);
            }
        }
        let d = rows[0].as_ref().map_or(0, |r| r.len() / t.max(1));
        let flat: Vec<f32> = rows.into_iter().flatten().flatten().collect();
        Ok(Tensor::from_vec(flat, (b, t, d), device)?)
    }
}
