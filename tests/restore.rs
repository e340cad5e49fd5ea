//! The restore engine against the kernel: recording a working set, the
//! warm prefetch of it racing faults, `Remove`/`Unmap`/`Remap` in the
//! middle of a prefetch, the background fill, and working sets that do not
//! fit the server's regions.

#![cfg(feature = "async")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tokio_uffd::{
    AsyncUffd, Error, FailureAction, Features, Fill, MemorySource, PageRun, PageSource, Region,
    Server, SourceHandler, Uffd, WorkingSet,
};

/// A server over `mem` serving the test image from memory.
fn image_server(uffd: Uffd, base: usize, len: usize) -> Server<SourceHandler<MemorySource>> {
    Server::new(
        AsyncUffd::new(uffd).unwrap(),
        SourceHandler::new(MemorySource::new(image(len))),
    )
    .regions([Region::new(base..base + len)])
    .unwrap()
}

/// Reads every page of `pages` at `base` and checks it against the image,
/// byte by byte for a few bytes of each page.
fn check_image(base: usize, page: usize, pages: impl IntoIterator<Item = usize>) {
    for p in pages {
        for off in [0, 1, page / 2, page - 1] {
            let at = p * page + off;
            assert_eq!(read_at(base + at), image_byte(at), "page {p} byte {off}");
        }
    }
}

/// Waits (at most `BOUND`) until the statistics satisfy `cond`.
fn wait_stats(
    handle: &tokio_uffd::ServerHandle,
    what: &str,
    cond: impl Fn(&tokio_uffd::StatsSnapshot) -> bool,
) {
    wait_until(what, || cond(&handle.stats()));
}

#[test]
fn a_recording_lists_faulted_pages_in_order_and_warms_the_next_restore() {
    let pages = 64;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    let rt = multi_thread_rt();
    let ws = rt.block_on(async {
        let handle = image_server(uffd, base, len).record().spawn();
        tokio::task::spawn_blocking(move || check_image(base, page, [5, 6, 7, 2, 9, 6, 40]))
            .await
            .unwrap();
        let ws = handle.working_set().expect("recording");
        let stats = final_stats(handle).await;
        assert_eq!(stats.faults_missing, 6, "{stats:?}");
        ws
    });
    let run = |first, pages| PageRun {
        region: 0,
        first,
        pages,
    };
    assert_eq!(ws.runs(), [run(5, 3), run(2, 1), run(9, 1), run(40, 1)]);
    assert_eq!(ws.pages(), 6);
    assert_eq!(ws.regions()[0].len, len as u64);

    // Through the file format, then a warm restore of the same image
    // mapped elsewhere: the set is prefetched, touching it takes no fault.
    let path = std::env::temp_dir().join(format!("tokio-uffd-restore-ws-{}", std::process::id()));
    ws.save(&path).unwrap();
    let loaded = WorkingSet::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded, ws);

    let Some((uffd, mem2)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    drop(mem);
    let base = mem2.addr;
    rt.block_on(async {
        let handle = image_server(uffd, base, len).warm(loaded).unwrap().spawn();
        let h = &handle;
        wait_stats(h, "the working set prefetched", |s| s.pages_warmed == 6);
        tokio::task::spawn_blocking(move || check_image(base, page, [2, 5, 6, 7, 9, 40]))
            .await
            .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.faults_missing, 0, "{stats:?}");
        assert_eq!(stats.working_set_pages, 6, "{stats:?}");
        assert_eq!(stats.pages_served, 6, "{stats:?}");
    });
}

#[test]
fn a_recording_with_a_window_lists_the_pages_served_with_each_fault() {
    let pages = 64;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = image_server(uffd, base, len).prefetch(8).record().spawn();
        tokio::task::spawn_blocking(move || check_image(base, page, [13, 2]))
            .await
            .unwrap();
        let ws = handle.working_set().unwrap();
        // The faulting page's run first (8..16 around 13), then 0..8.
        let run = |first, pages| PageRun {
            region: 0,
            first,
            pages,
        };
        assert_eq!(ws.runs(), [run(8, 8), run(0, 8)]);
        final_stats(handle).await;
    });
}

