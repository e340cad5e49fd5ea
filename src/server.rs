//! The fault server: reads events, runs the handler in spawned tasks, and
//! owns every kernel edge case around it.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{mpsc, Semaphore};

use crate::asyncfd::{AsyncUffd, EventStream};
use crate::error::{Error, ErrorKind, FailureAction, FaultFailure, Result};
use crate::event::{Event, FaultKind, PageFault};
use crate::flags::{
    ContinueFlags, CopyFlags, Features, PoisonFlags, UnprotectFlags, ZeropageFlags,
};
use crate::handler::{FaultHandler, FaultRequest, Resolution};
use crate::layout::{Layout, LoosePages, PageHash, Region, SourceId};
use crate::stats::{Stats, StatsSnapshot};
use crate::trace;
use crate::watchdog::{StallBoard, Watchdog};

/// What the server does when a handler fails (returns an error or panics)
/// or a resolution cannot be applied.
///
/// Whatever the policy, the faulting thread is never left asleep forever
/// and never silently handed zeros, and the server keeps serving other
/// faults (except under [`Stop`](Self::Stop)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Poison the faulting page (`UFFDIO_POISON`, kernel 6.6+): the
    /// faulting thread gets `SIGBUS`. The default. Without the kernel
    /// feature, the server stops with the error instead.
    Poison,
    /// Run the handler again, up to `attempts` more times, `backoff` apart;
    /// then poison.
    Retry {
        /// Extra attempts.
        attempts: u32,
        /// Pause before each.
        backoff: Duration,
    },
    /// Stop the server and return the error. The faulting thread stays
    /// asleep until the userfaultfd is closed or served by someone else.
    Stop,
}

/// What the server does with the userfaultfd of a forked child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForkPolicy {
    /// Serve the child with the same handler and a copy of the parent's
    /// page state. The default.
    #[default]
    Serve,
    /// Close the child's userfaultfd: the child's faults on that memory are
    /// then handled by the kernel as if it were not registered.
    Ignore,
}

/// How a server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerExit {
    /// [`ServerHandle::stop`] was called (or the handle dropped).
    Stopped,
    /// The process that owns the memory exited (`ESRCH`).
    ProcessExited,
}

/// Serves the faults of one userfaultfd with a [`FaultHandler`].
///
/// The server reads the event stream in one task and resolves each fault in
/// a task of its own (up to a concurrency limit), so a slow handler delays
/// only its own fault. It owns the kernel edge cases:
///
/// - faults on one page from many threads run the handler once; all wake;
/// - `EEXIST` wakes the range; `EAGAIN` parks the resolution while the
///   queue is drained (the event that causes it may be unread), then
///   retries, up to [`retry_timeout`](Self::retry_timeout), then applies the
///   failure policy; `ENOENT` (range gone) drops the fault; `ESRCH` ends the
///   server with [`ServerExit::ProcessExited`];
/// - [`Event::Remove`]: later faults there get zeros, never the stale image
///   (the range stays registered, so it stays served and counted;
///   hugetlbfs, which has no zeropage, gets a zeroed copy);
///   [`Event::Unmap`] forgets the range; [`Event::Remap`] moves the region;
///   [`Event::Fork`] serves the child too (see [`ForkPolicy`]);
/// - hugetlbfs and shmem regions use their own page size, minor faults are
///   continued, write-protect faults unprotected (by [`SourceHandler`]);
/// - fault-around: [`prefetch`](Self::prefetch) resolves an aligned window
///   of pages with each fault, skipping pages already served or in flight;
/// - failures follow the [`FailurePolicy`];
/// - with `THREAD_ID`, a fault raised by a thread of the server's own
///   runtime is reported in [`Stats`] (and still served when another worker
///   can: on a current-thread runtime nothing can, the runtime's only thread
///   is the one asleep, so never touch registered memory from it).
///
/// Hugetlbfs memory needs a [`Region`] with its huge page size: outside
/// every region faults are served with the base page size.
///
/// [`Stats`]: crate::Stats
///
/// [`SourceHandler`]: crate::SourceHandler
///
/// # Example
///
/// ```no_run
/// # async fn f(uffd: tokio_uffd::AsyncUffd, base: usize, len: usize) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio_uffd::{FileSource, Region, Server, SourceHandler};
///
/// let handle = Server::new(uffd, SourceHandler::new(FileSource::open("mem.snap")?))
///     .regions([Region::new(base..base + len)])?
///     .prefetch(16)
///     .spawn();
/// // ... the program runs and faults ...
/// println!("{:?}", handle.stats());
/// handle.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Server<H> {
    uffd: AsyncUffd,
    handler: Arc<H>,
    regions: Vec<Region>,
    prefetch: usize,
    concurrency: usize,
    failure: FailurePolicy,
    fork: ForkPolicy,
    retry_timeout: Duration,
    guard_threads: HashSet<u32>,
    batch: usize,
    stall_threshold: Option<Duration>,
    child_probe: Duration,
    stats: Arc<Stats>,
}

impl<H> fmt::Debug for Server<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("uffd", &self.uffd)
            .field("regions", &self.regions)
            .field("prefetch", &self.prefetch)
            .field("concurrency", &self.concurrency)
            .field("failure", &self.failure)
            .field("fork", &self.fork)
            .finish_non_exhaustive()
    }
}

/// The most bytes one fault-around window may cover.
const MAX_WINDOW_BYTES: usize = 4 << 20;
/// The most separate runs of pages one window is split into.
const MAX_RUNS: usize = 8;
/// The default of [`Server::stall_watchdog`].
const DEFAULT_STALL: Duration = Duration::from_secs(10);
/// The default of [`Server::child_probe_interval`].
const DEFAULT_CHILD_PROBE: Duration = Duration::from_secs(1);
/// How many reads a stopping server with `EVENT_FORK` makes to drain the
/// queue, so that no fork is left waiting for its event to be read.
const STOP_DRAIN_READS: u32 = 64;

impl<H: FaultHandler> Server<H> {
    /// A server for `uffd` with `handler`, no regions (faults anywhere are
    /// served page by page with the base page size), no prefetch, 64 faults
    /// in flight at most, [`FailurePolicy::Poison`] and
    /// [`ForkPolicy::Serve`].
    pub fn new(uffd: AsyncUffd, handler: H) -> Self {
        Self {
            uffd,
            handler: Arc::new(handler),
            regions: Vec::new(),
            prefetch: 1,
            concurrency: 64,
            failure: FailurePolicy::Poison,
            fork: ForkPolicy::Serve,
            retry_timeout: Duration::from_secs(10),
            guard_threads: HashSet::new(),
            batch: crate::event::DEFAULT_BATCH,
            stall_threshold: Some(DEFAULT_STALL),
            child_probe: DEFAULT_CHILD_PROBE,
            stats: Arc::new(Stats::new()),
        }
    }

    /// Adds regions: where the memory is, its page size and where its
    /// contents come from. Faults outside every region are still served,
    /// page by page, with the base page size and `offset = address`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRegion`] naming the region and what is wrong with
    /// it: a page size that is not a power of two at least the base page
    /// size, a start or length not aligned to it, an empty range, a range
    /// past the end of the address space or of 64-bit source offsets, or
    /// two regions (given now or before) that overlap.
    pub fn regions(mut self, regions: impl IntoIterator<Item = Region>) -> Result<Self> {
        let all = self.regions.iter().copied().chain(regions);
        self.regions = crate::layout::checked_regions(all, self.uffd.page_size())?;
        Ok(self)
    }

    /// Resolves an aligned window of `pages` pages (clipped to the region,
    /// and to 4 MiB) with each fault; 1 (the default) turns fault-around off.
    pub fn prefetch(mut self, pages: usize) -> Self {
        self.prefetch = pages.max(1);
        self
    }

    /// The most faults resolved at once (at least 1).
    pub fn concurrency(mut self, tasks: usize) -> Self {
        self.concurrency = tasks.max(1);
        self
    }

