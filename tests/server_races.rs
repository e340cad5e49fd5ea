//! The fault server against races with the owner of the memory: pages
//! freed or unmapped while their fault is in flight, a stop or a handler
//! failure while an event is pending, and pages freed without any event.
//!
//! Each race is set up deterministically: a [`Gate`] holds the first handler
//! call until the test has made the change it races with, and a pending
//! event is confirmed by polling the userfaultfd. Faults come from
//! `std::thread`s; every wait is bounded. Outcomes that end in `SIGBUS` run
//! in a child process (this test binary run again, see `run_child_test`).

#![cfg(feature = "async")]

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use tokio_uffd::{
    AsyncUffd, CopyFlags, FaultHandler, FaultRequest, Features, HandlerError, MemorySource, Region,
    RegisterMode, Resolution, Server, ServerExit, SourceHandler,
};

/// How long a child process waits for anything: less than the parent's
/// `BOUND`, so that a child that fails says why instead of being killed.
const CHILD_BOUND: Duration = Duration::from_secs(10);

/// The environment variable that turns an `#[ignore]`d child entry point on.
const CHILD_ENV: &str = "TOKIO_UFFD_RACE_CHILD";

/// Lets a test hold the first handler call until it has set up its race.
#[derive(Default)]
struct Latch {
    /// (entered, released)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
    released: tokio::sync::Notify,
}

impl Latch {
    fn enter(&self) {
        self.state.lock().unwrap().0 = true;
        self.changed.notify_all();
    }

    /// Waits until the held call has been entered, at most `BOUND`.
    fn wait_entered(&self) {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, BOUND, |s| !s.0)
            .unwrap();
        assert!(state.0, "the handler was not called within {BOUND:?}");
    }

    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
        // Stores a permit if the call is not awaiting yet.
        self.released.notify_one();
    }

    /// Blocks the calling thread until released, at most `BOUND`.
    fn wait_released_blocking(&self) {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, BOUND, |s| !s.1)
            .unwrap();
        assert!(state.1, "the handler was not released within {BOUND:?}");
    }

    /// Awaits the release, at most `BOUND`.
    async fn wait_released(&self) {
        tokio::time::timeout(BOUND, self.released.notified())
            .await
            .expect("the handler was not released within BOUND");
    }
}

/// How the held handler call waits for its release.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Awaits: the runtime runs other tasks meanwhile, the server's reader
    /// among them, so events keep being read.
    Task,
    /// Blocks its thread: on a current-thread runtime nothing else runs, so
    /// no event is read meanwhile and a change to the address space stays
    /// pending in the kernel's queue.
    Thread,
}

/// Serves the test image; holds its first call on a [`Latch`] and then
/// serves it, or fails it with `fail`.
struct Gate {
    latch: Arc<Latch>,
    hold: Hold,
    fail: bool,
    inner: SourceHandler<MemorySource>,
    calls: AtomicUsize,
}

impl Gate {
    fn new(latch: Arc<Latch>, hold: Hold, fail: bool, image_len: usize) -> Self {
        Self {
            latch,
            hold,
            fail,
            inner: SourceHandler::new(MemorySource::new(image(image_len))),
            calls: AtomicUsize::new(0),
        }
    }
}

impl FaultHandler for Gate {
    async fn fault<'a>(
        &'a self,
        req: &'a FaultRequest,
        buf: &'a mut [u8],
    ) -> Result<Resolution, HandlerError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            // Not ready at once: the server moves the call into a task of
            // its own, as it does for a handler waiting on a slow source.
            tokio::task::yield_now().await;
            self.latch.enter();
            match self.hold {
                Hold::Task => self.latch.wait_released().await,
                Hold::Thread => self.latch.wait_released_blocking(),
            }
            if self.fail {
                return Err("deliberate failure: the page source is down".into());
            }
        }
        self.inner.fault(req, buf).await
    }
}

