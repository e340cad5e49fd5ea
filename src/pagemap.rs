//! `PAGEMAP_SCAN` (Linux 6.7+) on `/proc/self/pagemap`, typed and safe, and
//! the dirty-page tracker built on it.
//!
//! With a userfaultfd that has [`Features::WP_ASYNC`], a range registered
//! with [`RegisterMode::WP`] and write-protected once is tracked by the
//! kernel alone: the first write to a protected page is resolved in the
//! kernel (the page is just marked written, no message, no sleep), and
//! `PAGEMAP_SCAN` reports the written pages in bulk and can write-protect
//! them again in the same call. [`DirtyTracker`] does exactly that, one
//! [`round`](DirtyTracker::round) at a time; [`Pagemap`] is the scan itself
//! for any category query.
//!
//! # References
//!
//! - [`ioctl_pagemap_scan(2)`](https://man7.org/linux/man-pages/man2/ioctl_pagemap_scan.2.html)
//! - <https://docs.kernel.org/admin-guide/mm/pagemap.html>
//! - <https://docs.kernel.org/admin-guide/mm/userfaultfd.html#write-protect-notifications>

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;

use crate::error::{Error, Op, Result};
use crate::flags::{Features, RegisterMode};
use crate::sys;
use crate::uffd::{Uffd, UffdBuilder};

bitflags::bitflags! {
    /// `PAGE_IS_*`: the categories `PAGEMAP_SCAN` matches pages by and
    /// reports for each range.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageCategories: u64 {
        /// `PAGE_IS_WPALLOWED`: the page is registered for asynchronous write
        /// protection.
        const WPALLOWED = sys::PAGE_IS_WPALLOWED;
        /// `PAGE_IS_WRITTEN`: the page was written since it was last
        /// write-protected.
        const WRITTEN = sys::PAGE_IS_WRITTEN;
        /// `PAGE_IS_FILE`: the page is file-backed.
        const FILE = sys::PAGE_IS_FILE;
        /// `PAGE_IS_PRESENT`: the page is in memory.
        const PRESENT = sys::PAGE_IS_PRESENT;
        /// `PAGE_IS_SWAPPED`: the page is swapped out.
        const SWAPPED = sys::PAGE_IS_SWAPPED;
        /// `PAGE_IS_PFNZERO`: the page is the shared zero page.
        const PFNZERO = sys::PAGE_IS_PFNZERO;
        /// `PAGE_IS_HUGE`: the page is part of a THP or hugetlb page.
        const HUGE = sys::PAGE_IS_HUGE;
        /// `PAGE_IS_SOFT_DIRTY`: the page's soft-dirty bit is set.
        const SOFT_DIRTY = sys::PAGE_IS_SOFT_DIRTY;
    }
}

bitflags::bitflags! {
    /// `PM_SCAN_*`: what `PAGEMAP_SCAN` does besides reporting.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ScanFlags: u64 {
        /// `PM_SCAN_WP_MATCHING`: write-protect the matching pages again,
        /// atomically with reporting them.
        const WP_MATCHING = sys::PM_SCAN_WP_MATCHING;
        /// `PM_SCAN_CHECK_WPASYNC`: fail (`EPERM`) when the scan meets
        /// mapped memory without asynchronous write protection.
        const CHECK_WPASYNC = sys::PM_SCAN_CHECK_WPASYNC;
    }
}

/// What a [`Pagemap::scan`] matches and reports, as the fields of
/// `struct pm_scan_arg` of the same names.
///
/// A page matches when every category of `category_mask` is set (or, for
/// those also in `category_inverted`, clear) and, if `category_anyof_mask`
/// is not empty, at least one of those is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanQuery {
    /// `PM_SCAN_*` flags.
    pub flags: ScanFlags,
    /// Categories that match when clear instead of set.
    pub category_inverted: PageCategories,
    /// Categories that must all match.
    pub category_mask: PageCategories,
    /// Categories of which at least one must match (empty: no condition).
    pub category_anyof_mask: PageCategories,
    /// Categories reported in each [`PageRange`]. Must not be empty.
    pub return_mask: PageCategories,
}

impl ScanQuery {
    /// The pages written since they were last write-protected.
    pub fn written() -> Self {
        Self {
            flags: ScanFlags::empty(),
            category_inverted: PageCategories::empty(),
            category_mask: PageCategories::WRITTEN,
            category_anyof_mask: PageCategories::empty(),
            return_mask: PageCategories::WRITTEN,
        }
    }

