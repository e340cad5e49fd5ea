//! [`MmapSource`]: a file mapped read-only, whose pages in the page cache
//! are copied straight from the mapping.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::file::{adopt_regular, open_regular, Opened};
use super::{available, PageSource};
use crate::sys::FileMapping;

/// A source backed by a file (a VM memory snapshot) mapped read-only: the
/// pages the page cache holds are copied straight from the mapping, as in
/// Firecracker's example userfaultfd handler.
///
/// # How a fault is served
///
/// [`bytes_at`](PageSource::bytes_at) hands the server a slice of the
/// mapping, and the server resolves the fault with one `UFFDIO_COPY` from
/// it, on its reader: the kernel copies the bytes from the page cache into
/// the faulting page. No task, no hop to the blocking pool, no buffer.
/// [`FileSource`](crate::FileSource) instead reads every page with
/// `pread(2)` on the blocking pool into a buffer, and copies that.
///
/// # A cold page cache
///
/// A page of the file that is not in memory would be read from the disk
/// *inside* that `UFFDIO_COPY`, on the reader, and every other fault would
/// wait behind the read. So `bytes_at` first asks `mincore(2)` whether
/// every page of the range is in the page cache (one system call for up to
/// 4 MiB) and returns `None` when one is not. The server then calls
/// [`read_at`](PageSource::read_at) in a task of its own, which works on
/// Tokio's blocking pool: it faults the range into the page cache as a read
/// of the mapping would, with the kernel's read-around
/// (`madvise(MADV_POPULATE_READ)`, which reports a page past the end of the
/// file as an error where a read would raise `SIGBUS`), then reads the
/// range with `pread(2)` into a temporary buffer, copied into the
/// server's. It never reads the mapping itself: a read of it in user space
/// past the end of a file that shrank would raise `SIGBUS` in the server's
/// process. The pages it brought in, the neighbours read around them too,
/// are then served from the mapping on the next faults.
///
/// A page found in memory is remembered (a bit per page of the file), and
/// `mincore` asks about the whole aligned block of
/// 16 pages around a range at once: so a restore asks once per block, not
/// once per fault, and the server's second look at a run (it asks when it
/// decides how to serve it, then when it copies) costs no system call. A
/// remembered page the kernel evicted since is read back from the disk
/// inside the copy: slower, still correct. Each page of an image is
/// normally served once per restore, so that is rare.
///
/// The kernel tells page-cache residency only to a process that owns the
/// file, could open it for writing, or has `CAP_FOWNER` (since Linux 5.0:
/// residency of other people's files is a side channel). To any other
/// process `mincore(2)` reports every page in memory; `bytes_at` then
/// serves every page from the mapping and a cold page is read from the disk
/// inside the ioctl, as in Firecracker's handler. To keep the reader from
/// waiting on the disk, serve a file the serving process owns (or warm the
/// page cache first, or use `FileSource`).
///
/// # Past the end of the file
///
/// As for `FileSource`, the part of a read past the end of the file reads
/// zero and a read that starts past it is an error (the file's length is
/// taken when it is opened). The last page, when the length is not a whole
/// number of pages, comes from the mapping like the others: the kernel
/// maps zeros after the end of the file in it. An empty file is not mapped
/// at all (`bytes_at` is always `None`).
///
/// # A file that changes
///
/// The constructors are `unsafe`: the caller promises that nobody shrinks
/// or writes the file while the source exists (see [`open`](Self::open)).
/// Bytes that change under a `&[u8]` break Rust's rules, and a slice of a
/// page past the end of a file that shrank raises `SIGBUS` when it is read
/// in user space. The server itself never reads the slices: it hands them
/// to the kernel, where a `UFFDIO_COPY` from a page past the end fails with
/// `EFAULT` (the kernel fixes its own access up instead of signalling;
/// `tests/mmap_source.rs` checks it), and `read_at` reports a file shorter
/// than when it was opened as an error. Either way the fault fails through
/// the server's [`FailurePolicy`](crate::FailurePolicy) (by default the
/// faulting thread gets `SIGBUS`, and
/// [`Stats::first_failure`](crate::Stats::first_failure) says why), and the
/// server's process gets no signal. A program of your own that reads the
/// slices `bytes_at` returns gets no such protection.
///
/// The mapping is `PROT_READ` and `MAP_SHARED`: a window on the page
/// cache that takes no memory of its own and is charged to no overcommit
/// account, and, of a file opened read-only (as `open` does), can never be
/// made writable. A read-only `MAP_PRIVATE` mapping would copy from the
/// same page-cache pages (it gets private copies only when written), but
/// would not say so, nor refuse a later `mprotect(PROT_WRITE)`. The mapping
/// is unmapped when the source is dropped (once no read of it runs on the
/// blocking pool any more).
///
/// # Example
///
/// Reading a file through the source (what the server does on a fault):
///
/// ```
/// use tokio_uffd::{MmapSource, PageSource};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// let path = std::env::temp_dir().join(format!("tokio-uffd-doc-{}", std::process::id()));
/// std::fs::write(&path, vec![7u8; 6000])?;
/// // SAFETY: the file is this program's own and nothing writes or
/// // truncates it while the source exists.
/// let image = unsafe { MmapSource::open(&path)? };
/// std::fs::remove_file(&path)?; // the mapping and the open file stay
/// assert_eq!(image.len(), 6000);
///
/// let mut page = vec![0u8; 4096];
/// image.read_at(4096, &mut page).await?; // crosses the end of the file
/// assert!(page[..1904].iter().all(|&b| b == 7));
/// assert!(page[1904..].iter().all(|&b| b == 0));
/// // The file was just written, so its pages are in the page cache: the
/// // bytes come straight from the mapping.
/// if let Some(bytes) = image.bytes_at(0, 4096) {
///     assert_eq!(bytes.len(), 4096);
/// }
/// # Ok(())
/// # }
/// ```
///
/// Serving a snapshot (one `UFFDIO_COPY` per fault-around window whose
/// pages are in the page cache):
///
/// ```no_run
/// # async fn f(uffd: tokio_uffd::AsyncUffd, base: usize) -> Result<(), Box<dyn std::error::Error>> {
/// use tokio_uffd::{MmapSource, Region, Server, SourceHandler};
///
/// // SAFETY: nothing writes or truncates the snapshot while it is served.
/// let snapshot = unsafe { MmapSource::open("mem.snap")? };
/// let server = Server::new(uffd, SourceHandler::new(snapshot))
///     .regions([Region::new(base..base + (128 << 20))])?
///     .prefetch(16)
///     .spawn();
/// # Ok(()) }
/// ```
pub struct MmapSource {
    /// For `pread(2)` on the blocking pool.
    file: Arc<File>,
    /// The file's length when it was opened.
    len: u64,
    /// The whole file, `None` if it is empty (shared with reads on the
    /// blocking pool).
    map: Option<Arc<FileMapping>>,
    /// The file's name in errors.
    name: String,
    page_size: usize,
    /// Pages found in the page cache, a bit each.
    known: Box<[AtomicU64]>,
}

