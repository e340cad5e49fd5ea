//! [`Region`]s, the ranges of registered memory a server serves, and the
//! [`SourceId`]s that name their page sources. Checked by the server when
//! they are given to it (`layout::checked_regions`).

/// Which page source serves a [`Region`]: what
/// [`SourceHandler::add`](crate::SourceHandler::add) returns, or any number
/// a handler of your own gives meaning to. The default is the first
/// source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceId(usize);

impl SourceId {
    /// The source at `index` (in the order they were added).
    pub const fn new(index: usize) -> Self {
        Self(index)
    }

    /// Its index.
    pub const fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for SourceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "source {}", self.0)
    }
}

/// A range of registered memory and where its contents come from.
///
/// Like Firecracker's `GuestRegionUffdMapping`: the bytes at
/// `start() + i` are the bytes at `offset() + i` of the page source
/// `source()`. Built from its address range, each other property named:
///
/// ```
/// use tokio_uffd::{Region, SourceId};
///
/// let base = 0x7f00_0000_0000;
/// let guest = Region::new(base..base + (256 << 20))
///     .with_page_size(2 << 20) // hugetlbfs; the default is the base page size
///     .with_offset(0x1000_0000) // where it starts in the snapshot file
///     .with_source(SourceId::new(1));
/// assert_eq!(guest.len(), 256 << 20);
/// ```
///
/// A region is checked when it is given to
/// [`Server::regions`](crate::Server::regions): a page size that is not a
/// power of two (or smaller than the base page size), a start or length
/// not aligned to it, an empty range, a range that overflows the address
/// space or the source's offsets, or regions that overlap are each a clear
/// error there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    pub(crate) start: usize,
    pub(crate) len: usize,
    /// The page size given, if any.
    pub(crate) given_page_size: Option<usize>,
    /// The page size in use: 0 until the server has checked the region.
    pub(crate) page_size: usize,
    pub(crate) source: SourceId,
    pub(crate) offset: u64,
}

impl Region {
    /// The memory `range`, with the base page size, served from offset 0
    /// of the first source.
    pub fn new(range: std::ops::Range<usize>) -> Self {
        Self {
            start: range.start,
            // A reversed range is empty, and rejected as such.
            len: range.end.saturating_sub(range.start),
            given_page_size: None,
            page_size: 0,
            source: SourceId::default(),
            offset: 0,
        }
    }

    /// The page size of the mapping: the huge page size for hugetlbfs.
    pub fn with_page_size(mut self, bytes: usize) -> Self {
        self.given_page_size = Some(bytes);
        self
    }

    /// Where `start()` is in the page source.
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// The page source that serves the region.
    pub fn with_source(mut self, source: SourceId) -> Self {
        self.source = source;
        self
    }

    /// First byte.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (which [`Server::regions`](crate::Server::regions)
    /// rejects).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the last byte.
    pub fn end(&self) -> usize {
        self.start.wrapping_add(self.len)
    }

    /// The page size given, or `None` for the base page size.
    pub fn page_size(&self) -> Option<usize> {
        self.given_page_size
    }

    /// Where `start()` is in the page source.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The page source that serves the region.
    pub fn source(&self) -> SourceId {
        self.source
    }

    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr >= self.start && addr - self.start < self.len
    }
}
