//! A fault and the `Remove` that frees its page, read in one batch.
//!
//! One `read(2)` returns every pending fault before any pending event. So
//! when a thread faults on page X and the owner then frees X with
//! `MADV_DONTNEED` while the server is not reading, the next read returns
//! the fault on X *followed by* the Remove of X. The server must apply the
//! Remove before it plans the fault: X then reads zero, never the stale
//! image. The race is set up deterministically (a slow handler holds the
//! only concurrency permit, so the server stops reading), and attacked by
//! a storm of faulting, verifying and freeing threads.

#![cfg(feature = "async")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tokio_uffd::{AsyncUffd, Features, MemorySource, Region, Server, SourceHandler};

/// A fault on a page of a fault-around window in flight is a duplicate:
/// the window's resolution wakes it. When that page is freed meanwhile, the
/// window is planned again without it (it reads zero now); the duplicate
/// must still be woken, to fault again and get its zeros, not left asleep.
/// (Found by the storm below.)
#[test]
fn a_duplicate_on_a_prefetched_page_freed_meanwhile_is_woken() {
    use std::os::fd::AsRawFd;
    let Some((uffd, mem)) = registered_anon(4, Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    let raw = uffd.as_raw_fd();
    let base = mem.addr;
    // Every run is fetched by `fault`, held until opened.
    let handler = HeldPages::new(4 * page, (0..4).map(|p| base + p * page));
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler.clone())
            .regions([Region::new(base..base + 4 * page)])
            .unwrap()
            .prefetch(4)
            .spawn();
        let h = handler.clone();
        let (first, dup) = tokio::task::spawn_blocking(move || {
            // The window 0..4 is in flight, its fetch held.
            let first = start_read(base + 1);
            wait_until("the window's fetch started", || h.calls() >= 1);
            // Page 3, the window's last, freed: its Remove is read at once
            // (the fetch waits in a task of its own); the window planned
            // again ends before it.
            run_bounded("MADV_DONTNEED of page 3", move || {
                dontneed(base + 3 * page, page)
            });
            // A fault on page 3, still marked in flight: a duplicate.
            let dup = start_read(base + 3 * page + 5);
            wait_until("both faults read", || {
                pending_faults(raw) == 0 && fdinfo_count(raw, "total") == 2
            });
            h.open.add_permits(8);
            (first.recv_timeout(BOUND).ok(), dup.recv_timeout(BOUND).ok())
        })
        .await
        .unwrap();
        assert_eq!(first, Some(image_byte(1)), "the faulting thread");
        assert_eq!(
            dup,
            Some(0),
            "the duplicate on the freed page (None: left asleep)"
        );
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, 1, "{stats:?}");
    });
}