#[test]
fn a_working_set_for_another_layout_is_refused_saying_so() {
    let Some((uffd, mem)) = registered_anon(32, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mut ws = WorkingSet::new(vec![tokio_uffd::RecordedRegion {
        source: tokio_uffd::SourceId::new(0),
        offset: 0,
        len: (16 * page) as u64,
        page_size: page as u64,
    }]);
    ws.push(0, 3, 2).unwrap();
    let rt = multi_thread_rt();
    let _guard = rt.enter();
    // A region of another size (another image size).
    let err = image_server(uffd, mem.addr, 32 * page)
        .warm(ws.clone())
        .unwrap_err();
    assert!(matches!(err, Error::WorkingSet(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("recorded for another image or region layout"),
        "{msg}"
    );
    assert!(
        msg.contains("matches none of the server's regions"),
        "{msg}"
    );
    // Two regions where one was recorded.
    let uffd = uffd_with(Features::empty()).unwrap();
    let server = Server::new(
        AsyncUffd::new(uffd).unwrap(),
        SourceHandler::new(MemorySource::new(image(32 * page))),
    )
    .regions([
        Region::new(mem.addr..mem.addr + 16 * page),
        Region::new(mem.addr + 16 * page..mem.addr + 32 * page).with_offset((16 * page) as u64),
    ])
    .unwrap();
    let err = server.warm(ws.clone()).unwrap_err().to_string();
    assert!(err.contains("it has 1 regions, the server 2"), "{err}");
    // The same length at another offset of the image.
    let uffd = uffd_with(Features::empty()).unwrap();
    let server = Server::new(
        AsyncUffd::new(uffd).unwrap(),
        SourceHandler::new(MemorySource::new(image(32 * page))),
    )
    .regions([Region::new(mem.addr..mem.addr + 16 * page).with_offset(page as u64)])
    .unwrap();
    assert!(server.warm(ws).is_err());
}

/// A source that serves the image from `fault` (never `bytes_at`), holding
/// the first read at each offset in `held` until the test opens it.
struct HeldSource {
    image: MemorySource,
    held: std::sync::Mutex<Vec<u64>>,
    open: tokio::sync::Semaphore,
    reads: AtomicUsize,
}

impl HeldSource {
    fn new(len: usize, held: impl IntoIterator<Item = u64>) -> Arc<Self> {
        Arc::new(Self {
            image: MemorySource::new(image(len)),
            held: std::sync::Mutex::new(held.into_iter().collect()),
            open: tokio::sync::Semaphore::new(0),
            reads: AtomicUsize::new(0),
        })
    }
}

impl PageSource for HeldSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let hold = {
            let mut held = self.held.lock().unwrap();
            let hit = held.iter().position(|&o| o == offset);
            hit.map(|i| held.remove(i)).is_some()
        };
        if hold {
            tokio::time::timeout(BOUND, self.open.acquire())
                .await
                .map_err(|_| std::io::Error::other("the test never opened the held read"))?
                .map_err(std::io::Error::other)?
                .forget();
        }
        self.image.read_at(offset, buf).await
    }
}

/// A server prefetching all `pages` pages at `base` from `source` in
/// copies of 8 pages, `jobs` at a time.
fn warm_held(
    uffd: Uffd,
    base: usize,
    pages: usize,
    source: &Arc<HeldSource>,
    jobs: usize,
) -> tokio_uffd::ServerHandle {
    let page = uffd.page_size();
    Server::new(
        AsyncUffd::new(uffd).unwrap(),
        SourceHandler::new(source.clone()),
    )
    .regions([Region::new(base..base + pages * page)])
    .unwrap()
    .warm(whole(pages, page))
    .unwrap()
    .background_concurrency(jobs)
    .background_chunk(8 * page)
    .spawn()
}

/// The whole region as one run of the working set, in address order.
fn whole(pages: usize, page: usize) -> WorkingSet {
    let mut ws = WorkingSet::new(vec![tokio_uffd::RecordedRegion {
        source: tokio_uffd::SourceId::new(0),
        offset: 0,
        len: (pages * page) as u64,
        page_size: page as u64,
    }]);
    ws.push(0, 0, pages as u64).unwrap();
    ws
}

#[test]
fn a_fault_ahead_of_the_prefetch_is_served_at_once() {
    let pages = 64;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    // The prefetch's first copy (pages 0..8) is held; one copy at a time.
    let source = HeldSource::new(len, [0]);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = warm_held(uffd, base, pages, &source, 1);
        let s = source.clone();
        let stats = handle.stats_ref();
        let got = tokio::task::spawn_blocking(move || {
            wait_until("the prefetch's first read", || {
                s.reads.load(Ordering::SeqCst) >= 1
            });
            // Page 40 is in the plan, far behind the held copy: served now.
            let v = read_within(base + 40 * page + 3, BOUND);
            let ahead = stats.snapshot().faults_ahead_of_prefetch;
            s.open.add_permits(1);
            (v, ahead)
        })
        .await
        .unwrap();
        assert_eq!(got.0, Some(image_byte(40 * page + 3)));
        assert_eq!(got.1, 1);
        wait_stats(&handle, "the prefetch done", |s| {
            s.pages_warmed == pages as u64 - 1
        });
        tokio::task::spawn_blocking(move || check_image(base, page, 0..pages))
            .await
            .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.faults_missing, 1, "{stats:?}");
    });
}

