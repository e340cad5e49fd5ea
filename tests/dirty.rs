//! Dirty-page tracking with asynchronous write protection (`WP_ASYNC`) and
//! `PAGEMAP_SCAN`, against the real kernel (Linux 6.7+): exact dirty sets,
//! concurrent writers, writes racing a scan, shmem and hugetlb, unmapped
//! ranges, and scans split over many calls. Sync core only.

// A round's expected result is often one range: `[a..b]` is meant.
#![allow(clippy::single_range_in_vec_init)]

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use common::*;
use tokio_uffd::{
    DirtyTracker, ErrorKind, Features, PageCategories, Pagemap, ScanQuery, UffdBuilder,
};

/// A tracker, or None after saying loudly why not (a failure under CI).
fn tracker() -> Option<DirtyTracker> {
    let uffd = try_uffd(DirtyTracker::builder())?;
    Some(DirtyTracker::from_uffd(uffd).expect("a tracker on a WP_ASYNC userfaultfd"))
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Sorted, merged page ranges of a set of page indices of `base`.
fn ranges(base: usize, page: usize, pages: &[usize]) -> Vec<Range<usize>> {
    let mut p = pages.to_vec();
    p.sort_unstable();
    p.dedup();
    let mut out: Vec<Range<usize>> = Vec::new();
    for i in p {
        let a = base + i * page;
        match out.last_mut() {
            Some(last) if last.end == a => last.end = a + page,
            _ => out.push(a..a + page),
        }
    }
    out
}

/// Page indices (of `page` bytes from `base`) covered by `rs`.
fn pages_of(base: usize, page: usize, rs: &[Range<usize>]) -> Vec<usize> {
    rs.iter()
        .flat_map(|r| (r.start - base) / page..(r.end - base) / page)
        .collect()
}

fn random_pages(rng: &mut Rng, n: usize, of: usize) -> Vec<usize> {
    (0..n).map(|_| rng.below(of)).collect()
}

#[test]
fn exact_dirty_sets_over_many_rounds() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let n = 512;
    let m = Mapping::anon(n * page);
    // Populate half of it first: tracking must be exact on populated and
    // never-touched pages alike.
    for i in (0..n).step_by(2) {
        write_at(m.addr + i * page, 1);
    }
    // SAFETY: our own mapping; nothing relies on its protection.
    unsafe { t.track(m.addr, m.len) }.unwrap();
    assert!(t.round().unwrap().is_empty(), "nothing written yet");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..100 {
        let count = rng.below(64);
        let written = random_pages(&mut rng, count, n);
        for &p in &written {
            write_at(m.addr + p * page + rng.below(page), round as u8);
        }
        let got = t.round().unwrap().to_vec();
        assert_eq!(got, ranges(m.addr, page, &written), "round {round}");
    }
}

#[test]
fn concurrent_writers_union_is_exact() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let writers = 4;
    let n = 1024;
    let m = Mapping::anon(n * page);
    // SAFETY: our own mapping.
    unsafe { t.track(m.addr, m.len) }.unwrap();
    let base = m.addr;
    let mut rng = Rng(42);
    for round in 0..40 {
        // Writer w owns the pages p with p % writers == w.
        let plans: Vec<Vec<usize>> = (0..writers)
            .map(|w| {
                (0..rng.below(100))
                    .map(|_| rng.below(n / writers) * writers + w)
                    .collect()
            })
            .collect();
        let start = Barrier::new(writers);
        std::thread::scope(|s| {
            for plan in &plans {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    for &p in plan {
                        write_at(base + p * page, round as u8 + 1);
                    }
                });
            }
        });
        let all: Vec<usize> = plans.concat();
        assert_eq!(
            t.round().unwrap(),
            ranges(base, page, &all),
            "round {round}"
        );
    }
}

