//! Datasets in object storage: `s3://`, `gs://`, `az://` and `http(s)://` dataset URLs through the
//! `object_store` crate (credentials and endpoints from the usual environment variables: `AWS_*`, `GOOGLE_*`,
//! `AZURE_*`), read through a local shard cache with a size limit.
//!
//! The reader fetches `index.json` at open, then each shard the first time it is needed: streamed into a
//! temporary file of the cache directory while its sha256 is computed, checked against the index (size and
//! hash), then renamed into place. Shards are evicted least recently used first when a new one needs room; a
//! shard being read is never evicted, and the files in the cache never add up to more than the limit. The
//! stream asks for the next shards ahead of the reader ([`crate::Dataset::prefetch`]), which are downloaded on
//! background threads while there is room. Shards found in the cache from an earlier run are checked again
//! (size and sha256) before their first use.
//!
//! [`upload_dataset`] is the other direction: `pack --out s3://...` packs into a local staging folder, then
//! removes the URL's old `index.json`, uploads the shards and writes `index.json` last, so that a reader never
//! sees an index whose shards are not all in place.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::error::{PackError, Result};
use crate::index::{DatasetIndex, ShardEntry, INDEX_FILE};
use crate::shard::{Expect, ShardFile};
use crate::util;

/// URL schemes read through object storage.
pub const REMOTE_SCHEMES: [&str; 5] = ["s3://", "gs://", "az://", "https://", "http://"];

/// The URL in `path` when it names a remote dataset (`s3://`, `gs://`, `az://`, `http(s)://`).
pub fn remote_url(path: &Path) -> Option<&str> {
    path.to_str()
        .filter(|s| REMOTE_SCHEMES.iter().any(|p| s.starts_with(p)))
}

/// Where and how much remote shards are cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Cache directory (each dataset URL gets a subfolder).
    pub cache_dir: PathBuf,
    /// Most bytes of shards kept at once (at least the largest shard).
    pub cache_limit: u64,
    /// Shards downloaded ahead of the reader.
    pub prefetch: usize,
}

impl Default for RemoteOptions {
    /// `$IMGLISH_CACHE_DIR`, else `~/.cache/imglish/shards`; 20 GiB; 2 shards ahead.
    fn default() -> Self {
        let cache_dir = std::env::var_os("IMGLISH_CACHE_DIR").map_or_else(
            || {
                std::env::var_os("HOME")
                    .map_or_else(std::env::temp_dir, PathBuf::from)
                    .join(".cache/imglish/shards")
            },
            PathBuf::from,
        );
        RemoteOptions {
            cache_dir,
            cache_limit: 20 << 30,
            prefetch: 2,
        }
    }
}

static OPTIONS: OnceLock<RemoteOptions> = OnceLock::new();

/// Sets the options every remote dataset opened later in this process uses (the binary's `--cache-dir`,
/// `--cache-limit`, `--prefetch-shards`); the first call wins.
pub fn set_remote_options(options: RemoteOptions) {
    let _ = OPTIONS.set(options);
}

impl RemoteOptions {
    /// The options set with [`set_remote_options`], else the defaults.
    pub fn current() -> RemoteOptions {
        OPTIONS.get().cloned().unwrap_or_default()
    }

    /// The local folder `pack --out URL` packs into before uploading (kept, so a rerun of the same pack reuses
    /// it): `upload-HASH` under the cache directory, next to the dataset caches (`HASH`).
    pub fn staging_dir(&self, url: &str) -> PathBuf {
        self.cache_dir.join(format!("upload-{}", url_key(url)))
    }
}

/// The first 16 hex digits of the sha256 of `url`: the name of its folders under the cache directory.
fn url_key(url: &str) -> String {
    util::sha256_hex(url.as_bytes())[..16].to_string()
}

