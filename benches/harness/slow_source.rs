//! Slow page sources, what async is for: every page takes
//! [`SLOW_FETCH`] to fetch, and many faulting threads wait at once.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_uffd::{PageSource, Server, SourceHandler};

use super::case::{Op, Side};
use super::crate_paths::{crate_uffd, Runtime, ServerThread};
use super::delay::{Delay, SLOW_FETCH};
use super::memory::{page_of_bytes, page_size, sentinel, touch, Mapping};
use super::raw::{fault_page, raw_resolve, raw_uffd};

/// A source whose every read takes `SLOW_FETCH`.
struct SlowSource;

impl PageSource for SlowSource {
    async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        Delay::default().await;
        buf.fill(7);
        Ok(())
    }
}

/// `threads` faulting threads, `per_thread` faults each, every page taking
/// `SLOW_FETCH` to fetch: the wall time. `Side::Server` runs on a
/// multi-thread runtime, as an application waiting on many fetches would;
/// `Side::Raw` is a synchronous one-thread handler that sleeps per fault,
/// like a blocking fetch.
pub fn slow_source(side: Side, threads: usize, per_thread: usize) -> Duration {
    let page = page_size();
    let mem = Arc::new(Mapping::new((threads * per_thread + 1) * page));
    let sentinel = sentinel(&mem, page);
    let mut guard = None;
    let mut raw = None;
    match side {
        Side::Raw => {
            let fd = raw_uffd(false, mem.addr, mem.len);
            let rawfd = fd.as_raw_fd();
            let h = std::thread::spawn(move || {
                let mut msg = [0u8; 32];
                loop {
                    // SAFETY: one message into a 32-byte buffer.
                    let n = unsafe { libc::read(rawfd, msg.as_mut_ptr().cast(), 32) };
                    if n != 32 {
                        continue;
                    }
                    let addr = fault_page(&msg, page);
                    if addr != sentinel {
                        std::thread::sleep(SLOW_FETCH);
                    }
                    raw_resolve(rawfd, Op::Copy, addr, page, page_of_bytes().as_ptr());
                    if addr == sentinel {
                        return;
                    }
                }
            });
            raw = Some((fd, h));
        }
        Side::Server => {
            let uffd = crate_uffd(&mem);
            guard = Some(ServerThread::start(uffd, Runtime::Multi, None, |u| {
                Server::new(u, SourceHandler::new(SlowSource))
                    .concurrency(64)
                    .spawn()
            }));
        }
    }
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let mem = mem.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    touch(mem.addr + (t * per_thread + i) * page);
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
    if let Some((fd, h)) = raw {
        touch(sentinel);
        h.join().unwrap();
        drop(fd);
    }
    drop(guard);
    elapsed
}
