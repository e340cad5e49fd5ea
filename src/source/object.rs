//! [`ObjectStoreSource`]: pages of a snapshot object read with ranged GETs
//! through the `object_store` crate (feature `object-store`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{FutureExt, Shared};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tokio::sync::Semaphore;

use super::{available, PageSource};

/// The default [`ObjectStoreSourceBuilder::chunk_size`]: 2 MiB.
const DEFAULT_CHUNK: u64 = 2 << 20;
/// The default [`ObjectStoreSourceBuilder::cache_bytes`]: 256 MiB.
const DEFAULT_CACHE: u64 = 256 << 20;
/// The default [`ObjectStoreSourceBuilder::max_requests`].
const DEFAULT_REQUESTS: usize = 16;

/// A page source that reads a memory snapshot kept in object storage (S3,
/// GCS, Azure, HTTP, a local directory: any [`ObjectStore`]) with ranged
/// GETs, so a restore can start while the snapshot is still remote.
///
/// - Reads are made in aligned chunks
///   ([`chunk_size`](ObjectStoreSourceBuilder::chunk_size), 2 MiB by
///   default). However many faults wait on one chunk, one request fetches
///   it; they all wait for that one.
/// - Fetched chunks stay in a cache of at most
///   [`cache_bytes`](ObjectStoreSourceBuilder::cache_bytes) (least
///   recently used out first), so the neighbours of a faulting page, a
///   fault-around window or a warm prefetch ([`Server::warm`](crate::Server::warm))
///   cost a few large GETs, not one per page.
/// - At most [`max_requests`](ObjectStoreSourceBuilder::max_requests) are
///   in flight.
/// - The store's client retries what it considers transient (configure it
///   with its own retry settings, for example
///   `AmazonS3Builder::with_retry`); on top of that a failed or short read
///   is tried again [`retries`](ObjectStoreSourceBuilder::retries) times
///   with exponential backoff. A read that finally fails fails the fault
///   through the server's [`FailurePolicy`](crate::FailurePolicy), with the
///   object, the byte range and the whole cause in the error.
///
/// Counters in [`stats`](Self::stats): requests, bytes fetched, cache hits,
/// time spent waiting for the network.
///
/// ```no_run
/// # async fn f(uffd: tokio_uffd::AsyncUffd, base: usize, len: usize) -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use object_store::aws::AmazonS3Builder;
/// use tokio_uffd::{ObjectStoreSource, Region, Server, SourceHandler};
///
/// // Credentials and region from the usual AWS_* environment variables.
/// let store = AmazonS3Builder::from_env().with_bucket_name("snapshots").build()?;
/// let source = ObjectStoreSource::builder(Arc::new(store), "vm1/mem.snap")
///     .chunk_size(4 << 20)
///     .open()
///     .await?;
/// let server = Server::new(uffd, SourceHandler::new(source))
///     .regions([Region::new(base..base + len)])?
///     .prefetch(16)
///     // Remote copies: more of them in flight, a chunk each.
///     .background_concurrency(8)
///     .background_chunk(4 << 20)
///     .spawn();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ObjectStoreSource {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    path: Path,
    len: u64,
    /// The object's entity tag when it was opened: every GET asks for that
    /// version (`If-Match`), so a replaced object fails its reads instead
    /// of mixing two snapshots in one memory.
    e_tag: Option<String>,
    chunk: u64,
    cache_budget: u64,
    retries: u32,
    backoff: Duration,
    requests: Semaphore,
    chunks: Mutex<Chunks>,
    stats: Counters,
}

/// A fetch of one chunk that any number of readers await.
type Fetch = Shared<Pin<Box<dyn Future<Output = Result<Bytes, Arc<ObjectReadError>>> + Send>>>;

