//! Dirty-page tracking (issue 15): a writer thread writes one byte to each
//! of a random set of pages of a populated anonymous region per round, and
//! a collector finds the pages written and re-arms tracking, by three
//! methods:
//!
//! - [`Method::Async`]: [`DirtyTracker::round`] (`WP_ASYNC` +
//!   `PAGEMAP_SCAN`, re-protecting in the same call);
//! - [`Method::SyncWp`]: the range registered `MODE_WP` with a blocking
//!   userfaultfd without `WP_ASYNC`; a handler thread reads each
//!   write-protect fault, records the page and unprotects it (which wakes
//!   the writer); a round write-protects the whole range again and takes
//!   the recorded set;
//! - [`Method::SoftDirty`]: the soft-dirty bits, cleared by writing `4` to
//!   `/proc/self/clear_refs`; a round reads the range's pagemap entries
//!   (bit 55) and clears them again.
//!
//! Each method's floor is the same writes on the same region before any
//! tracking is set up on it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_uffd::{
    DirtyTracker, Event, EventBuffer, FaultKind, Features, RegisterMode, UffdBuilder,
    UnprotectFlags,
};

use super::memory::{page_size, Mapping};

/// How the written pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `WP_ASYNC` + `PAGEMAP_SCAN`: [`DirtyTracker`].
    Async,
    /// Synchronous write-protect faults read by a handler thread.
    SyncWp,
    /// Soft-dirty bits: `/proc/self/clear_refs` + `/proc/self/pagemap`.
    SoftDirty,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Async => "async (WP_ASYNC + PAGEMAP_SCAN)",
            Method::SyncWp => "sync write-protect faults",
            Method::SoftDirty => "soft-dirty (clear_refs + pagemap)",
        }
    }
}

/// The figures of one method at one dirty fraction, one entry per round.
#[derive(Debug, Clone, Default)]
pub struct DirtyRun {
    /// The writer's time per round with no tracking (the floor).
    pub floor: Vec<Duration>,
    /// The writer's time per round with tracking.
    pub writer: Vec<Duration>,
    /// The collection time per round: finding the written pages and
    /// re-arming tracking.
    pub round: Vec<Duration>,
}

