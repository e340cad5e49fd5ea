//! Helpers shared by the integration tests: memory mappings, bounded waits,
//! child processes, and getting a userfaultfd or saying loudly why not.
#![allow(dead_code, unreachable_pub)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tokio_uffd::{ErrorKind, Event, EventBuffer, Features, Uffd, UffdBuilder};

/// How long any wait in a test may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(20);

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Reports loudly that a test cannot run here; under `CI=true` that fails
/// the test.
pub fn skip(why: &str) {
    if in_ci() {
        panic!("CI=true and this test cannot run: {why}");
    }
    eprintln!("\n*** SKIPPED (not in CI): {why} ***\n");
}

/// Builds a userfaultfd, or reports loudly why not (a failure under CI).
pub fn try_uffd(builder: UffdBuilder) -> Option<Uffd> {
    match builder.create() {
        Ok(u) => Some(u),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::PermissionDenied | ErrorKind::Unsupported
            ) =>
        {
            skip(&format!("no userfaultfd on this machine: {e}"));
            None
        }
        Err(e) => panic!("creating a userfaultfd failed: {e}"),
    }
}

/// A userfaultfd with `required` features.
pub fn uffd_with(required: Features) -> Option<Uffd> {
    try_uffd(UffdBuilder::new().require(required))
}

pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The default huge page size, from /proc/meminfo.
pub fn huge_page_size() -> usize {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Hugepagesize in /proc/meminfo");
    kib * 1024
}

/// An mmap'd region, unmapped on drop.
pub struct Mapping {
    pub addr: usize,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize, flags: i32, fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// Anonymous private memory.
    pub fn anon(len: usize) -> Self {
        Self::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).unwrap()
    }

    /// Anonymous shared memory (shmem).
    pub fn shmem(len: usize) -> Self {
        Self::new(len, libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1).unwrap()
    }

    /// Anonymous private hugetlb memory, or None (loudly) if no huge page is
    /// free.
    pub fn hugetlb(len: usize) -> Option<Self> {
        match Self::new(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
        ) {
            Ok(m) => Some(m),
            Err(e) => {
                skip(&format!(
                    "no hugetlb pages ({e}); reserve some: echo 64 > /proc/sys/vm/nr_hugepages"
                ));
                None
            }
        }
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        (self.addr + off) as *mut u8
    }

    /// Reads the byte at `off` (from a thread that may fault).
    pub fn read(&self, off: usize) -> u8 {
        read_at(self.addr + off)
    }

    pub fn slice(&self) -> &[u8] {
        // SAFETY: the mapping is readable for `len` bytes. Only called once
        // every page is resolved.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

pub fn read_at(addr: usize) -> u8 {
    // SAFETY: tests pass addresses of live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

pub fn write_at(addr: usize, v: u8) {
    // SAFETY: tests pass addresses of live, writable mappings.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// A memfd of `len` bytes (hugetlb-backed with `huge`), or None (loudly).
pub fn memfd(len: usize, huge: bool) -> Option<OwnedFd> {
    let flags = libc::MFD_CLOEXEC | if huge { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"tokio-uffd-test".as_ptr(), flags) };
    if fd < 0 {
        skip(&format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        ));
        return None;
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on our fd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
        skip(&format!(
            "ftruncate memfd: {}",
            std::io::Error::last_os_error()
        ));
        return None;
    }
    Some(fd)
}

/// Waits until `fd` is readable, at most `BOUND`.
pub fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, BOUND.as_millis() as i32) };
    assert!(n > 0, "no userfaultfd message within {BOUND:?}");
    assert_eq!(pfd.revents & libc::POLLERR, 0, "POLLERR on the userfaultfd");
}

/// Whether `fd` becomes readable within `ms` milliseconds.
pub fn readable_within(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Reads the next event, waiting at most `BOUND`.
pub fn next_event(uffd: &Uffd, buf: &mut EventBuffer) -> Event {
    if let Some(e) = buf.next_event() {
        return e.unwrap();
    }
    let deadline = Instant::now() + BOUND;
    loop {
        wait_readable(uffd.as_raw_fd());
        match uffd.read_events(buf) {
            Ok(n) => {
                assert!(n > 0);
                return buf.next_event().unwrap().unwrap();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no event within {BOUND:?}");
            }
            Err(e) => panic!("read_events: {e}"),
        }
    }
}

pub fn expect_fault(uffd: &Uffd, buf: &mut EventBuffer) -> tokio_uffd::PageFault {
    match next_event(uffd, buf) {
        Event::PageFault(f) => f,
        other => panic!("expected a page fault, got {other:?}"),
    }
}

/// Number of open fds of this process.
pub fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits for process `pid` to exit, at most `BOUND`; kills it (and fails)
/// if it does not. Returns the raw wait status.
pub fn wait_child(pid: libc::pid_t) -> i32 {
    // SAFETY: plain syscall.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    if !readable_within(pidfd.as_raw_fd(), BOUND.as_millis() as i32) {
        // SAFETY: plain syscalls on our child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        panic!("child {pid} did not exit within {BOUND:?}; killed");
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    status
}

/// `fork()` as the raw system call, without glibc's wrapper.
///
/// glibc's `fork()` takes the malloc locks for the whole system call. With
/// `EVENT_FORK` the system call waits until the Fork event is read, so a
/// handler thread in the same process that allocates would deadlock. The raw
/// call holds no lock of ours. The child may only do async-signal-safe
/// things (no allocation, no locks) and must leave with `_exit`.
pub fn raw_fork() -> libc::pid_t {
    // SAFETY: clone with only SIGCHLD is fork(); the child runs on a copy of
    // the calling thread's stack, as after fork().
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) };
    assert!(pid >= 0, "clone: {}", std::io::Error::last_os_error());
    pid as libc::pid_t
}