    /// The pages written since they were last write-protected, protected
    /// again in the same call; fails if the range holds memory without
    /// asynchronous write protection (`WP_MATCHING | CHECK_WPASYNC`).
    pub fn written_and_reprotect() -> Self {
        Self {
            flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
            ..Self::written()
        }
    }
}

/// A run of pages with the same reported categories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRange {
    /// The addresses, page-aligned, end exclusive.
    pub range: Range<usize>,
    /// The categories of these pages, limited to the query's `return_mask`.
    pub categories: PageCategories,
}

/// Output entries per `PAGEMAP_SCAN` call by default: 24 KiB of buffer.
pub const DEFAULT_SCAN_REGIONS: usize = 1024;

/// `/proc/self/pagemap`, opened once, with a reusable output buffer for
/// `PAGEMAP_SCAN`.
///
/// A scan that finds more ranges than the buffer holds is continued from
/// where the kernel stopped, so the buffer size only decides the number of
/// system calls, never the result.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
    page_size: usize,
    buf: Vec<sys::page_region>,
    calls: u64,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap` with room for [`DEFAULT_SCAN_REGIONS`]
    /// ranges per call.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] if the file cannot be opened (no procfs).
    pub fn open() -> Result<Self> {
        Self::with_capacity(DEFAULT_SCAN_REGIONS)
    }

    /// Opens `/proc/self/pagemap` with room for `regions` ranges (at least
    /// one) per `PAGEMAP_SCAN` call.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] if the file cannot be opened (no procfs).
    pub fn with_capacity(regions: usize) -> Result<Self> {
        // std opens with O_CLOEXEC.
        let file = File::open("/proc/self/pagemap").map_err(|source| Error::Os {
            what: "opening /proc/self/pagemap",
            source,
        })?;
        Ok(Self {
            file,
            page_size: sys::page_size(),
            buf: vec![sys::page_region::default(); regions.max(1)],
            calls: 0,
        })
    }

    /// How many `PAGEMAP_SCAN` calls this scanner made so far.
    pub fn ioctl_calls(&self) -> u64 {
        self.calls
    }

    /// Scans `start..end` for the pages `query` matches and appends them to
    /// `out` as ranges, adjacent ranges with equal categories merged (also
    /// with the last range already in `out`). With
    /// [`ScanFlags::WP_MATCHING`] the reported pages are write-protected
    /// again in the same call.
    ///
    /// Unmapped holes in the range are skipped.
    ///
    /// # Errors
    ///
    /// [`Error::PagemapScanUnsupported`] if the kernel lacks `PAGEMAP_SCAN` (before
    /// Linux 6.7, `ENOTTY`); [`Error::Os`] for a range that is not
    /// page-aligned or empty, and for the kernel's other errors (`EPERM`
    /// with [`ScanFlags::CHECK_WPASYNC`] where memory without asynchronous
    /// write protection is met). Ranges found before an error are in `out`.
    pub fn scan(
        &mut self,
        start: usize,
        end: usize,
        query: &ScanQuery,
        out: &mut Vec<PageRange>,
    ) -> Result<()> {
        self.scan_with(start, end, query, |range, categories| {
            if let Some(last) = out.last_mut() {
                if last.range.end == range.start && last.categories == categories {
                    last.range.end = range.end;
                    return;
                }
            }
            out.push(PageRange { range, categories });
        })
    }

    /// Like [`scan`](Self::scan), but hands each range the kernel reports to
    /// `each` instead of collecting them (not merged: a range that crossed
    /// the end of one call's buffer comes in two pieces).
    ///
    /// # Errors
    ///
    /// As for [`scan`](Self::scan).
    pub fn scan_with(
        &mut self,
        start: usize,
        end: usize,
        query: &ScanQuery,
        mut each: impl FnMut(Range<usize>, PageCategories),
    ) -> Result<()> {
        if start % self.page_size != 0 || end % self.page_size != 0 || start >= end {
            return Err(Error::Os {
                what: "PAGEMAP_SCAN: start and end must be page-aligned, start before end",
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut cursor = start;
        while cursor < end {
            let mut arg = sys::pm_scan_arg {
                flags: query.flags.bits(),
                start: cursor as u64,
                end: end as u64,
                category_inverted: query.category_inverted.bits(),
                category_mask: query.category_mask.bits(),
                category_anyof_mask: query.category_anyof_mask.bits(),
                return_mask: query.return_mask.bits(),
                ..Default::default()
            };
            self.calls += 1;
            // SAFETY: `self.file` is /proc/self/pagemap, opened above;
            // write-protecting pages of our own process is allowed.
            let n = unsafe { sys::pagemap_scan(self.file.as_fd(), &mut arg, &mut self.buf) }
                .map_err(scan_error)?;
            for r in &self.buf[..n] {
                each(
                    r.start as usize..r.end as usize,
                    PageCategories::from_bits_retain(r.categories),
                );
            }
            let walk_end = arg.walk_end as usize;
            if walk_end <= cursor {
                // No progress: nothing more the kernel will report.
                break;
            }
            cursor = walk_end;
        }
        Ok(())
    }
}

fn scan_error(source: io::Error) -> Error {
    match source.raw_os_error() {
        Some(libc::ENOTTY) => Error::PagemapScanUnsupported { source },
        Some(libc::EPERM) => Error::Os {
            what: "PAGEMAP_SCAN with CHECK_WPASYNC met memory that is not registered for \
                   asynchronous write protection (unregistered, or unmapped and mapped again)",
            source,
        },
        Some(libc::EINVAL) => Error::Os {
            what: "PAGEMAP_SCAN rejected its arguments (a kernel before 6.7 may also answer so)",
            source,
        },
        _ => Error::Os {
            what: "PAGEMAP_SCAN on /proc/self/pagemap",
            source,
        },
    }
}

/// Dirty-page tracking without faults in user space: asynchronous write
/// protection (`WP_ASYNC`, Linux 6.7+) read out with `PAGEMAP_SCAN`.
///
/// [`track`](Self::track) registers a range and write-protects it once;
/// from then on the kernel resolves every write fault itself and marks the
/// page written. Each [`round`](Self::round) returns the pages written
/// since the previous round and write-protects them again, atomically with
/// the scan: a page written while the scan runs is reported by this round
/// or by the next, never lost. Works on anonymous, shmem and hugetlb memory
/// (hugetlb pages are reported whole).
///
/// The tracker owns its userfaultfd. The process must not `fork()` while
/// relying on the results: the child gets copies of write-protected pages.
///
/// # Example
///
/// ```
/// use tokio_uffd::DirtyTracker;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut tracker = match DirtyTracker::new() {
///     Ok(t) => t,
///     // Kernels before 6.7, or no userfaultfd allowed here.
///     Err(e) => { eprintln!("no dirty tracking here: {e}"); return Ok(()); }
/// };
/// let page = tracker.uffd().page_size();
/// let mut mem = vec![0u8; 64 * page + page];
/// // A page-aligned window of the buffer.
/// let start = (mem.as_ptr() as usize).next_multiple_of(page);
/// // SAFETY: the window is ours; with WP_ASYNC no thread ever waits on it
/// // and its contents never change behind our back.
/// unsafe { tracker.track(start, 64 * page)? };
/// let off = start - mem.as_ptr() as usize;
/// mem[off + 3 * page] = 1;
/// mem[off + 4 * page + 7] = 2;
/// mem[off + 10 * page] = 3;
/// let dirty = tracker.round()?.to_vec();
/// assert_eq!(dirty, [start + 3 * page..start + 5 * page, start + 10 * page..start + 11 * page]);
/// assert!(tracker.round()?.is_empty());
/// # drop(tracker);
/// # drop(mem);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DirtyTracker {
    uffd: Uffd,
    pagemap: Pagemap,
    tracked: Vec<Range<usize>>,
    dirty: Vec<Range<usize>>,
}