fn remote_err(url: &str, reason: impl std::fmt::Display) -> PackError {
    PackError::Remote {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

/// An object store and the dataset's prefix in it, with the runtime that drives it.
struct Store {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    runtime: tokio::runtime::Runtime,
}

impl Store {
    fn open(url: &str) -> Result<Store> {
        let parsed = url::Url::parse(url).map_err(|e| remote_err(url, format!("not a URL: {e}")))?;
        let (scheme, prefix) =
            ObjectStoreScheme::parse(&parsed).map_err(|e| remote_err(url, format!("unsupported URL: {e}")))?;
        let built: std::result::Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
            ObjectStoreScheme::AmazonS3 => object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as _),
            ObjectStoreScheme::GoogleCloudStorage => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as _),
            ObjectStoreScheme::MicrosoftAzure => object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .build()
                .map(|s| Arc::new(s) as _),
            ObjectStoreScheme::Http => {
                let base = &parsed[..url::Position::BeforePath];
                // Plain http:// is allowed when asked for by the URL itself (a server on the local network).
                let client = object_store::ClientOptions::new().with_allow_http(parsed.scheme() == "http");
                object_store::http::HttpBuilder::new()
                    .with_url(base)
                    .with_client_options(client)
                    .build()
                    .map(|s| Arc::new(s) as _)
            }
            other => return Err(remote_err(url, format!("{other:?} URLs are not supported"))),
        };
        let store = built.map_err(|e| remote_err(url, e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("imglish-remote")
            .enable_all()
            .build()
            .map_err(|e| remote_err(url, format!("cannot start the I/O runtime: {e}")))?;
        Ok(Store {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
            runtime,
        })
    }

    fn path(&self, file: &str) -> ObjPath {
        self.prefix.clone().join(file)
    }

    fn object_url(&self, file: &str) -> String {
        format!("{}/{file}", self.url)
    }

    /// The whole object `file`.
    fn get(&self, file: &str) -> Result<Vec<u8>> {
        let path = self.path(file);
        self.runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| remote_err(&self.object_url(file), e))
    }

    /// Streams object `file` into `out`, returning its sha256 and length.
    fn download(&self, file: &str, out: &mut File) -> Result<(String, u64)> {
        let path = self.path(file);
        let tmp_err = |e: std::io::Error| remote_err(&self.object_url(file), format!("writing the cache: {e}"));
        self.runtime.block_on(async {
            let mut stream = self
                .store
                .get(&path)
                .await
                .map_err(|e| remote_err(&self.object_url(file), e))?
                .into_stream();
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| remote_err(&self.object_url(file), e))?;
                hasher.update(&chunk);
                len += chunk.len() as u64;
                out.write_all(&chunk).map_err(tmp_err)?;
            }
            Ok((util::hex(&hasher.finalize()), len))
        })
    }

    fn put(&self, file: &str, source: &Path) -> Result<()> {
        const SINGLE_PUT: u64 = 64 << 20;
        let path = self.path(file);
        let url = self.object_url(file);
        let len = fs::metadata(source).map_err(crate::error::io_err(source))?.len();
        self.runtime.block_on(async {
            if len <= SINGLE_PUT {
                let bytes = fs::read(source).map_err(crate::error::io_err(source))?;
                self.store
                    .put(&path, PutPayload::from(bytes))
                    .await
                    .map_err(|e| remote_err(&url, e))?;
                return Ok(());
            }
            let upload = self.store.put_multipart(&path).await.map_err(|e| remote_err(&url, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, 16 << 20);
            let mut f = File::open(source).map_err(crate::error::io_err(source))?;
            let mut buf = vec![0u8; 8 << 20];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf).map_err(crate::error::io_err(source))?;
                if n == 0 {
                    break;
                }
                writer.wait_for_capacity(4).await.map_err(|e| remote_err(&url, e))?;
                writer.write(&buf[..n]);
            }
            writer.finish().await.map_err(|e| remote_err(&url, e))?;
            Ok(())
        })
    }

    fn delete(&self, file: &str) -> Result<()> {
        let path = self.path(file);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(remote_err(&self.object_url(file), e)),
        }
    }
}

/// The index of the dataset at `url`.
///
/// Datasets opened more than once in a process (same URL, same `index.json`) share one cache.
pub(crate) fn read_remote_index(url: &str) -> Result<(DatasetIndex, Arc<Remote>)> {
    static OPEN: Mutex<Vec<(String, std::sync::Weak<Remote>)>> = Mutex::new(Vec::new());
    let store = Store::open(url)?;
    let bytes = store.get(INDEX_FILE)?;
    let index = DatasetIndex::parse(&bytes, Path::new(&store.object_url(INDEX_FILE)))?;
    let key = format!("{}\0{}", store.url, util::sha256_hex(&bytes));
    let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    open.retain(|(_, r)| r.strong_count() > 0);
    if let Some(remote) = open.iter().find(|(k, _)| *k == key).and_then(|(_, r)| r.upgrade()) {
        return Ok((index, remote));
    }
    let remote = Arc::new(Remote::new(store, &index, &RemoteOptions::current())?);
    open.push((key, Arc::downgrade(&remote)));
    Ok((index, remote))
}

