//! What the reader does with a finished job: settle it, park it, plan
//! it again, retry it, or apply the failure policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, FailureAction, Result};
use crate::flags::{Features, PoisonFlags};
use crate::handler::{FaultHandler, Resolution};
use crate::stats::Stats;
use crate::trace;

use super::job::{failure, Cause, Done, Job, Outcome, Run, ServeError};
use super::policy::{FailurePolicy, ServerExit};
use super::reader::Reader;
use super::resolve::{apply_and_account, decide_direct, execute};

impl<H: FaultHandler> Reader<H> {
    pub(super) async fn finish(&mut self, done: Done) -> Result<Option<ServerExit>> {
        let Done { mut job, outcome } = done;
        if job.counted {
            job.counted = false;
            if job.kind.is_background() {
                self.background_done();
            } else {
                self.inflight -= 1;
            }
        }
        if job.kind.is_background() {
            return Ok(self.finish_background(job, outcome));
        }
        let retrying = match &outcome {
            Outcome::Park | Outcome::Refetch => true,
            Outcome::Failed { .. } => matches!(
                self.shared.config.failure,
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
                self.wake_detached(&job);
                self.recycle(job);
            }
            Outcome::Park => {
                if job.deadline.is_none() {
                    trace::event!(
                        debug,
                        addr = %format_args!("{:#x}", job.page),
                        "parked: the address space is changing (EAGAIN); reading events and retrying"
                    );
                    job.deadline = Some(Instant::now() + self.shared.config.retry_timeout);
                }
                job.detached = true;
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
            Outcome::Refetch => {
                // Fetched through the handler's `fault` in a task; the
                // runs applied already stay applied.
                self.respawn(job, Duration::ZERO, false).await;
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
                if let FailurePolicy::Retry { attempts, backoff } = self.shared.config.failure {
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
                        self.respawn(job, backoff, true).await;
                        return Ok(None);
                    }
                }
                return self.fail(job, run, cause);
            }
        }
        Ok(None)
    }

    /// A warm-prefetch or fill job: no thread waits on it, so a failure
    /// only leaves its pages missing (a fault there later is served, or
    /// fails, on its own), and no page is ever poisoned for it.
    fn finish_background(&mut self, mut job: Box<Job>, outcome: Outcome) -> Option<ServerExit> {
        let wake = |reader: &Self, job: &Job| {
            // Faults on its pages were taken for duplicates of it.
            let (lo, hi) = job.span();
            let _ = reader.shared.uffd.wake(lo, hi - lo);
        };
        match outcome {
            Outcome::Resolved => {
                self.settle(&job, true);
                self.wake_detached(&job);
            }
            Outcome::Park => {
                if job.deadline.is_none() {
                    job.deadline = Some(Instant::now() + self.shared.config.retry_timeout);
                }
                self.parked.push(job);
                return None;
            }
            Outcome::Replan => {
                // A Remove overlapped it: walk its pages again (the freed
                // ones are skipped now).
                self.settle(&job, false);
                wake(self, &job);
                self.requeue_job(&job);
            }
            Outcome::Refetch => {
                job.attempt += 1;
                self.spawn_background(job);
                return None;
            }
            Outcome::Gone => {
                self.settle(&job, false);
                wake(self, &job);
            }
            Outcome::Exited => {
                self.settle(&job, false);
                return Some(ServerExit::ProcessExited);
            }
            Outcome::Failed { run, cause } => {
                self.settle(&job, false);
                wake(self, &job);
                Stats::add(&self.shared.stats.background_failures, 1);
                let failure = failure(&job, run, cause, FailureAction::Dropped);
                trace::report_failure(&failure);
                self.shared.stats.record_failure(&failure);
            }
        }
        self.recycle(job);
        None
    }

