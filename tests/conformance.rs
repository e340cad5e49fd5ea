//! Conformance: the Linux kernel's own userfaultfd unit-test scenarios
//! (`tools/testing/selftests/mm/uffd-unit-tests.c`), ported to tokio-uffd's
//! public API (plus libc for mmap, madvise, fork and /proc).
//!
//! Each module is one kernel scenario (`register-ioctls` is
//! `register_ioctls`, `move` is `r#move`), and each test in it one memory
//! type the kernel runs the scenario on, with the kernel's names: `anon`,
//! `shmem`, `shmem_private`, `hugetlb`, `hugetlb_private`. A scenario asks
//! for exactly the features the kernel's test case requires; where the
//! running kernel lacks one, the test says so (and fails under `CI=true`).
//! CONFORMANCE.md has the table of results.
//!
//! Faults come from `std::thread`s or child processes. A child made with
//! `fork` in this multi-threaded binary only touches memory and makes raw
//! system calls; the scenarios that must survive `SIGBUS` in the faulting
//! process (`sigbus`, `sigbus-wp`, `poison`) run in a fresh copy of this
//! binary (the `#[ignore]`d `child_entry`), where a signal handler may be
//! installed. Every wait is bounded.

mod common;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::Instant;

use common::*;
use tokio_uffd::{
    sys, ContinueFlags, CopyFlags, CreateMethod, Error, ErrorKind, Event, EventBuffer, FaultKind,
    Features, Ioctls, MoveFlags, PageFault, PoisonFlags, RegisterMode, Uffd, UffdBuilder,
    UnprotectFlags, ZeropageFlags,
};

// ---------------------------------------------------------------------------
// Memory types, as in the kernel's `mem_types[]`
// ---------------------------------------------------------------------------

/// The kernel's memory types.
///
/// `shmem`: a memfd mapped `MAP_SHARED`, with a second shared mapping of
/// the same file (the kernel's `area_dst_alias`). `shmem-private`: the same
/// memfd mapped `MAP_PRIVATE` (the kernel's own test maps it shared as
/// well; a private mapping is what the name promises, and what a user
/// means by it). `hugetlb`: a hugetlbfs memfd mapped `MAP_SHARED`, with an
/// alias. `hugetlb-private`: a hugetlbfs memfd mapped `MAP_PRIVATE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mem {
    Anon,
    Shmem,
    ShmemPrivate,
    Hugetlb,
    HugetlbPrivate,
}

impl Mem {
    const ALL: [Mem; 5] = [
        Mem::Anon,
        Mem::Shmem,
        Mem::ShmemPrivate,
        Mem::Hugetlb,
        Mem::HugetlbPrivate,
    ];

    fn name(self) -> &'static str {
        match self {
            Mem::Anon => "anon",
            Mem::Shmem => "shmem",
            Mem::ShmemPrivate => "shmem-private",
            Mem::Hugetlb => "hugetlb",
            Mem::HugetlbPrivate => "hugetlb-private",
        }
    }

    fn parse(s: &str) -> Mem {
        *Mem::ALL
            .iter()
            .find(|m| m.name() == s)
            .unwrap_or_else(|| panic!("unknown memory type {s:?}"))
    }

    /// Shared file memory: `MADV_REMOVE` frees its pages, and it has an
    /// alias mapping.
    fn shared(self) -> bool {
        matches!(self, Mem::Shmem | Mem::Hugetlb)
    }

    fn hugetlb(self) -> bool {
        matches!(self, Mem::Hugetlb | Mem::HugetlbPrivate)
    }

    /// The page size faults and resolutions work in: the base page size of
    /// the userfaultfd, or the huge page size for hugetlbfs.
    fn page_size(self, uffd: &Uffd) -> usize {
        if self.hugetlb() {
            huge_page_size()
        } else {
            uffd.page_size()
        }
    }

    /// How many pages a scenario uses: few huge pages (a small pool shared
    /// by parallel tests), more base pages.
    fn pages(self, base: usize, huge: usize) -> usize {
        if self.hugetlb() {
            huge
        } else {
            base
        }
    }
}

/// Huge pages this test binary uses at once (the machine reserves 64, and
/// other test binaries may run meanwhile).
const HUGE_BUDGET: usize = 24;

static HUGE_FREE: Mutex<usize> = Mutex::new(HUGE_BUDGET);
static HUGE_RETURNED: Condvar = Condvar::new();

/// A share of the huge page budget, given back on drop.
struct HugeBudget(usize);

impl HugeBudget {
    fn take(n: usize) -> HugeBudget {
        assert!(n <= HUGE_BUDGET);
        let deadline = Instant::now() + BOUND * 3;
        let mut free = HUGE_FREE.lock().unwrap_or_else(|e| e.into_inner());
        while *free < n {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {n} huge pages of the budget within {BOUND:?}"));
            free = HUGE_RETURNED
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *free -= n;
        HugeBudget(n)
    }
}

impl Drop for HugeBudget {
    fn drop(&mut self) {
        *HUGE_FREE.lock().unwrap_or_else(|e| e.into_inner()) += self.0;
        HUGE_RETURNED.notify_all();
    }
}

/// A test area of `nr` pages of one memory type (the kernel's `area_dst`,
/// and `area_dst_alias` for shared kinds).
struct Area {
    page: usize,
    nr: usize,
    map: Mapping,
    alias: Option<Mapping>,
    _fd: Option<OwnedFd>,
    _budget: Option<HugeBudget>,
}

impl Area {
    /// The area, or None (said loudly; a failure under CI) if this machine
    /// cannot provide the memory.
    fn new(mem: Mem, page: usize, nr: usize) -> Option<Area> {
        let len = page * nr;
        // Twice the pages: a private mapping's reservation stays with the
        // parent while a forked child allocates its own pages.
        let budget = mem.hugetlb().then(|| HugeBudget::take(2 * nr));
        let (map, alias, fd) = match mem {
            Mem::Anon => (Mapping::anon(len), None, None),
            _ => {
                let fd = memfd(len, mem.hugetlb())?;
                let flags = if mem.shared() {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                let map = match Mapping::new(len, flags, fd.as_raw_fd()) {
                    Ok(m) => m,
                    Err(e) => {
                        skip(&format!(
                            "cannot map {nr} pages of {}: {e} (hugetlb needs \
                             `echo 64 > /proc/sys/vm/nr_hugepages`)",
                            mem.name()
                        ));
                        return None;
                    }
                };
                let alias = if mem.shared() {
                    Some(Mapping::new(len, libc::MAP_SHARED, fd.as_raw_fd()).unwrap())
                } else {
                    None
                };
                (map, alias, Some(fd))
            }
        };
        Some(Area {
            page,
            nr,
            map,
            alias,
            _fd: fd,
            _budget: budget,
        })
    }

    fn addr(&self, i: usize) -> usize {
        self.map.addr + i * self.page
    }

    fn len(&self) -> usize {
        self.page * self.nr
    }

    fn alias(&self) -> &Mapping {
        self.alias.as_ref().expect("shared memory has an alias")
    }
}

/// The kernel's `release_pages`: `MADV_REMOVE` for shared file memory,
/// `MADV_DONTNEED` otherwise. Returns the madvise result. Async-signal-safe.
fn release(mem: Mem, addr: usize, len: usize) -> i32 {
    let advice = if mem.shared() {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: dropping pages of a mapping the caller owns; nothing holds a
    // reference into it.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) }
}

fn madvise(addr: usize, len: usize, advice: i32) -> std::io::Result<()> {
    // SAFETY: advice on a mapping the caller owns; none of the advice used
    // here frees memory that a reference points into.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, advice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The byte that fills page `i` wherever a scenario serves known contents
/// (never zero, so that a zero page is told apart).
fn seed(i: usize) -> u8 {
    (i as u8).wrapping_mul(37).wrapping_add(11) | 1
}

/// `nr` pages of `page` bytes, page `i` filled with `seed(i)`.
fn seeded(page: usize, nr: usize) -> Vec<u8> {
    (0..nr)
        .flat_map(|i| std::iter::repeat_n(seed(i), page))
        .collect()
}

// ---------------------------------------------------------------------------
// Bounded threads, handlers, /proc readers
// ---------------------------------------------------------------------------

/// A `std::thread` whose result is awaited at most `BOUND`.
struct Bounded<T> {
    rx: mpsc::Receiver<thread::Result<T>>,
    handle: thread::JoinHandle<()>,
    what: &'static str,
}

fn bounded<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Bounded<T> {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
    });
    Bounded { rx, handle, what }
}

impl<T> Bounded<T> {
    fn wait(self) -> T {
        match self.rx.recv_timeout(BOUND) {
            Ok(Ok(v)) => {
                let _ = self.handle.join();
                v
            }
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("{} did not finish within {BOUND:?}", self.what),
        }
    }

    fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// Reads the byte at `addr` on a thread of its own (it may fault).
fn read_in_thread(addr: usize) -> Bounded<u8> {
    bounded("a reading thread", move || read_at(addr))
}

/// Writes `v` at `addr` on a thread of its own (it may fault).
fn write_in_thread(addr: usize, v: u8) -> Bounded<()> {
    bounded("a writing thread", move || write_at(addr, v))
}

/// Whether `len` bytes at `addr` all equal `v`, read on a thread of its own.
fn all_equal(addr: usize, len: usize, v: u8) -> bool {
    bounded("a checking thread", move || {
        (0..len).all(|i| read_at(addr + i) == v)
    })
    .wait()
}

/// An eventfd that tells a handler thread to stop.
struct Stop(OwnedFd);

impl Stop {
    fn new() -> Arc<Stop> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd nothing else owns.
        Arc::new(Stop(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn fire(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let n = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);
    }
}

/// Polls `fds` (negative entries are ignored) for input, at most `BOUND`.
/// Returns which are readable.
fn poll_in<const N: usize>(fds: [RawFd; N]) -> [bool; N] {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `pfds` is a valid array of N pollfds.
    let n = unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            N as libc::nfds_t,
            BOUND.as_millis() as i32,
        )
    };
    assert!(n > 0, "nothing happened within {BOUND:?}");
    for p in &pfds {
        assert_eq!(p.revents & libc::POLLERR, 0, "POLLERR on fd {}", p.fd);
    }
    pfds.map(|p| p.revents & libc::POLLIN != 0)
}

/// A handler thread serving the events of one userfaultfd with the
/// synchronous API until stopped.
struct Served<S> {
    stop: Arc<Stop>,
    thread: Bounded<S>,
}

fn serve<S, F>(uffd: Arc<Uffd>, mut state: S, mut f: F) -> Served<S>
where
    S: Send + 'static,
    F: FnMut(&Uffd, &mut S, Event) + Send + 'static,
{
    let stop = Stop::new();
    let stop2 = stop.clone();
    let thread = bounded("the handler thread", move || {
        let mut buf = EventBuffer::new(16);
        loop {
            let [event, stopped] = poll_in([uffd.as_raw_fd(), stop2.0.as_raw_fd()]);
            if !event && stopped {
                return state;
            }
            match uffd.read_events(&mut buf) {
                Ok(_) => {
                    while let Some(e) = buf.next_event() {
                        f(&uffd, &mut state, e.expect("an undecodable event"));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("read_events: {e}"),
            }
        }
    });
    Served { stop, thread }
}

impl<S> Served<S> {
    /// Stops the handler (after it has drained the queue) and returns its
    /// state.
    fn finish(self) -> S {
        self.stop.fire();
        self.thread.wait()
    }
}

/// A handler serving the events of one userfaultfd through the crate's
/// async layer: an `AsyncUffd` and its `EventStream` on a current-thread
/// Tokio runtime of a thread of its own. (Without the `async` feature, the
/// same through the sync API: `wait_readable` and `read_events`.)
struct AsyncServed<S> {
    #[cfg(feature = "async")]
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    #[cfg(not(feature = "async"))]
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Bounded<S>,
}

#[cfg(feature = "async")]
fn serve_async<S, F>(uffd: Uffd, mut state: S, mut f: F) -> AsyncServed<S>
where
    S: Send + 'static,
    F: FnMut(&Uffd, &mut S, Event) + Send + 'static,
{
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = bounded("the async handler thread", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let uffd = tokio_uffd::AsyncUffd::new(uffd).unwrap();
            let mut events = uffd.event_stream().unwrap();
            loop {
                tokio::select! {
                    biased;
                    e = events.next_event() => f(&uffd, &mut state, e.expect("an event")),
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(BOUND) => panic!("no event within {BOUND:?}"),
                }
            }
            // Stopped with nothing left over: no fault was served twice or
            // left behind.
            let left = events.try_next_event().unwrap();
            assert!(left.is_none(), "an event left over: {left:?}");
            state
        })
    });
    AsyncServed {
        stop: Some(stop),
        thread,
    }
}

#[cfg(not(feature = "async"))]
fn serve_async<S, F>(uffd: Uffd, mut state: S, mut f: F) -> AsyncServed<S>
where
    S: Send + 'static,
    F: FnMut(&Uffd, &mut S, Event) + Send + 'static,
{
    use std::sync::atomic::Ordering;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = bounded("the handler thread", move || {
        let mut buf = EventBuffer::new(16);
        let deadline = std::time::Instant::now() + BOUND;
        while !stopped.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "no stop within {BOUND:?}"
            );
            if !uffd
                .wait_readable(Some(std::time::Duration::from_millis(5)))
                .unwrap()
            {
                continue;
            }
            uffd.read_events(&mut buf).unwrap();
            while let Some(e) = buf.next_event() {
                f(&uffd, &mut state, e.expect("an event"));
            }
        }
        // Stopped with nothing left over.
        assert!(
            !uffd.wait_readable(Some(std::time::Duration::ZERO)).unwrap(),
            "an event left over"
        );
        state
    });
    AsyncServed { stop, thread }
}

impl<S> AsyncServed<S> {
    #[cfg(feature = "async")]
    fn finish(mut self) -> S {
        let _ = self.stop.take().unwrap().send(());
        self.thread.wait()
    }

    #[cfg(not(feature = "async"))]
    fn finish(self) -> S {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.wait()
    }
}

/// `/proc/self/pagemap` bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_UFFD_WP: u64 = 1 << 57;
const PM_SWAP: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;

/// This process's pagemap entry of the page holding `addr` (`base` is the
/// base page size: pagemap is indexed by base pages, hugetlb or not).
fn pagemap(addr: usize, base: usize) -> u64 {
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, (addr / base * 8) as u64).unwrap();
    u64::from_ne_bytes(b)
}

fn uffd_wp_bit(addr: usize, base: usize) -> bool {
    pagemap(addr, base) & PM_UFFD_WP != 0
}

/// `AnonHugePages` of the mapping holding `addr`, in bytes, from
/// `/proc/self/smaps`.
fn anon_huge_bytes(addr: usize) -> usize {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').map(|(r, _)| r).unwrap_or(line);
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a <= addr && addr < b;
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                let kb: usize = v.trim().trim_end_matches("kB").trim().parse().unwrap();
                return kb * 1024;
            }
        }
    }
    panic!("no mapping holds {addr:#x} in /proc/self/smaps")
}

/// An address range of `len` bytes aligned to `align`, reserved (mapped,
/// never touched) so that `mremap(MREMAP_FIXED)` can move a mapping there.
/// Returns the reservation and the aligned address in it.
fn aligned_reservation(len: usize, align: usize) -> (Mapping, usize) {
    let m = Mapping::new(
        len + align,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
    )
    .unwrap();
    let at = (m.addr + align - 1) & !(align - 1);
    (m, at)
}

fn expect_kind(r: tokio_uffd::Result<usize>, kind: ErrorKind, errno: i32, what: &str) -> Error {
    let e = match r {
        Ok(n) => panic!("{what}: expected {kind:?}, but it did {n:#x} bytes"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), kind, "{what}: {e}");
    assert_eq!(e.raw_os_error(), Some(errno), "{what}: {e}");
    e
}

fn wait_status_text(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status:#x}")
    }
}

/// `fork()` in this process raises a Fork event on every userfaultfd with
/// `EVENT_FORK` that has a registered range here, and sleeps until it is
/// read: a fork of one test would stall, and its event mislead, a test that
/// uses `EVENT_FORK`. Tests that fork, spawn a process, or register with
/// `EVENT_FORK` hold this lock for their whole run.
static FORKING: Mutex<()> = Mutex::new(());

fn forking() -> std::sync::MutexGuard<'static, ()> {
    FORKING.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Child processes: a forked child is async-signal-safe only; a re-executed
// copy of this binary may do anything.
// ---------------------------------------------------------------------------

/// The environment variable that makes `child_entry` run a scenario.
const CHILD_ENV: &str = "TOKIO_UFFD_CONFORMANCE_CHILD";
/// A child's exit code for "cannot run here" (already said on stderr).
const CHILD_SKIPPED: i32 = 77;

/// Runs `what` (`scenario:mem[:wp]`) in a fresh copy of this test binary and
/// checks that it succeeded.
fn run_in_child(what: &str, mem: Mem) {
    // The forking lock first, then huge pages, in every test.
    let forking = forking();
    let budget = mem.hugetlb().then(|| HugeBudget::take(8));
    let status = run_child_test("child_entry", &[(CHILD_ENV, what)]);
    drop((budget, forking));
    if status.code() == Some(CHILD_SKIPPED) {
        return skip(&format!(
            "{what}: the child could not set up {}",
            mem.name()
        ));
    }
    assert!(
        status.success(),
        "the child running {what} failed: {status:?} (its stderr above says why)"
    );
}

/// Child entry point of the scenarios that catch SIGBUS in the faulting
/// process. Does nothing unless run by `run_in_child`.
#[test]
#[ignore = "child entry point, run by the sigbus, sigbus_wp and poison scenarios"]
fn child_entry() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = what.split(':').collect();
    match parts.as_slice() {
        ["sigbus", mem, wp] => sigbus_child(Mem::parse(mem), *wp == "wp"),
        ["poison", mem] => poison_child(Mem::parse(mem)),
        _ => panic!("unknown child scenario {what:?}"),
    }
}

/// Forks a raw child that reads its own pagemap entry for `addr` and exits
/// with `PM_UFFD_WP -> 1 | PM_PRESENT -> 2 | PM_SWAP -> 4`, or 64+ if it
/// cannot read it. Returns the pid.
fn fork_pagemap_reader(addr: usize, base: usize) -> libc::pid_t {
    let pid = raw_fork();
    if pid == 0 {
        // Only system calls and `_exit` from here on.
        // SAFETY: a NUL-terminated literal path; reading into a local u64.
        unsafe {
            let fd = libc::open(c"/proc/self/pagemap".as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                libc::_exit(64);
            }
            let mut v: u64 = 0;
            let n = libc::pread(
                fd,
                (&mut v as *mut u64).cast(),
                8,
                (addr / base * 8) as libc::off_t,
            );
            if n != 8 {
                libc::_exit(65);
            }
            let code = (v & PM_UFFD_WP != 0) as i32
                | ((v & PM_PRESENT != 0) as i32) << 1
                | ((v & PM_SWAP != 0) as i32) << 2;
            libc::_exit(code);
        }
    }
    pid
}