/// Uploads the packed dataset in `dir` to `url`: the old `index.json` there is removed first, then every shard is
/// uploaded, then the `extra` files of `dir` that exist (such as a build record), then `index.json`, so a reader
/// never sees an index whose shards are not all in place. `progress` gets the shard bytes done; returns them.
pub fn upload_dataset(dir: &Path, url: &str, extra: &[&str], progress: &mut dyn FnMut(u64)) -> Result<u64> {
    let index = DatasetIndex::read(dir)?;
    let store = Store::open(url)?;
    store.delete(INDEX_FILE)?;
    let mut done = 0;
    for shard in &index.shards {
        store.put(&shard.file, &dir.join(&shard.file))?;
        done += shard.bytes;
        progress(done);
    }
    for name in extra {
        if dir.join(name).is_file() {
            store.put(name, &dir.join(name))?;
        }
    }
    store.put(INDEX_FILE, &dir.join(INDEX_FILE))?;
    Ok(done)
}

/// A remote dataset's shards, cached on local disk.
pub(crate) struct Remote {
    store: Store,
    dir: PathBuf,
    /// The `flock` that makes `dir` this process's (released when the process ends, however it ends).
    _lock: File,
    limit: u64,
    prefetch: usize,
    state: Mutex<CacheState>,
    changed: Condvar,
}

#[derive(Default)]
struct CacheState {
    tick: u64,
    used: u64,
    entries: HashMap<usize, Entry>,
    /// Downloads running ahead of the reader.
    prefetching: usize,
}

struct Entry {
    name: String,
    bytes: u64,
    last_use: u64,
    slot: Slot,
}

enum Slot {
    /// Being downloaded (its room is reserved).
    Loading,
    /// In the cache, not opened yet; `hashed`: downloaded and checked by this process (else found from an
    /// earlier run, checked at first use).
    OnDisk { hashed: bool },
    /// Opened; evictable when nobody else holds it.
    Open(Arc<ShardFile>),
}