/// A `MADV_DONTNEED` of a page whose fault is being resolved (the handler is
/// still fetching it when the Remove is read) must win: the fetched image
/// lands nowhere, the faulting thread and every later read see zeros.
#[test]
fn remove_during_an_inflight_fault_leaves_zeros_not_the_stale_image() {
    let Some((uffd, mem)) = registered_anon(1, Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    assert_ne!(image_byte(7), 0, "the test needs a nonzero image byte");
    let latch = Arc::new(Latch::default());
    let handler = Gate::new(latch.clone(), Hold::Task, false, page);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
            .regions([Region::new(mem.addr..mem.addr + page)])
            .unwrap()
            .spawn();
        let addr = mem.addr;
        let (faulting, later) = tokio::task::spawn_blocking(move || {
            let faulting = start_read(addr + 7);
            latch.wait_entered();
            // Returns once the server has read the Remove and the kernel has
            // zapped the (still missing) page.
            run_bounded("MADV_DONTNEED of the page in flight", move || {
                dontneed(addr, page)
            });
            latch.release();
            let faulting = faulting.recv_timeout(BOUND).ok();
            (faulting, read_within(addr + 7, BOUND))
        })
        .await
        .unwrap();
        assert_eq!(
            faulting,
            Some(0),
            "the faulting thread got the stale image (or hung)"
        );
        assert_eq!(later, Some(0), "the page kept the stale image (or hung)");
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, 1, "{stats:?}");
        assert_eq!(stats.pages_zeroed_after_remove, 1, "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
    });
}

/// A prefetch window split into two runs (a removed page between them),
/// whose second run is unmapped while the handler fetches: its copy fails
/// with `ENOENT` after the first run was copied. The faulting thread must
/// wake with the image, and the removed page must read zero.
#[test]
fn a_prefetch_whose_later_run_was_unmapped_still_wakes_the_faulting_thread() {
    let Some((uffd, mut mem)) = registered_anon(8, Features::EVENT_REMOVE | Features::EVENT_UNMAP)
    else {
        return;
    };
    let page = uffd.page_size();
    // The test unmaps the last two pages itself; dropping `mem` unmaps the
    // rest only, not whatever another test maps into the hole meanwhile.
    mem.len = 6 * page;
    let latch = Arc::new(Latch::default());
    let handler = Gate::new(latch.clone(), Hold::Task, false, 8 * page);
    // Declared after `mem`, so dropped (closing the userfaultfd) before its
    // munmap, which would otherwise wait for the Unmap event to be read.
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
            .regions([Region::new(mem.addr..mem.addr + 8 * page)])
            .unwrap()
            .prefetch(8)
            .spawn();
        let addr = mem.addr;
        let (faulting, removed) = tokio::task::spawn_blocking(move || {
            // The removed page 2 splits the window into pages 0..2 and 3..8.
            run_bounded("MADV_DONTNEED of page 2", move || {
                dontneed(addr + 2 * page, page)
            });
            let faulting = start_read(addr + 1);
            latch.wait_entered();
            // Returns once the server has read the Unmap.
            let r = run_bounded("munmap of pages 6..8", move || {
                // SAFETY: unmapping pages of our own mapping that no thread
                // touches.
                unsafe { libc::munmap((addr + 6 * page) as *mut libc::c_void, 2 * page) }
            });
            assert_eq!(r, 0);
            latch.release();
            let faulting = faulting.recv_timeout(BOUND).ok();
            (faulting, read_within(addr + 2 * page + 1, BOUND))
        })
        .await
        .unwrap();
        assert_eq!(faulting, Some(image_byte(1)), "the faulting thread");
        assert_eq!(removed, Some(0), "the removed page");
        let stats = final_stats(handle).await;
        assert_eq!((stats.removes, stats.unmaps), (1, 1), "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
    });
}

