//! `ObjectStoreSource` against a real S3-compatible server on 127.0.0.1
//! (`s3s-fs`; see `tests/s3`): a memory image uploaded, restored through
//! the server (faults from many threads, fault-around, a warm prefetch, a
//! background fill) and checked byte for byte, with one GET per chunk; then
//! network faults through a proxy in front of the server (slow answers,
//! 500/503, connections dropped mid-body, short bodies): a few are
//! retried and the pages come right, more than the retries fail the page
//! through the server's failure policy with an error naming the object and
//! the byte range. Nothing waits longer than `BOUND`.

#![cfg(feature = "object-store")]

mod common;
mod s3;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use object_store::path::Path;
use object_store::ObjectStore;
use s3::proxy::{Fault, FaultProxy};
use s3::{Client, S3};
use tokio::runtime::Runtime;
use tokio_uffd::{
    error_chain, AsyncUffd, FailureAction, FailurePolicy, Features, Fill, ObjectReadError,
    ObjectStoreSource, ObjectStoreStats, PageSource, RecordedRegion, Region, RegisterMode, Server,
    ServerHandle, SourceHandler, SourceId, StatsSnapshot, Uffd, UffdBuilder, WorkingSet,
};

/// Pages of the image of the restore tests (4 MiB with 4 KiB pages).
const PAGES: usize = 1024;
/// Pages per chunk (one ranged GET) in the restore tests.
const CHUNK_PAGES: usize = 32;

/// An image uploaded to the S3 server under a key of its own.
struct Uploaded {
    s3: S3,
    rt: Runtime,
    key: Path,
    image: Vec<u8>,
}

impl Uploaded {
    /// The S3 server and `image(len)` uploaded for `test`; `None` (loudly)
    /// without a server.
    fn new(test: &str, len: usize) -> Option<Self> {
        let s3 = S3::get()?;
        let rt = multi_thread_rt();
        let key = s3.fresh_key(test);
        let image = image(len);
        rt.block_on(s3.upload(&key, &image));
        Some(Self { s3, rt, key, image })
    }

    /// A source over the image in `store` with `chunk`-byte chunks, its
    /// length read with a HEAD; `retries` of its own, 10 ms apart at first.
    fn source(&self, store: Arc<dyn ObjectStore>, chunk: usize, retries: u32) -> ObjectStoreSource {
        let open = ObjectStoreSource::builder(store, self.key.clone())
            .chunk_size(chunk as u64)
            .retries(retries, Duration::from_millis(10))
            .open();
        let source = self
            .rt
            .block_on(async { tokio::time::timeout(BOUND, open).await })
            .expect("the HEAD answered within the bound")
            .unwrap_or_else(|e| panic!("opening the source: {}", error_chain(&e)));
        assert_eq!(source.len(), self.image.len() as u64);
        source
    }
}

/// A server serving `mem` (`len` bytes) from `source`; a failure stops it
/// (`FailurePolicy::Stop`), so a read that fails in a test that expects
/// none ends the test with the error, not with a signal in this process.
fn object_server(
    uffd: Uffd,
    base: usize,
    len: usize,
    source: &ObjectStoreSource,
) -> Server<SourceHandler<ObjectStoreSource>> {
    Server::new(
        AsyncUffd::new(uffd).unwrap(),
        SourceHandler::new(source.clone()),
    )
    .regions([Region::new(base..base + len)])
    .unwrap()
    .on_failure(FailurePolicy::Stop)
}

