//! Page sources: where the contents of served pages come from.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Fills buffers with the bytes of a memory image at given offsets.
///
/// Implement it for anything async: a file, a TCP page server, an object
/// store. The server calls it from spawned tasks, so many reads can be in
/// flight at once (up to its concurrency limit); a slow source then costs
/// latency, not throughput.
///
/// ```
/// use tokio_uffd::PageSource;
///
/// /// Every byte of page `n` is `n as u8`.
/// struct Numbered;
///
/// impl PageSource for Numbered {
///     async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
///         for (i, b) in buf.iter_mut().enumerate() {
///             *b = ((offset + i as u64) / 4096) as u8;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait PageSource: Send + Sync + 'static {
    /// Fills all of `buf` with the bytes at `offset..offset + buf.len()`.
    ///
    /// # Errors
    ///
    /// Any I/O error; the server then applies its failure policy to the
    /// fault (by default the faulting thread gets `SIGBUS`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// The bytes at `offset..offset + len` if they are already in memory,
    /// so that the server copies them straight into the faulting page
    /// without a buffer (one copy instead of two); `None` (the default)
    /// makes the server call [`read_at`](Self::read_at).
    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let _ = (offset, len);
        None
    }
}

/// A source of zeros (fresh memory).
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroSource;

impl PageSource for ZeroSource {
    async fn read_at(&self, _offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

/// A source backed by bytes in memory.
///
/// A read that starts inside the bytes and runs past their end gets zeros
/// for the part past the end (an image whose length is not a whole number
/// of pages); a read that starts past the end is an error.
#[derive(Clone)]
pub struct MemorySource {
    bytes: Arc<[u8]>,
}

impl fmt::Debug for MemorySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySource")
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl MemorySource {
    /// A source serving `bytes`.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> Self {
        Self {
            bytes: bytes.into(),
        }
    }
}

/// How many of `len` bytes at `offset` a source of `size` bytes holds; an
/// error if the read starts at or past its end.
fn available(offset: u64, len: usize, size: u64) -> io::Result<usize> {
    if offset >= size && len > 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "read of {len:#x} bytes at offset {offset:#x} starts past the end of the source \
                 ({size:#x} bytes): is a region larger than its image?"
            ),
        ));
    }
    Ok(len.min((size - offset.min(size)) as usize))
}

impl PageSource for MemorySource {
    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let size = self.bytes.len() as u64;
        let n = available(offset, buf.len(), size)?;
        let start = offset as usize; // < size, which fits a usize
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }
}

/// A source backed by a file, such as a VM memory snapshot image.
///
/// Reads run on Tokio's blocking pool (`pread(2)`), never on the reactor
/// thread. Each read goes through a temporary buffer that is copied into the
/// caller's: a disk read costs far more than that copy. As for
/// [`MemorySource`], the part of a read past the end of the file reads zero
/// (the file's length is taken when it is opened).
#[derive(Debug, Clone)]
pub struct FileSource {
    file: Arc<File>,
    len: u64,
}

impl FileSource {
    /// Opens the file at `path` for reading.
    ///
    /// The file is opened without blocking (a FIFO would otherwise wait for
    /// a writer) and must be a regular file: a directory, FIFO, socket or
    /// device has no fixed length to serve pages from, so every fault would
    /// fail later, far from the cause.
    ///
    /// # Errors
    ///
    /// The I/O error of opening or `stat`ing it, or an
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) error naming the path
    /// and what it is when it is not a regular file.
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            // A FIFO opens at once instead of waiting for a writer; for a
            // regular file O_NONBLOCK changes nothing.
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match std::fs::metadata(path) {
                // A socket cannot be opened (ENXIO): say what it is.
                Ok(meta) if !meta.is_file() => not_a_regular_file(&path.display(), &meta),
                _ => e,
            })?;
        Self::checked(file, &path.display())
    }

    /// A source reading from `file`.
    ///
    /// # Errors
    ///
    /// The I/O error of `stat`ing it, or an
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) error naming the file
    /// (its path as `/proc/self/fd` shows it) and what it is when it is not
    /// a regular file.
    pub fn new(file: File) -> io::Result<Self> {
        let fd = file.as_raw_fd();
        let name = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| format!("file descriptor {fd}"));
        Self::checked(file, &name)
    }

    fn checked(file: File, name: &dyn fmt::Display) -> io::Result<Self> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(not_a_regular_file(name, &meta));
        }
        Ok(Self {
            len: meta.len(),
            file: Arc::new(file),
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
}

/// The error for a file source that is not a regular file, naming it and
/// saying what it is.
fn not_a_regular_file(name: &dyn fmt::Display, meta: &std::fs::Metadata) -> io::Error {
    let ft = meta.file_type();
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    };
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{name} is {what}: a FileSource serves pages from a regular file (a memory image)"),
    )
}

