//! The userfaultfd kernel ABI, written by hand from
//! `include/uapi/linux/userfaultfd.h` (up to kernel 6.8: `POISON`, `MOVE`,
//! `WP_UNPOPULATED`, `WP_ASYNC`) and, for dirty tracking, the `PAGEMAP_SCAN`
//! part of `include/uapi/linux/fs.h` (kernel 6.7+), and the only module with
//! raw FFI.
//!
//! Everything here mirrors the C names so it can be checked against the
//! header (`tests/abi_header.rs` compiles a C program against the machine's
//! `<linux/userfaultfd.h>` and compares every value it defines). Sizes and
//! field offsets are asserted at compile time below.
//!
//! Most users never need this module: [`Uffd`](crate::Uffd) wraps every
//! ioctl in a typed, checked method. It is public so that a program can speak
//! the raw ABI where it must (for example to build a message for a test).
//!
//! # References
//!
//! - <https://docs.kernel.org/admin-guide/mm/userfaultfd.html>
//! - `userfaultfd(2)`, `ioctl_userfaultfd(2)`

#![allow(missing_docs)] // every item is named after, and documented by, the C header

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};

// Memory mappings of this process: the owner probe's page, the read-only
// file mappings of page sources, residency.
mod mem;

#[cfg(feature = "async")]
pub(crate) use mem::FileMapping;
pub(crate) use mem::{map_inaccessible_page, mmap_min_addr};

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/// `ioctl` type of `/dev/userfaultfd`.
pub const USERFAULTFD_IOC: u32 = 0xAA;
/// Creates a new userfaultfd from `/dev/userfaultfd` (kernel 6.1+). The
/// argument is the same flags word as the syscall's.
pub const USERFAULTFD_IOC_NEW: u32 = nix::request_code_none!(USERFAULTFD_IOC, 0x00) as u32;

pub const UFFD_API: u64 = 0xAA;

pub const UFFD_USER_MODE_ONLY: i32 = 1;

pub const _UFFDIO_REGISTER: u32 = 0x00;
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
pub const _UFFDIO_WAKE: u32 = 0x02;
pub const _UFFDIO_COPY: u32 = 0x03;
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
pub const _UFFDIO_MOVE: u32 = 0x05;
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
pub const _UFFDIO_CONTINUE: u32 = 0x07;
pub const _UFFDIO_POISON: u32 = 0x08;
pub const _UFFDIO_API: u32 = 0x3F;

pub const UFFDIO: u32 = 0xAA;

// The request numbers are `_IOR`/`_IOWR` of the C header, encoded by nix,
// which knows each architecture's layout: asm-generic (x86, arm64, riscv,
// ...) has 2 direction bits and 14 size bits, powerpc, mips and sparc64 have
// 3 and 13 and other direction values. The `as u32` only narrows nix's
// `c_ulong` (glibc) or reinterprets its `c_int` (musl): every number fits in
// 32 bits. Checked below against the known values.
pub const UFFDIO_API: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_API, size_of::<uffdio_api>()) as u32;
pub const UFFDIO_REGISTER: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_REGISTER, size_of::<uffdio_register>()) as u32;
pub const UFFDIO_UNREGISTER: u32 =
    nix::request_code_read!(UFFDIO, _UFFDIO_UNREGISTER, size_of::<uffdio_range>()) as u32;
pub const UFFDIO_WAKE: u32 =
    nix::request_code_read!(UFFDIO, _UFFDIO_WAKE, size_of::<uffdio_range>()) as u32;
pub const UFFDIO_COPY: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_COPY, size_of::<uffdio_copy>()) as u32;
pub const UFFDIO_ZEROPAGE: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_ZEROPAGE, size_of::<uffdio_zeropage>()) as u32;
pub const UFFDIO_MOVE: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_MOVE, size_of::<uffdio_move>()) as u32;
pub const UFFDIO_WRITEPROTECT: u32 = nix::request_code_readwrite!(
    UFFDIO,
    _UFFDIO_WRITEPROTECT,
    size_of::<uffdio_writeprotect>()
) as u32;
pub const UFFDIO_CONTINUE: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_CONTINUE, size_of::<uffdio_continue>()) as u32;
pub const UFFDIO_POISON: u32 =
    nix::request_code_readwrite!(UFFDIO, _UFFDIO_POISON, size_of::<uffdio_poison>()) as u32;

