//! The crate's error type.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
#[cfg(feature = "async")]
use std::sync::Arc;

use crate::flags::Features;

/// A specialized `Result` for userfaultfd operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The userfaultfd operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// `UFFDIO_API`.
    Api,
    /// `UFFDIO_REGISTER`.
    Register,
    /// `UFFDIO_UNREGISTER`.
    Unregister,
    /// `UFFDIO_WAKE`.
    Wake,
    /// `UFFDIO_COPY`.
    Copy,
    /// `UFFDIO_ZEROPAGE`.
    Zeropage,
    /// `UFFDIO_WRITEPROTECT`.
    WriteProtect,
    /// `UFFDIO_CONTINUE`.
    Continue,
    /// `UFFDIO_POISON`.
    Poison,
    /// `UFFDIO_MOVE`.
    Move,
}

impl Op {
    /// The kernel's name of the ioctl, e.g. `"UFFDIO_COPY"`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Api => "UFFDIO_API",
            Op::Register => "UFFDIO_REGISTER",
            Op::Unregister => "UFFDIO_UNREGISTER",
            Op::Wake => "UFFDIO_WAKE",
            Op::Copy => "UFFDIO_COPY",
            Op::Zeropage => "UFFDIO_ZEROPAGE",
            Op::WriteProtect => "UFFDIO_WRITEPROTECT",
            Op::Continue => "UFFDIO_CONTINUE",
            Op::Poison => "UFFDIO_POISON",
            Op::Move => "UFFDIO_MOVE",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a caller should do about an [`Error`], without matching errno values.
///
/// The first four are the outcomes every fault handler must tell apart; see
/// [`Error::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `EAGAIN`: the address space is changing (a fork, mremap,
    /// `MADV_DONTNEED` or munmap is in flight and its event is not read yet),
    /// or a multi-page operation stopped part way. Read the event queue, then
    /// retry from [`Error::bytes_done`].
    Retry,
    /// `EEXIST`: the page is already there. The kernel did not wake the
    /// waiters: call [`Uffd::wake`](crate::Uffd::wake) on the range.
    Exists,
    /// `ENOENT`: the range is gone (unmapped, or no longer registered). Wake
    /// the range (a thread can still be waiting there: the kernel may queue
    /// a fault just as its range is unregistered), then drop the fault. (Right after an [`Event::Unmap`](crate::Event::Unmap) or
    /// [`Event::Remap`](crate::Event::Remap) the kernel may also answer
    /// `EINVAL`, reported as [`InvalidInput`](Self::InvalidInput): a handler
    /// that tracks those events knows the range is gone.)
    RangeGone,
    /// `ESRCH`: the process that owns the memory has exited.
    ProcessExited,
    /// No message is queued now (`EAGAIN` on a non-blocking read).
    WouldBlock,
    /// The running kernel or the userfaultfd lacks what the call needs.
    Unsupported,
    /// An argument was rejected: alignment, length, or a mode the range does
    /// not allow.
    InvalidInput,
    /// The caller lacks the privilege the call needs.
    PermissionDenied,
    /// Anything else.
    Other,
}