#[derive(Default)]
struct Chunks {
    /// Cached chunks and when each was last used.
    ready: HashMap<u64, (Bytes, u64)>,
    /// Last use -> chunk, oldest first.
    lru: BTreeMap<u64, u64>,
    /// Fetches in flight, and their tasks.
    loading: HashMap<u64, (Fetch, tokio::task::AbortHandle)>,
    bytes: u64,
    clock: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes_fetched: AtomicU64,
    cache_hits: AtomicU64,
    joined: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    evicted: AtomicU64,
    wait_nanos: AtomicU64,
}

/// What an [`ObjectStoreSource`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ObjectStoreStats {
    /// Ranged GETs sent (retries included).
    pub requests: u64,
    /// Bytes received in answers that were used.
    pub bytes_fetched: u64,
    /// Chunk lookups served from the cache.
    pub cache_hits: u64,
    /// Chunk lookups that waited for a request already in flight for that
    /// chunk (no second GET).
    pub joined: u64,
    /// Requests made again after a failure or a short answer.
    pub retries: u64,
    /// Chunk reads that failed for good.
    pub failures: u64,
    /// Chunks dropped from the cache to stay within its budget.
    pub evicted: u64,
    /// Time reads spent waiting for chunks not in the cache, summed over
    /// reads (two reads waiting at once count twice).
    pub network_wait: Duration,
}

/// A read of a snapshot object that failed, naming the object and the byte
/// range; the store's error is its [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectReadError {
    /// The store answered with an error (after its own retries and ours).
    /// A precondition failure means the object was replaced since the
    /// source was opened: it is not retried.
    #[error("GET {object} bytes {start}..{end} failed after {attempts} attempts")]
    Get {
        /// The store and the object's path.
        object: String,
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// Requests made.
        attempts: u32,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The store answered with fewer (or more) bytes than asked for.
    #[error(
        "GET {object} bytes {start}..{end}: {got} bytes came back, not {want}, after {attempts} \
         attempts (the object changed, or the store or a proxy cut the body short)"
    )]
    Length {
        /// The store and the object's path.
        object: String,
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// Bytes received.
        got: u64,
        /// Bytes asked for.
        want: u64,
        /// Requests made.
        attempts: u32,
    },
    /// The length of the object could not be read (`HEAD`).
    #[error("cannot read the length of {object}")]
    Head {
        /// The store and the object's path.
        object: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// The task fetching a chunk ended without an answer (the runtime shut
    /// down).
    #[error("GET {object} bytes {start}..{end}: the fetching task ended without an answer")]
    Cancelled {
        /// The store and the object's path.
        object: String,
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
    },
}

/// Builds an [`ObjectStoreSource`]; see its settings.
#[derive(Debug)]
pub struct ObjectStoreSourceBuilder {
    store: Arc<dyn ObjectStore>,
    path: Path,
    len: Option<u64>,
    e_tag: Option<String>,
    chunk: u64,
    cache: u64,
    requests: usize,
    retries: u32,
    backoff: Duration,
}

impl ObjectStoreSource {
    /// A source for the object at `path` in `store`, to configure and
    /// [`open`](ObjectStoreSourceBuilder::open).
    pub fn builder(store: Arc<dyn ObjectStore>, path: impl Into<Path>) -> ObjectStoreSourceBuilder {
        ObjectStoreSourceBuilder {
            store,
            path: path.into(),
            len: None,
            e_tag: None,
            chunk: DEFAULT_CHUNK,
            cache: DEFAULT_CACHE,
            requests: DEFAULT_REQUESTS,
            retries: 2,
            backoff: Duration::from_millis(20),
        }
    }

    /// The object's length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the object is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// The version of the object every read asks for (its entity tag),
    /// if the store gave one.
    pub fn e_tag(&self) -> Option<&str> {
        self.inner.e_tag.as_deref()
    }

    /// The store and path, as errors name them.
    pub fn object(&self) -> String {
        self.inner.name()
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk
    }

