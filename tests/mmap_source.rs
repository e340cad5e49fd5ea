//! `MmapSource` against the real kernel: a snapshot file served byte for
//! byte through the server (warm from the mapping without a task, cold
//! through `read_at` on the blocking pool), files that are not regular
//! refused, a file truncated under the source failing its faults through
//! the failure policy (never a signal in the serving process), and the
//! kernel fact behind that: `UFFDIO_COPY` from a mapping past the end of
//! its file fails with `EFAULT`, where a read in user space gets `SIGBUS`.

#![cfg(feature = "async")]

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use common::*;
use tokio_uffd::{
    error_chain, AsyncUffd, CopyFlags, FailureAction, FailurePolicy, FaultHandler, FaultRequest,
    Features, FileSource, HandlerError, MmapSource, PageSource, Region, RegisterMode, Resolution,
    Server, SourceHandler, Uffd, UffdBuilder,
};

/// A fresh directory under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tokio-uffd-mmap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `data` to `path`, synced to the disk.
fn write_synced(path: &Path, data: &[u8]) -> File {
    std::fs::write(path, data).unwrap();
    let file = File::open(path).unwrap();
    file.sync_all().unwrap();
    file
}

/// Drops the (clean) pages of `file` from the page cache.
fn evict(file: &File) {
    nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

/// Opens `path` as an `MmapSource`.
fn open(path: &Path) -> MmapSource {
    // SAFETY: the tests' files change only where a test truncates one on
    // purpose, to see the server fail those faults; no test reads a slice
    // of the mapping past the end of its file.
    unsafe { MmapSource::open(path) }.unwrap()
}

/// Whether eviction worked: says loudly why the test cannot check the cold
/// page cache when it did not (tmpfs keeps every page in memory; the
/// kernel hides residency of files the process does not own).
fn evicted(source: &MmapSource, offset: u64, len: usize) -> bool {
    if source.bytes_at(offset, len).is_none() {
        return true;
    }
    eprintln!(
        "\n*** NOT CHECKED: POSIX_FADV_DONTNEED left {} in the page cache \
         (tmpfs?), so the cold-cache path cannot be tested here ***\n",
        std::env::temp_dir().display()
    );
    false
}

/// A handler around `SourceHandler<MmapSource>` that counts the calls of
/// `fault` (the runs `bytes_for` did not have: a task and `read_at`).
struct Counted {
    inner: SourceHandler<MmapSource>,
    reads: AtomicUsize,
}

impl FaultHandler for Counted {
    fn bytes_for(&self, req: &FaultRequest) -> Option<&[u8]> {
        self.inner.bytes_for(req)
    }

    async fn fault<'a>(
        &'a self,
        req: &'a FaultRequest,
        buf: &'a mut [u8],
    ) -> Result<Resolution, HandlerError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.fault(req, buf).await
    }
}

/// Every page of `pages`, in an order of its own for each `seed`.
fn shuffled(pages: usize, seed: u64) -> Vec<usize> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (seed + 1);
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order
}

/// Serves `len` bytes of registered memory from `source` (at `offset` in
/// it) with a fault-around window of 8 pages, touched by 4 threads in
/// random orders; checks every byte against `expected` and returns how
/// many runs went through `read_at`.
fn serve_and_check(
    uffd: Uffd,
    source: MmapSource,
    offset: u64,
    len: usize,
    expected: impl Fn(usize) -> u8 + Send + Sync + 'static,
) -> usize {
    let page = uffd.page_size();
    let mem = Mapping::anon(len);
    // SAFETY: a fresh mapping served by the server below.
    unsafe { uffd.register(mem.addr, len, RegisterMode::MISSING) }.unwrap();
    let handler = Arc::new(Counted {
        inner: SourceHandler::new(source),
        reads: AtomicUsize::new(0),
    });
    let expected = Arc::new(expected);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler.clone())
            .regions([Region::new(mem.addr..mem.addr + len).with_offset(offset)])
            .unwrap()
            .prefetch(8)
            .spawn();
        let base = mem.addr;
        let pages = len / page;
        let touchers: Vec<_> = (0..4u64)
            .map(|t| {
                let expected = expected.clone();
                thread::spawn(move || {
                    for p in shuffled(pages, t) {
                        let off = p * page + (p * 7 + t as usize) % page;
                        assert_eq!(read_at(base + off), expected(off), "byte at {off:#x}");
                    }
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            for t in touchers {
                join_bounded("a toucher", t);
            }
        })
        .await
        .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.pages_served, pages as u64, "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
    });
    for (i, &b) in mem.slice().iter().enumerate() {
        assert_eq!(b, expected(i), "byte at {i:#x} once every page is served");
    }
    handler.reads.load(Ordering::SeqCst)
}

