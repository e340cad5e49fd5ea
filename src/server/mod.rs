//! The fault server: reads events, runs the handler in spawned tasks, and
//! owns every kernel edge case around it.
//!
//! One file per part: [`Server`], its builder and entry points here; the
//! handle (`handle`), stopping (`stop`), the reader's loop and events
//! (`reader`), planning faults on the page map (`plan`), jobs (`job`),
//! running and applying them (`resolve`), finishing them (`finish`), what
//! tasks share (`shared`), the policies (`policy`) and the stall watchdog
//! (`watchdog`).

mod finish;
mod handle;
mod job;
mod plan;
mod policy;
mod reader;
mod resolve;
mod restore;
mod shared;
mod stop;
mod watchdog;

pub use handle::ServerHandle;
pub use policy::{FailurePolicy, ForkPolicy, ServerExit};
pub use restore::Fill;

use std::collections::HashSet;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::asyncfd::AsyncUffd;
use crate::error::{Error, Result};
use crate::handler::FaultHandler;
use crate::layout::{Layout, Region};
use crate::stats::Stats;
use crate::trace;
use crate::working_set::WorkingSet;

use reader::Reader;
use restore::{Recorder, Restore, RestoreConfig, SharedRecorder};
use shared::{Config, Shared};
use stop::{StopOnDrop, StopSignal};
use watchdog::{StallBoard, Watchdog};

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
/// - [`Event::Remove`](crate::Event::Remove): later faults there get zeros, never the stale image
///   (the range stays registered, so it stays served and counted;
///   hugetlbfs, which has no zeropage, gets a zeroed copy);
///   [`Event::Unmap`](crate::Event::Unmap) forgets the range; [`Event::Remap`](crate::Event::Remap) moves the region;
///   [`Event::Fork`](crate::Event::Fork) serves the child too (see [`ForkPolicy`]);
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
    record: bool,
    warm: Option<WorkingSet>,
    fill: Option<Fill>,
    background_concurrency: usize,
    background_chunk: usize,
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
            .field("record", &self.record)
            .field("warm_pages", &self.warm.as_ref().map(WorkingSet::pages))
            .field("fill", &self.fill)
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
/// How many batches the reader reads in a row to drain the queue while work
/// is parked, before it goes back to its loop (completions, the stop, the
/// retries of parked work).
const DRAIN_READS: u32 = 4;
/// The default of [`Server::background_concurrency`].
const DEFAULT_BACKGROUND_CONCURRENCY: usize = 2;
/// The default of [`Server::background_chunk`].
const DEFAULT_BACKGROUND_CHUNK: usize = 1 << 20;

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
            record: false,
            warm: None,
            fill: None,
            background_concurrency: DEFAULT_BACKGROUND_CONCURRENCY,
            background_chunk: DEFAULT_BACKGROUND_CHUNK,
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
        if let Some(ws) = &self.warm {
            ws.match_regions(&self.regions)?;
        }
        Ok(self)
    }

    /// Records the working set of this restore: the pages planned for
    /// faults in the server's regions, in the order they were first
    /// faulted, each once. Read it with [`ServerHandle::working_set`] (once
    /// the program is ready, say), save it with [`WorkingSet::save`], and
    /// give it to [`warm`](Self::warm) next time.
    ///
    /// With a fault-around window ([`prefetch`](Self::prefetch)) the pages
    /// served with a fault are recorded with it: the next restore then
    /// copies what this one copied. With a window of 1 the set is exactly
    /// the pages the program touched. Pages copied by the warm prefetch or
    /// the fill are not recorded (no thread touched them to get there), so
    /// recording a warm restore records its misses only: record a cold
    /// restore.
    ///
    /// The cost is a bit per page, and an entry per run of pages touched
    /// in a row.
    ///
    /// # Example
    ///
    /// A cold restore records what the program touched; the next restore
    /// of the same image, mapped elsewhere, prefetches exactly that while
    /// the program starts, then fills the rest in the background.
    ///
    /// ```
    /// use tokio_uffd::{AsyncUffd, Fill, MemorySource, Region, RegisterMode, Server, SourceHandler, Uffd};
    ///
    /// /// Fresh memory of `len` bytes registered with a new userfaultfd.
    /// fn fresh(len: usize) -> Result<(Uffd, usize), Box<dyn std::error::Error>> {
    ///     let uffd = Uffd::new()?;
    ///     // SAFETY: a fresh anonymous mapping that nothing else uses.
    ///     let mem = unsafe {
    ///         libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
    ///                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    ///     };
    ///     assert_ne!(mem, libc::MAP_FAILED);
    ///     // SAFETY: the mapping is ours and only the server fills it.
    ///     unsafe { uffd.register(mem as usize, len, RegisterMode::MISSING)? };
    ///     Ok((uffd, mem as usize))
    /// }
    ///
    /// /// The program: reads pages 3, 4 and 9 from a plain thread.
    /// async fn program(base: usize, page: usize) -> Vec<u8> {
    ///     tokio::task::spawn_blocking(move || {
    ///         // SAFETY: the registered mapping, which the server fills.
    ///         [3, 4, 9].map(|p| unsafe { *((base + p * page) as *const u8) }).to_vec()
    ///     })
    ///     .await
    ///     .unwrap()
    /// }
    ///
    /// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let page = tokio_uffd::sys::page_size();
    /// let len = 16 * page;
    /// let image: Vec<u8> = (0..len).map(|i| (i / page) as u8).collect();
    /// let source = MemorySource::new(image);
    ///
    /// // Cold, recording.
    /// let (uffd, base) = fresh(len)?;
    /// let handle = Server::new(AsyncUffd::new(uffd)?, SourceHandler::new(source.clone()))
    ///     .regions([Region::new(base..base + len)])?
    ///     .record()
    ///     .spawn();
    /// assert_eq!(program(base, page).await, [3, 4, 9]);
    /// let working_set = handle.working_set().expect("recording");
    /// assert_eq!(handle.shutdown().await?, tokio_uffd::ServerExit::Stopped);
    /// assert_eq!(working_set.pages(), 3);
    ///
    /// // Warm, elsewhere: the three pages are prefetched, the rest filled.
    /// let (uffd, base) = fresh(len)?;
    /// let handle = Server::new(AsyncUffd::new(uffd)?, SourceHandler::new(source))
    ///     .regions([Region::new(base..base + len)])?
    ///     .warm(working_set)?
    ///     .fill(Fill::Unbounded)
    ///     .spawn();
    /// handle.resident().await?;
    /// assert_eq!(program(base, page).await, [3, 4, 9]);
    /// let stats = handle.stats_ref();
    /// handle.shutdown().await?;
    /// let stats = stats.snapshot();
    /// assert_eq!((stats.faults_missing, stats.pages_warmed, stats.pages_filled), (0, 3, 13));
    /// # Ok(())
    /// # }
    /// ```
    pub fn record(mut self) -> Self {
        self.record = true;
        self
    }

    /// Prefetches `working_set`, recorded by an earlier restore of the same
    /// image ([`record`](Self::record)), from the moment the server starts.
    ///
    /// A background task walks the set in recorded order and copies the
    /// pages no one has yet, coalescing contiguous ones into copies of up
    /// to [`background_chunk`](Self::background_chunk) bytes, with at most
    /// [`background_concurrency`](Self::background_concurrency) in flight.
    /// Faults are served on their own path meanwhile: one on a page the
    /// prefetch has not reached is served at once, and counted in
    /// [`StatsSnapshot::faults_ahead_of_prefetch`](crate::StatsSnapshot::faults_ahead_of_prefetch).
    /// Every guarantee of the server holds for prefetched pages: a page
    /// freed by the program (a `Remove`) is never filled with the image
    /// afterwards; `EEXIST`, `EAGAIN`, `Unmap` and `Remap` are handled as
    /// for faults (the prefetch follows a moved region). A prefetch copy
    /// that fails leaves its pages to be served on a fault.
    ///
    /// Call it after [`regions`](Self::regions). Create the userfaultfd
    /// with [`Features::EVENT_REMOVE`](crate::Features::EVENT_REMOVE):
    /// without it the server is not told of pages the program frees
    /// (`MADV_DONTNEED`), and the prefetch, like fault-around, would fill
    /// them with the image again.
    ///
    /// # Errors
    ///
    /// [`Error::WorkingSet`] if the set was recorded for other memory: its
    /// regions (source, offset, length, page size) must be exactly the
    /// server's.
    pub fn warm(mut self, working_set: WorkingSet) -> Result<Self> {
        working_set.match_regions(&self.regions)?;
        self.warm = Some(working_set);
        Ok(self)
    }

    /// Fills every page of every region in the background, after the warm
    /// prefetch if there is one, at the rate `fill` allows, so that the
    /// program runs on without further faults (what Cloud Hypervisor does
    /// after a restore). [`ServerHandle::resident`] waits until every page
    /// is there.
    ///
    /// [`Fill::Unbounded`] and waiting for [`ServerHandle::resident`]
    /// before letting the program run is *eager* population: the baseline
    /// a lazy restore is measured against. As for [`warm`](Self::warm),
    /// ask for [`Features::EVENT_REMOVE`](crate::Features::EVENT_REMOVE) so
    /// that pages the program frees are not filled again.
    pub fn fill(mut self, fill: Fill) -> Self {
        self.fill = Some(fill);
        self
    }

    /// The most warm-prefetch and fill copies in flight at once (default
    /// 2, at least 1). They run outside the fault
    /// [`concurrency`](Self::concurrency) limit, so a fault never waits for
    /// a slot behind them.
    pub fn background_concurrency(mut self, jobs: usize) -> Self {
        self.background_concurrency = jobs.max(1);
        self
    }

    /// The most bytes one warm-prefetch or fill copy covers (default 1 MiB,
    /// at least one page): larger copies cost fewer system calls, but a
    /// fault on a page being copied waits for the whole copy. A source
    /// without [`bytes_at`](crate::PageSource::bytes_at) reads that much
    /// into a buffer per copy in flight.
    pub fn background_chunk(mut self, bytes: usize) -> Self {
        self.background_chunk = bytes;
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
        let recorder = self.recorder();
        let (progress, _) = tokio::sync::watch::channel(restore::Progress::Running);
        let server = self.run_until(stop.clone(), watch, recorder, progress);
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
        let recorder = self.recorder();
        let (progress, resident) = tokio::sync::watch::channel(restore::Progress::Running);
        let filling = self.fill.is_some();
        let task = tokio::spawn(self.run_until(stop.clone(), watch, recorder.clone(), progress));
        ServerHandle {
            stop,
            stats,
            uffd,
            task: Some(task),
            recorder,
            resident: filling.then_some(resident),
        }
    }

    /// The recorder, if recording.
    fn recorder(&self) -> Option<SharedRecorder> {
        self.record
            .then(|| Arc::new(std::sync::Mutex::new(Recorder::new(&self.regions))))
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
        recorder: Option<SharedRecorder>,
        progress: tokio::sync::watch::Sender<restore::Progress>,
    ) -> Result<ServerExit> {
        let watch = watch?;
        // The warm plan names the server's regions in their sorted order
        // (the page map's), checked when it was given.
        let plan = match &self.warm {
            Some(ws) => {
                let map = ws.match_regions(&self.regions)?;
                ws.runs()
                    .iter()
                    .map(|r| crate::working_set::PageRun {
                        region: map[r.region],
                        ..*r
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let restore_config =
            (self.warm.is_some() || self.fill.is_some()).then_some(RestoreConfig {
                plan,
                fill: self.fill,
                concurrency: self.background_concurrency,
                chunk: self.background_chunk,
            });
        let config = Config {
            page_size: self.uffd.page_size(),
            failure: self.failure,
            fork: self.fork,
            retry_timeout: self.retry_timeout,
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            batch: self.batch,
            child_probe: self.child_probe,
        };
        let stream = self.uffd.event_stream_with_batch(self.batch)?;
        let shared = Arc::new(Shared::new(self.uffd, self.handler, self.stats, config));
        let span = trace::server_span(shared.uffd.uffd().as_raw_fd(), self.regions.len(), false);
        let mut reader = Reader::new(
            shared,
            Layout::new(self.regions),
            self.guard_threads,
            stop,
            None,
        );
        reader.watch = watch;
        reader.recorder = recorder;
        if let Some(config) = restore_config {
            let restore = Restore::new(config, &reader.layout, progress, &reader.shared.stats);
            reader.restore = Some(restore);
        }
        trace::in_span(span, reader.run(stream)).await
    }
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
