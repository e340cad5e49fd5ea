//! The memory the benchmarks fault on, and the bytes they fill it with.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// An anonymous mapping without transparent huge pages, unmapped on drop.
pub struct Mapping {
    pub addr: usize,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        Self {
            addr: p as usize,
            len,
        }
    }

    /// Frees `len` bytes from `addr`: they fault again.
    pub fn rearm(&self, addr: usize, len: usize) {
        // SAFETY: dropping pages of our own mapping.
        let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[inline(always)]
pub fn touch(addr: usize) -> u8 {
    // SAFETY: callers pass addresses inside live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// A page of pattern bytes, the source of every copy.
pub(super) fn page_of_bytes() -> &'static [u8] {
    static PAGE: OnceLock<Vec<u8>> = OnceLock::new();
    PAGE.get_or_init(|| (0..page_size()).map(|i| i as u8 | 1).collect())
}

/// The byte at offset `i` of every benchmark image (in memory or on disk).
#[inline]
pub fn pattern_byte(i: usize) -> u8 {
    (i >> 12) as u8 ^ i as u8
}

/// An image of `len` bytes, shared by the floor and the crate.
pub fn image(len: usize) -> Arc<[u8]> {
    static IMAGE: OnceLock<std::sync::Mutex<Option<Arc<[u8]>>>> = OnceLock::new();
    let cell = IMAGE.get_or_init(Default::default);
    let mut g = cell.lock().unwrap();
    match &*g {
        Some(img) if img.len() >= len => img.clone(),
        _ => {
            let img: Arc<[u8]> = (0..len).map(pattern_byte).collect();
            *g = Some(img.clone());
            img
        }
    }
}

/// Faults `n` pages one at a time from this thread (pinned to CPU 0),
/// cycling through `mem` minus its last page (the sentinel), re-arming
/// between rounds. Returns the time spent faulting.
pub(super) fn fault_loop(mem: &Mapping, page: usize, n: usize) -> Duration {
    let pages = mem.len / page - 1;
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < n {
        let round = (n - done).min(pages);
        let t0 = Instant::now();
        for i in 0..round {
            touch(mem.addr + i * page);
        }
        total += t0.elapsed();
        done += round;
        mem.rearm(mem.addr, round * page);
    }
    total
}

pub(super) fn sentinel(mem: &Mapping, page: usize) -> usize {
    mem.addr + mem.len - page
}