/// The snapshot of these tests: `prefix` pages of 0xee, then the test
/// image, `tail_short` bytes shorter than `len` (so its last page is
/// partly past the end of the file).
fn snapshot(dir: &TempDir, prefix: usize, len: usize, tail_short: usize) -> (PathBuf, File) {
    let page = page_size();
    let mut data = vec![0xeeu8; prefix * page];
    data.extend_from_slice(&image(len - tail_short));
    let path = dir.path("snapshot");
    let file = write_synced(&path, &data);
    (path, file)
}

#[test]
fn a_warm_file_is_served_byte_for_byte_straight_from_the_mapping() {
    let Some(uffd) = try_uffd(UffdBuilder::new().want(Features::EVENT_REMOVE)) else {
        return;
    };
    let page = uffd.page_size();
    let len = 8 << 20;
    let dir = TempDir::new("warm");
    let (path, _file) = snapshot(&dir, 3, len, 100);
    let source = open(&path);
    assert_eq!(source.len(), (3 * page + len - 100) as u64);
    let expected = move |off: usize| if off < len - 100 { image_byte(off) } else { 0 };
    let reads = serve_and_check(uffd, source, 3 * page as u64, len, expected);
    // Just written, the whole file is in the page cache: every run (the
    // last, partial page too) was copied from the mapping on the reader.
    assert_eq!(reads, 0, "runs read through read_at from a warm file");
}

#[test]
fn a_cold_file_is_read_on_the_blocking_pool_then_served_from_the_mapping() {
    let Some(uffd) = try_uffd(UffdBuilder::new().want(Features::EVENT_REMOVE)) else {
        return;
    };
    let page = uffd.page_size();
    let len = 8 << 20;
    let dir = TempDir::new("cold");
    let (path, file) = snapshot(&dir, 1, len, 0);
    let source = open(&path);
    evict(&file);
    if !evicted(&source, page as u64, page) {
        return;
    }
    let reads = serve_and_check(uffd, source, page as u64, len, image_byte);
    // The first faults found the file out of memory and went to read_at;
    // its reads (and the kernel's read-ahead) brought pages back, which
    // later faults copied from the mapping.
    assert!(reads >= 1, "no run went through read_at from a cold file");
    eprintln!("cold file: {reads} runs went through read_at");
}

#[tokio::test]
async fn bytes_at_answers_none_for_pages_out_of_memory_until_read_at_reads_them() {
    let page = page_size();
    let dir = TempDir::new("residency");
    let data = image(16 * page);
    let path = dir.path("image");
    let file = write_synced(&path, &data);
    let source = open(&path);
    // Written: in memory. (Not read here: pages mapped into this process
    // by a read of the mapping are not evicted.)
    assert!(source.bytes_at(8 * page as u64, 2 * page).is_some());
    evict(&file);
    if !evicted(&source, 4 * page as u64, 2 * page) {
        return;
    }
    // One page out of memory in a run is enough for None.
    assert!(source.bytes_at(5 * page as u64, page).is_none());
    assert!(source.bytes_at(3 * page as u64, 3 * page).is_none());
    let mut buf = vec![0u8; 2 * page];
    source.read_at(4 * page as u64, &mut buf).await.unwrap();
    assert_eq!(buf, &data[4 * page..6 * page]);
    // read_at brought the run into the page cache.
    assert_eq!(
        source.bytes_at(4 * page as u64, 2 * page).unwrap(),
        &data[4 * page..6 * page]
    );
}