/// Everything that can go wrong in this crate.
///
/// Each variant names the operation, the numbers a user needs to act on it,
/// and (where the kernel gave one) the OS error as its [`source`].
/// [`Error::kind`] sorts errors into the outcomes a handler acts on.
///
/// [`source`]: std::error::Error::source
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No userfaultfd could be created, neither through `/dev/userfaultfd`
    /// nor through the `userfaultfd(2)` system call.
    #[error(
        "cannot create a userfaultfd: /dev/userfaultfd failed ({device}), userfaultfd(2) failed ({syscall}); {hint}"
    )]
    Create {
        /// Why `/dev/userfaultfd` failed (or that it was not tried).
        device: io::Error,
        /// Why the system call failed (or that it was not tried).
        #[source]
        syscall: io::Error,
        /// What to do about it.
        hint: &'static str,
    },

    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API asking for features {requested:?} failed: {source}{hint}")]
    Api {
        /// The features that were asked for.
        requested: Features,
        /// A hint on what to do, or empty.
        hint: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The kernel does not offer features that were required.
    #[error(
        "the running kernel lacks required userfaultfd features {missing:?} (it offers {available:?}); \
         require fewer features or run a newer kernel"
    )]
    MissingFeatures {
        /// The required features the kernel lacks.
        missing: Features,
        /// Everything the kernel offers.
        available: Features,
    },

    /// An operation needs a feature that this userfaultfd lacks.
    #[error("{op} needs the userfaultfd feature {needs:?}, which this userfaultfd lacks (it has {has:?}); {hint}")]
    Unsupported {
        /// The operation.
        op: Op,
        /// The feature it needs.
        needs: Features,
        /// The features of this userfaultfd.
        has: Features,
        /// What to do about it.
        hint: &'static str,
    },

    /// An address or length is not a multiple of the page size.
    #[error("{op}: {what} {value:#x} is not a multiple of the page size ({page_size} bytes); align it down/up to a page")]
    Unaligned {
        /// The operation.
        op: Op,
        /// Which argument: `"start"`, `"len"`, `"src"`, `"dst"`.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The page size it must be a multiple of.
        page_size: usize,
    },

    /// A range is empty or runs past the end of the address space.
    #[error(
        "{op}: the range of {len:#x} bytes at {start:#x} is empty or overflows the address space"
    )]
    BadRange {
        /// The operation.
        op: Op,
        /// The start given.
        start: usize,
        /// The length given.
        len: usize,
    },

    /// A userfaultfd ioctl failed.
    ///
    /// For operations that report progress, `done` is the number of bytes
    /// the kernel completed before it stopped.
    #[error("{op} of {len:#x} bytes at {start:#x} failed after {done:#x} bytes: {source}{hint}", hint = ioctl_hint(*.op, .source))]
    Ioctl {
        /// The operation.
        op: Op,
        /// Start of the range (the destination for copy and move).
        start: usize,
        /// Length of the range.
        len: usize,
        /// Bytes completed before the error (0 where the kernel reports none).
        done: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `read(2)` of the userfaultfd failed. A `WouldBlock` source means no
    /// message was queued.
    #[error("reading the userfaultfd failed: {source}")]
    Read {
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `read(2)` returned a count that is not a whole, non-zero number of
    /// messages. The kernel never does this; it indicates a wrong fd.
    #[error("read(2) of the userfaultfd returned {len} bytes, not a whole non-zero number of 32-byte messages")]
    PartialMessage {
        /// Bytes returned.
        len: usize,
    },

    /// A message with an event code this crate does not know. The message
    /// is consumed; the next one is unaffected.
    #[error("unknown userfaultfd event code {code:#04x} (message {bytes:02x?})")]
    UnknownEvent {
        /// The event code.
        code: u8,
        /// The whole message.
        bytes: [u8; 32],
    },

    /// A message whose fields make no sense (e.g. a fork fd out of range).
    #[error("malformed userfaultfd message: {what} (message {bytes:02x?})")]
    BadMessage {
        /// What was wrong.
        what: &'static str,
        /// The whole message.
        bytes: [u8; 32],
    },

    /// An fd given to [`Uffd::from_fd`](crate::Uffd::from_fd) is not a usable
    /// userfaultfd.
    #[error("fd {fd} is not a usable userfaultfd: {reason}")]
    NotUffd {
        /// The fd.
        fd: RawFd,
        /// Why.
        reason: String,
    },

    /// A fault could not be resolved and the server's failure policy says
    /// to stop (or to poison, and poisoning failed). The [`FaultFailure`]
    /// names the page, the source offset and the cause, which is this
    /// error's [`source`](std::error::Error::source).
    #[cfg(feature = "async")]
    #[error(transparent)]
    Handler(Box<FaultFailure>),

    /// A region given to [`Server::regions`](crate::Server::regions) is
    /// unusable.
    #[cfg(feature = "async")]
    #[error(
        "invalid region {:#x}..{:#x} (page size {}, {}, offset {:#x}): {problem}",
        region.start(), region.end(), region.page_size, region.source(), region.offset()
    )]
    InvalidRegion {
        /// The region.
        region: crate::region::Region,
        /// What is wrong with it, and what to do.
        problem: String,
    },

    /// A working set could not be read, written, or used for this
    /// server's regions.
    #[cfg(feature = "async")]
    #[error(transparent)]
    WorkingSet(#[from] crate::working_set::WorkingSetError),

    /// [`ServerHandle::resident`](crate::ServerHandle::resident): the
    /// memory did not become, or cannot become, fully resident.
    #[cfg(feature = "async")]
    #[error("the memory did not become fully resident: {reason}")]
    NotResident {
        /// Why, and what to do.
        reason: String,
    },

    /// The server itself failed (its task panicked or was cancelled).
    #[error("{reason}")]
    Server {
        /// What went wrong.
        reason: String,
    },

    /// An async type was created outside a Tokio runtime.
    #[error(
        "{what} needs a Tokio runtime: call it from within one (or enter one with Runtime::enter)"
    )]
    NoRuntime {
        /// What was being created.
        what: &'static str,
    },

    /// A second [`EventStream`](crate::EventStream) was asked for while one
    /// exists: each message goes to one reader, and Tokio keeps only one
    /// reader's waker, so two would lose wake-ups.
    #[error("this userfaultfd already has an EventStream; drop it (or use it) instead of making a second")]
    StreamExists,

    /// The running kernel lacks the `PAGEMAP_SCAN` ioctl of
    /// `/proc/self/pagemap` (Linux 6.7+), which dirty tracking without
    /// faults needs.
    #[error(
        "PAGEMAP_SCAN on /proc/self/pagemap is not supported by the running kernel ({source}): \
         dirty tracking without faults needs Linux 6.7 or later"
    )]
    PagemapScanUnsupported {
        /// The OS error (`ENOTTY`).
        #[source]
        source: io::Error,
    },

    /// Any other OS error (for example from `fcntl`).
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why a fault could not be served, with everything a user needs to find
/// the page and the cause: the faulting address, the run of pages being
/// resolved, the page source and the offset in it, and the original error
/// (kept as [`source`](std::error::Error::source), never flattened into a
/// string).
///
/// The server records the first and the latest of these in its
/// [`Stats`](crate::Stats), and returns one in [`Error::Handler`] when its
/// failure policy ends it.
#[cfg(feature = "async")]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FaultFailure {
    /// The faulting address as the kernel reported it.
    pub fault_addr: usize,
    /// First byte of the run of pages that failed.
    pub addr: usize,
    /// Bytes in that run.
    pub len: usize,
    /// The page source of the region (the first outside every region).
    pub source: crate::region::SourceId,
    /// The offset of `addr` in that source; outside every region, `addr`.
    pub offset: u64,
    /// What the server did about it.
    pub action: FailureAction,
    /// What went wrong.
    pub cause: Arc<dyn std::error::Error + Send + Sync>,
}