// ===========================================================================
// api
// ===========================================================================

/// `test_uffd_api`: a wrong API version, an unknown feature bit and a second
/// `UFFDIO_API` on one fd are all refused, with `/dev/userfaultfd` and with
/// the system call. `UffdBuilder` cannot express a wrong version or a
/// second call, so those go through `tokio_uffd::sys` on a raw fd; the
/// unknown bit is also asked of the builder, which names it.
fn api_test(method: CreateMethod) {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | sys::UFFD_USER_MODE_ONLY;
    let fd = match method {
        CreateMethod::Device => sys::userfaultfd_from_device(flags),
        _ => sys::userfaultfd(flags),
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => return skip(&format!("cannot open a userfaultfd via {method:?}: {e}")),
    };
    let polls_error = |fd: RawFd| {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents & libc::POLLERR != 0
    };
    assert!(polls_error(fd.as_raw_fd()), "POLLERR before UFFDIO_API");

    let api = |version: u64, features: u64| {
        let mut arg = sys::uffdio_api {
            api: version,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API with its argument type; it only configures the
        // fd.
        let r = unsafe { sys::ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut arg) };
        (r, arg)
    };

    // A wrong API version.
    let (r, out) = api(0xab, 0);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    assert_eq!(
        (out.features, out.ioctls),
        (0, 0),
        "a failed call reports nothing"
    );
    // An unknown feature bit.
    let (r, out) = api(sys::UFFD_API, 1 << 63);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));
    assert_eq!(
        (out.features, out.ioctls),
        (0, 0),
        "a failed call reports nothing"
    );
    // The failed calls left the fd unconfigured; a correct one succeeds.
    assert!(polls_error(fd.as_raw_fd()));
    let (r, out) = api(sys::UFFD_API, 0);
    r.unwrap();
    assert_eq!(out.api, sys::UFFD_API);
    let fd_ioctls = Ioctls::from_bits_retain(out.ioctls);
    assert!(fd_ioctls.contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API));
    assert!(!polls_error(fd.as_raw_fd()), "POLLERR after UFFDIO_API");
    // A second call on the configured fd, with some feature set.
    let (r, _) = api(sys::UFFD_API, 1 << 0);
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EINVAL));

    // The crate adopts the configured fd without a second call, and it
    // serves faults.
    let uffd = Uffd::from_fd(fd).unwrap();
    assert_eq!(uffd.features(), Features::empty());
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: a fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let t = read_in_thread(mem.addr);
    let mut buf = EventBuffer::new(4);
    let f = expect_fault(&uffd, &mut buf);
    uffd.zeropage(f.page_start(page), page, ZeropageFlags::empty())
        .unwrap();
    assert_eq!(t.wait(), 0);

    // Through the builder: requiring the unknown bit is refused, naming it;
    // wanting it leaves it out.
    let unknown = Features::from_bits_retain(1 << 63);
    match UffdBuilder::new().method(method).require(unknown).create() {
        Err(Error::MissingFeatures { missing, .. }) => assert_eq!(missing, unknown),
        other => panic!("requiring bit 63: expected MissingFeatures, got {other:?}"),
    }
    let uffd = UffdBuilder::new()
        .method(method)
        .want(unknown)
        .create()
        .unwrap();
    assert!(!uffd.features().contains(unknown));
    assert_eq!(uffd.created_via(), Some(method));
}

mod api {
    #[test]
    fn syscall() {
        super::api_test(tokio_uffd::CreateMethod::Syscall);
    }

    #[test]
    fn device() {
        super::api_test(tokio_uffd::CreateMethod::Device);
    }
}

/// One test per memory type for a scenario function `fn(Mem)`.
macro_rules! on_mems {
    ($module:ident, $scenario:path, [$($test:ident => $mem:ident),+ $(,)?]) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    $scenario(super::Mem::$mem);
                }
            )+
        }
    };
}

macro_rules! on_all_mems {
    ($module:ident, $scenario:path) => {
        on_mems!($module, $scenario, [
            anon => Anon,
            shmem => Shmem,
            shmem_private => ShmemPrivate,
            hugetlb => Hugetlb,
            hugetlb_private => HugetlbPrivate,
        ]);
    };
}

// ===========================================================================
// register-ioctls
// ===========================================================================

/// `uffd_register_ioctls_test`: all 8 combinations of MISSING, WP and MINOR.
/// No mode, and MINOR on anonymous memory, are refused with `EINVAL`; every
/// other combination is granted WAKE plus COPY for MISSING, WRITEPROTECT
/// for WP and CONTINUE for MINOR.
fn register_ioctls(mem: Mem) {
    let Some(uffd) = uffd_with(
        Features::MISSING_HUGETLBFS
            | Features::MISSING_SHMEM
            | Features::PAGEFAULT_FLAG_WP
            | Features::WP_HUGETLBFS_SHMEM
            | Features::MINOR_HUGETLBFS
            | Features::MINOR_SHMEM,
    ) else {
        return;
    };
    let page = mem.page_size(&uffd);
    let Some(area) = Area::new(mem, page, 1) else {
        return;
    };
    for bits in 0..8u8 {
        let (miss, wp, minor) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
        let mut mode = RegisterMode::empty();
        let mut expected = Ioctls::WAKE;
        if miss {
            mode |= RegisterMode::MISSING;
            expected |= Ioctls::COPY;
        }
        if wp {
            mode |= RegisterMode::WP;
            expected |= Ioctls::WRITEPROTECT;
        }
        if minor {
            mode |= RegisterMode::MINOR;
            expected |= Ioctls::CONTINUE;
        }
        // SAFETY: a fresh mapping that no thread touches.
        let r = unsafe { uffd.register(area.addr(0), page, mode) };
        if mode.is_empty() || (minor && mem == Mem::Anon) {
            let e = r.expect_err(&format!("{mode:?} on {} must be refused", mem.name()));
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{mode:?}: {e}");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            continue;
        }
        let ioctls = r.unwrap_or_else(|e| panic!("{mode:?} on {}: {e}", mem.name()));
        assert!(
            ioctls.contains(expected),
            "{mode:?} on {}: granted {ioctls:?}, expected at least {expected:?}",
            mem.name()
        );
        uffd.unregister(area.addr(0), page).unwrap();
    }
}

on_all_mems!(register_ioctls, super::register_ioctls);

// ===========================================================================
// zeropage
// ===========================================================================

/// `uffd_zeropage_test`: the ZEROPAGE ioctl is granted on anonymous and
/// shmem memory and not on hugetlbfs; where granted it maps a page of
/// zeros and a second try through the alias of shared memory finds the
/// page there (`EEXIST`); on hugetlbfs it is refused with `EINVAL`.
fn zeropage(mem: Mem) {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = mem.page_size(&uffd);
    let Some(area) = Area::new(mem, page, 1) else {
        return;
    };
    // SAFETY: fresh mappings that no thread touches until resolved.
    let ioctls = unsafe { uffd.register(area.addr(0), page, RegisterMode::MISSING) }.unwrap();
    if let Some(alias) = &area.alias {
        // SAFETY: as above.
        unsafe { uffd.register(alias.addr, page, RegisterMode::MISSING) }.unwrap();
    }
    let has_zeropage = ioctls.contains(Ioctls::ZEROPAGE);
    assert_eq!(
        has_zeropage,
        !mem.hugetlb(),
        "{}: ZEROPAGE granted: {has_zeropage}",
        mem.name()
    );
    if has_zeropage {
        assert_eq!(
            uffd.zeropage(area.addr(0), page, ZeropageFlags::empty())
                .unwrap(),
            page
        );
        if mem.shared() {
            // The page is in the file now: the alias sees it.
            let e = expect_kind(
                uffd.zeropage(area.alias().addr, page, ZeropageFlags::empty()),
                ErrorKind::Exists,
                libc::EEXIST,
                "zeropage through the alias",
            );
            assert_eq!(e.bytes_done(), 0);
        }
        assert!(all_equal(area.addr(0), page, 0), "non-zero data");
    } else {
        expect_kind(
            uffd.zeropage(area.addr(0), page, ZeropageFlags::empty()),
            ErrorKind::InvalidInput,
            libc::EINVAL,
            "zeropage on hugetlbfs",
        );
    }
    uffd.unregister(area.addr(0), page).unwrap();
    if let Some(alias) = &area.alias {
        uffd.unregister(alias.addr, page).unwrap();
    }
    assert!(!readable_within(uffd.as_raw_fd(), 0));
}

on_all_mems!(zeropage, super::zeropage);

// ===========================================================================
// move, move-pmd, move-pmd-split
// ===========================================================================

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MoveChunk {
    /// `move`: one base page per fault; THP kept out of the source.
    Page,
    /// `move-pmd`: one PMD (2 MiB) per fault; THP asked for on both sides.
    Pmd,
    /// `move-pmd-split`: one PMD per fault, THP refused at the destination.
    PmdSplit,
}

/// The PMD size, or None (said loudly) without transparent huge pages.
fn pmd_size() -> Option<usize> {
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") {
        Ok(s) => Some(s.trim().parse().unwrap()),
        Err(e) => {
            skip(&format!("no transparent huge pages (hpage_pmd_size: {e})"));
            None
        }
    }
}