pub const UFFD_API_IOCTLS: u64 = 1 << _UFFDIO_REGISTER | 1 << _UFFDIO_UNREGISTER | 1 << _UFFDIO_API;
pub const UFFD_API_RANGE_IOCTLS: u64 = 1 << _UFFDIO_WAKE
    | 1 << _UFFDIO_COPY
    | 1 << _UFFDIO_ZEROPAGE
    | 1 << _UFFDIO_MOVE
    | 1 << _UFFDIO_WRITEPROTECT
    | 1 << _UFFDIO_CONTINUE
    | 1 << _UFFDIO_POISON;
pub const UFFD_API_RANGE_IOCTLS_BASIC: u64 = 1 << _UFFDIO_WAKE
    | 1 << _UFFDIO_COPY
    | 1 << _UFFDIO_WRITEPROTECT
    | 1 << _UFFDIO_CONTINUE
    | 1 << _UFFDIO_POISON;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

pub const UFFD_API_FEATURES: u64 = UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_MISSING_HUGETLBFS
    | UFFD_FEATURE_MISSING_SHMEM
    | UFFD_FEATURE_SIGBUS
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_MINOR_HUGETLBFS
    | UFFD_FEATURE_MINOR_SHMEM
    | UFFD_FEATURE_EXACT_ADDRESS
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | UFFD_FEATURE_WP_UNPOPULATED
    | UFFD_FEATURE_POISON
    | UFFD_FEATURE_WP_ASYNC
    | UFFD_FEATURE_MOVE;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub const UFFD_API_REGISTER_MODES: u64 =
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR;

pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

// ---------------------------------------------------------------------------
// Structures
// ---------------------------------------------------------------------------

/// Page-fault payload of [`uffd_msg`].
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffd_msg_pagefault {
    pub flags: u64,
    pub address: u64,
    /// `feat.ptid`: the faulting thread's id with `UFFD_FEATURE_THREAD_ID`.
    pub ptid: u32,
}

/// Fork payload of [`uffd_msg`].
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffd_msg_fork {
    pub ufd: u32,
}

/// Remap payload of [`uffd_msg`].
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffd_msg_remap {
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

/// Remove/unmap payload of [`uffd_msg`].
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffd_msg_remove {
    pub start: u64,
    pub end: u64,
}

/// The union `arg` of [`uffd_msg`].
#[repr(C, packed)]
#[derive(Clone, Copy)]
#[allow(missing_debug_implementations)] // a union: `uffd_msg`'s Debug prints it
pub union uffd_msg_arg {
    pub pagefault: uffd_msg_pagefault,
    pub fork: uffd_msg_fork,
    pub remap: uffd_msg_remap,
    pub remove: uffd_msg_remove,
    pub reserved: [u64; 3],
}

/// One message read from a userfaultfd: 32 bytes, packed.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub arg: uffd_msg_arg,
}

impl uffd_msg {
    /// An all-zero message (event code 0, which no kernel sends).
    pub const fn zeroed() -> Self {
        Self {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: uffd_msg_arg { reserved: [0; 3] },
        }
    }

    /// The message as its 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0] = self.event;
        out[1] = self.reserved1;
        out[2..4].copy_from_slice(&{ self.reserved2 }.to_ne_bytes());
        out[4..8].copy_from_slice(&{ self.reserved3 }.to_ne_bytes());
        // SAFETY: every variant of the union is plain integers, and
        // `reserved` covers all 24 bytes, so reading it is always defined.
        let words = unsafe { self.arg.reserved };
        for (i, w) in words.iter().enumerate() {
            out[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    /// A message from 32 raw bytes (in native byte order).
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 + 8 * i..16 + 8 * i]);
            u64::from_ne_bytes(w)
        };
        Self {
            event: bytes[0],
            reserved1: bytes[1],
            reserved2: u16::from_ne_bytes([bytes[2], bytes[3]]),
            reserved3: u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            arg: uffd_msg_arg {
                reserved: [word(0), word(1), word(2)],
            },
        }
    }
}