/// What the server did with a fault it could not serve.
#[cfg(feature = "async")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureAction {
    /// The attempt is retried (by [`FailurePolicy::Retry`](crate::FailurePolicy::Retry)).
    Retried,
    /// The page was poisoned: the faulting thread gets `SIGBUS`.
    Poisoned,
    /// A prefetched run was dropped: those pages stay missing and are
    /// served when they fault.
    Dropped,
    /// The server stopped (by [`FailurePolicy::Stop`](crate::FailurePolicy::Stop),
    /// or because poisoning was impossible).
    Stopped,
}

#[cfg(feature = "async")]
impl FailureAction {
    fn describe(self) -> &'static str {
        match self {
            FailureAction::Retried => "retrying",
            FailureAction::Poisoned => "the page was poisoned, the faulting thread gets SIGBUS",
            FailureAction::Dropped => "the prefetched pages were left missing",
            FailureAction::Stopped => "the server stopped",
        }
    }
}

#[cfg(feature = "async")]
impl fmt::Display for FaultFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serving {:#x} bytes at {:#x} (fault at {:#x}) from {} offset {:#x} failed ({}): {}",
            self.len,
            self.addr,
            self.fault_addr,
            self.source,
            self.offset,
            self.action.describe(),
            self.cause
        )
    }
}

