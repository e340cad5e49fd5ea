//! Worker threads that touch served memory, and what happens when the
//! server cannot serve a page.
//!
//! With the server's default failure policy (`FailurePolicy::Poison`) a
//! page that cannot be served is poisoned and the thread that touched it
//! gets `SIGBUS`, whose default action kills the whole process with a bare
//! `Bus error`. The examples keep that policy (it is what a user of the
//! crate gets) and turn the signal into a report instead:
//!
//! - a `SIGBUS` handler, run on the faulting worker thread, does only
//!   async-signal-safe things: it stores the address in an atomic, writes one
//!   byte to a pipe, and parks the thread in `pause(2)` for good (returning
//!   would fault again, and `_exit` would lose the server's explanation);
//! - every worker writes another byte to that pipe when it ends (even by a
//!   panic), and a task watching the server writes a third kind when the
//!   server ends on its own (a policy that stops instead of poisoning);
//! - the main thread blocks reading the pipe: all workers done (the time the
//!   work took is measured right then, no polling), a `SIGBUS`, or the
//!   server gone. After a `SIGBUS` it stops the server (so its statistics
//!   are final) and prints the address, the server's failure with the
//!   source offset and its whole cause chain, and exits non-zero, without
//!   unmapping memory that parked or sleeping workers still point into.
//!
//! A `SIGBUS` on any other thread (none of the examples touches served
//! memory elsewhere) writes a fixed message and exits with status 135.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use tokio::sync::oneshot;
use tokio_uffd::{ServerExit, ServerHandle, Stats};

/// The write end of the notification pipe (never closed, so that the
/// signal handler never writes to a reused descriptor).
static NOTIFY: AtomicI32 = AtomicI32::new(-1);
/// The read end.
static EVENTS: OnceLock<File> = OnceLock::new();
/// The address of the first `SIGBUS` in a worker (0: none yet).
static SIGBUS_ADDR: AtomicUsize = AtomicUsize::new(0);

const DONE: u8 = b'D';
const SIGBUS: u8 = b'B';
const SERVER_ENDED: u8 = b'S';

thread_local! {
    /// Whether this thread is a worker (const-initialised and without a
    /// destructor: reading it is a plain TLS load, safe in a signal handler).
    static WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Writes one byte to the notification pipe: async-signal-safe.
fn notify(byte: u8) {
    let fd = NOTIFY.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: one byte from a live local to a descriptor we never close.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if !WORKER.with(Cell::get) || NOTIFY.load(Ordering::SeqCst) < 0 {
        const MSG: &[u8] = b"fatal: SIGBUS outside a worker thread (a page could not be served)\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(135);
        }
    }
    let _ = SIGBUS_ADDR.compare_exchange(0, addr.max(1), Ordering::SeqCst, Ordering::SeqCst);
    notify(SIGBUS);
    loop {
        // SAFETY: pause(2) is async-signal-safe; this worker never resumes.
        unsafe { libc::pause() };
    }
}

