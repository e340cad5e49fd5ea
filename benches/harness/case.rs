//! The words a benchmark case is described in: how faults are resolved,
//! and which side handles them.

/// How to resolve: copy bytes, or map the zero page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `UFFDIO_COPY` of the pattern bytes.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    Zero,
}

/// The handler side of the throughput, fault-around and slow-source
/// figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The raw floor (blocking read + one ioctl, one thread).
    Raw,
    /// The crate's `Server` (on a current-thread runtime; on a multi-thread
    /// one for slow sources).
    Server,
}
