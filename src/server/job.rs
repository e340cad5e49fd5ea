//! A fault and the runs of pages resolved for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, FailureAction, FaultFailure};
use crate::event::PageFault;
use crate::handler::Resolution;
use crate::layout::SourceId;

use super::MAX_RUNS;

/// A contiguous run of pages resolved together.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Run {
    pub(super) addr: usize,
    pub(super) len: usize,
    /// Offset of `addr` in the page source.
    pub(super) offset: u64,
    /// Where the run's bytes start in the job's buffer.
    pub(super) buf_off: usize,
    pub(super) resolution: Option<Resolution>,
    /// Copy straight from the handler's `bytes_for`, not from the buffer.
    pub(super) direct: bool,
    /// Bytes applied so far.
    pub(super) done: usize,
}

/// Why a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobKind {
    /// A thread faulted.
    Fault,
    /// The warm prefetch of a working set.
    Warm,
    /// The background fill.
    Fill,
}

impl JobKind {
    /// Whether no thread waits on the job.
    pub(super) fn is_background(self) -> bool {
        self != JobKind::Fault
    }
}

/// One fault and the runs resolved for it. Run 0 holds the faulting page;
/// the others are prefetched around it.
pub(super) struct Job {
    pub(super) fault: PageFault,
    pub(super) page: usize,
    pub(super) page_size: usize,
    pub(super) source: SourceId,
    pub(super) read_at: Instant,
    pub(super) runs: [Run; MAX_RUNS],
    pub(super) nruns: usize,
    pub(super) buf: Vec<u8>,
    /// Bytes of buffer the runs need, taken only when a handler fills one.
    pub(super) buf_len: usize,
    pub(super) attempt: u32,
    /// Set once the handler has decided every run.
    pub(super) decided: bool,
    /// When an `EAGAIN` park gives up.
    pub(super) deadline: Option<Instant>,
    /// Pages served as zeros because they were removed (no handler).
    pub(super) zero_fill: bool,
    /// Whether the job counts in the reader's `inflight`.
    pub(super) counted: bool,
    /// The removal generation the job was planned in.
    pub(super) generation: u64,
    /// Bytes found already there (`EEXIST`): not served by this job.
    pub(super) existed: usize,
    /// Its entry on the stall board while it waits in a task or parked.
    pub(super) watch: Option<u64>,
    pub(super) kind: JobKind,
    /// The job left the reader (ran in a task, or was parked) before it
    /// was settled: see [`Reader::finish`](super::reader::Reader).
    pub(super) detached: bool,
}

impl Job {
    pub(super) fn runs(&self) -> &[Run] {
        &self.runs[..self.nruns]
    }

    /// The lowest and highest byte of every run.
    pub(super) fn span(&self) -> (usize, usize) {
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
    pub(super) fn bytes(&self) -> usize {
        self.runs()
            .iter()
            .filter(|r| r.resolution.is_some())
            .map(|r| r.len)
            .sum::<usize>()
            - self.existed
    }
}

/// Why a job did not resolve.
pub(super) enum Outcome {
    Resolved,
    Park,
    Gone,
    Exited,
    /// A Remove overlapping the job was read while it was in flight: plan
    /// the fault again.
    Replan,
    /// The handler no longer had in memory the bytes it had offered for a
    /// run (`bytes_for`): fetch that run through its `fault` method and go
    /// on from where the job stopped.
    Refetch,
    /// Run `run` of the job failed.
    Failed {
        run: usize,
        cause: Cause,
    },
}

/// The cause of a failure to serve, kept whole (with its own `source()`).
pub(super) type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Failures the server itself finds, as causes of a [`FaultFailure`].
#[derive(Debug, thiserror::Error)]
pub(super) enum ServeError {
    #[error("the handler panicked: {0}")]
    Panicked(String),
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
pub(super) fn failure(job: &Job, run: usize, cause: Cause, action: FailureAction) -> FaultFailure {
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

pub(super) struct Done {
    pub(super) job: Box<Job>,
    pub(super) outcome: Outcome,
}

/// A job for `fault`, in a spare one if there is one (keeping its buffer).
#[allow(clippy::vec_box)]
pub(super) fn new_job(
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
        kind: JobKind::Fault,
        detached: false,
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