/// Creates the pipe and installs the handler, once per process.
fn install() -> io::Result<&'static File> {
    if let Some(events) = EVENTS.get() {
        return Ok(events);
    }
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    NOTIFY.store(write.into_raw_fd(), Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::SigAction(on_sigbus),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: the handler only does async-signal-safe things (atomics, a
    // const thread-local read, write, pause, _exit).
    unsafe { sigaction(Signal::SIGBUS, &action) }.map_err(io::Error::from)?;
    Ok(EVENTS.get_or_init(|| File::from(read)))
}

/// Tells a waiting [`Touchers::wait`] that the server ended on its own.
pub fn server_ended() {
    notify(SERVER_ENDED);
}

/// How the workers ended.
pub enum Outcome<T> {
    /// Every worker returned; their results in order.
    Done(Vec<T>),
    /// A worker got `SIGBUS` at this address: the server poisoned a page it
    /// could not serve (or something else raised it; see the server stats).
    Sigbus(usize),
    /// The server ended while workers were still running.
    ServerEnded,
}

/// Worker threads touching served memory.
pub struct Touchers<T> {
    threads: Vec<JoinHandle<T>>,
    events: &'static File,
}

/// Sends `DONE` when a worker ends, however it ends.
struct DoneGuard;

impl Drop for DoneGuard {
    fn drop(&mut self) {
        notify(DONE);
    }
}

impl<T: Send + 'static> Touchers<T> {
    /// Starts `n` workers running `work(i)`.
    ///
    /// # Errors
    ///
    /// Creating the pipe, installing the handler, or starting a thread.
    pub fn spawn(n: usize, work: impl Fn(usize) -> T + Send + Sync + 'static) -> io::Result<Self> {
        let events = install()?;
        let work = Arc::new(work);
        let threads = (0..n)
            .map(|i| {
                let work = work.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        WORKER.with(|w| w.set(true));
                        let _done = DoneGuard;
                        work(i)
                    })
                    .map_err(|e| io::Error::new(e.kind(), format!("starting worker {i}: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { threads, events })
    }

    /// Blocks until every worker is done, one gets `SIGBUS`, or the server
    /// ends (see [`server_ended`]).
    ///
    /// # Errors
    ///
    /// Reading the pipe, or a worker that panicked.
    pub fn wait(self) -> io::Result<Outcome<T>> {
        let mut done = 0;
        let mut buf = [0u8; 64];
        while done < self.threads.len() {
            let n = match (&*self.events).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for &b in &buf[..n] {
                match b {
                    DONE => done += 1,
                    SIGBUS => return Ok(Outcome::Sigbus(SIGBUS_ADDR.load(Ordering::SeqCst))),
                    _ => return Ok(Outcome::ServerEnded),
                }
            }
        }
        let mut results = Vec::with_capacity(self.threads.len());
        for (i, t) in self.threads.into_iter().enumerate() {
            results.push(
                t.join()
                    .map_err(|_| io::Error::other(format!("worker {i} panicked")))?,
            );
        }
        Ok(Outcome::Done(results))
    }
}

/// A spawned server watched by a task that calls [`server_ended`] if it ends
/// on its own.
pub struct Watched {
    stop: oneshot::Sender<Then>,
    task: tokio::task::JoinHandle<Ended>,
    /// The server's live statistics.
    pub stats: Arc<Stats>,
}

/// What the watcher does when told to stop watching.
enum Then {
    /// Stop the server.
    Shutdown,
    /// Hand the handle back, the server still running.
    Release,
}

/// How the watcher ended.
enum Ended {
    Exit(tokio_uffd::Result<ServerExit>),
    Released(ServerHandle),
}

impl Watched {
    /// Watches `handle`; call from within the server's runtime.
    pub fn new(mut handle: ServerHandle) -> Self {
        let stats = handle.stats_ref();
        let (stop, stop_rx) = oneshot::channel::<Then>();
        let task = tokio::spawn(async move {
            // `join` is cancel safe: the handle stays usable when the stop
            // wins.
            let then = tokio::select! {
                exit = handle.join() => {
                    server_ended();
                    return Ended::Exit(exit);
                }
                then = stop_rx => then.unwrap_or(Then::Shutdown),
            };
            match then {
                Then::Shutdown => Ended::Exit(handle.shutdown().await),
                Then::Release => Ended::Released(handle),
            }
        });
        Self { stop, task, stats }
    }

    async fn end(self, then: Then, bound: Duration) -> tokio_uffd::Result<Ended> {
        let _ = self.stop.send(then);
        match tokio::time::timeout(bound, self.task).await {
            Ok(Ok(ended)) => Ok(ended),
            Ok(Err(e)) => Err(tokio_uffd::Error::Server {
                reason: format!("the server's watcher failed: {e}"),
            }),
            Err(_) => Err(tokio_uffd::Error::Server {
                reason: format!("the server did not stop within {bound:?}"),
            }),
        }
    }

    /// Stops the server (if it still runs) and returns how it ended; its
    /// statistics are final then. Waits at most `bound`.
    pub async fn shutdown(self, bound: Duration) -> tokio_uffd::Result<ServerExit> {
        match self.end(Then::Shutdown, bound).await? {
            Ended::Exit(exit) => exit,
            Ended::Released(_) => unreachable!("the watcher was told to shut down"),
        }
    }

    /// Stops watching and hands back the server's handle, the server still
    /// running (for its working set, or to wait until it is resident), or
    /// how it ended if it ended on its own first.
    pub async fn release(self) -> Result<ServerHandle, tokio_uffd::Result<ServerExit>> {
        match self.end(Then::Release, Duration::from_secs(10)).await {
            Ok(Ended::Released(handle)) => Ok(handle),
            Ok(Ended::Exit(exit)) => Err(exit),
            Err(e) => Err(Err(e)),
        }
    }
}

/// The final message of a run whose workers could not finish: where the
/// worker got `SIGBUS` (if one did), how the server ended, and its
/// failures (address, source offset, cause chain).
pub fn failure_report(
    sigbus: Option<usize>,
    exit: &tokio_uffd::Result<ServerExit>,
    stats: &Stats,
) -> String {
    let mut msg = match sigbus {
        Some(addr) => format!(
            "a worker thread touched {addr:#x} and got SIGBUS: the server could not serve that page"
        ),
        None => "the server ended before the workers were done".to_string(),
    };
    match exit {
        Ok(exit) => msg += &format!("\nthe server ended: {exit:?}"),
        Err(e) => msg += &format!("\nthe server failed: {}", tokio_uffd::error_chain(e)),
    }
    let failures = super::failures(stats);
    if failures.is_empty() {
        msg += "\nthe server recorded no failure to serve a page";
    } else {
        msg += &format!(
            "\n{} handler failure(s), {} poisoned page(s); {failures}",
            stats.snapshot().handler_failures,
            stats.snapshot().poisoned
        );
    }
    msg
}
