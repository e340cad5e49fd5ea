//! Planning a fault on the page map: duplicates, freed pages, the
//! fault-around window; and starting its job.

use std::future::Future;
use std::task::Poll;
use std::time::Instant;

use crate::error::Result;
use crate::event::{FaultKind, PageFault};
use crate::handler::{FaultHandler, Resolution};
use crate::layout::SourceId;
use crate::stats::Stats;
use crate::trace;

use super::job::{new_job, Done, Job, Run};
use super::policy::ServerExit;
use super::reader::Reader;
use super::resolve::{apply_and_account, decide_direct, execute};
use super::{MAX_RUNS, MAX_WINDOW_BYTES};

impl<H: FaultHandler> Reader<H> {
    pub(super) async fn on_fault(&mut self, fault: PageFault) -> Result<Option<ServerExit>> {
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
        if self
            .batch_gone
            .iter()
            .any(|&(s, e)| fault.address >= s && fault.address < e)
            && self.layout.find(fault.address).is_none()
        {
            // Raised before an Unmap or Remap of its batch took its page
            // away: not a fault on whatever is there now. Woken, the thread
            // faults again (or finds the memory gone).
            let page = fault.page_start(self.shared.config.page_size);
            let _ = self.shared.uffd.wake(page, self.shared.config.page_size);
            return Ok(None);
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
    pub(super) async fn start(&mut self, mut job: Box<Job>) -> Result<Option<ServerExit>> {
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
        let permit = self.take_slot().await;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut done = work.await;
            done.job.detached = true;
            done.job.watch = watch;
            done.job.counted = true;
            drop(permit);
            let _ = tx.send(done);
        });
        Ok(None)
    }

    /// Decides what to resolve for `fault`; `None` for a duplicate.
    pub(super) fn plan(&mut self, fault: PageFault, read_at: Instant) -> Option<Box<Job>> {
        let base = self.shared.config.page_size;
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
            self.shared
                .config
                .prefetch
                .min(MAX_WINDOW_BYTES / ps)
                .max(1)
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
        let (origin, first) = (rs.origin, rs.origin_first);
        if missing {
            if self
                .restore
                .as_ref()
                .is_some_and(|r| r.ahead(origin, first + idx))
            {
                Stats::add(&self.shared.stats.faults_ahead_of_prefetch, 1);
            }
            if let Some(recorder) = &self.recorder {
                // The pages planned for the fault, the faulting page's run
                // first: what this restore needed, in the order it did.
                let mut recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
                for run in job.runs() {
                    let s = (run.addr - region.start) / ps;
                    recorder.record(origin, first + s, run.len / ps);
                }
            }
        }
        Some(job)
    }

    /// Marks the pages of `job` no longer in flight, and served where
    /// `served` and the run was resolved.
    pub(super) fn settle(&mut self, job: &Job, served: bool) {
        for run in job.runs() {
            let mut addr = run.addr;
            while addr < run.addr + run.len {
                let Some(ri) = self.layout.find(addr) else {
                    // Only a page still in flight: one unmapped or moved
                    // meanwhile (or a region's page whose region went) is
                    // not marked served where it no longer is.
                    let ours = self.loose.take_inflight(addr);
                    let resolved = run.resolution.is_some_and(|r| r != Resolution::Poison);
                    if ours && served && (job.zero_fill || resolved && !self.loose.is_removed(addr))
                    {
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
}
