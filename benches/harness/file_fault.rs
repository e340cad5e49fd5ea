//! Fault latency from a snapshot file, window 1: one faulting thread, one
//! page per fault, the `Server` with an [`MmapSource`] of the image file
//! beside a hand-written blocking handler that copies from its own mapping
//! of the same file (the raw floor's loop: `read(2)` + `UFFDIO_COPY`).

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tokio_uffd::{Region, Server, SourceHandler};

use super::case::{Op, Side};
use super::cpu::{pin, unpin, Pin};
use super::cpu_time::on_cpu_clock;
use super::crate_paths::{crate_uffd, Runtime, ServerThread};
use super::image_file::{FileMap, ImageFile};
use super::memory::{page_size, pattern_byte, sentinel, touch, Mapping};
use super::raw::{raw_handler, raw_uffd};

/// `n` faults served from the first `n` pages of `image` (window 1), one
/// after another on fresh pages (a page freed with `MADV_DONTNEED` would be
/// served as zeros by the server, as a `Remove` requires): the time spent
/// faulting. Each side maps the file itself when it starts, as a restoring
/// handler would. The handler thread's CPU time (the server's runtime
/// thread's, on the crate's side) is then in
/// [`last_handler_cpu`](super::cpu_time::last_handler_cpu).
pub fn file_latency(side: Side, pin_to: Pin, image: &ImageFile, n: usize) -> Duration {
    let page = page_size();
    let len = n * page;
    assert!(len <= image.len(), "{n} pages of the image");
    let mem = Mapping::new(len + page);
    let base = mem.addr;
    let hcpu = pin_to.handler_cpu();
    pin(0);
    let elapsed = match side {
        Side::Raw => {
            let sentinel = sentinel(&mem, page);
            let fd = raw_uffd(false, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            let map = FileMap::new(image.fd(), image.len());
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    raw_handler(
                        raw,
                        false,
                        Op::Copy,
                        page,
                        1,
                        base,
                        base + len,
                        map.bytes(),
                        sentinel,
                    )
                });
            });
            let t = fault_pages(base, page, n);
            check(base, n);
            touch(sentinel);
            handler.join().unwrap();
            drop(fd);
            t
        }
        Side::Server => {
            let uffd = crate_uffd(&mem);
            let source = image.mmap_source();
            let server = ServerThread::start(uffd, Runtime::Current, Some(hcpu), move |u| {
                Server::new(u, SourceHandler::new(source))
                    .regions([Region::new(base..base + len)])
                    .unwrap()
                    .spawn()
            });
            let t = fault_pages(base, page, n);
            check(base, n);
            drop(server);
            t
        }
    };
    unpin();
    elapsed
}

/// Touches pages `0..n` from `base` in order: the time it took.
fn fault_pages(base: usize, page: usize, n: usize) -> Duration {
    let t0 = Instant::now();
    for i in 0..n {
        touch(base + i * page);
    }
    t0.elapsed()
}

/// A fast wrong restore is no restore: a few of the pages hold the
/// image's bytes.
fn check(base: usize, n: usize) {
    let page = page_size();
    for off in [5, n / 2 * page + 17, n * page - 1] {
        assert_eq!(
            touch(base + off),
            pattern_byte(off),
            "byte {off:#x} from the file"
        );
    }
}
