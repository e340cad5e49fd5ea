//! What the server does on failures and forks, and how it ends.

use std::time::Duration;

/// What the server does when a handler fails (returns an error or panics)
/// or a resolution cannot be applied.
///
/// Whatever the policy, the faulting thread is never left asleep forever
/// and never silently handed zeros, and the server keeps serving other
/// faults (except under [`Stop`](Self::Stop)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Poison the faulting page (`UFFDIO_POISON`, kernel 6.6+): the
    /// faulting thread gets `SIGBUS`. The default. Without the kernel
    /// feature, the server stops with the error instead.
    Poison,
    /// Run the handler again, up to `attempts` more times, `backoff` apart;
    /// then poison.
    Retry {
        /// Extra attempts.
        attempts: u32,
        /// Pause before each.
        backoff: Duration,
    },
    /// Stop the server and return the error. The faulting thread stays
    /// asleep until the userfaultfd is closed or served by someone else.
    Stop,
}

/// What the server does with the userfaultfd of a forked child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForkPolicy {
    /// Serve the child with the same handler and a copy of the parent's
    /// page state. The default.
    #[default]
    Serve,
    /// Close the child's userfaultfd: the child's faults on that memory are
    /// then handled by the kernel as if it were not registered.
    Ignore,
}

/// How a server ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerExit {
    /// [`ServerHandle::stop`](crate::ServerHandle::stop) was called (or the handle dropped).
    Stopped,
    /// The process that owns the memory exited (`ESRCH`).
    ProcessExited,
}
