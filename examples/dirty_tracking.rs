//! Dirty-page tracking with write protection: the basis of incremental
//! snapshots and pre-copy live migration. Two methods:
//!
//! - **synchronous write-protect faults** (default): a populated region is
//!   write-protected. Each first write to a protected page raises a
//!   write-protect fault, which the tracker (a task reading the
//!   `EventStream`) records as dirty before removing the protection, so the
//!   write lands. At the end of each interval the writers pause, the
//!   tracker hands over the dirty set and protects the region again.
//! - **`--async`**: [`DirtyTracker`] (`WP_ASYNC`, Linux 6.7+): the kernel
//!   resolves write-protect faults itself and only marks the page written;
//!   each round one `PAGEMAP_SCAN` pass reports the written pages and
//!   protects them again. No fault reaches user space.
//!
//! Writer threads write to pages (random ones with `--writes`, or exactly
//! `--percent` of the pages, distinct, per interval). Each interval's dirty
//! set is checked against the pages really written: any page missing or
//! extra is named and the example exits non-zero. The same writes are
//! first made without tracking (a baseline pass), so the writer slowdown
//! printed at the end is measured in this run: the writers' time per page
//! write with tracking divided by the time without.
//!
//! ```text
//! cargo run --release --example dirty_tracking -- --pages 4096 --writers 2 --intervals 5
//! cargo run --release --example dirty_tracking -- --async --pages 65536 --percent 10
//! ```

mod common;

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use common::{write_at, LogArgs, Mapping, Rng};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_uffd::{
    AsyncUffd, DirtyTracker, ErrorKind, Event, FaultKind, Features, RegisterMode, UffdBuilder,
    UnprotectFlags,
};

/// Tracks dirty pages with userfaultfd write protection (synchronous
/// faults, or with --async the kernel's WP_ASYNC and PAGEMAP_SCAN) and
/// checks each interval's dirty set against the pages really written.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Size of the tracked region in pages
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pages: u64,
    /// Writer threads
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_THREADS))]
    writers: u64,
    /// Tracking intervals (rounds)
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    intervals: u64,
    /// Writes per writer per interval, to random pages
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    writes: u64,
    /// Instead of --writes: write exactly this percentage of the pages
    /// (distinct, at least one) per interval, shared among the writers
    #[arg(long, value_name = "P", conflicts_with = "writes",
          value_parser = clap::value_parser!(u64).range(1..=100))]
    percent: Option<u64>,
    /// Track with asynchronous write protection and PAGEMAP_SCAN
    /// (DirtyTracker, Linux 6.7+) instead of synchronous write-protect faults
    #[arg(long = "async")]
    use_async: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing(args.log);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Snapshot = oneshot::Sender<tokio_uffd::Result<BTreeSet<usize>>>;

/// The pages each writer writes in one interval, the same sequence for the
/// baseline pass and the tracked pass.
struct Plan {
    pages: usize,
    writers: usize,
    writes: usize,
    percent: Option<usize>,
    rngs: Vec<Rng>,
    order: Vec<usize>,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let pages = args.pages as usize;
        let writers = args.writers as usize;
        Self {
            pages,
            writers,
            writes: args.writes as usize,
            percent: args.percent.map(|p| p as usize),
            rngs: (0..writers).map(|w| Rng::new(w as u64 + 7)).collect(),
            order: (0..pages).collect(),
        }
    }

    /// The next interval's page lists, one per writer.
    fn next(&mut self) -> Vec<Vec<usize>> {
        match self.percent {
            None => self
                .rngs
                .iter_mut()
                .map(|rng| (0..self.writes).map(|_| rng.below(self.pages)).collect())
                .collect(),
            Some(pct) => {
                let n = (self.pages * pct / 100).max(1);
                // A partial Fisher-Yates shuffle: `n` distinct pages.
                let rng = &mut self.rngs[0];
                for i in 0..n {
                    let j = i + rng.below(self.pages - i);
                    self.order.swap(i, j);
                }
                let mut lists = vec![Vec::with_capacity(n / self.writers + 1); self.writers];
                for (k, &p) in self.order[..n].iter().enumerate() {
                    lists[k % self.writers].push(p);
                }
                lists
            }
        }
    }
}