/// A `Remove` read while a prefetch copy of its pages is in flight: the
/// copy is planned again without the freed page, which reads zero, never
/// the image.
#[test]
fn a_remove_in_the_middle_of_a_prefetch_leaves_zeros() {
    let pages = 32;
    let Some((uffd, mem)) = registered_anon(pages, Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    let source = HeldSource::new(len, [0]);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = warm_held(uffd, base, pages, &source, 1);
        let s = source.clone();
        tokio::task::spawn_blocking(move || {
            wait_until("the prefetch's first read", || {
                s.reads.load(Ordering::SeqCst) >= 1
            });
            // Page 3 of the held copy 0..8 freed: its Remove is read while
            // the copy waits.
            run_bounded("MADV_DONTNEED of page 3", move || {
                dontneed(base + 3 * page, page)
            });
            s.open.add_permits(1);
        })
        .await
        .unwrap();
        wait_stats(&handle, "the prefetch done", |s| {
            s.pages_warmed == pages as u64 - 1
        });
        let stats = handle.stats();
        tokio::task::spawn_blocking(move || {
            assert_eq!(read_at(base + 3 * page + 9), 0, "the freed page");
            check_image(base, page, (0..pages).filter(|&p| p != 3));
        })
        .await
        .unwrap();
        assert_eq!(stats.faults_missing, 0, "{stats:?}");
        let stats = final_stats(handle).await;
        assert_eq!(stats.removes, 1, "{stats:?}");
        assert_eq!(stats.pages_zeroed_after_remove, 1, "{stats:?}");
    });
}