    /// What to do when a handler fails; see [`FailurePolicy`].
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.failure = policy;
        self
    }

    /// What to do with a forked child; see [`ForkPolicy`].
    pub fn on_fork(mut self, policy: ForkPolicy) -> Self {
        self.fork = policy;
        self
    }

    /// How long a resolution may keep failing with `EAGAIN` before the
    /// failure policy applies (default 10 s).
    pub fn retry_timeout(mut self, timeout: Duration) -> Self {
        self.retry_timeout = timeout;
        self
    }

    /// Thread ids (see [`thread_id`](crate::thread_id)) whose faults would
    /// deadlock the server, typically the workers of its runtime collected
    /// with `on_thread_start`. The server also learns the threads it runs
    /// on by itself. Needs `THREAD_ID`.
    pub fn guard_threads(mut self, tids: impl IntoIterator<Item = u32>) -> Self {
        self.guard_threads.extend(tids);
        self
    }

    /// Reports a fault that has waited longer than `threshold` (default
    /// 10 s), or turns the report off with `None`.
    ///
    /// A thread of its own (not a task: it works when the runtime cannot
    /// run, for instance when the runtime's own thread touched registered
    /// memory and sleeps in the kernel) checks four times per threshold:
    /// faults queued but not read (from the userfaultfd's
    /// `/proc/self/fdinfo` entry; their address is unknown, the threads of
    /// this process asleep in `handle_userfault` are named), and faults
    /// read but not resolved (address and thread). Each is reported once,
    /// as a `WARN` event and in [`Stats`](crate::Stats) (`stalls`,
    /// [`last_stall`](crate::Stats::last_stall)). It watches the server's own
    /// userfaultfd, not those of forked children.
    pub fn stall_watchdog(mut self, threshold: Option<Duration>) -> Self {
        self.stall_threshold = threshold.filter(|t| !t.is_zero());
        self
    }

    /// How often the server of a forked child checks whether the child
    /// still exists (default 1 s), with
    /// [`Uffd::owner_exited`](crate::Uffd::owner_exited): one system call.
    /// A child that exits without faulting again is released (its
    /// userfaultfd closed, its task ended) at the next check, so a server
    /// of a process that forks many short-lived children keeps one fd and
    /// one task per *live* child.
    pub fn child_probe_interval(mut self, every: Duration) -> Self {
        self.child_probe = every.max(Duration::from_millis(1));
        self
    }

    /// Messages read per `read(2)`.
    pub fn batch(mut self, messages: usize) -> Self {
        self.batch = messages.max(1);
        self
    }

    /// The statistics this server will keep.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs the server on the caller's task until `shutdown` completes
    /// (then it stops gracefully, as [`ServerHandle::stop`] describes) or
    /// the owning process exits.
    ///
    /// # Errors
    ///
    /// An error reading the userfaultfd, or a handler failure under
    /// [`FailurePolicy::Stop`] (or `Poison` without the kernel feature).
    ///
    /// # Panics
    ///
    /// Needs a Tokio runtime with I/O and time enabled.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<ServerExit> {
        let stop = Arc::new(StopSignal::default());
        // However `run` ends (returned, failed, or its future dropped), the
        // servers of forked children stop with it.
        let _stop_children = StopOnDrop(stop.clone());
        let watch = self.start_watchdog();
        let server = self.run_until(stop.clone(), watch);
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => return r,
            () = shutdown => {}
        }
        stop.stop();
        server.await
    }

    /// Spawns the server on the current runtime and returns a handle to
    /// stop it and read its statistics.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> ServerHandle {
        let stop = Arc::new(StopSignal::default());
        let stats = self.stats.clone();
        let uffd = self.uffd.clone();
        // Started here, not in the task: it watches even if the task never
        // gets to run.
        let watch = self.start_watchdog();
        let task = tokio::spawn(self.run_until(stop.clone(), watch));
        ServerHandle {
            stop,
            stats,
            uffd,
            task: Some(task),
        }
    }

    /// The stall board and the watchdog thread reading it, if asked for.
    fn start_watchdog(&self) -> Result<Option<(Arc<StallBoard>, Watchdog)>> {
        let Some(threshold) = self.stall_threshold else {
            return Ok(None);
        };
        let board = Arc::new(StallBoard::new());
        let fd = self.uffd.uffd().as_fd();
        let dog = Watchdog::start(fd, threshold, board.clone(), self.stats.clone()).map_err(
            |source| Error::Os {
                what: "starting the stall watchdog thread",
                source,
            },
        )?;
        Ok(Some((board, dog)))
    }

    async fn run_until(
        self,
        stop: Arc<StopSignal>,
        watch: Result<Option<(Arc<StallBoard>, Watchdog)>>,
    ) -> Result<ServerExit> {
        let watch = watch?;
        let page_size = self.uffd.page_size();
        let tracks_removal = self.uffd.features().contains(Features::EVENT_REMOVE);
        let stream = self.uffd.event_stream_with_batch(self.batch)?;
        let shared = Arc::new(Shared {
            uffd: self.uffd,
            handler: self.handler,
            stats: self.stats,
            page_size,
            failure: self.failure,
            fork: self.fork,
            retry_timeout: self.retry_timeout,
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            batch: self.batch,
            child_probe: self.child_probe,
            gate: tracks_removal.then(|| Arc::new(RemovalGate::default())),
        });
        let span = trace::server_span(shared.uffd.uffd().as_raw_fd(), self.regions.len(), false);
        let mut reader = Reader::new(
            shared,
            Layout::new(self.regions),
            self.guard_threads,
            stop,
            None,
        );
        reader.watch = watch;
        trace::in_span(span, reader.run(stream)).await
    }
}

/// A handle to a spawned [`Server`]: its statistics, and a graceful stop.
///
/// Dropping the handle stops the server too.
///
/// When the server ends it drops its handle to the userfaultfd. If that was
/// the last one, the kernel closes it, unregisters the memory and wakes
/// every waiting thread, which then sees the memory as if it had never been
/// registered: zeros for anonymous memory. Keep a clone of the
/// [`AsyncUffd`] for as long as the memory must stay served.
#[derive(Debug)]
pub struct ServerHandle {
    stop: Arc<StopSignal>,
    stats: Arc<Stats>,
    uffd: AsyncUffd,
    task: Option<tokio::task::JoinHandle<Result<ServerExit>>>,
}

