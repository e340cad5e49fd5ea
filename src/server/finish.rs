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
            Outcome::Resolved => self.settle(&job, true),
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

    /// Runs `job` again in a task, after `backoff`; `redecide` asks the
    /// handler's `bytes_for` again first.
    pub(super) async fn respawn(&mut self, mut job: Box<Job>, backoff: Duration, redecide: bool) {
        let permit = self.take_slot().await;
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
