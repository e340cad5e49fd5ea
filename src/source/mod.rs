//! Page sources: where the contents of served pages come from.
//!
//! Zeros, bytes in memory and the type-erased [`BoxedSource`] here; files
//! in `file` (read with `pread(2)` on the blocking pool) and `mmap`
//! (mapped, served straight from the page cache).

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;

mod file;
mod mmap;
#[cfg(feature = "object-store")]
mod object;

pub use file::FileSource;
pub use mmap::MmapSource;
#[cfg(feature = "object-store")]
pub use object::{ObjectReadError, ObjectStoreSource, ObjectStoreSourceBuilder, ObjectStoreStats};

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
}

/// What the tests of the file sources share.
#[cfg(test)]
mod testing {
    /// A fresh directory under the temporary directory, removed on drop.
    pub(super) struct TempDir(pub(super) std::path::PathBuf);

    impl TempDir {
        pub(super) fn new(name: &str) -> Self {
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
}