impl ServerHandle {
    /// The server's statistics now. They are updated right after each
    /// resolution, so they may trail a thread that was just woken by a
    /// moment; after [`shutdown`](Self::shutdown) they are final.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The live statistics, to keep after the handle is gone.
    pub fn stats_ref(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The userfaultfd the server reads. The handle keeps it open; clone it
    /// to keep the memory registered after the server ends.
    pub fn uffd(&self) -> &AsyncUffd {
        &self.uffd
    }

    /// Asks the server to stop: it reads no new event, finishes the faults
    /// in flight (their threads get the right data), then ends with
    /// [`ServerExit::Stopped`]. Faults not yet read stay queued in the
    /// kernel, their threads asleep, until the userfaultfd is read by
    /// someone else or closed.
    ///
    /// With `EVENT_FORK`, a fork in flight sleeps until its event is read,
    /// and closing the userfaultfd would not wake it (see the crate's
    /// gotchas): so before it ends, a stopping server reads what is queued
    /// (up to 64 reads), serves those faults, and closes the uffds of
    /// those forks' children (a stopping server serves no new child).
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Whether the server has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the server to end. It can be awaited by reference (in a
    /// `select!` next to something else), and again after it finished.
    ///
    /// # Errors
    ///
    /// The server's error; a panic inside the server, or a second call after
    /// the first returned, is an [`Error::Server`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future leaves the server running and the
    /// handle usable.
    pub async fn join(&mut self) -> Result<ServerExit> {
        let Some(task) = self.task.as_mut() else {
            return Err(Error::Server {
                reason: "the server was already joined".into(),
            });
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(r) => r,
            Err(e) => Err(Error::Server {
                reason: format!("the server task failed: {e}"),
            }),
        }
    }

    /// [`stop`](Self::stop), then [`join`](Self::join).
    ///
    /// # Errors
    ///
    /// As for [`join`](Self::join).
    pub async fn shutdown(mut self) -> Result<ServerExit> {
        self.stop();
        self.join().await
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

/// The stop signal of a server and of the servers of its forked children.
///
/// A reader checks it every time it waits for the next event, so it costs
/// one atomic load there; a `watch` channel would take a lock each time.
#[derive(Debug, Default)]
struct StopSignal {
    stopped: AtomicBool,
    /// The readers waiting, woken (and forgotten) by `stop`.
    waiting: Mutex<Vec<Waker>>,
}

impl StopSignal {
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in waiting {
            waker.wake();
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// Gives the stop signal when dropped.
#[derive(Debug)]
struct StopOnDrop(Arc<StopSignal>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// One reader's wait for its [`StopSignal`].
#[derive(Debug)]
struct StopWait {
    signal: Arc<StopSignal>,
    /// The waker this reader left with the signal, if any.
    registered: Option<Waker>,
}

impl StopWait {
    fn new(signal: Arc<StopSignal>) -> Self {
        Self {
            signal,
            registered: None,
        }
    }

    /// Ready once stopped; registers `cx`'s waker only when it is not the
    /// one already registered (a task's waker seldom changes).
    fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_stopped() {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let mut waiting = self
            .signal
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock: `stop` sets the flag before it takes
        // the list, so a stop either is seen here or finds this waker.
        if self.signal.is_stopped() {
            return Poll::Ready(());
        }
        if let Some(old) = self.registered.take() {
            waiting.retain(|w| !w.will_wake(&old));
        }
        waiting.push(cx.waker().clone());
        self.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for StopWait {
    /// A reader that ends before the stop (a forked child's, when its
    /// process exits) takes its waker back: the list does not grow with
    /// every child that came and went.
    fn drop(&mut self) {
        if let Some(old) = self.registered.take() {
            let mut waiting = self
                .signal
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            waiting.retain(|w| !w.will_wake(&old));
        }
    }
}

/// The writes of `Remove` events that tasks must not race with.
///
/// The kernel zaps the pages of a `MADV_DONTNEED` right after its Remove
/// message is read. A resolution in flight for one of those pages that
/// lands after the zap would leave the old contents there: silent
/// corruption. So the stream holds this lock for writing across each
/// `read(2)` and records every Remove it read, and tasks hold it for reading
/// across their ioctl after checking that no Remove overlapping their pages
/// was read since they were planned (if one was, the fault is planned again,
/// and the freed pages get zeros).
#[derive(Debug, Default)]
pub(crate) struct RemovalGate {
    log: RwLock<RemovalLog>,
}

#[derive(Debug, Default)]
pub(crate) struct RemovalLog {
    generation: u64,
    /// `(generation, start, end)` of recent removes, oldest first.
    recent: VecDeque<(u64, usize, usize)>,
}

/// How many recent removes the gate remembers; a job older than that is
/// planned again.
const REMOVE_LOG: usize = 1024;

impl RemovalGate {
    /// Called by the stream with the write lock held, for every Remove in
    /// the batch just read.
    pub(crate) fn lock_for_read(&self) -> std::sync::RwLockWriteGuard<'_, RemovalLog> {
        self.log.write().unwrap_or_else(|p| p.into_inner())
    }

    fn generation(&self) -> u64 {
        self.log
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }
}

impl RemovalLog {
    pub(crate) fn record(&mut self, start: usize, end: usize) {
        self.generation += 1;
        self.recent.push_back((self.generation, start, end));
        if self.recent.len() > REMOVE_LOG {
            self.recent.pop_front();
        }
    }

    /// Whether a remove read after generation `since` overlaps `ranges`.
    fn overlaps_since(
        &self,
        since: u64,
        ranges: impl Iterator<Item = (usize, usize)> + Clone,
    ) -> bool {
        if self.generation == since {
            return false;
        }
        if self.recent.front().is_none_or(|&(g, _, _)| g > since + 1) {
            return true; // forgotten: assume the worst
        }
        self.recent
            .iter()
            .filter(|&&(g, _, _)| g > since)
            .any(|&(_, s, e)| ranges.clone().any(|(a, b)| a < e && s < b))
    }
}

/// What every task of one server shares.
struct Shared<H> {
    uffd: AsyncUffd,
    handler: Arc<H>,
    stats: Arc<Stats>,
    page_size: usize,
    failure: FailurePolicy,
    fork: ForkPolicy,
    retry_timeout: Duration,
    prefetch: usize,
    concurrency: usize,
    batch: usize,
    child_probe: Duration,
    /// With `EVENT_REMOVE`: the server is told about freed pages, and
    /// resolutions must not race with them.
    gate: Option<Arc<RemovalGate>>,
}

impl<H> Shared<H> {
    /// The same configuration and handler, for a forked child's `uffd`,
    /// with a gate and buffers of its own.
    fn for_child(&self, uffd: AsyncUffd) -> Self {
        let tracks_removal = uffd.features().contains(Features::EVENT_REMOVE);
        Shared {
            uffd,
            handler: self.handler.clone(),
            stats: self.stats.clone(),
            page_size: self.page_size,
            failure: self.failure,
            fork: self.fork,
            retry_timeout: self.retry_timeout,
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            batch: self.batch,
            child_probe: self.child_probe,
            gate: tracks_removal.then(|| Arc::new(RemovalGate::default())),
        }
    }
}

/// A contiguous run of pages resolved together.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    addr: usize,
    len: usize,
    /// Offset of `addr` in the page source.
    offset: u64,
    /// Where the run's bytes start in the job's buffer.
    buf_off: usize,
    resolution: Option<Resolution>,
    /// Copy straight from the handler's `bytes_for`, not from the buffer.
    direct: bool,
    /// Bytes applied so far.
    done: usize,
}

/// One fault and the runs resolved for it. Run 0 holds the faulting page;
/// the others are prefetched around it.
struct Job {
    fault: PageFault,
    page: usize,
    page_size: usize,
    source: SourceId,
    read_at: Instant,
    runs: [Run; MAX_RUNS],
    nruns: usize,
    buf: Vec<u8>,
    /// Bytes of buffer the runs need, taken only when a handler fills one.
    buf_len: usize,
    attempt: u32,
    /// Set once the handler has decided every run.
    decided: bool,
    /// When an `EAGAIN` park gives up.
    deadline: Option<Instant>,
    /// Pages served as zeros because they were removed (no handler).
    zero_fill: bool,
    /// Whether the job counts in the reader's `inflight`.
    counted: bool,
    /// The removal generation the job was planned in.
    generation: u64,
    /// Bytes found already there (`EEXIST`): not served by this job.
    existed: usize,
    /// Its entry on the stall board while it waits in a task or parked.
    watch: Option<u64>,
}

impl Job {
    fn runs(&self) -> &[Run] {
        &self.runs[..self.nruns]
    }

    /// The lowest and highest byte of every run.
    fn span(&self) -> (usize, usize) {
        let lo = self
            .runs()
            .iter()
            .map(|r| r.addr)
            .min()
            .unwrap_or(self.page);
        let hi = self
            .runs()
            .iter()
            .map(|r| r.addr + r.len)
            .max()
            .unwrap_or(self.page + self.page_size);
        (lo, hi)
    }

    /// Bytes this job resolved: its runs, less those dropped and those
    /// found already there.
    fn bytes(&self) -> usize {
        self.runs()
            .iter()
            .filter(|r| r.resolution.is_some())
            .map(|r| r.len)
            .sum::<usize>()
            - self.existed
    }
}

/// Why a job did not resolve.
enum Outcome {
    Resolved,
    Park,
    Gone,
    Exited,
    /// A Remove overlapping the job was read while it was in flight: plan
    /// the fault again.
    Replan,
    /// Run `run` of the job failed.
    Failed {
        run: usize,
        cause: Cause,
    },
}

/// The cause of a failure to serve, kept whole (with its own `source()`).
type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Failures the server itself finds, as causes of a [`FaultFailure`].
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("the handler panicked: {0}")]
    Panicked(String),
    #[error("the handler's bytes_for returned nothing for a run it had returned bytes for")]
    BytesGone,
    #[error(
        "the resolution kept failing with EAGAIN for {0:?}: the address space kept changing \
         (a fork, mremap, MADV_DONTNEED or munmap whose event was never read?)"
    )]
    KeptChanging(Duration),
    #[error("{cause}; poisoning the page failed too: {poison}{hint}")]
    PoisonFailed {
        #[source]
        cause: Cause,
        poison: Error,
        hint: &'static str,
    },
}

/// The report of run `run` of `job` failing with `cause`.
fn failure(job: &Job, run: usize, cause: Cause, action: FailureAction) -> FaultFailure {
    let r = job.runs.get(run).filter(|_| run < job.nruns);
    FaultFailure {
        fault_addr: job.fault.address,
        addr: r.map_or(job.page, |r| r.addr),
        len: r.map_or(job.page_size, |r| r.len),
        source: job.source,
        offset: r.map_or(job.page as u64, |r| r.offset),
        action,
        cause,
    }
}

struct Done {
    job: Box<Job>,
    outcome: Outcome,
}

/// Calls the handler for every run of `job` that [`decide_direct`] left
/// (once), then applies. A failed prefetch run is dropped; only a failure
/// of the faulting page's run fails the job.
async fn execute<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    if !job.decided {
        // Runs marked direct were decided by `decide_direct` on the reader.
        for i in 0..job.nruns {
            let run = job.runs[i];
            if run.direct {
                continue;
            }
            let req = request(job, &run);
            if job.buf.len() != job.buf_len {
                // The buffer of a recycled job, or a new one.
                job.buf.resize(job.buf_len, 0);
            }
            let buf = &mut job.buf[run.buf_off..run.buf_off + run.len];
            let result = AssertUnwindSafe(shared.handler.fault(&req, buf))
                .catch_unwind()
                .await;
            let cause: Cause = match result {
                Ok(Ok(r)) => {
                    job.runs[i].resolution = Some(r);
                    continue;
                }
                Ok(Err(e)) => Arc::from(e),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    Arc::new(ServeError::Panicked(what))
                }
            };
            if i == 0 {
                return Outcome::Failed { run: 0, cause };
            }
            // A prefetch run is best effort: leave those pages missing.
            Stats::add(&shared.stats.handler_failures, 1);
            let failure = failure(job, i, cause, FailureAction::Dropped);
            trace::report_failure(&failure);
            shared.stats.record_failure(&failure);
            job.runs[i].resolution = None;
        }
        job.decided = true;
    }
    apply_and_account(shared, job)
}

/// Marks the runs whose bytes the handler has in memory
/// ([`FaultHandler::bytes_for`]) as copies straight from there, leaving the
/// others to [`FaultHandler::fault`]; whether that decided every run (then
/// `job` needs no future at all).
fn decide_direct<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> bool {
    let mut all = true;
    for i in 0..job.nruns {
        let run = job.runs[i];
        if run.direct {
            continue;
        }
        if shared.handler.bytes_for(&request(job, &run)).is_some() {
            job.runs[i].resolution = Some(Resolution::Copy);
            job.runs[i].direct = true;
        } else {
            all = false;
        }
    }
    job.decided = all;
    all
}

/// The handler's view of one run of `job`.
fn request(job: &Job, run: &Run) -> FaultRequest {
    FaultRequest {
        addr: run.addr,
        len: run.len,
        page_size: job.page_size,
        fault_addr: job.fault.address,
        kind: job.fault.kind(),
        write: job.fault.is_write(),
        thread_id: job.fault.thread_id,
        source: job.source,
        offset: run.offset,
    }
}

/// [`apply`] behind the removal gate, and the statistics of a resolution at
/// once, so that they are current by the time the woken thread runs.
fn apply_and_account<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    let outcome = match &shared.gate {
        Some(gate) => {
            let log = gate.log.read().unwrap_or_else(|p| p.into_inner());
            let ranges = job.runs[..job.nruns]
                .iter()
                .map(|r| (r.addr, r.addr + r.len));
            if !job.zero_fill && log.overlaps_since(job.generation, ranges) {
                return Outcome::Replan;
            }
            // Hold the gate across the ioctls: no Remove is read meanwhile.
            let outcome = apply(shared, job);
            drop(log);
            outcome
        }
        None => apply(shared, job),
    };
    if let Outcome::Resolved = outcome {
        let stats = &shared.stats;
        let bytes = job.bytes();
        let pages = (bytes / job.page_size) as u64;
        Stats::add(&stats.pages_served, pages);
        Stats::add(&stats.bytes_served, bytes as u64);
        if job.runs[0].resolution == Some(Resolution::Poison) {
            // A parked poisoning that got through at last.
            Stats::add(&stats.poisoned, 1);
        } else if job.zero_fill && pages == 0 {
            // The page was there: a duplicate fault, only woken.
            Stats::add(&stats.duplicates, 1);
        } else if job.zero_fill {
            Stats::add(&stats.pages_zeroed_after_remove, pages);
        } else {
            if pages > 1 {
                Stats::add(&stats.pages_prefetched, pages - 1);
            }
        }
        stats.record_latency(job.read_at.elapsed());
    }
    outcome
}