/// How long a reader waits for room in a full cache (downloads in flight, shards being read) before failing.
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Remote {
    fn new(store: Store, index: &DatasetIndex, options: &RemoteOptions) -> Result<Remote> {
        let (dir, lock) = Self::claim(&options.cache_dir, &store.url)?;
        let largest = index.shards.iter().map(|s| s.bytes).max().unwrap_or(0);
        if options.cache_limit < largest {
            return Err(remote_err(
                &store.url,
                format!(
                    "the shard cache limit ({} bytes) is smaller than the largest shard ({largest} bytes): raise \
                     --cache-limit",
                    options.cache_limit
                ),
            ));
        }
        let remote = Remote {
            store,
            dir,
            _lock: lock,
            limit: options.cache_limit,
            prefetch: options.prefetch,
            state: Mutex::new(CacheState::default()),
            changed: Condvar::new(),
        };
        remote.adopt(index)?;
        Ok(remote)
    }

    /// The cache folder of `url` under `root` that no other process holds: `root/HASH`, or while another process
    /// reads the same dataset, `root/HASH-1`, `-2`, ... (a process evicts and deletes files in its own folder only,
    /// so concurrent readers on one machine, e.g. the ranks of a node, never remove each other's shards).
    fn claim(root: &Path, url: &str) -> Result<(PathBuf, File)> {
        let key = url_key(url);
        for n in 0..256 {
            let dir = match n {
                0 => root.join(&key),
                n => root.join(format!("{key}-{n}")),
            };
            fs::create_dir_all(&dir).map_err(crate::error::io_err(&dir))?;
            let lock = File::open(&dir).map_err(crate::error::io_err(&dir))?;
            match lock.try_lock() {
                Ok(()) => return Ok((dir, lock)),
                Err(std::fs::TryLockError::WouldBlock) => continue,
                Err(std::fs::TryLockError::Error(e)) => return Err(crate::error::io_err(&dir)(e)),
            }
        }
        Err(remote_err(
            url,
            format!(
                "256 processes hold shard caches of this dataset under {}",
                root.display()
            ),
        ))
    }

    /// Drops every cached shard nobody is reading, so that the next reads fetch (and check) the objects again
    /// (`verify` checks what is in object storage, not an earlier copy).
    pub(crate) fn clear(&self) {
        let mut state = self.lock();
        let idle: Vec<usize> = state
            .entries
            .iter()
            .filter(|(_, e)| match &e.slot {
                Slot::Loading => false,
                Slot::OnDisk { .. } => true,
                Slot::Open(f) => Arc::strong_count(f) == 1,
            })
            .map(|(i, _)| *i)
            .collect();
        for i in idle {
            self.forget(&mut state, i);
        }
    }

    /// How many shards are fetched ahead of the reader.
    pub(crate) fn prefetch_depth(&self) -> usize {
        self.prefetch
    }

    /// The cache folder of this dataset.
    pub(crate) fn cache_dir(&self) -> &Path {
        &self.dir
    }

    /// Takes over the shards an earlier run left in the cache (checked before first use); deletes temporaries,
    /// files the index does not list, and files beyond the limit.
    fn adopt(&self, index: &DatasetIndex) -> Result<()> {
        let by_name: HashMap<&str, (usize, &ShardEntry)> = index
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.file.as_str(), (i, s)))
            .collect();
        let mut state = self.lock();
        for entry in fs::read_dir(&self.dir).map_err(crate::error::io_err(&self.dir))? {
            let entry = entry.map_err(crate::error::io_err(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let len = entry.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            match by_name.get(name.as_str()) {
                Some(&(i, s)) if s.bytes == len && state.used + len <= self.limit => {
                    state.used += len;
                    state.entries.insert(
                        i,
                        Entry {
                            name,
                            bytes: len,
                            last_use: 0,
                            slot: Slot::OnDisk { hashed: false },
                        },
                    );
                }
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shard `i`, downloaded into the cache if needed, verified and opened.
    pub(crate) fn shard(&self, i: usize, entry: &ShardEntry, expect: &Expect) -> Result<Arc<ShardFile>> {
        enum Action {
            Wait,
            Open { hashed: bool },
            Fetch,
        }
        let path = self.dir.join(&entry.file);
        let mut state = self.lock();
        loop {
            state.tick += 1;
            let tick = state.tick;
            let action = match state.entries.get_mut(&i) {
                Some(e) => {
                    e.last_use = tick;
                    match e.slot {
                        Slot::Open(ref f) => return Ok(f.clone()),
                        Slot::Loading => Action::Wait,
                        Slot::OnDisk { hashed } => {
                            e.slot = Slot::Loading;
                            Action::Open { hashed }
                        }
                    }
                }
                None => Action::Fetch,
            };
            let opened = match action {
                Action::Wait => {
                    state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                Action::Open { hashed } => {
                    drop(state);
                    let opened = if hashed {
                        ShardFile::open_trusted(&path, expect.clone())
                    } else {
                        ShardFile::open_verified(&path, expect.clone())
                    };
                    state = self.lock();
                    if opened.is_err() && !hashed {
                        // A damaged leftover of an earlier run: fetch it again.
                        self.forget(&mut state, i);
                        continue;
                    }
                    opened
                }
                Action::Fetch => {
                    state = self.reserve(state, i, entry)?;
                    drop(state);
                    let fetched = self
                        .fetch(entry)
                        .and_then(|path| ShardFile::open_trusted(&path, expect.clone()));
                    state = self.lock();
                    fetched
                }
            };
            return match opened {
                Ok(f) => {
                    let f = Arc::new(f);
                    if let Some(e) = state.entries.get_mut(&i) {
                        e.slot = Slot::Open(f.clone());
                    }
                    self.changed.notify_all();
                    Ok(f)
                }
                Err(e) => {
                    self.forget(&mut state, i);
                    Err(e)
                }
            };
        }
    }

    /// Downloads `shards` (dataset indices, in the order they will be read) ahead of the reader, on background
    /// threads, while the cache has room without evicting any of them.
    pub(crate) fn prefetch(self: &Arc<Self>, shards: &[(usize, ShardEntry)]) {
        let keep: Vec<usize> = shards.iter().map(|(j, _)| *j).collect();
        let mut state = self.lock();
        for (i, entry) in shards.iter().take(self.prefetch) {
            if state.prefetching >= self.prefetch || state.entries.contains_key(i) {
                continue;
            }
            if self.make_room(&mut state, entry.bytes, &keep).is_err() {
                return;
            }
            self.insert_loading(&mut state, *i, entry);
            state.prefetching += 1;
            let (me, job, entry) = (Arc::clone(self), *i, entry.clone());
            let spawned = std::thread::Builder::new()
                .name("imglish-prefetch".into())
                .spawn(move || {
                    let done = me.fetch(&entry);
                    let mut state = me.lock();
                    state.prefetching -= 1;
                    match done {
                        Ok(_) => {
                            if let Some(e) = state.entries.get_mut(&job) {
                                e.slot = Slot::OnDisk { hashed: true };
                            }
                            me.changed.notify_all();
                        }
                        Err(e) => {
                            tracing::debug!("prefetch of {} failed: {e}", entry.file);
                            me.forget(&mut state, job);
                        }
                    }
                });
            if spawned.is_err() {
                state.prefetching -= 1;
                self.forget(&mut state, *i);
            }
        }
    }

    fn insert_loading(&self, state: &mut CacheState, i: usize, entry: &ShardEntry) {
        state.used += entry.bytes;
        let last_use = state.tick;
        state.entries.insert(
            i,
            Entry {
                name: entry.file.clone(),
                bytes: entry.bytes,
                last_use,
                slot: Slot::Loading,
            },
        );
    }

    /// Drops shard `i` from the cache (entry and file).
    fn forget(&self, state: &mut CacheState, i: usize) {
        if let Some(e) = state.entries.remove(&i) {
            state.used -= e.bytes;
            let _ = fs::remove_file(self.dir.join(&e.name));
        }
        self.changed.notify_all();
    }

    /// Reserves room for shard `i`, evicting least recently used shards that nobody reads; waits while
    /// downloads or readers hold the room, up to [`ROOM_WAIT`].
    fn reserve<'a>(
        &'a self,
        mut state: MutexGuard<'a, CacheState>,
        i: usize,
        entry: &ShardEntry,
    ) -> Result<MutexGuard<'a, CacheState>> {
        let started = std::time::Instant::now();
        loop {
            match self.make_room(&mut state, entry.bytes, &[i]) {
                Ok(()) => break,
                Err(e) if started.elapsed() > ROOM_WAIT => return Err(e),
                Err(_) => {
                    let timeout = std::time::Duration::from_millis(50);
                    state = self
                        .changed
                        .wait_timeout(state, timeout)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        self.insert_loading(&mut state, i, entry);
        Ok(state)
    }

    /// Evicts least recently used shards that nobody reads (not in `keep`) until `bytes` more fit under the
    /// limit.
    fn make_room(&self, state: &mut CacheState, bytes: u64, keep: &[usize]) -> Result<()> {
        while state.used + bytes > self.limit {
            let victim = state
                .entries
                .iter()
                .filter(|(i, e)| {
                    !keep.contains(i)
                        && match &e.slot {
                            Slot::Loading => false,
                            Slot::OnDisk { .. } => true,
                            Slot::Open(f) => Arc::strong_count(f) == 1,
                        }
                })
                .min_by_key(|(_, e)| e.last_use)
                .map(|(i, _)| *i);
            let Some(v) = victim else {
                return Err(remote_err(
                    &self.store.url,
                    format!(
                        "the shard cache is full: {} of its {} bytes are held by shards in use or in flight and \
                         {bytes} more are needed (raise --cache-limit)",
                        state.used, self.limit
                    ),
                ));
            };
            if let Some(e) = state.entries.remove(&v) {
                state.used -= e.bytes;
                // The shard's file handle closes here, before the file goes.
                drop(e.slot);
                let _ = fs::remove_file(self.dir.join(&e.name));
            }
        }
        Ok(())
    }

    /// Downloads `entry` into the cache (temporary name, size and sha256 checked, renamed); returns its path.
    fn fetch(&self, entry: &ShardEntry) -> Result<PathBuf> {
        let path = self.dir.join(&entry.file);
        let tmp = util::temp_path(&path);
        let mut file = File::create(&tmp).map_err(crate::error::io_err(&tmp))?;
        let got = self.store.download(&entry.file, &mut file);
        let checked = got.and_then(|(sha, len)| {
            if len != entry.bytes || sha != entry.sha256 {
                return Err(PackError::CorruptShard {
                    shard: entry.file.clone(),
                    batch: None,
                    reason: format!(
                        "the object {} is {len} bytes with sha256 {sha}, the index says {} bytes with sha256 {} \
                         (changed or damaged after packing)",
                        self.store.object_url(&entry.file),
                        entry.bytes,
                        entry.sha256
                    ),
                });
            }
            util::commit_file(file, &tmp, &path)
        });
        if checked.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        checked.map(|()| path)
    }
}