/// A fault queued before the `munmap` of its page, read in one batch with
/// the Unmap: it was raised on memory that is gone, so the server wakes it
/// (the access then fails as the kernel decides) instead of planning it
/// from a page map that no longer has the page: that would treat it as a
/// page outside every region and ask the handler for the bytes at offset =
/// address, a failure for any real source. The faulting access is a
/// `write(2)` from the page (a kernel-mode fault, so the uffd is not
/// user-mode-only), which then fails with `EFAULT` instead of a `SIGSEGV`.
#[test]
fn a_fault_and_the_unmap_of_its_page_in_one_batch_wake_it_without_a_failure() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let builder = tokio_uffd::UffdBuilder::new()
        .user_mode_only(false)
        .require(Features::EVENT_UNMAP);
    let Some(uffd) = try_uffd(builder) else {
        return;
    };
    let page = uffd.page_size();
    let mut mem = Mapping::anon(4 * page);
    // SAFETY: a fresh mapping, touched only by this test's threads, whose
    // faults the server resolves.
    unsafe { uffd.register(mem.addr, 4 * page, tokio_uffd::RegisterMode::MISSING) }.unwrap();
    // The test unmaps page 3 itself; `mem` unmaps the rest.
    mem.len = 3 * page;
    let raw = uffd.as_raw_fd();
    let (a, b, x) = (mem.addr, mem.addr + page, mem.addr + 3 * page);
    let handler = HeldPages::new(4 * page, [a, b]);
    let mut fds = [0; 2];
    // SAFETY: a pipe of our own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler.clone())
            .regions([Region::new(mem.addr..mem.addr + 4 * page)])
            .unwrap()
            .concurrency(1)
            .spawn();
        let h = handler.clone();
        let wrote = tokio::task::spawn_blocking(move || {
            let a_read = start_read(a);
            wait_until("page A's fetch started", || h.calls() >= 1);
            let b_read = start_read(b);
            wait_until("page B's fetch started", || h.calls() >= 2);
            let w = wr.as_raw_fd();
            let writing = std::thread::spawn(move || {
                // SAFETY: reads one byte of page X into the pipe; the kernel
                // faults on X and waits for the server.
                let n = unsafe { libc::write(w, x as *const libc::c_void, 1) };
                (n, std::io::Error::last_os_error().raw_os_error())
            });
            wait_until("the fault on X queued", || pending_faults(raw) >= 1);
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let unmapping = std::thread::spawn(move || {
                tid_tx.send(gettid()).unwrap();
                // SAFETY: unmapping a page of our own mapping.
                unsafe { libc::munmap(x as *mut libc::c_void, page) }
            });
            let tid = tid_rx.recv_timeout(BOUND).unwrap();
            // munmap sleeps in the kernel until its Unmap is read.
            wait_until("munmap waiting for its Unmap to be read", || {
                wchan(tid).starts_with("userfaultfd")
            });
            h.open.add_permits(2);
            assert_eq!(join_bounded("munmap of X", unmapping), 0);
            assert_eq!(a_read.recv_timeout(BOUND), Ok(image_byte(0)));
            assert_eq!(b_read.recv_timeout(BOUND), Ok(image_byte(page)));
            join_bounded("the write(2) from X", writing)
        })
        .await
        .unwrap();
        drop(rd);
        // Either the write got in before the unmap (a byte of the image) or
        // it found the page gone: never a hang.
        assert!(
            wrote.0 == 1 || wrote == (-1, Some(libc::EFAULT)),
            "write(2) from the unmapped page: {wrote:?}"
        );
        let stats = final_stats(handle).await;
        assert_eq!(stats.unmaps, 1, "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
    });
}

/// How long each storm runs (`TOKIO_UFFD_STORM_SECS` to soak longer).
fn storm_time() -> Duration {
    let secs = std::env::var("TOKIO_UFFD_STORM_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    Duration::from_secs(secs)
}

/// A small xorshift generator: the storm needs spread, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn pending_faults(fd: std::os::fd::RawFd) -> usize {
    fdinfo_count(fd, "pending")
}

/// The reproduction: page A's fetch holds the only permit, page B's
/// fault (also slow) makes the server wait for that permit instead of
/// reading, a thread faults on X (queued, unread), then the owner frees X
/// (its Remove queued behind the fault). Once A is released the server
/// reads [fault X, Remove X] in one batch. X must read zero afterwards.
#[test]
fn a_fault_and_the_remove_of_its_page_in_one_batch_leave_zeros() {
    use std::os::fd::AsRawFd;
    let Some((uffd, mem)) = registered_anon(4, Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    let raw = uffd.as_raw_fd();
    let (a, b, x) = (mem.addr, mem.addr + page, mem.addr + 2 * page);
    assert_ne!(
        image_byte(2 * page + 9),
        0,
        "the test needs a nonzero image byte"
    );
    let handler = HeldPages::new(4 * page, [a, b]);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler.clone())
            .regions([Region::new(mem.addr..mem.addr + 4 * page)])
            .unwrap()
            .concurrency(1)
            .spawn();
        let h = handler.clone();
        let (x_read, x_after) = tokio::task::spawn_blocking(move || {
            let a_read = start_read(a);
            wait_until("page A's fetch started", || h.calls() >= 1);
            let b_read = start_read(b + 1);
            // B's fetch is polled once on the reader, then the reader waits
            // for the permit A holds: it reads nothing more.
            wait_until("page B's fetch started", || h.calls() >= 2);
            let x_read = start_read(x + 9);
            wait_until("the fault on X queued", || pending_faults(raw) >= 1);
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let freeing = thread::spawn(move || {
                tid_tx.send(gettid()).unwrap();
                dontneed(x, page);
            });
            let tid = tid_rx.recv_timeout(BOUND).unwrap();
            // madvise sleeps in the kernel until its Remove is read.
            wait_until("MADV_DONTNEED waiting for its Remove to be read", || {
                wchan(tid).starts_with("userfaultfd")
            });
            assert_eq!(pending_faults(raw), 1, "the fault on X was read too early");
            h.open.add_permits(2);
            join_bounded("MADV_DONTNEED of X", freeing);
            assert_eq!(a_read.recv_timeout(BOUND), Ok(image_byte(0)));
            assert_eq!(b_read.recv_timeout(BOUND), Ok(image_byte(page + 1)));
            (x_read.recv_timeout(BOUND).ok(), read_within(x + 9, BOUND))
        })
        .await
        .unwrap();
        // The faulting thread may see either (its read raced the madvise),
        // but once madvise returned the page must be zero.
        assert!(
            matches!(x_read, Some(v) if v == 0 || v == image_byte(2 * page + 9)),
            "the faulting thread read {x_read:?}"
        );
        assert_eq!(
            x_after,
            Some(0),
            "X holds the stale image after MADV_DONTNEED returned (None: it hung)"
        );
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, 1, "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
    });
}