/// `uffd_move_test_common`: a thread reads the destination page by page;
/// each first touch of a chunk faults, and the handler (on the async
/// stream) moves that chunk from the source with `UFFDIO_MOVE`. Checked
/// per chunk: the source held the data, the destination reads it, the
/// source is empty afterwards, and there was exactly one fault per chunk.
fn move_test(chunk_kind: MoveChunk) {
    let Some(uffd) = uffd_with(Features::MOVE) else {
        return;
    };
    let page = uffd.page_size();
    let (chunk, nr_chunks) = match chunk_kind {
        MoveChunk::Page => (page, 32),
        _ => match pmd_size() {
            Some(pmd) => (pmd, 2),
            None => return,
        },
    };
    let len = chunk * nr_chunks;
    // Chunk-aligned areas (the kernel aligns up inside its areas the same way).
    let (src_map, src) = aligned_reservation(len, chunk);
    let (dst_map, dst) = aligned_reservation(len, chunk);
    // Source pages must not be mapped twice.
    madvise(src_map.addr, src_map.len, libc::MADV_DONTFORK).unwrap();
    match chunk_kind {
        MoveChunk::Page => {
            // `prevent_hugepages`: EINVAL only means no THP at all.
            if let Err(e) = madvise(src_map.addr, src_map.len, libc::MADV_NOHUGEPAGE) {
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            }
        }
        MoveChunk::Pmd | MoveChunk::PmdSplit => {
            // `request_hugepages`, and the destination's advice.
            if let Err(e) = madvise(src_map.addr, src_map.len, libc::MADV_HUGEPAGE) {
                return skip(&format!("madvise(MADV_HUGEPAGE): {e}"));
            }
            let advice = if chunk_kind == MoveChunk::Pmd {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            madvise(dst_map.addr, dst_map.len, advice).unwrap();
        }
    }
    let data = seeded(page, len / page);
    // SAFETY: `src` is ours, writable for `len` bytes inside `src_map`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), src as *mut u8, len) };
    let src_thp = anon_huge_bytes(src);
    // SAFETY: a fresh mapping; only the thread below touches it, and only
    // the handler fills it.
    let ioctls =
        unsafe { uffd.register(dst_map.addr, dst_map.len, RegisterMode::MISSING) }.unwrap();
    assert!(
        ioctls.contains(Ioctls::MOVE),
        "MOVE not granted: {ioctls:?}"
    );

    let handler = serve_async(uffd, 0usize, move |uffd, faults, e| {
        let Event::PageFault(f) = e else {
            panic!("unexpected event {e:?}")
        };
        assert_eq!(f.kind(), FaultKind::Missing, "{f:?}");
        assert!(!f.is_write(), "a read faulted as a write: {f:?}");
        let at = f.page_start(chunk);
        assert!(at >= dst && at < dst + len, "fault outside the area: {f:?}");
        let from = src + (at - dst);
        // SAFETY: the source chunk is ours; the reading thread only checks
        // that it is empty after the move, which is the point.
        let moved = unsafe { uffd.move_pages(at, from, chunk, MoveFlags::empty()) }
            .unwrap_or_else(|e| panic!("move of {chunk:#x} bytes: {e}"));
        assert_eq!(moved, chunk);
        *faults += 1;
    });

    let reader = bounded("the reading thread", move || {
        for c in 0..nr_chunks {
            let (s, d) = (src + c * chunk, dst + c * chunk);
            for p in 0..chunk / page {
                let want = seed(c * chunk / page + p);
                assert_eq!(read_at(s + p * page), want, "chunk {c}: source page {p}");
            }
            for p in 0..chunk / page {
                let want = seed(c * chunk / page + p);
                for off in [0, page - 1] {
                    assert_eq!(
                        read_at(d + p * page + off),
                        want,
                        "chunk {c}: page {p} corrupted"
                    );
                }
            }
            for p in 0..chunk / page {
                assert_eq!(
                    read_at(s + p * page),
                    0,
                    "chunk {c}: page {p} left in the source"
                );
            }
        }
    });
    reader.wait();
    let faults = handler.finish();
    assert_eq!(faults, nr_chunks, "one fault per {chunk:#x}-byte chunk");
    if chunk_kind == MoveChunk::Pmd {
        if src_thp >= len {
            // The source was made of huge pages: they moved as whole PMDs.
            assert!(
                anon_huge_bytes(dst) >= len,
                "the huge pages were split by the move"
            );
        } else {
            eprintln!(
                "move-pmd: the kernel gave the source {src_thp:#x} bytes of huge pages \
                 (of {len:#x}); the PMD path of UFFDIO_MOVE was not taken for all of it"
            );
        }
    }
    drop(src_map);
}

mod r#move {
    #[test]
    fn anon() {
        super::move_test(super::MoveChunk::Page);
    }
}

mod move_pmd {
    #[test]
    fn anon() {
        super::move_test(super::MoveChunk::Pmd);
    }
}

mod move_pmd_split {
    #[test]
    fn anon() {
        super::move_test(super::MoveChunk::PmdSplit);
    }
}

// ===========================================================================
// wp-fork, wp-fork-with-event
// ===========================================================================

/// `pagemap_test_fork`: forks a child that reads its own pagemap entry for
/// `addr`; with `EVENT_FORK` the fork waits for its event, read here.
/// Returns the child's `fork_pagemap_reader` code.
fn fork_and_read_pagemap(uffd: &Uffd, addr: usize, base: usize, with_event: bool) -> i32 {
    let (pid, child_uffd) = if with_event {
        let forker = bounded("the forking thread", move || {
            fork_pagemap_reader(addr, base)
        });
        let mut buf = EventBuffer::new(4);
        let child_uffd = match next_event(uffd, &mut buf) {
            Event::Fork(f) => f.into_uffd(),
            other => panic!("expected a Fork event, got {other:?}"),
        };
        (forker.wait(), Some(child_uffd))
    } else {
        (fork_pagemap_reader(addr, base), None)
    };
    let status = wait_child(pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) < 64,
        "the pagemap child {}",
        wait_status_text(status)
    );
    drop(child_uffd);
    assert!(!readable_within(uffd.as_raw_fd(), 0), "a stray event");
    libc::WEXITSTATUS(status)
}

/// `uffd_wp_fork_test_common`: a write-protected page keeps its uffd-wp bit
/// in the child of a fork only when `EVENT_FORK` is on (the child's memory
/// stays registered then), both while the page is mapped and after its
/// page table entry was zapped (a PTE marker); unprotecting clears the bit.
fn wp_fork(mem: Mem, with_event: bool) {
    let _forking = forking();
    let mut features = Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM;
    if with_event {
        features |= Features::EVENT_FORK;
    }
    let Some(uffd) = uffd_with(features) else {
        return;
    };
    let base = uffd.page_size();
    let page = mem.page_size(&uffd);
    let Some(area) = Area::new(mem, page, 2) else {
        return;
    };
    let addr = area.addr(0);
    // SAFETY: a fresh mapping; the writes below are the test's own.
    unsafe { uffd.register(addr, area.len(), RegisterMode::WP) }.unwrap();
    // Touch the page (no fault: nothing is protected yet), then protect it.
    write_in_thread(addr, 1).wait();
    uffd.write_protect(addr, page).unwrap();
    assert!(uffd_wp_bit(addr, base), "uffd-wp bit missing after protect");

    // 1. A present page table entry.
    let code = fork_and_read_pagemap(&uffd, addr, base, with_event);
    assert_eq!(
        code & 1 != 0,
        with_event,
        "{}: uffd-wp bit {} in the child of a fork (present pte, code {code})",
        mem.name(),
        if with_event { "missing" } else { "stale" }
    );
    if !mem.shared() {
        // Private memory: fork copied the page table, so the child has the
        // page; the bit was really dropped, not just absent.
        assert_ne!(code & 2, 0, "the child lacks the page (code {code})");
    }

    // 2. A zapped entry. Shared memory: MADV_DONTNEED zaps it and leaves a
    // marker. Private memory: MADV_PAGEOUT swaps it out (a no-op without
    // swap, and private hugetlb cannot be swapped), as the kernel's test.
    if mem.shared() {
        madvise(addr, page, libc::MADV_DONTNEED).unwrap();
        assert_eq!(
            pagemap(addr, base) & PM_PRESENT,
            0,
            "MADV_DONTNEED left the page mapped"
        );
    } else {
        let _ = madvise(addr, page, libc::MADV_PAGEOUT);
    }
    assert!(uffd_wp_bit(addr, base), "uffd-wp bit lost by the zap");
    let code = fork_and_read_pagemap(&uffd, addr, base, with_event);
    assert_eq!(
        code & 1 != 0,
        with_event,
        "{}: uffd-wp bit {} in the child of a fork (zapped pte, code {code})",
        mem.name(),
        if with_event { "missing" } else { "stale" }
    );

    // Unprotect (also the zapped or swapped form), then fault the page back.
    uffd.write_unprotect(addr, page, UnprotectFlags::empty())
        .unwrap();
    assert!(!uffd_wp_bit(addr, base), "uffd-wp bit left after unprotect");
    write_in_thread(addr, 2).wait();
    assert!(!uffd_wp_bit(addr, base));
    assert_eq!(read_in_thread(addr).wait(), 2);
    assert!(!readable_within(uffd.as_raw_fd(), 0), "a stray event");
    uffd.unregister(addr, area.len()).unwrap();
}

fn wp_fork_without_event(mem: Mem) {
    wp_fork(mem, false);
}

fn wp_fork_with_event(mem: Mem) {
    wp_fork(mem, true);
}

on_all_mems!(wp_fork, super::wp_fork_without_event);
on_all_mems!(wp_fork_with_event, super::wp_fork_with_event);

// ===========================================================================
// wp-unpopulated
// ===========================================================================

