//! The restore engine on the reader: recording the working set, the warm
//! prefetch of a recorded one, and the background fill.
//!
//! Background jobs are planned on the page map like faults (their pages
//! marked in flight, so a fault there waits for them as for any resolution
//! in flight) and run in tasks of their own, outside the fault concurrency
//! limit: a fault never waits for a permit behind them, and a fault on a
//! page they have not reached is planned and served at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::event::PageFault;
use crate::flags::PageFaultFlags;
use crate::handler::FaultHandler;
use crate::layout::{BitSet, Layout, Region};
use crate::stats::Stats;
use crate::trace;
use crate::working_set::{PageRun, RecordedRegion, WorkingSet};

use super::job::{new_job, Done, Job, JobKind, Run};
use super::reader::Reader;
use super::resolve::{decide_direct, execute};
use super::MAX_RUNS;

/// How fast the background fill may copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fill {
    /// As fast as the copies go (eager population, the baseline of a lazy
    /// restore).
    Unbounded,
    /// At most this many bytes per second, on average.
    BytesPerSecond(u64),
}

/// Where a restore stands, as the handle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Prefetching or filling.
    Running,
    /// Every page of every region is resident, this long after the start.
    Resident(Duration),
    /// The fill walked every region three times and pages are still
    /// missing (their copies failed).
    Incomplete { missing: u64 },
}

/// The working set being recorded: the pages planned for faults, in order,
/// each once.
#[derive(Debug)]
pub(super) struct Recorder {
    seen: Vec<BitSet>,
    set: WorkingSet,
}

impl Recorder {
    pub(super) fn new(regions: &[Region]) -> Self {
        let mut sorted = regions.to_vec();
        sorted.sort_by_key(|r| r.start);
        Self {
            seen: sorted
                .iter()
                .map(|r| BitSet::new(r.len / r.page_size))
                .collect(),
            set: WorkingSet::new(sorted.iter().map(RecordedRegion::of).collect()),
        }
    }

    /// Records pages `first..first + pages` of region `origin`, those not
    /// recorded yet, in order.
    pub(super) fn record(&mut self, origin: usize, first: usize, pages: usize) {
        let Some(seen) = self.seen.get_mut(origin) else {
            return;
        };
        for p in first..first + pages {
            if !seen.get(p) {
                seen.set(p, true);
                self.set.append(origin, p as u64, 1);
            }
        }
    }

    pub(super) fn working_set(&self) -> WorkingSet {
        self.set.clone()
    }
}

/// What the server was asked to do beyond faults, before it starts.
#[derive(Debug, Default)]
pub(super) struct RestoreConfig {
    /// The warm plan: runs naming regions by their index in the server's
    /// sorted table.
    pub(super) plan: Vec<PageRun>,
    pub(super) fill: Option<Fill>,
    pub(super) concurrency: usize,
    pub(super) chunk: usize,
}

/// A page the walk yields: region (by origin), page index, and why.
type Candidate = (usize, usize, JobKind);

/// The reader's restore state.
#[derive(Debug)]
pub(super) struct Restore {
    plan: Vec<PageRun>,
    next_run: usize,
    next_page: u64,
    /// Pages of the plan, per region, for `faults_ahead_of_prefetch`.
    planned: Vec<BitSet>,
    fill: Option<Fill>,
    origin_pages: Vec<usize>,
    fill_origin: usize,
    fill_page: usize,
    fill_passes: u32,
    /// Pages to walk again first (a job planned again after a Remove), in
    /// order.
    requeue: VecDeque<(usize, usize, usize, JobKind)>,
    /// A page the walk yielded that did not fit the job being built.
    pending: Option<Candidate>,
    pub(super) inflight: usize,
    concurrency: usize,
    chunk: usize,
    /// With a bounded fill: no fill job before this.
    next_at: Option<Instant>,
    started: Instant,
    /// The walk found nothing left.
    exhausted: bool,
    /// Resident, or given up on: nothing more to do.
    finished: bool,
    progress: watch::Sender<Progress>,
}

