//! Linux userfaultfd as a first-class citizen of async Rust.
//!
//! A program registers memory with a userfaultfd; the kernel then suspends
//! every thread that touches a missing (or write-protected, or minor-fault)
//! page of it and queues a message. This crate reads those messages as typed
//! [`Event`]s and resolves them with every userfaultfd ioctl of current
//! kernels: copy, zeropage, continue, wake, write-protect, poison and move.
//!
//! The layers, lowest first, each usable on its own (imports go down, never
//! up):
//!
//! - **The sync core** (always built; `--no-default-features` builds only
//!   this, without Tokio or futures):
//!   - [`sys`]: the kernel ABI, by hand, with compile-time layout checks.
//!   - [`Uffd`] and [`UffdBuilder`]: the fd, feature negotiation, and every
//!     ioctl as a typed, checked method.
//!   - [`Event`], [`EventBuffer`] and [`decode_message`]: whole messages read
//!     in batches and decoded into typed events.
//!   - [`DirtyTracker`] and [`Pagemap`]: dirty-page tracking without faults
//!     in user space (`WP_ASYNC` and `PAGEMAP_SCAN`, Linux 6.7+).
//! - **The async layer** (feature `async`, on by default): `AsyncUffd` and
//!   `EventStream`, the fd on Tokio's reactor and a `futures::Stream` of
//!   events.
//! - **The fault server** (feature `async`): `Server`, `FaultHandler`,
//!   `PageSource` and `Region`: say where page contents come from; the
//!   server resolves every fault from spawned tasks and handles the kernel's
//!   edge cases (duplicates, `EEXIST`, `EAGAIN`, removed, remapped and
//!   unmapped ranges, forks, failures, prefetch), with statistics, a stall
//!   watchdog and `tracing` events (feature `tracing`, on by default).
//!   Page sources: zeros, memory, a snapshot file mapped read-only
//!   (`MmapSource`) or read with `pread` (`FileSource`), and an object in
//!   object storage (`ObjectStoreSource`, feature `object-store`).
//! - **The restore engine** (feature `async`): `Server::record` records the
//!   working set of a restore into a `WorkingSet` (a small versioned file);
//!   `Server::warm` prefetches it on the next restore while faults are
//!   served; `Server::fill` fills the rest in the background, and
//!   `ServerHandle::resident` waits until every page is there (eager
//!   population when awaited first).
//!
//! # Example
//!
//! Serve zero-filled pages to a thread that touches fresh memory:
//!
//! ```
//! # #[cfg(feature = "async")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use futures::StreamExt;
//! use tokio_uffd::{AsyncUffd, Event, RegisterMode, Uffd, ZeropageFlags};
//!
//! let uffd = Uffd::new()?;
//! let page = uffd.page_size();
//! let len = 4 * page;
//! // SAFETY: a fresh anonymous private mapping that nothing else uses.
//! let mem = unsafe {
//!     libc::mmap(
//!         std::ptr::null_mut(),
//!         len,
//!         libc::PROT_READ | libc::PROT_WRITE,
//!         libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
//!         -1,
//!         0,
//!     )
//! };
//! assert_ne!(mem, libc::MAP_FAILED);
//! let start = mem as usize;
//! // SAFETY: the mapping is ours and no reference into it exists; its
//! // pages are filled only by the handler below.
//! unsafe { uffd.register(start, len, RegisterMode::MISSING)? };
//!
//! let uffd = AsyncUffd::new(uffd)?;
//! let mut events = uffd.event_stream()?;
//! // Touch the memory from a plain thread, never from the runtime that
//! // serves its faults (see "gotchas" below).
//! let toucher = std::thread::spawn(move || {
//!     (0..4).map(|i| unsafe { *((start + i * page) as *const u8) } as u32).sum::<u32>()
//! });
//! let mut served = 0;
//! while served < 4 {
//!     match events.next().await.expect("stream ended")? {
//!         Event::PageFault(fault) => {
//!             uffd.zeropage(fault.page_start(page), page, ZeropageFlags::empty())?;
//!             served += 1;
//!         }
//!         other => println!("unexpected {other:?}"),
//!     }
//! }
//! assert_eq!(toucher.join().unwrap(), 0);
//! # unsafe { libc::munmap(mem, len) };
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "async"))]
//! # fn main() {}
//! ```
//!
//! # Userfaultfd gotchas
//!
//! - **Never touch registered memory from a worker of the runtime that
//!   serves it.** The touching thread sleeps in the kernel until the fault is
//!   resolved; if it is the thread that would read the event, nothing ever
//!   resolves it. Fault from `std::thread`s, `spawn_blocking`, another
//!   runtime or another process.
//! - A userfaultfd must be non-blocking for `epoll` (and `poll(2)`, which
//!   reports `POLLERR` on a blocking one): this crate creates and adopts
//!   them with `O_NONBLOCK | O_CLOEXEC`, unless asked for a blocking one
//!   with [`UffdBuilder::blocking`], which [`AsyncUffd::new`] makes
//!   non-blocking.
//! - `UFFDIO_API` works once per fd. Features are negotiated when the
//!   [`Uffd`] is built; [`UffdBuilder::require`] fails clearly when the
//!   kernel lacks one.
//! - A resolution that fails with [`ErrorKind::Exists`] did *not* wake the
//!   faulting threads: call [`Uffd::wake`].
//! - [`ErrorKind::Retry`] (`EAGAIN`) with no progress means a fork, mremap,
//!   `MADV_DONTNEED` or munmap is in flight and its event is not read yet:
//!   every resolution keeps failing until it is. Keep reading events while
//!   retrying.
//! - After [`Event::Remove`], serving the old contents of those pages again
//!   would be silent corruption: serve zeros.
//! - A [`Fork`] event owns a new fd; this crate closes it if the event is
//!   dropped unread.
//! - With [`Features::EVENT_FORK`], `fork()` in the served process sleeps
//!   until its Fork event is read, and glibc's `fork()` holds the malloc
//!   locks all that time: a handler in the *same* process that allocates
//!   then deadlocks. Serve forking processes from another process (or fork
//!   with the raw `clone` system call, as this crate's tests do).
//! - With [`Features::EVENT_FORK`], a forking thread sleeps until its Fork
//!   event is read, and nothing else wakes it: not even dropping every
//!   handle to the userfaultfd, because the half-made child holds a copy of
//!   it (and so does every earlier child that did not `exec`). A program
//!   that stops reading a uffd with `EVENT_FORK` while the process can still
//!   fork strands the forking thread for good. A [`Server`] that stops
//!   reads the forks queued by then (and closes their children's uffds);
//!   after that, keep a reader on the uffd, or make sure the process does
//!   not fork, until every copy of it is closed.
//! - Page sizes are not always 4096: use [`Uffd::page_size`] (and the huge
//!   page size for hugetlbfs).
//! - Many threads faulting on one page queue one message each: resolve once,
//!   the kernel wakes them all.
//!
//! # References
//!
//! - <https://docs.kernel.org/admin-guide/mm/userfaultfd.html>
//! - `userfaultfd(2)`, `ioctl_userfaultfd(2)`

