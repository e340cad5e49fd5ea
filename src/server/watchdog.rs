//! The stall watchdog: a plain thread, independent of any Tokio runtime,
//! that notices faults that wait too long and says why.
//!
//! A thread that touches registered memory from the runtime that serves it
//! sleeps in the kernel until its fault is resolved, and the server, whose
//! tasks need that very thread, never reads the fault: everything hangs
//! without a word. A handler that never completes leaves its faulting thread
//! asleep just as silently. The watchdog sees both from outside the runtime:
//!
//! - *unread*: `/proc/self/fdinfo/<uffd>` counts the faults queued and not
//!   yet read (`pending:`) and those read whose threads still sleep
//!   (`total:` minus `pending:`; see `userfaultfd_show_fdinfo` in the kernel's
//!   `fs/userfaultfd.c`). Faults pending across checks that span the
//!   threshold, while the server's read counter ([`StallBoard::note_read`])
//!   did not move, mean the server is not reading. The address is unknown
//!   (the message is unread); the threads of this process asleep in
//!   `handle_userfault` (their `/proc/self/task/<tid>/wchan`) are named.
//! - *unresolved*: the server notes each fault it hands to a task or parks
//!   ([`StallBoard::begin`]/[`StallBoard::end`]); an entry older than the
//!   threshold is a stalled fault, reported with its address and thread.
//!
//! Each stalled fault, and each episode of unread faults, is reported once:
//! a `WARN` event (with the `tracing` feature) and [`Stats::last_stall`].
//!
//! [`Stats::last_stall`]: crate::Stats::last_stall

// The server starts the watchdog; until it does, only the tests use it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stats::{Stall, Stats};
use crate::trace::event;

/// Newly stalled faults reported one by one in one check; the rest of them
/// are counted and summed up in one event, so that a source that hangs with
/// thousands of faults in flight does not flood the log.
const REPORT_EACH: usize = 8;

/// What the server shares with its watchdog. Hot path cost: `note_read` is
/// one relaxed atomic add per read(2); `begin`/`end` are called only for
/// faults that go to a spawned task or are parked (the slow path), never for
/// faults resolved inline.
pub(crate) struct StallBoard {
    reads: AtomicU64,
    inner: Mutex<Board>,
}

/// The faults read and not yet resolved, by token. Tokens and start times
/// are taken under the lock, so token order is time order: the oldest
/// entries come first.
#[derive(Default)]
struct Board {
    next: u64,
    entries: BTreeMap<u64, Entry>,
}

struct Entry {
    addr: usize,
    thread: Option<u32>,
    since: Instant,
    reported: bool,
}

impl fmt::Debug for StallBoard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StallBoard")
            .field("reads", &self.reads.load(Relaxed))
            .field("unresolved", &self.lock().entries.len())
            .finish()
    }
}