    /// The counters so far.
    pub fn stats(&self) -> ObjectStoreStats {
        let c = &self.inner.stats;
        let l = |a: &AtomicU64| a.load(Relaxed);
        ObjectStoreStats {
            requests: l(&c.requests),
            bytes_fetched: l(&c.bytes_fetched),
            cache_hits: l(&c.cache_hits),
            joined: l(&c.joined),
            retries: l(&c.retries),
            failures: l(&c.failures),
            evicted: l(&c.evicted),
            network_wait: Duration::from_nanos(l(&c.wait_nanos)),
        }
    }
}

impl fmt::Debug for ObjectStoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreSource")
            .field("object", &self.object())
            .field("len", &self.inner.len)
            .field("chunk", &self.inner.chunk)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl ObjectStoreSourceBuilder {
    /// Bytes per ranged GET (rounded up to a multiple of 4 KiB; default
    /// 2 MiB). Larger chunks cost fewer requests and fetch more around each
    /// fault.
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.chunk = bytes.max(1).next_multiple_of(4096);
        self
    }

    /// The most bytes of fetched chunks kept (default 256 MiB); 0 keeps
    /// none (each read of a chunk then fetches it again, unless a fetch of
    /// it is in flight).
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache = bytes;
        self
    }

    /// The most GETs in flight at once (default 16, at least 1).
    pub fn max_requests(mut self, requests: usize) -> Self {
        self.requests = requests.max(1);
        self
    }

    /// How many times a failed or short GET is made again after the
    /// store's own retries (default 2), the first after `backoff` (default
    /// 20 ms), each next after twice the wait before.
    pub fn retries(mut self, retries: u32, backoff: Duration) -> Self {
        self.retries = retries;
        self.backoff = backoff;
        self
    }

    /// The object's length, if known: no `HEAD` request then.
    pub fn len(mut self, bytes: u64) -> Self {
        self.len = Some(bytes);
        self
    }

    /// The version of the object to read (its entity tag), if known
    /// beside [`len`](Self::len); otherwise the `HEAD` of
    /// [`open`](Self::open) reads it. Every GET asks for that version
    /// (`If-Match`).
    pub fn e_tag(mut self, e_tag: impl Into<String>) -> Self {
        self.e_tag = Some(e_tag.into());
        self
    }

    /// Reads the object's length (one `HEAD`, unless [`len`](Self::len)
    /// gave it) and makes the source.
    ///
    /// # Errors
    ///
    /// [`ObjectReadError::Head`] naming the object, with the store's error
    /// (not found, access denied, unreachable) as its source.
    pub async fn open(self) -> Result<ObjectStoreSource, ObjectReadError> {
        let name = format!("{}/{}", self.store, self.path);
        let (len, e_tag) = match self.len {
            Some(len) => (len, self.e_tag),
            None => {
                let head = self.store.head(&self.path);
                let meta = head.await.map_err(|source| ObjectReadError::Head {
                    object: name,
                    source,
                })?;
                (meta.size, self.e_tag.or(meta.e_tag))
            }
        };
        Ok(ObjectStoreSource {
            inner: Arc::new(Inner {
                store: self.store,
                path: self.path,
                len,
                e_tag,
                chunk: self.chunk,
                cache_budget: self.cache,
                retries: self.retries,
                backoff: self.backoff,
                requests: Semaphore::new(self.requests),
                chunks: Mutex::new(Chunks::default()),
                stats: Counters::default(),
            }),
        })
    }
}

impl Inner {
    fn name(&self) -> String {
        format!("{}/{}", self.store, self.path)
    }

