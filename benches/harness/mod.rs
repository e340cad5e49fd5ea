//! What the benchmarks measure, shared by the criterion benches
//! (`benches/faults.rs`) and the one-table summary (`benches/summary.rs`).
//!
//! Every crate path is measured next to a raw floor written here with libc
//! only: one thread, `read(2)` of the userfaultfd (blocking, or after
//! `poll(2)`), one `ioctl`. Faults come from the measuring thread itself,
//! one page at a time, on fresh missing pages (re-armed with
//! `MADV_DONTNEED` between batches, outside the timed part).
#![allow(dead_code, unreachable_pub, clippy::missing_safety_doc)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio_uffd::{
    AsyncUffd, CopyFlags, Event, EventBuffer, FaultHandler, FaultRequest, HandlerError,
    MemorySource, PageSource, Region, RegisterMode, Resolution, Server, SourceHandler, Uffd,
    UffdBuilder, ZeropageFlags,
};

// ---------------------------------------------------------------------------
// The raw ABI, by hand, for the floor (independent of the crate)
// ---------------------------------------------------------------------------

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

#[repr(C)]
struct RawApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct RawRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct RawCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct RawZero {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// A raw userfaultfd (blocking unless `nonblock`) with `UFFDIO_API` done
/// and `addr..addr+len` registered MISSING.
fn raw_uffd(nonblock: bool, addr: usize, len: usize) -> OwnedFd {
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = RawApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API with its argument.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
    assert_eq!(rc, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    let mut reg = RawRegister {
        start: addr as u64,
        len: len as u64,
        mode: 1,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER with its argument, on our own fresh mapping.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
    assert_eq!(rc, 0, "register: {}", std::io::Error::last_os_error());
    fd
}

/// One raw resolution of `len` bytes at `addr`; `EEXIST` wakes instead.
fn raw_resolve(fd: RawFd, op: Op, addr: usize, len: usize, src: *const u8) {
    let rc = match op {
        Op::Copy => {
            let mut c = RawCopy {
                dst: addr as u64,
                src: src as u64,
                len: len as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY from a buffer of at least `len` bytes.
            unsafe { libc::ioctl(fd, UFFDIO_COPY, &mut c) }
        }
        Op::Zero => {
            let mut z = RawZero {
                start: addr as u64,
                len: len as u64,
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE with its argument.
            unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE, &mut z) }
        }
    };
    if rc != 0 {
        let mut range = [addr as u64, len as u64];
        // SAFETY: UFFDIO_WAKE with a uffdio_range.
        unsafe { libc::ioctl(fd, UFFDIO_WAKE, range.as_mut_ptr()) };
    }
}

/// The page of a raw page-fault message (`uffd_msg.arg.pagefault.address`
/// at byte 16), for the handlers that use libc only.
fn fault_page(msg: &[u8], page: usize) -> usize {
    u64::from_ne_bytes(msg[16..24].try_into().unwrap()) as usize & !(page - 1)
}

/// The raw floor's handler loop: (poll +) read + one ioctl per fault, the
/// aligned window of `window` pages around it (clipped to `base..end`)
/// copied from `image` at the same offset. Ends after serving `sentinel`.
#[allow(clippy::too_many_arguments)]
fn raw_handler(
    fd: RawFd,
    poll: bool,
    op: Op,
    page: usize,
    window: usize,
    base: usize,
    end: usize,
    image: &[u8],
    sentinel: usize,
) {
    let mut msg = [0u8; 32];
    loop {
        if poll {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd.
            unsafe { libc::poll(&mut pfd, 1, -1) };
        }
        // SAFETY: reading one message into a 32-byte buffer.
        let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
        if n != 32 {
            continue; // EAGAIN after a spurious poll wake-up
        }
        let addr = fault_page(&msg, page);
        let wbytes = window * page;
        let start = if addr == sentinel {
            addr
        } else {
            (base + (addr - base) / wbytes * wbytes).max(base)
        };
        let len = if addr == sentinel {
            page
        } else {
            wbytes.min(end - start)
        };
        // A one-page image is the same page for every address.
        let src = if addr == sentinel || image.len() <= page {
            image.as_ptr()
        } else {
            image[start - base..].as_ptr()
        };
        raw_resolve(fd, op, start, len, src);
        if addr == sentinel {
            return;
        }
    }
}

/// The raw floor with a reactor's wait: edge-triggered epoll, reads of up
/// to 16 messages (a short read means the queue is drained, so no read
/// ends in `EAGAIN`), one ioctl per fault. Ends after serving `sentinel`.
fn raw_epoll_handler(fd: RawFd, op: Op, page: usize, sentinel: usize) {
    // SAFETY: plain syscalls on fds this function owns or borrows.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        ep >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above; the epoll fd is ours.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: EPOLL_CTL_ADD with a valid event.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    let mut msgs = [0u8; 32 * 16];
    let mut ready = false;
    loop {
        if !ready {
            let mut out = [libc::epoll_event { events: 0, u64: 0 }];
            // SAFETY: one event slot.
            unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, -1) };
        }
        // SAFETY: reading whole messages into a buffer of 16.
        let n = unsafe { libc::read(fd, msgs.as_mut_ptr().cast(), msgs.len()) };
        if n <= 0 {
            ready = false;
            continue;
        }
        let n = n as usize;
        ready = n == msgs.len();
        for m in msgs[..n].chunks_exact(32) {
            let addr = fault_page(m, page);
            raw_resolve(fd, op, addr, page, page_of_bytes().as_ptr());
            if addr == sentinel {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------

/// How to resolve: copy bytes, or map the zero page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Copy,
    Zero,
}

/// Where the handler runs relative to the faulting thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Both on CPU 0.
    SameCore,
    /// Faulting thread on CPU 0, handler on CPU 1.
    OtherCore,
}

impl Pin {
    fn handler_cpu(self) -> usize {
        match self {
            Pin::SameCore => 0,
            Pin::OtherCore => 1 % cpus(),
        }
    }
}

/// CPUs online (not the calling thread's affinity, which `pin` narrows).
pub fn cpus() -> usize {
    // SAFETY: sysconf reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets the calling thread run anywhere again.
pub fn unpin() {
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..cpus() {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// An anonymous mapping without transparent huge pages, unmapped on drop.
pub struct Mapping {
    pub addr: usize,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Self {
            addr: p as usize,
            len,
        }
    }

    /// Frees `len` bytes from `addr`: they fault again.
    pub fn rearm(&self, addr: usize, len: usize) {
        // SAFETY: dropping pages of our own mapping.
        let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[inline(always)]
pub fn touch(addr: usize) -> u8 {
    // SAFETY: callers pass addresses inside live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// A page of pattern bytes, the source of every copy.
fn page_of_bytes() -> &'static [u8] {
    static PAGE: OnceLock<Vec<u8>> = OnceLock::new();
    PAGE.get_or_init(|| (0..page_size()).map(|i| i as u8 | 1).collect())
}

/// An image of `len` bytes, shared by the floor and the crate.
pub fn image(len: usize) -> Arc<[u8]> {
    static IMAGE: OnceLock<std::sync::Mutex<Option<Arc<[u8]>>>> = OnceLock::new();
    let cell = IMAGE.get_or_init(Default::default);
    let mut g = cell.lock().unwrap();
    match &*g {
        Some(img) if img.len() >= len => img.clone(),
        _ => {
            let img: Arc<[u8]> = (0..len).map(|i| (i >> 12) as u8 ^ i as u8).collect();
            *g = Some(img.clone());
            img
        }
    }
}

/// Faults `n` pages one at a time from this thread (pinned to CPU 0),
/// cycling through `mem` minus its last page (the sentinel), re-arming
/// between rounds. Returns the time spent faulting.
fn fault_loop(mem: &Mapping, page: usize, n: usize) -> Duration {
    let pages = mem.len / page - 1;
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < n {
        let round = (n - done).min(pages);
        let t0 = Instant::now();
        for i in 0..round {
            touch(mem.addr + i * page);
        }
        total += t0.elapsed();
        done += round;
        mem.rearm(mem.addr, round * page);
    }
    total
}

fn sentinel(mem: &Mapping, page: usize) -> usize {
    mem.addr + mem.len - page
}

// ---------------------------------------------------------------------------
// Fault latency: one faulting thread, one page per fault
// ---------------------------------------------------------------------------

/// The handler under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Raw floor: blocking `read(2)` + one ioctl.
    RawRead,
    /// Raw floor: `poll(2)` + `read(2)` + one ioctl.
    RawPoll,
    /// Raw floor: edge-triggered `epoll_wait(2)` + `read(2)` of up to 16
    /// messages + one ioctl each, as a reactor does it.
    RawEpoll,
    /// The crate's sync API: a blocking `Uffd::read_events` + ioctl.
    Sync,
    /// `EventStream` on a current-thread runtime.
    StreamCurrent,
    /// `EventStream` on a multi-thread runtime.
    StreamMulti,
    /// `Server` with spawned handler tasks, on a current-thread runtime.
    Server,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::RawRead => "raw read+ioctl",
            Path::RawPoll => "raw poll+read+ioctl",
            Path::RawEpoll => "raw epoll+read+ioctl",
            Path::Sync => "sync Uffd",
            Path::StreamCurrent => "EventStream current-thread",
            Path::StreamMulti => "EventStream multi-thread",
            Path::Server => "Server",
        }
    }
}

/// A handler that answers every fault with the zero page.
struct ZeroHandler;

impl FaultHandler for ZeroHandler {
    async fn fault<'a>(
        &'a self,
        _req: &'a FaultRequest,
        _buf: &'a mut [u8],
    ) -> Result<Resolution, HandlerError> {
        Ok(Resolution::Zero)
    }
}

/// A source that hands out the pattern page.
struct PatternSource;

impl PageSource for PatternSource {
    async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let p = page_of_bytes();
        for chunk in buf.chunks_mut(p.len()) {
            chunk.copy_from_slice(&p[..chunk.len()]);
        }
        Ok(())
    }
}

fn resolve_crate(uffd: &Uffd, op: Op, addr: usize, page: usize) {
    let r = match op {
        Op::Copy => uffd.copy(addr, page_of_bytes(), CopyFlags::empty()),
        Op::Zero => uffd.zeropage(addr, page, ZeropageFlags::empty()),
    };
    if r.is_err() {
        let _ = uffd.wake(addr, page);
    }
}

/// A current-thread runtime with what the server needs (I/O and time).
/// The bare `EventStream` handler: resolve every fault until the sentinel.
async fn stream_loop(uffd: Uffd, op: Op, page: usize, sentinel: usize) {
    let uffd = AsyncUffd::new(uffd).unwrap();
    let mut events = uffd.event_stream().unwrap();
    while let Some(Ok(event)) = events.next().await {
        if let Event::PageFault(f) = event {
            let addr = f.page_start(page);
            resolve_crate(&uffd, op, addr, page);
            if addr == sentinel {
                break;
            }
        }
    }
}

/// A crate `Uffd` with all of `mem` registered MISSING.
fn crate_uffd(mem: &Mapping) -> Uffd {
    register_all(UffdBuilder::new(), mem)
}

/// A `Uffd` from `builder` with all of `mem` registered MISSING.
fn register_all(builder: UffdBuilder, mem: &Mapping) -> Uffd {
    let uffd = builder.create().unwrap();
    // SAFETY: the benchmark's own fresh mapping, filled only by the handler
    // under test.
    unsafe { uffd.register(mem.addr, mem.len, RegisterMode::MISSING) }.unwrap();
    uffd
}

fn runtime_current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A current-thread runtime with I/O only: all a bare `EventStream` needs.
fn runtime_current_io() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap()
}

/// CPU time (user and system) of the last handler thread measured with
/// [`on_cpu_clock`], in nanoseconds.
static HANDLER_CPU: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` and records the CPU time this thread spent in it.
fn on_cpu_clock<T>(f: impl FnOnce() -> T) -> T {
    let t0 = thread_cpu();
    let r = f();
    let spent = thread_cpu() - t0;
    HANDLER_CPU.store(
        spent.as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    r
}

/// CPU time of the handler thread in the last [`latency`] run (its
/// runtime's set-up included), for every path but the multi-thread stream.
pub fn last_handler_cpu() -> Duration {
    Duration::from_nanos(HANDLER_CPU.load(std::sync::atomic::Ordering::Relaxed))
}

/// `n` faults through `path`: the time spent faulting.
pub fn latency(path: Path, op: Op, pin_to: Pin, n: usize) -> Duration {
    let page = page_size();
    let batch = 1024.min(n.max(1));
    let mem = Mapping::new((batch + 1) * page);
    let sentinel = sentinel(&mem, page);
    let hcpu = pin_to.handler_cpu();
    pin(0);
    let elapsed = match path {
        Path::RawRead | Path::RawPoll => {
            let poll = path == Path::RawPoll;
            let fd = raw_uffd(poll, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    raw_handler(
                        raw,
                        poll,
                        op,
                        page,
                        1,
                        0,
                        usize::MAX,
                        page_of_bytes(),
                        sentinel,
                    )
                });
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            drop(fd);
            t
        }
        Path::RawEpoll => {
            let fd = raw_uffd(true, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| raw_epoll_handler(raw, op, page, sentinel));
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            drop(fd);
            t
        }
        Path::Sync => {
            let uffd = Arc::new(register_all(UffdBuilder::new().blocking(true), &mem));
            let u = uffd.clone();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    let mut buf = EventBuffer::new(16);
                    loop {
                        if u.read_events(&mut buf).is_err() {
                            continue;
                        }
                        while let Some(Ok(Event::PageFault(f))) = buf.next_event() {
                            let addr = f.page_start(page);
                            resolve_crate(&u, op, addr, page);
                            if addr == sentinel {
                                return;
                            }
                        }
                    }
                })
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            t
        }
        Path::StreamCurrent => {
            let uffd = crate_uffd(&mem);
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    runtime_current_io().block_on(stream_loop(uffd, op, page, sentinel))
                })
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            t
        }
        Path::Server => {
            let uffd = crate_uffd(&mem);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    runtime_current().block_on(async move {
                        let uffd = AsyncUffd::new(uffd).unwrap();
                        let handle = match op {
                            Op::Copy => {
                                Server::new(uffd, SourceHandler::new(PatternSource)).spawn()
                            }
                            Op::Zero => Server::new(uffd, ZeroHandler).spawn(),
                        };
                        ready_tx.send(()).unwrap();
                        let _ = stop_rx.await;
                        handle.shutdown().await.unwrap();
                    })
                })
            });
            ready_rx.recv().unwrap();
            let t = fault_loop(&mem, page, n);
            let _ = stop_tx.send(());
            handler.join().unwrap();
            t
        }
        Path::StreamMulti => {
            let uffd = crate_uffd(&mem);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .on_thread_start(move || pin(hcpu))
                .enable_io()
                .build()
                .unwrap();
            let task = rt.spawn(stream_loop(uffd, op, page, sentinel));
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            rt.block_on(task).unwrap();
            t
        }
    };
    unpin();
    elapsed
}

// ---------------------------------------------------------------------------
// Throughput: several faulting threads
// ---------------------------------------------------------------------------

/// The handler side of the throughput and fault-around figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The raw floor (blocking read + one ioctl, one thread).
    Raw,
    /// The crate's `Server` on a current-thread runtime.
    Server,
}

/// Runs the server for `uffd` with `make` on its own current-thread
/// runtime thread until the returned guard is dropped.
/// The runtime a benchmark's server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// Current-thread, on the server's thread.
    Current,
    /// Multi-thread (as `#[tokio::main]` builds), a worker per CPU.
    Multi,
}

struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    fn start<F>(uffd: Uffd, runtime: Runtime, cpu: Option<usize>, make: F) -> Self
    where
        F: FnOnce(AsyncUffd) -> tokio_uffd::ServerHandle + Send + 'static,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin(cpu);
            }
            let rt = match runtime {
                Runtime::Current => runtime_current(),
                Runtime::Multi => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cpus())
                    .enable_all()
                    .build()
                    .unwrap(),
            };
            rt.block_on(async move {
                let handle = make(AsyncUffd::new(uffd).unwrap());
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
                handle.shutdown().await.unwrap();
            })
        });
        ready_rx.recv().unwrap();
        Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

/// `threads` faulting threads, `per_thread` faults each (one page at a
/// time, fresh pages): the wall time for all of them.
pub fn throughput(side: Side, threads: usize, per_thread: usize) -> Duration {
    let page = page_size();
    let slice = 512.min(per_thread.max(1));
    let mem = Arc::new(Mapping::new((threads * slice + 1) * page));
    let sentinel = sentinel(&mem, page);
    let raw_fd;
    let mut guard = None;
    let mut raw_handler_thread = None;
    match side {
        Side::Raw => {
            let fd = raw_uffd(false, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            raw_handler_thread = Some(std::thread::spawn(move || {
                raw_handler(
                    raw,
                    false,
                    Op::Copy,
                    page,
                    1,
                    0,
                    usize::MAX,
                    page_of_bytes(),
                    sentinel,
                )
            }));
            raw_fd = Some(fd);
        }
        Side::Server => {
            let uffd = crate_uffd(&mem);
            guard = Some(ServerThread::start(uffd, Runtime::Current, None, |u| {
                Server::new(u, SourceHandler::new(PatternSource)).spawn()
            }));
            raw_fd = None;
        }
    }
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let mem = mem.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let base = mem.addr + t * slice * page;
                barrier.wait();
                let mut done = 0;
                while done < per_thread {
                    let round = (per_thread - done).min(slice);
                    for i in 0..round {
                        touch(base + i * page);
                    }
                    done += round;
                    mem.rearm(base, round * page);
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = t0.elapsed();
    if let Some(h) = raw_handler_thread {
        touch(sentinel);
        h.join().unwrap();
    }
    drop(guard);
    drop(raw_fd);
    elapsed
}

// ---------------------------------------------------------------------------
// Fault-around: a sequential restore
// ---------------------------------------------------------------------------

/// A sequential restore of `mib` MiB from an in-memory image, resolving an
/// aligned window of `window` pages per fault: the wall time. The
/// faulting thread and the handler share CPU 0.
pub fn fault_around(side: Side, window: usize, mib: usize) -> Duration {
    pin(0);
    let page = page_size();
    let len = mib << 20;
    let img = image(len);
    let mem = Mapping::new(len + page);
    let sentinel = sentinel(&mem, page);
    let base = mem.addr;
    let elapsed;
    match side {
        Side::Raw => {
            let fd = raw_uffd(false, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            let img2 = img.clone();
            let h = std::thread::spawn(move || {
                raw_handler(
                    raw,
                    false,
                    Op::Copy,
                    page,
                    window,
                    base,
                    base + len,
                    &img2,
                    sentinel,
                )
            });
            let t0 = Instant::now();
            for p in 0..len / page {
                touch(base + p * page);
            }
            elapsed = t0.elapsed();
            touch(sentinel);
            h.join().unwrap();
        }
        Side::Server => {
            let uffd = crate_uffd(&mem);
            let source = MemorySource::new(img.clone());
            let guard = ServerThread::start(uffd, Runtime::Current, Some(0), move |u| {
                Server::new(u, SourceHandler::new(source))
                    .regions([Region::new(base..base + len)])
                    .unwrap()
                    .prefetch(window)
                    .spawn()
            });
            let t0 = Instant::now();
            for p in 0..len / page {
                touch(base + p * page);
            }
            elapsed = t0.elapsed();
            drop(guard);
        }
    }
    // Check a few bytes: a fast wrong restore is no restore.
    for off in [0, len / 2 + 17, len - 1] {
        assert_eq!(touch(base + off), img[off], "restored byte at {off:#x}");
    }
    unpin();
    elapsed
}

// ---------------------------------------------------------------------------
// Slow page sources: what async is for
// ---------------------------------------------------------------------------

/// How long the stand-in for a disk read or a network round trip takes.
pub const SLOW_FETCH: Duration = Duration::from_micros(200);

/// A precise async delay: one timer thread sleeps until the earliest
/// deadline and wakes the futures whose time has come (Tokio's timer
/// rounds to a millisecond, which would turn 200 us into 1 ms). Stands in
/// for a network round trip or an asynchronous disk read: the fetching
/// task is woken by another thread when the data is there.
struct Timer {
    state: std::sync::Mutex<Vec<(Instant, Arc<WakerSlot>)>>,
    cv: std::sync::Condvar,
}

/// Where a pending [`Delay`] keeps the waker of its latest poll, as a real
/// timer or socket does: polled again (say by another task), it replaces
/// the waker instead of adding a second one to wake.
type WakerSlot = std::sync::Mutex<Option<std::task::Waker>>;

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            state: std::sync::Mutex::new(Vec::new()),
            cv: std::sync::Condvar::new(),
        }));
        std::thread::spawn(move || {
            let mut due = t.state.lock().unwrap();
            loop {
                let now = Instant::now();
                let mut i = 0;
                while i < due.len() {
                    if due[i].0 <= now {
                        if let Some(w) = due.swap_remove(i).1.lock().unwrap().take() {
                            w.wake();
                        }
                    } else {
                        i += 1;
                    }
                }
                let next = due.iter().map(|d| d.0).min();
                due = match next {
                    Some(at) => t.cv.wait_timeout(due, at - now).unwrap().0,
                    None => t.cv.wait(due).unwrap(),
                };
            }
        });
        t
    })
}