impl PageSource for FileSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = available(offset, buf.len(), self.len)?;
        let file = self.file.clone();
        let tmp = tokio::task::spawn_blocking(move || {
            let mut tmp = vec![0u8; n];
            file.read_exact_at(&mut tmp, offset).map(|()| tmp)
        })
        .await
        .map_err(io::Error::other)??;
        buf[..n].copy_from_slice(&tmp);
        buf[n..].fill(0);
        Ok(())
    }
}

/// Any [`PageSource`] behind one type, so that one
/// [`SourceHandler`](crate::SourceHandler) serves regions from sources of
/// different kinds (a file, zeros, an object store).
///
/// [`bytes_at`](PageSource::bytes_at) costs a virtual call;
/// [`read_at`](PageSource::read_at) also boxes its future, an allocation
/// next to a read that waits for a disk or a network.
pub struct BoxedSource(Box<dyn DynSource>);

impl BoxedSource {
    /// `source`, type-erased.
    pub fn new(source: impl PageSource) -> Self {
        Self(Box::new(source))
    }
}

impl fmt::Debug for BoxedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxedSource").finish_non_exhaustive()
    }
}

/// [`PageSource`] in a form that can be a trait object.
trait DynSource: Send + Sync + 'static {
    fn read_at_boxed<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]>;
}

impl<S: PageSource> DynSource for S {
    fn read_at_boxed<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(PageSource::read_at(self, offset, buf))
    }

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        PageSource::bytes_at(self, offset, len)
    }
}

impl PageSource for BoxedSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at_boxed(offset, buf).await
    }

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.0.bytes_at(offset, len)
    }
}

impl<S: PageSource> PageSource for Arc<S> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = io::Result<()>> + Send {
        S::read_at(self, offset, buf)
    }

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        S::bytes_at(self, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_across_the_end_is_zero_filled_one_past_it_fails() {
        let src = MemorySource::new(vec![7u8; 6000]);
        let mut buf = vec![1u8; 4096];
        src.read_at(4096, &mut buf).await.unwrap();
        assert!(buf[..1904].iter().all(|&b| b == 7));
        assert!(buf[1904..].iter().all(|&b| b == 0));
        let err = src.read_at(8192, &mut buf).await.unwrap_err();
        assert!(err.to_string().contains("starts past the end"), "{err}");
        assert!(src.read_at(6000, &mut buf).await.is_err());
    }

    /// A fresh directory under the temporary directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("tokio-uffd-source-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn file_source_rejects_a_directory_naming_it() {
        let dir = TempDir::new("dir");
        let err = FileSource::open(&dir.0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let msg = err.to_string();
        assert!(msg.contains(&dir.0.display().to_string()), "{msg}");
        assert!(msg.contains("is a directory"), "{msg}");
        // The same through `new`, from an already open directory.
        let err = FileSource::new(File::open(&dir.0).unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let msg = err.to_string();
        assert!(msg.contains(&dir.0.display().to_string()), "{msg}");
        assert!(msg.contains("is a directory"), "{msg}");
    }

    #[test]
    fn file_source_rejects_a_fifo_without_waiting_for_a_writer() {
        let dir = TempDir::new("fifo");
        let fifo = dir.0.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK this open would block forever (no writer).
        let err = FileSource::open(&fifo).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{msg}");
        assert!(msg.contains("pipe is a FIFO"), "{msg}");
    }

    #[test]
    fn file_source_rejects_a_socket_naming_it() {
        let dir = TempDir::new("sock");
        let path = dir.0.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = FileSource::open(&path).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{msg}");
        assert!(msg.contains("sock is a socket"), "{msg}");
    }

    #[test]
    fn file_source_rejects_a_character_device() {
        let err = FileSource::open("/dev/null").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/dev/null is a character device"), "{msg}");
    }

    #[tokio::test]
    async fn file_source_serves_a_regular_file_and_a_missing_one_is_not_found() {
        let dir = TempDir::new("file");
        let path = dir.0.join("image");
        std::fs::write(&path, [9u8; 5000]).unwrap();
        let src = FileSource::open(&path).unwrap();
        assert_eq!(src.len(), 5000);
        let mut buf = vec![1u8; 4096];
        src.read_at(4096, &mut buf).await.unwrap();
        assert!(buf[..904].iter().all(|&b| b == 9));
        assert!(buf[904..].iter().all(|&b| b == 0));
        let src = FileSource::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(src.len(), 5000);
        let err = FileSource::open(dir.0.join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
