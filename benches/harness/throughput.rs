//! Throughput: several faulting threads, one page per fault.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_uffd::{Server, SourceHandler};

use super::case::{Op, Side};
use super::crate_paths::{crate_uffd, PatternSource, Runtime, ServerThread};
use super::memory::{page_of_bytes, page_size, sentinel, touch, Mapping};
use super::raw::{raw_handler, raw_uffd};

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