/// Child entry point: the server is stopped while a fault's handler runs,
/// and an unrelated `MADV_DONTNEED` is queued (unread) before the handler
/// returns, so its copy fails with `EAGAIN`. The stopping server must still
/// read that event, retry, serve the fault with the image, and end with
/// `Stopped`. A poisoned fault kills this process with `SIGBUS`.
#[test]
#[ignore = "child entry point, run by stop_while_a_copy_waits_on_an_unread_remove_still_serves_the_fault"]
fn child_stop_with_a_pending_remove() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let (uffd, mem) = registered_anon(2, Features::EVENT_REMOVE).expect("checked by the parent");
    let page = uffd.page_size();
    let raw = uffd.as_raw_fd();
    // Page 0 is served, so that MADV_DONTNEED frees something.
    uffd.copy(mem.addr, &image(page), CopyFlags::empty())
        .unwrap();
    let latch = Arc::new(Latch::default());
    let handler = Gate::new(latch.clone(), Hold::Thread, false, 2 * page);
    let rt = current_thread_rt();
    let _guard = rt.enter();
    let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
        .regions([Region::new(mem.addr..mem.addr + 2 * page)])
        .unwrap()
        // Short, so that a fault the stopping server never retries is
        // poisoned (SIGBUS) well within the child's bound.
        .retry_timeout(Duration::from_secs(2))
        .spawn();
    let stats = handle.stats_ref();
    let addr = mem.addr;
    let driver = thread::spawn(move || {
        let faulting = start_read(addr + page + 5);
        // The runtime's only thread is now held in the handler: the server
        // sees the stop and reads the Remove only after the release.
        latch.wait_entered();
        handle.stop();
        let freeing = thread::spawn(move || dontneed(addr, page));
        wait_readable(raw);
        latch.release();
        assert_eq!(
            faulting.recv_timeout(CHILD_BOUND),
            Ok(image_byte(page + 5)),
            "the in-flight fault was not served"
        );
        // Served only after the Remove was read: madvise returns now.
        join_bounded("MADV_DONTNEED of page 0", freeing);
        handle
    });
    rt.block_on(async {
        let mut handle = tokio::task::spawn_blocking(move || driver.join().unwrap())
            .await
            .unwrap();
        let exit = tokio::time::timeout(CHILD_BOUND, handle.join())
            .await
            .expect("the stopped server did not end");
        assert_eq!(exit.unwrap(), ServerExit::Stopped);
    });
    let stats = stats.snapshot();
    assert!(
        stats.eagain >= 1,
        "the copy never met the pending Remove: {stats:?}"
    );
    assert_eq!(stats.removes, 1, "{stats:?}");
    assert_eq!(stats.handler_failures, 0, "{stats:?}");
    assert_eq!(stats.poisoned, 0, "{stats:?}");
}

/// Stopping a server whose in-flight copy is parked on `EAGAIN` behind an
/// unread event: the server keeps reading until the copy goes through, the
/// faulting thread gets the image (not `SIGBUS`, not zeros, not a hang),
/// and `join` returns `Stopped`.
#[test]
fn stop_while_a_copy_waits_on_an_unread_remove_still_serves_the_fault() {
    if uffd_with(Features::EVENT_REMOVE).is_none() {
        return;
    }
    let status = run_child_test("child_stop_with_a_pending_remove", &[(CHILD_ENV, "1")]);
    assert!(
        status.success(),
        "child status {status:?} (exit code 101: a check failed, see its output; \
         SIGBUS: the in-flight fault was poisoned)"
    );
}

/// A `MADV_DONTNEED` of the very page whose copy is parked on `EAGAIN`
/// (the Remove was queued, unread, before the copy): once the Remove is
/// read the retry must not copy the stale image; the faulting thread and
/// later reads see zeros, and nothing livelocks.
#[test]
fn a_copy_parked_on_eagain_behind_the_remove_of_its_page_leaves_zeros() {
    let Some((uffd, mem)) = registered_anon(2, Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    assert_ne!(
        image_byte(page + 5),
        0,
        "the test needs a nonzero image byte"
    );
    let raw = uffd.as_raw_fd();
    let latch = Arc::new(Latch::default());
    let handler = Gate::new(latch.clone(), Hold::Thread, false, 2 * page);
    let rt = current_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
            .regions([Region::new(mem.addr..mem.addr + 2 * page)])
            .unwrap()
            .spawn();
        let addr = mem.addr;
        let (faulting, later) = tokio::task::spawn_blocking(move || {
            let faulting = start_read(addr + page + 5);
            // The runtime's only thread is now held in the handler.
            latch.wait_entered();
            // Frees the page in flight; returns once the Remove is read.
            let freeing = thread::spawn(move || dontneed(addr + page, page));
            wait_readable(raw);
            latch.release();
            let faulting = faulting.recv_timeout(BOUND).ok();
            join_bounded("MADV_DONTNEED of the page in flight", freeing);
            (faulting, read_within(addr + page + 5, BOUND))
        })
        .await
        .unwrap();
        assert_eq!(
            faulting,
            Some(0),
            "the faulting thread got the stale image (or hung)"
        );
        assert_eq!(later, Some(0), "the page kept the stale image (or hung)");
        let stats = final_stats(handle).await;
        assert!(
            stats.eagain >= 1,
            "the copy never met the pending Remove: {stats:?}"
        );
        assert_eq!(stats.removes, 1, "{stats:?}");
        assert!(stats.pages_zeroed_after_remove >= 1, "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
    });
}