// `MmapSource` is `Send + Sync` through its fields: `FileMapping` is (see
// its `unsafe impl`s in `sys`: shared access is read-only), and so are
// `Arc<File>`, the atomics and the rest.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<MmapSource>();
};

impl MmapSource {
    /// Opens the file at `path` for reading and maps it read-only.
    ///
    /// The file is opened without blocking (a FIFO would otherwise wait for
    /// a writer) and must be a regular file: a directory, FIFO, socket or
    /// device has no fixed length to serve pages from.
    ///
    /// # Safety
    ///
    /// Until the source is dropped, nobody may shrink the file or write to
    /// it: not this process, not another one, and, on a network file
    /// system, not another machine. The slices
    /// [`bytes_at`](PageSource::bytes_at) returns are the file's bytes in
    /// the page cache: a write changes them under a `&[u8]`, and a read of
    /// one past the end of a file that shrank raises `SIGBUS`.
    ///
    /// The server only hands those slices to the kernel, so for it a
    /// broken promise means failed faults, not a signal: a copy from a page
    /// past the new end fails with `EFAULT` and goes through its
    /// [`FailurePolicy`](crate::FailurePolicy); a written page may be
    /// served half old, half new. A caller that reads the slices itself
    /// gets `SIGBUS` (or bytes that change as it reads them).
    ///
    /// # Errors
    ///
    /// The I/O error of opening or `stat`ing it; an
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) error naming the path
    /// and what it is when it is not a regular file; the error of `mmap(2)`
    /// with the path, for example for a procfs or sysfs file, which cannot
    /// be mapped (read those with [`FileSource`](crate::FileSource)).
    pub unsafe fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::mapped(open_regular(path.as_ref(), "an MmapSource")?)
    }

    /// A source mapping `file`, which must be open for reading.
    ///
    /// # Safety
    ///
    /// As for [`open`](Self::open): until the source is dropped, nobody
    /// may shrink the file or write to it.
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open); errors name the file by its path as
    /// `/proc/self/fd` shows it. A file open for writing only cannot be
    /// mapped (`EACCES`).
    pub unsafe fn new(file: File) -> io::Result<Self> {
        Self::mapped(adopt_regular(file, "an MmapSource")?)
    }

    fn mapped(opened: Opened) -> io::Result<Self> {
        let Opened { file, len, name } = opened;
        let page_size = crate::sys::page_size();
        let pages = usize::try_from(len.div_ceil(page_size as u64)).unwrap_or(usize::MAX);
        let map = if len == 0 {
            None
        } else {
            let bytes = usize::try_from(len).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name} ({len:#x} bytes) is larger than the address space"),
                )
            })?;
            let map = FileMapping::map(file.as_fd(), bytes).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot map {name} ({len:#x} bytes) read-only: {e}; \
                         a FileSource reads files that cannot be mapped"
                    ),
                )
            })?;
            Some(Arc::new(map))
        };
        Ok(Self {
            file: Arc::new(file),
            len,
            map,
            name,
            page_size,
            known: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The file's length when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when it was opened.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether pages `first..=last` are all known to be in the page cache.
    fn known(&self, first: usize, last: usize) -> bool {
        (first..=last).all(|p| {
            self.known
                .get(p / 64)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
        })
    }

    /// Remembers page `p` as in the page cache.
    fn note(&self, p: usize) {
        if let Some(w) = self.known.get(p / 64) {
            w.fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }
}

impl PageSource for MmapSource {
    /// The bytes at `offset..offset + len` from the mapping if every page
    /// of the range is in the page cache (or was found there recently);
    /// `None` if one is not, if the range is not inside the mapping, or if
    /// it starts past the end of the file.
    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let map = self.map.as_ref()?;
        let start = usize::try_from(offset).ok()?;
        start.checked_add(len).filter(|&end| end <= map.len())?;
        if len > 0 && offset >= self.len {
            // Zeros in the last page, but past the end of the file: as a
            // read there, an error (from `read_at`).
            return None;
        }
        if len > 0 {
            let ps = self.page_size;
            let (first, last) = (start / ps, (start + len - 1) / ps);
            if !self.known(first, last) {
                // The whole aligned block (or blocks) around the range: its
                // neighbours are likely next.
                let lo = first - first % PROBE_PAGES;
                let hi = ((last / PROBE_PAGES + 1) * PROBE_PAGES).min(map.len() / ps);
                let probe = map.residency(lo * ps, (hi - lo) * ps, |i, resident| {
                    if resident {
                        self.note(lo + i);
                    }
                });
                // An error of mincore (EAGAIN: the kernel is short of
                // memory) counts as not resident: read_at is never wrong.
                if probe.is_err() || !self.known(first, last) {
                    return None;
                }
            }
        }
        // SAFETY: the range is inside the mapping, and whoever built this
        // source promised (`open`'s `# Safety`) that the file neither
        // shrinks nor changes while it exists; the slice borrows `self`.
        unsafe { map.bytes(start, len) }
    }

    /// Reads `offset..offset + buf.len()` on Tokio's blocking pool: faults
    /// the range into the page cache with the kernel's read-around
    /// (`MADV_POPULATE_READ`, best effort), then reads it with `pread(2)`
    /// (never from the mapping). The part past the end of the file reads
    /// zero.
    ///
    /// # Errors
    ///
    /// A read that starts past the end of the file, the error of
    /// `pread(2)`, or a file that ends before the bytes it had when it was
    /// opened (it shrank).
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = available(offset, buf.len(), self.len)?;
        let file = self.file.clone();
        let map = self.map.clone();
        let read = tokio::task::spawn_blocking(move || {
            if let Some(map) = map.filter(|_| n > 0) {
                // Read-around first, as a fault on the mapping would do it
                // (best effort: the pread below reads what is asked for
                // whatever happens here).
                let _ = map.populate(offset as usize, n);
            }
            pread_exact(&file, offset, n)
        })
        .await
        .map_err(io::Error::other)??;
        let tmp = read.map_err(|short| {
            let now = short
                .now
                .map_or_else(|| "?".to_string(), |now| format!("{now:#x}"));
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended at offset {:#x}, inside the read of {n:#x} bytes at {offset:#x} \
                     (it is {now} bytes now, {:#x} when the MmapSource was opened): the file \
                     shrank while it was served",
                    self.name, short.at, self.len
                ),
            )
        })?;
        buf[..n].copy_from_slice(&tmp);
        buf[n..].fill(0);
        Ok(())
    }
}

/// A file that ended before the bytes asked for.
struct Short {
    /// Where `pread(2)` found the end.
    at: u64,
    /// The file's length then, if `fstat(2)` could tell.
    now: Option<u64>,
}

/// The `n` bytes at `offset` of `file`, read with `pread(2)`; `Err` if
/// the file ends before them.
fn pread_exact(file: &File, offset: u64, n: usize) -> io::Result<Result<Vec<u8>, Short>> {
    let mut buf = vec![0u8; n];
    let mut done = 0;
    while done < n {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Ok(Err(Short {
                    at: offset + done as u64,
                    now: file.metadata().ok().map(|m| m.len()),
                }))
            }
            Ok(k) => done += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Ok(buf))
}