#[test]
fn pages_written_during_a_scan_are_never_lost() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let n = 4096; // 16 MiB of 4 KiB pages: scans take long enough to race
    let m = Mapping::anon(n * page);
    // Half populated before tracking, half never touched.
    for i in 0..n / 2 {
        write_at(m.addr + i * page, 1);
    }
    // SAFETY: our own mapping.
    unsafe { t.track(m.addr, m.len) }.unwrap();
    let base = m.addr;
    // The round whose scan has begun (set just before the call).
    let epoch = Arc::new(AtomicUsize::new(0));
    let writes = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (epoch, writes, stop) = (epoch.clone(), writes.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(7);
            // (page, latest round begun before the write, and after it): the
            // thread may be preempted between the loads and the write.
            let mut log: Vec<(usize, usize, usize)> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let p = rng.below(n);
                let before = epoch.load(Ordering::SeqCst);
                write_at(base + p * page, 1);
                let after = epoch.load(Ordering::SeqCst);
                log.push((p, before, after));
                writes.fetch_add(1, Ordering::Relaxed);
            }
            log
        })
    };
    let mut dirty: Vec<Vec<usize>> = Vec::new();
    // At least 200 rounds and 100 000 racing writes, within the bound.
    let began = std::time::Instant::now();
    let mut k = 0;
    while (k < 200 || writes.load(Ordering::Relaxed) < 100_000) && began.elapsed() < BOUND / 2 {
        epoch.store(k, Ordering::SeqCst);
        k += 1;
        let rs = t.round().unwrap();
        let mut ps = pages_of(base, page, rs);
        ps.sort_unstable();
        dirty.push(ps);
    }
    let rounds = k;
    stop.store(true, Ordering::SeqCst);
    let log = join_bounded("writer", writer);
    epoch.store(rounds, Ordering::SeqCst);
    let mut last = pages_of(base, page, t.round().unwrap());
    last.sort_unstable();
    dirty.push(last);
    assert!(
        log.len() >= 100_000,
        "the writer wrote only {} times in {rounds} rounds",
        log.len()
    );
    for &(p, before, after) in &log {
        // The write landed while round `before`..=`after` was the latest
        // to begin: it is reported by one of those rounds or the next.
        assert!(
            (before..=after + 1).any(|k| dirty[k].binary_search(&p).is_ok()),
            "page {p}, written after round {before} began and before round {} began, \
             is in none of rounds {before}..={}",
            after + 1,
            after + 1
        );
    }
    // And nothing is reported that was not written by then.
    let mut first_epoch = vec![usize::MAX; n];
    for &(p, e, _) in &log {
        first_epoch[p] = first_epoch[p].min(e);
    }
    for (k, ps) in dirty.iter().enumerate() {
        for &p in ps {
            assert!(
                first_epoch[p] <= k,
                "page {p} reported in round {k} before any write"
            );
        }
    }
    eprintln!(
        "{} writes raced {} rounds over {} MiB",
        log.len(),
        rounds,
        (n * page) >> 20
    );
}

/// Tracking on memory that is not anonymous private: exact rounds, with
/// pages of `unit` bytes (hugetlb pages are reported whole).
fn exact_rounds_on(t: &mut DirtyTracker, m: &Mapping, unit: usize, rounds: usize) {
    let n = m.len / unit;
    // SAFETY: our own mapping.
    unsafe { t.track(m.addr, m.len) }.unwrap();
    let mut rng = Rng(99);
    for round in 0..rounds {
        let count = rng.below(n / 2 + 1);
        let written = random_pages(&mut rng, count, n);
        for &p in &written {
            write_at(m.addr + p * unit + rng.below(unit), round as u8 + 1);
        }
        assert_eq!(
            t.round().unwrap(),
            ranges(m.addr, unit, &written),
            "round {round}"
        );
    }
}

