//! A whole restore, as a user measures it (issue 13): a 1 GiB image file,
//! the working-set workload of `examples/common/workload.rs` (worker
//! threads that write a word in every page they touch, with think time
//! between touches), and the time until the last worker is done, for each
//! way of getting the pages there:
//!
//! - (a), (b) on demand: the `Server` with an `MmapSource`, fault-around
//!   window 1 or 16;
//! - (c) warm: the server prefetching the working set recorded by a
//!   window-16 restore earlier in the process, and (c') the same from a
//!   window-1 recording. Window 1 records exactly the pages the program
//!   touched, but in the order two threads faulted them, interleaved: a
//!   page per run, so the prefetch copies a few pages per job. Window 16
//!   records aligned 16-page windows, more pages in far fewer runs, which
//!   the prefetch copies in chunks;
//! - (d) warm (window-16 recording), then the background fill of the rest
//!   of the image;
//! - (e) eager: the whole image filled before the workers start;
//! - (f) the kernel's own way: the file mapped `MAP_PRIVATE` and writable,
//!   no userfaultfd (each first write copies the page from the page cache,
//!   what Firecracker's `File` backend does);
//! - (g) the floor: each worker copies its pages of the working set from
//!   the image into fresh memory with `memcpy`, then runs the same
//!   workload on it;
//! - a reference: the file mapped read-only and the pages only read, which
//!   copies nothing (with large folios one fault maps up to 2 MiB): no
//!   copying restore can match it, and a restored program that writes
//!   cannot run on it.
//!
//! Every case maps fresh memory, starts its worker threads before the
//! clock starts (they wait on a barrier), and checks the restored bytes
//! afterwards. The server runs on a multi-thread runtime with 2 workers,
//! built before the clock starts; the clock starts just before the
//! server is spawned (for (f) and the reference, just before the file is
//! mapped; for (g), when the workers are let go).

use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use tokio_uffd::{
    AsyncUffd, Fill, PageSource, Region, Server, SourceHandler, StatsSnapshot, WorkingSet,
};

use super::crate_paths::crate_uffd;
use super::image_file::{FileMap, ImageFile};
use super::memory::{page_size, Mapping};
use super::workload::{run_worker, word_addr, Access, Plan, Spinner, Workload};

/// How the pages of a restore get there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreCase {
    /// (a), (b): on demand, this fault-around window.
    OnDemand(usize),
    /// (c), (c'): warm from the working set recorded at this window.
    Warm(usize),
    /// (d): warm (window-16 recording), then the background fill.
    WarmFill,
    /// (e): eager: every page filled before the workers start.
    Eager,
    /// (f): the file mapped private and writable, no userfaultfd.
    KernelPrivate,
    /// (g): the floor, `memcpy` of each worker's pages, then the workload.
    Floor,
    /// Reference: the file mapped read-only, the pages only read.
    KernelReadOnly,
}

impl RestoreCase {
    /// Every case, in the order of the issue.
    pub const ALL: [RestoreCase; 9] = [
        RestoreCase::OnDemand(1),
        RestoreCase::OnDemand(16),
        RestoreCase::Warm(WARM_WINDOW),
        RestoreCase::Warm(1),
        RestoreCase::WarmFill,
        RestoreCase::Eager,
        RestoreCase::KernelPrivate,
        RestoreCase::Floor,
        RestoreCase::KernelReadOnly,
    ];

    /// Its letter in the issue.
    pub fn letter(self) -> &'static str {
        match self {
            RestoreCase::OnDemand(1) => "a",
            RestoreCase::OnDemand(_) => "b",
            RestoreCase::Warm(WARM_WINDOW) => "c",
            RestoreCase::Warm(_) => "c'",
            RestoreCase::WarmFill => "d",
            RestoreCase::Eager => "e",
            RestoreCase::KernelPrivate => "f",
            RestoreCase::Floor => "g",
            RestoreCase::KernelReadOnly => "ref",
        }
    }

    /// What it is, in a few words.
    pub fn name(self) -> String {
        match self {
            RestoreCase::OnDemand(w) => format!("on demand, window {w} (Server + MmapSource)"),
            RestoreCase::Warm(w) => format!("warm from a window-{w} recording"),
            RestoreCase::WarmFill => {
                format!("warm from a window-{WARM_WINDOW} recording + background fill (unbounded)")
            }
            RestoreCase::Eager => "eager: fill everything, then run".into(),
            RestoreCase::KernelPrivate => {
                "kernel: file mapped MAP_PRIVATE writable, no userfaultfd".into()
            }
            RestoreCase::Floor => "floor: memcpy of the working set, then the workload".into(),
            RestoreCase::KernelReadOnly => {
                "reference: file mapped read-only, pages only read".into()
            }
        }
    }

    /// Whether its faults are the workers' minor faults (no userfaultfd)
    /// rather than the server's.
    pub fn kernel_faults(self) -> bool {
        matches!(
            self,
            RestoreCase::KernelPrivate | RestoreCase::Floor | RestoreCase::KernelReadOnly
        )
    }
}