/// A small, seedable generator (xorshift64*), so that every method writes
/// the same pages.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` distinct pages of `pages`, in random order, the same for the same
/// seed.
fn random_pages(pages: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut all: Vec<usize> = (0..pages).collect();
    for i in 0..n {
        let j = i + (rng.next() % (pages - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// Writes one byte to each page of `pages` from a new thread and returns
/// the time the writes took on that thread.
fn write_pages(base: usize, page: usize, pages: &[usize], value: u8) -> Duration {
    std::thread::scope(|s| {
        s.spawn(|| {
            let t0 = Instant::now();
            for &p in pages {
                // SAFETY: `p` is a page of the live mapping at `base`; a
                // tracked page is only write-protected, and the tracking
                // (kernel or handler thread) lets the write through.
                unsafe { std::ptr::write_volatile((base + p * page) as *mut u8, value) };
            }
            t0.elapsed()
        })
        .join()
        .expect("the writer panicked")
    })
}

/// Whether the kernel keeps soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`):
/// without it `clear_refs` accepts `4` but the pagemap never shows bit 55.
pub fn soft_dirty_supported() -> bool {
    let page = page_size();
    let mem = Mapping::new(page);
    // SAFETY: a page of our own mapping.
    unsafe { std::ptr::write_volatile(mem.addr as *mut u8, 1) };
    if std::fs::write("/proc/self/clear_refs", "4").is_err() {
        return false;
    }
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(mem.addr as *mut u8, 2) };
    let mut entry = [0u8; 8];
    File::open("/proc/self/pagemap")
        .and_then(|f| f.read_exact_at(&mut entry, (mem.addr / page * 8) as u64))
        .is_ok_and(|()| u64::from_ne_bytes(entry) & (1 << 55) != 0)
}

/// Runs `rounds` rounds of `method` at each of `percents` (of the pages of
/// a `bytes`-long region written per round). Returns one [`DirtyRun`] per
/// percentage, in order. Every round's dirty set is checked against the
/// number of pages written.
pub fn dirty_tracking(
    method: Method,
    bytes: usize,
    percents: &[usize],
    rounds: usize,
) -> Vec<DirtyRun> {
    let page = page_size();
    let pages = bytes / page;
    let mem = Mapping::new(bytes);
    // Populate every page.
    for p in 0..pages {
        // SAFETY: a page of our own mapping, not registered anywhere yet.
        unsafe { std::ptr::write_volatile((mem.addr + p * page) as *mut u8, 1) };
    }
    let sets = |pct: usize| -> Vec<Vec<usize>> {
        (0..rounds)
            .map(|r| random_pages(pages, pages * pct / 100, (pct * 1000 + r) as u64))
            .collect()
    };
    let mut out: Vec<DirtyRun> = Vec::new();
    // The floor: the same writes, no tracking yet.
    for &pct in percents {
        let floor = sets(pct)
            .iter()
            .map(|set| write_pages(mem.addr, page, set, 2))
            .collect();
        out.push(DirtyRun {
            floor,
            ..Default::default()
        });
    }
    match method {
        Method::Async => {
            let mut tracker = DirtyTracker::new().expect("WP_ASYNC (Linux 6.7+)");
            // SAFETY: the mapping is ours and outlives the tracker; with
            // WP_ASYNC no thread waits on it and no content changes.
            unsafe { tracker.track(mem.addr, bytes) }.expect("tracking the region");
            for (run, &pct) in out.iter_mut().zip(percents) {
                for set in sets(pct) {
                    run.writer.push(write_pages(mem.addr, page, &set, 3));
                    let t0 = Instant::now();
                    let dirty = tracker.round().expect("DirtyTracker::round");
                    let n: usize = dirty.iter().map(|r| (r.end - r.start) / page).sum();
                    run.round.push(t0.elapsed());
                    assert_eq!(n, set.len(), "async: dirty pages vs pages written");
                }
            }
            drop(tracker);
        }
        Method::SyncWp => {
            let uffd = Arc::new(
                UffdBuilder::new()
                    .blocking(true)
                    .require(Features::PAGEFAULT_FLAG_WP)
                    .create()
                    .expect("a userfaultfd with write-protect faults"),
            );
            // SAFETY: the mapping is ours, populated and outlives the
            // handler thread; write-protect faults only delay the writer
            // until the handler unprotects the page.
            unsafe { uffd.register(mem.addr, bytes, RegisterMode::WP) }.expect("MODE_WP");
            uffd.write_protect(mem.addr, bytes).expect("write_protect");
            let recorded = Arc::new(Mutex::new(Vec::<usize>::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let handler = {
                let (uffd, recorded, stop) = (uffd.clone(), recorded.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut buf = EventBuffer::default();
                    loop {
                        uffd.read_events(&mut buf).expect("read_events");
                        while let Some(event) = buf.next_event() {
                            if let Event::PageFault(f) = event.expect("an event") {
                                if f.kind() == FaultKind::WriteProtect {
                                    let start = f.page_start(page);
                                    recorded.lock().unwrap().push(start);
                                    uffd.write_unprotect(start, page, UnprotectFlags::empty())
                                        .expect("write_unprotect");
                                }
                            }
                        }
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                    }
                })
            };
            for (run, &pct) in out.iter_mut().zip(percents) {
                for set in sets(pct) {
                    run.writer.push(write_pages(mem.addr, page, &set, 3));
                    let t0 = Instant::now();
                    uffd.write_protect(mem.addr, bytes).expect("write_protect");
                    let mut dirty = std::mem::take(&mut *recorded.lock().unwrap());
                    dirty.sort_unstable();
                    dirty.dedup();
                    run.round.push(t0.elapsed());
                    assert_eq!(
                        dirty.len(),
                        set.len(),
                        "sync WP: dirty pages vs pages written"
                    );
                }
            }
            // One last fault, with the stop flag set, ends the handler.
            stop.store(true, Ordering::Release);
            write_pages(mem.addr, page, &[0], 4);
            handler.join().expect("the WP handler panicked");
            uffd.unregister(mem.addr, bytes).expect("unregister");
        }
        Method::SoftDirty => {
            let pagemap = File::open("/proc/self/pagemap").expect("/proc/self/pagemap");
            let clear = || std::fs::write("/proc/self/clear_refs", "4").expect("clear_refs");
            let mut entries = vec![0u8; pages * 8];
            clear();
            for (run, &pct) in out.iter_mut().zip(percents) {
                for set in sets(pct) {
                    run.writer.push(write_pages(mem.addr, page, &set, 3));
                    let t0 = Instant::now();
                    pagemap
                        .read_exact_at(&mut entries, (mem.addr / page * 8) as u64)
                        .expect("reading pagemap");
                    let dirty: Vec<usize> = entries
                        .chunks_exact(8)
                        .enumerate()
                        .filter(|(_, e)| {
                            u64::from_ne_bytes((*e).try_into().unwrap()) & (1 << 55) != 0
                        })
                        .map(|(i, _)| i)
                        .collect();
                    clear();
                    run.round.push(t0.elapsed());
                    assert_eq!(
                        dirty.len(),
                        set.len(),
                        "soft-dirty: dirty pages vs pages written"
                    );
                }
            }
        }
    }
    out
}