#[cfg(feature = "async")]
impl std::error::Error for FaultFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// The whole chain of `e`: its message, then each `source()` after `": "`.
///
/// Errors here keep their causes as `source()`; a report that prints only
/// the outermost message loses them.
///
/// ```
/// use std::io;
/// let inner = io::Error::new(io::ErrorKind::NotFound, "no such object");
/// let outer = tokio_uffd::Error::Os { what: "fetching page 7", source: inner };
/// // `Os` prints its cause already: the chain does not repeat it.
/// assert_eq!(tokio_uffd::error_chain(&outer), "fetching page 7: no such object");
/// ```
pub fn error_chain(e: &(dyn std::error::Error + '_)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // Wrappers that repeat their cause's message (`transparent`) add
        // nothing.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

fn ioctl_hint(op: Op, e: &io::Error) -> &'static str {
    match (op, e.raw_os_error()) {
        (_, Some(libc::EAGAIN)) => {
            " (the address space is changing or the operation stopped part way: read the pending events, then retry)"
        }
        (_, Some(libc::EEXIST)) => " (a page is already there: wake the range with UFFDIO_WAKE)",
        (_, Some(libc::ESRCH)) => " (the process that owns the memory has exited)",
        (Op::Zeropage, Some(libc::EINVAL)) => {
            " (UFFDIO_ZEROPAGE is not supported on hugetlbfs or minor-only ranges: copy a zeroed page instead)"
        }
        (Op::Register, Some(libc::EINVAL)) => {
            " (the range must be page-aligned (huge-page aligned for hugetlbfs), mapped, and of a memory kind the mode supports)"
        }
        (Op::Register, Some(libc::EBUSY)) => {
            " (the range is already registered with another userfaultfd)"
        }
        (_, Some(libc::ENOENT)) => " (the range is not registered or is no longer mapped)",
        (Op::Copy, Some(libc::EFAULT)) => {
            " (the source bytes could not be read: an address outside the process, or a file \
             mapping past the end of its file, which shrank after it was mapped)"
        }
        (_, Some(libc::ENOTTY)) => " (the running kernel does not implement this ioctl)",
        _ => "",
    }
}

impl Error {
    /// Sorts the error into what a handler should do about it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Create {
                device, syscall, ..
            } => {
                if is_perm(device) && is_perm(syscall) {
                    ErrorKind::PermissionDenied
                } else if syscall.raw_os_error() == Some(libc::ENOSYS) {
                    ErrorKind::Unsupported
                } else {
                    ErrorKind::Other
                }
            }
            Error::Api { source, .. } => match source.raw_os_error() {
                Some(libc::EPERM) => ErrorKind::PermissionDenied,
                Some(libc::EINVAL) => ErrorKind::Unsupported,
                _ => ErrorKind::Other,
            },
            Error::MissingFeatures { .. }
            | Error::Unsupported { .. }
            | Error::PagemapScanUnsupported { .. } => ErrorKind::Unsupported,
            Error::NoRuntime { .. } => ErrorKind::Other,
            Error::Unaligned { .. } | Error::BadRange { .. } => ErrorKind::InvalidInput,
            Error::Ioctl { source, .. } => match source.raw_os_error() {
                Some(libc::EAGAIN) => ErrorKind::Retry,
                Some(libc::EEXIST) => ErrorKind::Exists,
                Some(libc::ENOENT) => ErrorKind::RangeGone,
                Some(libc::ESRCH) => ErrorKind::ProcessExited,
                Some(libc::EINVAL) => ErrorKind::InvalidInput,
                Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
                Some(libc::EPERM) => ErrorKind::PermissionDenied,
                _ => ErrorKind::Other,
            },
            Error::Read { source } => match source.kind() {
                io::ErrorKind::WouldBlock => ErrorKind::WouldBlock,
                _ => ErrorKind::Other,
            },
            Error::NotUffd { .. } => ErrorKind::InvalidInput,
            #[cfg(feature = "async")]
            Error::InvalidRegion { .. } => ErrorKind::InvalidInput,
            #[cfg(feature = "async")]
            Error::WorkingSet(_) => ErrorKind::InvalidInput,
            #[cfg(feature = "async")]
            Error::Handler(_) | Error::NotResident { .. } => ErrorKind::Other,
            Error::PartialMessage { .. }
            | Error::UnknownEvent { .. }
            | Error::BadMessage { .. }
            | Error::Server { .. }
            | Error::StreamExists
            | Error::Os { .. } => ErrorKind::Other,
        }
    }

    /// For a failed ioctl that reports progress, the bytes the kernel
    /// completed before it stopped; 0 for every other error.
    pub fn bytes_done(&self) -> usize {
        match self {
            Error::Ioctl { done, .. } => *done,
            _ => 0,
        }
    }

    /// The OS error number behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Create { syscall, .. } => syscall.raw_os_error(),
            Error::Api { source, .. }
            | Error::Ioctl { source, .. }
            | Error::Read { source }
            | Error::PagemapScanUnsupported { source }
            | Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn is_perm(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            ErrorKind::WouldBlock => io::ErrorKind::WouldBlock,
            // Not WouldBlock: that would read as "nothing to read".
            ErrorKind::Retry => io::ErrorKind::Other,
            ErrorKind::Exists => io::ErrorKind::AlreadyExists,
            ErrorKind::RangeGone => io::ErrorKind::NotFound,
            ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
            ErrorKind::InvalidInput => io::ErrorKind::InvalidInput,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::ProcessExited | ErrorKind::Other => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