/// Forks; the child reads the byte at `addr` and exits with it as its
/// status. Only raw memory access and `_exit` run in the child, so this is
/// safe in a multi-threaded test process. Returns the child's pid.
pub fn fork_reader(addr: usize) -> libc::pid_t {
    let pid = raw_fork();
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let v = std::ptr::read_volatile(addr as *const u8);
            libc::_exit(v as i32);
        }
    }
    pid
}

/// Runs this test binary again with only test `name` (an `#[ignore]`d test
/// that acts as a child entry point) and returns its exit status, killing
/// it if it runs past `BOUND`.
pub fn run_child_test(name: &str, env: &[(&str, &str)]) -> std::process::ExitStatus {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .stdout(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("child test {name} ran past {BOUND:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The byte at `offset` of the test image (served by `MemorySource`s in
/// the server tests): it varies with the offset and the page number.
pub fn image_byte(offset: usize) -> u8 {
    (offset as u8) ^ ((offset >> 12) as u8).wrapping_mul(13) ^ 0x5a
}

/// The first `len` bytes of the test image.
pub fn image(len: usize) -> Vec<u8> {
    (0..len).map(image_byte).collect()
}

/// A userfaultfd with `required` features and a fresh anonymous mapping of
/// `pages` base pages registered for missing faults, or None (loudly).
pub fn registered_anon(pages: usize, required: Features) -> Option<(Uffd, Mapping)> {
    let uffd = uffd_with(required)?;
    let len = pages * uffd.page_size();
    let mem = Mapping::anon(len);
    // SAFETY: a fresh mapping, touched only by the test's threads, whose
    // faults the test resolves.
    unsafe { uffd.register(mem.addr, len, tokio_uffd::RegisterMode::MISSING) }.unwrap();
    Some((uffd, mem))
}

/// A Tokio runtime with two worker threads.
pub fn multi_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A Tokio runtime on the calling thread only.
pub fn current_thread_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `madvise(MADV_DONTNEED)` on `addr..addr + len`; panics if it fails.
pub fn dontneed(addr: usize, len: usize) {
    // SAFETY: tests pass ranges of their own mappings.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    assert_eq!(r, 0, "madvise: {}", std::io::Error::last_os_error());
}

/// Reads the byte at `addr` on a thread of its own (the read may fault and
/// sleep); the byte arrives on the returned channel.
pub fn start_read(addr: usize) -> std::sync::mpsc::Receiver<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read_at(addr));
    });
    rx
}

/// Reads the byte at `addr` on a thread of its own; `None` if the read does
/// not return within `timeout` (the thread is left asleep).
pub fn read_within(addr: usize, timeout: Duration) -> Option<u8> {
    start_read(addr).recv_timeout(timeout).ok()
}

/// Waits until `cond` holds, checking every millisecond, at most `BOUND`;
/// panics naming `what` if it never does.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {BOUND:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops a server (at most `BOUND`), checks that it ended with
/// `ServerExit::Stopped`, and returns its final statistics.
#[cfg(feature = "async")]
pub async fn final_stats(handle: tokio_uffd::ServerHandle) -> tokio_uffd::StatsSnapshot {
    let stats = handle.stats_ref();
    let exit = tokio::time::timeout(BOUND, handle.shutdown())
        .await
        .unwrap_or_else(|_| panic!("the server did not stop within {BOUND:?}"))
        .unwrap();
    assert_eq!(exit, tokio_uffd::ServerExit::Stopped);
    stats.snapshot()
}

/// Runs `f` on a thread of its own and returns its result, waiting at most
/// `BOUND`: for calls that sleep in the kernel until a userfaultfd event is
/// read (`madvise` or `munmap` with `EVENT_REMOVE` or `EVENT_UNMAP`).
pub fn run_bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    join_bounded(what, std::thread::spawn(f))
}

