//! Running the handler for a job and applying its resolutions.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;

use crate::error::{ErrorKind, FailureAction};
use crate::flags::{ContinueFlags, CopyFlags, PoisonFlags, UnprotectFlags, ZeropageFlags};
use crate::handler::{FaultHandler, FaultRequest, Resolution};
use crate::stats::Stats;
use crate::trace;

use super::job::{failure, Cause, Job, JobKind, Outcome, Run, ServeError};
use super::shared::Shared;
use super::MAX_WINDOW_BYTES;

/// Calls the handler for every run of `job` that [`decide_direct`] left
/// (once), then applies. A failed prefetch run is dropped; only a failure
/// of the faulting page's run fails the job.
pub(super) async fn execute<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
    if !job.decided {
        // Runs marked direct were decided by `decide_direct` on the reader.
        for i in 0..job.nruns {
            let run = job.runs[i];
            if run.direct || run.resolution.is_some() {
                // Decided already (direct, or fetched before a refetch).
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
pub(super) fn decide_direct<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> bool {
    let mut all = true;
    for i in 0..job.nruns {
        let run = job.runs[i];
        if run.direct {
            continue;
        }
        if direct_bytes(shared, job, &run).is_some() {
            job.runs[i].resolution = Some(Resolution::Copy);
            job.runs[i].direct = true;
        } else {
            all = false;
        }
    }
    job.decided = all;
    all
}

/// The handler's bytes for `run` if it has them in memory, whole. A
/// `bytes_for` that panics (caught: it runs on the reader, whose end would
/// leave every faulting thread asleep) or returns a slice of another length
/// counts as not having them.
fn direct_bytes<'a, H: FaultHandler>(
    shared: &'a Shared<H>,
    job: &Job,
    run: &Run,
) -> Option<&'a [u8]> {
    let req = request(job, run);
    match std::panic::catch_unwind(AssertUnwindSafe(|| shared.handler.bytes_for(&req))) {
        Ok(Some(bytes)) if bytes.len() == run.len => Some(bytes),
        Ok(_) => None,
        Err(_) => {
            trace::event!(
                warn,
                addr = %format_args!("{:#x}", run.addr),
                "the handler's bytes_for panicked; its fault method serves the run"
            );
            None
        }
    }
}

/// The handler's view of one run of `job`.
pub(super) fn request(job: &Job, run: &Run) -> FaultRequest {
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
        background: job.kind.is_background(),
    }
}

/// [`apply`] behind the removal gate, and the statistics of a resolution at
/// once, so that they are current by the time the woken thread runs.
pub(super) fn apply_and_account<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
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
        if job.kind == JobKind::Warm {
            Stats::add(&stats.pages_warmed, pages);
            return outcome;
        } else if job.kind == JobKind::Fill {
            Stats::add(&stats.pages_filled, pages);
            return outcome;
        } else if job.runs[0].resolution == Some(Resolution::Poison) {
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
pub(super) fn apply<H: FaultHandler>(shared: &Shared<H>, job: &mut Job) -> Outcome {
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
                        let Some(bytes) = direct_bytes(shared, job, &run) else {
                            // The handler no longer has them in memory (a
                            // file's page evicted since): its fault method
                            // reads them, then the job goes on from here.
                            job.runs[i].done = done;
                            job.runs[i].direct = false;
                            job.runs[i].resolution = None;
                            job.decided = false;
                            return Outcome::Refetch;
                        };
                        uffd.copy(addr, &bytes[done..], flags)
                    } else {
                        let from = run.buf_off + done;
                        uffd.copy(addr, &job.buf[from..from + len], flags)
                    }
                }
                Resolution::Zero if page_size > shared.config.page_size => {
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
pub(super) fn when<F: bitflags::Flags>(yes: bool, flag: F) -> F {
    if yes {
        flag
    } else {
        F::empty()
    }
}

/// `len` zero bytes from one shared buffer of a fault-around window's size
/// (allocated on first use; untouched zero pages cost no memory), or `None`
/// for longer runs (gigantic pages).
pub(super) fn zeros(len: usize) -> Option<&'static [u8]> {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    ZEROS
        .get_or_init(|| vec![0u8; MAX_WINDOW_BYTES].into_boxed_slice())
        .get(..len)
}