impl DirtyTracker {
    /// The builder a tracker's userfaultfd needs: `WP_ASYNC` required,
    /// `WP_UNPOPULATED` (write protection of never-touched pages) and
    /// `WP_HUGETLBFS_SHMEM` (shmem and hugetlb memory) wanted.
    pub fn builder() -> UffdBuilder {
        UffdBuilder::new()
            .require(Features::WP_ASYNC)
            .want(Features::WP_UNPOPULATED | Features::WP_HUGETLBFS_SHMEM)
    }

    /// A tracker on a new userfaultfd from [`builder`](Self::builder).
    ///
    /// # Errors
    ///
    /// [`Error::MissingFeatures`] on kernels before 6.7 (no `WP_ASYNC`);
    /// the errors of [`UffdBuilder::create`] and [`Pagemap::open`].
    pub fn new() -> Result<Self> {
        Self::from_uffd(Self::builder().create()?)
    }

    /// A tracker on `uffd`, which must have [`Features::WP_ASYNC`] (see
    /// [`builder`](Self::builder)). A userfaultfd with `WP_ASYNC` never
    /// reports write-protect faults, so it should serve nothing else.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] if `uffd` lacks `WP_ASYNC`; the errors of
    /// [`Pagemap::open`].
    pub fn from_uffd(uffd: Uffd) -> Result<Self> {
        if !uffd.features().contains(Features::WP_ASYNC) {
            return Err(Error::Unsupported {
                op: Op::WriteProtect,
                needs: Features::WP_ASYNC,
                has: uffd.features(),
                hint: "asynchronous dirty tracking needs Linux 6.7 or later; build the \
                       userfaultfd with DirtyTracker::builder() (it requires WP_ASYNC)",
            });
        }
        Ok(Self {
            uffd,
            pagemap: Pagemap::open()?,
            tracked: Vec::new(),
            dirty: Vec::new(),
        })
    }

