//! The [`Store`] trait over `object_store`, made blocking with a private
//! runtime so pipeline threads can call it directly.
//!
//! object_store's local backend writes a temporary file and renames it into
//! place but does not fsync; for the durability rule (a manifest only after
//! every object it names is on stable storage) this wrapper fsyncs the file
//! and its directory before `put` returns.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as OsPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig};
use pg_hardstorage_engine::store::{DynStore, ObjectInfo, Store};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct ObjectStoreBackend {
    inner: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    /// Root directory of a local repository (fsync target).
    local_root: Option<PathBuf>,
    prefix: String,
    describe: String,
}

/// Settings that override the environment (tests run several S3 servers).
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    pub s3_endpoint: Option<String>,
}

/// Opens a repository location: `/path`, `file:///path`, `s3://bucket/prefix`
/// (endpoint, region and keys from `AWS_*`), or `memory://`.
pub fn open_store(url: &str, create_dir: bool) -> Result<DynStore, Problem> {
    open_store_with(url, create_dir, &StoreOptions::default())
}

pub fn open_store_with(
    url: &str,
    create_dir: bool,
    opts: &StoreOptions,
) -> Result<DynStore, Problem> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all()
        .build()
        .map_err(|e| Problem::internal(format!("tokio runtime: {e}")))?;
    let bad = |m: String| {
        Problem::new(Code::UsageInvalidArgument, m).suggest(
            "Use /path, file:///path, s3://bucket/prefix or memory://",
            None,
        )
    };
    if url == "memory://" || url.starts_with("memory://") {
        return Ok(Arc::new(ObjectStoreBackend {
            inner: Arc::new(InMemory::new()),
            rt,
            local_root: None,
            prefix: String::new(),
            describe: "memory://".into(),
        }));
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad(format!("repository URL {url:?} names no bucket")));
        }
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
                ..Default::default()
            });
        if let Some(ep) = opts
            .s3_endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        {
            b = b
                .with_endpoint(&ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            b = b.with_region("us-east-1");
        }
        let s3 = b
            .build()
            .map_err(|e| bad(format!("S3 configuration for {url:?}: {e}")))?;
        return Ok(Arc::new(ObjectStoreBackend {
            inner: Arc::new(s3),
            rt,
            local_root: None,
            prefix: prefix.trim_matches('/').to_string(),
            describe: format!("s3://{bucket}/{}", prefix.trim_matches('/')),
        }));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() || !path.starts_with('/') && url.contains("://") {
        return Err(bad(format!("unsupported repository URL {url:?}")));
    }
    let root =
        std::path::absolute(path).map_err(|e| bad(format!("repository path {path:?}: {e}")))?;
    if create_dir {
        std::fs::create_dir_all(&root).map_err(|e| {
            Problem::io(
                Code::IoWriteFailed,
                format!("create {}", root.display()),
                &e,
            )
        })?;
        make_private_root(&root)?;
    }
    if !root.is_dir() {
        return Err(Problem::new(
            Code::RepoNotFound,
            format!("no repository directory at {}", root.display()),
        )
        .suggest("Create one first", Some("pg_hardstorage repo init".into())));
    }
    let local = LocalFileSystem::new_with_prefix(&root)
        .map_err(|e| bad(format!("repository path {}: {e}", root.display())))?;
    Ok(Arc::new(ObjectStoreBackend {
        inner: Arc::new(local),
        rt,
        local_root: Some(root.clone()),
        prefix: String::new(),
        describe: root.display().to_string(),
    }))
}

/// The modes the local store gives what it creates: nothing for other
/// users (with `--encryption none` a backed-up 0600 file would otherwise be
/// readable by anyone), read access for the repository directory's group
/// (so `restore_command`, run as PostgreSQL's user, can read it when the
/// operator gives the repository to that user's group), and the setgid bit
/// on the root, which every directory beneath inherits with the group.
const DIR_MODE: u32 = 0o750;
const FILE_MODE: u32 = 0o640;
const SETGID: u32 = 0o2000;

/// A repository root being initialised loses every permission of other
/// users and gains the setgid bit (group bits are kept as they are).
fn make_private_root(root: &std::path::Path) -> Result<(), Problem> {
    use std::os::unix::fs::PermissionsExt;
    let werr = |e: std::io::Error| {
        Problem::io(Code::IoWriteFailed, format!("chmod {}", root.display()), &e)
    };
    let mode = std::fs::metadata(root).map_err(werr)?.permissions().mode();
    let private = (mode & 0o770) | 0o700 | SETGID;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(private)).map_err(werr)
}