/// `uffd_wp_unpopulated_test`: with `WP_UNPOPULATED`, protecting an
/// anonymous page that was never touched leaves a marker (the uffd-wp bit
/// is set); unprotect and `MADV_DONTNEED` clear it; a read maps the zero
/// page without a fault and keeps the protection. Beyond the kernel's test:
/// a write to the protected unpopulated page raises a write-protect fault.
fn wp_unpopulated(mem: Mem) {
    let Some(uffd) = uffd_with(Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED) else {
        return;
    };
    let page = mem.page_size(&uffd);
    let base = uffd.page_size();
    let Some(area) = Area::new(mem, page, 2) else {
        return;
    };
    let addr = area.addr(0);
    // SAFETY: a fresh mapping; the accesses below are the test's own.
    unsafe { uffd.register(addr, area.len(), RegisterMode::WP) }.unwrap();
    assert_eq!(pagemap(addr, base) & PM_PRESENT, 0);

    // A marker on an unpopulated page.
    uffd.write_protect(addr, page).unwrap();
    assert!(uffd_wp_bit(addr, base), "no marker on the unpopulated page");
    // Unprotect on a marker.
    uffd.write_unprotect(addr, page, UnprotectFlags::empty())
        .unwrap();
    assert!(!uffd_wp_bit(addr, base));
    // A zap removes the marker.
    uffd.write_protect(addr, page).unwrap();
    madvise(addr, page, libc::MADV_DONTNEED).unwrap();
    assert!(
        !uffd_wp_bit(addr, base),
        "the marker survived MADV_DONTNEED"
    );
    // Faulting in after the marker is gone: no userfault.
    write_in_thread(addr, 1).wait();
    assert!(!uffd_wp_bit(addr, base));
    madvise(addr, page, libc::MADV_DONTNEED).unwrap();

    // A read upon a marker maps the zero page, still protected.
    uffd.write_protect(addr, page).unwrap();
    assert_eq!(read_in_thread(addr).wait(), 0);
    assert!(!readable_within(uffd.as_raw_fd(), 0), "the read faulted");
    assert!(uffd_wp_bit(addr, base), "the read dropped the protection");
    // A write there is a write-protect fault.
    let writer = write_in_thread(addr + 7, 0x5a);
    let mut buf = EventBuffer::new(4);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::WriteProtect, "{f:?}");
    assert!(f.is_write());
    assert_eq!(f.page_start(page), addr);
    assert!(!writer.is_finished(), "the writer did not wait");
    uffd.write_unprotect(addr, page, UnprotectFlags::empty())
        .unwrap();
    writer.wait();
    assert_eq!(read_in_thread(addr + 7).wait(), 0x5a);
    madvise(addr, page, libc::MADV_DONTNEED).unwrap();
    assert!(!readable_within(uffd.as_raw_fd(), 0), "a stray event");
}

on_mems!(wp_unpopulated, super::wp_unpopulated, [anon => Anon]);

// ===========================================================================
// minor, minor-wp
// ===========================================================================

#[derive(Default, Debug)]
struct MinorCounts {
    minor: usize,
    missing: usize,
    wp: usize,
}

/// `uffd_minor_test_common`: the alias of shared memory is registered
/// MINOR; the pages are filled through the other mapping without a fault;
/// a thread reads every page through the alias. The handler (on the async
/// stream) flips the bits of the page through the other mapping, then
/// continues it (write-protected for `minor-wp`), and checks that a second
/// continue finds the page there (`EEXIST`). One minor fault per page, no
/// missing fault. For `minor-wp`, beyond the kernel's test: the continued
/// pages carry the uffd-wp bit, and a write through the alias raises a
/// write-protect fault until unprotected.
fn minor(mem: Mem, wp: bool) {
    let mut features = Features::MINOR_HUGETLBFS | Features::MINOR_SHMEM;
    if wp {
        features |= Features::PAGEFAULT_FLAG_WP | Features::WP_UNPOPULATED;
    }
    let Some(uffd) = uffd_with(features) else {
        return;
    };
    let page = mem.page_size(&uffd);
    let base = uffd.page_size();
    let nr = mem.pages(16, 2);
    let Some(area) = Area::new(mem, page, nr) else {
        return;
    };
    let (fill, reg) = (area.map.addr, area.alias().addr);
    let len = area.len();
    let mut mode = RegisterMode::MINOR;
    if wp {
        mode |= RegisterMode::WP;
    }
    // SAFETY: `reg` is ours; only the reading thread touches it, and only
    // after the pages are in the page cache.
    let ioctls = unsafe { uffd.register(reg, len, mode) }.unwrap();
    assert!(ioctls.contains(Ioctls::CONTINUE));
    // Filling the page cache through the other mapping raises nothing.
    for p in 0..nr {
        // SAFETY: `fill` is ours and writable for `len` bytes.
        unsafe { std::ptr::write_bytes((fill + p * page) as *mut u8, (p % 255) as u8, page) };
    }
    assert!(
        !readable_within(uffd.as_raw_fd(), 0),
        "filling raised a fault"
    );

    let handler = serve_async(uffd, MinorCounts::default(), move |uffd, n, e| {
        let Event::PageFault(f) = e else {
            panic!("unexpected event {e:?}")
        };
        let at = f.page_start(page);
        assert!(at >= reg && at < reg + len, "fault outside the area: {f:?}");
        match f.kind() {
            FaultKind::Minor => {
                // Prove the contents can be changed before they are mapped.
                let other = fill + (at - reg);
                for b in 0..page {
                    let v = read_at(other + b);
                    write_at(other + b, !v);
                }
                let flags = if wp {
                    ContinueFlags::WP
                } else {
                    ContinueFlags::empty()
                };
                assert_eq!(uffd.continue_range(at, page, flags).unwrap(), page);
                // Continue's error path: the page is mapped now.
                let e = uffd.continue_range(at, page, flags).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Exists, "second continue: {e}");
                assert_eq!(e.bytes_done(), 0);
                n.minor += 1;
            }
            FaultKind::WriteProtect => {
                uffd.write_unprotect(at, page, UnprotectFlags::empty())
                    .unwrap();
                n.wp += 1;
            }
            _ => n.missing += 1,
        }
    });

    bounded("the reading thread", move || {
        for p in 0..nr {
            let want = !((p % 255) as u8);
            for b in 0..page {
                assert_eq!(read_at(reg + p * page + b), want, "page {p} byte {b}");
            }
        }
    })
    .wait();
    if wp {
        // Continued write-protected: a write faults until unprotected.
        for p in 0..nr {
            assert!(uffd_wp_bit(reg + p * page, base), "page {p} not protected");
        }
        write_in_thread(reg + page + 3, 0x42).wait();
        assert_eq!(read_at(fill + page + 3), 0x42);
        assert!(!uffd_wp_bit(reg + page, base));
    }
    let n = handler.finish();
    assert_eq!(n.minor, nr, "{n:?}");
    assert_eq!(n.missing, 0, "{n:?}");
    assert_eq!(n.wp, usize::from(wp), "{n:?}");
}

fn minor_plain(mem: Mem) {
    minor(mem, false);
}

fn minor_wp(mem: Mem) {
    minor(mem, true);
}

on_mems!(minor, super::minor_plain, [shmem => Shmem, hugetlb => Hugetlb]);
on_mems!(minor_wp, super::minor_wp, [shmem => Shmem, hugetlb => Hugetlb]);

// ===========================================================================
// sigbus, sigbus-wp (in a child copy of this binary)
// ===========================================================================

/// State of the SIGBUS handler of a child scenario. Only atomics and
/// already-initialised `OnceLock`s are touched from the handler.
mod sigstate {
    use super::*;

    pub(super) const MAX_PAGES: usize = 64;
    /// The handler resolves the fault: the first SIGBUS on a page copies
    /// it, the second (a write to a write-protected copy) unprotects it.
    pub(super) const RESOLVE: u8 = 1;
    /// The handler drops the poisoned page, so the access faults again
    /// (the kernel's test jumps over the access with `siglongjmp`).
    pub(super) const DROP: u8 = 2;

    pub(super) static MODE: AtomicU8 = AtomicU8::new(0);
    pub(super) static UFFD: OnceLock<Uffd> = OnceLock::new();
    pub(super) static SRC: OnceLock<Vec<u8>> = OnceLock::new();
    pub(super) static BASE: AtomicUsize = AtomicUsize::new(0);
    pub(super) static PAGE: AtomicUsize = AtomicUsize::new(0);
    pub(super) static NR: AtomicUsize = AtomicUsize::new(0);
    pub(super) static WP: AtomicBool = AtomicBool::new(false);
    pub(super) static SIGNALS: [AtomicU32; MAX_PAGES] = [const { AtomicU32::new(0) }; MAX_PAGES];
    pub(super) static CODES: [AtomicI32; MAX_PAGES] = [const { AtomicI32::new(0) }; MAX_PAGES];
    pub(super) static ERRORS: AtomicU32 = AtomicU32::new(0);