impl StallBoard {
    /// An empty board.
    pub(crate) fn new() -> Self {
        Self {
            reads: AtomicU64::new(0),
            inner: Mutex::new(Board::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Board> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader did a read(2) of the uffd (whatever it returned): the
    /// server is reading.
    pub(crate) fn note_read(&self) {
        self.reads.fetch_add(1, Relaxed);
    }

    /// A fault at `fault_addr` (by `thread`, if the uffd reports thread ids)
    /// was read and is not resolved yet. Returns the token to pass to
    /// [`end`](Self::end) once it is resolved, dropped or given up.
    pub(crate) fn begin(&self, fault_addr: usize, thread: Option<u32>) -> u64 {
        let mut board = self.lock();
        let token = board.next;
        board.next += 1;
        board.entries.insert(
            token,
            Entry {
                addr: fault_addr,
                thread,
                since: Instant::now(),
                reported: false,
            },
        );
        token
    }

    /// The fault of `token` is resolved (or dropped). Unknown tokens are
    /// ignored.
    pub(crate) fn end(&self, token: u64) {
        let entry = self.lock().entries.remove(&token);
        if let Some(e) = entry.filter(|e| e.reported) {
            let waited = e.since.elapsed();
            event!(
                debug,
                addr = %format_args!("{:#x}", e.addr),
                thread = ?e.thread,
                waited_ms = waited.as_millis() as u64,
                "a stalled fault was resolved at last"
            );
            let _ = waited;
        }
    }

    /// The threads of the faults read and not resolved, when known.
    fn threads(&self) -> Vec<u32> {
        self.lock()
            .entries
            .values()
            .filter_map(|e| e.thread)
            .collect()
    }
}

/// The stop flag the watchdog thread waits on, and its check count.
struct Control {
    stop: Mutex<bool>,
    wake: Condvar,
    /// Checks done, for tests that wait for the watchdog to look.
    checks: AtomicU64,
}

/// A thread that watches one userfaultfd for stalled faults. Dropping it
/// stops the thread, joins it (promptly: it waits on a condition variable,
/// not in a sleep) and closes its duplicate of the fd.
pub(crate) struct Watchdog {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
    /// The number of the watchdog's duplicate of the uffd.
    fd: RawFd,
    threshold: Duration,
}

impl fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watchdog")
            .field("fd", &self.fd)
            .field("threshold", &self.threshold)
            .field("checks", &self.control.checks.load(Relaxed))
            .finish()
    }
}

impl Watchdog {
    /// Starts a thread (`uffd-watchdog`) that checks every `threshold / 4`
    /// (at least 1 ms) for faults on `uffd` that waited longer than
    /// `threshold`, unread (from `/proc/self/fdinfo`) or read but not
    /// resolved (from `board`), and reports each once, through `tracing`
    /// and `stats`. It dups the fd (`F_DUPFD_CLOEXEC`) so that it can read
    /// `/proc/self/fdinfo/<fd>` whatever happens to the caller's fd.
    ///
    /// # Errors
    ///
    /// If the fd cannot be duplicated or the thread cannot be spawned.
    pub(crate) fn start(
        uffd: BorrowedFd<'_>,
        threshold: Duration,
        board: Arc<StallBoard>,
        stats: Arc<Stats>,
    ) -> io::Result<Watchdog> {
        // std duplicates with F_DUPFD_CLOEXEC.
        let fd = uffd.try_clone_to_owned()?;
        let raw = fd.as_raw_fd();
        let interval = (threshold / 4).max(Duration::from_millis(1));
        let control = Arc::new(Control {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            checks: AtomicU64::new(0),
        });
        let mut state = State {
            fdinfo: format!("/proc/self/fdinfo/{raw}"),
            _fd: fd,
            threshold,
            board,
            stats,
            episode: None,
            fdinfo_failed: false,
        };
        let ctl = Arc::clone(&control);
        let thread = std::thread::Builder::new()
            .name("uffd-watchdog".into())
            .spawn(move || loop {
                {
                    let stop = ctl.stop.lock().unwrap_or_else(|p| p.into_inner());
                    let (stop, _) = ctl
                        .wake
                        .wait_timeout_while(stop, interval, |stop| !*stop)
                        .unwrap_or_else(|p| p.into_inner());
                    if *stop {
                        return;
                    }
                }
                state.check(Instant::now());
                ctl.checks.fetch_add(1, Relaxed);
            })?;
        Ok(Watchdog {
            control,
            thread: Some(thread),
            fd: raw,
            threshold,
        })
    }

    /// Checks done so far.
    #[cfg(test)]
    fn checks(&self) -> u64 {
        self.control.checks.load(Relaxed)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.control.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.control.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the watchdog was already printed; nothing to add.
            let _ = thread.join();
        }
    }
}

/// Faults pending across checks with no read in between.
struct Episode {
    since: Instant,
    /// The board's read count when it began.
    reads: u64,
    /// The threads asleep in a userfault at the episode's second check,
    /// with their context switch counts: those asleep with the same count
    /// when it is reported slept all along.
    suspects: Option<Vec<(u32, u64)>>,
    reported: bool,
}

/// The watchdog thread's state.
struct State {
    fdinfo: String,
    /// The duplicate `fdinfo` names, closed when the thread ends.
    _fd: OwnedFd,
    threshold: Duration,
    board: Arc<StallBoard>,
    stats: Arc<Stats>,
    episode: Option<Episode>,
    fdinfo_failed: bool,
}