    /// Wakes the span of a resolved job that left the reader before it was
    /// settled. Its pages were marked in flight until now, so a fault
    /// raised on one meanwhile was taken for a duplicate of it; but the job
    /// had woken its waiters when it applied, and a page faulted on after
    /// that was freed again since (a `MADV_DONTNEED` between the copy and
    /// now; its `Remove` read, or not reported at all). Woken, such a
    /// thread faults again and is served from the page map as it is now.
    /// A job applied on the reader itself had no such gap.
    fn wake_detached(&self, job: &Job) {
        if job.detached {
            let (lo, hi) = job.span();
            let _ = self.shared.uffd.wake(lo, hi - lo);
        }
    }

    /// Runs `job` again in a task, after `backoff`; `redecide` asks the
    /// handler's `bytes_for` again first.
    pub(super) async fn respawn(&mut self, mut job: Box<Job>, backoff: Duration, redecide: bool) {
        let permit = self.take_slot().await;
        job.detached = true;
        if redecide {
            decide_direct(&self.shared, &mut job);
        }
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
    pub(super) fn fail(
        &mut self,
        mut job: Box<Job>,
        run: usize,
        cause: Cause,
    ) -> Result<Option<ServerExit>> {
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
        if self.shared.config.failure == FailurePolicy::Stop {
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
                job.deadline = Some(Instant::now() + self.shared.config.retry_timeout);
                self.mark_inflight(&job);
                self.watch(&mut job);
                job.detached = true;
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
    pub(super) fn recycle(&mut self, job: Box<Job>) {
        if self.spare.len() < self.shared.config.concurrency {
            self.spare.push(job);
        }
    }

    pub(super) fn mark_inflight(&mut self, job: &Job) {
        if let Some(ri) = self.layout.find(job.page) {
            let rs = &mut self.layout.regions[ri];
            let idx = rs.page_index(job.page);
            rs.inflight.set(idx, true);
        } else {
            self.loose.set_inflight(job.page, true);
        }
    }

    pub(super) async fn retry_parked(&mut self) -> Result<Option<ServerExit>> {
        if self.parked.is_empty() {
            return Ok(None);
        }
        let now = Instant::now();
        for mut job in std::mem::take(&mut self.parked) {
            let outcome = apply_and_account(&self.shared, &mut job);
            match outcome {
                Outcome::Park if job.deadline.is_some_and(|d| now > d) => {
                    let cause: Cause =
                        Arc::new(ServeError::KeptChanging(self.shared.config.retry_timeout));
                    if job.kind.is_background() {
                        let failed = Outcome::Failed { run: 0, cause };
                        if let Some(exit) = self.finish_background(job, failed) {
                            return Ok(Some(exit));
                        }
                        continue;
                    }
                    if job.runs[0].resolution == Some(Resolution::Poison) {
                        // Even poisoning cannot get through: give up on it,
                        // and wake whoever waits there (their faults were
                        // taken for duplicates of it) to fault again.
                        self.unwatch(&mut job);
                        self.settle(&job, false);
                        let _ = self.shared.uffd.wake(job.page, job.page_size);
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use nix::sys::mman::{self, MapFlags, ProtFlags};

    use super::*;
    use crate::asyncfd::AsyncUffd;
    use crate::event::{Event, EventBuffer};
    use crate::handler::{FaultRequest, HandlerError};
    use crate::layout::{checked_regions, Layout, Region, SourceId};
    use crate::server::job::new_job;
    use crate::server::policy::ForkPolicy;
    use crate::server::reader::Reader;
    use crate::server::shared::{Config, Shared};
    use crate::server::stop::StopSignal;
    use crate::{RegisterMode, Uffd, ZeropageFlags};

    struct Zeros;

    impl FaultHandler for Zeros {
        async fn fault<'a>(
            &'a self,
            _req: &'a FaultRequest,
            _buf: &'a mut [u8],
        ) -> std::result::Result<Resolution, HandlerError> {
            Ok(Resolution::Zero)
        }
    }

    /// The next page fault on `uffd`, waiting at most `within`.
    fn next_fault(uffd: &Uffd, within: Duration) -> Option<crate::PageFault> {
        let mut buf = EventBuffer::new(4);
        if !uffd.wait_readable(Some(within)).unwrap() {
            return None;
        }
        uffd.read_events(&mut buf).unwrap();
        match buf.next_event() {
            Some(Ok(Event::PageFault(f))) => Some(f),
            other => panic!("expected a page fault, got {other:?}"),
        }
    }

    /// The state the race leaves (see `wake_detached`): a job ran in a task
    /// and applied its copy, the page was freed again, and the fault of a
    /// thread touching it was taken for a duplicate of the job, still in
    /// flight on the page map. Settling the job must wake that thread, to
    /// fault again; asleep, nothing would ever wake it.
    #[test]
    fn settling_a_detached_job_wakes_faults_taken_for_its_duplicates() {
        let uffd = Uffd::new().expect("a userfaultfd");
        let page = uffd.page_size();
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        let size = std::num::NonZeroUsize::new(page).unwrap();
        // SAFETY: a fresh anonymous mapping, touched only by this test.
        let mem = unsafe { mman::mmap_anonymous(None, size, prot, MapFlags::MAP_PRIVATE) }.unwrap();
        let addr = mem.as_ptr() as usize;
        // SAFETY: the mapping is this test's; only it resolves the faults.
        unsafe { uffd.register(addr, page, RegisterMode::MISSING) }.unwrap();
        let reader_fd = uffd.as_fd().try_clone_to_owned().unwrap();
        // SAFETY: the page is registered; the read sleeps until resolved.
        let toucher =
            std::thread::spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) });
        // The test reads the fault itself: the thread sleeps on the page.
        let fault = next_fault(&uffd, Duration::from_secs(20)).expect("the first fault");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let watcher = Uffd::from_fd(reader_fd).unwrap();
            let config = Config {
                page_size: page,
                failure: crate::FailurePolicy::Poison,
                fork: ForkPolicy::Serve,
                retry_timeout: Duration::from_secs(10),
                prefetch: 1,
                concurrency: 1,
                batch: 16,
                child_probe: Duration::from_secs(1),
            };
            let shared = Shared::new(
                AsyncUffd::new(uffd).unwrap(),
                Arc::new(Zeros),
                Arc::new(Stats::new()),
                config,
            );
            let regions = checked_regions([Region::new(addr..addr + page)], page).unwrap();
            let mut reader = Reader::new(
                Arc::new(shared),
                Layout::new(regions),
                [],
                Arc::new(StopSignal::default()),
                None,
            );
            // A job for the page, in flight on the page map, applied in a
            // task (its copy long gone).
            let mut spare = Vec::new();
            let mut job = new_job(
                &mut spare,
                fault,
                addr,
                page,
                SourceId::default(),
                Instant::now(),
                0,
            );
            job.runs[0] = Run {
                addr,
                len: page,
                resolution: Some(Resolution::Copy),
                done: page,
                ..Run::default()
            };
            job.nruns = 1;
            job.detached = true;
            reader.mark_inflight(&job);
            let exit = reader
                .finish(Done {
                    job,
                    outcome: Outcome::Resolved,
                })
                .await
                .unwrap();
            assert!(exit.is_none());
            // Woken, the thread faults again on the still missing page.
            let again = next_fault(&watcher, Duration::from_secs(20));
            assert_eq!(
                again.map(|f| f.page_start(page)),
                Some(addr),
                "the thread taken for a duplicate was left asleep"
            );
            watcher
                .zeropage(addr, page, ZeropageFlags::empty())
                .unwrap();
        });
        assert_eq!(toucher.join().unwrap(), 0);
        // SAFETY: the test's own mapping; the thread that touched it ended.
        unsafe { mman::munmap(mem, page) }.unwrap();
    }
}
