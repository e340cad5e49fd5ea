//! The crate's `tracing` events, behind the default `tracing` feature: the
//! macros here expand to nothing without it, so no call site needs a `cfg`.
//!
//! Levels: failures and decisions a user must see (`WARN`), non-fault events
//! and the life of servers and children (`DEBUG`), parking and retries
//! (`DEBUG`), each fault (`TRACE` only, so that the hot path costs one
//! callsite check at `INFO`).

#[cfg(feature = "tracing")]
macro_rules! event {
    ($level:ident, $($arg:tt)*) => { ::tracing::$level!($($arg)*) };
}

#[cfg(not(feature = "tracing"))]
macro_rules! event {
    ($level:ident, $($arg:tt)*) => {{}};
}

pub(crate) use event;

use crate::error::FaultFailure;

/// A fault that could not be served, with the whole chain of its cause.
pub(crate) fn report_failure(failure: &FaultFailure) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        fault_addr = %format_args!("{:#x}", failure.fault_addr),
        addr = %format_args!("{:#x}", failure.addr),
        len = failure.len,
        source = failure.source.index(),
        offset = %format_args!("{:#x}", failure.offset),
        action = ?failure.action,
        error = %crate::error::error_chain(&*failure.cause),
        "could not serve a fault"
    );
    #[cfg(not(feature = "tracing"))]
    let _ = failure;
}

/// The span a server (or a forked child's server) runs in.
#[cfg(feature = "tracing")]
pub(crate) type Span = tracing::Span;

/// Without `tracing`, nothing.
#[cfg(not(feature = "tracing"))]
#[derive(Debug, Clone)]
pub(crate) struct Span;

/// The span of a server reading userfaultfd `fd` for `regions` regions; a
/// forked child's when `child`.
pub(crate) fn server_span(fd: std::os::fd::RawFd, regions: usize, child: bool) -> Span {
    #[cfg(feature = "tracing")]
    {
        if child {
            tracing::debug_span!("uffd_child", uffd = fd, regions)
        } else {
            tracing::debug_span!("uffd_server", uffd = fd, regions)
        }
    }
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (fd, regions, child);
        Span
    }
}

/// Runs `f` inside `span`.
pub(crate) async fn in_span<F: std::future::Future>(span: Span, f: F) -> F::Output {
    #[cfg(feature = "tracing")]
    {
        use tracing::Instrument;
        f.instrument(span).await
    }
    #[cfg(not(feature = "tracing"))]
    {
        let _ = span;
        f.await
    }
}