/// How far apart in the plan (in pages) two pages may be and still be
/// gathered into one run: about a copy's worth (a megabyte of base pages).
const GATHER: u64 = 256;

/// The plan's distinct pages in runs of neighbouring pages, and how many
/// pages; marks them in `planned`.
///
/// Threads touch their memory interleaved, so a recording lists the pages
/// of one cluster (a heap, a stack) between those of others: copied in
/// that order, the prefetch would make one small copy per page. So a page
/// next to a run joins it, if the run began at most [`GATHER`] pages
/// earlier in the plan; each run stays where its first page was. Further
/// apart, it starts a run of its own: a long cluster is copied in the
/// order it was touched, a copy's worth at a time, so the prefetch does not
/// copy one thread's whole cluster while another thread waits for its own.
fn coalesce(plan: &[PageRun], planned: &mut [BitSet]) -> (Vec<PageRun>, u64) {
    let mut runs: Vec<PageRun> = Vec::new();
    // Where each run began in the plan.
    let mut began: Vec<u64> = Vec::new();
    // (region, one past its last page) and (region, first page) -> run.
    let mut by_end: HashMap<(usize, u64), usize> = HashMap::new();
    let mut by_start: HashMap<(usize, u64), usize> = HashMap::new();
    let mut distinct = 0;
    for r in plan {
        let region = r.region;
        for p in r.first..r.first + r.pages {
            let Some(bits) = planned.get_mut(region) else {
                break;
            };
            if bits.get(p as usize) {
                continue;
            }
            bits.set(p as usize, true);
            let at = distinct;
            distinct += 1;
            let near = |i: &usize| at - began[*i] <= GATHER;
            if let Some(i) = by_end.get(&(region, p)).copied().filter(near) {
                // Extends run i upwards, and perhaps joins the run after.
                by_end.remove(&(region, p));
                runs[i].pages += 1;
                match by_start.get(&(region, p + 1)).copied().filter(near) {
                    Some(j) => {
                        by_start.remove(&(region, p + 1));
                        let after = runs[j];
                        runs[j].pages = 0;
                        runs[i].pages += after.pages;
                        by_end.insert((region, after.first + after.pages), i);
                    }
                    None => {
                        by_end.insert((region, p + 1), i);
                    }
                }
            } else if let Some(j) = by_start.get(&(region, p + 1)).copied().filter(near) {
                // Extends run j downwards.
                by_start.remove(&(region, p + 1));
                runs[j].first = p;
                runs[j].pages += 1;
                by_start.insert((region, p), j);
            } else {
                by_start.insert((region, p), runs.len());
                by_end.insert((region, p + 1), runs.len());
                began.push(at);
                runs.push(PageRun {
                    region,
                    first: p,
                    pages: 1,
                });
            }
        }
    }
    runs.retain(|r| r.pages > 0);
    (runs, distinct)
}

/// The most passes the fill makes over pages whose copies failed.
const FILL_PASSES: u32 = 3;

impl Restore {
    pub(super) fn new(
        config: RestoreConfig,
        layout: &Layout,
        progress: watch::Sender<Progress>,
        stats: &Stats,
    ) -> Self {
        let origin_pages: Vec<usize> = layout.regions.iter().map(|r| r.pages()).collect();
        let mut planned: Vec<BitSet> = origin_pages.iter().map(|&n| BitSet::new(n)).collect();
        let (plan, distinct) = coalesce(&config.plan, &mut planned);
        Stats::add(&stats.working_set_pages, distinct);
        Self {
            plan,
            next_run: 0,
            next_page: 0,
            planned,
            fill: config.fill,
            origin_pages,
            fill_origin: 0,
            fill_page: 0,
            fill_passes: 1,
            requeue: VecDeque::new(),
            pending: None,
            inflight: 0,
            concurrency: config.concurrency.max(1),
            chunk: config.chunk,
            next_at: None,
            started: Instant::now(),
            exhausted: false,
            finished: false,
            progress,
        }
    }

