//! Typed bit sets over the kernel's flag words.
//!
//! Bits this crate does not know yet are kept, never rejected: every type is
//! built with `from_bits_retain` from kernel data.

use crate::sys;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: what a userfaultfd can do, negotiated with
    /// `UFFDIO_API` when it is created.
    ///
    /// See [`UffdBuilder::require`](crate::UffdBuilder::require) and
    /// [`UffdBuilder::want`](crate::UffdBuilder::want).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        /// Write-protect faults are reported (`PAGEFAULT_FLAG_WP`).
        const PAGEFAULT_FLAG_WP = sys::UFFD_FEATURE_PAGEFAULT_FLAG_WP;
        /// `fork()` of the process raises [`Event::Fork`](crate::Event::Fork)
        /// with a new userfaultfd for the child. Needs `CAP_SYS_PTRACE`.
        const EVENT_FORK = sys::UFFD_FEATURE_EVENT_FORK;
        /// `mremap()` of a registered range raises
        /// [`Event::Remap`](crate::Event::Remap).
        const EVENT_REMAP = sys::UFFD_FEATURE_EVENT_REMAP;
        /// `MADV_DONTNEED`/`MADV_REMOVE` on a registered range raise
        /// [`Event::Remove`](crate::Event::Remove).
        const EVENT_REMOVE = sys::UFFD_FEATURE_EVENT_REMOVE;
        /// MISSING registration of hugetlbfs memory works.
        const MISSING_HUGETLBFS = sys::UFFD_FEATURE_MISSING_HUGETLBFS;
        /// MISSING registration of shmem memory works.
        const MISSING_SHMEM = sys::UFFD_FEATURE_MISSING_SHMEM;
        /// `munmap()` of a registered range raises
        /// [`Event::Unmap`](crate::Event::Unmap).
        const EVENT_UNMAP = sys::UFFD_FEATURE_EVENT_UNMAP;
        /// Faults raise `SIGBUS` in the faulting thread instead of a message.
        const SIGBUS = sys::UFFD_FEATURE_SIGBUS;
        /// Page-fault messages carry the faulting thread's id.
        const THREAD_ID = sys::UFFD_FEATURE_THREAD_ID;
        /// MINOR registration of hugetlbfs memory works.
        const MINOR_HUGETLBFS = sys::UFFD_FEATURE_MINOR_HUGETLBFS;
        /// MINOR registration of shmem memory works.
        const MINOR_SHMEM = sys::UFFD_FEATURE_MINOR_SHMEM;
        /// Fault addresses are exact, not rounded down to the page.
        const EXACT_ADDRESS = sys::UFFD_FEATURE_EXACT_ADDRESS;
        /// WP registration of hugetlbfs and shmem memory works.
        const WP_HUGETLBFS_SHMEM = sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        /// Write protection applies to unpopulated pages too (kernel 6.4+).
        const WP_UNPOPULATED = sys::UFFD_FEATURE_WP_UNPOPULATED;
        /// `UFFDIO_POISON` works (kernel 6.6+).
        const POISON = sys::UFFD_FEATURE_POISON;
        /// Write-protect faults are resolved by the kernel itself, for dirty
        /// tracking through `PAGEMAP_SCAN` (kernel 6.7+). Implies
        /// `WP_UNPOPULATED`.
        const WP_ASYNC = sys::UFFD_FEATURE_WP_ASYNC;
        /// `UFFDIO_MOVE` works (kernel 6.8+).
        const MOVE = sys::UFFD_FEATURE_MOVE;
    }
}

bitflags::bitflags! {
    /// A set of userfaultfd ioctls, as the kernel reports them in
    /// `uffdio_api.ioctls` and `uffdio_register.ioctls` (bit `n` is ioctl
    /// number `n`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << sys::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << sys::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << sys::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << sys::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << sys::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << sys::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << sys::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << sys::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << sys::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << sys::_UFFDIO_API;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults on a range are reported.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Faults on missing pages (never populated, or freed).
        const MISSING = sys::UFFDIO_REGISTER_MODE_MISSING;
        /// Writes to write-protected pages.
        const WP = sys::UFFDIO_REGISTER_MODE_WP;
        /// Faults on pages present in the page cache but not mapped
        /// (shmem, hugetlbfs); resolved with `continue`.
        const MINOR = sys::UFFDIO_REGISTER_MODE_MINOR;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyFlags: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = sys::UFFDIO_COPY_MODE_DONTWAKE;
        /// Map the copied pages write-protected.
        const WP = sys::UFFDIO_COPY_MODE_WP;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ZeropageFlags: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE;
    }
}

bitflags::bitflags! {
    /// Flags for [`Uffd::write_unprotect`](crate::Uffd::write_unprotect)
    /// (`UFFDIO_WRITEPROTECT` without `MODE_WP`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct UnprotectFlags: u64 {
        /// Do not wake the writers waiting on the range.
        const DONTWAKE = sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_CONTINUE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ContinueFlags: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = sys::UFFDIO_CONTINUE_MODE_DONTWAKE;
        /// Map the pages write-protected (kernel 6.5+).
        const WP = sys::UFFDIO_CONTINUE_MODE_WP;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_POISON_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PoisonFlags: u64 {
        /// Do not wake the threads waiting on the range.
        const DONTWAKE = sys::UFFDIO_POISON_MODE_DONTWAKE;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_MOVE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveFlags: u64 {
        /// Do not wake the threads waiting on the destination range.
        const DONTWAKE = sys::UFFDIO_MOVE_MODE_DONTWAKE;
        /// Count holes in the source as moved instead of failing with
        /// `ENOENT`.
        const ALLOW_SRC_HOLES = sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
    }
}

bitflags::bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*` of a page-fault message.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PageFaultFlags: u64 {
        /// The fault was a write.
        const WRITE = sys::UFFD_PAGEFAULT_FLAG_WRITE;
        /// The fault hit a write-protected page.
        const WP = sys::UFFD_PAGEFAULT_FLAG_WP;
        /// The fault is a minor fault (page in the page cache, not mapped).
        const MINOR = sys::UFFD_PAGEFAULT_FLAG_MINOR;
    }
}