#[test]
fn what_is_not_a_regular_file_is_refused_naming_it() {
    let dir = TempDir::new("kinds");
    let check = |err: std::io::Error, name: &str, what: &str| {
        let msg = err.to_string();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{msg}");
        assert!(msg.contains(&format!("{name} is {what}")), "{msg}");
        assert!(
            msg.contains("an MmapSource serves pages from a regular file"),
            "{msg}"
        );
    };
    let shown = dir.0.display().to_string();
    check(refused(&dir.0), &shown, "a directory");
    let opened = File::open(&dir.0).unwrap();
    // SAFETY: a directory, refused before anything is mapped.
    let err = unsafe { MmapSource::new(opened) }.unwrap_err();
    check(err, &shown, "a directory");
    // A FIFO without a writer: refused at once, not waited on.
    let fifo = dir.path("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    check(refused(&fifo), "pipe", "a FIFO");
    let sock = dir.path("sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    check(refused(&sock), "sock", "a socket");
    check(
        refused(Path::new("/dev/null")),
        "/dev/null",
        "a character device",
    );
    let err = refused(&dir.path("missing"));
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

/// The error of opening `path` as an `MmapSource`, which must fail.
fn refused(path: &Path) -> std::io::Error {
    // SAFETY: the open fails before anything is mapped (the test's
    // expectation; a source built by mistake is dropped unread).
    unsafe { MmapSource::open(path) }.unwrap_err()
}

// ---------------------------------------------------------------------------
// A file truncated under the source
// ---------------------------------------------------------------------------

/// Child entry point: creates a uffd for 4 pages of its own memory, sends
/// it and their address over the Unix socket named in the environment,
/// reads page 0 (exit 3 if its byte is wrong), then page 2, which must
/// kill it with `SIGBUS`; exits 0 if it survives.
#[test]
#[ignore = "child entry point, run by a_truncated_file_fails_the_faults_past_its_end"]
fn child_truncated_toucher_entry() {
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
    if read_at(mem.addr + 1) != image_byte(1) {
        std::process::exit(3);
    }
    let v = read_at(mem.addr + 2 * page); // SIGBUS here
    eprintln!("survived a fault past the end of a truncated file: read {v}");
    std::process::exit(0);
}

/// How the source meets the page past the end of the truncated file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    /// Out of the page cache: `bytes_at` says `None`, `read_at` finds the
    /// file short.
    Cold,
    /// Found resident before the truncation and remembered: `bytes_at`
    /// hands out the slice and the `UFFDIO_COPY` from it fails.
    Remembered,
}

/// Serves 4 pages of a child process's memory from an image file
/// truncated to one page after the source was opened; returns how the
/// child ended and the server's first failure.
fn serve_a_truncated_file(how: Past) -> Option<(std::process::ExitStatus, String, u64)> {
    let page = page_size();
    let dir = TempDir::new(&format!("truncated-{how:?}"));
    let path = dir.path("image");
    let file = write_synced(&path, &image(4 * page));
    let source = open(&path);
    match how {
        Past::Cold => {
            evict(&file);
            if !evicted(&source, 2 * page as u64, page) {
                return None;
            }
        }
        // Only asked for, never read: the slice is what the server gets.
        Past::Remembered => assert!(source.bytes_at(2 * page as u64, page).is_some()),
    }
    // Breaks `open`'s promise on purpose: the file shrinks under the source.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(page as u64)
        .unwrap();

    let sock_path = dir.path("sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_truncated_toucher_entry",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("TOKIO_UFFD_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (sock, _) = listener.accept().unwrap();
    let (fd, data) = recv_fd(&sock);
    let addr = usize::from_ne_bytes(data[..8].try_into().unwrap());
    let uffd = Uffd::from_fd(fd).unwrap();
    let rt = multi_thread_rt();
    let (failure, action, offset) = rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), SourceHandler::new(source))
            .regions([Region::new(addr..addr + 4 * page)])
            .unwrap()
            .on_failure(FailurePolicy::Poison)
            .spawn();
        let stats = handle.stats_ref();
        let deadline = Instant::now() + BOUND;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the child did not end within {BOUND:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // The server may have seen the child go (ServerExit::ProcessExited).
        tokio::time::timeout(BOUND, handle.shutdown())
            .await
            .expect("the server did not stop")
            .unwrap();
        let first = stats.first_failure().expect("no failure recorded");
        (error_chain(&first), first.action, first.offset)
    });
    assert_eq!(action, FailureAction::Poisoned, "{failure}");
    Some((child.wait().unwrap(), failure, offset))
}

#[test]
fn a_truncated_file_fails_the_faults_past_its_end() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    if !uffd.available_features().contains(Features::POISON) {
        return skip("kernel lacks UFFD_FEATURE_POISON (6.6+)");
    }
    let page = page_size() as u64;
    for how in [Past::Cold, Past::Remembered] {
        let Some((status, failure, offset)) = serve_a_truncated_file(how) else {
            continue;
        };
        // The faulting thread (in the child) got SIGBUS from the poisoned
        // page; this process, which served it, got nothing.
        assert_eq!(
            status.signal(),
            Some(libc::SIGBUS),
            "{how:?}: {status:?}\n{failure}"
        );
        assert_eq!(offset, 2 * page, "{how:?}: {failure}");
        match how {
            Past::Cold => {
                let end = format!("ended at offset {:#x}", 2 * page);
                assert!(failure.contains(&end), "{failure}");
                let now = format!("it is {page:#x} bytes now");
                assert!(failure.contains(&now), "{failure}");
                assert!(
                    failure.contains("the file shrank while it was served"),
                    "{failure}"
                );
            }
            Past::Remembered => {
                assert!(failure.contains("UFFDIO_COPY"), "{failure}");
                assert!(failure.contains("os error 14"), "{failure}");
            }
        }
        eprintln!("{how:?}: {failure}");
    }
}

