//! The fault server: reads events, runs the handler in spawned tasks, and
//! owns every kernel edge case around it.

use std::collections::HashSet;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::asyncfd::{AsyncUffd, EventStream};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Event, FaultKind, PageFault};
use crate::flags::{
    ContinueFlags, CopyFlags, Features, PoisonFlags, UnprotectFlags, ZeropageFlags,
};
use crate::handler::{FaultHandler, FaultRequest, Resolution};
use crate::layout::{Layout, Region};
use crate::stats::{Stats, StatsSnapshot};

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
///   runtime is reported (it would deadlock a current-thread runtime).
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
///     .regions([Region::new(base, len, 4096, 0)])
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
            stats: Arc::new(Stats::new()),
        }
    }

    /// Adds regions: where the memory is, its page size and where its
    /// contents come from. Faults outside every region are still served,
    /// page by page, with the base page size and `offset = address`.
    pub fn regions(mut self, regions: impl IntoIterator<Item = Region>) -> Self {
        self.regions.extend(regions);
        self
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

    /// Messages read per `read(2)`.
    pub fn batch(mut self, messages: usize) -> Self {
        self.batch = messages.max(1);
        self
    }

    /// The statistics this server will keep.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs the server on the caller's task until it is stopped through
    /// `stop`'s sender side (see [`spawn`](Self::spawn)) or the owning
    /// process exits.
    ///
    /// # Errors
    ///
    /// An error reading the userfaultfd, or a handler failure under
    /// [`FailurePolicy::Stop`] (or `Poison` without the kernel feature).
    ///
    /// # Panics
    ///
    /// Needs a Tokio runtime with I/O and time enabled.
    pub async fn run(self) -> Result<ServerExit> {
        let (_tx, rx) = watch::channel(false);
        self.run_until(rx).await
    }

    /// Spawns the server on the current runtime and returns a handle to
    /// stop it and read its statistics.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> ServerHandle {
        let (tx, rx) = watch::channel(false);
        let stats = self.stats.clone();
        let task = tokio::spawn(self.run_until(rx));
        ServerHandle {
            stop: tx,
            stats,
            task: Some(task),
        }
    }

    async fn run_until(self, stop: watch::Receiver<bool>) -> Result<ServerExit> {
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
            tracks_removal,
            pool: Mutex::new(Vec::new()),
        });
        let reader = Reader::new(shared, Layout::new(self.regions), self.guard_threads, stop);
        reader.run(stream).await
    }
}

/// A handle to a spawned [`Server`]: its statistics, and a graceful stop.
///
/// Dropping the handle stops the server too.
#[derive(Debug)]
pub struct ServerHandle {
    stop: watch::Sender<bool>,
    stats: Arc<Stats>,
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

    /// Asks the server to stop: it reads no new event, finishes the faults
    /// in flight (their threads get the right data), then ends with
    /// [`ServerExit::Stopped`]. Faults not yet read stay queued in the
    /// kernel, their threads asleep, until the userfaultfd is read by
    /// someone else or closed.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
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
        let _ = self.stop.send(true);
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
    /// Whether `EVENT_REMOVE` tells the server about freed pages.
    tracks_removal: bool,
    /// Reusable page buffers.
    pool: Mutex<Vec<Vec<u8>>>,
}

impl<H> Shared<H> {
    fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut buf = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn put_buf(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < self.concurrency {
            pool.push(buf);
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
    /// Bytes applied so far.
    done: usize,
}

/// One fault and the runs resolved for it.
struct Job {
    fault: PageFault,
    page: usize,
    page_size: usize,
    source: usize,
    read_at: Instant,
    runs: [Run; MAX_RUNS],
    nruns: usize,
    buf: Vec<u8>,
    attempt: u32,
    /// Set once the handler has decided every run.
    decided: bool,
    /// When an `EAGAIN` park gives up.
    deadline: Option<Instant>,
    /// Pages served as zeros because they were removed (no handler).
    zero_fill: bool,
}

impl Job {
    fn runs(&self) -> &[Run] {
        &self.runs[..self.nruns]
    }

    fn span(&self) -> (usize, usize) {
        let first = self.runs[0].addr;
        let last = self
            .runs()
            .iter()
            .map(|r| r.addr + r.len)
            .max()
            .unwrap_or(first);
        let lo = self.runs().iter().map(|r| r.addr).min().unwrap_or(first);
        (lo, last)
    }

    fn bytes(&self) -> usize {
        self.runs().iter().map(|r| r.len).sum()
    }
}

/// Why a job did not resolve.
enum Outcome {
    Resolved,
    Park,
    Gone,
    Exited,
    Failed(String),
}

struct Done {
    job: Job,
    outcome: Outcome,
}

/// Calls the handler for every run of `job` (once), then applies.
async fn execute<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    if !job.decided {
        for i in 0..job.nruns {
            let run = job.runs[i];
            let req = FaultRequest {
                addr: run.addr,
                len: run.len,
                page_size: job.page_size,
                fault_addr: job.fault.address,
                kind: job.fault.kind(),
                write: job.fault.is_write(),
                thread_id: job.fault.thread_id,
                source: job.source,
                offset: run.offset,
            };
            let buf = &mut job.buf[run.buf_off..run.buf_off + run.len];
            let result = AssertUnwindSafe(shared.handler.fault(&req, buf))
                .catch_unwind()
                .await;
            let resolution = match result {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Outcome::Failed(handler_error(&req, &*e)),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    return Outcome::Failed(format!(
                        "the handler panicked serving {:#x}+{:#x}: {what}",
                        req.addr, req.len
                    ));
                }
            };
            job.runs[i].resolution = Some(resolution);
        }
        job.decided = true;
    }
    apply_and_account(shared, job)
}