/// What a store error means, by its `object_store` variant and, for a
/// `Generic` one, the transport failure in its source chain; never by its
/// text. Refused credentials are `storage.auth` (exit 3, not retried): a
/// retry cannot fix them.
fn classify(e: &object_store::Error) -> Code {
    use object_store::client::HttpErrorKind as K;
    use object_store::Error as E;
    match e {
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => Code::StorageAuth,
        E::Generic { .. } => match transport_failure(e) {
            Some(K::Connect | K::Timeout) => Code::StorageUnreachable,
            _ => Code::StorageIo,
        },
        _ => Code::StorageIo,
    }
}

/// The kind of the first HTTP transport error in `e`'s source chain.
fn transport_failure(e: &object_store::Error) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(h) = cur.downcast_ref::<object_store::client::HttpError>() {
            return Some(h.kind());
        }
        cur = cur.source()?;
    }
}

fn storage_problem(key: &str, e: object_store::Error, root: Option<&std::path::Path>) -> Problem {
    let code = classify(&e);
    let mut text = e.to_string();
    // A local store's errors name host paths; a tenant sees only the key.
    if let Some(root) = root {
        text = text.replace(&*root.to_string_lossy(), "<repository>");
    }
    let p = Problem::new(code, format!("{key}: {text}"))
        .with("object", key)
        .caused_by(e);
    match code {
        Code::StorageAuth => p.suggest(
            "The store refused these credentials: check AWS_ACCESS_KEY_ID / \
             AWS_SECRET_ACCESS_KEY (or the instance role) and the bucket policy",
            None,
        ),
        _ => p,
    }
}

impl ObjectStoreBackend {
    fn problem(&self, key: &str, e: object_store::Error) -> Problem {
        storage_problem(key, e, self.local_root.as_deref())
    }