/// Reads the first byte of every page in `pages` at `base` on `threads`
/// threads (never the runtime's) started together, thread `t` taking
/// every `threads`-th page from the `t`-th. Waits at most `BOUND`; if the
/// server stops first, panics with its error (leaving `mem` mapped, as a
/// faulting thread may still sleep on it).
fn fault_in(
    rt: &Runtime,
    handle: &mut ServerHandle,
    mem: Mapping,
    page: usize,
    pages: &[usize],
    threads: usize,
) -> Mapping {
    let start = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let mine: Vec<usize> = pages.iter().copied().skip(t).step_by(threads).collect();
            let (start, base) = (start.clone(), mem.addr);
            std::thread::spawn(move || {
                start.wait();
                for p in mine {
                    read_at(base + p * page);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + BOUND;
    while !workers.iter().all(|w| w.is_finished()) {
        if handle.is_finished() {
            let exit = rt.block_on(handle.join());
            std::mem::forget(mem);
            match exit {
                Err(e) => panic!("the server stopped: {}", error_chain(&e)),
                Ok(exit) => panic!("the server ended ({exit:?}) with faults waiting"),
            }
        }
        if Instant::now() > deadline {
            std::mem::forget(mem);
            panic!("the faulting threads did not finish within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for w in workers {
        w.join().unwrap();
    }
    mem
}

/// Checks `pages` of `mem` (resident by now) against the image, every byte.
fn check_pages(mem: &Mapping, image: &[u8], page: usize, pages: impl IntoIterator<Item = usize>) {
    let got = mem.slice();
    for p in pages {
        let range = p * page..(p + 1) * page;
        if let Some(i) = got[range.clone()]
            .iter()
            .zip(&image[range.clone()])
            .position(|(a, b)| a != b)
        {
            let at = range.start + i;
            panic!(
                "byte {at:#x} (page {p}) is {:#04x}, the image has {:#04x}",
                got[at], image[at]
            );
        }
    }
}

/// The chunk indexes (of `chunk_pages` pages) that `pages` touch.
fn chunks_of(pages: impl IntoIterator<Item = usize>, chunk_pages: usize) -> usize {
    let set: std::collections::BTreeSet<usize> =
        pages.into_iter().map(|p| p / chunk_pages).collect();
    set.len()
}

/// The source's counters with nothing failed and nothing retried, and as
/// many requests as `chunks`: one GET per chunk, none twice.
fn assert_one_get_per_chunk(s: &ObjectStoreStats, chunks: usize, chunk: usize) {
    assert_eq!(s.requests, chunks as u64, "one GET per chunk: {s:?}");
    assert_eq!(s.bytes_fetched, (chunks * chunk) as u64, "{s:?}");
    assert_eq!((s.retries, s.failures, s.evicted), (0, 0, 0), "{s:?}");
}

// ---------------------------------------------------------------------------
// Restores through a real S3 server
// ---------------------------------------------------------------------------

#[test]
fn many_threads_restore_every_byte_with_one_get_per_chunk() {
    let Some((uffd, mem)) = registered_anon(PAGES, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (len, chunk) = (PAGES * page, CHUNK_PAGES * page);
    let Some(up) = Uploaded::new("many-threads", len) else {
        return;
    };
    let source = up.source(up.s3.store(), chunk, 2);
    let mut handle = up
        .rt
        .block_on(async { object_server(uffd, mem.addr, len, &source).spawn() });
    // Eight threads, each touching every eighth page: every chunk is
    // faulted by all eight at about the same time.
    let all: Vec<usize> = (0..PAGES).collect();
    let mem = fault_in(&up.rt, &mut handle, mem, page, &all, 8);
    check_pages(&mem, &up.image, page, 0..PAGES);
    let stats = up.rt.block_on(final_stats(handle));
    assert_eq!(stats.pages_served, PAGES as u64, "{stats:?}");
    assert_eq!(stats.handler_failures, 0, "{stats:?}");
    let s = source.stats();
    assert_one_get_per_chunk(&s, PAGES / CHUNK_PAGES, chunk);
    // The other faults of a chunk waited for its GET or found it cached.
    assert_eq!(
        s.joined + s.cache_hits,
        stats.faults_missing - s.requests,
        "{s:?} {stats:?}"
    );
    assert!(s.network_wait > Duration::ZERO, "{s:?}");
}

#[test]
fn fault_around_takes_one_fault_per_window_and_one_get_per_chunk() {
    let Some((uffd, mem)) = registered_anon(PAGES, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (len, chunk) = (PAGES * page, CHUNK_PAGES * page);
    let Some(up) = Uploaded::new("fault-around", len) else {
        return;
    };
    let source = up.source(up.s3.store(), chunk, 2);
    let mut handle = up.rt.block_on(async {
        object_server(uffd, mem.addr, len, &source)
            .prefetch(16)
            .spawn()
    });
    // One thread in address order: a fault at the start of each window of
    // 16 pages, which brings in the other 15.
    let all: Vec<usize> = (0..PAGES).collect();
    let mem = fault_in(&up.rt, &mut handle, mem, page, &all, 1);
    check_pages(&mem, &up.image, page, 0..PAGES);
    let stats = up.rt.block_on(final_stats(handle));
    assert_eq!(stats.faults_missing, (PAGES / 16) as u64, "{stats:?}");
    assert_eq!(stats.pages_served, PAGES as u64, "{stats:?}");
    let s = source.stats();
    assert_one_get_per_chunk(&s, PAGES / CHUNK_PAGES, chunk);
    // Two windows per chunk: the second found the chunk cached.
    assert_eq!(
        s.cache_hits,
        (PAGES / 16 - PAGES / CHUNK_PAGES) as u64,
        "{s:?}"
    );
}

/// A working set of one region of `pages` pages: the runs `(first, pages)`.
fn working_set(pages: usize, page: usize, runs: &[(u64, u64)]) -> WorkingSet {
    let mut ws = WorkingSet::new(vec![RecordedRegion {
        source: SourceId::new(0),
        offset: 0,
        len: (pages * page) as u64,
        page_size: page as u64,
    }]);
    for &(first, n) in runs {
        ws.push(0, first, n).unwrap();
    }
    ws
}

#[test]
fn a_warm_prefetch_fetches_the_working_set_and_its_pages_take_no_fault() {
    let Some((uffd, mem)) = registered_anon(PAGES, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (len, chunk) = (PAGES * page, CHUNK_PAGES * page);
    let Some(up) = Uploaded::new("warm", len) else {
        return;
    };
    let runs = [(700, 10), (100, 40), (3, 1), (1000, 24)];
    let set: Vec<usize> = runs
        .iter()
        .flat_map(|&(first, n)| first as usize..(first + n) as usize)
        .collect();
    let source = up.source(up.s3.store(), chunk, 2);
    let mut handle = up.rt.block_on(async {
        object_server(uffd, mem.addr, len, &source)
            .warm(working_set(PAGES, page, &runs))
            .unwrap()
            .background_concurrency(4)
            .spawn()
    });
    wait_until("the working set prefetched", || {
        handle.stats().pages_warmed == set.len() as u64 || handle.is_finished()
    });
    // Touching the set now takes no fault; two pages outside it do.
    let mem = fault_in(&up.rt, &mut handle, mem, page, &set, 4);
    let mem = fault_in(&up.rt, &mut handle, mem, page, &[500, 2], 2);
    check_pages(&mem, &up.image, page, set.iter().copied().chain([500, 2]));
    let stats = up.rt.block_on(final_stats(handle));
    assert_eq!(stats.pages_warmed, set.len() as u64, "{stats:?}");
    assert_eq!(stats.faults_missing, 2, "{stats:?}");
    let s = source.stats();
    // Pages 2 and 3 share chunk 0; page 500 has a chunk of its own.
    let chunks = chunks_of(set.iter().copied().chain([500, 2]), CHUNK_PAGES);
    assert_one_get_per_chunk(&s, chunks, chunk);
}

#[test]
fn a_background_fill_makes_every_page_resident_with_one_get_per_chunk() {
    let Some((uffd, mem)) = registered_anon(PAGES, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (len, chunk) = (PAGES * page, CHUNK_PAGES * page);
    let Some(up) = Uploaded::new("fill", len) else {
        return;
    };
    let source = up.source(up.s3.store(), chunk, 2);
    let handle = up.rt.block_on(async {
        object_server(uffd, mem.addr, len, &source)
            .fill(Fill::Unbounded)
            // Copies of half a chunk, four at a time: two of them often
            // wait on one GET.
            .background_chunk(CHUNK_PAGES / 2 * page)
            .background_concurrency(4)
            .spawn()
    });
    let after = up.rt.block_on(async {
        tokio::time::timeout(BOUND, handle.resident())
            .await
            .expect("resident within the bound")
            .unwrap_or_else(|e| panic!("{}", error_chain(&e)))
    });
    eprintln!("4 MiB resident from S3 after {after:?}");
    // Every page is in: reading them takes no fault.
    check_pages(&mem, &up.image, page, 0..PAGES);
    let stats = up.rt.block_on(final_stats(handle));
    assert_eq!(stats.pages_filled, PAGES as u64, "{stats:?}");
    assert_eq!(stats.faults_missing, 0, "{stats:?}");
    assert_eq!(stats.background_failures, 0, "{stats:?}");
    let s = source.stats();
    assert_one_get_per_chunk(&s, PAGES / CHUNK_PAGES, chunk);
    assert_eq!(
        s.joined + s.cache_hits,
        (PAGES / CHUNK_PAGES) as u64,
        "{s:?}"
    );
}

#[test]
fn a_missing_object_is_refused_naming_it() {
    let Some(s3) = S3::get() else {
        return;
    };
    let rt = multi_thread_rt();
    let key = s3.fresh_key("missing");
    let open = ObjectStoreSource::builder(s3.store(), key.clone()).open();
    let err = rt
        .block_on(async { tokio::time::timeout(BOUND, open).await })
        .expect("an answer within the bound")
        .unwrap_err();
    assert!(matches!(err, ObjectReadError::Head { .. }), "{err:?}");
    let chain = error_chain(&err);
    assert!(chain.contains(&format!("/{key}")), "{chain}");
    assert!(chain.contains("not found"), "{chain}");
    eprintln!("{chain}");
}

// ---------------------------------------------------------------------------
// Network faults, through a proxy in front of the server
// ---------------------------------------------------------------------------

/// Pages of the image of the fault tests, and per chunk.
const FAULT_PAGES: usize = 128;
const FAULT_CHUNK_PAGES: usize = 16;

/// The image uploaded (straight to the server) and a fault proxy in front
/// of the server.
struct Faulty {
    up: Uploaded,
    proxy: FaultProxy,
    page: usize,
}

impl Faulty {
    fn new(test: &str) -> Option<Self> {
        let page = page_size();
        let up = Uploaded::new(test, FAULT_PAGES * page)?;
        let proxy = FaultProxy::start(up.s3.addr());
        Some(Self { up, proxy, page })
    }

    fn chunk(&self) -> usize {
        FAULT_CHUNK_PAGES * self.page
    }

    /// A source reading through the proxy with `client`'s retries and
    /// timeout, and `retries` of its own.
    fn source(&self, client: Client, retries: u32) -> ObjectStoreSource {
        let store = self.up.s3.store_via(&self.proxy.endpoint(), client);
        self.up.source(store, self.chunk(), retries)
    }

    /// The `Range` header of a GET of chunk `idx`, as object_store sends it.
    fn range(&self, idx: usize) -> String {
        let c = self.chunk();
        format!("bytes={}-{}", idx * c, (idx + 1) * c - 1)
    }

    /// Restores the first page of chunks `0..chunks` through `source`, one
    /// thread per chunk, all at once, and checks every byte of those
    /// pages. Returns how long the reads took.
    fn restore_chunks(&self, source: &ObjectStoreSource, chunks: usize) -> Duration {
        let (uffd, mem) = registered_anon(FAULT_PAGES, Features::empty())
            .expect("a userfaultfd (the test got one before)");
        let len = FAULT_PAGES * self.page;
        let rt = &self.up.rt;
        let mut handle = rt.block_on(async { object_server(uffd, mem.addr, len, source).spawn() });
        let pages: Vec<usize> = (0..chunks).map(|c| c * FAULT_CHUNK_PAGES).collect();
        let started = Instant::now();
        let mem = fault_in(rt, &mut handle, mem, self.page, &pages, chunks);
        let took = started.elapsed();
        check_pages(&mem, &self.up.image, self.page, pages.iter().copied());
        let stats = rt.block_on(final_stats(handle));
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
        took
    }
}

/// Whether the kernel can poison pages (the failure tests need it); says
/// so loudly if not.
fn can_poison() -> bool {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return false;
    };
    if !uffd.available_features().contains(Features::POISON) {
        skip("kernel lacks UFFD_FEATURE_POISON (6.6+)");
        return false;
    }
    true
}

/// Child entry point: creates a uffd for 4 pages of its own memory, sends
/// it and their address over the Unix socket named in the environment,
/// and reads page 0, which the parent fails to fetch: `SIGBUS` here. Exits
/// 0 if it survives with the right byte, 3 with a wrong one.
#[test]
#[ignore = "child entry point, run by the tests whose GETs fail for good"]
fn child_object_reader_entry() {
    let Ok(path) = std::env::var("TOKIO_UFFD_SOCKET") else {
        return;
    };
    let uffd = UffdBuilder::new().create().unwrap();
    let page = uffd.page_size();
    let mem = Mapping::anon(4 * page);
    // SAFETY: fresh mapping served by the parent.
    unsafe { uffd.register(mem.addr, 4 * page, RegisterMode::MISSING) }.unwrap();
    let sock = UnixStream::connect(path).unwrap();
    send_fd(&sock, uffd.as_raw_fd(), &mem.addr.to_ne_bytes());
    let v = read_at(mem.addr + 1); // SIGBUS here
    eprintln!("survived a read whose GETs all failed: read {v:#04x}");
    std::process::exit(if v == image_byte(1) { 0 } else { 3 });
}

/// Serves the first 4 pages of the image to a child process from `source`
/// (`FailurePolicy::Poison`); the child reads page 0. Returns how the
/// child ended, the server's first failure as an error chain, and the
/// server's statistics.
fn poisoned_in_child(
    f: &Faulty,
    source: &ObjectStoreSource,
    test: &str,
) -> (std::process::ExitStatus, String, StatsSnapshot) {
    let dir = std::env::temp_dir();
    let sock_path = dir.join(format!("tokio-uffd-objstore-{test}-{}", std::process::id()));
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_object_reader_entry",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("TOKIO_UFFD_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOUND;
    let sock = loop {
        match listener.accept() {
            Ok((sock, _)) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("the child ended ({status}) before connecting");
                }
                if Instant::now() > deadline {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    panic!("the child did not connect within {BOUND:?}");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    let _ = std::fs::remove_file(&sock_path);
    sock.set_nonblocking(false).unwrap();
    let (fd, data) = recv_fd(&sock);
    let addr = usize::from_ne_bytes(data[..8].try_into().unwrap());
    let uffd = Uffd::from_fd(fd).unwrap();
    let page = f.page;
    f.up.rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(source.clone()),
        )
        .regions([Region::new(addr..addr + 4 * page)])
        .unwrap()
        .on_failure(FailurePolicy::Poison)
        .spawn();
        let stats = handle.stats_ref();
        let deadline = Instant::now() + BOUND;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("the child did not end within {BOUND:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // The server may have seen the child go (ServerExit::ProcessExited).
        tokio::time::timeout(BOUND, handle.shutdown())
            .await
            .expect("the server stopped within the bound")
            .unwrap();
        let first = stats.first_failure().expect("a failure recorded");
        assert_eq!(
            first.action,
            FailureAction::Poisoned,
            "{}",
            error_chain(&first)
        );
        assert_eq!(first.offset, 0, "{}", error_chain(&first));
        (status, error_chain(&first), stats.snapshot())
    })
}

/// Checks that a read failed for good through the policy: the child got
/// `SIGBUS`, and the failure names the object and chunk 0's byte range.
fn assert_failed_for_good(
    f: &Faulty,
    source: &ObjectStoreSource,
    status: std::process::ExitStatus,
    chain: &str,
) {
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{chain}");
    let object = source.object();
    assert!(object.contains(f.up.key.as_ref()), "{object}");
    let range = format!("{object} bytes 0..{}", f.chunk());
    assert!(chain.contains(&range), "no {range:?} in: {chain}");
    let s = source.stats();
    assert_eq!(s.failures, 1, "{s:?}");
    assert_eq!(s.bytes_fetched, 0, "{s:?}");
}

#[test]
fn a_slow_server_is_waited_for_and_its_reads_overlap() {
    let Some(f) = Faulty::new("slow") else {
        return;
    };
    let delay = Duration::from_millis(400);
    f.proxy.inject(Fault::Delay(delay), usize::MAX);
    let source = f.source(Client::default(), 0);
    let chunks = FAULT_PAGES / FAULT_CHUNK_PAGES;
    let took = f.restore_chunks(&source, chunks);
    let s = source.stats();
    eprintln!("{chunks} chunks, each answer {delay:?} late: {took:?}; {s:?}");
    assert!(took >= delay, "{took:?}");
    // Eight GETs in flight at once, not one after the other.
    assert!(took < delay * chunks as u32 / 2, "{took:?}");
    assert!(s.network_wait >= delay, "{s:?}");
    assert_eq!((s.requests, s.retries), (chunks as u64, 0), "{s:?}");
    assert_eq!(f.proxy.faulted(), chunks);
}

#[test]
fn an_answer_slower_than_the_client_timeout_is_asked_again() {
    let Some(f) = Faulty::new("slow-once") else {
        return;
    };
    // The first GET would take 5 s; the client gives up after 1 s and
    // asks again, and the second GET is answered at once.
    f.proxy.inject(Fault::Delay(Duration::from_secs(5)), 1);
    let client = Client {
        max_retries: 2,
        timeout: Duration::from_secs(1),
    };
    let source = f.source(client, 0);
    let took = f.restore_chunks(&source, 1);
    let s = source.stats();
    eprintln!("recovered from a timeout in {took:?}: {s:?}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let gets = f.proxy.gets();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert!(
        gets.iter().all(|g| g.range.as_deref() == Some(&f.range(0))),
        "{gets:?}"
    );
    // The client's retry: one request as the source counts them.
    assert_eq!((s.requests, s.retries, s.failures), (1, 0, 0), "{s:?}");
}

#[test]
fn a_server_always_slower_than_the_timeout_fails_the_page() {
    if !can_poison() {
        return;
    }
    let Some(f) = Faulty::new("slow-always") else {
        return;
    };
    f.proxy
        .inject(Fault::Delay(Duration::from_secs(5)), usize::MAX);
    let client = Client {
        max_retries: 1,
        timeout: Duration::from_millis(200),
    };
    let source = f.source(client, 1);
    let started = Instant::now();
    let (status, chain, _) = poisoned_in_child(&f, &source, "slow-always");
    eprintln!("after {:?}: {chain}", started.elapsed());
    assert_failed_for_good(&f, &source, status, &chain);
    assert!(chain.contains("failed after 2 attempts"), "{chain}");
    assert!(chain.contains("timed out"), "{chain}");
    // (1 + 1 client retry) x (1 + 1 source retry).
    assert_eq!(f.proxy.gets().len(), 4, "{:?}", f.proxy.gets());
    let s = source.stats();
    assert_eq!((s.requests, s.retries), (2, 1), "{s:?}");
}

#[test]
fn server_errors_a_few_times_are_retried_by_the_source() {
    let Some(f) = Faulty::new("status-source") else {
        return;
    };
    // No retries in the client: the source's own retry the 503s.
    f.proxy.inject(Fault::Status(503), 2);
    let client = Client {
        max_retries: 0,
        ..Client::default()
    };
    let source = f.source(client, 3);
    f.restore_chunks(&source, 1);
    let s = source.stats();
    eprintln!("recovered from two 503s: {s:?}");
    assert_eq!((s.requests, s.retries, s.failures), (3, 2, 0), "{s:?}");
    assert_eq!(s.bytes_fetched, f.chunk() as u64, "{s:?}");
    let gets = f.proxy.gets();
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert_eq!(f.proxy.faulted(), 2);
}

#[test]
fn server_errors_a_few_times_are_retried_by_the_client() {
    let Some(f) = Faulty::new("status-client") else {
        return;
    };
    f.proxy.inject(Fault::Status(500), 2);
    let source = f.source(
        Client {
            max_retries: 3,
            ..Client::default()
        },
        0,
    );
    f.restore_chunks(&source, 1);
    let s = source.stats();
    // The client asked three times; the source once.
    assert_eq!((s.requests, s.retries, s.failures), (1, 0, 0), "{s:?}");
    assert_eq!(f.proxy.gets().len(), 3, "{:?}", f.proxy.gets());
    assert_eq!(f.proxy.faulted(), 2);
}

#[test]
fn server_errors_beyond_the_retries_fail_the_page_naming_object_and_range() {
    if !can_poison() {
        return;
    }
    let Some(f) = Faulty::new("status-always") else {
        return;
    };
    f.proxy.inject(Fault::Status(503), usize::MAX);
    let client = Client {
        max_retries: 1,
        ..Client::default()
    };
    let source = f.source(client, 2);
    let (status, chain, stats) = poisoned_in_child(&f, &source, "status-always");
    eprintln!("{chain}");
    assert_failed_for_good(&f, &source, status, &chain);
    assert!(chain.contains("failed after 3 attempts"), "{chain}");
    assert!(chain.contains("503"), "{chain}");
    assert_eq!(stats.poisoned, 1, "{stats:?}");
    // (1 + 1 client retry) x (1 + 2 source retries), and no more.
    assert_eq!(f.proxy.gets().len(), 6, "{:?}", f.proxy.gets());
    let s = source.stats();
    assert_eq!((s.requests, s.retries), (3, 2), "{s:?}");
}

#[test]
fn a_body_cut_once_is_resumed_by_the_client_from_where_it_stopped() {
    let Some(f) = Faulty::new("cut-client") else {
        return;
    };
    f.proxy.inject(Fault::Cut, 1);
    let source = f.source(Client::default(), 0);
    f.restore_chunks(&source, 1);
    let s = source.stats();
    assert_eq!((s.requests, s.retries, s.failures), (1, 0, 0), "{s:?}");
    // The second GET asks only for the half the first did not deliver.
    let gets = f.proxy.gets();
    let c = f.chunk();
    let rest = format!("bytes={}-{}", c / 2, c - 1);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some(f.range(0).as_str()),
        "{gets:?}"
    );
    assert_eq!(gets[1].range.as_deref(), Some(rest.as_str()), "{gets:?}");
}

#[test]
fn bodies_cut_a_few_times_are_fetched_again_by_the_source() {
    let Some(f) = Faulty::new("cut-source") else {
        return;
    };
    f.proxy.inject(Fault::Cut, 2);
    let client = Client {
        max_retries: 0,
        ..Client::default()
    };
    let source = f.source(client, 3);
    f.restore_chunks(&source, 1);
    let s = source.stats();
    eprintln!("recovered from two cut bodies: {s:?}");
    assert_eq!((s.requests, s.retries, s.failures), (3, 2, 0), "{s:?}");
    let gets = f.proxy.gets();
    assert_eq!(gets.len(), 3, "{gets:?}");
    // Each try asks for the whole chunk again.
    assert!(
        gets.iter().all(|g| g.range.as_deref() == Some(&f.range(0))),
        "{gets:?}"
    );
}

#[test]
fn bodies_always_cut_fail_the_page_naming_object_and_range() {
    if !can_poison() {
        return;
    }
    let Some(f) = Faulty::new("cut-always") else {
        return;
    };
    f.proxy.inject(Fault::Cut, usize::MAX);
    let client = Client {
        max_retries: 1,
        ..Client::default()
    };
    let source = f.source(client, 1);
    let (status, chain, _) = poisoned_in_child(&f, &source, "cut-always");
    eprintln!("{chain}");
    assert_failed_for_good(&f, &source, status, &chain);
    assert!(chain.contains("failed after 2 attempts"), "{chain}");
    // Each source attempt: the GET, and the client's one resumption.
    assert_eq!(f.proxy.gets().len(), 4, "{:?}", f.proxy.gets());
    let s = source.stats();
    assert_eq!((s.requests, s.retries), (2, 1), "{s:?}");
}

#[test]
fn short_bodies_a_few_times_are_fetched_again_by_the_source() {
    let Some(f) = Faulty::new("short-source") else {
        return;
    };
    f.proxy.inject(Fault::Short, 2);
    // The client's retries do not help: the framing is consistent, only
    // the source sees that the length is wrong.
    let source = f.source(Client::default(), 3);
    f.restore_chunks(&source, 1);
    let s = source.stats();
    eprintln!("recovered from two short bodies: {s:?}");
    assert_eq!((s.requests, s.retries, s.failures), (3, 2, 0), "{s:?}");
    // Only the whole answer's bytes count as fetched.
    assert_eq!(s.bytes_fetched, f.chunk() as u64, "{s:?}");
    assert_eq!(f.proxy.gets().len(), 3, "{:?}", f.proxy.gets());
}

#[test]
fn short_bodies_beyond_the_retries_fail_the_page_naming_object_and_range() {
    if !can_poison() {
        return;
    }
    let Some(f) = Faulty::new("short-always") else {
        return;
    };
    f.proxy.inject(Fault::Short, usize::MAX);
    let source = f.source(Client::default(), 2);
    let (status, chain, _) = poisoned_in_child(&f, &source, "short-always");
    eprintln!("{chain}");
    assert_failed_for_good(&f, &source, status, &chain);
    let c = f.chunk();
    let what = format!("{} bytes came back, not {c}, after 3 attempts", c / 2);
    assert!(chain.contains(&what), "no {what:?} in: {chain}");
    assert_eq!(f.proxy.gets().len(), 3, "{:?}", f.proxy.gets());
    let s = source.stats();
    assert_eq!((s.requests, s.retries), (3, 2), "{s:?}");
}

#[test]
fn the_proxy_passes_reads_through_untouched_when_told_nothing() {
    let Some(f) = Faulty::new("clean") else {
        return;
    };
    let source = f.source(Client::default(), 0);
    let chunks = FAULT_PAGES / FAULT_CHUNK_PAGES;
    f.restore_chunks(&source, chunks);
    let s = source.stats();
    assert_one_get_per_chunk(&s, chunks, f.chunk());
    let gets = f.proxy.gets();
    assert_eq!(gets.len(), chunks, "{gets:?}");
    assert_eq!(f.proxy.faulted(), 0);
    let mut ranges: Vec<_> = gets.into_iter().filter_map(|g| g.range).collect();
    ranges.sort_by_key(|r| {
        r.trim_start_matches("bytes=")
            .split('-')
            .next()
            .unwrap()
            .parse::<usize>()
            .unwrap()
    });
    let want: Vec<_> = (0..chunks).map(|i| f.range(i)).collect();
    assert_eq!(ranges, want);
}

#[test]
fn a_fetch_cut_off_by_the_end_of_its_runtime_is_made_again() {
    let Some(f) = Faulty::new("runtime-ends") else {
        return;
    };
    // The first GET hangs for 5 s; its runtime ends meanwhile.
    f.proxy.inject(Fault::Delay(Duration::from_secs(5)), 1);
    let source = f.source(Client::default(), 0);
    // A runtime on this thread: its tasks run only inside `block_on`, so
    // once that returns, dropping it drops the fetch unfinished (never
    // woken by its connection closing, which would fail it instead).
    let first = current_thread_rt();
    let reader = source.clone();
    first.spawn(async move {
        let mut buf = vec![0u8; page_size()];
        reader.read_at(0, &mut buf).await
    });
    first.block_on(async {
        let deadline = Instant::now() + BOUND;
        while f.proxy.gets().is_empty() {
            assert!(Instant::now() < deadline, "no GET within {BOUND:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    drop(first);
    // The next read of that chunk, on another runtime, fetches it again
    // (and is not handed the end of the first one).
    let mut buf = vec![0u8; page_size()];
    let read = source.read_at(0, &mut buf);
    f.up.rt
        .block_on(async { tokio::time::timeout(BOUND, read).await })
        .expect("the read ended within the bound")
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    assert_eq!(buf, f.up.image[..buf.len()]);
    assert_eq!(f.proxy.gets().len(), 2, "{:?}", f.proxy.gets());
    let s = source.stats();
    assert_eq!((s.requests, s.failures), (2, 0), "{s:?}");
}