/// One round of the storm on a fresh mapping: four threads fault on fresh
/// pages (a shared cursor hands them out) and check each byte they read is
/// the image's or zero; a fifth frees the pages under the cursor with
/// `MADV_DONTNEED`, so that a fault on a page is often queued just before
/// the Remove of that page, and checks each freed page reads zero once
/// `madvise` returned. Returns (frees, reads).
fn storm_round(prefetch: usize, seed: u64) -> Option<(u64, u64)> {
    let pages = 2048;
    let (uffd, mem) = registered_anon(pages, Features::EVENT_REMOVE)?;
    let page = uffd.page_size();
    let rt = multi_thread_rt();
    Some(rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(MemorySource::new(image(pages * page))),
        )
        .regions([Region::new(mem.addr..mem.addr + pages * page)]).unwrap()
        .prefetch(prefetch)
        .spawn();
        let base = mem.addr;
        let cursor = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        for t in 0..4 {
            let cursor = cursor.clone();
            readers.push(thread::spawn(move || {
                let mut reads = 0u64;
                loop {
                    let p = cursor.fetch_add(1, Ordering::Relaxed);
                    if p >= pages {
                        return reads;
                    }
                    let off = p * page + (t * 977 + p) % page;
                    let v = read_at(base + off);
                    assert!(
                        v == 0 || v == image_byte(off),
                        "offset {off:#x} read {v}, neither the image's {} nor zero",
                        image_byte(off)
                    );
                    reads += 1;
                }
            }));
        }
        let freer = {
            let cursor = cursor.clone();
            thread::spawn(move || {
                let mut rng = Rng(seed);
                let mut frees = 0u64;
                loop {
                    let c = cursor.load(Ordering::Relaxed);
                    if c >= pages {
                        return frees;
                    }
                    // A page a reader faults on now, or is about to.
                    let p = (c + rng.below(4)).saturating_sub(2).min(pages - 1);
                    let addr = base + p * page;
                    dontneed(addr, page);
                    frees += 1;
                    for probe in [0, page / 2, page - 1] {
                        let v = read_at(addr + probe);
                        assert_eq!(
                            v, 0,
                            "page {p} read the stale image at +{probe:#x} after MADV_DONTNEED returned"
                        );
                    }
                }
            })
        };
        let (frees, reads) = tokio::task::spawn_blocking(move || {
            let frees = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                join_bounded("the freeing thread", freer)
            }));
            // Let the readers finish even if the freer failed.
            cursor.store(pages, Ordering::Relaxed);
            let reads: u64 = readers
                .into_iter()
                .map(|t| join_bounded("a faulting thread", t))
                .sum();
            let frees = frees.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (frees, reads)
        })
        .await
        .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, frees, "{stats:?}");
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
        (frees, reads)
    }))
}

/// Rounds of [`storm_round`] for [`storm_time`].
fn storm(prefetch: usize) {
    let until = Instant::now() + storm_time();
    let (mut rounds, mut frees, mut reads) = (0u64, 0, 0);
    while Instant::now() < until {
        let Some((f, r)) = storm_round(prefetch, 0x5eed + rounds) else {
            return;
        };
        rounds += 1;
        frees += f;
        reads += r;
    }
    eprintln!("storm (prefetch {prefetch}): {rounds} rounds, {frees} frees, {reads} reads");
    assert!(frees > 100 && reads > 1000, "the storm barely ran");
}

#[test]
fn remove_storm_never_leaves_a_stale_page() {
    storm(1);
}

#[test]
fn remove_storm_never_leaves_a_stale_page_with_prefetch() {
    storm(16);
}
