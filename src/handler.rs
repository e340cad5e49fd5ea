//! The handler trait: how a fault is resolved.

use std::future::Future;

use crate::event::{FaultKind, Remap};
use crate::layout::SourceId;
use crate::source::PageSource;

/// The error type handlers return.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A fault (or a prefetch run around it) that the server asks a handler to
/// resolve. All addresses are page-aligned to `page_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultRequest {
    /// First byte of the range to resolve.
    pub addr: usize,
    /// Bytes to resolve: the faulting page, or a prefetch run of pages.
    pub len: usize,
    /// The page size of the memory (huge for hugetlbfs).
    pub page_size: usize,
    /// The faulting address as the kernel reported it.
    pub fault_addr: usize,
    /// Why the fault was raised.
    pub kind: FaultKind,
    /// Whether the faulting access was a write.
    pub write: bool,
    /// The faulting thread, when `THREAD_ID` was granted.
    pub thread_id: Option<u32>,
    /// The page source of the region (see [`Region::source`](crate::Region::source)),
    /// the first outside every region.
    pub source: SourceId,
    /// The offset of `addr` in that source; outside any region, `addr`.
    pub offset: u64,
    /// No thread waits on this request: the server is prefetching a
    /// recorded working set ([`Server::warm`](crate::Server::warm)) or
    /// filling memory in the background ([`Server::fill`](crate::Server::fill)).
    /// `fault_addr` is then `addr`, `kind` [`FaultKind::Missing`],
    /// `write` false and `thread_id` `None`.
    pub background: bool,
}

/// How to resolve a [`FaultRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resolution {
    /// Copy the buffer the handler filled (`UFFDIO_COPY`).
    Copy,
    /// Map zeros (`UFFDIO_ZEROPAGE`; a zeroed copy on hugetlbfs).
    Zero,
    /// Map the page already in the page cache (`UFFDIO_CONTINUE`), for minor
    /// faults.
    Continue,
    /// Remove write protection (`UFFDIO_WRITEPROTECT`), for write-protect
    /// faults.
    Unprotect,
    /// Poison the range (`UFFDIO_POISON`): the faulting thread gets `SIGBUS`.
    Poison,
    /// Only wake the waiting threads (someone else resolved the page).
    Wake,
}

/// Decides how faults are resolved; the [`Server`](crate::Server) calls it
/// from spawned tasks and handles every kernel edge case around it.
///
/// Only [`fault`](Self::fault) is required; the `on_*` methods see the
/// non-fault events after the server has updated its own state.
///
/// # Example
///
/// A handler of your own: pages of the first half come from memory (copied
/// straight from it, without a task), the second half is fetched
/// asynchronously, and a source error becomes the server's failure
/// policy (by default the faulting thread gets `SIGBUS`, and
/// [`Stats::first_failure`](crate::Stats::first_failure) says why).
///
/// ```
/// use tokio_uffd::{
///     AsyncUffd, FaultHandler, FaultRequest, HandlerError, Region, RegisterMode, Resolution,
///     Server, Uffd,
/// };
///
/// struct HalfAndHalf {
///     first_half: Vec<u8>,
/// }
///
/// impl FaultHandler for HalfAndHalf {
///     // In memory already: the server copies from here, no future at all.
///     fn bytes_for(&self, req: &FaultRequest) -> Option<&[u8]> {
///         let at = req.offset as usize;
///         self.first_half.get(at..at + req.len)
///     }
///
///     async fn fault<'a>(
///         &'a self,
///         req: &'a FaultRequest,
///         buf: &'a mut [u8],
///     ) -> Result<Resolution, HandlerError> {
///         // Stands in for a read from a file, a socket, an object store.
///         tokio::task::yield_now().await;
///         buf.fill((req.offset / req.page_size as u64) as u8);
///         Ok(Resolution::Copy)
///     }
/// }
///
/// # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let uffd = Uffd::new()?;
/// let page = uffd.page_size();
/// let len = 4 * page;
/// // SAFETY: a fresh anonymous mapping that nothing else uses.
/// let mem = unsafe {
///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// assert_ne!(mem, libc::MAP_FAILED);
/// let base = mem as usize;
/// // SAFETY: the mapping is ours, no reference into it exists, and only the
/// // server fills it.
/// unsafe { uffd.register(base, len, RegisterMode::MISSING)? };
///
/// let handler = HalfAndHalf { first_half: vec![7; len / 2] };
/// let server = Server::new(AsyncUffd::new(uffd)?, handler)
///     .regions([Region::new(base..base + len)])?
///     .spawn();
/// // Touch the memory from a plain thread, never from the server's runtime.
/// let bytes = tokio::task::spawn_blocking(move || {
///     (0..4).map(|p| unsafe { *((base + p * page) as *const u8) }).collect::<Vec<_>>()
/// })
/// .await?;
/// assert_eq!(bytes, [7, 7, 2, 3]);
/// // Final once the server has stopped (a woken thread can run before
/// // the statistics of its page are updated).
/// let stats = server.stats_ref();
/// server.shutdown().await?;
/// assert_eq!(stats.snapshot().pages_served, 4);
/// # unsafe { libc::munmap(mem, len) };
/// # Ok(())
/// # }
/// ```
pub trait FaultHandler: Send + Sync + 'static {
    /// Resolves `req`. For [`Resolution::Copy`], first fill `buf`
    /// (`req.len` bytes).
    ///
    /// # Errors
    ///
    /// Any error: the server applies its
    /// [`FailurePolicy`](crate::FailurePolicy) to the fault. A panic is
    /// caught and treated the same way.
    fn fault<'a>(
        &'a self,
        req: &'a FaultRequest,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<Resolution, HandlerError>> + Send + 'a;

    /// The contents of `req` if they are already in memory: the server then
    /// copies them straight into the page (`UFFDIO_COPY` from this slice)
    /// and does not call [`fault`](Self::fault). The default is `None`.
    fn bytes_for(&self, req: &FaultRequest) -> Option<&[u8]> {
        let _ = req;
        None
    }

    /// Pages in `start..end` were freed (`MADV_DONTNEED`/`MADV_REMOVE`). The
    /// server serves zeros there from now on.
    fn on_remove(&self, start: usize, end: usize) {
        let _ = (start, end);
    }

    /// `start..end` was unmapped; the server forgets it.
    fn on_unmap(&self, start: usize, end: usize) {
        let _ = (start, end);
    }

    /// A registered range moved; the server's regions move with it.
    fn on_remap(&self, remap: &Remap) {
        let _ = remap;
    }

    /// The process forked; see [`ForkPolicy`](crate::ForkPolicy).
    fn on_fork(&self) {}
}