/// The write end of the pipe the child's `SIGBUS` handler reports on.
static SIGBUS_PIPE: AtomicI32 = AtomicI32::new(-1);

/// `SIGBUS` handler: reports on the pipe, then keeps its thread asleep in
/// here (returning would run the faulting access again).
extern "C" fn note_sigbus_and_park(_signal: libc::c_int) {
    let fd = SIGBUS_PIPE.load(Ordering::SeqCst);
    // SAFETY: write(2) and pause(2) are async-signal-safe; the byte is a
    // static.
    unsafe {
        libc::write(fd, b"B".as_ptr().cast(), 1);
        loop {
            libc::pause();
        }
    }
}

/// Sets the disposition of `SIGBUS` (a handler, or `SIG_DFL`).
fn set_sigbus(action: libc::sighandler_t) {
    // SAFETY: an all-zero `sigaction` is valid (no flags, empty mask); the
    // handler is `SIG_DFL` or `note_sigbus_and_park`, which is
    // async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = action;
        assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
    }
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two new fds nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Child entry point: a handler fails while an unrelated Remove is queued,
/// unread, so poisoning the page first fails with `EAGAIN`. The faulting
/// thread must get `SIGBUS` (caught here, so that the process lives on to
/// check) and the server must keep serving. Then the poisoned page is read
/// again with the default `SIGBUS` action: this process dies of `SIGBUS`,
/// which is what the parent checks. Any failed check exits with 101.
#[test]
#[ignore = "child entry point, run by a_handler_failure_while_an_event_is_pending_gives_sigbus_and_the_server_goes_on"]
fn child_failure_with_a_pending_remove() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let (uffd, mem) = registered_anon(3, Features::EVENT_REMOVE).expect("checked by the parent");
    let page = uffd.page_size();
    let raw = uffd.as_raw_fd();
    // Page 0 is served, so that MADV_DONTNEED frees something.
    uffd.copy(mem.addr, &image(page), CopyFlags::empty())
        .unwrap();
    let (report_rx, report_tx) = pipe();
    SIGBUS_PIPE.store(report_tx.as_raw_fd(), Ordering::SeqCst);
    set_sigbus(note_sigbus_and_park as extern "C" fn(libc::c_int) as libc::sighandler_t);
    let latch = Arc::new(Latch::default());
    let handler = Gate::new(latch.clone(), Hold::Thread, true, 3 * page);
    let rt = current_thread_rt();
    let _guard = rt.enter();
    let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
        .regions([Region::new(mem.addr..mem.addr + 3 * page)])
        .unwrap()
        .spawn();
    let stats = handle.stats_ref();
    let addr = mem.addr;
    let bad = addr + page + 5;
    let report = report_tx.as_raw_fd();
    let driver = thread::spawn(move || {
        thread::spawn(move || {
            let v = read_at(bad);
            eprintln!("the failed fault read {v:#x} instead of getting SIGBUS");
            // SAFETY: writing one byte of a static to our pipe.
            unsafe { libc::write(report, b"R".as_ptr().cast(), 1) };
        });
        // The runtime's only thread is now held in the handler.
        latch.wait_entered();
        let freeing = thread::spawn(move || dontneed(addr, page));
        wait_readable(raw);
        latch.release();
        assert!(
            readable_within(report_rx.as_raw_fd(), CHILD_BOUND.as_millis() as i32),
            "the faulting thread neither got SIGBUS nor returned"
        );
        let mut note = 0u8;
        // SAFETY: reading one byte into `note`.
        let n = unsafe { libc::read(report_rx.as_raw_fd(), (&raw mut note).cast(), 1) };
        assert_eq!((n, note), (1, b'B'), "the faulting thread got no SIGBUS");
        // Poisoned only after the Remove was read: madvise returns now.
        join_bounded("MADV_DONTNEED of page 0", freeing);
        // The server goes on: a fresh page is served from the image.
        read_within(addr + 2 * page + 9, CHILD_BOUND)
    });
    rt.block_on(async {
        let served = tokio::task::spawn_blocking(move || driver.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            served,
            Some(image_byte(2 * page + 9)),
            "no fault served after the failure"
        );
        assert!(
            !handle.is_finished(),
            "the server ended on a handler failure"
        );
    });
    let stats = stats.snapshot();
    assert_eq!(stats.handler_failures, 1, "{stats:?}");
    assert_eq!(stats.removes, 1, "{stats:?}");
    // The page stays poisoned: with the default action, this read kills the
    // process with SIGBUS.
    set_sigbus(libc::SIG_DFL);
    let v = read_at(bad);
    eprintln!("the poisoned page read {v:#x}");
    std::process::exit(0);
}