/// The counts of `/proc/self/fdinfo/<uffd>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// Faults queued, not yet read.
    pending: u64,
    /// Faults read whose threads still sleep.
    unresolved: u64,
}

/// Parses the `pending:` and `total:` lines of a uffd's fdinfo.
fn parse_counts(fdinfo: &str) -> Option<Counts> {
    let field = |name: &str| {
        fdinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    let pending = field("pending")?;
    let total = field("total")?;
    Some(Counts {
        pending,
        unresolved: total.saturating_sub(pending),
    })
}

/// The threads of this process asleep in a userfault, by their
/// `/proc/self/task/<tid>/wchan`, in tid order, each with its count of
/// context switches: a thread found asleep twice with the same count slept
/// all along (one that wakes and faults again switches again).
fn asleep_in_userfault() -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut tids: Vec<(u32, u64)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
                .is_ok_and(|w| w.trim() == "handle_userfault")
        })
        .map(|tid| (tid, switches(tid).unwrap_or(u64::MAX)))
        .collect();
    tids.sort_unstable();
    tids
}

/// The context switches of thread `tid` so far (voluntary and not).
fn switches(tid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    Some(field("voluntary_ctxt_switches:")? + field("nonvoluntary_ctxt_switches:")?)
}

/// The name of thread `tid` of this process, if it is one.
fn thread_name(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .ok()
        .map(|n| n.trim_end_matches('\n').to_owned())
}

impl State {
    fn check(&mut self, now: Instant) {
        let counts = match std::fs::read_to_string(&self.fdinfo)
            .map_err(|e| e.to_string())
            .and_then(|s| parse_counts(&s).ok_or_else(|| format!("no counts in {s:?}")))
        {
            Ok(c) => c,
            Err(e) => {
                if !self.fdinfo_failed {
                    self.fdinfo_failed = true;
                    event!(
                        warn,
                        path = %self.fdinfo,
                        error = %e,
                        "the userfaultfd watchdog cannot read the fd's counts: \
                         unread faults will not be reported"
                    );
                    let _ = e;
                }
                Counts {
                    pending: 0,
                    unresolved: 0,
                }
            }
        };
        self.check_unread(now, counts);
        self.check_unresolved(now, counts);
    }

    /// Faults queued and not read for the threshold, with no read at all.
    fn check_unread(&mut self, now: Instant, counts: Counts) {
        let reads = self.board.reads.load(Relaxed);
        let same = matches!(&self.episode, Some(ep) if ep.reads == reads);
        if counts.pending == 0 || !same {
            if let Some(ep) = self.episode.take().filter(|ep| ep.reported) {
                event!(
                    debug,
                    waited_ms = now.duration_since(ep.since).as_millis() as u64,
                    "the server reads its userfaultfd again"
                );
                let _ = ep;
            }
            if counts.pending > 0 {
                self.episode = Some(Episode {
                    since: now,
                    reads,
                    suspects: None,
                    reported: false,
                });
            }
            return;
        }
        let Some(ep) = self.episode.as_mut().filter(|ep| !ep.reported) else {
            return;
        };
        if ep.suspects.is_none() {
            ep.suspects = Some(asleep_in_userfault());
        }
        let waited = now.duration_since(ep.since);
        if waited < self.threshold {
            return;
        }
        ep.reported = true;
        // The threads asleep now, those asleep all along since the
        // episode's second check first; minus those whose faults were read.
        let read = self.board.threads();
        let suspects = ep.suspects.take().unwrap_or_default();
        let mut asleep: Vec<(u32, u64)> = asleep_in_userfault()
            .into_iter()
            .filter(|(t, _)| !read.contains(t))
            .collect();
        asleep.sort_by_key(|t| (!suspects.contains(t), t.0));
        let asleep: Vec<u32> = asleep.into_iter().map(|(t, _)| t).collect();
        let named: Vec<String> = asleep
            .iter()
            .map(|&t| match thread_name(t) {
                Some(n) => format!("{t} ({n})"),
                None => t.to_string(),
            })
            .collect();
        let thread = asleep.first().copied();
        let stall = Stall {
            waited,
            fault_addr: None,
            thread,
            thread_name: thread.and_then(thread_name),
            unread: counts.pending,
            unresolved: counts.unresolved,
        };
        event!(
            warn,
            unread = stall.unread,
            unresolved = stall.unresolved,
            waited_ms = waited.as_millis() as u64,
            threads_asleep = %named.join(", "),
            "{stall}"
        );
        let _ = named;
        self.stats.record_stall(stall);
    }