/// The handler made from page sources: missing pages are copied from the
/// region's source, minor faults continued, write-protect faults
/// unprotected.
///
/// One source for every region:
///
/// ```no_run
/// # async fn f(uffd: tokio_uffd::AsyncUffd, base: usize) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio_uffd::{FileSource, Region, Server, SourceHandler};
///
/// let handler = SourceHandler::new(FileSource::open("mem.snap")?);
/// let server = Server::new(uffd, handler).regions([Region::new(base..base + (128 << 20))])?;
/// # Ok(()) }
/// ```
///
/// Sources of different kinds, each region naming its own:
///
/// ```no_run
/// # async fn f(uffd: tokio_uffd::AsyncUffd, base: usize) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio_uffd::{BoxedSource, FileSource, Region, Server, SourceHandler, ZeroSource};
///
/// let mut handler = SourceHandler::empty();
/// let snapshot = handler.add(BoxedSource::new(FileSource::open("mem.snap")?));
/// let fresh = handler.add(BoxedSource::new(ZeroSource));
/// let mid = base + (64 << 20);
/// let server = Server::new(uffd, handler).regions([
///     Region::new(base..mid).with_source(snapshot),
///     Region::new(mid..mid + (64 << 20)).with_source(fresh),
/// ])?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SourceHandler<S> {
    sources: Vec<S>,
}

impl<S: PageSource> SourceHandler<S> {
    /// A handler serving every region from `source` (whose id is the
    /// default [`SourceId`]).
    pub fn new(source: S) -> Self {
        Self {
            sources: vec![source],
        }
    }

    /// A handler with no source yet: [`add`](Self::add) them.
    pub fn empty() -> Self {
        Self {
            sources: Vec::new(),
        }
    }

    /// Adds a source; regions name it with the id returned
    /// ([`Region::with_source`](crate::Region::with_source)). Sources of
    /// different kinds go in one handler as [`BoxedSource`](crate::BoxedSource)s.
    pub fn add(&mut self, source: S) -> SourceId {
        self.sources.push(source);
        SourceId::new(self.sources.len() - 1)
    }

    /// A handler serving region `r` from `sources[r.source().index()]`.
    pub fn with_sources(sources: Vec<S>) -> Self {
        Self { sources }
    }
}

impl<S: PageSource> FaultHandler for SourceHandler<S> {
    fn bytes_for(&self, req: &FaultRequest) -> Option<&[u8]> {
        if req.kind != FaultKind::Missing {
            return None;
        }
        self.sources
            .get(req.source.index())?
            .bytes_at(req.offset, req.len)
    }

    async fn fault<'a>(
        &'a self,
        req: &'a FaultRequest,
        buf: &'a mut [u8],
    ) -> Result<Resolution, HandlerError> {
        Ok(match req.kind {
            FaultKind::Minor => Resolution::Continue,
            FaultKind::WriteProtect => Resolution::Unprotect,
            FaultKind::Missing => {
                let source = self.sources.get(req.source.index()).ok_or_else(|| {
                    format!(
                        "no page source with id {} (the handler has {}): \
                         give regions the ids SourceHandler::add returned",
                        req.source.index(),
                        self.sources.len()
                    )
                })?;
                source.read_at(req.offset, buf).await?;
                Resolution::Copy
            }
        })
    }
}

/// A shared handler: the test or program keeps a clone to look at its state.
impl<H: FaultHandler> FaultHandler for std::sync::Arc<H> {
    fn fault<'a>(
        &'a self,
        req: &'a FaultRequest,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<Resolution, HandlerError>> + Send + 'a {
        H::fault(self, req, buf)
    }

    fn bytes_for(&self, req: &FaultRequest) -> Option<&[u8]> {
        H::bytes_for(self, req)
    }

    fn on_remove(&self, start: usize, end: usize) {
        H::on_remove(self, start, end)
    }

    fn on_unmap(&self, start: usize, end: usize) {
        H::on_unmap(self, start, end)
    }

    fn on_remap(&self, remap: &Remap) {
        H::on_remap(self, remap)
    }

    fn on_fork(&self) {
        H::on_fork(self)
    }
}