/// Applies the decided resolutions of `job`; resumable after a park. Run 0
/// (the faulting page) wakes its waiters itself; prefetch runs are applied
/// with `DONTWAKE` and woken with one `WAKE` at the end.
fn apply<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    let uffd = &*shared.uffd;
    let multi = job.nruns > 1;
    let page_size = job.page_size;
    for i in 0..job.nruns {
        let run = job.runs[i];
        let Some(resolution) = run.resolution else {
            continue;
        };
        let dontwake = multi && i > 0;
        let mut done = run.done;
        while done < run.len {
            let addr = run.addr + done;
            let len = run.len - done;
            let result = match resolution {
                Resolution::Copy => {
                    let flags = when(dontwake, CopyFlags::DONTWAKE);
                    if run.direct {
                        let Some(bytes) = shared.handler.bytes_for(&request(job, &run)) else {
                            job.runs[i].done = done;
                            return Outcome::Failed {
                                run: i,
                                cause: Arc::new(ServeError::BytesGone),
                            };
                        };
                        uffd.copy(addr, &bytes[done..], flags)
                    } else {
                        let from = run.buf_off + done;
                        uffd.copy(addr, &job.buf[from..from + len], flags)
                    }
                }
                Resolution::Zero if page_size > shared.page_size => {
                    // hugetlbfs has no zeropage: copy zeros.
                    let flags = when(dontwake, CopyFlags::DONTWAKE);
                    match zeros(len) {
                        Some(z) => uffd.copy(addr, z, flags),
                        None => uffd.copy(addr, &vec![0u8; len], flags),
                    }
                }
                Resolution::Zero => {
                    uffd.zeropage(addr, len, when(dontwake, ZeropageFlags::DONTWAKE))
                }
                Resolution::Continue => {
                    uffd.continue_range(addr, len, when(dontwake, ContinueFlags::DONTWAKE))
                }
                Resolution::Unprotect => uffd
                    .write_unprotect(addr, len, when(dontwake, UnprotectFlags::DONTWAKE))
                    .map(|()| len),
                Resolution::Poison => uffd.poison(addr, len, PoisonFlags::empty()),
                Resolution::Wake => uffd.wake(addr, len).map(|()| len),
            };
            match result {
                Ok(_) => done = run.len,
                Err(e) => match e.kind() {
                    ErrorKind::Exists => {
                        // Already there (EEXIST does not wake): wake it and
                        // go on with the rest of the run. A zero-fill of a
                        // served page finding it there is a duplicate fault,
                        // counted as such once applied.
                        if !job.zero_fill {
                            Stats::add(&shared.stats.eexist, 1);
                        }
                        if !dontwake {
                            let _ = uffd.wake(addr, page_size);
                        }
                        done += page_size;
                        job.existed += page_size;
                    }
                    ErrorKind::Retry if e.bytes_done() > 0 => done += e.bytes_done(),
                    ErrorKind::Retry => {
                        Stats::add(&shared.stats.eagain, 1);
                        job.runs[i].done = done;
                        return Outcome::Park;
                    }
                    ErrorKind::RangeGone | ErrorKind::ProcessExited => {
                        job.runs[i].done = done;
                        // The reader wakes the job's span once it has
                        // cleared the pages' in-flight marks: woken first,
                        // a thread could fault again and be taken for a
                        // duplicate of this finished job.
                        return if e.kind() == ErrorKind::RangeGone {
                            Outcome::Gone
                        } else {
                            Outcome::Exited
                        };
                    }
                    _ => {
                        job.runs[i].done = done;
                        return Outcome::Failed {
                            run: i,
                            cause: Arc::new(e),
                        };
                    }
                },
            }
        }
        job.runs[i].done = run.len;
    }
    if multi {
        let (lo, hi) = job.span();
        if let Err(e) = uffd.wake(lo, hi - lo) {
            if e.kind() == ErrorKind::ProcessExited {
                return Outcome::Exited;
            }
        }
    }
    Outcome::Resolved
}

