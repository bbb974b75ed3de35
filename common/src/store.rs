//! Object storage behind one URI: a plain path or `file://…` (local filesystem, the default),
//! or `s3://bucket/prefix` (any S3-compatible store; endpoint, region and credentials from the
//! standard `AWS_*` environment variables, e.g. `AWS_ENDPOINT_URL=http://127.0.0.1:9000`).
//! A small synchronous facade over `object_store` for the trainer's blocking code. Large
//! objects are uploaded in parts; transient errors are retried with backoff by the client.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage URI {uri:?}: {msg}")]
    Uri { uri: String, msg: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0} already exists")]
    AlreadyExists(String),
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("stackwise-io")
            .enable_all()
            .build()
            .expect("start the storage I/O runtime")
    })
}

/// Run `fut` to completion on the storage runtime. Callable from plain threads and from
/// inside another tokio runtime (where a nested `block_on` would panic): there the future
/// runs from a short-lived helper thread.
fn block_on<F: std::future::Future + Send>(fut: F) -> F::Output
where
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(|| runtime().block_on(fut))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    } else {
        runtime().block_on(fut)
    }
}

/// Objects larger than this are uploaded in parts.
const MULTIPART_THRESHOLD: usize = 32 << 20;
const PART_BYTES: usize = 16 << 20;

/// S3 settings from a config file's `storage:` section; they take precedence over the
/// `AWS_*` environment. The secret is never printed (`Debug` redacts it).
#[derive(Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:9000` (plain http is allowed for such endpoints).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Read the secret from this environment variable instead of the file.
    pub secret_access_key_env: Option<String>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("secret_access_key_env", &self.secret_access_key_env)
            .finish()
    }
}

/// The environment variable a job's workers read the S3 secret from when the config held it
/// literally: the coordinator never sends the secret itself (`S3Settings::for_workers`).
pub const SECRET_ENV: &str = "STACKWISE_S3_SECRET_ACCESS_KEY";

impl S3Settings {
    /// The settings to send to workers, and the secret to hand them out of band: a literal
    /// `secret_access_key` becomes `secret_access_key_env: STACKWISE_S3_SECRET_ACCESS_KEY`.
    pub fn for_workers(&self) -> (Self, Option<String>) {
        match &self.secret_access_key {
            Some(secret) => (
                Self {
                    secret_access_key: None,
                    secret_access_key_env: Some(SECRET_ENV.to_string()),
                    ..self.clone()
                },
                Some(secret.clone()),
            ),
            None => (self.clone(), None),
        }
    }

    /// Read the secret from `secret_access_key_env` into `secret_access_key` (in memory
    /// only) when that variable is set.
    pub fn resolve_secret_env(&mut self) {
        if self.secret_access_key.is_none()
            && let Some(v) = self
                .secret_access_key_env
                .as_deref()
                .and_then(|v| std::env::var(v).ok())
        {
            self.secret_access_key = Some(v);
        }
    }

    /// A copy safe to write where others can read it (the secret replaced).
    pub fn redacted(&self) -> Self {
        Self {
            secret_access_key: self
                .secret_access_key
                .as_ref()
                .map(|_| "<redacted>".to_string()),
            ..self.clone()
        }
    }
}

static S3_SETTINGS: std::sync::RwLock<Option<S3Settings>> = std::sync::RwLock::new(None);

/// Use `settings` for every `s3://` store this process opens from now on. Settings that name
/// a secret variable this process does not have keep the secret it already holds for the
/// same endpoint and key (a worker running inside the coordinator's process).
pub fn configure_s3(settings: Option<S3Settings>) {
    let mut current = S3_SETTINGS.write().unwrap_or_else(|p| p.into_inner());
    let settings = match (settings, current.as_ref()) {
        (Some(mut new), Some(old))
            if new.secret_access_key.is_none()
                && old.secret_access_key.is_some()
                && (new.endpoint.as_ref(), new.access_key_id.as_ref())
                    == (old.endpoint.as_ref(), old.access_key_id.as_ref())
                && new
                    .secret_access_key_env
                    .as_deref()
                    .is_some_and(|v| std::env::var_os(v).is_none()) =>
        {
            new.secret_access_key = old.secret_access_key.clone();
            Some(new)
        }
        (s, _) => s,
    };
    *current = settings;
}