/// The storm: threads free pages (and check each reads zero once
/// `madvise` returns) and read others (checking the image) while the
/// prefetch of the whole region races them in small copies.
#[test]
fn storm_removes_and_faults_race_the_prefetch() {
    let pages = 8192;
    if uffd_with(Features::EVENT_REMOVE).is_none() {
        return;
    }
    let page = page_size();
    let len = pages * page;
    let rt = multi_thread_rt();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    while rounds < 2 || Instant::now() < deadline {
        rounds += 1;
        let uffd = uffd_with(Features::EVENT_REMOVE).unwrap();
        let mem = Mapping::anon(len);
        // SAFETY: a fresh mapping that only this test's threads touch.
        unsafe { uffd.register(mem.addr, len, tokio_uffd::RegisterMode::MISSING) }.unwrap();
        let base = mem.addr;
        rt.block_on(async {
            let handle = image_server(uffd, base, len)
                .warm(whole(pages, page))
                .unwrap()
                .background_chunk(16 * page)
                .spawn();
            let stop = Arc::new(AtomicBool::new(false));
            let mut freers = Vec::new();
            // Freers own pages 0 mod 4; readers the rest.
            for t in 0..2u64 {
                freers.push(thread::spawn(move || {
                    let mut rng = t * 7919 + 1;
                    for _ in 0..400 {
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let p = ((rng >> 33) as usize % (pages / 4)) * 4;
                        dontneed(base + p * page, page);
                        assert_eq!(
                            read_at(base + p * page + 1),
                            0,
                            "page {p} after MADV_DONTNEED"
                        );
                    }
                }));
            }
            let mut readers = Vec::new();
            for t in 0..2usize {
                let stop = stop.clone();
                readers.push(thread::spawn(move || {
                    let mut p = pages - 1 - t;
                    while !stop.load(Ordering::Relaxed) {
                        if p % 4 != 0 {
                            let at = p * page + 5;
                            assert_eq!(read_at(base + at), image_byte(at), "page {p}");
                        }
                        p = if p < 2 { pages - 1 - t } else { p - 2 };
                    }
                }));
            }
            tokio::task::spawn_blocking(move || {
                // Every thread is joined before a failure is reported: the
                // mapping must outlive them.
                let mut failed = None;
                for t in freers {
                    wait_until("a freeing thread", || t.is_finished());
                    failed = failed.or(t.join().err());
                }
                stop.store(true, Ordering::Relaxed);
                for t in readers {
                    wait_until("a reading thread", || t.is_finished());
                    failed = failed.or(t.join().err());
                }
                if let Some(panic) = failed {
                    std::panic::resume_unwind(panic);
                }
            })
            .await
            .unwrap();
            let stats = final_stats(handle).await;
            assert!(stats.removes > 0, "{stats:?}");
        });
        drop(mem);
    }
}

/// An `Unmap` and a `Remap` while prefetch copies are in flight: nothing
/// crashes, the old ranges are never written (fresh memory mapped there
/// stays zero), and the moved region is served at its new address.
#[test]
fn an_unmap_and_a_remap_in_the_middle_of_a_prefetch() {
    let pages = 64;
    let Some(uffd) = uffd_with(Features::EVENT_UNMAP | Features::EVENT_REMAP) else {
        return;
    };
    let page = uffd.page_size();
    let len = pages * page;
    let mem = Mapping::anon(len);
    // SAFETY: a fresh mapping that only this test touches.
    unsafe { uffd.register(mem.addr, len, tokio_uffd::RegisterMode::MISSING) }.unwrap();
    let base = mem.addr;
    // Replaced and moved below, never unmapped as a whole: were the test to
    // fail, another test's memory may be at the old addresses by then.
    std::mem::forget(mem);
    // Copies of 8 pages, two at a time; the first two (0..8 and 8..16) held.
    let source = HeldSource::new(len, [0, (8 * page) as u64]);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = warm_held(uffd, base, pages, &source, 2);
        let s = source.clone();
        let new_base = tokio::task::spawn_blocking(move || {
            wait_until("both held reads", || s.reads.load(Ordering::SeqCst) >= 2);
            // Pages 0..8 replaced by fresh unregistered memory at once (an
            // Unmap, and no hole another test's mapping could fill).
            let fresh = run_bounded("mmap over pages 0..8", move || {
                // SAFETY: replaces the test's own pages 0..8, which nothing
                // references.
                let p = unsafe {
                    libc::mmap(
                        base as *mut libc::c_void,
                        8 * page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                assert_eq!(p as usize, base, "{}", std::io::Error::last_os_error());
                base
            });
            // Pages 8..64 moved elsewhere, fresh memory at the old place.
            let new_base = run_bounded("mremap of pages 8..64", move || {
                // SAFETY: a reservation of the size, replaced by the move.
                let dest = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        56 * page,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                assert_ne!(dest, libc::MAP_FAILED);
                // SAFETY: moves the test's own registered pages 8..64.
                let moved = unsafe {
                    libc::mremap(
                        (base + 8 * page) as *mut libc::c_void,
                        56 * page,
                        56 * page,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        dest,
                    )
                };
                assert_eq!(moved, dest, "mremap: {}", std::io::Error::last_os_error());
                moved as usize
            });
            let fresh2 = fresh_at(base + 8 * page, 56 * page);
            s.open.add_permits(2);
            (new_base, fresh, fresh2)
        })
        .await
        .unwrap();
        let (new_base, fresh, fresh2) = new_base;
        let stats = handle.stats_ref();
        tokio::task::spawn_blocking(move || {
            // Everything moved is served at its new address (prefetched, or
            // on a fault for the pages whose copies were in flight).
            for p in 0..56 {
                let at = (8 + p) * page + 7;
                assert_eq!(
                    read_at(new_base + p * page + 7),
                    image_byte(at),
                    "moved page {p}"
                );
            }
            wait_until("the prefetch done", || {
                let s = stats.snapshot();
                s.pages_warmed + s.faults_missing >= 48
            });
            // The old ranges were never written.
            for p in 0..8 {
                assert_eq!(read_at(fresh + p * page + 7), 0, "old page {p}");
            }
            match fresh2 {
                Some(at) => {
                    for p in 0..56 {
                        assert_eq!(read_at(at + p * page + 7), 0, "old page {}", 8 + p);
                    }
                }
                None => eprintln!(
                    "the moved range's old addresses were taken by another mapping before \
                     this test could map them: not checked"
                ),
            }
            // SAFETY: the test's own mappings.
            unsafe {
                libc::munmap(fresh as *mut libc::c_void, 8 * page);
                if let Some(at) = fresh2 {
                    libc::munmap(at as *mut libc::c_void, 56 * page);
                }
            }
            run_bounded("munmap of the moved pages", move || {
                // SAFETY: the test's registered pages at their new place.
                unsafe { libc::munmap(new_base as *mut libc::c_void, 56 * page) }
            });
        })
        .await
        .unwrap();
        let stats = final_stats(handle).await;
        // The mmap over 0..8 and the munmap at the end (the kernel may
        // report more for the move).
        assert!(stats.unmaps >= 2 && stats.remaps == 1, "{stats:?}");
        assert_eq!(stats.background_failures + stats.poisoned, 0, "{stats:?}");
    });
}