/// The figures of one restore.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// From the start of the restore to the last worker done.
    pub ready: Duration,
    /// Faults: the server's missing faults, or (see
    /// [`RestoreCase::kernel_faults`]) the workers' minor faults.
    pub faults: u64,
    /// The server's statistics, once it stopped.
    pub stats: Option<StatsSnapshot>,
    /// For the floor, the `memcpy` part (the slower worker's).
    pub copy: Option<Duration>,
}

/// The image of the restore and file cases: 1 GiB.
pub const RESTORE_IMAGE: usize = 1 << 30;

/// The window of the recording that (c) and (d) prefetch.
pub const WARM_WINDOW: usize = 16;

/// The workload's threads, and the runtime's workers: the 2 of the
/// machines these figures are taken on.
pub const THREADS: usize = 2;

/// The settings of the warm prefetch and the fill: the crate's defaults,
/// or, to try its knobs, `TOKIO_UFFD_BENCH_BACKGROUND=JOBS,CHUNK_BYTES`.
#[derive(Debug, Clone, Copy)]
pub struct Background {
    /// `Server::background_concurrency`.
    pub jobs: usize,
    /// `Server::background_chunk`.
    pub chunk: usize,
}

impl Background {
    fn from_env() -> Self {
        let mut b = Background {
            jobs: 2,
            chunk: 1 << 20,
        };
        if let Ok(v) = std::env::var("TOKIO_UFFD_BENCH_BACKGROUND") {
            let mut it = v.split(',').map(|s| s.trim().parse::<usize>());
            match (it.next(), it.next()) {
                (Some(Ok(jobs)), Some(Ok(chunk))) => b = Background { jobs, chunk },
                _ => panic!("TOKIO_UFFD_BENCH_BACKGROUND={v:?}: give JOBS,CHUNK_BYTES"),
            }
        }
        b
    }
}

/// What every restore of a process shares: the image, the workload, the
/// calibrated think time and the recorded working sets.
pub struct RestoreBench {
    image: Arc<ImageFile>,
    workload: Workload,
    spinner: Spinner,
    /// The working sets recorded, by the window of their restore.
    recorded: Vec<(usize, WorkingSet)>,
    /// The warm prefetch's and the fill's settings.
    pub background: Background,
}

impl RestoreBench {
    /// The bench of this process for an image of `len` bytes, made (and
    /// its working set recorded) on first use.
    pub fn shared(len: usize) -> Arc<RestoreBench> {
        static BENCH: OnceLock<Arc<RestoreBench>> = OnceLock::new();
        let bench = BENCH.get_or_init(|| Arc::new(RestoreBench::new(len)));
        assert_eq!(bench.image.len(), len, "one restore image per process");
        bench.clone()
    }