/// Writer threads that write their page lists when told, timing only the
/// writes themselves.
struct Writers {
    start: Arc<Barrier>,
    plans: Arc<Mutex<Vec<Vec<usize>>>>,
    /// Per writer: time spent writing and writes made, this interval.
    spent: Arc<Mutex<Vec<(Duration, usize)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn spawn(n: usize, rounds: usize, base: usize, page: usize) -> std::io::Result<Self> {
        let start = Arc::new(Barrier::new(n + 1));
        let plans = Arc::new(Mutex::new(vec![Vec::new(); n]));
        let spent = Arc::new(Mutex::new(vec![(Duration::ZERO, 0); n]));
        let threads = (0..n)
            .map(|w| {
                let (start, plans, spent) = (start.clone(), plans.clone(), spent.clone());
                std::thread::Builder::new().spawn(move || {
                    for r in 0..rounds {
                        start.wait(); // interval starts
                        let mine = std::mem::take(&mut plans.lock().unwrap()[w]);
                        let t = Instant::now();
                        for &p in &mine {
                            write_at(base + p * page + w, r as u8 + 1);
                        }
                        let d = t.elapsed();
                        spent.lock().unwrap()[w] = (d, mine.len());
                        start.wait(); // interval ends
                    }
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            start,
            plans,
            spent,
            threads,
        })
    }

    /// Runs one interval: every writer writes its list. Returns the
    /// interval's wall time and the writers' summed write time and writes.
    fn interval(&self, lists: Vec<Vec<usize>>) -> (Duration, Duration, usize) {
        *self.plans.lock().unwrap() = lists;
        let t = Instant::now();
        self.start.wait();
        self.start.wait();
        let wall = t.elapsed();
        let spent = self.spent.lock().unwrap();
        let busy = spent.iter().map(|s| s.0).sum();
        let writes = spent.iter().map(|s| s.1).sum();
        (wall, busy, writes)
    }

    fn join(self) -> Result<(), &'static str> {
        for t in self.threads {
            t.join().map_err(|_| "a writer panicked")?;
        }
        Ok(())
    }
}

/// The tracking side of either method.
enum Tracker {
    Sync {
        rt: tokio::runtime::Runtime,
        requests: mpsc::Sender<Snapshot>,
        task: tokio::task::JoinHandle<tokio_uffd::Result<()>>,
    },
    Async {
        tracker: DirtyTracker,
        base: usize,
        page: usize,
    },
}

impl Tracker {
    /// The pages written since the previous round, as page indices; the
    /// region is protected again.
    fn round(&mut self) -> Result<BTreeSet<usize>, Box<dyn std::error::Error>> {
        match self {
            Tracker::Sync { rt, requests, .. } => {
                let (tx, rx) = oneshot::channel();
                Ok(rt.block_on(async {
                    requests.send(tx).await.map_err(|_| "the tracker stopped")?;
                    rx.await
                        .map_err(|_| "the tracker stopped")?
                        .map_err(|e| e.to_string())
                })?)
            }
            Tracker::Async {
                tracker,
                base,
                page,
            } => {
                let (base, page) = (*base, *page);
                Ok(tracker
                    .round()?
                    .iter()
                    .flat_map(|r| (r.start - base) / page..(r.end - base) / page)
                    .collect())
            }
        }
    }