#[test]
fn shmem_memfd_dirty_sets_are_exact() {
    let Some(mut t) = tracker() else { return };
    if !t.uffd().features().contains(Features::WP_HUGETLBFS_SHMEM) {
        skip("the kernel lacks WP_HUGETLBFS_SHMEM: no write protection of shmem");
        return;
    }
    let page = page_size();
    let len = 256 * page;
    let Some(fd) = memfd(len, false) else { return };
    use std::os::fd::AsRawFd;
    let m = Mapping::new(len, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    // Some pages in the page cache already, some not.
    for i in (0..256).step_by(3) {
        write_at(m.addr + i * page, 1);
    }
    exact_rounds_on(&mut t, &m, page, 50);
}

#[test]
fn hugetlb_dirty_sets_are_exact() {
    let Some(mut t) = tracker() else { return };
    if !t.uffd().features().contains(Features::WP_HUGETLBFS_SHMEM) {
        skip("the kernel lacks WP_HUGETLBFS_SHMEM: no write protection of hugetlb");
        return;
    }
    let huge = huge_page_size();
    let Some(m) = Mapping::hugetlb(4 * huge) else {
        return;
    };
    write_at(m.addr, 1);
    exact_rounds_on(&mut t, &m, huge, 30);
    // Categories say HUGE.
    write_at(m.addr + huge, 9);
    let mut pm = Pagemap::open().unwrap();
    let mut out = Vec::new();
    let q = ScanQuery {
        return_mask: PageCategories::WRITTEN | PageCategories::HUGE,
        ..ScanQuery::written()
    };
    pm.scan(m.addr, m.addr + m.len, &q, &mut out).unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].range, m.addr + huge..m.addr + 2 * huge);
    assert_eq!(
        out[0].categories,
        PageCategories::WRITTEN | PageCategories::HUGE
    );
}

#[test]
fn unmapped_range_between_rounds_reports_the_rest() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let a = Mapping::anon(16 * page);
    let b = Mapping::anon(16 * page);
    // SAFETY: our own mappings.
    unsafe { t.track(a.addr, a.len) }.unwrap();
    // SAFETY: as above.
    unsafe { t.track(b.addr, b.len) }.unwrap();
    write_at(a.addr + 3 * page, 1);
    write_at(b.addr + 5 * page, 1);
    let mut want = vec![
        a.addr + 3 * page..a.addr + 4 * page,
        b.addr + 5 * page..b.addr + 6 * page,
    ];
    want.sort_unstable_by_key(|r| r.start);
    assert_eq!(t.round().unwrap(), want);

    // Unmap `a` (still tracked); its hole reports nothing.
    let a_addr = a.addr;
    drop(a);
    write_at(b.addr + 7 * page, 1);
    assert_eq!(
        t.round().unwrap(),
        [b.addr + 7 * page..b.addr + 8 * page],
        "an unmapped tracked range reports nothing"
    );

    // Other memory mapped there again is not tracked: a clear error, until
    // the range is untracked.
    // SAFETY: MAP_FIXED over the hole `a` left, which nothing uses.
    let p = unsafe {
        libc::mmap(
            a_addr as *mut libc::c_void,
            16 * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as usize != a_addr {
        skip("could not map new memory where the tracked range was");
        return;
    }
    let again = Mapping {
        addr: a_addr,
        len: 16 * page,
    };
    write_at(again.addr, 1);
    write_at(b.addr + 9 * page, 1);
    match t.round() {
        Ok(rs) => assert_eq!(
            rs,
            [b.addr + 9 * page..b.addr + 10 * page],
            "untracked memory must never be reported"
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("PAGEMAP_SCAN"), "unclear error: {msg}");
            eprintln!("remapped range: {msg}");
            t.untrack(again.addr, again.len).unwrap_or(());
            write_at(b.addr + 9 * page, 2);
            assert_eq!(t.round().unwrap(), [b.addr + 9 * page..b.addr + 10 * page]);
        }
    }
}

/// A tracked range moved with `mremap` between rounds: its old place
/// reports nothing (and no error); tracked again at its new place, the
/// writes there are reported exactly.
#[test]
fn a_range_moved_between_rounds_is_tracked_again_at_its_new_place() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let len = 16 * page;
    let m = Mapping::anon(len);
    let old = m.addr;
    // SAFETY: our own mapping.
    unsafe { t.track(old, len) }.unwrap();
    write_at(old + 2 * page, 1);
    assert_eq!(t.round().unwrap(), [old + 2 * page..old + 3 * page]);
    // A free place of the same size: mapped, then given back.
    let hole = Mapping::anon(len);
    let to = hole.addr;
    drop(hole);
    // SAFETY: moving our own mapping to a place nothing uses; no reference
    // into it exists.
    let moved = unsafe {
        libc::mremap(
            old as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to as *mut libc::c_void,
        )
    };
    assert_eq!(
        moved as usize,
        to,
        "mremap: {}",
        std::io::Error::last_os_error()
    );
    // `m` now names the old, empty place; the mapping is at `to`.
    std::mem::forget(m);
    let m = Mapping { addr: to, len };
    write_at(to + 5 * page, 1);
    assert_eq!(t.round().unwrap(), [], "the old place of a moved range");
    t.untrack(old, len).unwrap();
    // SAFETY: our own mapping, at its new place.
    unsafe { t.track(to, len) }.unwrap();
    write_at(to + 6 * page, 1);
    assert_eq!(t.round().unwrap(), [to + 6 * page..to + 7 * page]);
    drop(m);
}