    fn give_up() {
        ERRORS.fetch_add(1, Ordering::SeqCst);
        // The access is retried on return and kills the process: a failure
        // the parent sees.
        // SAFETY: signal(2) is async-signal-safe.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }

    pub(super) extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
        let (base, page, nr) = (
            BASE.load(Ordering::SeqCst),
            PAGE.load(Ordering::SeqCst),
            NR.load(Ordering::SeqCst),
        );
        if addr < base || addr >= base + nr * page {
            return give_up();
        }
        let idx = (addr - base) / page;
        let start = base + idx * page;
        let n = SIGNALS[idx].fetch_add(1, Ordering::SeqCst) + 1;
        CODES[idx].store(code, Ordering::SeqCst);
        match MODE.load(Ordering::SeqCst) {
            RESOLVE => {
                let (Some(uffd), Some(src)) = (UFFD.get(), SRC.get()) else {
                    return give_up();
                };
                let wp = WP.load(Ordering::SeqCst);
                // The crate's calls make no allocation on either path: an
                // ioctl on a stack struct, an `io::Error` from errno.
                let ok = if n == 1 {
                    let flags = if wp {
                        CopyFlags::WP
                    } else {
                        CopyFlags::empty()
                    };
                    uffd.copy(start, &src[idx * page..(idx + 1) * page], flags)
                        .is_ok()
                } else if n == 2 && wp {
                    uffd.write_unprotect(start, page, UnprotectFlags::empty())
                        .is_ok()
                } else {
                    false // the signal repeated
                };
                if !ok {
                    give_up();
                }
            }
            DROP => {
                // SAFETY: drops the poisoned page of the test's own
                // mapping; madvise(2) is a plain system call.
                let dropped =
                    unsafe { libc::madvise(start as *mut libc::c_void, page, libc::MADV_DONTNEED) };
                if n != 1 || dropped != 0 {
                    give_up();
                }
            }
            _ => give_up(),
        }
    }

