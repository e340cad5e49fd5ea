//! Which CPU each thread runs on: the faulting thread and the handler on
//! the same core or on two.

/// Where the handler runs relative to the faulting thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Both on CPU 0.
    SameCore,
    /// Faulting thread on CPU 0, handler on CPU 1.
    OtherCore,
}

impl Pin {
    pub(super) fn handler_cpu(self) -> usize {
        match self {
            Pin::SameCore => 0,
            Pin::OtherCore => 1 % cpus(),
        }
    }
}

/// CPUs online (not the calling thread's affinity, which `pin` narrows).
pub fn cpus() -> usize {
    // SAFETY: sysconf reads a constant.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets the calling thread run anywhere again.
pub fn unpin() {
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..cpus() {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
