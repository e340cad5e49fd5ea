//! [`FileSource`]: pages read from a file with `pread(2)` on Tokio's
//! blocking pool, and the checks both file sources make when they open one.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::{available, PageSource};

/// A source backed by a file, such as a VM memory snapshot image.
///
/// Reads run on Tokio's blocking pool (`pread(2)`), never on the reactor
/// thread. Each read goes through a temporary buffer that is copied into the
/// caller's: a disk read costs far more than that copy. As for
/// [`MemorySource`](crate::MemorySource), the part of a read past the end of
/// the file reads zero (the file's length is taken when it is opened).
///
/// A file that can be mapped is served faster by
/// [`MmapSource`](crate::MmapSource): pages already in the page cache are
/// copied straight from it, without a task or a buffer. `FileSource` reads
/// what cannot be mapped (files of procfs, sysfs, some FUSE file systems),
/// and needs no promise that the file stays unchanged.
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
        open_regular(path.as_ref(), "a FileSource").map(Self::from_opened)
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
        adopt_regular(file, "a FileSource").map(Self::from_opened)
    }

    fn from_opened(opened: Opened) -> Self {
        Self {
            file: Arc::new(opened.file),
            len: opened.len,
        }
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

/// A regular file opened for a file source: the file, its length then, and
/// the name errors give it.
#[derive(Debug)]
pub(super) struct Opened {
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) name: String,
}

/// Opens `path` for reading, without blocking, and checks that it is a
/// regular file; `kind` ("a FileSource") is the source errors name.
pub(super) fn open_regular(path: &Path, kind: &str) -> io::Result<Opened> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // A FIFO opens at once instead of waiting for a writer; for a
        // regular file O_NONBLOCK changes nothing.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match std::fs::metadata(path) {
            // A socket cannot be opened (ENXIO): say what it is.
            Ok(meta) if !meta.is_file() => not_a_regular_file(&path.display(), &meta, kind),
            _ => e,
        })?;
    checked(file, path.display().to_string(), kind)
}

/// Checks that `file` is a regular file; errors name it by its path as
/// `/proc/self/fd` shows it, and `kind` as the source.
pub(super) fn adopt_regular(file: File, kind: &str) -> io::Result<Opened> {
    let fd = file.as_raw_fd();
    let name = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| format!("file descriptor {fd}"));
    checked(file, name, kind)
}

fn checked(file: File, name: String, kind: &str) -> io::Result<Opened> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_a_regular_file(&name, &meta, kind));
    }
    Ok(Opened {
        file,
        len: meta.len(),
        name,
    })
}

/// The error for a file source (`kind`) that is not a regular file, naming
/// it and saying what it is.
fn not_a_regular_file(name: &dyn fmt::Display, meta: &std::fs::Metadata, kind: &str) -> io::Error {
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
        format!("{name} is {what}: {kind} serves pages from a regular file (a memory image)"),
    )
}

#[cfg(test)]
mod tests {
    use super::super::testing::TempDir;
    use super::*;

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
        assert!(msg.contains("a FileSource serves pages"), "{msg}");
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
