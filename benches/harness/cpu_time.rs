//! The CPU time a handler thread spends, beside the wall time of the
//! faults it serves.

use std::time::Duration;

/// CPU time (user and system) of the last handler thread measured with
/// [`on_cpu_clock`], in nanoseconds.
static HANDLER_CPU: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` and records the CPU time this thread spent in it.
pub(super) fn on_cpu_clock<T>(f: impl FnOnce() -> T) -> T {
    let t0 = thread_cpu();
    let r = f();
    let spent = thread_cpu() - t0;
    HANDLER_CPU.store(
        spent.as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    r
}

/// CPU time of the handler thread in the last `latency` run (its
/// runtime's set-up included), for every path but the multi-thread stream.
pub fn last_handler_cpu() -> Duration {
    Duration::from_nanos(HANDLER_CPU.load(std::sync::atomic::Ordering::Relaxed))
}