    /// The tracker's userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The scanner, for its statistics ([`Pagemap::ioctl_calls`]).
    pub fn pagemap(&self) -> &Pagemap {
        &self.pagemap
    }

    /// Replaces the scanner, for example by one with a smaller output
    /// buffer ([`Pagemap::with_capacity`]).
    pub fn set_pagemap(&mut self, pagemap: Pagemap) {
        self.pagemap = pagemap;
    }

    /// The tracked ranges, in the order they were added.
    pub fn tracked(&self) -> &[Range<usize>] {
        &self.tracked
    }

    /// Starts tracking `start..start+len`: registers it with
    /// [`RegisterMode::WP`] and write-protects it. Writes from then on are
    /// reported by the next [`round`](Self::round).
    ///
    /// The range must be mapped memory of this process, page-aligned
    /// (huge-page aligned for hugetlb), and not registered with another
    /// userfaultfd.
    ///
    /// # Safety
    ///
    /// As for [`Uffd::register`]: the caller hands the range to this
    /// userfaultfd. With `WP_ASYNC` no thread ever waits for it and no
    /// content changes, but the caller promises that nothing else relies on
    /// the range's protection or userfaultfd registration (another
    /// userfaultfd user of the range, an `mprotect` scheme) while it is
    /// tracked.
    ///
    /// # Errors
    ///
    /// The errors of [`Uffd::register`] and [`Uffd::write_protect`]; the
    /// range is not tracked then.
    pub unsafe fn track(&mut self, start: usize, len: usize) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.uffd.register(start, len, RegisterMode::WP)? };
        if let Err(e) = self.uffd.write_protect(start, len) {
            let _ = self.uffd.unregister(start, len);
            return Err(e);
        }
        self.tracked.push(start..start + len);
        Ok(())
    }

    /// Stops tracking `start..start+len`, which must be a range given to
    /// [`track`](Self::track), and unregisters it (unless it is already
    /// unmapped).
    ///
    /// # Errors
    ///
    /// [`Error::Os`] (`ENOENT`) if the range is not tracked; the errors of
    /// [`Uffd::unregister`] (the range is forgotten anyway), except that a
    /// range unmapped or moved since is no error.
    pub fn untrack(&mut self, start: usize, len: usize) -> Result<()> {
        let Some(i) = self
            .tracked
            .iter()
            .position(|r| r.start == start && r.end == start + len)
        else {
            return Err(Error::Os {
                what: "DirtyTracker::untrack: the range is not tracked",
                source: io::Error::from_raw_os_error(libc::ENOENT),
            });
        };
        self.tracked.remove(i);
        match self.uffd.unregister(start, len) {
            // Unmapped (or moved away with mremap) since it was tracked: the
            // kernel has nothing to unregister there.
            Err(e)
                if matches!(
                    e.kind(),
                    crate::ErrorKind::InvalidInput | crate::ErrorKind::RangeGone
                ) =>
            {
                Ok(())
            }
            result => result,
        }
    }

    /// The pages written since the previous round (or since they were
    /// tracked), as sorted, merged ranges, write-protected again by the same
    /// `PAGEMAP_SCAN` call that found them. No fault reaches user space.
    ///
    /// A tracked range that was unmapped reports nothing (the kernel skips
    /// holes); one that was mapped again with other memory fails with
    /// [`Error::Os`] (`EPERM`): [`untrack`](Self::untrack) it.
    ///
    /// # Errors
    ///
    /// The errors of [`Pagemap::scan`]; the dirty pages of the ranges
    /// scanned before the error are lost for this round, but stay
    /// unprotected only where the scan did not reach.
    pub fn round(&mut self) -> Result<&[Range<usize>]> {
        self.dirty.clear();
        let query = ScanQuery::written_and_reprotect();
        let dirty = &mut self.dirty;
        for r in &self.tracked {
            self.pagemap.scan_with(r.start, r.end, &query, |range, _| {
                if let Some(last) = dirty.last_mut() {
                    if last.end == range.start {
                        last.end = range.end;
                        return;
                    }
                }
                dirty.push(range);
            })?;
        }
        if !self.dirty.is_sorted_by_key(|r| r.start) {
            self.dirty.sort_unstable_by_key(|r| r.start);
            merge_sorted(&mut self.dirty);
        }
        Ok(&self.dirty)
    }
}

