//! Fault latency: one faulting thread, one page per fault, through each
//! path (the raw floors, the sync API, `EventStream`, `Server`).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio_uffd::{AsyncUffd, Event, EventBuffer, Server, SourceHandler, UffdBuilder};

use super::case::Op;
use super::cpu::{pin, unpin, Pin};
use super::cpu_time::on_cpu_clock;
use super::crate_paths::{
    crate_uffd, register_all, resolve_crate, runtime_current, runtime_current_io, stream_loop,
    PatternSource, ZeroHandler,
};
use super::memory::{fault_loop, page_of_bytes, page_size, sentinel, touch, Mapping};
use super::raw::{raw_epoll_handler, raw_handler, raw_uffd};

/// The handler under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Raw floor: blocking `read(2)` + one ioctl.
    RawRead,
    /// Raw floor: `poll(2)` + `read(2)` + one ioctl.
    RawPoll,
    /// Raw floor: edge-triggered `epoll_wait(2)` + `read(2)` of up to 16
    /// messages + one ioctl each, as a reactor does it.
    RawEpoll,
    /// The crate's sync API: a blocking `Uffd::read_events` + ioctl.
    Sync,
    /// `EventStream` on a current-thread runtime.
    StreamCurrent,
    /// `EventStream` on a multi-thread runtime.
    StreamMulti,
    /// `Server` with spawned handler tasks, on a current-thread runtime.
    Server,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::RawRead => "raw read+ioctl",
            Path::RawPoll => "raw poll+read+ioctl",
            Path::RawEpoll => "raw epoll+read+ioctl",
            Path::Sync => "sync Uffd",
            Path::StreamCurrent => "EventStream current-thread",
            Path::StreamMulti => "EventStream multi-thread",
            Path::Server => "Server",
        }
    }
}

/// `n` faults through `path`: the time spent faulting.
pub fn latency(path: Path, op: Op, pin_to: Pin, n: usize) -> Duration {
    let page = page_size();
    let batch = 1024.min(n.max(1));
    let mem = Mapping::new((batch + 1) * page);
    let sentinel = sentinel(&mem, page);
    let hcpu = pin_to.handler_cpu();
    pin(0);
    let elapsed = match path {
        Path::RawRead | Path::RawPoll => {
            let poll = path == Path::RawPoll;
            let fd = raw_uffd(poll, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    raw_handler(
                        raw,
                        poll,
                        op,
                        page,
                        1,
                        0,
                        usize::MAX,
                        page_of_bytes(),
                        sentinel,
                    )
                });
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            drop(fd);
            t
        }
        Path::RawEpoll => {
            let fd = raw_uffd(true, mem.addr, mem.len);
            let raw = fd.as_raw_fd();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| raw_epoll_handler(raw, op, page, sentinel));
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            drop(fd);
            t
        }
        Path::Sync => {
            let uffd = Arc::new(register_all(UffdBuilder::new().blocking(true), &mem));
            let u = uffd.clone();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    let mut buf = EventBuffer::new(16);
                    loop {
                        if u.read_events(&mut buf).is_err() {
                            continue;
                        }
                        while let Some(Ok(Event::PageFault(f))) = buf.next_event() {
                            let addr = f.page_start(page);
                            resolve_crate(&u, op, addr, page);
                            if addr == sentinel {
                                return;
                            }
                        }
                    }
                })
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            t
        }
        Path::StreamCurrent => {
            let uffd = crate_uffd(&mem);
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    runtime_current_io().block_on(stream_loop(uffd, op, page, sentinel))
                })
            });
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            handler.join().unwrap();
            t
        }
        Path::Server => {
            let uffd = crate_uffd(&mem);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let handler = std::thread::spawn(move || {
                pin(hcpu);
                on_cpu_clock(|| {
                    runtime_current().block_on(async move {
                        let uffd = AsyncUffd::new(uffd).unwrap();
                        let handle = match op {
                            Op::Copy => {
                                Server::new(uffd, SourceHandler::new(PatternSource)).spawn()
                            }
                            Op::Zero => Server::new(uffd, ZeroHandler).spawn(),
                        };
                        ready_tx.send(()).unwrap();
                        let _ = stop_rx.await;
                        handle.shutdown().await.unwrap();
                    })
                })
            });
            ready_rx.recv().unwrap();
            let t = fault_loop(&mem, page, n);
            let _ = stop_tx.send(());
            handler.join().unwrap();
            t
        }
        Path::StreamMulti => {
            let uffd = crate_uffd(&mem);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .on_thread_start(move || pin(hcpu))
                .enable_io()
                .build()
                .unwrap();
            let task = rt.spawn(stream_loop(uffd, op, page, sentinel));
            let t = fault_loop(&mem, page, n);
            touch(sentinel);
            rt.block_on(task).unwrap();
            t
        }
    };
    unpin();
    elapsed
}
