//! Live server statistics.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::FaultFailure;

const SUB: usize = 8; // sub-buckets per power of two: ~12% resolution
const BUCKETS: usize = 64 * SUB;

/// A lock-free latency histogram in nanoseconds, log-linear.
struct Histogram {
    counts: Box<[AtomicU64]>,
    max: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    fn index(ns: u64) -> usize {
        if ns < SUB as u64 {
            return ns as usize;
        }
        let bit = 63 - ns.leading_zeros() as usize; // >= 3
        let sub = ((ns >> (bit - 3)) as usize) & (SUB - 1);
        ((bit - 2) * SUB + sub).min(BUCKETS - 1)
    }

    /// The largest value that lands in bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < SUB {
            return i as u64;
        }
        let bit = i / SUB + 2;
        let sub = (i % SUB) as u64;
        ((SUB as u64 + sub + 1) << (bit - 3)) - 1
    }

    fn record(&self, ns: u64) {
        self.counts[Self::index(ns)].fetch_add(1, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }

    fn summary(&self) -> Latency {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let max = self.max.load(Relaxed);
        let pct = |p: f64| {
            if total == 0 {
                return Duration::ZERO;
            }
            let rank = ((total as f64 * p).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Duration::from_nanos(Self::upper(i).min(max));
                }
            }
            Duration::from_nanos(max)
        };
        Latency {
            count: total,
            p50: pct(0.50),
            p99: pct(0.99),
            max: Duration::from_nanos(max),
        }
    }
}

/// Latency from reading a fault to its resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latency {
    /// Faults measured.
    pub count: u64,
    /// Median (within the histogram's ~12% resolution).
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Maximum.
    pub max: Duration,
}

/// Counters a running [`Server`](crate::Server) keeps; read them any time
/// through [`ServerHandle::stats`](crate::ServerHandle::stats).
pub struct Stats {
    pub(crate) missing: AtomicU64,
    pub(crate) write_protect: AtomicU64,
    pub(crate) minor: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) pages_served: AtomicU64,
    pub(crate) bytes_served: AtomicU64,
    pub(crate) pages_prefetched: AtomicU64,
    pub(crate) pages_zeroed_after_remove: AtomicU64,
    pub(crate) eexist: AtomicU64,
    pub(crate) eagain: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) poisoned: AtomicU64,
    pub(crate) self_faults: AtomicU64,
    pub(crate) forks: AtomicU64,
    pub(crate) removes: AtomicU64,
    pub(crate) remaps: AtomicU64,
    pub(crate) unmaps: AtomicU64,
    /// Stalled faults (and episodes of unread faults) the watchdog reported.
    pub(crate) stalls: AtomicU64,
    /// Pages in the warm plan (the working set given to `Server::warm`).
    pub(crate) working_set_pages: AtomicU64,
    pub(crate) pages_warmed: AtomicU64,
    pub(crate) pages_filled: AtomicU64,
    pub(crate) faults_ahead_of_prefetch: AtomicU64,
    pub(crate) background_failures: AtomicU64,
    /// Nanoseconds from the server's start to every page of every region
    /// resident, plus one; 0 until then.
    resident_after: AtomicU64,
    latency: Histogram,
    last_error: Mutex<Option<String>>,
    failures: Mutex<Failures>,
    last_stall: Mutex<Option<Stall>>,
}