    fn new(len: usize) -> Self {
        let image = ImageFile::shared(len);
        // The floor copies from the image's own mapping: no fault on the
        // source side for anyone.
        image.populate();
        let workload = Workload {
            threads: THREADS,
            access: Access::Write,
            ..Workload::new(len / page_size())
        };
        let mut bench = RestoreBench {
            image,
            workload,
            spinner: Spinner::calibrate(),
            recorded: Vec::new(),
            background: Background::from_env(),
        };
        // The recordings: cold restores of run 0 at either window. The
        // runs measured afterwards are runs 1, 2, ...: each with its own
        // jitter, as the next restores of a program would be.
        for window in [1, WARM_WINDOW] {
            let (set, run) = bench.restore_recording(RestoreCase::OnDemand(window), 0, true);
            let set = set.expect("a working set");
            eprintln!(
                "restore: recorded {} pages ({} MiB) in {} runs at window {window}, with {} \
                 faults in {:.0} ms",
                set.pages(),
                set.bytes() >> 20,
                set.runs().len(),
                run.faults,
                run.ready.as_secs_f64() * 1e3
            );
            bench.recorded.push((window, set));
        }
        bench
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// The working set recorded by the restore at `window`.
    pub fn recorded(&self, window: usize) -> &WorkingSet {
        let found = self.recorded.iter().find(|(w, _)| *w == window);
        &found.expect("a recording at that window").1
    }

    /// What the workers touch in run `run`.
    pub fn plan(&self, run: u64) -> Plan {
        Workload {
            run,
            ..self.workload.clone()
        }
        .plan()
    }

    /// One restore of `case`, the workers running run `run` of the
    /// workload (`run` > 0: run 0 is the recording's).
    pub fn restore(&self, case: RestoreCase, run: u64) -> Restored {
        self.restore_recording(case, run, false).1
    }

    fn restore_recording(
        &self,
        case: RestoreCase,
        run: u64,
        record: bool,
    ) -> (Option<WorkingSet>, Restored) {
        let plan = Arc::new(self.plan(run));
        let page = page_size();
        let len = self.image.len();
        let think = self.workload.think;
        let spinner = self.spinner;
        let access = match case {
            RestoreCase::KernelReadOnly => Access::Read,
            _ => Access::Write,
        };
        match case {
            RestoreCase::KernelPrivate | RestoreCase::KernelReadOnly => {
                let private = case == RestoreCase::KernelPrivate;
                let workers = Workers::start(&plan, move |base, pages| {
                    // SAFETY: `base` is this restore's mapping of the image
                    // (writable for `Access::Write`); each page is touched
                    // by one worker.
                    unsafe { run_worker(base, page, pages, access, think, &spinner) };
                    None
                });
                let t0 = Instant::now();
                let map = if private {
                    FileMap::private_writable(self.image.fd(), len)
                } else {
                    FileMap::new(self.image.fd(), len)
                };
                let out = workers.run(map.addr());
                self.check(map.addr(), &plan);
                (None, out.restored(t0, None))
            }
            RestoreCase::Floor => {
                let mem = Mapping::new(len);
                let image = self.image.clone();
                let workers = Workers::start(&plan, move |base, pages| {
                    let src = image.bytes();
                    for &p in pages {
                        let off = p * page;
                        // SAFETY: page `p` of the fresh mapping at `base`,
                        // written by this worker only.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut((base + off) as *mut u8, page)
                        };
                        dst.copy_from_slice(&src[off..off + page]);
                    }
                    let copied = Instant::now();
                    // SAFETY: the pages were just written by this worker.
                    unsafe { run_worker(base, page, pages, access, think, &spinner) };
                    Some(copied)
                });
                let t0 = Instant::now();
                let out = workers.run(mem.addr);
                self.check(mem.addr, &plan);
                (None, out.restored(t0, None))
            }
            _ => {
                // Faults on demand at the case's window, one page at a time
                // behind a warm prefetch or a fill.
                let window = match case {
                    RestoreCase::OnDemand(w) => w,
                    _ => 1,
                };
                let source = self.image.mmap_source();
                self.serve(source, case, window, run, record, self.background)
            }
        }
    }

    /// One restore of `case` (a case of the server: on demand, warm, fill
    /// or eager) served from `source` with fault-around `window` and the
    /// background copies `background`, the workers running run `run` of the
    /// workload; with `record`, the working set it recorded too.
    pub fn serve(
        &self,
        source: impl PageSource,
        case: RestoreCase,
        window: usize,
        run: u64,
        record: bool,
        background: Background,
    ) -> (Option<WorkingSet>, Restored) {
        assert!(!case.kernel_faults(), "{} is not served", case.name());
        let plan = Arc::new(self.plan(run));
        let len = self.image.len();
        let mem = Mapping::new(len);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let base = mem.addr;
        let uffd = AsyncUffd::new(crate_uffd(&mem)).unwrap();
        let mut server = Server::new(uffd, SourceHandler::new(source))
            .regions([Region::new(base..base + len)])
            .unwrap()
            .prefetch(window)
            .background_concurrency(background.jobs)
            .background_chunk(background.chunk);
        match case {
            RestoreCase::Warm(w) => server = server.warm(self.recorded(w).clone()).unwrap(),
            RestoreCase::WarmFill => {
                server = server.warm(self.recorded(WARM_WINDOW).clone()).unwrap();
            }
            _ => {}
        }
        if matches!(case, RestoreCase::WarmFill | RestoreCase::Eager) {
            server = server.fill(Fill::Unbounded);
        }
        if record {
            server = server.record();
        }
        let workers = self.start_workers(&plan);
        let t0 = Instant::now();
        let handle = server.spawn();
        if case == RestoreCase::Eager {
            rt.block_on(handle.resident()).expect("every page resident");
        }
        let out = workers.run(base);
        let recorded = handle.working_set();
        let stats = handle.stats_ref();
        rt.block_on(handle.shutdown()).expect("the server stopped");
        let stats = stats.snapshot();
        self.check(base, &plan);
        (recorded, out.restored(t0, Some(stats)))
    }