fn handler_error(req: &FaultRequest, e: &(dyn std::error::Error + Send + Sync)) -> String {
    format!(
        "the handler failed serving {:#x}+{:#x} (fault at {:#x}): {e}",
        req.addr, req.len, req.fault_addr
    )
}

/// [`apply`], and the statistics of a resolution at once, so that they are
/// current by the time the woken thread runs.
fn apply_and_account<H>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    let outcome = apply(shared, job);
    if let Outcome::Resolved = outcome {
        let stats = &shared.stats;
        let bytes = job.bytes();
        let pages = (bytes / job.page_size) as u64;
        Stats::add(&stats.pages_served, pages);
        Stats::add(&stats.bytes_served, bytes as u64);
        if job.zero_fill {
            Stats::add(&stats.pages_zeroed_after_remove, pages);
        } else {
            Stats::add(&stats.pages_prefetched, pages.saturating_sub(1));
        }
        stats.record_latency(job.read_at.elapsed());
    }
    outcome
}

/// Applies the decided resolutions of `job`; resumable after a park.
fn apply<H>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    let uffd = &*shared.uffd;
    let multi = job.nruns > 1;
    let page_size = job.page_size;
    for i in 0..job.nruns {
        let run = job.runs[i];
        let Some(resolution) = run.resolution else {
            continue;
        };
        let mut done = run.done;
        while done < run.len {
            let addr = run.addr + done;
            let len = run.len - done;
            let result = match resolution {
                Resolution::Copy => {
                    let from = run.buf_off + done;
                    let flags = if multi {
                        CopyFlags::DONTWAKE
                    } else {
                        CopyFlags::empty()
                    };
                    uffd.copy(addr, &job.buf[from..from + len], flags)
                }
                Resolution::Zero if page_size > shared.page_size => {
                    // hugetlbfs has no zeropage: copy zeros.
                    let zeros = vec![0u8; len];
                    let flags = if multi {
                        CopyFlags::DONTWAKE
                    } else {
                        CopyFlags::empty()
                    };
                    uffd.copy(addr, &zeros, flags)
                }
                Resolution::Zero => {
                    let flags = if multi {
                        ZeropageFlags::DONTWAKE
                    } else {
                        ZeropageFlags::empty()
                    };
                    uffd.zeropage(addr, len, flags)
                }
                Resolution::Continue => {
                    let flags = if multi {
                        ContinueFlags::DONTWAKE
                    } else {
                        ContinueFlags::empty()
                    };
                    uffd.continue_range(addr, len, flags)
                }
                Resolution::Unprotect => {
                    let flags = if multi {
                        UnprotectFlags::DONTWAKE
                    } else {
                        UnprotectFlags::empty()
                    };
                    uffd.write_unprotect(addr, len, flags).map(|()| len)
                }
                Resolution::Poison => uffd.poison(addr, len, PoisonFlags::empty()),
                Resolution::Wake => uffd.wake(addr, len).map(|()| len),
            };
            match result {
                Ok(_) => done = run.len,
                Err(e) => match e.kind() {
                    ErrorKind::Exists => {
                        // Already there (EEXIST does not wake): wake it and
                        // go on with the rest of the run.
                        Stats::add(&shared.stats.eexist, 1);
                        let _ = uffd.wake(addr, page_size);
                        done += page_size;
                    }
                    ErrorKind::Retry if e.bytes_done() > 0 => done += e.bytes_done(),
                    ErrorKind::Retry => {
                        Stats::add(&shared.stats.eagain, 1);
                        job.runs[i].done = done;
                        return Outcome::Park;
                    }
                    ErrorKind::RangeGone => return Outcome::Gone,
                    ErrorKind::ProcessExited => return Outcome::Exited,
                    _ => {
                        job.runs[i].done = done;
                        return Outcome::Failed(e.to_string());
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
struct Reader<H> {
    shared: Arc<Shared<H>>,
    layout: Layout,
    /// Faulting pages outside every region that are being resolved.
    loose_inflight: HashSet<usize>,
    parked: Vec<Job>,
    inflight: usize,
    tx: mpsc::UnboundedSender<Done>,
    rx: mpsc::UnboundedReceiver<Done>,
    permits: Arc<Semaphore>,
    tids: HashSet<u32>,
    last_tid: u32,
    children: JoinSet<Result<ServerExit>>,
    /// The stop signal, shared with the servers of forked children.
    stop: watch::Receiver<bool>,
}

impl<H: FaultHandler> Reader<H> {
    fn new(
        shared: Arc<Shared<H>>,
        layout: Layout,
        tids: HashSet<u32>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(shared.concurrency));
        Self {
            shared,
            layout,
            loose_inflight: HashSet::new(),
            parked: Vec::new(),
            inflight: 0,
            tx,
            rx,
            permits,
            tids,
            last_tid: 0,
            children: JoinSet::new(),
            stop,
        }
    }

    async fn run(mut self, mut stream: EventStream) -> Result<ServerExit> {
        let mut stop = self.stop.clone();
        let exit = loop {
            if *stop.borrow() {
                break ServerExit::Stopped;
            }
            let tid = thread_id();
            if tid != self.last_tid {
                self.last_tid = tid;
                self.tids.insert(tid);
            }
            let retry_at = self.parked.iter().filter_map(|j| j.deadline).min();
            tokio::select! {
                biased;
                Some(done) = self.rx.recv() => {
                    if let Some(exit) = self.finish(done).await? {
                        break exit;
                    }
                }
                event = stream.next_event() => {
                    let event = event?;
                    if let Some(exit) = self.on_event(event).await? {
                        break exit;
                    }
                    // Drain what is queued before retrying parked work: the
                    // event that makes it fail may be among it.
                    while let Some(event) = stream.try_next_event()? {
                        if let Some(exit) = self.on_event(event).await? {
                            return self.wind_down(exit).await;
                        }
                    }
                    if let Some(exit) = self.retry_parked().await? {
                        break exit;
                    }
                }
                _ = sleep_until_retry(retry_at), if retry_at.is_some() => {
                    if let Some(exit) = self.retry_parked().await? {
                        break exit;
                    }
                }
                _ = stop.changed() => {}
            }
        };
        self.wind_down(exit).await
    }

    /// Finishes the faults in flight, then the forked children's servers.
    async fn wind_down(mut self, exit: ServerExit) -> Result<ServerExit> {
        let deadline = Instant::now() + self.shared.retry_timeout;
        while self.inflight > 0 || !self.parked.is_empty() {
            let retry_at = if self.parked.is_empty() {
                None
            } else {
                Some(Instant::now() + Duration::from_millis(1))
            };
            tokio::select! {
                Some(done) = self.rx.recv() => {
                    self.finish(done).await?;
                }
                _ = sleep_until_retry(retry_at), if retry_at.is_some() => {
                    if Instant::now() > deadline {
                        for mut job in std::mem::take(&mut self.parked) {
                            self.fail(&mut job, "the server stopped while the resolution kept failing with EAGAIN".into())?;
                        }
                    } else {
                        self.retry_parked().await?;
                    }
                }
            }
        }
        // Children stop with the parent (they share the stop signal).
        while let Some(child) = self.children.join_next().await {
            match child {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self
                    .shared
                    .stats
                    .set_error(format!("a forked child's server failed: {e}")),
                Err(e) => self
                    .shared
                    .stats
                    .set_error(format!("a forked child's server panicked: {e}")),
            }
        }
        Ok(exit)
    }

    async fn on_event(&mut self, event: Event) -> Result<Option<ServerExit>> {
        let stats = &self.shared.stats;
        match event {
            Event::PageFault(fault) => return self.on_fault(fault).await,
            Event::Remove(r) => {
                Stats::add(&stats.removes, 1);
                self.layout.remove(r.start, r.end);
                self.shared.handler.on_remove(r.start, r.end);
            }
            Event::Unmap(u) => {
                Stats::add(&stats.unmaps, 1);
                self.layout.unmap(u.start, u.end);
                self.shared.handler.on_unmap(u.start, u.end);
            }
            Event::Remap(r) => {
                Stats::add(&stats.remaps, 1);
                self.layout.remap(r.from, r.to, r.len);
                self.shared.handler.on_remap(&r);
            }
            Event::Fork(fork) => {
                Stats::add(&stats.forks, 1);
                self.shared.handler.on_fork();
                if self.shared.fork == ForkPolicy::Serve {
                    self.serve_child(fork.into_uffd())?;
                }
            }
        }
        Ok(None)
    }

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
        let shared = Arc::new(Shared {
            uffd: uffd.clone(),
            handler: self.shared.handler.clone(),
            stats: self.shared.stats.clone(),
            page_size: self.shared.page_size,
            failure: self.shared.failure,
            fork: self.shared.fork,
            retry_timeout: self.shared.retry_timeout,
            prefetch: self.shared.prefetch,
            concurrency: self.shared.concurrency,
            batch: self.shared.batch,
            tracks_removal: self.shared.tracks_removal,
            pool: Mutex::new(Vec::new()),
        });
        let stream = uffd.event_stream_with_batch(self.shared.batch)?;
        // The child's server stops when the parent's is told to.
        let reader = Reader::new(shared, layout, self.tids.clone(), self.stop.clone());
        self.children.spawn(reader.run(stream));
        Ok(())
    }

    async fn on_fault(&mut self, fault: PageFault) -> Result<Option<ServerExit>> {
        let read_at = Instant::now();
        let stats = self.shared.stats.clone();
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
        let Some(mut job) = self.plan(fault, read_at) else {
            // A duplicate: the resolution in flight (or done) wakes it.
            Stats::add(&stats.duplicates, 1);
            return Ok(None);
        };
        if job.zero_fill {
            // Freed pages: zeros, without the handler.
            let outcome = apply_and_account(&self.shared, &mut job);
            return self.finish(Done { job, outcome }).await;
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.inflight += 1;
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let outcome = execute(&shared, &mut job).await;
            drop(permit);
            let _ = tx.send(Done { job, outcome });
        });
        Ok(None)
    }

    /// Decides what to resolve for `fault`; `None` for a duplicate.
    fn plan(&mut self, fault: PageFault, read_at: Instant) -> Option<Job> {
        let base = self.shared.page_size;
        let Some(ri) = self.layout.find(fault.address) else {
            // Outside every region: the page alone, base page size.
            let page = fault.page_start(base);
            if !self.loose_inflight.insert(page) {
                return None;
            }
            let mut job = self.new_job(fault, page, base, 0, read_at);
            job.runs[0] = Run {
                addr: page,
                len: base,
                offset: page as u64,
                ..Run::default()
            };
            job.nruns = 1;
            job.buf = self.shared.take_buf(base);
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
        if missing && rs.served.get(idx) && self.shared.tracks_removal {
            // Served since the fault was raised: just wake the thread.
            // (Only with EVENT_REMOVE: without it a page freed by
            // MADV_DONTNEED still looks served, and waking alone would make
            // its thread fault for ever.)
            let _ = self.shared.uffd.wake(page, ps);
            return None;
        }
        let mut job = Job {
            fault,
            page,
            page_size: ps,
            source: region.source,
            read_at,
            runs: [Run::default(); MAX_RUNS],
            nruns: 0,
            buf: Vec::new(),
            attempt: 0,
            decided: false,
            deadline: None,
            zero_fill: false,
        };
        let offset_of = |addr: usize| region.offset + (addr - region.start) as u64;
        if missing && rs.removed.get(idx) {
            // Freed by the owner: zeros, never the stale image.
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
        // The faulting page's run first, then the other free runs of the
        // window, as many as fit.
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
        job.buf = self.shared.take_buf(buf_off);
        Some(job)
    }

    fn new_job(
        &self,
        fault: PageFault,
        page: usize,
        ps: usize,
        source: usize,
        read_at: Instant,
    ) -> Job {
        Job {
            fault,
            page,
            page_size: ps,
            source,
            read_at,
            runs: [Run::default(); MAX_RUNS],
            nruns: 0,
            buf: Vec::new(),
            attempt: 0,
            decided: false,
            deadline: None,
            zero_fill: false,
        }
    }

    /// Marks the pages of `job` no longer in flight, and served if
    /// `served`.
    fn settle(&mut self, job: &Job, served: bool) {
        for run in job.runs() {
            let mut addr = run.addr;
            while addr < run.addr + run.len {
                let Some(ri) = self.layout.find(addr) else {
                    self.loose_inflight.remove(&addr);
                    addr += job.page_size;
                    continue;
                };
                let rs = &mut self.layout.regions[ri];
                let idx = rs.page_index(addr);
                rs.inflight.set(idx, false);
                if served && run.resolution.is_some_and(|r| r != Resolution::Poison) {
                    rs.served.set(idx, true);
                }
                addr += rs.region.page_size;
            }
        }
    }

    async fn finish(&mut self, done: Done) -> Result<Option<ServerExit>> {
        let Done { mut job, outcome } = done;
        if !job.zero_fill && job.deadline.is_none() {
            self.inflight -= 1;
        }
        let stats = self.shared.stats.clone();
        match outcome {
            Outcome::Resolved => {
                // Counted where it was applied.
                self.settle(&job, true);
                self.shared.put_buf(std::mem::take(&mut job.buf));
            }
            Outcome::Park => {
                if job.deadline.is_none() {
                    job.deadline = Some(Instant::now() + self.shared.retry_timeout);
                }
                self.parked.push(job);
            }
            Outcome::Gone => {
                self.settle(&job, false);
                self.shared.put_buf(std::mem::take(&mut job.buf));
            }
            Outcome::Exited => {
                self.settle(&job, false);
                return Ok(Some(ServerExit::ProcessExited));
            }
            Outcome::Failed(reason) => {
                Stats::add(&stats.handler_failures, 1);
                stats.set_error(reason.clone());
                if let FailurePolicy::Retry { attempts, backoff } = self.shared.failure {
                    if job.attempt < attempts {
                        job.attempt += 1;
                        job.decided = false;
                        job.deadline = None;
                        for r in &mut job.runs[..job.nruns] {
                            r.resolution = None;
                            r.done = 0;
                        }
                        self.respawn(job, backoff).await;
                        return Ok(None);
                    }
                }
                self.fail(&mut job, reason)?;
            }
        }
        Ok(None)
    }

    async fn respawn(&mut self, mut job: Job, backoff: Duration) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.inflight += 1;
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let outcome = execute(&shared, &mut job).await;
            drop(permit);
            let _ = tx.send(Done { job, outcome });
        });
    }

    /// Applies the failure policy to a job that cannot be resolved.
    fn fail(&mut self, job: &mut Job, reason: String) -> Result<()> {
        self.settle(job, false);
        let stats = &self.shared.stats;
        let uffd = &self.shared.uffd;
        // Pages fetched around the fault are not the thread's problem:
        // wake whoever waits there so they fault again.
        let (lo, hi) = job.span();
        let _ = uffd.wake(lo, hi - lo);
        if self.shared.failure == FailurePolicy::Stop {
            return Err(Error::Handler {
                addr: job.fault.address,
                reason,
            });
        }
        let has_poison = uffd.features().contains(Features::POISON)
            || uffd.available_features().contains(Features::POISON);
        match uffd.poison(job.page, job.page_size, PoisonFlags::empty()) {
            Ok(_) => {
                Stats::add(&stats.poisoned, 1);
                Ok(())
            }
            // Someone else resolved it meanwhile: it has data, wake it.
            Err(e) if e.kind() == ErrorKind::Exists => {
                let _ = uffd.wake(job.page, job.page_size);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::RangeGone | ErrorKind::ProcessExited) => Ok(()),
            Err(e) => Err(Error::Handler {
                addr: job.fault.address,
                reason: if has_poison {
                    format!("{reason}; poisoning the page failed too: {e}")
                } else {
                    format!("{reason}; the kernel cannot poison the page (needs 6.6+): {e}")
                },
            }),
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
                    Stats::add(&self.shared.stats.handler_failures, 1);
                    let reason = format!(
                        "the resolution at {:#x} kept failing with EAGAIN for {:?}",
                        job.page, self.shared.retry_timeout
                    );
                    self.fail(&mut job, reason)?;
                }
                Outcome::Park => self.parked.push(job),
                outcome => {
                    // Parked jobs were already taken off the in-flight count.
                    job.deadline = job.deadline.or(Some(now));
                    if let Some(exit) = self.finish(Done { job, outcome }).await? {
                        return Ok(Some(exit));
                    }
                }
            }
        }
        Ok(None)
    }
}

async fn sleep_until_retry(at: Option<Instant>) {
    // Retry parked work every millisecond (or at its deadline), whichever
    // comes first; events that arrive meanwhile retry it sooner.
    let soon = Instant::now() + Duration::from_millis(1);
    let at = at.map_or(soon, |d| d.min(soon));
    tokio::time::sleep_until(at.into()).await;
}