    /// Whether page `page` of region `origin` is in the warm plan and the
    /// prefetch has not walked past it yet.
    pub(super) fn ahead(&self, origin: usize, page: usize) -> bool {
        self.next_run < self.plan.len() && self.planned.get(origin).is_some_and(|b| b.get(page))
    }

    fn next_candidate(&mut self) -> Option<Candidate> {
        if let Some(c) = self.pending.take() {
            return Some(c);
        }
        if let Some(next) = self.requeue.front_mut() {
            let c = (next.0, next.1, next.3);
            next.1 += 1;
            next.2 -= 1;
            if next.2 == 0 {
                self.requeue.pop_front();
            }
            return Some(c);
        }
        while let Some(run) = self.plan.get(self.next_run) {
            if self.next_page < run.pages {
                let page = (run.first + self.next_page) as usize;
                self.next_page += 1;
                return Some((run.region, page, JobKind::Warm));
            }
            self.next_run += 1;
            self.next_page = 0;
        }
        self.fill?;
        while let Some(&pages) = self.origin_pages.get(self.fill_origin) {
            if self.fill_page < pages {
                self.fill_page += 1;
                return Some((self.fill_origin, self.fill_page - 1, JobKind::Fill));
            }
            self.fill_origin += 1;
            self.fill_page = 0;
        }
        None
    }

    /// When a bounded fill that has room for a job may start it, if that
    /// is later than now.
    pub(super) fn waiting_until(&self) -> Option<Instant> {
        let at = self.next_at?;
        let idle = !self.finished && !self.exhausted && self.inflight < self.concurrency;
        (idle && at > Instant::now()).then_some(at)
    }

    /// Pages `first..first + pages` of region `origin` to walk again.
    pub(super) fn requeue(&mut self, origin: usize, first: usize, pages: usize, kind: JobKind) {
        if pages == 0 {
            return;
        }
        self.exhausted = false;
        if let Some(last) = self.requeue.back_mut() {
            if (last.0, last.1 + last.2, last.3) == (origin, first, kind) {
                last.2 += pages;
                return;
            }
        }
        self.requeue.push_back((origin, first, pages, kind));
    }
}

impl<H: FaultHandler> Reader<H> {
    /// Starts background jobs while there is room and work (and the fill's
    /// rate allows), then checks whether the memory became resident.
    pub(super) fn feed_background(&mut self) {
        while self.start_background_jobs() {}
    }

    /// Starts what can start now; whether another pass of the fill began
    /// (then there is more to start).
    fn start_background_jobs(&mut self) -> bool {
        loop {
            let Some(restore) = &self.restore else {
                return false;
            };
            if self.stopping
                || restore.finished
                || restore.exhausted
                || restore.inflight >= restore.concurrency
                || restore.next_at.is_some_and(|at| Instant::now() < at)
            {
                break;
            }
            let Some(job) = self.next_background_job() else {
                if let Some(r) = &mut self.restore {
                    r.exhausted = true;
                }
                break;
            };
            if let (JobKind::Fill, Some(restore)) = (job.kind, &mut self.restore) {
                if let Some(Fill::BytesPerSecond(rate)) = restore.fill {
                    let now = Instant::now();
                    let at = restore.next_at.map_or(now, |at| at.max(now));
                    let secs = job.buf_len as f64 / rate.max(1) as f64;
                    restore.next_at = Some(at + Duration::from_secs_f64(secs));
                }
            }
            self.spawn_background(job);
        }
        self.check_resident()
    }