/// The first and the latest failure to serve a fault.
#[derive(Debug, Default)]
struct Failures {
    first: Option<FaultFailure>,
    last: Option<FaultFailure>,
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Stats {
    pub(crate) fn new() -> Self {
        let z = || AtomicU64::new(0);
        Self {
            missing: z(),
            write_protect: z(),
            minor: z(),
            duplicates: z(),
            pages_served: z(),
            bytes_served: z(),
            pages_prefetched: z(),
            pages_zeroed_after_remove: z(),
            eexist: z(),
            eagain: z(),
            handler_failures: z(),
            poisoned: z(),
            self_faults: z(),
            forks: z(),
            removes: z(),
            remaps: z(),
            unmaps: z(),
            stalls: z(),
            working_set_pages: z(),
            pages_warmed: z(),
            pages_filled: z(),
            faults_ahead_of_prefetch: z(),
            background_failures: z(),
            resident_after: z(),
            latency: Histogram::new(),
            last_error: Mutex::new(None),
            failures: Mutex::new(Failures::default()),
            last_stall: Mutex::new(None),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn record_latency(&self, d: Duration) {
        self.latency
            .record(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Records the time from the server's start to every page resident.
    pub(crate) fn set_resident_after(&self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX - 1)) as u64;
        self.resident_after.store(ns + 1, Relaxed);
    }

    pub(crate) fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// Records a failure to serve a fault (its message also becomes the
    /// [`last_error`](Self::last_error)).
    pub(crate) fn record_failure(&self, failure: &FaultFailure) {
        self.set_error(crate::error::error_chain(failure));
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.first.is_none() {
            f.first = Some(failure.clone());
        }
        f.last = Some(failure.clone());
    }

    /// The first fault the server could not serve, with its address, its
    /// source offset and the cause (as `source()`); `None` if every fault
    /// was served. Print it with [`error_chain`](crate::error_chain) to
    /// see every cause.
    pub fn first_failure(&self) -> Option<FaultFailure> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first
            .clone()
    }

    /// The latest fault the server could not serve; see
    /// [`first_failure`](Self::first_failure).
    pub fn last_failure(&self) -> Option<FaultFailure> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
            .clone()
    }

    /// The most recent problem the server reported (a handler failure, a
    /// self-fault, an unexpected error), if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a stall the watchdog found: counts it and keeps it as the
    /// [`last_stall`](Self::last_stall).
    pub(crate) fn record_stall(&self, stall: Stall) {
        Self::add(&self.stalls, 1);
        *self.last_stall.lock().unwrap_or_else(|p| p.into_inner()) = Some(stall);
    }

    /// The latest stall the server's watchdog reported: a fault that waited
    /// longer than the watchdog's threshold, unread or unresolved. `None` if
    /// there was none (or no watchdog runs). Its `Display` says what is
    /// stuck and what to do.
    pub fn last_stall(&self) -> Option<Stall> {
        self.last_stall
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A consistent-enough copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Relaxed);
        StatsSnapshot {
            faults_missing: l(&self.missing),
            faults_write_protect: l(&self.write_protect),
            faults_minor: l(&self.minor),
            duplicates: l(&self.duplicates),
            pages_served: l(&self.pages_served),
            bytes_served: l(&self.bytes_served),
            pages_prefetched: l(&self.pages_prefetched),
            pages_zeroed_after_remove: l(&self.pages_zeroed_after_remove),
            eexist: l(&self.eexist),
            eagain: l(&self.eagain),
            handler_failures: l(&self.handler_failures),
            poisoned: l(&self.poisoned),
            self_faults: l(&self.self_faults),
            forks: l(&self.forks),
            removes: l(&self.removes),
            remaps: l(&self.remaps),
            unmaps: l(&self.unmaps),
            stalls: l(&self.stalls),
            working_set_pages: l(&self.working_set_pages),
            pages_warmed: l(&self.pages_warmed),
            pages_filled: l(&self.pages_filled),
            faults_ahead_of_prefetch: l(&self.faults_ahead_of_prefetch),
            background_failures: l(&self.background_failures),
            time_to_resident: match l(&self.resident_after) {
                0 => None,
                ns => Some(Duration::from_nanos(ns - 1)),
            },
            latency: self.latency.summary(),
        }
    }
}

/// A copy of a server's [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Missing-page faults read.
    pub faults_missing: u64,
    /// Write-protect faults read.
    pub faults_write_protect: u64,
    /// Minor faults read.
    pub faults_minor: u64,
    /// Faults on a page that was being resolved or already resolved: only
    /// woken, the handler not run again.
    pub duplicates: u64,
    /// Pages resolved, prefetched ones included.
    pub pages_served: u64,
    /// Bytes resolved.
    pub bytes_served: u64,
    /// Pages resolved ahead of a fault (fault-around).
    pub pages_prefetched: u64,
    /// Pages served as zeros because they were freed (`Remove`, or found
    /// missing again after being served).
    pub pages_zeroed_after_remove: u64,
    /// Resolutions that found the page already there (`EEXIST`).
    pub eexist: u64,
    /// Resolution attempts that failed because the address space was
    /// changing (`EAGAIN`); a parked resolution counts once per retry.
    pub eagain: u64,
    /// Handler errors and panics.
    pub handler_failures: u64,
    /// Pages poisoned by the failure policy.
    pub poisoned: u64,
    /// Faults raised by a thread of the server's own runtime.
    pub self_faults: u64,
    /// Fork events.
    pub forks: u64,
    /// Remove events.
    pub removes: u64,
    /// Remap events.
    pub remaps: u64,
    /// Unmap events.
    pub unmaps: u64,
    /// Stalls the watchdog reported: faults that waited longer than its
    /// threshold without being read (one per episode) or without being
    /// resolved (one per fault). See [`Stats::last_stall`].
    pub stalls: u64,
    /// Pages of the working set given to [`Server::warm`](crate::Server::warm)
    /// (distinct pages the plan covers).
    pub working_set_pages: u64,
    /// Pages the warm prefetch served from the working set, before any
    /// fault on them.
    pub pages_warmed: u64,
    /// Pages the background fill served (see
    /// [`Server::fill`](crate::Server::fill)).
    pub pages_filled: u64,
    /// Faults taken on pages of the working set that the warm prefetch had
    /// not reached yet (served at once on their own path). Faults on pages
    /// it was copying at that moment count as [`duplicates`](Self::duplicates).
    pub faults_ahead_of_prefetch: u64,
    /// Prefetch and fill copies that failed (their pages are left to be
    /// served on a fault, which applies the failure policy if it fails
    /// again). Each is in [`Stats::last_failure`] with
    /// [`FailureAction::Dropped`](crate::FailureAction::Dropped).
    pub background_failures: u64,
    /// Time from the server's start until every page of every region was
    /// resident (served, or freed by the program), once the background
    /// fill got there; `None` before, or without a fill.
    pub time_to_resident: Option<Duration>,
    /// Latency from reading a fault to its resolution.
    pub latency: Latency,
}