/// Joins `thread`, waiting at most `BOUND`; a panic in it goes on here.
pub fn join_bounded<T>(what: &str, thread: std::thread::JoinHandle<T>) -> T {
    wait_until(what, || thread.is_finished());
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Sends `fd` with `data` over `sock` (`SCM_RIGHTS`).
pub fn send_fd(sock: &std::os::unix::net::UnixStream, fd: i32, data: &[u8]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let iov = [std::io::IoSlice::new(data)];
    let fds = [fd];
    let n = sendmsg::<UnixAddr>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
    assert_eq!(n, data.len(), "sendmsg sent part of the message");
}

/// Receives one fd and up to 64 bytes over `sock`.
pub fn recv_fd(sock: &std::os::unix::net::UnixStream) -> (OwnedFd, Vec<u8>) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut data = vec![0u8; 64];
    let mut cmsg = nix::cmsg_space!(RawFd);
    let (n, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut data)];
        let msg = recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("recvmsg");
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .expect("control messages")
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        (msg.bytes, fds)
    };
    assert!(n > 0, "recvmsg: the peer hung up");
    assert_eq!(fds.len(), 1, "expected one fd, got {fds:?}");
    data.truncate(n);
    // SAFETY: the kernel just installed the fd in our table for us.
    (unsafe { OwnedFd::from_raw_fd(fds[0]) }, data)
}

/// A count of `/proc/self/fdinfo/<fd>` for a userfaultfd: `"pending"`
/// (faults queued, not read) or `"total"` (those and the faults read whose
/// threads still sleep).
pub fn fdinfo_count(fd: RawFd, what: &str) -> usize {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(what)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what}: in the userfaultfd's fdinfo"))
}

/// What thread `tid` of this process sleeps in (`/proc/.../wchan`): for
/// example `handle_userfault`, or `userfaultfd_...` for a fork or madvise
/// waiting for its event to be read.
pub fn wchan(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// A handler that serves the test image (from memory, without a task),
/// except that the pages in `held` wait in `fault` until the test opens
/// them (`open.add_permits`): the deterministic way to hold a fault in
/// flight, or the server's only concurrency permit. `calls` counts the
/// calls of `fault`. With `wake_held`, held pages are only woken (the test
/// fills them itself).
#[cfg(feature = "async")]
pub struct HeldPages {
    pub image: tokio_uffd::MemorySource,
    pub held: Vec<usize>,
    pub wake_held: bool,
    pub open: tokio::sync::Semaphore,
    pub calls: std::sync::atomic::AtomicUsize,
}

#[cfg(feature = "async")]
impl HeldPages {
    /// Serves `image(len)`, holding the pages at `held`.
    pub fn new(len: usize, held: impl IntoIterator<Item = usize>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            image: tokio_uffd::MemorySource::new(image(len)),
            held: held.into_iter().collect(),
            wake_held: false,
            open: tokio::sync::Semaphore::new(0),
            calls: Default::default(),
        })
    }

    /// The calls of `fault` so far.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(feature = "async")]
impl tokio_uffd::FaultHandler for HeldPages {
    fn bytes_for(&self, req: &tokio_uffd::FaultRequest) -> Option<&[u8]> {
        use tokio_uffd::PageSource;
        if self.held.contains(&req.addr) {
            return None;
        }
        self.image.bytes_at(req.offset, req.len)
    }

    async fn fault<'a>(
        &'a self,
        req: &'a tokio_uffd::FaultRequest,
        buf: &'a mut [u8],
    ) -> Result<tokio_uffd::Resolution, tokio_uffd::HandlerError> {
        use tokio_uffd::PageSource;
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.held.contains(&req.addr) {
            tokio::time::timeout(BOUND, self.open.acquire())
                .await
                .map_err(|_| "the test never opened the held pages")??
                .forget();
            if self.wake_held {
                return Ok(tokio_uffd::Resolution::Wake);
            }
        }
        self.image.read_at(req.offset, buf).await?;
        Ok(tokio_uffd::Resolution::Copy)
    }
}

/// A handler whose every page is 0xa5 bytes, wherever it is (no regions
/// needed).
#[cfg(feature = "async")]
pub struct Filled;

#[cfg(feature = "async")]
impl tokio_uffd::FaultHandler for Filled {
    async fn fault<'a>(
        &'a self,
        _req: &'a tokio_uffd::FaultRequest,
        buf: &'a mut [u8],
    ) -> Result<tokio_uffd::Resolution, tokio_uffd::HandlerError> {
        buf.fill(0xa5);
        Ok(tokio_uffd::Resolution::Copy)
    }
}
