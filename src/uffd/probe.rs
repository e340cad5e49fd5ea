//! [`Uffd::owner_exited`]: whether the process a userfaultfd serves is
//! gone, with one side-effect-free `UFFDIO_COPY`.

use std::io;

use crate::error::{Error, Op, Result};
use crate::sys;

use super::Uffd;

/// The start of the owner probe's range: a page of this process that
/// nothing can read ([`sys::map_inaccessible_page`]), at the lowest address
/// that could be had. Mapped once, never unmapped; forked children inherit
/// it, still inaccessible. `Err` holds the errno of the last failed `mmap`.
fn probe_page() -> Result<usize> {
    static PAGE: std::sync::OnceLock<std::result::Result<usize, i32>> = std::sync::OnceLock::new();
    let mapped = PAGE.get_or_init(|| {
        let page = sys::page_size();
        // validate_range() refuses a start below vm.mmap_min_addr; 64 KiB is
        // the common default when /proc/sys cannot be read.
        let min = sys::mmap_min_addr().unwrap_or(0x1_0000) as usize;
        let lowest = min.max(page).next_multiple_of(page);
        let mut errno = libc::ENOMEM;
        // Low addresses keep the range long (see `owner_exited`); an LSM's
        // own minimum (CONFIG_LSM_MMAP_MIN_ADDR) can refuse the lowest ones.
        for addr in [lowest, 0x1_0000, 0x10_0000, 0x100_0000, 0x1000_0000] {
            if addr < lowest {
                continue;
            }
            match sys::map_inaccessible_page(Some(addr), page) {
                Ok(a) => return Ok(a),
                Err(e) => errno = e.raw_os_error().unwrap_or(errno),
            }
        }
        sys::map_inaccessible_page(None, page).map_err(|e| e.raw_os_error().unwrap_or(errno))
    });
    mapped.map_err(|errno| Error::Os {
        what: "mapping the inaccessible page that Uffd::owner_exited copies from",
        source: io::Error::from_raw_os_error(errno),
    })
}

/// log2 of the end of the owner probe's range tried first: the end is
/// `2^bits - page`, within the user address space of every 64-bit process on
/// x86-64 (`TASK_SIZE_MAX` is `2^47 - page`, or `2^56 - page` with 5-level
/// paging) and of 32-bit ones (at least 2 GiB). A smaller address space
/// (arm64 with 39-bit VAs, a 32-bit process's uffd received over a socket)
/// answers `EINVAL`; the probe then halves the end and remembers the
/// smallest that worked.
static PROBE_END_BITS: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(if cfg!(target_pointer_width = "64") {
        47
    } else {
        31
    });

