//! Fault-around: a sequential restore from an in-memory image, a window of
//! pages resolved per fault.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tokio_uffd::{MemorySource, Region, Server, SourceHandler};

use super::case::{Op, Side};
use super::cpu::{pin, unpin};
use super::crate_paths::{crate_uffd, Runtime, ServerThread};
use super::memory::{image, page_size, sentinel, touch, Mapping};
use super::raw::{raw_handler, raw_uffd};

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
