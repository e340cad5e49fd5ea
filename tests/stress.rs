//! Stress, modeled on the kernel's uffd-stress: an area of pages, each with
//! a counter and a lock, is bounced between a source and a fresh
//! destination served by the `Server`. Faulting threads (two per CPU) take
//! per-page locks on random and sequential pages and bump the counters,
//! racing each other's faults on shared pages. After every bounce every
//! counter and every byte is checked. At the end no fd is left open.
//!
//! CI bounces for about fifteen seconds; `TOKIO_UFFD_SOAK_SECS=600` soaks.
//! This file holds a single test so that the fd count is exact.

#![cfg(feature = "async")]

mod common;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tokio_uffd::{
    AsyncUffd, Features, PageSource, Region, RegisterMode, Server, SourceHandler, UffdBuilder,
};

/// Serves pages from the live source area of the bounce.
struct LiveSource {
    base: usize,
    len: usize,
}

impl PageSource for LiveSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let off = offset as usize;
        assert!(off + buf.len() <= self.len);
        // SAFETY: the source area is mapped, populated and not written by
        // anyone during the bounce.
        let src = unsafe { std::slice::from_raw_parts((self.base + off) as *const u8, buf.len()) };
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The pattern byte of the rest of page `p` (after its counter and lock).
fn fill_byte(p: usize, i: usize) -> u8 {
    (p as u8).wrapping_mul(31) ^ i as u8
}

fn counter(base: usize, page: usize, p: usize) -> &'static AtomicU64 {
    // SAFETY: the page is mapped for the whole bounce and 8-byte aligned;
    // the atomic is only used while the area lives.
    unsafe { &*((base + p * page) as *const AtomicU64) }
}

fn lock(base: usize, page: usize, p: usize) -> &'static AtomicU32 {
    // SAFETY: as for `counter`, at offset 8.
    unsafe { &*((base + p * page + 8) as *const AtomicU32) }
}

#[test]
fn bouncing_an_area_through_the_server_keeps_every_count_and_byte() {
    if uffd_with(Features::empty()).is_none() {
        return;
    }
    let soak = std::env::var("TOKIO_UFFD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let min_bounces = 4;
    // About fifteen seconds in CI, or as long as asked.
    let deadline = Instant::now() + Duration::from_secs(soak.unwrap_or(15));
    let page = page_size();
    let pages = 1024;
    let len = pages * page;
    let threads = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    let ops_per_thread = 20_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Counted with the runtime up: its own fds (and the process-wide ones
    // Tokio's signal driver keeps for good) are not the crate's.
    let fds_before = count_fds();

    // The first source: counters zero, the rest of each page a pattern.
    let mut src = Mapping::anon(len);
    for p in 0..pages {
        for i in 16..page {
            write_at(src.addr + p * page + i, fill_byte(p, i));
        }
    }
    let expected: Arc<Vec<AtomicU64>> = Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect());
    let mut bounce = 0;
    while bounce < min_bounces || Instant::now() < deadline {
        bounce += 1;
        let uffd = UffdBuilder::new()
            .want(Features::EVENT_REMOVE)
            .create()
            .unwrap();
        let dst = Mapping::anon(len);
        // SAFETY: fresh destination, served from the source by the server.
        unsafe { uffd.register(dst.addr, len, RegisterMode::MISSING) }.unwrap();
        let stats = rt.block_on(async {
            let source = LiveSource {
                base: src.addr,
                len,
            };
            let handle = Server::new(AsyncUffd::new(uffd).unwrap(), SourceHandler::new(source))
                .regions([Region::new(dst.addr..dst.addr + len)])
                .unwrap()
                .prefetch(1 + bounce % 4)
                .spawn();
            let base = dst.addr;
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let expected = expected.clone();
                    thread::spawn(move || {
                        let mut x =
                            (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ bounce as u64;
                        for k in 0..ops_per_thread {
                            // Alternate random and sequential pages.
                            let p = if k % 2 == 0 {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                (x % pages as u64) as usize
                            } else {
                                (k / 2 + t * 17) % pages
                            };
                            let l = lock(base, page, p);
                            while l
                                .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                                .is_err()
                            {
                                std::hint::spin_loop();
                            }
                            let c = counter(base, page, p);
                            c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                            expected[p].fetch_add(1, Ordering::Relaxed);
                            l.store(0, Ordering::Release);
                        }
                    })
                })
                .collect();
            tokio::time::timeout(
                BOUND * 3,
                tokio::task::spawn_blocking(move || {
                    workers.into_iter().for_each(|w| w.join().unwrap())
                }),
            )
            .await
            .expect("a faulting thread was left asleep")
            .unwrap();
            let stats = handle.stats_ref();
            handle.shutdown().await.unwrap();
            stats.snapshot()
        });
        assert_eq!(stats.handler_failures, 0, "{stats:?}");
        // Every page was touched, so every page is there: check them all.
        for p in 0..pages {
            let want = expected[p].load(Ordering::Relaxed);
            assert_eq!(
                counter(dst.addr, page, p).load(Ordering::Relaxed),
                want,
                "bounce {bounce}, page {p}"
            );
            assert_eq!(lock(dst.addr, page, p).load(Ordering::Relaxed), 0);
            for i in (16..page).step_by(97) {
                assert_eq!(
                    read_at(dst.addr + p * page + i),
                    fill_byte(p, i),
                    "bounce {bounce}, page {p}, byte {i}"
                );
            }
        }
        // The destination becomes the next source.
        src = dst;
    }
    drop(src);
    assert_eq!(count_fds(), fds_before, "fds leaked over {bounce} bounces");
    eprintln!("{bounce} bounces of {pages} pages, {threads} threads x {ops_per_thread} ops each");
}