// ---------------------------------------------------------------------------
// The kernel fact: a copy from a mapping past the end of its file
// ---------------------------------------------------------------------------

/// Child entry point: maps a file of two pages, truncates it to one, and
/// resolves a missing page with `UFFDIO_COPY` from the mapping's second
/// page (past the end of the file now). Exits 0 if the copy fails with
/// `EFAULT` having copied nothing and the page is still missing after it
/// (a copy from the first page fills it); 10 if the copy succeeds, 11 for
/// another error, 12 if it reports progress, 13 and 14 if the page was not
/// missing afterwards. A `SIGBUS` kills it.
#[test]
#[ignore = "child entry point, run by a_copy_from_a_mapping_past_the_end_of_its_file_fails_with_efault"]
fn child_copy_past_the_end_entry() {
    let Ok(dir) = std::env::var("TOKIO_UFFD_DIR") else {
        return;
    };
    let (uffd, mem) = registered_anon(1, Features::empty()).unwrap();
    let page = uffd.page_size();
    let path = Path::new(&dir).join("image");
    std::fs::write(&path, image(2 * page)).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = Mapping::new(2 * page, libc::MAP_SHARED, file.as_raw_fd()).unwrap();
    file.set_len(page as u64).unwrap();
    // SAFETY: the second page of the mapping is past the end of the file
    // now, so reading it in user space raises SIGBUS; this slice is only
    // handed to the kernel (UFFDIO_COPY reads it there) and never read here.
    let past_end = unsafe { std::slice::from_raw_parts(map.ptr(page), page) };
    match uffd.copy(mem.addr, past_end, CopyFlags::empty()) {
        Ok(n) => {
            eprintln!("UFFDIO_COPY from past the end of the file copied {n:#x} bytes");
            std::process::exit(10);
        }
        Err(e) => {
            eprintln!("UFFDIO_COPY from past the end of the file: {e}");
            let errno = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .and_then(|s| s.raw_os_error());
            if errno != Some(libc::EFAULT) {
                std::process::exit(11);
            }
            if e.bytes_done() != 0 {
                std::process::exit(12);
            }
        }
    }
    // SAFETY: the first page of the mapping is inside the file.
    let inside = unsafe { std::slice::from_raw_parts(map.ptr(0), page) };
    if uffd.copy(mem.addr, inside, CopyFlags::empty()).ok() != Some(page) {
        std::process::exit(13);
    }
    if mem.read(5) != image_byte(5) {
        std::process::exit(14);
    }
    std::process::exit(0);
}

