//! Memory mappings of this process: the owner probe's inaccessible page,
//! the read-only file mappings page sources copy from, and whether a
//! mapping's pages are in memory (`mincore(2)`).

use std::io;
use std::num::NonZeroUsize;
#[cfg(feature = "async")]
use std::os::fd::BorrowedFd;
#[cfg(feature = "async")]
use std::ptr::NonNull;

#[cfg(feature = "async")]
use nix::sys::mman::MmapAdvise;
use nix::sys::mman::{MapFlags, ProtFlags};

/// `vm.mmap_min_addr` from `/proc/sys/vm/mmap_min_addr`, or `None` if it
/// cannot be read (no procfs, a sandbox).
pub(crate) fn mmap_min_addr() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Maps one page that nothing can read or write (`PROT_NONE`, shared
/// anonymous, `MAP_NORESERVE`) and returns its address. With `Some(addr)`
/// the page goes exactly there or nowhere (`MAP_FIXED_NOREPLACE`: an
/// existing mapping is never replaced; kernels before 4.17 treat the flag as
/// a hint, so a page placed elsewhere is unmapped again and reported as
/// `EEXIST`). With `None` the kernel picks the address.
///
/// The page is never unmapped: it is the owner probe's source (see
/// `Uffd::owner_exited`), whose whole point is that a read of it fails.
pub(crate) fn map_inaccessible_page(addr: Option<usize>, page_size: usize) -> io::Result<usize> {
    let mut flags = MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE;
    if addr.is_some() {
        flags |= MapFlags::MAP_FIXED_NOREPLACE;
    }
    let len = NonZeroUsize::new(page_size).ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
    // `None` is a null hint, which MAP_FIXED_NOREPLACE takes as address 0.
    let hint = addr.and_then(NonZeroUsize::new);
    // SAFETY: a new inaccessible mapping; MAP_FIXED_NOREPLACE never replaces
    // an existing one, so no memory of this process changes.
    let p = unsafe { nix::sys::mman::mmap_anonymous(hint, len, ProtFlags::PROT_NONE, flags) }?;
    if let Some(want) = addr {
        if p.as_ptr() as usize != want {
            // SAFETY: unmapping the page this call just mapped.
            let _ = unsafe { nix::sys::mman::munmap(p, page_size) };
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
    }
    Ok(p.as_ptr() as usize)
}

/// Pages whose residency one `mincore(2)` call reports: 4 MiB of 4 KiB
/// pages, the server's largest fault-around window, in one call (and one
/// KiB of stack).
#[cfg(feature = "async")]
const RESIDENCY_CHUNK: usize = 1024;

/// A read-only shared mapping of the start of a file (`PROT_READ`,
/// `MAP_SHARED`, at an address the kernel picks), unmapped when dropped.
///
/// Mapping a file and asking which of its pages are in memory are safe;
/// reading the mapping is not ([`bytes`](Self::bytes) is `unsafe`): a read
/// of a page past the end of a file that shrank after it was mapped raises
/// `SIGBUS`, and bytes that someone writes to the file change under a
/// `&[u8]`.
#[cfg(feature = "async")]
pub(crate) struct FileMapping {
    ptr: NonNull<u8>,
    /// Bytes mapped: the length asked for, rounded up to whole pages (the
    /// kernel maps whole pages; past the end of the file, the last one
    /// reads zero).
    len: usize,
    page_size: usize,
}

// SAFETY: a `FileMapping` is a range of this process's address space that
// only it unmaps (in `drop`, which takes it by value, so no borrow of it is
// alive then). It is mapped `PROT_READ` and nothing in this crate writes to
// it; the only ways to use it are `mincore(2)` (the kernel reads page
// tables) and `bytes`, whose `&[u8]` may be read from any thread as any
// shared byte slice can, under the promise its caller makes. So moving the
// owner to another thread, and sharing `&FileMapping` between threads, are
// as sound as they are for a `Box<[u8]>` that nobody writes.
#[cfg(feature = "async")]
unsafe impl Send for FileMapping {}
// SAFETY: see `Send` above: shared access is read-only.
#[cfg(feature = "async")]
unsafe impl Sync for FileMapping {}

#[cfg(feature = "async")]
impl FileMapping {
    /// Maps the first `len` bytes of `file` read-only and shared.
    ///
    /// `MAP_SHARED` on a file opened read-only can never be made writable
    /// (`mprotect(PROT_WRITE)` fails with `EACCES`), gets no private copies
    /// of pages, and is charged to no overcommit account: it is a window on
    /// the page cache, which is all a page source needs.
    ///
    /// # Errors
    ///
    /// `EINVAL` for `len` 0; `ENOMEM` if `len` rounded up to pages
    /// overflows; the error of `mmap(2)`, for example `ENODEV` for a file
    /// whose file system cannot map it (procfs, sysfs attributes).
    ///
    /// # References
    ///
    /// - [`mmap(2)`](https://man7.org/linux/man-pages/man2/mmap.2.html)
    pub(crate) fn map(file: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        let page_size = super::page_size();
        let asked = NonZeroUsize::new(len).ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        let mapped = len
            .checked_next_multiple_of(page_size)
            .ok_or(io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new mapping at an address the kernel picks (no hint, no
        // MAP_FIXED): no memory of this process changes. It is readable
        // only, so nothing is ever written through it to the file.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                asked,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                file,
                0,
            )
        }?;
        Ok(Self {
            ptr: p.cast(),
            len: mapped,
            page_size,
        })
    }

    /// Bytes mapped (the length mapped, rounded up to whole pages).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether every page of `offset..offset + len` is in memory (see
    /// [`residency`](Self::residency)).
    #[cfg(test)]
    pub(crate) fn resident(&self, offset: usize, len: usize) -> io::Result<bool> {
        let mut all = true;
        self.residency(offset, len, |_, resident| all &= resident)?;
        Ok(all)
    }

    /// Calls `page(i, resident)` for each page `i` (counted from the one
    /// holding `offset`) that `offset..offset + len` of the mapping
    /// touches, with whether it is in memory (in the page cache, for a
    /// file): `mincore(2)`, one call per [`RESIDENCY_CHUNK`] pages.
    ///
    /// The kernel answers truthfully only to a process that owns the file,
    /// could open it for writing, or has `CAP_FOWNER` (since Linux 5.0;
    /// page-cache residency of other files is a side channel); to any other
    /// it reports every page resident.
    ///
    /// # Errors
    ///
    /// `EINVAL` if the range is not inside the mapping; the error of
    /// `mincore(2)` (`EAGAIN`: the kernel is short of memory).
    ///
    /// # References
    ///
    /// - [`mincore(2)`](https://man7.org/linux/man-pages/man2/mincore.2.html)
    pub(crate) fn residency(
        &self,
        offset: usize,
        len: usize,
        mut page: impl FnMut(usize, bool),
    ) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        let first = offset - offset % self.page_size;
        let mut at = first;
        let mut vec = [0u8; RESIDENCY_CHUNK];
        while at < end {
            let pages = (end - at).div_ceil(self.page_size).min(RESIDENCY_CHUNK);
            let bytes = pages * self.page_size;
            let addr = (self.ptr.as_ptr() as usize + at) as *mut libc::c_void;
            // Raw libc: nix has no `mincore`.
            // SAFETY: `addr..addr + bytes` is page-aligned and inside this
            // mapping (`at` is page-aligned, `at + bytes` is at most the
            // page-rounded `self.len`), so the kernel only reads the page
            // tables and page cache behind it; `vec` has room for `pages`
            // bytes, one per page, which is all the kernel writes.
            let ret = unsafe { libc::mincore(addr, bytes, vec.as_mut_ptr()) };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
            // Only the lowest bit of each byte is defined: resident.
            let base = (at - first) / self.page_size;
            for (i, v) in vec[..pages].iter().enumerate() {
                page(base + i, v & 1 == 1);
            }
            at += bytes;
        }
        Ok(())
    }

    /// Faults the pages of `offset..offset + len` of the mapping in as a
    /// read of them would (`madvise(MADV_POPULATE_READ)`, Linux 5.14+),
    /// without reading them: a page not in the page cache is read from the
    /// file, with the read-around the kernel does for a fault on a file
    /// mapping (the device's read-ahead size, unless the kernel saw that
    /// read-around does not pay here). Blocks for the disk.
    ///
    /// # Errors
    ///
    /// `EINVAL` if the range is not inside the mapping, or on kernels
    /// before 5.14; `EFAULT` where a read would raise `SIGBUS` (a page past
    /// the end of a file that shrank): the kernel reports it instead of
    /// signalling; `ENOMEM`, `EINTR` and the like.
    ///
    /// # References
    ///
    /// - [`madvise(2)`](https://man7.org/linux/man-pages/man2/madvise.2.html)
    pub(crate) fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        let start = offset - offset % self.page_size;
        if end == start {
            return Ok(());
        }
        let addr = NonNull::new((self.ptr.as_ptr() as usize + start) as *mut libc::c_void)
            .ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `start..end` is inside this mapping (`start` page-aligned,
        // `end` at most `self.len`). MADV_POPULATE_READ only fills page
        // tables and the page cache as a read would, changes no byte of any
        // memory, and fails with EFAULT where a read would raise SIGBUS.
        unsafe { nix::sys::mman::madvise(addr, end - start, MmapAdvise::MADV_POPULATE_READ) }?;
        Ok(())
    }

    /// The `len` bytes at `offset` of the mapping, or `None` if they are
    /// not all inside it.
    ///
    /// # Safety
    ///
    /// While the slice is alive, the file must not shrink below
    /// `offset + len` (a read of a page past its end raises `SIGBUS`; the
    /// kernel reading it for an ioctl fails that call with `EFAULT`
    /// instead), and nobody may change those bytes of the file (by
    /// `write(2)`, through a writable mapping, in another process or, on a
    /// network file system, on another machine): the bytes behind a `&[u8]`
    /// must not change.
    pub(crate) unsafe fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset..end` is inside the mapping, which is readable and
        // stays mapped while `self` is borrowed (it is unmapped only on
        // drop); the caller promises that the file behind it neither shrinks
        // nor changes while the slice is alive.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) })
    }
}

#[cfg(feature = "async")]
impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: `self` made this mapping and is its only owner; every slice
        // of it borrowed `self`, so none is alive now, and nothing else
        // refers to the range.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(feature = "async")]
impl std::fmt::Debug for FileMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let start = self.ptr.as_ptr() as usize;
        write!(f, "FileMapping({start:#x}..{:#x})", start + self.len)
    }
}