/// Fresh anonymous memory at exactly `addr`, unless something else was
/// mapped there meanwhile (tests run in parallel).
fn fresh_at(addr: usize, len: usize) -> Option<usize> {
    // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EEXIST),
            "mmap at {addr:#x}: {e}"
        );
        return None;
    }
    assert_eq!(p as usize, addr, "MAP_FIXED_NOREPLACE mapped elsewhere");
    Some(addr)
}

#[test]
fn the_fill_makes_every_page_resident_and_the_warm_plan_comes_first() {
    let pages = 512;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    let mut ws = whole(pages, page);
    ws = {
        let mut w = WorkingSet::new(ws.regions().to_vec());
        w.push(0, 300, 10).unwrap();
        w.push(0, 7, 1).unwrap();
        w
    };
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = image_server(uffd, base, len)
            .warm(ws)
            .unwrap()
            .fill(Fill::Unbounded)
            .spawn();
        // The wait borrows nothing: a task of its own, the handle kept.
        let waiter = tokio::spawn(handle.resident());
        let after = tokio::time::timeout(BOUND, waiter)
            .await
            .expect("resident within the bound")
            .unwrap()
            .unwrap();
        let stats = handle.stats();
        assert_eq!(stats.time_to_resident, Some(after));
        assert_eq!(stats.pages_warmed, 11, "{stats:?}");
        assert_eq!(stats.pages_filled, pages as u64 - 11, "{stats:?}");
        tokio::task::spawn_blocking(move || check_image(base, page, 0..pages))
            .await
            .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.faults_missing, 0, "{stats:?}");
    });
}

#[test]
fn a_bounded_fill_keeps_to_its_rate() {
    let pages = 256;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    // 1 MiB at 4 MiB/s: at least about a quarter of a second.
    let rate = 4 << 20;
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = image_server(uffd, base, len)
            .fill(Fill::BytesPerSecond(rate))
            .background_chunk(16 * page)
            .spawn();
        let after = tokio::time::timeout(BOUND, handle.resident())
            .await
            .expect("resident within the bound")
            .unwrap();
        // The first copy goes at once; the rest waits its turn.
        let least = Duration::from_secs_f64((len - 16 * page) as f64 / rate as f64);
        assert!(after >= least, "{after:?} < {least:?}");
        tokio::task::spawn_blocking(move || check_image(base, page, 0..pages))
            .await
            .unwrap();
        final_stats(handle).await;
    });
}