/// A handler failure while an unrelated event is pending (poisoning the
/// page first fails with `EAGAIN`): the faulting thread gets `SIGBUS` (not
/// zeros, not a hang) and the server keeps serving other faults.
#[test]
fn a_handler_failure_while_an_event_is_pending_gives_sigbus_and_the_server_goes_on() {
    let Some(uffd) = uffd_with(Features::EVENT_REMOVE) else {
        return;
    };
    if !uffd.available_features().contains(Features::POISON) {
        return skip("kernel lacks UFFD_FEATURE_POISON (6.6+)");
    }
    let status = run_child_test("child_failure_with_a_pending_remove", &[(CHILD_ENV, "1")]);
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "child status {status:?} (exit code 101: a check failed; 0: no SIGBUS)"
    );
}

/// Without `EVENT_REMOVE` the server is not told when a served page is
/// freed. A `MADV_DONTNEED` of one makes it fault again: that fault must be
/// served with zeros (what the kernel itself would map), not the image and
/// not by waking the thread into another fault forever.
#[test]
fn without_event_remove_a_served_page_freed_by_madv_dontneed_reads_zero() {
    let Some((uffd, mem)) = registered_anon(1, Features::empty()) else {
        return;
    };
    assert!(
        !uffd.features().contains(Features::EVENT_REMOVE),
        "the test needs a userfaultfd without EVENT_REMOVE"
    );
    let page = uffd.page_size();
    assert_ne!(image_byte(1), 0, "the test needs a nonzero image byte");
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(MemorySource::new(image(page))),
        )
        .regions([Region::new(mem.addr..mem.addr + page)])
        .unwrap()
        .spawn();
        let addr = mem.addr;
        let (before, after) = tokio::task::spawn_blocking(move || {
            let before = read_within(addr + 1, BOUND);
            dontneed(addr, page);
            (before, read_within(addr + 1, BOUND))
        })
        .await
        .unwrap();
        assert_eq!(before, Some(image_byte(1)));
        assert_eq!(after, Some(0), "the freed page (None: a livelock)");
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, 0, "{stats:?}");
    });
}

/// `fallocate(PUNCH_HOLE)` on a memfd frees a served shmem page without
/// any userfaultfd event. The next fault there must be served with zeros,
/// not by waking the thread into another fault forever.
#[test]
fn a_shmem_page_freed_by_punching_a_hole_reads_zero() {
    let Some(uffd) = uffd_with(Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    assert_ne!(image_byte(1), 0, "the test needs a nonzero image byte");
    let Some(fd) = memfd(page, false) else {
        return;
    };
    let mem = Mapping::new(page, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    // SAFETY: a fresh mapping, touched only by this test's threads, whose
    // faults the server resolves.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(MemorySource::new(image(page))),
        )
        .regions([Region::new(mem.addr..mem.addr + page)])
        .unwrap()
        .spawn();
        let addr = mem.addr;
        let raw = fd.as_raw_fd();
        let (before, after) = tokio::task::spawn_blocking(move || {
            let before = read_within(addr + 1, BOUND);
            // SAFETY: plain syscall on our memfd.
            let r = unsafe {
                libc::fallocate(
                    raw,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    page as libc::off_t,
                )
            };
            assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
            (before, read_within(addr + 1, BOUND))
        })
        .await
        .unwrap();
        assert_eq!(before, Some(image_byte(1)));
        assert_eq!(after, Some(0), "the freed page (None: a livelock)");
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, 0, "{stats:?}");
    });
}