/// Merges touching or overlapping neighbours of a sorted list in place.
fn merge_sorted(v: &mut Vec<Range<usize>>) {
    let mut w = 0;
    for i in 1..v.len() {
        if v[i].start <= v[w].end {
            v[w].end = v[w].end.max(v[i].end);
        } else {
            w += 1;
            v[w] = v[i].clone();
        }
    }
    v.truncate((w + 1).min(v.len()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_categories_match_the_header() {
        assert_eq!(PageCategories::WRITTEN.bits(), 1 << 1);
        assert_eq!(PageCategories::SOFT_DIRTY.bits(), 1 << 7);
        assert_eq!(ScanFlags::CHECK_WPASYNC.bits(), 1 << 1);
    }

    #[test]
    fn pagemap_merge_sorted_joins_neighbours() {
        let mut v = vec![0..2, 2..4, 3..5, 7..8, 9..10, 10..12];
        merge_sorted(&mut v);
        assert_eq!(v, [0..5, 7..8, 9..12]);
        let mut e: Vec<Range<usize>> = Vec::new();
        merge_sorted(&mut e);
        assert!(e.is_empty());
    }

    #[test]
    fn pagemap_scan_missing_from_the_kernel_is_unsupported() {
        // What a kernel before 6.7 answers: pagemap has no ioctls there.
        let e = scan_error(io::Error::from_raw_os_error(libc::ENOTTY));
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        let msg = e.to_string();
        assert!(
            msg.contains("PAGEMAP_SCAN") && msg.contains("Linux 6.7"),
            "{msg}"
        );
    }

    #[test]
    fn pagemap_rejects_unaligned_ranges() {
        let mut pm = Pagemap::open().unwrap();
        let page = sys::page_size();
        let mut out = Vec::new();
        assert!(pm.scan(1, page, &ScanQuery::written(), &mut out).is_err());
        assert!(pm
            .scan(page, page, &ScanQuery::written(), &mut out)
            .is_err());
    }

    #[test]
    fn pagemap_scan_reports_present_pages() {
        let page = sys::page_size();
        let mut mem = vec![0u8; 33 * page];
        let start = (mem.as_ptr() as usize).next_multiple_of(page);
        let off = start - mem.as_ptr() as usize;
        for i in 0..32 {
            mem[off + i * page] = 1;
        }
        let query = ScanQuery {
            category_mask: PageCategories::PRESENT,
            return_mask: PageCategories::PRESENT,
            ..Default::default()
        };
        let mut big = Pagemap::open().unwrap();
        let mut a = Vec::new();
        match big.scan(start, start + 32 * page, &query, &mut a) {
            Err(e) if e.kind() == crate::ErrorKind::Unsupported => {
                eprintln!("*** SKIPPED: {e} ***");
                return;
            }
            r => r.unwrap(),
        }
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].range, start..start + 32 * page);
        assert_eq!(big.ioctl_calls(), 1);
        std::hint::black_box(&mem);
    }
}