#[test]
fn resident_without_a_fill_or_after_failed_copies_is_a_clear_error() {
    let pages = 16;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = image_server(uffd, base, len).spawn();
        let err = handle.resident().await.unwrap_err().to_string();
        assert!(err.contains("no background fill"), "{err}");
        final_stats(handle).await;
    });
    // A source shorter than the region: the pages past its end fail.
    let Some((uffd, _mem2)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let base = _mem2.addr;
    rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(MemorySource::new(image(4 * page))),
        )
        .regions([Region::new(base..base + len)])
        .unwrap()
        .fill(Fill::Unbounded)
        .background_chunk(page)
        .spawn();
        let err = tokio::time::timeout(BOUND, handle.resident())
            .await
            .expect("an answer within the bound")
            .unwrap_err()
            .to_string();
        assert!(err.contains("12 pages are still missing"), "{err}");
        let stats = handle.stats_ref();
        let failure = stats.last_failure().expect("a failure recorded");
        assert_eq!(failure.action, FailureAction::Dropped);
        let chain = tokio_uffd::error_chain(&failure);
        assert!(chain.contains("starts past the end"), "{chain}");
        let s = final_stats(handle).await;
        assert_eq!(
            s.background_failures, 36,
            "three passes over 12 pages: {s:?}"
        );
        assert_eq!(s.pages_filled, 4, "{s:?}");
    });
    drop(mem);
}

/// A handler that offers a run's bytes in memory once and no longer when
/// the server comes to copy them (a file's page evicted in between): the
/// second `bytes_for` call for a run says no.
struct VanishingBytes {
    image: MemorySource,
    calls: std::sync::Mutex<std::collections::HashMap<u64, usize>>,
    fetched: AtomicUsize,
}

impl tokio_uffd::FaultHandler for VanishingBytes {
    fn bytes_for(&self, req: &tokio_uffd::FaultRequest) -> Option<&[u8]> {
        let mut calls = self.calls.lock().unwrap();
        let n = calls.entry(req.offset).or_default();
        *n += 1;
        if *n == 2 {
            return None;
        }
        self.image.bytes_at(req.offset, req.len)
    }

    async fn fault<'a>(
        &'a self,
        req: &'a tokio_uffd::FaultRequest,
        buf: &'a mut [u8],
    ) -> Result<tokio_uffd::Resolution, tokio_uffd::HandlerError> {
        self.fetched.fetch_add(1, Ordering::SeqCst);
        self.image.read_at(req.offset, buf).await?;
        Ok(tokio_uffd::Resolution::Copy)
    }
}

#[test]
fn bytes_that_vanish_before_the_copy_are_fetched_through_fault() {
    let pages = 32;
    let Some((uffd, mem)) = registered_anon(pages, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let (base, len) = (mem.addr, pages * page);
    let handler = Arc::new(VanishingBytes {
        image: MemorySource::new(image(len)),
        calls: Default::default(),
        fetched: AtomicUsize::new(0),
    });
    let mut ws = whole(pages, page);
    ws = {
        let mut w = WorkingSet::new(ws.regions().to_vec());
        w.push(0, 16, 16).unwrap();
        w
    };
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler.clone())
            .regions([Region::new(base..base + len)])
            .unwrap()
            .warm(ws)
            .unwrap()
            .background_chunk(4 * page)
            .spawn();
        wait_stats(&handle, "the prefetch done", |s| s.pages_warmed == 16);
        // Faults on the first half, with a window of one page.
        tokio::task::spawn_blocking(move || check_image(base, page, 0..pages))
            .await
            .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.faults_missing, 16, "{stats:?}");
        assert_eq!(stats.handler_failures + stats.poisoned, 0, "{stats:?}");
        assert_eq!(stats.background_failures, 0, "{stats:?}");
    });
    // Each of the 4 prefetch copies and the 16 faults fetched once.
    assert_eq!(handler.fetched.load(Ordering::SeqCst), 20);
}