#[test]
fn a_copy_from_a_mapping_past_the_end_of_its_file_fails_with_efault() {
    if uffd_with(Features::empty()).is_none() {
        return;
    }
    let dir = TempDir::new("kernel-fact");
    let status = run_child_test(
        "child_copy_past_the_end_entry",
        &[("TOKIO_UFFD_DIR", dir.0.to_str().unwrap())],
    );
    assert_eq!(
        status.signal(),
        None,
        "UFFDIO_COPY from a mapping past the end of its file raised a signal: {status:?}"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "UFFDIO_COPY from past the end: not EFAULT with nothing copied (see the entry's codes)"
    );

    // The same bytes read in user space: SIGBUS (in a forked child).
    let page = page_size();
    let path = dir.path("user");
    std::fs::write(&path, image(2 * page)).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = Mapping::new(2 * page, libc::MAP_SHARED, file.as_raw_fd()).unwrap();
    file.set_len(page as u64).unwrap();
    let status = wait_child(fork_reader(map.addr + page));
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
        "a read past the end of the file in user space: wait status {status:#x}"
    );
    // Inside the file, the read works.
    let status = wait_child(fork_reader(map.addr + 5));
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), i32::from(image_byte(5)));
}

// ---------------------------------------------------------------------------
// A measurement (ignored): what the residency check costs and saves
// ---------------------------------------------------------------------------

/// Firecracker's way: slices of a mapping of the file, resident or not.
struct Unchecked {
    map: Mapping,
    len: usize,
}

impl PageSource for Unchecked {
    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        if start.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: inside the mapping of a file that the measurement never
        // changes.
        Some(unsafe { std::slice::from_raw_parts(self.map.ptr(start), len) })
    }

    async fn read_at(&self, offset: u64, _buf: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other(format!(
            "{offset:#x} is outside the mapping"
        )))
    }
}

/// Nanoseconds per iteration of `f` over `n` iterations: the median of 5
/// rounds.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    median((0..5).map(|_| {
        let t = Instant::now();
        for i in 0..n {
            f(i);
        }
        t.elapsed().as_nanos() as f64 / n as f64
    }))
}

fn median(xs: impl Iterator<Item = f64>) -> f64 {
    let mut xs: Vec<f64> = xs.collect();
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Microseconds per page for `threads` threads to touch every page of a
/// region served by `handler` (random orders, one byte a page, no window).
fn touch_all<H: FaultHandler>(handler: H, len: usize, threads: u64) -> f64 {
    let (uffd, mem) = registered_anon(len / page_size(), Features::empty()).unwrap();
    let page = uffd.page_size();
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
            .regions([Region::new(mem.addr..mem.addr + len)])
            .unwrap()
            .spawn();
        let base = mem.addr;
        let pages = len / page;
        let t = Instant::now();
        let touchers: Vec<_> = (0..threads)
            .map(|s| {
                thread::spawn(move || {
                    for p in shuffled(pages, s) {
                        assert_eq!(read_at(base + p * page), image_byte(p * page));
                    }
                })
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            for th in touchers {
                join_bounded("a toucher", th);
            }
        })
        .await
        .unwrap();
        let us = t.elapsed().as_secs_f64() * 1e6 / pages as f64;
        let stats = final_stats(handle).await;
        assert_eq!(stats.handler_failures, 0);
        us
    })
}

