//! A snapshot image on disk: a temporary file of the pattern bytes,
//! unlinked as soon as it is open, written once per bench process, synced
//! (so no writeback runs under a measurement) and read back so that the
//! page cache holds all of it.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use tokio_uffd::MmapSource;

use super::memory::{page_size, pattern_byte};

/// The image file of the restore benchmarks, and a read-only mapping of it
/// (the source of the floors that copy from it).
pub struct ImageFile {
    file: File,
    map: FileMap,
}

/// A mapping of a whole file, unmapped on drop.
pub struct FileMap {
    addr: usize,
    len: usize,
}

impl FileMap {
    /// Maps the `len` bytes of `file` read-only (`MAP_SHARED`: the page
    /// cache's own pages).
    pub fn new(file: BorrowedFd<'_>, len: usize) -> Self {
        Self::map(file, len, libc::PROT_READ, libc::MAP_SHARED)
    }

    /// Maps the `len` bytes of `file` private and writable: a write
    /// copies the page from the page cache, the file never changes.
    pub fn private_writable(file: BorrowedFd<'_>, len: usize) -> Self {
        Self::map(
            file,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
    }

    fn map(file: BorrowedFd<'_>, len: usize, prot: i32, flags: i32) -> Self {
        // SAFETY: a fresh mapping at an address the kernel picks; the
        // benchmarks never truncate the file (it is unlinked).
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, file.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED, "mapping the image file");
        FileMap {
            addr: p as usize,
            len,
        }
    }

    /// Where it is mapped.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and lives as long
        // as `self`; the file is never written after it was made.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

impl ImageFile {
    /// The image of `len` bytes, made on first use and kept for the rest of
    /// the process (another length makes another file).
    pub fn shared(len: usize) -> Arc<ImageFile> {
        static IMAGE: OnceLock<std::sync::Mutex<Option<Arc<ImageFile>>>> = OnceLock::new();
        let cell = IMAGE.get_or_init(Default::default);
        let mut g = cell.lock().unwrap();
        match &*g {
            Some(img) if img.len() == len => img.clone(),
            _ => {
                let img = Arc::new(ImageFile::create(len));
                *g = Some(img.clone());
                img
            }
        }
    }

    fn create(len: usize) -> Self {
        assert_eq!(len % page_size(), 0, "the image is whole pages");
        let path = std::env::temp_dir().join(format!(
            "tokio-uffd-bench-image-{}-{len}",
            std::process::id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        // Unlinked at once: the file lives as long as the process holds it.
        std::fs::remove_file(&path).unwrap();
        let t0 = std::time::Instant::now();
        let chunk = 1 << 20;
        let mut buf = vec![0u8; chunk];
        for start in (0..len).step_by(chunk) {
            let n = chunk.min(len - start);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern_byte(start + i);
            }
            file.write_all(&buf[..n]).unwrap();
        }
        file.sync_data().unwrap();
        // Read back, checking it: the page cache then holds the image.
        for start in (0..len).step_by(chunk) {
            let n = chunk.min(len - start);
            file.read_exact_at(&mut buf[..n], start as u64).unwrap();
            assert_eq!(
                buf[n - 1],
                pattern_byte(start + n - 1),
                "image file at {start}"
            );
        }
        let map = FileMap::new(file.as_fd(), len);
        let img = ImageFile { file, map };
        eprintln!(
            "image file: {} MiB written, synced and read back in {:.1} s; {:.0}% in the page cache",
            len >> 20,
            t0.elapsed().as_secs_f64(),
            img.cached_percent()
        );
        img
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// The file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// An owned handle to the same open file.
    pub fn file(&self) -> File {
        self.file.try_clone().unwrap()
    }

    /// A new [`MmapSource`] of the file (its own mapping).
    pub fn mmap_source(&self) -> MmapSource {
        // SAFETY: the image file is unlinked and never written or
        // truncated after it was made, so the mapping's bytes stay what
        // they were.
        unsafe { MmapSource::new(self.file()) }.expect("mapping the image file")
    }

    /// The image through its read-only mapping.
    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    /// Maps every page of the read-only mapping now, so that copying from
    /// it takes no fault on the source side.
    pub fn populate(&self) {
        let page = page_size();
        let mut sum = 0u8;
        for off in (0..self.len()).step_by(page) {
            sum ^= self.bytes()[off];
        }
        std::hint::black_box(sum);
    }

    /// How much of the file the page cache holds (`mincore(2)` on the
    /// mapping).
    pub fn cached_percent(&self) -> f64 {
        let page = page_size();
        let mut vec = vec![0u8; self.len().div_ceil(page)];
        // SAFETY: mincore on our own mapping, into a vector of one byte
        // per page.
        let rc = unsafe {
            libc::mincore(
                self.map.addr as *mut libc::c_void,
                self.len(),
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return f64::NAN;
        }
        let cached = vec.iter().filter(|&&b| b & 1 != 0).count();
        cached as f64 * 100.0 / vec.len() as f64
    }
}