#![cfg(target_os = "linux")]
#![warn(rust_2018_idioms)]

// The sync core: the ABI, the userfaultfd and its ioctls, events. Needs no
// runtime (`--no-default-features` builds only this).
mod error;
mod event;
mod flags;
mod pagemap;
pub mod sys;
mod uffd;

pub use error::{error_chain, Error, ErrorKind, Op, Result};
pub use event::{
    decode_message, Event, EventBuffer, FaultKind, Fork, PageFault, RawEvent, Remap, Remove, Unmap,
    DEFAULT_BATCH,
};
pub use flags::{
    ContinueFlags, CopyFlags, Features, Ioctls, MoveFlags, PageFaultFlags, PoisonFlags,
    RegisterMode, UnprotectFlags, ZeropageFlags,
};
pub use pagemap::{
    DirtyTracker, PageCategories, PageRange, Pagemap, ScanFlags, ScanQuery, DEFAULT_SCAN_REGIONS,
};
pub use uffd::{CreateMethod, Uffd, UffdBuilder};

// The async layer: the userfaultfd on Tokio's reactor and a `Stream` of its
// events (feature `async`, on by default).
#[cfg(feature = "async")]
mod asyncfd;
#[cfg(feature = "async")]
mod gate;

#[cfg(feature = "async")]
pub use asyncfd::{AsyncUffd, EventStream};

// The fault server and what it is built from: handlers, page sources,
// regions, statistics (feature `async`).
#[cfg(feature = "async")]
mod handler;
#[cfg(feature = "async")]
mod layout;
#[cfg(feature = "async")]
mod region;
#[cfg(feature = "async")]
mod server;
#[cfg(feature = "async")]
mod source;
#[cfg(feature = "async")]
mod stats;
#[cfg(feature = "async")]
mod trace;
#[cfg(feature = "async")]
mod working_set;

#[cfg(feature = "async")]
pub use error::{FailureAction, FaultFailure};
#[cfg(feature = "async")]
pub use handler::{FaultHandler, FaultRequest, HandlerError, Resolution, SourceHandler};
#[cfg(feature = "async")]
pub use region::{Region, SourceId};
#[cfg(feature = "async")]
pub use server::{thread_id, FailurePolicy, Fill, ForkPolicy, Server, ServerExit, ServerHandle};
#[cfg(feature = "async")]
pub use source::{BoxedSource, FileSource, MemorySource, MmapSource, PageSource, ZeroSource};
#[cfg(feature = "object-store")]
pub use source::{ObjectReadError, ObjectStoreSource, ObjectStoreSourceBuilder, ObjectStoreStats};
#[cfg(feature = "async")]
pub use stats::{Latency, Stall, Stats, StatsSnapshot};
#[cfg(feature = "async")]
pub use working_set::{PageRun, RecordedRegion, WorkingSet, WorkingSetError, WORKING_SET_VERSION};

/// The README's code, compiled as a doctest.
#[cfg(all(doctest, feature = "async"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