/// Resolves `SLOW_FETCH` after it is first polled.
#[derive(Default)]
struct Delay {
    at: Option<Instant>,
    slot: Option<Arc<WakerSlot>>,
}

impl std::future::Future for Delay {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let at = *self.at.get_or_insert_with(|| Instant::now() + SLOW_FETCH);
        if Instant::now() >= at {
            return std::task::Poll::Ready(());
        }
        if let Some(slot) = &self.slot {
            let mut w = slot.lock().unwrap();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            return std::task::Poll::Pending;
        }
        let slot = Arc::new(std::sync::Mutex::new(Some(cx.waker().clone())));
        self.slot = Some(slot.clone());
        let t = timer();
        let mut due = t.state.lock().unwrap();
        let earliest = due.iter().map(|d| d.0).min();
        due.push((at, slot));
        // The timer thread only needs waking for a new earliest deadline.
        if earliest.is_none_or(|e| at < e) {
            t.cv.notify_one();
        }
        std::task::Poll::Pending
    }
}

/// A source whose every read takes `SLOW_FETCH`.
struct SlowSource;

impl PageSource for SlowSource {
    async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        Delay::default().await;
        buf.fill(7);
        Ok(())
    }
}

/// `threads` faulting threads, `per_thread` faults each, every page taking
/// `SLOW_FETCH` to fetch: the wall time. `Side::Server` runs on a
/// multi-thread runtime, as an application waiting on many fetches would;
/// `Side::Raw` is a synchronous one-thread handler that sleeps per fault,
/// like a blocking fetch.
pub fn slow_source(side: Side, threads: usize, per_thread: usize) -> Duration {
    let page = page_size();
    let mem = Arc::new(Mapping::new((threads * per_thread + 1) * page));
    let sentinel = sentinel(&mem, page);
    let mut guard = None;
    let mut raw = None;
    match side {
        Side::Raw => {
            let fd = raw_uffd(false, mem.addr, mem.len);
            let rawfd = fd.as_raw_fd();
            let h = std::thread::spawn(move || {
                let mut msg = [0u8; 32];
                loop {
                    // SAFETY: one message into a 32-byte buffer.
                    let n = unsafe { libc::read(rawfd, msg.as_mut_ptr().cast(), 32) };
                    if n != 32 {
                        continue;
                    }
                    let addr = fault_page(&msg, page);
                    if addr != sentinel {
                        std::thread::sleep(SLOW_FETCH);
                    }
                    raw_resolve(rawfd, Op::Copy, addr, page, page_of_bytes().as_ptr());
                    if addr == sentinel {
                        return;
                    }
                }
            });
            raw = Some((fd, h));
        }
        Side::Server => {
            let uffd = crate_uffd(&mem);
            guard = Some(ServerThread::start(uffd, Runtime::Multi, None, |u| {
                Server::new(u, SourceHandler::new(SlowSource))
                    .concurrency(64)
                    .spawn()
            }));
        }
    }
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let mem = mem.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    touch(mem.addr + (t * per_thread + i) * page);
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = t0.elapsed();
    if let Some((fd, h)) = raw {
        touch(sentinel);
        h.join().unwrap();
        drop(fd);
    }
    drop(guard);
    elapsed
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// 64 page-fault messages as the kernel writes them.
pub fn fault_messages() -> Vec<[u8; 32]> {
    (0..64u64)
        .map(|i| {
            let mut m = [0u8; 32];
            m[0] = 0x12;
            m[8..16].copy_from_slice(&(i & 1).to_ne_bytes());
            m[16..24].copy_from_slice(&(0x7f00_0000_0000 + i * 4096).to_ne_bytes());
            m
        })
        .collect()
}

/// Decodes every message `rounds` times: the time taken.
pub fn decode(msgs: &[[u8; 32]], rounds: usize) -> Duration {
    let t0 = Instant::now();
    let mut sum = 0usize;
    for _ in 0..rounds {
        for m in msgs {
            if let Ok(tokio_uffd::RawEvent::Event(Event::PageFault(f))) =
                tokio_uffd::decode_message(std::hint::black_box(m), false)
            {
                sum = sum.wrapping_add(f.address);
            }
        }
    }
    std::hint::black_box(sum);
    t0.elapsed()
}