/// A fault that waited longer than the watchdog's threshold, as
/// [`Stats::last_stall`] reports it. Its `Display` says what is stuck and
/// what to do.
///
/// Two kinds: *unread* (`fault_addr` is `None`): faults sat in the
/// userfaultfd's queue and the server did not read them, typically because
/// a thread of the server's own runtime touched registered memory and
/// sleeps in the kernel, so the runtime cannot run; the address is unknown
/// because the message was never read. *Unresolved* (`fault_addr` is
/// `Some`): the server read the fault but its handler has not resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stall {
    /// How long the fault had waited when the watchdog reported it (at
    /// least this long: the watchdog checks periodically).
    pub waited: Duration,
    /// The faulting address, if the fault was read; `None` for unread
    /// faults, whose message is still in the kernel's queue.
    pub fault_addr: Option<usize>,
    /// The faulting thread's id (as from `gettid`), if known: for an
    /// unresolved fault, when the userfaultfd has
    /// [`Features::THREAD_ID`](crate::Features::THREAD_ID); for unread
    /// faults, a thread of this process asleep in a userfault (the longest
    /// asleep first).
    pub thread: Option<u32>,
    /// That thread's name (`/proc/self/task/<tid>/comm`, at most 15 bytes),
    /// if it is a thread of this process.
    pub thread_name: Option<String>,
    /// Faults queued in the userfaultfd and not yet read, when reported.
    pub unread: u64,
    /// Faults read but not yet resolved (their threads still asleep), when
    /// reported.
    pub unresolved: u64,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Whole milliseconds read better than nanoseconds.
        let waited = match self.waited.as_millis() {
            0 => self.waited,
            ms => Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)),
        };
        let who = match (self.thread, &self.thread_name) {
            (Some(tid), Some(name)) => format!("thread {tid} ({name:?})"),
            (Some(tid), None) => format!("thread {tid}"),
            _ => String::new(),
        };
        match self.fault_addr {
            None => {
                write!(
                    f,
                    "{} page fault(s) queued for at least {waited:?} and not read: the server \
                     is not reading its userfaultfd (the faulting address is unknown while \
                     the message is unread). ",
                    self.unread
                )?;
                if who.is_empty() {
                    write!(
                        f,
                        "No thread of this process is asleep in a userfault (the faulting \
                         threads may belong to another process): is the server's runtime \
                         blocked or stopped? "
                    )?;
                } else {
                    let who = who.replacen("thread", "Thread", 1);
                    write!(f, "{who} is asleep in a userfault. ")?;
                }
                write!(
                    f,
                    "A thread of the server's own runtime that touches registered memory \
                     sleeps until the server resolves the fault, which it then never can: \
                     never touch registered memory from the runtime that serves it (use a \
                     std::thread, spawn_blocking, another runtime or another process)"
                )
            }
            Some(addr) => {
                write!(f, "the page fault at {addr:#x}")?;
                if !who.is_empty() {
                    write!(f, " by {who}")?;
                }
                write!(
                    f,
                    " was read {waited:?} ago and is still not resolved; the faulting thread \
                     sleeps until it is. Check the handler (or page source): it may wait for \
                     something that never completes, or block its runtime. \
                     ({} fault(s) read and unresolved, {} unread.)",
                    self.unresolved, self.unread
                )
            }
        }
    }
}

impl StatsSnapshot {
    /// Faults of every kind.
    pub fn faults(&self) -> u64 {
        self.faults_missing + self.faults_write_protect + self.faults_minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_monotonic_and_cover_their_values() {
        for v in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1000,
            123_456,
            10_000_000,
            u64::MAX / 2,
        ] {
            let i = Histogram::index(v);
            assert!(Histogram::upper(i) >= v, "{v} above its bucket {i}");
            if i > 0 {
                assert!(Histogram::upper(i - 1) < v, "{v} fits an earlier bucket");
            }
        }
    }

    #[test]
    fn percentiles_follow_the_data() {
        let h = Histogram::new();
        for _ in 0..99 {
            h.record(1_000);
        }
        h.record(1_000_000);
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!(s.p50 >= Duration::from_nanos(1_000) && s.p50 < Duration::from_nanos(1_200));
        assert!(s.p99 < Duration::from_nanos(1_200));
        assert_eq!(s.max, Duration::from_millis(1));
    }
}