    /// The next job of the walk: up to `chunk` bytes of free pages of one
    /// region, in at most `MAX_RUNS` runs, contiguous pages coalesced.
    fn next_background_job(&mut self) -> Option<Box<Job>> {
        let Reader {
            restore,
            layout,
            spare,
            shared,
            ..
        } = self;
        let restore = restore.as_mut()?;
        let generation = shared.gate.as_ref().map_or(0, |g| g.generation());
        let mut job: Option<(Box<Job>, usize)> = None;
        let mut bytes = 0;
        while let Some(c @ (origin, page, kind)) = restore.next_candidate() {
            // Gone (unmapped) or served meanwhile: skip it.
            let Some((ri, idx)) = layout.find_origin(origin, page) else {
                continue;
            };
            let rs = &mut layout.regions[ri];
            if !rs.is_free(idx) {
                continue;
            }
            let region = rs.region;
            let ps = region.page_size;
            let addr = region.start + idx * ps;
            match &mut job {
                None => {
                    let fault = PageFault {
                        address: addr,
                        flags: PageFaultFlags::empty(),
                        thread_id: None,
                    };
                    let mut j = new_job(
                        spare,
                        fault,
                        addr,
                        ps,
                        region.source,
                        Instant::now(),
                        generation,
                    );
                    j.kind = kind;
                    j.runs[0] = Run {
                        addr,
                        len: ps,
                        offset: region.offset + (addr - region.start) as u64,
                        ..Run::default()
                    };
                    j.nruns = 1;
                    job = Some((j, ri));
                }
                Some((j, jri)) => {
                    if *jri != ri || j.kind != kind || bytes + ps > restore.chunk {
                        restore.pending = Some(c);
                        break;
                    }
                    let last = &mut j.runs[j.nruns - 1];
                    if last.addr + last.len == addr {
                        last.len += ps;
                    } else if j.nruns == MAX_RUNS {
                        restore.pending = Some(c);
                        break;
                    } else {
                        j.runs[j.nruns] = Run {
                            addr,
                            len: ps,
                            offset: region.offset + (addr - region.start) as u64,
                            buf_off: bytes,
                            ..Run::default()
                        };
                        j.nruns += 1;
                    }
                }
            }
            rs.inflight.set(idx, true);
            bytes += ps;
        }
        let (mut job, _) = job?;
        job.buf_len = bytes;
        Some(job)
    }