    fn range(&self, idx: u64) -> (u64, u64) {
        let start = idx * self.chunk;
        (start, (start + self.chunk).min(self.len))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chunk `idx` from the cache (`Ok`), or the fetch to wait for
    /// (`Err`): the one in flight, or a new one (in a task of its own, so
    /// that no reader's cancellation stops it for the others).
    fn chunk(self: &Arc<Self>, idx: u64) -> Result<Bytes, Fetch> {
        let mut chunks = self.lock();
        chunks.clock += 1;
        let now = chunks.clock;
        if let Some((bytes, used)) = chunks.ready.get_mut(&idx) {
            let (bytes, old) = (bytes.clone(), std::mem::replace(used, now));
            chunks.lru.remove(&old);
            chunks.lru.insert(now, idx);
            self.stats.cache_hits.fetch_add(1, Relaxed);
            return Ok(bytes);
        }
        if let Some((fetch, task)) = chunks.loading.get(&idx) {
            // A fetch task removes its entry before it ends. One that ended
            // and left it was dropped unfinished (its runtime shut down):
            // fetch the chunk again, or every later read of it would get
            // that fetch's `Cancelled`.
            if !task.is_finished() {
                self.stats.joined.fetch_add(1, Relaxed);
                return Err(fetch.clone());
            }
        }
        let me = self.clone();
        let task = tokio::spawn(async move { me.fetch(idx).await });
        let abort = task.abort_handle();
        let ((start, end), object) = (self.range(idx), self.name());
        // No reference to `self` in here: an entry of `loading` must not
        // keep the source alive.
        let fetch: Fetch = async move {
            task.await.unwrap_or_else(|_| {
                Err(Arc::new(ObjectReadError::Cancelled { object, start, end }))
            })
        }
        .boxed()
        .shared();
        chunks.loading.insert(idx, (fetch.clone(), abort));
        Err(fetch)
    }

    /// Fetches chunk `idx` (retrying), caches it, and ends its loading
    /// entry.
    async fn fetch(self: Arc<Self>, idx: u64) -> Result<Bytes, Arc<ObjectReadError>> {
        let result = self.get_with_retries(idx).await;
        let mut chunks = self.lock();
        chunks.loading.remove(&idx);
        match &result {
            Ok(bytes) if self.cache_budget >= bytes.len() as u64 => {
                chunks.clock += 1;
                let now = chunks.clock;
                chunks.bytes += bytes.len() as u64;
                chunks.ready.insert(idx, (bytes.clone(), now));
                chunks.lru.insert(now, idx);
                while chunks.bytes > self.cache_budget {
                    let Some((_, old)) = chunks.lru.pop_first() else {
                        break;
                    };
                    if let Some((b, _)) = chunks.ready.remove(&old) {
                        chunks.bytes -= b.len() as u64;
                        self.stats.evicted.fetch_add(1, Relaxed);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                self.stats.failures.fetch_add(1, Relaxed);
            }
        }
        result.map_err(Arc::new)
    }

    async fn get_with_retries(&self, idx: u64) -> Result<Bytes, ObjectReadError> {
        let (start, end) = self.range(idx);
        let mut wait = self.backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = self.get_once(start, end).await;
            let error = match result {
                Ok(bytes) if bytes.len() as u64 == end - start => {
                    self.stats
                        .bytes_fetched
                        .fetch_add(bytes.len() as u64, Relaxed);
                    return Ok(bytes);
                }
                Ok(bytes) => ObjectReadError::Length {
                    object: self.name(),
                    start,
                    end,
                    got: bytes.len() as u64,
                    want: end - start,
                    attempts,
                },
                Err(source) => {
                    let fatal = matches!(
                        source,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::InvalidPath { .. }
                            | object_store::Error::NotSupported { .. }
                            | object_store::Error::NotImplemented { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }
                            | object_store::Error::Precondition { .. }
                    );
                    let error = ObjectReadError::Get {
                        object: self.name(),
                        start,
                        end,
                        attempts,
                        source,
                    };
                    if fatal {
                        return Err(error);
                    }
                    error
                }
            };
            if attempts > self.retries {
                return Err(error);
            }
            self.stats.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(wait).await;
            wait = wait.saturating_mul(2);
        }
    }

    /// One ranged GET, under the request limit.
    async fn get_once(&self, start: u64, end: u64) -> object_store::Result<Bytes> {
        let _permit = self
            .requests
            .acquire()
            .await
            .expect("the request semaphore is never closed");
        self.stats.requests.fetch_add(1, Relaxed);
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..end)),
            if_match: self.e_tag.clone(),
            ..GetOptions::default()
        };
        self.store
            .get_opts(&self.path, options)
            .await?
            .bytes()
            .await
    }
}