    fn path(&self, key: &str) -> OsPath {
        if self.prefix.is_empty() {
            OsPath::from(key)
        } else {
            OsPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Creates the directories a local put needs, private ([`DIR_MODE`]),
    /// before the store would create them with the umask's modes.
    fn prepare_local(&self, key: &str) -> Result<(), Problem> {
        use std::os::unix::fs::DirBuilderExt;
        let Some(dir) = self
            .local_root
            .as_ref()
            .and_then(|r| r.join(key).parent().map(|p| p.to_path_buf()))
        else {
            return Ok(());
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(|e| {
                Problem::io(
                    Code::IoWriteFailed,
                    format!("create the directory of {key}"),
                    &e,
                )
            })
    }

    fn sync_local(&self, key: &str) -> Result<(), Problem> {
        use std::os::unix::fs::PermissionsExt;
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(key);
        let sync =
            |p: &std::path::Path| -> std::io::Result<()> { std::fs::File::open(p)?.sync_all() };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(FILE_MODE))
            .and_then(|()| sync(&file))
            .map_err(|e| Problem::io(Code::IoWriteFailed, format!("fsync {key}"), &e))?;
        if let Some(dir) = file.parent() {
            sync(dir).map_err(|e| {
                Problem::io(
                    Code::IoWriteFailed,
                    format!("fsync the directory of {key}"),
                    &e,
                )
            })?;
        }
        Ok(())
    }

    fn put_mode(&self, key: &str, data: PutPayload, mode: PutMode) -> Result<bool, Problem> {
        self.prepare_local(key)?;
        let path = self.path(key);
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        let r = self.rt.block_on(self.inner.put_opts(&path, data, opts));
        match r {
            Ok(_) => {
                self.sync_local(key)?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.problem(key, e)),
        }
    }
}

impl Store for ObjectStoreBackend {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<(), Problem> {
        self.put_mode(key, data.into(), PutMode::Overwrite)
            .map(|_| ())
    }

    fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, Problem> {
        self.put_mode(key, data.into(), PutMode::Create)
    }

    fn put_parts_if_absent(&self, key: &str, parts: Vec<Bytes>) -> Result<bool, Problem> {
        self.put_mode(key, parts.into_iter().collect(), PutMode::Create)
    }

    fn get(&self, key: &str) -> Result<Option<Bytes>, Problem> {
        let path = self.path(key);
        let r = self.rt.block_on(async {
            let g = self.inner.get(&path).await?;
            g.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.problem(key, e)),
        }
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Problem> {
        let path = self.path(key);
        match self.rt.block_on(self.inner.get_range(&path, range.clone())) {
            Ok(b) if b.len() as u64 == range.end - range.start => Ok(b),
            Ok(_) => Err(Problem::new(
                Code::VerifyTruncated,
                format!("{key}: short read of {range:?}"),
            )
            .with("object", key)),
            Err(object_store::Error::NotFound { .. }) => Err(Problem::new(
                Code::VerifyMissingObject,
                format!("{key} is missing from the repository"),
            )
            .with("object", key)),
            Err(e) => {
                let text = e.to_string();
                if text.contains("out of bounds")
                    || text.contains("Range")
                    || text.contains("range")
                {
                    Err(
                        Problem::new(Code::VerifyTruncated, format!("{key}: {text}"))
                            .with("object", key),
                    )
                } else {
                    Err(self.problem(key, e))
                }
            }
        }
    }

    fn head(&self, key: &str) -> Result<Option<u64>, Problem> {
        match self.rt.block_on(self.inner.head(&self.path(key))) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.problem(key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Problem> {
        let p = self.path(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let r: Result<Vec<_>, _> = self
            .rt
            .block_on(self.inner.list(Some(&p)).try_collect::<Vec<_>>());
        match r {
            Ok(metas) => {
                let mut out: Vec<ObjectInfo> = metas
                    .into_iter()
                    .map(|m| ObjectInfo {
                        key: m
                            .location
                            .as_ref()
                            .get(strip..)
                            .unwrap_or_default()
                            .to_string(),
                        size: m.size,
                        modified_unix: m.last_modified.timestamp().max(0) as u64,
                    })
                    .collect();
                out.sort_by(|a, b| a.key.cmp(&b.key));
                Ok(out)
            }
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.problem(prefix, e)),
        }
    }

    fn delete(&self, key: &str) -> Result<(), Problem> {
        match self.rt.block_on(self.inner.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.problem(key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Store) {
        assert_eq!(store.get("a/b").expect("get"), None);
        assert!(store
            .put_if_absent("a/b", Bytes::from_static(b"one"))
            .expect("put"));
        assert!(!store
            .put_if_absent("a/b", Bytes::from_static(b"two"))
            .expect("put"));
        assert_eq!(store.get("a/b").expect("get").as_deref(), Some(&b"one"[..]));
        assert_eq!(store.get_range("a/b", 1..3).expect("range").as_ref(), b"ne");
        store.put("a/c", Bytes::from_static(b"x")).expect("put");
        let keys: Vec<_> = store
            .list("a/")
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, vec!["a/b", "a/c"]);
        assert_eq!(store.head("a/c").expect("head"), Some(1));
        store.delete("a/c").expect("delete");
        store.delete("a/c").expect("delete twice");
        assert_eq!(store.head("a/c").expect("head"), None);
        assert!(store.list("nothing/").expect("list").is_empty());
    }

    #[test]
    fn local_and_memory_backends_behave_alike() {
        let dir = tempfile::tempdir().expect("tmp");
        exercise(&*open_store(dir.path().to_str().expect("utf8"), false).expect("local"));
        exercise(&*open_store("memory://", false).expect("memory"));
    }

    /// A local store's errors name the object, never the host path of the
    /// repository (tenant tokens see these messages).
    #[test]
    fn local_errors_do_not_show_the_repository_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().to_str().expect("utf8");
        let store = open_store(root, false).expect("local");
        // A directory where the object should go, and a file where its
        // directory should be.
        std::fs::create_dir_all(dir.path().join("snapshots/d/x")).expect("mkdir");
        std::fs::write(dir.path().join("wal"), b"").expect("file");
        let onto_dir = store.put("snapshots/d/x", Bytes::from_static(b"x"));
        let under_file = store.put("wal/d/y", Bytes::from_static(b"x"));
        // A symlink loop where an object is: opening it fails (ELOOP).
        std::os::unix::fs::symlink("loop", dir.path().join("snapshots/d/loop")).expect("ln");
        let looped = store.get("snapshots/d/loop").map(|_| ());
        for (key, r) in [
            ("snapshots/d/x", onto_dir),
            ("wal/d/y", under_file),
            ("snapshots/d/loop", looped),
        ] {
            let e = r.expect_err("the put must fail");
            assert!(!e.message.contains(root), "{}", e.message);
            assert!(e.message.contains(key), "{}", e.message);
        }
    }

    #[test]
    fn refused_credentials_are_classified_by_variant() {
        let denied = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: "403".into(),
        };
        let anon = object_store::Error::Unauthenticated {
            path: "p".into(),
            source: "401".into(),
        };
        // Text that the old text match took for an outage.
        let generic = object_store::Error::Generic {
            store: "S3",
            source: "could not connect: timed out".into(),
        };
        assert_eq!(classify(&denied), "storage.auth");
        assert_eq!(classify(&anon), "storage.auth");
        assert_eq!(classify(&generic), "storage.io");
    }
}