    pub(super) fn install() {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value
        // that is filled in before use; the handler is an `extern "C"` fn
        // of the SA_SIGINFO signature.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
        }
    }

    pub(super) fn uninstall() {
        // SAFETY: restores the default action.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

/// `uffd_sigbus_test_common`, in a child copy of this binary. With
/// `UFFD_FEATURE_SIGBUS`:
///
/// 1. (`faulting_process(1)`) every fault in this process, missing or
///    write-protect, is a SIGBUS in the faulting thread (`BUS_ADRERR`), and
///    no message is queued. The SIGBUS handler copies the page (with
///    `CopyFlags::WP` for `sigbus-wp`), and for `sigbus-wp` unprotects it at
///    the second signal, when the thread writes its value back; the
///    retried accesses then succeed and read the copied data.
/// 2. (`faulting_process(2)`) after the pages are released, forked
///    children (`EVENT_FORK`: their memory stays registered with the
///    feature) die of SIGBUS at their first touch, and neither the parent's
///    nor the child's userfaultfd gets a fault message.
fn sigbus_child(mem: Mem, wp: bool) {
    use sigstate::*;
    let mut features = Features::SIGBUS | Features::EVENT_FORK;
    if wp {
        features |= Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM;
    }
    let uffd = UffdBuilder::new().require(features).create().unwrap();
    let page = mem.page_size(&uffd);
    let nr = mem.pages(16, 2);
    let Some(area) = Area::new(mem, page, nr) else {
        std::process::exit(CHILD_SKIPPED);
    };
    let mut mode = RegisterMode::MISSING;
    if wp {
        mode |= RegisterMode::WP;
    }
    // SAFETY: a fresh mapping; this thread touches it, and its SIGBUS
    // handler is what fills it.
    unsafe { uffd.register(area.addr(0), area.len(), mode) }.unwrap();
    let raw_uffd = uffd.as_raw_fd();
    let half = nr.div_ceil(2);

    // Phase 1.
    SRC.set(seeded(page, nr)).unwrap();
    UFFD.set(uffd).unwrap();
    BASE.store(area.addr(0), Ordering::SeqCst);
    PAGE.store(page, Ordering::SeqCst);
    NR.store(nr, Ordering::SeqCst);
    WP.store(wp, Ordering::SeqCst);
    MODE.store(RESOLVE, Ordering::SeqCst);
    install();
    for i in 0..half {
        let p = area.addr(i);
        let v = read_at(p);
        assert_eq!(v, seed(i), "page {i} corrupted");
        // Write the same value back: a write-protect fault for sigbus-wp.
        write_at(p, v);
    }
    uninstall();
    assert_eq!(
        ERRORS.load(Ordering::SeqCst),
        0,
        "the SIGBUS handler failed"
    );
    let per_page = if wp { 2 } else { 1 };
    for i in 0..half {
        assert_eq!(
            SIGNALS[i].load(Ordering::SeqCst),
            per_page,
            "page {i}: signals"
        );
        assert_eq!(
            CODES[i].load(Ordering::SeqCst),
            libc::BUS_ADRERR,
            "page {i}: si_code"
        );
    }
    for s in &SIGNALS[half..] {
        assert_eq!(s.load(Ordering::SeqCst), 0);
    }
    assert!(
        !readable_within(raw_uffd, 0),
        "a fault was queued despite SIGBUS"
    );

    // Phase 2.
    assert_eq!(release(mem, area.addr(0), area.len()), 0);
    // A fork waits until its event is read: a thread reads them.
    let served = serve_static_uffd();
    for i in 0..half {
        let addr = area.addr(i);
        let pid = raw_fork();
        if pid == 0 {
            // SAFETY: only a memory access and `_exit` in the child.
            unsafe {
                std::ptr::read_volatile(addr as *const u8);
                libc::_exit(0);
            }
        }
        let status = wait_child(pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "a forked child touching page {i} {}, not SIGBUS",
            wait_status_text(status)
        );
    }
    let (faults, children) = served.finish();
    assert_eq!(faults, 0, "faults queued despite SIGBUS");
    assert_eq!(children.len(), half, "one Fork event per child");
    for c in &children {
        assert!(
            !readable_within(c.as_raw_fd(), 0),
            "a message on a child's uffd"
        );
    }
}

/// Serves the Fork events of the userfaultfd in `sigstate::UFFD` (the one
/// the memory is registered with): returns the count of page faults seen
/// and the children's userfaultfds.
fn serve_static_uffd() -> Served<(usize, Vec<Uffd>)> {
    let uffd = sigstate::UFFD.get().expect("set up");
    let stop = Stop::new();
    let stop2 = stop.clone();
    let thread = bounded("the fork-event reader", move || {
        let mut st = (0usize, Vec::new());
        let mut buf = EventBuffer::new(4);
        loop {
            let [event, stopped] = poll_in([uffd.as_raw_fd(), stop2.0.as_raw_fd()]);
            if !event && stopped {
                return st;
            }
            match uffd.read_events(&mut buf) {
                Ok(_) => {
                    while let Some(e) = buf.next_event() {
                        match e.unwrap() {
                            Event::Fork(f) => st.1.push(f.into_uffd()),
                            Event::PageFault(_) => st.0 += 1,
                            other => panic!("unexpected event {other:?}"),
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("read_events: {e}"),
            }
        }
    });
    Served { stop, thread }
}

fn sigbus(mem: Mem) {
    if uffd_with(Features::SIGBUS | Features::EVENT_FORK).is_none() {
        return;
    }
    run_in_child(&format!("sigbus:{}:nowp", mem.name()), mem);
}

fn sigbus_wp(mem: Mem) {
    if uffd_with(
        Features::SIGBUS
            | Features::EVENT_FORK
            | Features::PAGEFAULT_FLAG_WP
            | Features::WP_HUGETLBFS_SHMEM,
    )
    .is_none()
    {
        return;
    }
    run_in_child(&format!("sigbus:{}:wp", mem.name()), mem);
}

on_all_mems!(sigbus, super::sigbus);
on_all_mems!(sigbus_wp, super::sigbus_wp);

// ===========================================================================
// poison (in a child copy of this binary)
// ===========================================================================

/// `uffd_poison_test`, in a child copy of this binary: the area is
/// registered MISSING and granted COPY and POISON; a thread reads every
/// page; the handler copies zeros into odd pages and poisons even ones.
/// Exactly half the pages raise SIGBUS in the reading thread, each once
/// (`BUS_MCEERR_AR`, or `BUS_ADRERR` on kernels without
/// `CONFIG_MEMORY_FAILURE`); the others read zeros. The SIGBUS
/// handler drops the poisoned page, so the read faults again and the
/// handler serves zeros (the kernel's test jumps over the read instead).
fn poison_child(mem: Mem) {
    use sigstate::*;
    let uffd = UffdBuilder::new()
        .require(Features::POISON)
        .create()
        .unwrap();
    let page = mem.page_size(&uffd);
    let nr = mem.pages(16, 4);
    let Some(area) = Area::new(mem, page, nr) else {
        std::process::exit(CHILD_SKIPPED);
    };
    let base = area.addr(0);
    // SAFETY: a fresh mapping; this thread reads it, the handler fills it.
    let ioctls = unsafe { uffd.register(base, area.len(), RegisterMode::MISSING) }.unwrap();
    assert!(
        ioctls.contains(Ioctls::COPY | Ioctls::POISON),
        "COPY and POISON not granted: {ioctls:?}"
    );
    BASE.store(base, Ordering::SeqCst);
    PAGE.store(page, Ordering::SeqCst);
    NR.store(nr, Ordering::SeqCst);
    MODE.store(DROP, Ordering::SeqCst);
    install();

    let zeros = vec![0u8; page];
    let handler = serve(Arc::new(uffd), vec![0u32; nr], move |uffd, poisoned, e| {
        let Event::PageFault(f) = e else {
            panic!("unexpected event {e:?}")
        };
        assert_eq!(f.kind(), FaultKind::Missing, "{f:?}");
        let at = f.page_start(page);
        let idx = (at - base) / page;
        if idx % 2 == 0 && poisoned[idx] == 0 {
            assert_eq!(uffd.poison(at, page, PoisonFlags::empty()).unwrap(), page);
            poisoned[idx] += 1;
        } else {
            match uffd.copy(at, &zeros, CopyFlags::empty()) {
                Ok(n) => assert_eq!(n, page),
                Err(e) if e.kind() == ErrorKind::Exists => uffd.wake(at, page).unwrap(),
                Err(e) => panic!("copy: {e}"),
            }
        }
    });
    for i in 0..nr {
        let p = area.addr(i);
        for b in 0..page {
            assert_eq!(read_at(p + b), 0, "page {i} byte {b} not zero");
        }
    }
    let poisoned = handler.finish();
    uninstall();
    assert_eq!(
        ERRORS.load(Ordering::SeqCst),
        0,
        "the SIGBUS handler failed"
    );
    let total: u32 = SIGNALS.iter().map(|s| s.load(Ordering::SeqCst)).sum();
    assert_eq!(total as usize, nr / 2, "SIGBUS count");
    for i in 0..nr {
        let want = u32::from(i % 2 == 0);
        assert_eq!(
            SIGNALS[i].load(Ordering::SeqCst),
            want,
            "page {i}: SIGBUS count"
        );
        assert_eq!(poisoned[i], want, "page {i}: poisoned");
        if want == 1 {
            // A memory error (BUS_MCEERR_AR) on kernels with
            // CONFIG_MEMORY_FAILURE, a plain BUS_ADRERR without it.
            let code = CODES[i].load(Ordering::SeqCst);
            assert!(
                code == libc::BUS_MCEERR_AR || code == libc::BUS_ADRERR,
                "page {i}: si_code {code}"
            );
        }
    }
}

fn poison(mem: Mem) {
    let Some(uffd) = uffd_with(Features::POISON) else {
        return;
    };
    drop(uffd);
    run_in_child(&format!("poison:{}", mem.name()), mem);
}

on_all_mems!(poison, super::poison);

// ===========================================================================
// events, events-wp
// ===========================================================================

#[derive(Default, Debug)]
struct EventCounts {
    missing: Vec<u32>,
    wp: Vec<u32>,
    remaps: Vec<(usize, usize, usize)>,
    removes: Vec<(usize, usize)>,
    /// Faults read after their range was removed and unregistered: the
    /// resolution finds the range gone, and the thread is woken.
    late: usize,
    errors: Vec<String>,
}

/// What the forked child of the events scenario does
/// (`faulting_process(0)`), with memory accesses and raw system calls
/// only: reads (and writes back) the first half of the pages, moves the
/// area with `mremap`, does the same with the second half, releases all
/// pages, and checks that they read zero. Returns its exit code: 0, or
/// which step failed.
fn events_child(base: usize, to: usize, page: usize, nr: usize, mem: Mem) -> i32 {
    let len = page * nr;
    let half = nr.div_ceil(2);
    let check = |at: usize, i: usize| -> bool {
        let want = seed(i);
        for b in 0..page {
            // SAFETY: the area is mapped in this child.
            if unsafe { std::ptr::read_volatile((at + b) as *const u8) } != want {
                return false;
            }
        }
        // Write the same value back: a write-protect fault for events-wp.
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(at as *mut u8, want) };
        true
    };
    for i in 0..half {
        if !check(base + i * page, i) {
            return 10;
        }
    }
    // SAFETY: moves this child's own mapping onto its own reservation.
    let moved = unsafe {
        libc::mremap(
            base as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    if moved == libc::MAP_FAILED {
        return 11;
    }
    if moved as usize != to {
        return 12;
    }
    for i in half..nr {
        if !check(to + i * page, i) {
            return 13;
        }
    }
    if release(mem, to, len) != 0 {
        return 14;
    }
    for b in 0..len {
        // SAFETY: the area is mapped at `to` now.
        if unsafe { std::ptr::read_volatile((to + b) as *const u8) } != 0 {
            return 15;
        }
    }
    0
}

/// `uffd_events_test_common`: with `EVENT_FORK`, `EVENT_REMAP` and
/// `EVENT_REMOVE`, a forked child faults on the first half of the area,
/// moves it with `mremap`, faults on the second half, releases it and reads
/// zeros. The handler follows the child: it takes the child's userfaultfd
/// from the Fork event, serves every missing fault with a copy
/// (write-protected for `events-wp`, whose write-back then faults and is
/// unprotected), moves its idea of the area on Remap, and unregisters what
/// a Remove frees. Every page faults exactly once (and once more for
/// write-protect in `events-wp`), one Remap and Removes covering the area
/// arrive, and the child reads the freed pages as zeros. A fault on a
/// freed page that the kernel still queues after the range was
/// unregistered (a race seen on private memory) is woken, not served.
fn events(mem: Mem, wp: bool) {
    let _forking = forking();
    let mut features = Features::EVENT_FORK | Features::EVENT_REMAP | Features::EVENT_REMOVE;
    if wp {
        features |= Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM;
    }
    let Some(uffd) = uffd_with(features) else {
        return;
    };
    let page = mem.page_size(&uffd);
    let nr = mem.pages(16, 2);
    let Some(area) = Area::new(mem, page, nr) else {
        return;
    };
    let len = area.len();
    let base = area.addr(0);
    let (_reservation, to) = aligned_reservation(len, page);
    let mut mode = RegisterMode::MISSING;
    if wp {
        mode |= RegisterMode::WP;
    }
    // SAFETY: a fresh mapping that this process never touches; only the
    // forked child does, served by the handler.
    unsafe { uffd.register(base, len, mode) }.unwrap();
    let parent = Arc::new(uffd);
    let src = seeded(page, nr);

    let stop = Stop::new();
    let stop2 = stop.clone();
    let parent2 = Arc::clone(&parent);
    let handler = bounded("the events handler", move || {
        let mut n = EventCounts {
            missing: vec![0; nr],
            wp: vec![0; nr],
            ..Default::default()
        };
        let mut child: Option<Uffd> = None;
        let mut area_at = base;
        let mut pbuf = EventBuffer::new(4);
        // One message per read, as the kernel's test: a Remove is handled
        // (its range unregistered) before anything queued after it is read.
        let mut cbuf = EventBuffer::new(1);
        loop {
            let cfd = child.as_ref().map_or(-1, |c| c.as_raw_fd());
            let [p, c, stopped] = poll_in([parent2.as_raw_fd(), cfd, stop2.0.as_raw_fd()]);
            if p {
                match parent2.read_events(&mut pbuf) {
                    Ok(_) => {
                        while let Some(e) = pbuf.next_event() {
                            match e.unwrap() {
                                Event::Fork(f) if child.is_none() => child = Some(f.into_uffd()),
                                other => n.errors.push(format!("parent: unexpected {other:?}")),
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read_events: {e}"),
                }
            }
            if c {
                let cu = child.as_ref().unwrap();
                match cu.read_events(&mut cbuf) {
                    Ok(_) => {
                        while let Some(e) = cbuf.next_event() {
                            child_event(cu, e.unwrap(), &mut area_at, &mut n, &src, page, len, wp);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read_events: {e}"),
                }
            }
            if stopped && !p && !c {
                let left = child
                    .as_ref()
                    .is_some_and(|c| readable_within(c.as_raw_fd(), 0));
                assert!(!left, "a message left on the child's uffd");
                return n;
            }
        }
    });

    // The fork waits until the handler has read its event.
    let pid = raw_fork();
    if pid == 0 {
        let code = events_child(base, to, page, nr, mem);
        // SAFETY: leaving the child without running anything of the parent.
        unsafe { libc::_exit(code) };
    }
    // Bounded (the child is killed if it hangs); the handler's view is
    // wanted either way.
    let status = std::panic::catch_unwind(|| wait_child(pid));
    stop.fire();
    let n = handler.wait();
    let status = status.unwrap_or_else(|_| {
        panic!(
            "{}: the faulting child hung and was killed; the handler saw {n:?}",
            mem.name()
        )
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{}: the faulting child {} (10: bad data before mremap, 11/12: mremap, \
         13: bad data after, 14: release, 15: freed pages not zero); handler saw {n:?}",
        mem.name(),
        wait_status_text(status)
    );
    assert!(n.errors.is_empty(), "{:?}", n.errors);
    if n.late > 0 {
        eprintln!(
            "events on {}: {} fault(s) queued after their range was unregistered",
            mem.name(),
            n.late
        );
    }
    assert!(n.late <= nr, "{n:?}");
    assert_eq!(n.missing, vec![1; nr], "missing faults per page");
    assert_eq!(
        n.wp,
        vec![u32::from(wp); nr],
        "write-protect faults per page"
    );
    assert_eq!(n.remaps, vec![(base, to, len)]);
    let mut removed: Vec<(usize, usize)> = n.removes.clone();
    removed.sort();
    let mut covered = to;
    for (s, e) in &removed {
        assert!(*s <= covered, "a gap in the removed ranges {removed:x?}");
        covered = covered.max(*e);
    }
    assert!(
        removed.first().is_some_and(|r| r.0 == to) && covered == to + len,
        "the Removes {removed:x?} do not cover {to:#x}..{:#x}",
        to + len
    );
    assert!(!readable_within(parent.as_raw_fd(), 0), "a stray event");
}

#[allow(clippy::too_many_arguments)]
fn child_event(
    uffd: &Uffd,
    e: Event,
    area_at: &mut usize,
    n: &mut EventCounts,
    src: &[u8],
    page: usize,
    len: usize,
    wp: bool,
) {
    let index = |f: &PageFault, at: usize| -> Option<usize> {
        let p = f.page_start(page);
        (p >= at && p < at + len).then(|| (p - at) / page)
    };
    match e {
        Event::PageFault(f) => {
            let Some(i) = index(&f, *area_at) else {
                return n.errors.push(format!("fault outside the area: {f:?}"));
            };
            let at = *area_at + i * page;
            if n.removes.iter().any(|&(s, e)| s <= at && at < e) {
                // A fault that raced with the unregistering of its range
                // (seen on private memory: the kernel's wake at
                // UFFDIO_UNREGISTER can come before a fault that still saw
                // the range registered queues itself). Resolving it finds
                // the range gone; the thread sleeps until woken.
                let r = uffd.copy(at, &src[i * page..(i + 1) * page], CopyFlags::empty());
                match r {
                    Err(e) if e.kind() == ErrorKind::RangeGone => {}
                    other => n
                        .errors
                        .push(format!("copy into a removed range: {other:?}")),
                }
                uffd.wake(at, page).unwrap();
                n.late += 1;
                return;
            }
            match f.kind() {
                FaultKind::Missing => {
                    n.missing[i] += 1;
                    let flags = if wp {
                        CopyFlags::WP
                    } else {
                        CopyFlags::empty()
                    };
                    match uffd.copy(at, &src[i * page..(i + 1) * page], flags) {
                        Ok(_) => {}
                        Err(e) if e.kind() == ErrorKind::Exists => uffd.wake(at, page).unwrap(),
                        Err(e) => n.errors.push(format!("copy at page {i}: {e}")),
                    }
                }
                FaultKind::WriteProtect => {
                    n.wp[i] += 1;
                    if let Err(e) = uffd.write_unprotect(at, page, UnprotectFlags::empty()) {
                        n.errors.push(format!("unprotect page {i}: {e}"));
                    }
                }
                _ => n.errors.push(format!("unexpected fault {f:?}")),
            }
        }
        Event::Remap(r) => {
            n.remaps.push((r.from, r.to, r.len));
            *area_at = r.to;
        }
        Event::Remove(r) => {
            n.removes.push((r.start, r.end));
            if let Err(e) = uffd.unregister(r.start, r.end - r.start) {
                n.errors.push(format!("unregister after Remove: {e}"));
            }
        }
        other => n.errors.push(format!("child: unexpected {other:?}")),
    }
}

fn events_plain(mem: Mem) {
    events(mem, false);
}

fn events_wp(mem: Mem) {
    events(mem, true);
}

on_all_mems!(events, super::events_plain);
on_all_mems!(events_wp, super::events_wp);

// ===========================================================================
// mmap-changing
// ===========================================================================

/// `uffd_mmap_changing_test`: while a Remove event (`MADV_REMOVE` on shmem)
/// is unread, every resolution ioctl — COPY, ZEROPAGE, MOVE, POISON,
/// CONTINUE, and (beyond the kernel's test) WRITEPROTECT — fails with
/// `EAGAIN`: the kernel writes `-EAGAIN` into the progress field (checked
/// on raw `sys` calls), and the crate reports `ErrorKind::Retry` with zero
/// bytes done, never a cast negative count. Once the event is read, each
/// succeeds on memory where it applies.
fn mmap_changing(mem: Mem) {
    let Some(uffd) = uffd_with(
        Features::EVENT_REMOVE | Features::MOVE | Features::POISON | Features::MINOR_SHMEM,
    ) else {
        return;
    };
    let page = mem.page_size(&uffd);
    // Pages: 0 removed, 1 continued, 2 copied, 3 zeroed, 4 poisoned,
    // 5 write-protected.
    let Some(area) = Area::new(mem, page, 6) else {
        return;
    };
    // MOVE works on anonymous memory only: a second, anonymous range on the
    // same userfaultfd (the changing state is per userfaultfd).
    let anon_dst = Mapping::anon(page);
    let anon_src = Mapping::anon(page);
    // A fork (of another test) would share the source page with the child,
    // and MOVE refuses shared pages (EBUSY): as the kernel's move test.
    madvise(anon_src.addr, page, libc::MADV_DONTFORK).unwrap();
    write_at(anon_src.addr, 0x3c);
    // SAFETY: fresh mappings; only the calls below fill them.
    unsafe {
        uffd.register(
            area.addr(0),
            area.len(),
            RegisterMode::MISSING | RegisterMode::MINOR | RegisterMode::WP,
        )
        .unwrap();
        uffd.register(anon_dst.addr, page, RegisterMode::MISSING)
            .unwrap();
    }
    // Page 1 in the page cache, for continue; page 0 too, to be removed.
    write_at(area.alias().addr + page, 0x11);
    write_at(area.alias().addr, 0x22);
    let data = vec![0x77u8; page];

    let (a0, alen) = (area.addr(0), page);
    let remover = bounded("the MADV_REMOVE thread", move || {
        release(Mem::Shmem, a0, alen)
    });
    // The Remove is queued (and the address space marked changing) before
    // the thread waits for it to be read.
    wait_readable(uffd.as_raw_fd());
    assert!(!remover.is_finished());

    let retry = |r: tokio_uffd::Result<usize>, what: &str| {
        let e = expect_kind(r, ErrorKind::Retry, libc::EAGAIN, what);
        assert_eq!(e.bytes_done(), 0, "{what}");
    };
    retry(uffd.copy(area.addr(2), &data, CopyFlags::empty()), "copy");
    retry(
        uffd.zeropage(area.addr(3), page, ZeropageFlags::empty()),
        "zeropage",
    );
    // SAFETY: our own anonymous source page, that nothing references.
    retry(
        unsafe { uffd.move_pages(anon_dst.addr, anon_src.addr, page, MoveFlags::empty()) },
        "move",
    );
    retry(
        uffd.poison(area.addr(4), page, PoisonFlags::empty()),
        "poison",
    );
    retry(
        uffd.continue_range(area.addr(1), page, ContinueFlags::empty()),
        "continue",
    );
    let e = uffd.write_protect(area.addr(5), page).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Retry, "write_protect: {e}");

    // The raw calls: -1/EAGAIN, and -EAGAIN in the progress field (set to 1
    // first to see that the kernel wrote it).
    let fd = uffd.as_raw_fd();
    let neg = -(libc::EAGAIN as i64);
    let range = |i: usize| sys::uffdio_range {
        start: area.addr(i) as u64,
        len: page as u64,
    };
    let check = |r: std::io::Result<()>, field: i64, what: &str| {
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EAGAIN), "{what}");
        assert_eq!(field, neg, "{what}: progress field");
    };
    let mut copy = sys::uffdio_copy {
        dst: area.addr(2) as u64,
        src: data.as_ptr() as u64,
        len: page as u64,
        mode: 0,
        copy: 1,
    };
    // SAFETY: each of these five calls passes its request's argument type.
    // Were one to succeed, it would only fill a missing page of our own
    // area (or move our own anonymous page), which the checks then report.
    let r = unsafe { sys::ioctl(fd, sys::UFFDIO_COPY, &mut copy) };
    check(r, copy.copy, "UFFDIO_COPY");
    let mut zero = sys::uffdio_zeropage {
        range: range(3),
        mode: 0,
        zeropage: 1,
    };
    // SAFETY: see above.
    let r = unsafe { sys::ioctl(fd, sys::UFFDIO_ZEROPAGE, &mut zero) };
    check(r, zero.zeropage, "UFFDIO_ZEROPAGE");
    let mut mv = sys::uffdio_move {
        dst: anon_dst.addr as u64,
        src: anon_src.addr as u64,
        len: page as u64,
        mode: 0,
        move_: 1,
    };
    // SAFETY: see above.
    let r = unsafe { sys::ioctl(fd, sys::UFFDIO_MOVE, &mut mv) };
    check(r, mv.move_, "UFFDIO_MOVE");
    let mut poison = sys::uffdio_poison {
        range: range(4),
        mode: 0,
        updated: 1,
    };
    // SAFETY: see above.
    let r = unsafe { sys::ioctl(fd, sys::UFFDIO_POISON, &mut poison) };
    check(r, poison.updated, "UFFDIO_POISON");
    let mut cont = sys::uffdio_continue {
        range: range(1),
        mode: 0,
        mapped: 1,
    };
    // SAFETY: see above.
    let r = unsafe { sys::ioctl(fd, sys::UFFDIO_CONTINUE, &mut cont) };
    check(r, cont.mapped, "UFFDIO_CONTINUE");

    // Read the event: the remover goes on, and every call succeeds.
    let mut buf = EventBuffer::new(4);
    match next_event(&uffd, &mut buf) {
        Event::Remove(r) => assert_eq!((r.start, r.end), (area.addr(0), area.addr(1))),
        other => panic!("expected Remove, got {other:?}"),
    }
    assert_eq!(remover.wait(), 0, "MADV_REMOVE failed");
    assert_eq!(
        uffd.copy(area.addr(2), &data, CopyFlags::empty()).unwrap(),
        page
    );
    assert_eq!(
        uffd.zeropage(area.addr(3), page, ZeropageFlags::empty())
            .unwrap(),
        page
    );
    // SAFETY: as above.
    let moved =
        unsafe { uffd.move_pages(anon_dst.addr, anon_src.addr, page, MoveFlags::empty()) }.unwrap();
    assert_eq!(moved, page);
    assert_eq!(
        uffd.poison(area.addr(4), page, PoisonFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(
        uffd.continue_range(area.addr(1), page, ContinueFlags::empty())
            .unwrap(),
        page
    );
    uffd.write_protect(area.addr(5), page).unwrap();
    assert_eq!(read_in_thread(area.addr(1)).wait(), 0x11);
    assert_eq!(read_in_thread(area.addr(2)).wait(), 0x77);
    assert_eq!(read_in_thread(area.addr(3)).wait(), 0);
    assert_eq!(read_in_thread(anon_dst.addr).wait(), 0x3c);
    assert!(!readable_within(uffd.as_raw_fd(), 0), "a stray event");
}

on_mems!(mmap_changing, super::mmap_changing, [shmem => Shmem]);