impl std::fmt::Debug for uffd_msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: `reserved` spans the whole union and every bit pattern is a
        // valid `[u64; 3]`.
        let words = unsafe { self.arg.reserved };
        f.debug_struct("uffd_msg")
            .field("event", &{ self.event })
            .field("arg", &words)
            .finish()
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_copy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Written by the kernel: bytes copied, or a negative errno.
    pub copy: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_zeropage {
    pub range: uffdio_range,
    pub mode: u64,
    /// Written by the kernel: bytes zeroed, or a negative errno.
    pub zeropage: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    /// Written by the kernel: bytes mapped, or a negative errno.
    pub mapped: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    /// Written by the kernel: bytes poisoned, or a negative errno.
    pub updated: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct uffdio_move {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    /// Written by the kernel: bytes moved, or a negative errno.
    pub move_: i64,
}

// ---------------------------------------------------------------------------
// PAGEMAP_SCAN (`include/uapi/linux/fs.h`, kernel 6.7+): an ioctl on
// `/proc/<pid>/pagemap` that reports page ranges by category and can
// write-protect the matching ones in the same call. The C headers of older
// distributions lack these names; they are written here by hand.
// ---------------------------------------------------------------------------

/// The page has asynchronous write protection enabled (its VMA is registered
/// with `UFFDIO_REGISTER_MODE_WP` on a userfaultfd with `WP_ASYNC`).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// The page was written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// Write-protect the pages that matched (and were reported).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with `EPERM` when the scan meets a page without asynchronous write
/// protection.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `ioctl` type of `PAGEMAP_SCAN` (`'f'`).
pub const PAGEMAP_IOC: u32 = b'f' as u32;
pub const _PAGEMAP_SCAN: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct page_region {
    pub start: u64,
    /// Exclusive.
    pub end: u64,
    pub categories: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct pm_scan_arg {
    /// `size_of::<pm_scan_arg>()`.
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    /// Written by the kernel: where the scan stopped (`end` when it covered
    /// the whole range).
    pub walk_end: u64,
    /// Address of a `page_region` array of `vec_len` entries.
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

pub const PAGEMAP_SCAN: u32 =
    nix::request_code_readwrite!(PAGEMAP_IOC, _PAGEMAP_SCAN, size_of::<pm_scan_arg>()) as u32;

// ---------------------------------------------------------------------------
// Compile-time layout checks
// ---------------------------------------------------------------------------

const _: () = {
    assert!(size_of::<uffd_msg>() == 32);
    assert!(offset_of!(uffd_msg, event) == 0);
    assert!(offset_of!(uffd_msg, reserved1) == 1);
    assert!(offset_of!(uffd_msg, reserved2) == 2);
    assert!(offset_of!(uffd_msg, reserved3) == 4);
    assert!(offset_of!(uffd_msg, arg) == 8);
    assert!(size_of::<uffd_msg_arg>() == 24);
    assert!(offset_of!(uffd_msg_pagefault, flags) == 0);
    assert!(offset_of!(uffd_msg_pagefault, address) == 8);
    assert!(offset_of!(uffd_msg_pagefault, ptid) == 16);
    assert!(offset_of!(uffd_msg_remap, from) == 0);
    assert!(offset_of!(uffd_msg_remap, to) == 8);
    assert!(offset_of!(uffd_msg_remap, len) == 16);
    assert!(offset_of!(uffd_msg_remove, start) == 0);
    assert!(offset_of!(uffd_msg_remove, end) == 8);

    assert!(size_of::<uffdio_api>() == 24);
    assert!(offset_of!(uffdio_api, features) == 8);
    assert!(offset_of!(uffdio_api, ioctls) == 16);
    assert!(size_of::<uffdio_range>() == 16);
    assert!(offset_of!(uffdio_range, len) == 8);
    assert!(size_of::<uffdio_register>() == 32);
    assert!(offset_of!(uffdio_register, mode) == 16);
    assert!(offset_of!(uffdio_register, ioctls) == 24);
    assert!(size_of::<uffdio_copy>() == 40);
    assert!(offset_of!(uffdio_copy, src) == 8);
    assert!(offset_of!(uffdio_copy, len) == 16);
    assert!(offset_of!(uffdio_copy, mode) == 24);
    assert!(offset_of!(uffdio_copy, copy) == 32);
    assert!(size_of::<uffdio_zeropage>() == 32);
    assert!(offset_of!(uffdio_zeropage, mode) == 16);
    assert!(offset_of!(uffdio_zeropage, zeropage) == 24);
    assert!(size_of::<uffdio_writeprotect>() == 24);
    assert!(offset_of!(uffdio_writeprotect, mode) == 16);
    assert!(size_of::<uffdio_continue>() == 32);
    assert!(offset_of!(uffdio_continue, mode) == 16);
    assert!(offset_of!(uffdio_continue, mapped) == 24);
    assert!(size_of::<uffdio_poison>() == 32);
    assert!(offset_of!(uffdio_poison, mode) == 16);
    assert!(offset_of!(uffdio_poison, updated) == 24);
    assert!(size_of::<uffdio_move>() == 40);
    assert!(offset_of!(uffdio_move, mode) == 24);
    assert!(offset_of!(uffdio_move, move_) == 32);

    assert!(size_of::<page_region>() == 24);
    assert!(offset_of!(page_region, end) == 8);
    assert!(offset_of!(page_region, categories) == 16);
    assert!(size_of::<pm_scan_arg>() == 96);
    assert!(offset_of!(pm_scan_arg, flags) == 8);
    assert!(offset_of!(pm_scan_arg, start) == 16);
    assert!(offset_of!(pm_scan_arg, end) == 24);
    assert!(offset_of!(pm_scan_arg, walk_end) == 32);
    assert!(offset_of!(pm_scan_arg, vec) == 40);
    assert!(offset_of!(pm_scan_arg, vec_len) == 48);
    assert!(offset_of!(pm_scan_arg, max_pages) == 56);
    assert!(offset_of!(pm_scan_arg, category_inverted) == 64);
    assert!(offset_of!(pm_scan_arg, category_mask) == 72);
    assert!(offset_of!(pm_scan_arg, category_anyof_mask) == 80);
    assert!(offset_of!(pm_scan_arg, return_mask) == 88);
};

// The encoded request numbers, as `<linux/userfaultfd.h>` gives them on
// x86-64.
#[cfg(target_arch = "x86_64")]
const _: () = {
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_WAKE == 0x8010_aa02);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
    assert!(UFFDIO_MOVE == 0xc028_aa05);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
    assert!(UFFDIO_CONTINUE == 0xc020_aa07);
    assert!(UFFDIO_POISON == 0xc020_aa08);
    assert!(USERFAULTFD_IOC_NEW == 0xaa00);
    assert!(PAGEMAP_SCAN == 0xc060_6610);
};

// Where `_IOC_NONE` is 1, `_IOC_READ` 2 and `_IOC_WRITE` 4 in a 3-bit
// direction field (arch/{powerpc,mips,sparc}/include/uapi/asm/ioctl.h):
// `_IO` and `_IOR` differ from asm-generic. A target whose encoding nix got
// wrong fails to build here instead of sending the wrong requests (nix 0.30
// encodes 32-bit sparc as asm-generic, so that target stops here).
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
const _: () = {
    assert!(USERFAULTFD_IOC_NEW == 0x2000_aa00);
    assert!(UFFDIO_UNREGISTER == 0x4010_aa01);
    assert!(UFFDIO_WAKE == 0x4010_aa02);
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(PAGEMAP_SCAN == 0xc060_6610);
};

// ---------------------------------------------------------------------------
// Raw calls. Each returns the OS error on failure; nothing here interprets it.
// ---------------------------------------------------------------------------

/// Calls `userfaultfd(2)` with `flags`.
///
/// # References
///
/// - [`userfaultfd(2)`](https://man7.org/linux/man-pages/man2/userfaultfd.2.html)
pub fn userfaultfd(flags: i32) -> io::Result<OwnedFd> {
    // Raw libc: neither nix nor libc has a wrapper for this syscall.
    // SAFETY: the syscall takes one integer argument and touches no memory of
    // ours.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

// `ioctl(fd, USERFAULTFD_IOC_NEW, flags)`: the flags go by value, as an
// integer, not through a pointer.
mod dev {
    nix::ioctl_write_int_bad!(userfaultfd_ioc_new, super::USERFAULTFD_IOC_NEW);
}

/// Opens `/dev/userfaultfd` and asks it for a new userfaultfd with `flags`
/// (`USERFAULTFD_IOC_NEW`, kernel 6.1+). The device fd is closed again.
///
/// # References
///
/// - <https://docs.kernel.org/admin-guide/mm/userfaultfd.html#create-a-userfaultfd>
pub fn userfaultfd_from_device(flags: i32) -> io::Result<OwnedFd> {
    // std opens with O_CLOEXEC.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as a plain integer argument
    // and touches no memory of ours.
    let fd = unsafe { dev::userfaultfd_ioc_new(dev.as_raw_fd(), flags) }?;
    // SAFETY: on success the ioctl returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues `ioctl(fd, request, arg)` with a pointer to a `#[repr(C)]` struct.
///
/// # Safety
///
/// `request` must be a userfaultfd ioctl whose argument has type `T`, and
/// the operation it asks of the kernel must be one the caller may ask for
/// (for example, `UFFDIO_MOVE` takes pages away from its source range).
///
/// # References
///
/// - [`ioctl_userfaultfd(2)`](https://man7.org/linux/man-pages/man2/ioctl_userfaultfd.2.html)
pub unsafe fn ioctl<T>(fd: RawFd, request: u32, arg: &mut T) -> io::Result<()> {
    // Raw libc: nix's `ioctl_*!` macros make one function per request; this
    // one is generic over the request, so every `Uffd` method (and the
    // per-fault COPY/ZEROPAGE) shares one plain call.
    // SAFETY: `arg` is a valid, exclusive pointer to a `T` for the duration
    // of the call, which is what the request expects by the caller's promise.
    let ret = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(pagemap, PAGEMAP_SCAN, arg)` with `out` as the output vector:
/// sets `arg.size`, `arg.vec` and `arg.vec_len`, and returns the number of
/// entries of `out` the kernel filled (never more than `out.len()`).
/// `arg.walk_end` tells where the scan stopped.
///
/// # Safety
///
/// `pagemap` must be an open `/proc/<pid>/pagemap` file: the request number
/// means `PAGEMAP_SCAN` only there, and another file could read or write
/// `arg` and `out` as something else. With `PM_SCAN_WP_MATCHING` the
/// caller must be allowed to write-protect the matching pages of that
/// process.
///
/// # References
///
/// - [`ioctl_pagemap_scan(2)`](https://man7.org/linux/man-pages/man2/ioctl_pagemap_scan.2.html)
/// - <https://docs.kernel.org/admin-guide/mm/pagemap.html>
pub unsafe fn pagemap_scan(
    pagemap: BorrowedFd<'_>,
    arg: &mut pm_scan_arg,
    out: &mut [page_region],
) -> io::Result<usize> {
    arg.size = size_of::<pm_scan_arg>() as u64;
    arg.vec = out.as_mut_ptr() as u64;
    arg.vec_len = out.len() as u64;
    // Raw libc, for the same reason as `ioctl` above.
    // SAFETY: `arg` is a valid, exclusive `pm_scan_arg` and `arg.vec` points
    // to `out`, writable for `arg.vec_len` entries, for the whole call; the
    // caller promises that `pagemap` is a pagemap file, where the request is
    // PAGEMAP_SCAN and reads and writes exactly those.
    let ret = unsafe {
        libc::ioctl(
            pagemap.as_raw_fd(),
            PAGEMAP_SCAN as _,
            arg as *mut pm_scan_arg,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel never reports more entries than it was given room for;
    // clamp anyway so a caller's slice stays in bounds.
    Ok((ret as usize).min(out.len()))
}

/// `read(2)` of whole messages into `buf`. Returns the number of bytes read.
/// The caller owns the fds of any fork messages read.
pub(crate) fn read_msgs(
    fd: BorrowedFd<'_>,
    buf: &mut [std::mem::MaybeUninit<uffd_msg>],
) -> io::Result<usize> {
    let len = std::mem::size_of_val(buf);
    // Raw libc: nix's `read` wants an initialized `&mut [u8]`; reading
    // straight into `MaybeUninit` messages spares zeroing the buffer per read.
    // SAFETY: `buf` is writable for `len` bytes; the kernel writes whole
    // messages into it and reports how many bytes it wrote.
    let ret = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `sysconf(_SC_PAGESIZE)`: the base page size of this machine.
///
/// # References
///
/// - [`sysconf(3)`](https://man7.org/linux/man-pages/man3/sysconf.3.html)
pub fn page_size() -> usize {
    if let Ok(Some(n)) = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        if n > 0 {
            return n as usize;
        }
    }
    // Linux libcs never fail _SC_PAGESIZE; the kernel's auxiliary vector
    // holds the same value. Raw libc: nix has no `getauxval`.
    // SAFETY: getauxval reads the process's auxiliary vector.
    unsafe { libc::getauxval(libc::AT_PAGESZ) as usize }
}

/// `poll(2)` of one fd for `POLLIN` for up to `timeout`; `EINTR` is not
/// retried here. Returns the number of ready fds (0 or 1) and `revents`.
fn poll_one(fd: BorrowedFd<'_>, timeout: PollTimeout) -> nix::Result<(i32, PollFlags)> {
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = nix::poll::poll(&mut pfd, timeout)?;
    // The kernel reports only the requested events and POLLERR, POLLHUP,
    // POLLNVAL, all of which nix knows: `revents()` is never `None`.
    Ok((n, pfd[0].revents().unwrap_or(PollFlags::empty())))
}

/// Whether `fd` polls as `POLLERR` right now (a userfaultfd before
/// `UFFDIO_API`, or a blocking one).
pub(crate) fn poll_error(fd: BorrowedFd<'_>) -> bool {
    poll_one(fd, PollTimeout::ZERO)
        .is_ok_and(|(n, revents)| n > 0 && revents.contains(PollFlags::POLLERR))
}

/// What [`poll_in`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollIn {
    Readable,
    TimedOut,
    /// `POLLERR` without `POLLIN`: for a userfaultfd, one that is blocking
    /// or whose `UFFDIO_API` was not done.
    Error,
}

/// `poll(2)` for `POLLIN` on `fd` up to `timeout` (`None`: forever):
/// readable, timed out, or an error condition. `EINTR` is retried.
pub(crate) fn poll_in(
    fd: BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> io::Result<PollIn> {
    // Longer than i32::MAX ms (24.8 days) waits that long.
    let timeout = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
    });
    loop {
        match poll_one(fd, timeout) {
            Ok((_, revents)) => {
                return Ok(if revents.contains(PollFlags::POLLIN) {
                    PollIn::Readable
                } else if revents.contains(PollFlags::POLLERR) {
                    PollIn::Error
                } else {
                    PollIn::TimedOut
                });
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sets `O_NONBLOCK` on the open file description and `FD_CLOEXEC` on `fd`.
pub(crate) fn set_nonblocking_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::fcntl;
    let fl = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    if !fl.contains(OFlag::O_NONBLOCK) {
        fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
    }
    let fdfl = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD)?);
    if !fdfl.contains(FdFlag::FD_CLOEXEC) {
        fcntl(fd, FcntlArg::F_SETFD(fdfl | FdFlag::FD_CLOEXEC))?;
    }
    Ok(())
}

/// `gettid(2)`: the calling thread's id.
///
/// # References
///
/// - [`gettid(2)`](https://man7.org/linux/man-pages/man2/gettid.2.html)
pub fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}