    /// The workers of the workload on `plan`, started and waiting: each
    /// touches its pages of whatever memory it is let go on (see
    /// [`Workers::run`]), which must hold the image's bytes or fault them
    /// in.
    pub(super) fn start_workers(&self, plan: &Arc<Plan>) -> Workers {
        let (think, spinner, access) = (self.workload.think, self.spinner, self.workload.access);
        let page = page_size();
        Workers::start(plan, move |base, pages| {
            // SAFETY: `base` is the restore's memory of the image's length,
            // mapped and writable (registered pages fault in); each page is
            // touched by one worker.
            unsafe { run_worker(base, page, pages, access, think, &spinner) };
            None
        })
    }

    /// The image.
    pub fn image(&self) -> &Arc<ImageFile> {
        &self.image
    }

    /// A fast wrong restore is no restore: every 64th page the workers
    /// touched holds the image's bytes (the workers write back what they
    /// read).
    pub(super) fn check(&self, base: usize, plan: &Plan) {
        let page = page_size();
        let image = self.image.bytes();
        for &p in plan.threads.iter().flatten().step_by(64) {
            // SAFETY: a page the workers touched: resident, readable.
            let got = unsafe { std::slice::from_raw_parts((base + p * page) as *const u8, page) };
            assert!(
                got == &image[p * page..(p + 1) * page],
                "page {p} restored wrong (word {:#x})",
                word_addr(0, page, p)
            );
        }
    }
}

/// The worker threads of one restore, started and waiting.
pub(super) struct Workers {
    go: Arc<Barrier>,
    base: Arc<OnceLock<usize>>,
    threads: Vec<std::thread::JoinHandle<WorkerOut>>,
}

/// What a worker reports.
struct WorkerOut {
    done: Instant,
    minor_faults: u64,
    /// The floor's workers: when their copy was done.
    copied: Option<Instant>,
}

/// The figures of a restore's workers.
pub(super) struct WorkersOut {
    outs: Vec<WorkerOut>,
}

impl Workers {
    /// One thread per list of the plan, each to run `body(base, pages)`
    /// once let go.
    pub(super) fn start<F>(plan: &Arc<Plan>, body: F) -> Self
    where
        F: Fn(usize, &[usize]) -> Option<Instant> + Send + Sync + Clone + 'static,
    {
        let go = Arc::new(Barrier::new(plan.threads.len() + 1));
        let base = Arc::new(OnceLock::new());
        let threads = (0..plan.threads.len())
            .map(|t| {
                let (go, base, plan, body) = (go.clone(), base.clone(), plan.clone(), body.clone());
                std::thread::spawn(move || {
                    go.wait();
                    let base = *base.get().unwrap();
                    let before = minor_faults();
                    let copied = body(base, &plan.threads[t]);
                    WorkerOut {
                        done: Instant::now(),
                        minor_faults: minor_faults() - before,
                        copied,
                    }
                })
            })
            .collect();
        Workers { go, base, threads }
    }

    /// Lets the workers go on the memory at `base` and waits for them.
    pub(super) fn run(self, base: usize) -> WorkersOut {
        self.base.set(base).unwrap();
        self.go.wait();
        WorkersOut {
            outs: self
                .threads
                .into_iter()
                .map(|t| t.join().expect("a worker panicked"))
                .collect(),
        }
    }
}

impl WorkersOut {
    pub(super) fn restored(&self, t0: Instant, stats: Option<StatsSnapshot>) -> Restored {
        let last = |f: &dyn Fn(&WorkerOut) -> Option<Instant>| {
            self.outs.iter().filter_map(f).max().map(|t| t - t0)
        };
        Restored {
            ready: last(&|o| Some(o.done)).unwrap(),
            faults: stats.map_or_else(
                || self.outs.iter().map(|o| o.minor_faults).sum(),
                |s| s.faults_missing,
            ),
            stats,
            copy: last(&|o| o.copied),
        }
    }
}

/// The calling thread's minor faults so far (`getrusage(RUSAGE_THREAD)`).
fn minor_faults() -> u64 {
    // SAFETY: rusage is plain data, filled by the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage of the calling thread into our struct.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt as u64
}