impl Uffd {
    /// Whether the process whose memory this userfaultfd serves is gone:
    /// its address space (mm) has no users left because the process exited
    /// (even if it is a zombie not yet reaped) or replaced it with
    /// `execve(2)`. A server calls it on the userfaultfds of forked children
    /// ([`Fork`](crate::Fork) events) to release the ones whose child ended
    /// without ever faulting.
    ///
    /// It is one `ioctl(2)` (after a one-time setup per process: one
    /// `mmap(2)`, and a few extra ioctls the first time a smaller address
    /// space is met), does not block on the fd, and has no effect on the
    /// process it asks about: it fills no page, changes no protection, wakes
    /// no thread and reads no event. It is
    /// correct on a userfaultfd with any features (with or without
    /// `PAGEFAULT_FLAG_WP`, `EVENT_FORK`, ...), with or without
    /// `UFFD_USER_MODE_ONLY`, whatever the process has mapped or registered.
    ///
    /// `false` means "not known to be gone": the process may exit right
    /// after. The answer is also `false` while the process's address space
    /// is changing (an `EVENT_FORK`/`REMAP`/`REMOVE`/`UNMAP` message is
    /// queued and not read yet; the kernel answers `EAGAIN` before looking at
    /// the mm then): read the queue and ask again later. Once `true`, it
    /// stays `true`: an mm never comes back to life.
    ///
    /// # How
    ///
    /// `UFFDIO_COPY` with `mode = DONTWAKE`, `src = dst = P` and
    /// `len = E - P`, where `P` is a page of *this* process mapped
    /// `PROT_NONE` at the lowest address it could get (at or just above
    /// `vm.mmap_min_addr`) and `E` is the end of the user address space
    /// (`2^47 - page` on x86-64). In `userfaultfd_copy()`
    /// (fs/userfaultfd.c) the kernel checks that the range (and, on recent
    /// kernels, the source range too) lies between `vm.mmap_min_addr` and
    /// the target mm's `task_size` (`EINVAL` otherwise: the probe then tries
    /// a smaller `E`, down by powers of two), checks the mode, and then
    /// does `if (mmget_not_zero(ctx->mm)) ... else return -ESRCH;`.
    /// `mmget_not_zero` fails exactly when `mm_users` has dropped to zero,
    /// which `exit_mm()` (before the task becomes a zombie) and
    /// `exec_mmap()` do; nothing before it depends on whether the mm is
    /// alive. `ESRCH` means gone; any answer from past that point means the
    /// mm had users when it was asked.
    ///
    /// Why it cannot change anything of a live process, two guards each
    /// enough on its own:
    ///
    /// 1. **No page can be found to fill.** `mfill_atomic()`
    ///    (mm/userfaultfd.c; `__mcopy_atomic()` before 6.4) first looks up
    ///    the destination vma and requires the *whole* range to lie inside
    ///    one vma registered with a userfaultfd (`find_dst_vma()`: `dst_start
    ///    < vm_start || dst_start + len > vm_end` gives `NULL`;
    ///    `validate_dst_vma()` in the per-vma-lock code of 2024 on:
    ///    `dst_end > vm_end`), else it
    ///    returns `ENOENT`. No vma spans from the lowest mappable page to
    ///    the top of a process's address space (its stack and its program
    ///    are separate vmas), so the kernel stops there: no page is
    ///    allocated, no page table touched. The per-vma-lock path
    ///    may run `anon_vma_prepare()` on a *private* vma at `P` before that
    ///    check; a forked child's vma at `P` is this shared `PROT_NONE`
    ///    page, which needs none.
    /// 2. **Nothing could be copied anyway.** `UFFDIO_COPY` only ever
    ///    installs a page it has filled with `copy_from_user()` from `src`,
    ///    in the calling process (`mfill_atomic_pte_copy()`,
    ///    `shmem_mfill_atomic_pte()`, `hugetlb_mfill_atomic_pte()`). `src`
    ///    is `PROT_NONE` here, so the copy fails and the ioctl returns
    ///    `EFAULT` before any page table entry is set. A failed copy wakes
    ///    nobody (the wake comes only after a positive byte count), and
    ///    `DONTWAKE` is set as well. The unit test
    ///    `probe_copy_never_fills_a_registered_page` checks this guard alone
    ///    on registered anonymous (with and without WP), shmem and hugetlb
    ///    memory.
    ///
    /// # Why not another ioctl
    ///
    /// - `UFFDIO_WRITEPROTECT` (mode `0` or `DONTWAKE`) also reaches
    ///   `mmget_not_zero`, but on a live process it *removes* write
    ///   protection from any uffd-wp vma overlapping the range (mode `WP`
    ///   would add it): a page range that can never be uffd-wp does not
    ///   exist, since a process may map and register any page from
    ///   `mmap_min_addr` up (with ASLR off, the stack's last page sits just
    ///   below `task_size`). And older kernels (such as the 5.x
    ///   `userfaultfd_writeprotect()`) call `mwriteprotect_range()` without
    ///   `mmget_not_zero`, answering `ENOENT`, not `ESRCH`, for an exited
    ///   process.
    /// - `UFFDIO_WAKE` never looks at the mm, and wakes.
    /// - `UFFDIO_UNREGISTER` answers `ENOMEM` (not `ESRCH`) for a dead mm
    ///   and, on a live one, takes the mmap lock for writing and unregisters.
    /// - `UFFDIO_ZEROPAGE`, `CONTINUE` and `POISON` fill pages by
    ///   themselves, with no source that could be made to fail; `MOVE`
    ///   refuses other processes' memory (`EINVAL`) before `mmget`.
    ///
    /// # Kernel versions
    ///
    /// The `ESRCH` answer of `UFFDIO_COPY` has been there since 4.13
    /// (`ioctl_userfaultfd(2)`: "ESRCH (since Linux 4.13) The faulting
    /// process has exited at the time of a UFFDIO_COPY operation"; 4.11 and
    /// 4.12 said `ENOSPC`), and the whole-range-in-one-vma rule since the
    /// ioctl first appeared (4.3). Kernels since 2023 also check that
    /// `src + len` lies within the target's address space
    /// (`validate_unaligned_range()` on `src`), which is why `src` is a low
    /// page and the same as `dst`. Nothing here depends on negotiated features
    /// or on `UFFD_USER_MODE_ONLY`: the ioctl dispatch (`userfaultfd_ioctl`)
    /// gates nothing on them.
    ///
    /// # Residual risk
    ///
    /// On a live process the kernel takes its mmap lock (or, in the
    /// per-vma-lock code of 2024 on, a vma lock) for reading to look up one
    /// vma, as every resolution
    /// does: the probe can wait behind a thread of that process holding it
    /// for writing (an `mmap` in progress). Only a process whose single vma
    /// runs from `P` to the top of its address space *and* is registered
    /// would get past guard 1; it would then cost a page allocation (freed
    /// again) and the page-table pages for the first address, and still
    /// fail with `EFAULT`. If `vm.mmap_min_addr` is raised above `P` after
    /// `P` was mapped, every probe fails with `InvalidInput`. `P` stays
    /// mapped (inaccessible, one page, placed with `MAP_FIXED_NOREPLACE`, so
    /// never over an existing mapping) for the life of this process.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] if the inaccessible page cannot be mapped (out of
    /// memory or address space). [`Error::Ioctl`] (op `UFFDIO_COPY`, the
    /// range probed): kind [`InvalidInput`](crate::ErrorKind::InvalidInput)
    /// if no range fits the target's address space (see above), kind
    /// [`Other`](crate::ErrorKind::Other) for an errno the kernel does not
    /// give this probe (for example `EBADF`).
    ///
    /// # References
    ///
    /// - fs/userfaultfd.c: `userfaultfd_copy()` (`validate_range`, then
    ///   `mmget_not_zero` or `-ESRCH`), `userfaultfd_writeprotect()`,
    ///   `userfaultfd_unregister()`, `userfaultfd_wake()`, `new_userfaultfd()`
    ///   (`mmgrab`, not `mmget`)
    /// - mm/userfaultfd.c: `mfill_atomic()` / `__mcopy_atomic()`,
    ///   `find_dst_vma()`, `validate_dst_vma()`, `mfill_atomic_pte_copy()`
    /// - kernel/exit.c `exit_mm()`, fs/exec.c `exec_mmap()`: where
    ///   `mm_users` drops
    /// - `ioctl_userfaultfd(2)`, `UFFDIO_COPY`, errors `ENOENT` and `ESRCH`
    pub fn owner_exited(&self) -> Result<bool> {
        let start = probe_page()?;
        let page = self.page_size() as u64;
        let first = PROBE_END_BITS.load(std::sync::atomic::Ordering::Relaxed);
        let mut bits = first;
        loop {
            let end = (1u64 << bits).saturating_sub(page);
            let len = end.saturating_sub(start as u64);
            if len == 0 {
                // Every end down to the probe page was refused: the page is
                // below vm.mmap_min_addr now, or the target's address space
                // ends below it.
                return Err(Self::fail(
                    Op::Copy,
                    start,
                    0,
                    0,
                    io::Error::from_raw_os_error(libc::EINVAL),
                ));
            }
            match self.copy_from_inaccessible(start, len) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => bits -= 1,
                answer => {
                    if bits < first {
                        PROBE_END_BITS.fetch_min(bits, std::sync::atomic::Ordering::Relaxed);
                    }
                    return match answer {
                        // Cannot happen (the source is unreadable); the mm was
                        // alive for it.
                        Ok(()) => Ok(false),
                        Err(e) => match e.raw_os_error() {
                            Some(libc::ESRCH) => Ok(true),
                            // EAGAIN: the address space is changing, before
                            // the mm is looked at. The others come from past
                            // mmget_not_zero: ENOENT (no vma holds the range),
                            // EFAULT (the copy failed), ENOMEM, EEXIST.
                            Some(
                                libc::EAGAIN
                                | libc::ENOENT
                                | libc::EFAULT
                                | libc::ENOMEM
                                | libc::EEXIST,
                            ) => Ok(false),
                            _ => Err(Self::fail(Op::Copy, start, len as usize, 0, e)),
                        },
                    };
                }
            }
        }
    }

    /// `UFFDIO_COPY` with `DONTWAKE` from the inaccessible probe page to
    /// `dst..dst+len`: the kernel's answer, which is never success.
    fn copy_from_inaccessible(&self, dst: usize, len: u64) -> io::Result<()> {
        let src = probe_page().map_err(io::Error::other)?;
        let mut arg = sys::uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len,
            mode: sys::UFFDIO_COPY_MODE_DONTWAKE,
            copy: 0,
        };
        self.ioctl(sys::UFFDIO_COPY, &mut arg)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::test_uffd;

    use crate::flags::{CopyFlags, Features, RegisterMode};

    use nix::sys::mman::{self, MapFlags, ProtFlags};

    /// An anonymous mapping of `len` bytes with `flags`, or None.
    fn map(len: usize, flags: MapFlags) -> Option<usize> {
        let len = std::num::NonZeroUsize::new(len)?;
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe { mman::mmap_anonymous(None, len, prot, flags) }.ok()?;
        Some(p.as_ptr() as usize)
    }

    #[test]
    fn probe_copy_never_fills_a_registered_page() {
        let Some(uffd) = test_uffd(Features::PAGEFAULT_FLAG_WP) else {
            return;
        };
        let page = uffd.page_size();
        let anon = MapFlags::MAP_PRIVATE;
        let mut cases = vec![
            (
                "anon",
                map(page, anon).unwrap(),
                page,
                RegisterMode::MISSING,
            ),
            (
                "shmem",
                map(page, MapFlags::MAP_SHARED).unwrap(),
                page,
                RegisterMode::MISSING,
            ),
        ];
        if uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
            cases.push((
                "anon+wp",
                map(page, anon).unwrap(),
                page,
                RegisterMode::MISSING | RegisterMode::WP,
            ));
        }
        let huge = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("Hugepagesize:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
            })
            .map(|kib| kib * 1024);
        match huge.and_then(|h| map(h, anon | MapFlags::MAP_HUGETLB).map(|a| (a, h))) {
            Some((addr, h)) => cases.push(("hugetlb", addr, h, RegisterMode::MISSING)),
            None => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "CI=true and no hugetlb page for the probe test");
                eprintln!("*** SKIPPED hugetlb case (not in CI): no free huge page ***");
            }
        }
        for (name, addr, len, mode) in cases {
            // SAFETY: a fresh mapping nothing else touches.
            unsafe { uffd.register(addr, len, mode) }.unwrap();
            for _ in 0..20 {
                let e = uffd.copy_from_inaccessible(addr, len as u64).unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{name}: {e}");
            }
            let data = vec![0xa5u8; len];
            assert_eq!(
                uffd.copy(addr, &data, CopyFlags::empty()).unwrap(),
                len,
                "{name}: the page was no longer missing after the probe"
            );
            // SAFETY: the page was just filled; reading our own mapping.
            assert_eq!(unsafe { std::ptr::read_volatile(addr as *const u8) }, 0xa5);
            let addr = std::ptr::NonNull::new(addr as *mut std::ffi::c_void).unwrap();
            // SAFETY: unmapping our own mapping.
            unsafe { mman::munmap(addr, len) }.unwrap();
        }
    }

    /// The whole probe on this process's own userfaultfd: alive, and the
    /// answer does not change over many calls.
    #[test]
    fn owner_probe_sees_this_process_alive() {
        let Some(uffd) = test_uffd(Features::empty()) else {
            return;
        };
        for _ in 0..100 {
            assert!(!uffd.owner_exited().unwrap());
        }
    }
}