#[test]
fn partial_results_return_the_same_ranges() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let n = 256;
    let m = Mapping::anon(n * page);
    // SAFETY: our own mapping.
    unsafe { t.track(m.addr, m.len) }.unwrap();
    let mut rng = Rng(5);
    // Every other page, plus some runs: many separate ranges.
    let mut written: Vec<usize> = (0..n).step_by(2).collect();
    written.extend(random_pages(&mut rng, 40, n));
    for &p in &written {
        write_at(m.addr + p * page, 3);
    }
    let want = ranges(m.addr, page, &written);
    assert!(want.len() > 20);

    // Without re-protection, a big and a tiny buffer see the same ranges.
    let mut big = Pagemap::open().unwrap();
    let mut tiny = Pagemap::with_capacity(1).unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    big.scan(m.addr, m.addr + m.len, &ScanQuery::written(), &mut a)
        .unwrap();
    tiny.scan(m.addr, m.addr + m.len, &ScanQuery::written(), &mut b)
        .unwrap();
    assert_eq!(a, b);
    let a: Vec<Range<usize>> = a.into_iter().map(|r| r.range).collect();
    assert_eq!(a, want);
    assert_eq!(big.ioctl_calls(), 1);
    assert!(
        tiny.ioctl_calls() >= want.len() as u64,
        "{}",
        tiny.ioctl_calls()
    );

    // A round through a 3-entry buffer: the same ranges, re-armed.
    t.set_pagemap(Pagemap::with_capacity(3).unwrap());
    assert_eq!(t.round().unwrap(), want);
    assert!(t.pagemap().ioctl_calls() > 1);
    assert!(t.round().unwrap().is_empty());
    write_at(m.addr + 11 * page, 1);
    assert_eq!(t.round().unwrap(), [m.addr + 11 * page..m.addr + 12 * page]);
}

#[test]
fn a_userfaultfd_without_wp_async_is_a_clear_error() {
    let Some(uffd) = try_uffd(UffdBuilder::new()) else {
        return;
    };
    let e = DirtyTracker::from_uffd(uffd).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    let msg = e.to_string();
    assert!(msg.contains("WP_ASYNC") && msg.contains("6.7"), "{msg}");
}

/// 256 MiB, 0, 1 and 10% of it written: each round reports exactly the
/// pages written (and prints what it took, for the record: speed belongs
/// in the benchmarks).
#[test]
fn rounds_over_256_mib_are_exact() {
    let Some(mut t) = tracker() else { return };
    let page = page_size();
    let len = 256 << 20;
    let m = Mapping::anon(len);
    for off in (0..len).step_by(page) {
        write_at(m.addr + off, 1);
    }
    // SAFETY: our own mapping.
    unsafe { t.track(m.addr, m.len) }.unwrap();
    let n = len / page;
    for pct in [0usize, 1, 10] {
        let mut rng = Rng(11);
        let pages = random_pages(&mut rng, n * pct / 100, n);
        for &p in &pages {
            write_at(m.addr + p * page, 2);
        }
        let want: std::collections::BTreeSet<usize> = pages.iter().copied().collect();
        let at = std::time::Instant::now();
        let ranges = t.round().unwrap().to_vec();
        let el = at.elapsed();
        let got: std::collections::BTreeSet<usize> =
            pages_of(m.addr, page, &ranges).into_iter().collect();
        assert_eq!(got, want, "{pct}%: the pages written");
        let got = got.len();
        eprintln!(
            "round over {} MiB with {}% written ({} dirty pages): {:?}",
            len >> 20,
            pct,
            got,
            el
        );
    }
}