/// `flag` if `yes`, else no flags.
fn when<F: bitflags::Flags>(yes: bool, flag: F) -> F {
    if yes {
        flag
    } else {
        F::empty()
    }
}

/// `len` zero bytes from one shared buffer of a fault-around window's size
/// (allocated on first use; untouched zero pages cost no memory), or `None`
/// for longer runs (gigantic pages).
fn zeros(len: usize) -> Option<&'static [u8]> {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROS
        .get_or_init(|| vec![0u8; MAX_WINDOW_BYTES].into_boxed_slice())
        .get(..len)
}

thread_local! {
    static TID: u32 = crate::sys::gettid();
}

/// The calling thread's id (`gettid(2)`, cached per thread), as page-fault
/// events report it with `THREAD_ID`. Collect it in a runtime's
/// `on_thread_start` for [`Server::guard_threads`].
pub fn thread_id() -> u32 {
    TID.with(|t| *t)
}

/// The reading side of a server: owns the page state and every decision.
// Jobs stay boxed in its lists: they move between the lists, tasks and the
// channel as one pointer, and a spare job keeps its allocation.
#[allow(clippy::vec_box)]
struct Reader<H> {
    shared: Arc<Shared<H>>,
    layout: Layout,
    /// The state of pages outside every region.
    loose: LoosePages,
    parked: Vec<Box<Job>>,
    /// The faults of the batch being handled, planned once its other
    /// events are applied (kept for its allocation).
    batch_faults: Vec<PageFault>,
    /// Finished jobs kept for reuse, with their buffers (at most
    /// `concurrency`): no allocation per fault.
    spare: Vec<Box<Job>>,
    inflight: usize,
    tx: mpsc::UnboundedSender<Done>,
    rx: mpsc::UnboundedReceiver<Done>,
    permits: Arc<Semaphore>,
    tids: HashSet<u32, PageHash>,
    last_tid: u32,
    /// The stop signal, shared with the servers of forked children.
    stop: Arc<StopSignal>,
    /// Stop was asked for: no new event is read except to finish work
    /// and to let forks complete.
    stopping: bool,
    /// Whether the uffd reports forks (`EVENT_FORK`).
    forks: bool,
    /// The stall board and its watchdog (the top-level server's only).
    watch: Option<(Arc<StallBoard>, Watchdog)>,
    /// For a forked child's server: how often to check that the child
    /// still exists.
    child_probe: Option<Duration>,
    /// The servers of forked children: awaited when this one stops (they
    /// stop with it), left running (detached) when it ends otherwise.
    children: Vec<tokio::task::JoinHandle<()>>,
}