    /// Faults read and not resolved for the threshold.
    fn check_unresolved(&mut self, now: Instant, counts: Counts) {
        let mut due = Vec::new();
        let mut more = 0usize;
        {
            let mut board = self.board.lock();
            for e in board.entries.values_mut() {
                let waited = now.saturating_duration_since(e.since);
                if waited < self.threshold {
                    break; // the rest are younger
                }
                if e.reported {
                    continue;
                }
                e.reported = true;
                if due.len() < REPORT_EACH {
                    due.push((e.addr, e.thread, waited));
                } else {
                    more += 1;
                }
            }
        }
        for (addr, thread, waited) in due {
            let stall = Stall {
                waited,
                fault_addr: Some(addr),
                thread,
                thread_name: thread.and_then(thread_name),
                unread: counts.pending,
                unresolved: counts.unresolved,
            };
            event!(
                warn,
                addr = %format_args!("{addr:#x}"),
                thread = ?stall.thread,
                thread_name = ?stall.thread_name,
                waited_ms = waited.as_millis() as u64,
                "{stall}"
            );
            self.stats.record_stall(stall);
        }
        if more > 0 {
            Stats::add(&self.stats.stalls, more as u64);
            event!(
                warn,
                faults = more,
                threshold_ms = self.threshold.as_millis() as u64,
                "and more faults read and not resolved for longer than the threshold"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RegisterMode, Uffd, ZeropageFlags};
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    use nix::sys::mman::{self, MapFlags, MmapAdvise, ProtFlags};
    use std::ffi::c_void;
    use std::num::NonZeroUsize;
    use std::os::fd::{AsFd, BorrowedFd};
    use std::ptr::NonNull;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    const DEADLINE: Duration = Duration::from_secs(20);

    /// Polls `cond` until it holds, or panics after `DEADLINE`.
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Joins `t`, failing if it does not end within `DEADLINE`.
    fn join<T>(what: &str, t: JoinHandle<T>) -> T {
        wait_for(what, || t.is_finished());
        t.join().expect(what)
    }

    /// An anonymous private mapping of `pages` pages registered for missing
    /// faults with `uffd`; returns its start.
    fn registered(uffd: &Uffd, pages: usize) -> usize {
        let len = pages * uffd.page_size();
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let size = NonZeroUsize::new(len).unwrap();
        // SAFETY: a fresh anonymous mapping; nothing else refers to it.
        let mem = unsafe { mman::mmap_anonymous(None, size, prot, MapFlags::MAP_PRIVATE) }.unwrap();
        let mem = mem.as_ptr() as usize;
        // SAFETY: the mapping is ours; no reference into it exists, and its
        // pages are filled only by the tests' resolutions.
        unsafe { uffd.register(mem, len, RegisterMode::MISSING) }.unwrap();
        mem
    }

    fn unmap(start: usize, len: usize) {
        let start = NonNull::new(start as *mut c_void).unwrap();
        // SAFETY: a mapping made by `registered`, no longer touched.
        unsafe { mman::munmap(start, len) }.unwrap();
    }

    fn gettid() -> u32 {
        crate::sys::gettid()
    }

    #[test]
    fn fdinfo_counts_parse() {
        let s = "pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t7049\npending:\t2\ntotal:\t5\n\
                 API:\taa:80000000:80000000000001ff\n";
        assert_eq!(
            parse_counts(s),
            Some(Counts {
                pending: 2,
                unresolved: 3
            })
        );
        assert_eq!(parse_counts("pos:\t0\n"), None);
    }

    #[test]
    fn unread_fault_is_reported_with_the_sleeping_thread() {
        let uffd = Uffd::new().unwrap();
        let page = uffd.page_size();
        let start = registered(&uffd, 1);
        let board = Arc::new(StallBoard::new());
        let stats = Arc::new(Stats::new());
        let threshold = Duration::from_millis(100);
        let dog = Watchdog::start(uffd.as_fd(), threshold, board, stats.clone()).unwrap();

        let (tid_tx, tid_rx) = mpsc::channel();
        let toucher = std::thread::Builder::new()
            .name("wd-unread".into())
            .spawn(move || {
                tid_tx.send(gettid()).unwrap();
                // SAFETY: the page is mapped; it faults, and the test
                // resolves it with a zero page.
                unsafe { std::ptr::read_volatile(start as *const u8) }
            })
            .unwrap();
        let tid = tid_rx.recv_timeout(DEADLINE).unwrap();

        let begun = Instant::now();
        wait_for("a stall report", || stats.snapshot().stalls >= 1);
        let stall = stats.last_stall().unwrap();
        assert!(
            begun.elapsed() >= threshold,
            "reported too early: {stall:?}"
        );
        assert!(stall.unread >= 1, "{stall:?}");
        assert_eq!(stall.fault_addr, None);
        assert!(stall.waited >= threshold, "{stall:?}");
        assert_eq!(stall.thread, Some(tid), "{stall:?}");
        assert_eq!(stall.thread_name.as_deref(), Some("wd-unread"));
        let msg = stall.to_string();
        assert!(msg.contains("not read"), "{msg}");
        assert!(msg.contains(&tid.to_string()), "{msg}");
        assert!(msg.contains("never touch registered memory"), "{msg}");

        // Once per episode, not at every check.
        let seen = dog.checks();
        wait_for("more checks", || dog.checks() >= seen + 4);
        assert_eq!(stats.snapshot().stalls, 1);

        uffd.zeropage(start, page, ZeropageFlags::empty()).unwrap();
        assert_eq!(join("the toucher", toucher), 0);
        drop(dog);
        unmap(start, page);
    }

    #[test]
    fn unresolved_fault_is_reported_with_its_address() {
        let uffd = Uffd::new().unwrap();
        let board = Arc::new(StallBoard::new());
        let stats = Arc::new(Stats::new());
        let threshold = Duration::from_millis(100);
        let dog = Watchdog::start(uffd.as_fd(), threshold, board.clone(), stats.clone()).unwrap();

        let begun = Instant::now();
        let token = board.begin(0x7f00_dead_0000, Some(4242));
        wait_for("a stall report", || stats.snapshot().stalls >= 1);
        assert!(begun.elapsed() >= threshold);
        let stall = stats.last_stall().unwrap();
        assert_eq!(stall.fault_addr, Some(0x7f00_dead_0000));
        assert_eq!(stall.thread, Some(4242));
        assert!(stall.waited >= threshold, "{stall:?}");
        let msg = stall.to_string();
        assert!(msg.contains("0x7f00dead0000"), "{msg}");
        assert!(msg.contains("4242"), "{msg}");
        assert!(msg.contains("handler"), "{msg}");

        // Reported once; a younger entry is not reported with it.
        let young = board.begin(0x1000, None);
        let seen = dog.checks();
        wait_for("more checks", || dog.checks() >= seen + 2);
        assert_eq!(stats.snapshot().stalls, 1);
        board.end(young);
        board.end(token);
        assert!(board.lock().entries.is_empty());
    }

    #[test]
    fn a_healthy_server_reports_nothing() {
        let uffd = Arc::new(Uffd::new().unwrap());
        let page = uffd.page_size();
        let pages = 64;
        let start = registered(&uffd, pages);
        let board = Arc::new(StallBoard::new());
        let stats = Arc::new(Stats::new());
        let threshold = Duration::from_millis(500);
        let dog = Watchdog::start(uffd.as_fd(), threshold, board.clone(), stats.clone()).unwrap();

        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let server = {
            let (uffd, board, stop, served) =
                (uffd.clone(), board.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut buf = crate::EventBuffer::new(16);
                while !stop.load(Relaxed) {
                    if !uffd.wait_readable(Some(Duration::from_millis(5))).unwrap() {
                        continue;
                    }
                    board.note_read();
                    match uffd.read_events(&mut buf) {
                        Ok(_) => {}
                        Err(e) if e.kind() == crate::ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("{e}"),
                    }
                    while let Some(ev) = buf.next_event() {
                        let crate::Event::PageFault(f) = ev.unwrap() else {
                            continue;
                        };
                        let token = board.begin(f.address, f.thread_id);
                        let at = f.page_start(page);
                        match uffd.zeropage(at, page, ZeropageFlags::empty()) {
                            Ok(_) => {}
                            Err(e) if e.kind() == crate::ErrorKind::Exists => {
                                uffd.wake(at, page).unwrap()
                            }
                            Err(e) => panic!("{e}"),
                        }
                        board.end(token);
                        served.fetch_add(1, Relaxed);
                    }
                }
            })
        };
        // The toucher stops first: the server must serve its last round.
        let stop_touching = Arc::new(AtomicBool::new(false));
        let toucher = {
            let stop = stop_touching.clone();
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    for i in 0..pages {
                        // SAFETY: mapped; the server thread resolves it.
                        unsafe { std::ptr::read_volatile((start + i * page) as *const u8) };
                    }
                    let addr = NonNull::new(start as *mut c_void).unwrap();
                    let advice = MmapAdvise::MADV_DONTNEED;
                    // SAFETY: frees our own private pages; they fault again.
                    unsafe { mman::madvise(addr, pages * page, advice) }.unwrap();
                }
            })
        };
        // Faults served throughout three thresholds' worth of checks.
        let seen = dog.checks();
        wait_for("twelve checks", || dog.checks() >= seen + 12);
        stop_touching.store(true, Relaxed);
        join("the toucher", toucher);
        stop.store(true, Relaxed);
        join("the server", server);
        drop(dog);
        assert!(served.load(Relaxed) > 0);
        assert_eq!(stats.snapshot().stalls, 0, "{:?}", stats.last_stall());
        assert!(board.lock().entries.is_empty());
        unmap(start, pages * page);
    }

    /// How many fds of this process refer to the same open file as `fd`
    /// (by device and inode; each userfaultfd has its own inode on the
    /// kernels this runs on, which the caller checks).
    fn fds_like(fd: RawFd) -> usize {
        use std::os::unix::fs::MetadataExt;
        let key = |p: &std::path::Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
        let want = key(format!("/proc/self/fd/{fd}").as_ref()).unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| key(&e.ok()?.path()))
            .filter(|k| *k == want)
            .count()
    }

    #[test]
    fn drop_joins_promptly_and_closes_the_dup() {
        use std::os::unix::fs::MetadataExt;
        let uffd = Uffd::new().unwrap();
        let other = Uffd::new().unwrap();
        let ino = |u: &Uffd| {
            std::fs::metadata(format!("/proc/self/fd/{}", u.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let distinct = ino(&uffd) != ino(&other);
        drop(other);
        // A long threshold: a watchdog that slept would take 15 s to stop.
        let dog = Watchdog::start(
            uffd.as_fd(),
            Duration::from_secs(60),
            Arc::new(StallBoard::new()),
            Arc::new(Stats::new()),
        )
        .unwrap();
        let dup = dog.fd;
        assert_ne!(dup, uffd.as_raw_fd());
        // SAFETY: `dup` is the watchdog's fd, open until `dog` is dropped.
        let borrowed = unsafe { BorrowedFd::borrow_raw(dup) };
        let flags = FdFlag::from_bits_retain(fcntl(borrowed, FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
        if distinct {
            assert_eq!(fds_like(uffd.as_raw_fd()), 2);
        }
        let begun = Instant::now();
        drop(dog);
        let took = begun.elapsed();
        assert!(took < Duration::from_secs(5), "drop took {took:?}");
        if distinct {
            assert_eq!(fds_like(uffd.as_raw_fd()), 1);
        } else {
            // Older kernels share one anonymous inode among userfaultfds:
            // check only that the dup's number no longer names this one.
            eprintln!("userfaultfds share an inode here: counting by fd number only");
        }
    }
}
