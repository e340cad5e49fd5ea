//! The crate's side of each measurement: its handlers, the userfaultfd it
//! registers, the runtimes it runs on, and a `Server` on a thread of its
//! own.

use futures::StreamExt;
use tokio_uffd::{
    AsyncUffd, CopyFlags, Event, FaultHandler, FaultRequest, HandlerError, PageSource,
    RegisterMode, Resolution, Uffd, UffdBuilder, ZeropageFlags,
};

use super::case::Op;
use super::cpu::{cpus, pin};
use super::cpu_time::on_cpu_clock;
use super::memory::{page_of_bytes, Mapping};

/// A handler that answers every fault with the zero page.
pub(super) struct ZeroHandler;

impl FaultHandler for ZeroHandler {
    async fn fault<'a>(
        &'a self,
        _req: &'a FaultRequest,
        _buf: &'a mut [u8],
    ) -> Result<Resolution, HandlerError> {
        Ok(Resolution::Zero)
    }
}

/// A source that hands out the pattern page.
pub(super) struct PatternSource;

impl PageSource for PatternSource {
    async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let p = page_of_bytes();
        for chunk in buf.chunks_mut(p.len()) {
            chunk.copy_from_slice(&p[..chunk.len()]);
        }
        Ok(())
    }
}

pub(super) fn resolve_crate(uffd: &Uffd, op: Op, addr: usize, page: usize) {
    let r = match op {
        Op::Copy => uffd.copy(addr, page_of_bytes(), CopyFlags::empty()),
        Op::Zero => uffd.zeropage(addr, page, ZeropageFlags::empty()),
    };
    if r.is_err() {
        let _ = uffd.wake(addr, page);
    }
}

/// The bare `EventStream` handler: resolve every fault until the sentinel.
pub(super) async fn stream_loop(uffd: Uffd, op: Op, page: usize, sentinel: usize) {
    let uffd = AsyncUffd::new(uffd).unwrap();
    let mut events = uffd.event_stream().unwrap();
    while let Some(Ok(event)) = events.next().await {
        if let Event::PageFault(f) = event {
            let addr = f.page_start(page);
            resolve_crate(&uffd, op, addr, page);
            if addr == sentinel {
                break;
            }
        }
    }
}

/// A crate `Uffd` with all of `mem` registered MISSING.
pub(super) fn crate_uffd(mem: &Mapping) -> Uffd {
    register_all(UffdBuilder::new(), mem)
}

/// A `Uffd` from `builder` with all of `mem` registered MISSING.
pub(super) fn register_all(builder: UffdBuilder, mem: &Mapping) -> Uffd {
    let uffd = builder.create().unwrap();
    // SAFETY: the benchmark's own fresh mapping, filled only by the handler
    // under test.
    unsafe { uffd.register(mem.addr, mem.len, RegisterMode::MISSING) }.unwrap();
    uffd
}

/// A current-thread runtime with what the server needs (I/O and time).
pub(super) fn runtime_current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A current-thread runtime with I/O only: all a bare `EventStream` needs.
pub(super) fn runtime_current_io() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap()
}

/// The runtime a benchmark's server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Runtime {
    /// Current-thread, on the server's thread.
    Current,
    /// Multi-thread (as `#[tokio::main]` builds), a worker per CPU.
    Multi,
}

/// Runs the server for `uffd` with `make` on its own runtime thread until
/// the guard is dropped; the thread's CPU time is then in
/// [`last_handler_cpu`](super::cpu_time::last_handler_cpu).
pub(super) struct ServerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    pub(super) fn start<F>(uffd: Uffd, runtime: Runtime, cpu: Option<usize>, make: F) -> Self
    where
        F: FnOnce(AsyncUffd) -> tokio_uffd::ServerHandle + Send + 'static,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                pin(cpu);
            }
            let rt = match runtime {
                Runtime::Current => runtime_current(),
                Runtime::Multi => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cpus())
                    .enable_all()
                    .build()
                    .unwrap(),
            };
            on_cpu_clock(|| {
                rt.block_on(async move {
                    let handle = make(AsyncUffd::new(uffd).unwrap());
                    ready_tx.send(()).unwrap();
                    let _ = stop_rx.await;
                    handle.shutdown().await.unwrap();
                })
            })
        });
        ready_rx.recv().unwrap();
        Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}