/// A store plus a prefix inside it; all paths given to its methods are relative to the prefix.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    uri: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.uri)
    }
}

impl Store {
    /// Open `uri`: `/abs/dir`, `rel/dir`, `file:///abs/dir`. Local folders are created.
    pub fn open(uri: &str) -> Result<Self, StoreError> {
        let bad = |msg: String| StoreError::Uri {
            uri: uri.to_string(),
            msg,
        };
        let local = if let Some(rest) = uri.strip_prefix("file://") {
            rest.to_string()
        } else if let Some(rest) = uri.strip_prefix("s3://") {
            return Self::open_s3(uri, rest);
        } else if let Some((scheme, _)) = uri.split_once("://") {
            return Err(bad(format!(
                "scheme {scheme}:// is not supported; use a local path, file:// or s3://bucket/prefix"
            )));
        } else {
            uri.to_string()
        };
        if local.is_empty() {
            return Err(bad("empty path".into()));
        }
        std::fs::create_dir_all(&local).map_err(|e| bad(format!("create folder: {e}")))?;
        let fs = LocalFileSystem::new_with_prefix(&local).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(fs),
            prefix: ObjPath::default(),
            uri: uri.to_string(),
        })
    }

    /// `s3://bucket/prefix`. Path-style requests (the default) and plain http for local
    /// endpoints. Error messages name the URI and the missing setting, never a credential.
    fn open_s3(uri: &str, rest: &str) -> Result<Self, StoreError> {
        use object_store::aws::AmazonS3Builder;
        let bad = |msg: String| StoreError::Uri {
            uri: uri.to_string(),
            msg,
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket: use s3://bucket/prefix".into()));
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let cfg = S3_SETTINGS
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default();
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = cfg
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
            .unwrap_or_default();
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        if endpoint.starts_with("http://") {
            b = b.with_allow_http(true);
        }
        match cfg.region.clone() {
            Some(r) => b = b.with_region(r),
            None if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() => {
                b = b.with_region("us-east-1")
            }
            None => {}
        }
        let secret = match (&cfg.secret_access_key, &cfg.secret_access_key_env) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(var)) => Some(env(var).ok_or_else(|| {
                bad(format!(
                    "storage.secret_access_key_env names {var}, which is not set"
                ))
            })?),
            (None, None) => None,
        };
        if let Some(k) = &cfg.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = secret {
            b = b.with_secret_access_key(s);
        }
        if cfg.access_key_id.is_none() && env("AWS_ACCESS_KEY_ID").is_none() && !endpoint.is_empty()
        {
            return Err(bad(
                "no credentials: set storage.access_key_id and storage.secret_access_key in the config, \
                 or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, for the endpoint"
                    .into(),
            ));
        }
        // Patient enough to ride out a store restart: 0.25 s doubling to 10 s, about a
        // minute of retries in all, before a save fails.
        b = b.with_retry(object_store::RetryConfig {
            max_retries: 12,
            retry_timeout: std::time::Duration::from_secs(180),
            backoff: object_store::BackoffConfig {
                init_backoff: std::time::Duration::from_millis(250),
                max_backoff: std::time::Duration::from_secs(10),
                base: 2.0,
            },
        });
        let s3 = b
            .build()
            .map_err(|e| bad(format!("S3 configuration: {e}")))?;
        Ok(Self {
            inner: Arc::new(s3),
            prefix: prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .fold(ObjPath::default(), |p, part| p.join(part)),
            uri: format!("s3://{}", rest.trim_end_matches('/')),
        })
    }

    /// Wrap any `object_store` implementation (tests use it to inject faults).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, uri: &str) -> Self {
        Self {
            inner,
            prefix: ObjPath::default(),
            uri: uri.to_string(),
        }
    }

    /// True for object stores (no local path).
    pub fn is_remote(&self) -> bool {
        self.local_path().is_none()
    }

    /// The same store, rooted at `self/sub`.
    pub fn child(&self, sub: &str) -> Self {
        Self {
            inner: self.inner.clone(),
            prefix: self.full(sub),
            uri: format!("{}/{}", self.uri.trim_end_matches('/'), sub),
        }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// A local filesystem path for this store's root, when it is on local disk.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        let base = self.uri.strip_prefix("file://").unwrap_or(&self.uri);
        (!base.contains("://")).then(|| std::path::PathBuf::from(base))
    }

    fn full(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    fn io(op: &'static str, path: &ObjPath, source: object_store::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.to_string(),
            source,
        }
    }

    pub fn put(&self, rel: &str, bytes: Bytes) -> Result<(), StoreError> {
        let p = self.full(rel);
        if bytes.len() > MULTIPART_THRESHOLD {
            return block_on(self.put_multipart(&p, bytes)).map_err(|e| Self::io("put", &p, e));
        }
        block_on(self.inner.put(&p, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| Self::io("put", &p, e))
    }

    /// Upload in parts of `PART_BYTES`, several in flight at once.
    async fn put_multipart(&self, p: &ObjPath, bytes: Bytes) -> object_store::Result<()> {
        let upload = self.inner.put_multipart(p).await?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        for chunk in bytes.chunks(PART_BYTES) {
            w.wait_for_capacity(4).await?;
            w.write(chunk);
        }
        w.finish().await.map(|_| ())
    }

    /// Create-only put: fails with `AlreadyExists` when the object is there.
    pub fn put_new(&self, rel: &str, bytes: Bytes) -> Result<(), StoreError> {
        let p = self.full(rel);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match block_on(self.inner.put_opts(&p, PutPayload::from(bytes), opts)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(StoreError::AlreadyExists(p.to_string()))
            }
            Err(e) => Err(Self::io("put", &p, e)),
        }
    }

    /// The object's bytes, or `None` when it does not exist.
    pub fn get(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        let p = self.full(rel);
        match block_on(self.inner.get(&p)) {
            Ok(r) => block_on(r.bytes())
                .map(Some)
                .map_err(|e| Self::io("get", &p, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::io("get", &p, e)),
        }
    }

    /// The object's size in bytes, or `None` when it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>, StoreError> {
        let p = self.full(rel);
        match block_on(self.inner.head(&p)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::io("head", &p, e)),
        }
    }

    /// Byte ranges of objects, fetched concurrently (a few in flight), in request order.
    pub fn get_ranges(
        &self,
        requests: &[(String, std::ops::Range<u64>)],
    ) -> Result<Vec<Bytes>, StoreError> {
        let fetches = requests.iter().map(|(rel, range)| {
            let p = self.full(rel);
            async move {
                self.inner
                    .get_range(&p, range.clone())
                    .await
                    .map_err(|e| Self::io("get", &p, e))
            }
        });
        block_on(futures::stream::iter(fetches).buffered(8).try_collect())
    }

    pub fn delete(&self, rel: &str) -> Result<(), StoreError> {
        let p = self.full(rel);
        match block_on(self.inner.delete(&p)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::io("delete", &p, e)),
        }
    }

    /// Every object under `rel`, as (path relative to this store's root, size in bytes).
    pub fn list(&self, rel: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let p = self.full(rel);
        let metas: Vec<_> = block_on(self.inner.list(Some(&p)).try_collect::<Vec<_>>())
            .map_err(|e| Self::io("list", &p, e))?;
        let strip = self.prefix.to_string();
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| {
                let full = m.location.to_string();
                let rel = full
                    .strip_prefix(&strip)
                    .unwrap_or(&full)
                    .trim_start_matches('/')
                    .to_string();
                (rel, m.size)
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete_and_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().to_str().unwrap())
            .unwrap()
            .child("runs/a");
        s.put("x/one.bin", Bytes::from_static(b"12345")).unwrap();
        assert_eq!(s.get("x/one.bin").unwrap().unwrap().as_ref(), b"12345");
        assert!(s.get("x/missing").unwrap().is_none());
        s.put_new("x/m.json", Bytes::from_static(b"{}")).unwrap();
        assert!(matches!(
            s.put_new("x/m.json", Bytes::from_static(b"{}")),
            Err(StoreError::AlreadyExists(_))
        ));
        assert_eq!(
            s.list("x").unwrap(),
            vec![("x/m.json".to_string(), 2), ("x/one.bin".to_string(), 5)]
        );
        s.delete("x/one.bin").unwrap();
        assert_eq!(s.list("").unwrap().len(), 1);
        assert!(Store::open("gs://bucket/x").is_err());
    }
}