impl PageSource for ObjectStoreSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let inner = &self.inner;
        let n = available(offset, buf.len(), inner.len)?;
        if n == 0 {
            buf.fill(0);
            return Ok(());
        }
        let (first, last) = (offset / inner.chunk, (offset + n as u64 - 1) / inner.chunk);
        // Every chunk of the read at once: the misses fetched concurrently.
        let mut parts = Vec::with_capacity((last - first + 1) as usize);
        let mut waits = Vec::new();
        for idx in first..=last {
            match inner.chunk(idx) {
                Ok(bytes) => parts.push(Some(bytes)),
                Err(fetch) => {
                    parts.push(None);
                    waits.push((idx, fetch));
                }
            }
        }
        if !waits.is_empty() {
            let started = Instant::now();
            let got = futures::future::join_all(waits.iter().map(|(_, f)| f.clone())).await;
            let waited = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            inner.stats.wait_nanos.fetch_add(waited, Relaxed);
            for ((idx, _), result) in waits.iter().zip(got) {
                let bytes = result.map_err(io::Error::other)?;
                parts[(idx - first) as usize] = Some(bytes);
            }
        }
        let mut done = 0;
        for (i, part) in parts.into_iter().enumerate() {
            let bytes = part.expect("every chunk fetched");
            let chunk_start = (first + i as u64) * inner.chunk;
            let from = (offset + done as u64 - chunk_start) as usize;
            let take = (bytes.len() - from).min(n - done);
            buf[done..done + take].copy_from_slice(&bytes[from..from + take]);
            done += take;
        }
        buf[n..].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::PutPayload;

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096) as u8 ^ (i as u8)).collect()
    }

    async fn source(len: usize, chunk: u64, cache: u64) -> (ObjectStoreSource, Vec<u8>) {
        let store = Arc::new(InMemory::new());
        let data = image(len);
        let path = Path::from("snap/mem");
        store
            .put(&path, PutPayload::from(data.clone()))
            .await
            .unwrap();
        let src = ObjectStoreSource::builder(store, path)
            .chunk_size(chunk)
            .cache_bytes(cache)
            .open()
            .await
            .unwrap();
        (src, data)
    }

    #[tokio::test]
    async fn reads_across_chunks_and_caches_them() {
        let (src, data) = source(40_000, 8192, 1 << 20).await;
        assert_eq!(src.len(), 40_000);
        let mut buf = vec![0u8; 12288];
        src.read_at(4096, &mut buf).await.unwrap();
        assert_eq!(buf, data[4096..4096 + 12288]);
        let s = src.stats();
        assert_eq!((s.requests, s.cache_hits), (2, 0), "{s:?}");
        assert_eq!(s.bytes_fetched, 16384);
        // The same chunks again: from the cache.
        src.read_at(8192, &mut buf[..4096]).await.unwrap();
        assert_eq!(buf[..4096], data[8192..12288]);
        assert_eq!(src.stats().requests, 2);
        assert_eq!(src.stats().cache_hits, 1);
        // Across the end: the tail is zeros; past it, an error.
        let mut tail = vec![1u8; 8192];
        src.read_at(36864, &mut tail).await.unwrap();
        assert_eq!(tail[..3136], data[36864..]);
        assert!(tail[3136..].iter().all(|&b| b == 0));
        assert!(src.read_at(40_960, &mut tail).await.is_err());
    }

    #[tokio::test]
    async fn concurrent_reads_of_one_chunk_make_one_request() {
        let (src, data) = source(1 << 20, 1 << 20, 1 << 20).await;
        let reads = (0..32u64).map(|i| {
            let src = src.clone();
            async move {
                let mut buf = vec![0u8; 4096];
                src.read_at(i * 4096, &mut buf).await.unwrap();
                buf
            }
        });
        let bufs = futures::future::join_all(reads).await;
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b[..], data[i * 4096..(i + 1) * 4096]);
        }
        let s = src.stats();
        assert_eq!(s.requests, 1, "{s:?}");
        assert_eq!(s.joined + s.cache_hits, 31, "{s:?}");
    }

    #[tokio::test]
    async fn the_cache_keeps_to_its_budget_least_recently_used_out() {
        let (src, _) = source(64 << 10, 4096, 3 * 4096).await;
        let mut buf = vec![0u8; 4096];
        for p in [0u64, 1, 2, 0, 3] {
            src.read_at(p * 4096, &mut buf).await.unwrap();
        }
        // 3 evicted 1 (0 was used again after 1).
        assert_eq!(src.stats().evicted, 1);
        src.read_at(0, &mut buf).await.unwrap();
        assert_eq!(src.stats().requests, 4, "0 still cached");
        src.read_at(4096, &mut buf).await.unwrap();
        assert_eq!(src.stats().requests, 5, "1 was evicted");
        // No cache at all: every read fetches.
        let (src, _) = source(16 << 10, 4096, 0).await;
        src.read_at(0, &mut buf).await.unwrap();
        src.read_at(0, &mut buf).await.unwrap();
        assert_eq!(src.stats().requests, 2);
    }

    #[tokio::test]
    async fn its_futures_can_move_into_tasks() {
        fn send<T: Send>(_: &T) {}
        let store = Arc::new(InMemory::new());
        let open = ObjectStoreSource::builder(store, "x").len(4096).open();
        send(&open);
        let src = open.await.unwrap();
        let mut buf = [0u8; 16];
        send(&src.read_at(0, &mut buf));
    }

    #[tokio::test]
    async fn an_object_replaced_after_opening_fails_its_reads() {
        let (src, _) = source(16 << 10, 4096, 1 << 20).await;
        assert!(src.e_tag().is_some());
        let store = src.inner.store.clone();
        let mut buf = vec![0u8; 4096];
        src.read_at(0, &mut buf).await.unwrap();
        store
            .put(
                &Path::from("snap/mem"),
                PutPayload::from(vec![9u8; 16 << 10]),
            )
            .await
            .unwrap();
        // Cached: the old version, consistent with what was served.
        src.read_at(0, &mut buf).await.unwrap();
        // Not cached: refused, not mixed with the new version.
        let err = src.read_at(8192, &mut buf).await.unwrap_err();
        let msg = crate::error_chain(&err);
        assert!(msg.contains("bytes 8192..12288"), "{msg}");
        assert_eq!(src.stats().retries, 0, "a replaced object is not retried");
    }

    #[tokio::test]
    async fn a_missing_object_is_an_error_naming_it() {
        let store = Arc::new(InMemory::new());
        let err = ObjectStoreSource::builder(store.clone(), "no/such")
            .open()
            .await
            .unwrap_err();
        let msg = crate::error_chain(&err);
        assert!(msg.contains("no/such"), "{msg}");
        // Told a length, it opens; reads then fail (not found, no retry).
        let src = ObjectStoreSource::builder(store, "no/such")
            .len(8192)
            .retries(5, Duration::from_millis(1))
            .open()
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let err = src.read_at(0, &mut buf).await.unwrap_err();
        let msg = crate::error_chain(&err);
        assert!(
            msg.contains("GET ") && msg.contains("no/such bytes 0..8192"),
            "{msg}"
        );
        assert_eq!(src.stats().requests, 1, "a missing object is not retried");
        assert_eq!(src.stats().failures, 1);
    }
}