    fn finish(self) -> Result<(), Box<dyn std::error::Error>> {
        if let Tracker::Sync { rt, requests, task } = self {
            drop(requests);
            rt.block_on(task)??;
        }
        Ok(())
    }
}

/// Per page write, in nanoseconds.
fn per_write(busy: Duration, writes: usize) -> f64 {
    busy.as_secs_f64() * 1e9 / writes.max(1) as f64
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let pages = args.pages as usize;
    let writers = args.writers as usize;
    let intervals = args.intervals as usize;

    // The tracker's userfaultfd first: a kernel without the method fails
    // before any work.
    let (sync_uffd, async_tracker) = if args.use_async {
        match DirtyTracker::new() {
            Ok(t) => (None, Some(t)),
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                return Err(format!(
                    "--async needs asynchronous write protection (UFFD_FEATURE_WP_ASYNC, \
                     Linux 6.7 or later), which this kernel does not offer: {e}"
                )
                .into())
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        let uffd = UffdBuilder::new()
            .require(Features::PAGEFAULT_FLAG_WP)
            .create()?;
        (Some(uffd), None)
    };
    let page = match (&sync_uffd, &async_tracker) {
        (Some(u), _) => u.page_size(),
        (_, Some(t)) => t.uffd().page_size(),
        _ => unreachable!("one method is chosen"),
    };
    let len = pages * page;
    let mem = Mapping::anon(len)?;
    let base = mem.addr;
    // Populate every page.
    for p in 0..pages {
        write_at(base + p * page, 0);
    }

    let workers = Writers::spawn(writers, 2 * intervals, base, page)?;

    // Baseline: the same writes, untracked.
    let mut plan = Plan::new(args);
    let (mut base_busy, mut base_writes) = (Duration::ZERO, 0);
    for _ in 0..intervals {
        let (_, busy, writes) = workers.interval(plan.next());
        base_busy += busy;
        base_writes += writes;
    }

    let mut tracker = if let Some(mut tracker) = async_tracker {
        // SAFETY: the mapping is ours and fully populated; with WP_ASYNC no
        // thread ever waits on it and nothing else relies on its protection.
        match unsafe { tracker.track(base, len) } {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                return Err(format!(
                    "--async: this kernel cannot write-protect the region asynchronously: {e}"
                )
                .into())
            }
            Err(e) => return Err(e.into()),
        }
        Tracker::Async {
            tracker,
            base,
            page,
        }
    } else {
        let uffd = sync_uffd.expect("made above");
        // SAFETY: the mapping is ours and fully populated; write-protect
        // faults only delay writers until the tracker unprotects the page.
        unsafe { uffd.register(base, len, RegisterMode::WP)? };
        uffd.write_protect(base, len)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let uffd = rt.block_on(async { AsyncUffd::new(uffd) })?;
        let (requests, snap_rx) = mpsc::channel::<Snapshot>(1);
        let task = rt.spawn(track(uffd, base, len, snap_rx));
        Tracker::Sync { rt, requests, task }
    };

    let mut plan = Plan::new(args);
    let mut ok = true;
    let (mut busy_sum, mut writes_sum) = (Duration::ZERO, 0);
    let (mut active, mut scan_sum, mut scan_max) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut dirty_sum = 0;
    for i in 0..intervals {
        let lists = plan.next();
        let truth: BTreeSet<usize> = lists.iter().flatten().copied().collect();
        let (wall, busy, writes) = workers.interval(lists);
        busy_sum += busy;
        writes_sum += writes;
        let t = Instant::now();
        let dirty = tracker.round()?;
        let scan = t.elapsed();
        active += wall + scan;
        scan_sum += scan;
        scan_max = scan_max.max(scan);
        dirty_sum += dirty.len();
        let head: Vec<_> = dirty.iter().take(8).collect();
        println!(
            "interval {}: {} dirty pages of {pages} (first: {head:?}), round {:.1} us{}",
            i + 1,
            dirty.len(),
            scan.as_secs_f64() * 1e6,
            if dirty == truth { "" } else { "  MISMATCH" }
        );
        if dirty != truth {
            ok = false;
            let missed: Vec<_> = truth.difference(&dirty).take(8).collect();
            let extra: Vec<_> = dirty.difference(&truth).take(8).collect();
            eprintln!(
                "  interval {}: written but not tracked: pages {missed:?}; tracked but not written: pages {extra:?}",
                i + 1
            );
        }
    }
    workers.join()?;
    tracker.finish()?;
    if !ok {
        return Err("the tracked dirty sets differ from what was written".into());
    }
    println!(
        "every interval's dirty set matched the pages written exactly ({intervals} rounds, {dirty_sum} dirty pages)"
    );
    let method = if args.use_async {
        "async (WP_ASYNC + PAGEMAP_SCAN)"
    } else {
        "sync (write-protect faults)"
    };
    println!(
        "{method}: {pages} pages ({:.1} MiB), {writers} writer(s), {:.2}% of pages dirty per round on average",
        len as f64 / (1 << 20) as f64,
        dirty_sum as f64 * 100.0 / (intervals * pages) as f64
    );
    println!(
        "  rounds: {intervals} in {:.3} s of writing and scanning = {:.1} rounds/s",
        active.as_secs_f64(),
        intervals as f64 / active.as_secs_f64().max(1e-9)
    );
    println!(
        "  round (scan and re-protect) time: mean {:.1} us, max {:.1} us",
        scan_sum.as_secs_f64() * 1e6 / intervals as f64,
        scan_max.as_secs_f64() * 1e6
    );
    let (untracked, tracked) = (
        per_write(base_busy, base_writes),
        per_write(busy_sum, writes_sum),
    );
    println!(
        "  writer: {untracked:.1} ns per page write untracked, {tracked:.1} ns tracked ({writes_sum} writes each): slowdown {:.2}x",
        tracked / untracked.max(1e-9)
    );
    Ok(())
}

/// Records write-protect faults as dirty pages and unprotects them; on a
/// snapshot request, hands over the dirty set and protects everything
/// again.
async fn track(
    uffd: AsyncUffd,
    base: usize,
    len: usize,
    mut requests: mpsc::Receiver<Snapshot>,
) -> tokio_uffd::Result<()> {
    let page = uffd.page_size();
    let mut events = uffd.event_stream()?;
    let mut dirty = BTreeSet::new();
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                if let Event::PageFault(f) = event? {
                    if f.kind() == FaultKind::WriteProtect {
                        let start = f.page_start(page);
                        dirty.insert((start - base) / page);
                        uffd.write_unprotect(start, page, UnprotectFlags::empty())?;
                    }
                }
            }
            request = requests.recv() => {
                let Some(reply) = request else { break };
                // Writers are paused: protect the whole region again.
                let result = uffd.write_protect(base, len).map(|()| std::mem::take(&mut dirty));
                let _ = reply.send(result);
            }
        }
    }
    Ok(())
}