impl fmt::Debug for MmapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapSource")
            .field("file", &self.name)
            .field("len", &self.len)
            .field("mapping", &self.map)
            .finish_non_exhaustive()
    }
}

/// Pages `mincore` asks about at once, in aligned blocks.
const PROBE_PAGES: usize = 16;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::super::testing::TempDir;
    use super::*;

    /// Evicts `file` from the page cache (`fsync`, then
    /// `POSIX_FADV_DONTNEED`); whether every page of `src` is then out of
    /// it. Not on tmpfs, nor for a file whose residency the kernel hides.
    fn evict(file: &File, src: &MmapSource) -> bool {
        file.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        let map = src.map.as_ref().unwrap();
        let page = src.page_size;
        (0..map.len() / page).all(|p| !map.resident(p * page, page).unwrap())
    }

    /// A file of `len` bytes, byte `i` being `i / 7`, in `dir`.
    fn image_file(dir: &TempDir, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.0.join("image");
        let data: Vec<u8> = (0..len).map(|i| (i / 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    #[tokio::test]
    async fn serves_the_file_from_the_mapping_and_by_pread_alike() {
        let dir = TempDir::new("mmap-serve");
        let page = crate::sys::page_size();
        let len = 3 * page + 100;
        let (path, data) = image_file(&dir, len);
        // SAFETY: the test's own file, unchanged while the source exists.
        let src = unsafe { MmapSource::open(&path) }.unwrap();
        assert_eq!(src.len(), len as u64);
        assert!(!src.is_empty());
        assert_eq!(src.map.as_ref().unwrap().len(), 4 * page);
        // Just written: in the page cache.
        let bytes = src.bytes_at(page as u64, 2 * page).unwrap();
        assert_eq!(bytes, &data[page..3 * page]);
        // The last page: the end of the file, then zeros, from the mapping.
        let last = src.bytes_at(3 * page as u64, page).unwrap();
        assert_eq!(&last[..100], &data[3 * page..]);
        assert!(last[100..].iter().all(|&b| b == 0));
        let mut buf = vec![1u8; page];
        src.read_at(3 * page as u64, &mut buf).await.unwrap();
        assert_eq!(buf, last);
        // Starting past the end of the file, in its last page: not from the
        // mapping, and an error from read_at.
        assert!(src.bytes_at(len as u64, 10).is_none());
        let err = src.read_at(len as u64, &mut [0u8; 10]).await.unwrap_err();
        assert!(err.to_string().contains("starts past the end"), "{err}");
        // Unaligned, and empty.
        assert_eq!(src.bytes_at(10, 20).unwrap(), &data[10..30]);
        assert_eq!(src.bytes_at(page as u64, 0).unwrap(), &[] as &[u8]);
        // Outside the mapping: not from it; read_at zero-fills or fails.
        assert!(src.bytes_at(3 * page as u64, 2 * page).is_none());
        assert!(src.bytes_at(4 * page as u64, page).is_none());
        assert!(src.bytes_at(u64::MAX - 1, 2).is_none());
        let mut two = vec![1u8; 2 * page];
        src.read_at(3 * page as u64, &mut two).await.unwrap();
        assert_eq!(&two[..100], &data[3 * page..]);
        assert!(two[100..].iter().all(|&b| b == 0));
        let err = src.read_at(len as u64, &mut buf).await.unwrap_err();
        assert!(err.to_string().contains("starts past the end"), "{err}");
        // Through `new` too, named by its path.
        // SAFETY: as above.
        let src = unsafe { MmapSource::new(File::open(&path).unwrap()) }.unwrap();
        assert_eq!(src.bytes_at(0, page).unwrap(), &data[..page]);
        let debug = format!("{src:?}");
        assert!(
            debug.contains("MmapSource") && debug.contains("image"),
            "{debug}"
        );
    }

    #[tokio::test]
    async fn an_empty_file_is_not_mapped() {
        let dir = TempDir::new("mmap-empty");
        let path = dir.0.join("empty");
        std::fs::write(&path, b"").unwrap();
        // SAFETY: the test's own file, unchanged while the source exists.
        let src = unsafe { MmapSource::open(&path) }.unwrap();
        assert!(src.is_empty());
        assert_eq!(src.len(), 0);
        assert!(src.map.is_none());
        assert!(src.bytes_at(0, 0).is_none());
        assert!(src.bytes_at(0, 4096).is_none());
        let mut buf = vec![1u8; 4096];
        let err = src.read_at(0, &mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("starts past the end"), "{err}");
        // An empty read is no read at all.
        src.read_at(0, &mut []).await.unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_mapped_says_to_use_a_file_source() {
        // A sysfs attribute: a regular file of one page that no mmap serves.
        let path = Path::new("/sys/kernel/uevent_seqnum");
        if !path.is_file() {
            eprintln!("SKIPPED: {} is missing", path.display());
            return;
        }
        // SAFETY: the source is never built (or, if it were, never read).
        let err = unsafe { MmapSource::open(path) }.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cannot map /sys/kernel/uevent_seqnum"),
            "{msg}"
        );
        assert!(
            msg.contains("a FileSource reads files that cannot be mapped"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_open_for_writing_only_cannot_be_mapped() {
        let dir = TempDir::new("mmap-wronly");
        let path = dir.0.join("image");
        std::fs::write(&path, [1u8; 100]).unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .unwrap();
        // SAFETY: the test's own file, unchanged while the source exists.
        let err = unsafe { MmapSource::new(file) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
        assert!(err.to_string().contains("cannot map"), "{err}");
    }

    /// Pages found resident are remembered, the whole block around a range
    /// asked at once; others are asked anew.
    #[tokio::test]
    async fn pages_found_resident_are_remembered_by_block() {
        let dir = TempDir::new("mmap-known");
        let page = crate::sys::page_size();
        let (path, data) = image_file(&dir, 4 * PROBE_PAGES * page);
        let file = File::open(&path).unwrap();
        // SAFETY: the test's own file, unchanged while the source exists
        // (eviction drops cached copies, not bytes).
        let src = unsafe { MmapSource::open(&path) }.unwrap();
        let at = |p: usize| (p * page) as u64;
        assert!(src.bytes_at(at(2), page).is_some());
        if !evict(&file, &src) {
            eprintln!("SKIPPED: the file could not be evicted from the page cache (tmpfs?)");
            return;
        }
        // Pages of the block asked about: remembered, served from the
        // mapping without a question. (Their bytes are not compared yet:
        // reading them would bring the file back into the page cache.)
        assert!(src.bytes_at(at(2), page).is_some());
        assert!(src.bytes_at(at(PROBE_PAGES - 1), page).is_some());
        // The next block: asked, not resident.
        assert!(src.bytes_at(at(PROBE_PAGES), page).is_none());
        // A range across both: not all known, asked, not resident.
        assert!(src.bytes_at(at(PROBE_PAGES - 1), 2 * page).is_none());
        // read_at brings a page back into the page cache; then it is served
        // from the mapping.
        let p = 2 * PROBE_PAGES + 3;
        let mut buf = vec![0u8; page];
        src.read_at(at(p), &mut buf).await.unwrap();
        assert_eq!(buf, &data[p * page..(p + 1) * page]);
        assert_eq!(
            src.bytes_at(at(p), page).unwrap(),
            &data[p * page..(p + 1) * page]
        );
    }
}