#[test]
#[ignore = "a measurement: cargo test --release --test mmap_source -- --ignored --nocapture measure"]
fn measure_the_residency_check() {
    if uffd_with(Features::empty()).is_none() {
        return;
    }
    let page = page_size();
    let len = 64 << 20;
    let pages = len / page;
    let dir = TempDir::new("measure");
    let path = dir.path("image");
    let data = image(len);
    write_synced(&path, &data);
    // Read and write: `Mapping` maps PROT_READ | PROT_WRITE.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let source = open(&path);
    let memory = tokio_uffd::MemorySource::new(data.clone());

    // Warm page cache: the cost of asking.
    let syscall = per_call(pages, |_| {
        // SAFETY: getppid has no preconditions.
        std::hint::black_box(unsafe { libc::getppid() });
    });
    let none = per_call(pages, |i| {
        std::hint::black_box(memory.bytes_at((i * page) as u64, page));
    });
    // Every page once: each misses the table of recent answers (its slot
    // last held the page 64 before), so each costs a mincore(2).
    let mincore_1 = per_call(pages, |i| {
        assert!(source.bytes_at((i * page) as u64, page).is_some());
    });
    let mincore_16 = per_call(pages / 16, |i| {
        assert!(source.bytes_at((i * 16 * page) as u64, 16 * page).is_some());
    });
    // The server's second look at a run: 64 pages found resident, asked
    // again and again.
    for p in 0..64 {
        assert!(source.bytes_at((p * page) as u64, page).is_some());
    }
    let remembered = per_call(pages, |i| {
        assert!(source.bytes_at(((i % 64) * page) as u64, page).is_some());
    });
    eprintln!("warm page cache, per call (median of 5 rounds over {pages} pages):");
    eprintln!("  getppid(2), for scale                     {syscall:8.0} ns");
    eprintln!("  bytes_at, no check (MemorySource)         {none:8.0} ns");
    eprintln!("  MmapSource::bytes_at, mincore of 1 page   {mincore_1:8.0} ns");
    eprintln!("  MmapSource::bytes_at, mincore of 16 pages {mincore_16:8.0} ns");
    eprintln!("  MmapSource::bytes_at, remembered          {remembered:8.0} ns");

    // Cold page cache: what the reader waits for. (A fresh source: nothing
    // remembered.)
    let source = open(&path);
    let sample: Vec<usize> = shuffled(pages, 7).into_iter().take(1024).collect();
    evict(&file);
    assert!(
        evicted(&source, 0, page),
        "eviction is needed for this measurement"
    );
    let t = Instant::now();
    let mut not_resident = 0;
    for &p in &sample {
        if source.bytes_at((p * page) as u64, page).is_none() {
            not_resident += 1;
        }
    }
    let check_cold = t.elapsed().as_nanos() as f64 / sample.len() as f64;
    let rt = current_thread_rt();
    let mut buf = vec![0u8; page];
    let t = Instant::now();
    for &p in &sample {
        rt.block_on(source.read_at((p * page) as u64, &mut buf))
            .unwrap();
    }
    let read_cold = t.elapsed().as_secs_f64() * 1e6 / sample.len() as f64;
    // Unmapped, so that eviction can drop what read_at read.
    drop(source);
    let (uffd, mem) = registered_anon(pages, Features::empty()).unwrap();
    let unchecked = Mapping::new(len, libc::MAP_SHARED, file.as_raw_fd()).unwrap();
    evict(&file);
    let t = Instant::now();
    for &p in &sample {
        // SAFETY: inside the mapping of a file that is not changed.
        let src = unsafe { std::slice::from_raw_parts(unchecked.ptr(p * page), page) };
        uffd.copy(mem.addr + p * page, src, CopyFlags::empty())
            .unwrap();
    }
    let copy_cold = t.elapsed().as_secs_f64() * 1e6 / sample.len() as f64;
    drop((unchecked, mem));
    let ra = std::fs::read_to_string("/sys/block/vda/queue/read_ahead_kb").unwrap_or_default();
    eprintln!(
        "cold page cache, {} random pages of a 64 MiB file (read_ahead_kb {}):",
        sample.len(),
        ra.trim()
    );
    eprintln!(
        "  bytes_at: mincore says no ({not_resident} of them)        {:8.1} us",
        check_cold / 1000.0
    );
    eprintln!("  read_at (populate and pread on the blocking pool)     {read_cold:8.1} us");
    eprintln!("  UFFDIO_COPY from the mapping (disk read in the ioctl) {copy_cold:8.1} us");

    // Through the server: every page of a 16 MiB region touched in random
    // orders, cold and warm; median of 3 rounds.
    let small = 16 << 20;
    let round = |threads: u64, warm: bool, which: usize| {
        median((0..3).map(|_| {
            if !warm {
                evict(&file);
            }
            match which {
                0 => {
                    let map = Mapping::new(small, libc::MAP_SHARED, file.as_raw_fd()).unwrap();
                    touch_all(
                        SourceHandler::new(Unchecked { map, len: small }),
                        small,
                        threads,
                    )
                }
                1 => touch_all(SourceHandler::new(open(&path)), small, threads),
                _ => touch_all(
                    SourceHandler::new(FileSource::open(&path).unwrap()),
                    small,
                    threads,
                ),
            }
        }))
    };
    eprintln!("server, every page of 16 MiB in random order, us per page (median of 3):");
    eprintln!("                        no check   MmapSource   FileSource");
    for (threads, warm) in [(1, true), (4, true), (1, false), (4, false)] {
        let cells: Vec<f64> = (0..3).map(|w| round(threads, warm, w)).collect();
        eprintln!(
            "  {} {threads} thread(s)   {:8.1}     {:8.1}     {:8.1}",
            if warm { "warm" } else { "cold" },
            cells[0],
            cells[1],
            cells[2]
        );
    }
}