impl<H: FaultHandler> Reader<H> {
    fn new(
        shared: Arc<Shared<H>>,
        layout: Layout,
        tids: impl IntoIterator<Item = u32>,
        stop: Arc<StopSignal>,
        child_probe: Option<Duration>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(shared.concurrency));
        let forks = shared.uffd.features().contains(Features::EVENT_FORK);
        Self {
            shared,
            layout,
            loose: LoosePages::default(),
            parked: Vec::new(),
            batch_faults: Vec::new(),
            spare: Vec::new(),
            inflight: 0,
            tx,
            rx,
            permits,
            tids: tids.into_iter().collect(),
            last_tid: 0,
            forks,
            watch: None,
            child_probe,
            stop,
            stopping: false,
            children: Vec::new(),
        }
    }

    /// The loop: read events and completions until stopped, then finish
    /// what is in flight (reading events only while parked work needs the
    /// queue drained), then end. Errors end it at once; tasks in flight
    /// still finish their own faults.
    // Without `tracing` the events below name nothing.
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    async fn run(self, stream: EventStream) -> Result<ServerExit> {
        trace::event!(debug, "serving");
        let result = self.serve(stream).await;
        match &result {
            Ok(ServerExit::Stopped) => trace::event!(debug, "stopped: asked to stop"),
            Ok(ServerExit::ProcessExited) => {
                trace::event!(debug, "stopped: the process that owns the memory exited")
            }
            Err(e) => trace::event!(
                warn,
                error = %crate::error::error_chain(e),
                "stopped by an error"
            ),
        }
        result
    }

    async fn serve(mut self, mut stream: EventStream) -> Result<ServerExit> {
        if let Some(gate) = &self.shared.gate {
            stream.set_removal_gate(gate.clone());
        }
        let mut stop = StopWait::new(self.stop.clone());
        // Reads left to drain the queue once stopped (see below).
        let mut drains = STOP_DRAIN_READS;
        let mut probe = self.child_probe.map(|every| {
            let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe
        });
        loop {
            // Seen here too, not only when the select below polls it: once
            // asked to stop, the server reads no new event (but to finish
            // its work and to let forks complete).
            if !self.stopping && self.stop.is_stopped() {
                self.begin_stopping();
            }
            if self.stopping && self.inflight == 0 && self.parked.is_empty() {
                // With EVENT_FORK a forking thread sleeps until its Fork is
                // read, even once this uffd is dropped (the half-made child
                // holds a copy of it): read what is queued before ending,
                // serving its faults and closing its children's uffds.
                if self.forks && drains > 0 {
                    drains -= 1;
                    if let Some(event) = stream.try_next_event()? {
                        if let Some(exit) = self.after_read(Ok(event), &mut stream).await? {
                            return Ok(exit);
                        }
                        continue;
                    }
                }
                for child in std::mem::take(&mut self.children) {
                    let _ = child.await;
                }
                return Ok(ServerExit::Stopped);
            }
            let tid = thread_id();
            if tid != self.last_tid {
                self.last_tid = tid;
                self.tids.insert(tid);
            }
            let retry_at = self.parked.iter().filter_map(|j| j.deadline).min();
            let reading = !self.stopping || !self.parked.is_empty();
            let step = tokio::select! {
                biased;
                // Only spawned tasks report here; none, none to wait for.
                Some(done) = self.rx.recv(), if self.inflight > 0 => self.finish(done).await,
                event = stream.next_event(), if reading => self.after_read(event, &mut stream).await,
                _ = sleep_until_retry(retry_at), if retry_at.is_some() => self.retry_parked().await,
                _ = tick(&mut probe), if probe.is_some() => self.probe_owner(&mut probe),
                () = std::future::poll_fn(|cx| stop.poll_stopped(cx)), if !self.stopping => {
                    self.begin_stopping();
                    Ok(None)
                }
            };
            if let Some(exit) = step? {
                return Ok(exit);
            }
        }
    }

    /// A forked child's server ends once the child is gone, even if it
    /// never faults again.
    fn probe_owner(
        &mut self,
        probe: &mut Option<tokio::time::Interval>,
    ) -> Result<Option<ServerExit>> {
        match self.shared.uffd.owner_exited() {
            Ok(true) => {
                trace::event!(debug, "the forked child exited: releasing its userfaultfd");
                Ok(Some(ServerExit::ProcessExited))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                trace::event!(
                    warn,
                    error = %crate::error::error_chain(&e),
                    "cannot probe whether the forked child exists; it is released when a \
                     resolution finds it gone, or when the server stops"
                );
                let _ = e;
                *probe = None;
                Ok(None)
            }
        }
    }

    /// Puts `job` on the stall board, if there is one and it is not on yet.
    fn watch(&self, job: &mut Job) {
        if let (None, Some((board, _))) = (job.watch, &self.watch) {
            job.watch = Some(board.begin(job.fault.address, job.fault.thread_id));
        }
    }

    /// Takes `job` off the stall board.
    fn unwatch(&self, job: &mut Job) {
        if let (Some(token), Some((board, _))) = (job.watch.take(), &self.watch) {
            board.end(token);
        }
    }

    fn begin_stopping(&mut self) {
        trace::event!(
            debug,
            inflight = self.inflight,
            parked = self.parked.len(),
            "stopping"
        );
        self.stopping = true;
    }

    /// Handles the event just read and the rest of its batch, then retries
    /// parked work.
    ///
    /// A batch's `Remove`, `Unmap` and `Remap` events update the page map
    /// before any of its faults is planned. One `read(2)` returns every
    /// pending fault before any pending event, so a batch can hold a fault
    /// on a page *and* the `Remove` that zapped that page after the fault
    /// was raised; the removal gate already counts that Remove (it was
    /// recorded by the read), so a fault planned from a page map that did
    /// not know of it would pass the gate and copy the stale image into a
    /// page the owner has just freed. Events keep their own order among
    /// themselves (a fork's child gets the page map as of its Fork).
    async fn after_read(
        &mut self,
        event: Result<Event>,
        stream: &mut EventStream,
    ) -> Result<Option<ServerExit>> {
        if let Some((board, _)) = &self.watch {
            board.note_read();
        }
        let mut next = Some(event?);
        loop {
            // The whole batch: events applied in order, faults kept.
            while let Some(event) = next {
                self.on_event(event)?;
                next = stream.next_buffered().transpose()?;
            }
            let mut faults = std::mem::take(&mut self.batch_faults);
            let mut exit = Ok(None);
            for &fault in &faults {
                exit = self.on_fault(fault).await;
                if !matches!(exit, Ok(None)) {
                    break;
                }
            }
            faults.clear();
            self.batch_faults = faults;
            if !matches!(exit, Ok(None)) {
                return exit;
            }
            // Only with parked work is the kernel's queue drained too (the
            // event that makes it fail may be there); otherwise that would
            // cost a read(2) per fault.
            if self.parked.is_empty() {
                return Ok(None);
            }
            next = stream.try_next_event()?;
            if next.is_none() {
                return self.retry_parked().await;
            }
        }
    }

    /// Applies a non-fault event to the page state; keeps a fault for
    /// [`after_read`](Self::after_read) to plan once the batch's events are
    /// applied.
    fn on_event(&mut self, event: Event) -> Result<()> {
        let stats = &self.shared.stats;
        match event {
            Event::PageFault(fault) => self.batch_faults.push(fault),
            Event::Remove(r) => {
                trace::event!(debug, start = %format_args!("{:#x}", r.start), end = %format_args!("{:#x}", r.end), "remove");
                Stats::add(&stats.removes, 1);
                self.layout.remove(r.start, r.end);
                self.loose.remove(r.start, r.end, self.shared.page_size);
                self.shared.handler.on_remove(r.start, r.end);
            }
            Event::Unmap(u) => {
                trace::event!(debug, start = %format_args!("{:#x}", u.start), end = %format_args!("{:#x}", u.end), "unmap");
                Stats::add(&stats.unmaps, 1);
                self.layout.unmap(u.start, u.end);
                self.loose.unmap(u.start, u.end);
                self.shared.handler.on_unmap(u.start, u.end);
            }
            Event::Remap(r) => {
                trace::event!(debug, from = %format_args!("{:#x}", r.from), to = %format_args!("{:#x}", r.to), len = r.len, "remap");
                Stats::add(&stats.remaps, 1);
                self.layout.remap(r.from, r.to, r.len);
                self.loose.remap(r.from, r.to, r.len);
                self.shared.handler.on_remap(&r);
            }
            Event::Fork(fork) => {
                Stats::add(&stats.forks, 1);
                self.shared.handler.on_fork();
                if self.stopping {
                    // Read only so that the fork completes: a stopping
                    // server serves no new child.
                    trace::event!(
                        warn,
                        child_uffd = fork.uffd().as_raw_fd(),
                        "a process forked while the server was stopping: its child's memory is not served"
                    );
                } else if self.shared.fork == ForkPolicy::Serve {
                    trace::event!(
                        debug,
                        child_uffd = fork.uffd().as_raw_fd(),
                        "fork: serving the child"
                    );
                    self.serve_child(fork.into_uffd())?;
                } else {
                    trace::event!(debug, "fork: the child is not served (ForkPolicy::Ignore)");
                }
            }
        }
        Ok(())
    }

    /// Serves a forked child with the same handler and a copy of the page
    /// state, in a task of its own that ends with the parent's stop signal
    /// (or when the child's process is found gone).
    fn serve_child(&mut self, uffd: crate::Uffd) -> Result<()> {
        let uffd = AsyncUffd::new(uffd)?;
        let mut layout = self.layout.clone();
        for r in &mut layout.regions {
            // Pages being resolved for the parent are still missing in the
            // child.
            let pages = r.region.len / r.region.page_size;
            for i in 0..pages {
                if r.inflight.get(i) {
                    r.inflight.set(i, false);
                    r.served.set(i, false);
                }
            }
        }
        let span = trace::server_span(uffd.uffd().as_raw_fd(), layout.regions.len(), true);
        let shared = Arc::new(self.shared.for_child(uffd.clone()));
        let stream = uffd.event_stream_with_batch(self.shared.batch)?;
        let probe = Some(shared.child_probe);
        let reader = Reader::new(shared, layout, self.tids.clone(), self.stop.clone(), probe);
        let stats = self.shared.stats.clone();
        self.children.retain(|c| !c.is_finished());
        self.children
            .push(tokio::spawn(trace::in_span(span, async move {
                if let Err(e) = Box::pin(reader.run(stream)).await {
                    stats.set_error(format!(
                        "a forked child's server failed: {}",
                        crate::error::error_chain(&e)
                    ));
                }
            })));
        Ok(())
    }

    async fn on_fault(&mut self, fault: PageFault) -> Result<Option<ServerExit>> {
        let read_at = Instant::now();
        trace::event!(
            trace,
            addr = %format_args!("{:#x}", fault.address),
            kind = ?fault.kind(),
            thread = fault.thread_id,
            "fault"
        );
        let stats = &self.shared.stats;
        match fault.kind() {
            FaultKind::Missing => Stats::add(&stats.missing, 1),
            FaultKind::WriteProtect => Stats::add(&stats.write_protect, 1),
            FaultKind::Minor => Stats::add(&stats.minor, 1),
        }
        if let Some(tid) = fault.thread_id {
            if self.tids.contains(&tid) {
                Stats::add(&stats.self_faults, 1);
                stats.set_error(format!(
                    "thread {tid}, a thread of the server's own runtime, faulted at {:#x}: \
                     touch registered memory only from other threads or processes",
                    fault.address
                ));
            }
        }
        let Some(job) = self.plan(fault, read_at) else {
            // A duplicate: the resolution in flight (or done) wakes it.
            Stats::add(&self.shared.stats.duplicates, 1);
            return Ok(None);
        };
        self.start(job).await
    }

    /// Runs `job`: first polled right here (a handler that is ready at once
    /// costs no task and no wake-up), then, if it has to wait, in a task of
    /// its own under the concurrency limit.
    async fn start(&mut self, mut job: Box<Job>) -> Result<Option<ServerExit>> {
        if job.zero_fill || decide_direct(&self.shared, &mut job) {
            // Freed pages (zeros, without the handler), or a handler that
            // has every byte at hand: no future to poll.
            let outcome = apply_and_account(&self.shared, &mut job);
            return self.finish(Done { job, outcome }).await;
        }
        let shared = self.shared.clone();
        let (addr, thread) = (job.fault.address, job.fault.thread_id);
        let mut work = Box::pin(async move {
            let outcome = execute(&shared, &mut job).await;
            Done { job, outcome }
        });
        let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        if let Poll::Ready(done) = first {
            return self.finish(done).await;
        }
        let watch = self
            .watch
            .as_ref()
            .map(|(board, _)| board.begin(addr, thread));
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.inflight += 1;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut done = work.await;
            done.job.watch = watch;
            done.job.counted = true;
            drop(permit);
            let _ = tx.send(done);
        });
        Ok(None)
    }

    /// Decides what to resolve for `fault`; `None` for a duplicate.
    fn plan(&mut self, fault: PageFault, read_at: Instant) -> Option<Box<Job>> {
        let base = self.shared.page_size;
        let generation = self.shared.gate.as_ref().map_or(0, |g| g.generation());
        let Some(ri) = self.layout.find(fault.address) else {
            // Outside every region: the page alone, base page size.
            // Remembered like a region's pages: a duplicate queued behind
            // the page's resolution runs no handler, a freed page gets
            // zeros.
            let page = fault.page_start(base);
            if self.loose.is_inflight(page) {
                return None;
            }
            let mut job = new_job(
                &mut self.spare,
                fault,
                page,
                base,
                SourceId::default(),
                read_at,
                generation,
            );
            let missing = fault.kind() == FaultKind::Missing;
            let zero = missing && (self.loose.is_served(page) || self.loose.is_removed(page));
            job.runs[0] = Run {
                addr: page,
                len: base,
                offset: page as u64,
                resolution: zero.then_some(Resolution::Zero),
                ..Run::default()
            };
            job.nruns = 1;
            job.buf_len = base;
            job.decided = zero;
            job.zero_fill = zero;
            self.loose.set_inflight(page, true);
            return Some(job);
        };
        let rs = &mut self.layout.regions[ri];
        let region = rs.region;
        let ps = region.page_size;
        let page = fault.page_start(ps);
        let idx = rs.page_index(page);
        if rs.inflight.get(idx) {
            return None;
        }
        let missing = fault.kind() == FaultKind::Missing;
        let offset_of = |addr: usize| region.offset + (addr - region.start) as u64;
        let mut job = new_job(
            &mut self.spare,
            fault,
            page,
            ps,
            region.source,
            read_at,
            generation,
        );
        if missing && (rs.removed.get(idx) || rs.served.get(idx)) {
            // Freed by the owner (a Remove): zeros, never the stale image.
            // Or served already: either a duplicate queued before it was
            // (the zeropage finds the page there, EEXIST, and only wakes),
            // or freed since without an event the server was told of (a
            // MADV_DONTNEED without EVENT_REMOVE, a hole punched in shmem),
            // where zeros are what the kernel itself would map.
            job.runs[0] = Run {
                addr: page,
                len: ps,
                offset: offset_of(page),
                resolution: Some(Resolution::Zero),
                ..Run::default()
            };
            job.nruns = 1;
            job.decided = true;
            job.zero_fill = true;
            rs.inflight.set(idx, true);
            return Some(job);
        }
        // The aligned window around the page, clipped to the region.
        let window = if missing {
            self.shared.prefetch.min(MAX_WINDOW_BYTES / ps).max(1)
        } else {
            1
        };
        let pages = region.len / ps;
        let lo = idx - idx % window;
        let hi = (lo + window).min(pages);
        // Runs of pages nobody has: the faulting page's run first.
        let free = |i: usize| !rs.served.get(i) && !rs.inflight.get(i) && !rs.removed.get(i);
        let mut start = idx;
        while start > lo && free(start - 1) {
            start -= 1;
        }
        let mut end = idx + 1;
        while end < hi && free(end) {
            end += 1;
        }
        let mut buf_off = 0;
        let mut push = |job: &mut Job, s: usize, e: usize| {
            let addr = region.start + s * ps;
            let len = (e - s) * ps;
            job.runs[job.nruns] = Run {
                addr,
                len,
                offset: offset_of(addr),
                buf_off,
                ..Run::default()
            };
            buf_off += len;
            job.nruns += 1;
        };
        push(&mut job, start, end);
        let mut i = lo;
        while i < hi && job.nruns < MAX_RUNS {
            if (start..end).contains(&i) || !free(i) {
                i += 1;
                continue;
            }
            let s = i;
            while i < hi && free(i) && !(start..end).contains(&i) {
                i += 1;
            }
            push(&mut job, s, i);
        }
        for run in job.runs() {
            let s = rs.page_index(run.addr);
            rs.inflight.set_range(s, s + run.len / ps, true);
        }
        job.buf_len = buf_off;
        Some(job)
    }

    /// Marks the pages of `job` no longer in flight, and served where
    /// `served` and the run was resolved.
    fn settle(&mut self, job: &Job, served: bool) {
        for run in job.runs() {
            let mut addr = run.addr;
            while addr < run.addr + run.len {
                let Some(ri) = self.layout.find(addr) else {
                    self.loose.set_inflight(addr, false);
                    let resolved = run.resolution.is_some_and(|r| r != Resolution::Poison);
                    if served && (job.zero_fill || resolved && !self.loose.is_removed(addr)) {
                        self.loose.set_served(addr);
                    }
                    addr += job.page_size;
                    continue;
                };
                let rs = &mut self.layout.regions[ri];
                let idx = rs.page_index(addr);
                rs.inflight.set(idx, false);
                let resolved = run.resolution.is_some_and(|r| r != Resolution::Poison);
                if served && resolved && !rs.removed.get(idx) || served && job.zero_fill {
                    rs.served.set(idx, true);
                }
                addr += rs.region.page_size;
            }
        }
    }

    async fn finish(&mut self, done: Done) -> Result<Option<ServerExit>> {
        let Done { mut job, outcome } = done;
        if job.counted {
            job.counted = false;
            self.inflight -= 1;
        }
        let retrying = match &outcome {
            Outcome::Park => true,
            Outcome::Failed { .. } => matches!(
                self.shared.failure,
                FailurePolicy::Retry { attempts, .. } if job.attempt < attempts && !job.zero_fill
            ),
            _ => false,
        };
        if retrying {
            self.watch(&mut job);
        } else {
            self.unwatch(&mut job);
        }
        match outcome {
            Outcome::Resolved => {
                // Counted where it was applied.
                self.settle(&job, true);
                self.recycle(job);
            }
            Outcome::Park => {
                if job.deadline.is_none() {
                    trace::event!(
                        debug,
                        addr = %format_args!("{:#x}", job.page),
                        "parked: the address space is changing (EAGAIN); reading events and retrying"
                    );
                    job.deadline = Some(Instant::now() + self.shared.retry_timeout);
                }
                self.parked.push(job);
            }
            Outcome::Replan => {
                // Plan the fault again: the freed pages are zeros now.
                self.settle(&job, false);
                // Faults on the job's pages were taken for duplicates of it;
                // the new plan may not cover them all (a freed page at the
                // window's edge): wake them to fault again.
                let (lo, hi) = job.span();
                let _ = self.shared.uffd.wake(lo, hi - lo);
                let (fault, read_at) = (job.fault, job.read_at);
                self.recycle(job);
                if let Some(job) = self.plan(fault, read_at) {
                    return Box::pin(self.start(job)).await;
                }
            }
            Outcome::Gone => {
                self.settle(&job, false);
                // Whoever waits anywhere in the job faults again (or finds
                // the memory gone).
                let (lo, hi) = job.span();
                let _ = self.shared.uffd.wake(lo, hi - lo);
                self.recycle(job);
            }
            Outcome::Exited => {
                self.settle(&job, false);
                return Ok(Some(ServerExit::ProcessExited));
            }
            Outcome::Failed { run, cause } => {
                let stats = &self.shared.stats;
                Stats::add(&stats.handler_failures, 1);
                if let FailurePolicy::Retry { attempts, backoff } = self.shared.failure {
                    if job.attempt < attempts && !job.zero_fill {
                        let failure = failure(&job, run, cause, FailureAction::Retried);
                        trace::report_failure(&failure);
                        stats.record_failure(&failure);
                        job.attempt += 1;
                        job.decided = false;
                        job.deadline = None;
                        job.existed = 0;
                        for r in &mut job.runs[..job.nruns] {
                            r.resolution = None;
                            r.direct = false;
                            r.done = 0;
                        }
                        self.respawn(job, backoff).await;
                        return Ok(None);
                    }
                }
                return self.fail(job, run, cause);
            }
        }
        Ok(None)
    }

    async fn respawn(&mut self, mut job: Box<Job>, backoff: Duration) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.inflight += 1;
        decide_direct(&self.shared, &mut job);
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let outcome = execute(&shared, &mut job).await;
            job.counted = true;
            drop(permit);
            let _ = tx.send(Done { job, outcome });
        });
    }

    /// Applies the failure policy to a job that cannot be resolved: the
    /// faulting page is poisoned (parked like any resolution if the address
    /// space is changing), the rest of the window woken so its waiters
    /// fault again.
    fn fail(&mut self, mut job: Box<Job>, run: usize, cause: Cause) -> Result<Option<ServerExit>> {
        self.settle(&job, false);
        let uffd = self.shared.uffd.clone();
        let (lo, hi) = job.span();
        let stats = self.shared.stats.clone();
        let report = |job: &Job, cause: Cause, action| {
            let failure = failure(job, run, cause, action);
            trace::report_failure(&failure);
            stats.record_failure(&failure);
            failure
        };
        if self.shared.failure == FailurePolicy::Stop {
            let _ = uffd.wake(lo, hi - lo);
            let failure = report(&job, cause, FailureAction::Stopped);
            return Err(Error::Handler(Box::new(failure)));
        }
        let has_poison = uffd.features().contains(Features::POISON)
            || uffd.available_features().contains(Features::POISON);
        // Poison first: a woken faulting thread would only fault again.
        let result = uffd.poison(job.page, job.page_size, PoisonFlags::empty());
        let _ = uffd.wake(lo, hi - lo);
        match result {
            Ok(_) => {
                Stats::add(&self.shared.stats.poisoned, 1);
                report(&job, cause, FailureAction::Poisoned);
                Ok(None)
            }
            Err(e) if e.kind() == ErrorKind::Retry => {
                report(&job, cause, FailureAction::Poisoned);
                // An event is pending: park the poisoning itself.
                job.runs[0] = Run {
                    addr: job.page,
                    len: job.page_size,
                    resolution: Some(Resolution::Poison),
                    ..Run::default()
                };
                job.nruns = 1;
                job.decided = true;
                job.zero_fill = true; // no handler, no gate check
                job.deadline = Some(Instant::now() + self.shared.retry_timeout);
                self.mark_inflight(&job);
                self.watch(&mut job);
                self.parked.push(job);
                Ok(None)
            }
            // Someone else resolved it meanwhile (it has data, and it was
            // woken), or it is gone.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Exists | ErrorKind::RangeGone | ErrorKind::ProcessExited
                ) =>
            {
                report(&job, cause, FailureAction::Dropped);
                Ok(None)
            }
            Err(poison) => {
                let cause = Arc::new(ServeError::PoisonFailed {
                    cause,
                    poison,
                    hint: if has_poison {
                        ""
                    } else {
                        " (the kernel cannot poison pages: UFFDIO_POISON needs Linux 6.6+)"
                    },
                });
                let failure = report(&job, cause, FailureAction::Stopped);
                Err(Error::Handler(Box::new(failure)))
            }
        }
    }

    /// Keeps a finished job (and its buffer) for the next fault.
    fn recycle(&mut self, job: Box<Job>) {
        if self.spare.len() < self.shared.concurrency {
            self.spare.push(job);
        }
    }

    fn mark_inflight(&mut self, job: &Job) {
        if let Some(ri) = self.layout.find(job.page) {
            let rs = &mut self.layout.regions[ri];
            let idx = rs.page_index(job.page);
            rs.inflight.set(idx, true);
        } else {
            self.loose.set_inflight(job.page, true);
        }
    }

    async fn retry_parked(&mut self) -> Result<Option<ServerExit>> {
        if self.parked.is_empty() {
            return Ok(None);
        }
        let now = Instant::now();
        for mut job in std::mem::take(&mut self.parked) {
            let outcome = apply_and_account(&self.shared, &mut job);
            match outcome {
                Outcome::Park if job.deadline.is_some_and(|d| now > d) => {
                    let cause: Cause =
                        Arc::new(ServeError::KeptChanging(self.shared.retry_timeout));
                    if job.runs[0].resolution == Some(Resolution::Poison) {
                        // Even poisoning cannot get through: give up on it.
                        self.unwatch(&mut job);
                        self.settle(&job, false);
                        let failure = failure(&job, 0, cause, FailureAction::Dropped);
                        trace::report_failure(&failure);
                        self.shared.stats.record_failure(&failure);
                        continue;
                    }
                    Stats::add(&self.shared.stats.handler_failures, 1);
                    self.unwatch(&mut job);
                    if let Some(exit) = self.fail(job, 0, cause)? {
                        return Ok(Some(exit));
                    }
                }
                Outcome::Park => self.parked.push(job),
                outcome => {
                    trace::event!(
                        debug,
                        addr = %format_args!("{:#x}", job.page),
                        waited = ?now.saturating_duration_since(job.read_at),
                        "unparked"
                    );
                    if let Some(exit) = self.finish(Done { job, outcome }).await? {
                        return Ok(Some(exit));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// A job for `fault`, in a spare one if there is one (keeping its buffer).
#[allow(clippy::vec_box)]
fn new_job(
    spare: &mut Vec<Box<Job>>,
    fault: PageFault,
    page: usize,
    page_size: usize,
    source: SourceId,
    read_at: Instant,
    generation: u64,
) -> Box<Job> {
    let fresh = |buf| Job {
        fault,
        page,
        page_size,
        source,
        read_at,
        runs: [Run::default(); MAX_RUNS],
        nruns: 0,
        buf,
        buf_len: 0,
        attempt: 0,
        decided: false,
        deadline: None,
        zero_fill: false,
        counted: false,
        generation,
        existed: 0,
        watch: None,
    };
    match spare.pop() {
        Some(mut job) => {
            let buf = std::mem::take(&mut job.buf);
            *job = fresh(buf);
            job
        }
        None => Box::new(fresh(Vec::new())),
    }
}

/// The next tick of `probe`; never without one.
async fn tick(probe: &mut Option<tokio::time::Interval>) {
    match probe {
        Some(probe) => {
            probe.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until_retry(at: Option<Instant>) {
    // Retry parked work every millisecond (or at its deadline), whichever
    // comes first; events that arrive meanwhile retry it sooner.
    let soon = Instant::now() + Duration::from_millis(1);
    let at = at.map_or(soon, |d| d.min(soon));
    tokio::time::sleep_until(at.into()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waiting(signal: &StopSignal) -> usize {
        signal.waiting.lock().unwrap().len()
    }

    #[test]
    fn a_reader_that_ends_before_the_stop_takes_its_waker_back() {
        let signal = Arc::new(StopSignal::default());
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = StopWait::new(signal.clone());
        assert!(wait.poll_stopped(&mut cx).is_pending());
        // Polled again with the same waker: registered once.
        assert!(wait.poll_stopped(&mut cx).is_pending());
        assert_eq!(waiting(&signal), 1);
        drop(wait);
        assert_eq!(waiting(&signal), 0);
        signal.stop();
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "a gone reader was woken");
    }

    #[test]
    fn dropping_the_guard_of_run_stops_and_wakes_every_reader() {
        let signal = Arc::new(StopSignal::default());
        let counts: Vec<Arc<Count>> = (0..3).map(|_| Arc::default()).collect();
        let mut waits: Vec<StopWait> = (0..3).map(|_| StopWait::new(signal.clone())).collect();
        for (wait, count) in waits.iter_mut().zip(&counts) {
            let waker = Waker::from(count.clone());
            assert!(wait
                .poll_stopped(&mut Context::from_waker(&waker))
                .is_pending());
        }
        drop(StopOnDrop(signal.clone()));
        for (wait, count) in waits.iter_mut().zip(&counts) {
            assert_eq!(count.0.load(Ordering::SeqCst), 1);
            let waker = Waker::from(count.clone());
            assert!(wait
                .poll_stopped(&mut Context::from_waker(&waker))
                .is_ready());
        }
    }
}