    /// Runs a background job in a task of its own (not under the fault
    /// concurrency limit; the restore's own bounds it).
    pub(super) fn spawn_background(&mut self, mut job: Box<Job>) {
        let Some(restore) = &mut self.restore else {
            return;
        };
        restore.inflight += 1;
        job.counted = true;
        job.detached = true;
        if job.attempt == 0 {
            // Copies straight from the source's bytes where it has them
            // (not again for a job whose bytes went missing: a refetch).
            decide_direct(&self.shared, &mut job);
        }
        // A task even for a copy from memory: a large copy never holds up
        // the reader.
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let outcome = execute(&shared, &mut job).await;
            let _ = tx.send(Done { job, outcome });
        });
    }

    /// Puts the pages of a background job that did not complete back on
    /// the walk (where they are now).
    pub(super) fn requeue_job(&mut self, job: &Job) {
        let Some(restore) = &mut self.restore else {
            return;
        };
        for run in job.runs() {
            let mut addr = run.addr;
            while addr < run.addr + run.len {
                let Some(ri) = self.layout.find(addr) else {
                    addr += job.page_size;
                    continue;
                };
                let rs = &self.layout.regions[ri];
                let idx = rs.page_index(addr);
                restore.requeue(rs.origin, rs.origin_first + idx, 1, job.kind);
                addr += rs.region.page_size;
            }
        }
    }

    /// Once the walk is done and no background job is in flight: resident
    /// if every page is served (or freed), another pass of the fill over
    /// pages whose copies failed, or, after the last pass, incomplete.
    fn check_resident(&mut self) -> bool {
        let Some(restore) = &mut self.restore else {
            return false;
        };
        if restore.finished || !restore.exhausted || restore.inflight > 0 {
            return false;
        }
        if restore.fill.is_none() {
            // The warm prefetch alone: done with the plan.
            restore.finished = true;
            trace::event!(debug, "warm prefetch done");
            return false;
        }
        let (free, inflight) = self
            .layout
            .regions
            .iter()
            .map(|r| r.unsettled())
            .fold((0, 0), |(f, i), (a, b)| (f + a, i + b));
        if free == 0 && inflight == 0 {
            let took = restore.started.elapsed();
            restore.finished = true;
            self.shared.stats.set_resident_after(took);
            let _ = restore.progress.send(Progress::Resident(took));
            trace::event!(debug, after = ?took, "every page is resident");
        } else if free > 0 && restore.fill_passes < FILL_PASSES {
            restore.fill_passes += 1;
            restore.fill_origin = 0;
            restore.fill_page = 0;
            restore.exhausted = false;
            return true;
        } else if free > 0 && inflight == 0 {
            restore.finished = true;
            let _ = restore.progress.send(Progress::Incomplete {
                missing: free as u64,
            });
            trace::event!(
                warn,
                missing = free,
                "background fill gave up: pages are still missing after {FILL_PASSES} passes \
                 (their copies failed; see the last failure)"
            );
        }
        // Otherwise pages are being resolved for faults: checked again when
        // they finish.
        false
    }

    /// The restore's state, and the recorder's working set, for a
    /// background job that finished (`counted` off).
    pub(super) fn background_done(&mut self) {
        if let Some(r) = &mut self.restore {
            r.inflight -= 1;
        }
    }
}

/// Shared between a server's reader and its handle: the recorder, if
/// recording.
pub(super) type SharedRecorder = Arc<Mutex<Recorder>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn run(region: usize, first: u64, pages: u64) -> PageRun {
        PageRun {
            region,
            first,
            pages,
        }
    }

    #[test]
    fn coalesce_gathers_interleaved_clusters_in_first_touch_order() {
        let mut planned = vec![BitSet::new(100), BitSet::new(100)];
        // Two threads: one walks 10.., the other 50.. and region 1; pages
        // repeat; 9 comes after 10 (a run grows downwards), 13 joins 9..13
        // and 14..16.
        let plan = [
            run(0, 10, 1),
            run(0, 50, 1),
            run(0, 11, 1),
            run(1, 7, 2),
            run(0, 51, 1),
            run(0, 14, 2),
            run(0, 12, 1),
            run(0, 10, 1),
            run(0, 9, 1),
            run(0, 13, 1),
        ];
        let (runs, distinct) = coalesce(&plan, &mut planned);
        assert_eq!(runs, [run(0, 9, 7), run(0, 50, 2), run(1, 7, 2)]);
        assert_eq!(distinct, 11);
        assert!(planned[0].get(15) && !planned[0].get(16) && planned[1].get(8));
    }

    #[test]
    fn coalesce_keeps_a_long_cluster_in_touch_order() {
        // Two threads walk two long clusters, 0.. and 2000.., page by page
        // in turns: runs of about GATHER / 2 pages each, alternating.
        let n = 4 * GATHER;
        let plan: Vec<PageRun> = (0..n)
            .flat_map(|i| [run(0, i, 1), run(0, 2000 + i, 1)])
            .collect();
        let mut planned = vec![BitSet::new(3000)];
        let (runs, distinct) = coalesce(&plan, &mut planned);
        assert_eq!(distinct, 2 * n);
        assert!((14..=18).contains(&runs.len()), "{runs:?}");
        assert_eq!(runs[0].first, 0);
        assert_eq!(runs[1].first, 2000);
        assert_eq!(runs[2].first, runs[0].pages);
        assert!(runs.iter().all(|r| r.pages <= GATHER / 2 + 1), "{runs:?}");
    }
}
