//! The floor: a userfaultfd handler written with libc only, independent of
//! the crate (its own constants and structs for the ABI), to measure every
//! crate path against.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::case::Op;
use super::memory::page_of_bytes;

// The ABI by hand: the asm-generic ioctl numbers (x86_64, aarch64, riscv64;
// not powerpc, mips or sparc, which the benchmarks do not run on).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;

#[repr(C)]
struct RawApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct RawRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct RawCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct RawZero {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// A raw userfaultfd (blocking unless `nonblock`) with `UFFDIO_API` done
/// and `addr..addr+len` registered MISSING.
pub(super) fn raw_uffd(nonblock: bool, addr: usize, len: usize) -> OwnedFd {
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = RawApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API with its argument.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
    assert_eq!(rc, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    let mut reg = RawRegister {
        start: addr as u64,
        len: len as u64,
        mode: 1,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER with its argument, on our own fresh mapping.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
    assert_eq!(rc, 0, "register: {}", std::io::Error::last_os_error());
    fd
}

/// One raw resolution of `len` bytes at `addr`; `EEXIST` wakes instead.
pub(super) fn raw_resolve(fd: RawFd, op: Op, addr: usize, len: usize, src: *const u8) {
    let rc = match op {
        Op::Copy => {
            let mut c = RawCopy {
                dst: addr as u64,
                src: src as u64,
                len: len as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY from a buffer of at least `len` bytes.
            unsafe { libc::ioctl(fd, UFFDIO_COPY, &mut c) }
        }
        Op::Zero => {
            let mut z = RawZero {
                start: addr as u64,
                len: len as u64,
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE with its argument.
            unsafe { libc::ioctl(fd, UFFDIO_ZEROPAGE, &mut z) }
        }
    };
    if rc != 0 {
        let mut range = [addr as u64, len as u64];
        // SAFETY: UFFDIO_WAKE with a uffdio_range.
        unsafe { libc::ioctl(fd, UFFDIO_WAKE, range.as_mut_ptr()) };
    }
}

/// The page of a raw page-fault message (`uffd_msg.arg.pagefault.address`
/// at byte 16), for the handlers that use libc only.
pub(super) fn fault_page(msg: &[u8], page: usize) -> usize {
    u64::from_ne_bytes(msg[16..24].try_into().unwrap()) as usize & !(page - 1)
}

/// The raw floor's handler loop: (poll +) read + one ioctl per fault, the
/// aligned window of `window` pages around it (clipped to `base..end`)
/// copied from `image` at the same offset. Ends after serving `sentinel`.
#[allow(clippy::too_many_arguments)]
pub(super) fn raw_handler(
    fd: RawFd,
    poll: bool,
    op: Op,
    page: usize,
    window: usize,
    base: usize,
    end: usize,
    image: &[u8],
    sentinel: usize,
) {
    let mut msg = [0u8; 32];
    loop {
        if poll {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd.
            unsafe { libc::poll(&mut pfd, 1, -1) };
        }
        // SAFETY: reading one message into a 32-byte buffer.
        let n = unsafe { libc::read(fd, msg.as_mut_ptr().cast(), 32) };
        if n != 32 {
            continue; // EAGAIN after a spurious poll wake-up
        }
        let addr = fault_page(&msg, page);
        let wbytes = window * page;
        let start = if addr == sentinel {
            addr
        } else {
            (base + (addr - base) / wbytes * wbytes).max(base)
        };
        let len = if addr == sentinel {
            page
        } else {
            wbytes.min(end - start)
        };
        // A one-page image is the same page for every address.
        let src = if addr == sentinel || image.len() <= page {
            image.as_ptr()
        } else {
            image[start - base..].as_ptr()
        };
        raw_resolve(fd, op, start, len, src);
        if addr == sentinel {
            return;
        }
    }
}

/// The raw floor with a reactor's wait: edge-triggered epoll, reads of up
/// to 16 messages (a short read means the queue is drained, so no read
/// ends in `EAGAIN`), one ioctl per fault. Ends after serving `sentinel`.
pub(super) fn raw_epoll_handler(fd: RawFd, op: Op, page: usize, sentinel: usize) {
    // SAFETY: plain syscalls on fds this function owns or borrows.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(
        ep >= 0,
        "epoll_create1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above; the epoll fd is ours.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: EPOLL_CTL_ADD with a valid event.
    let rc = unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    let mut msgs = [0u8; 32 * 16];
    let mut ready = false;
    loop {
        if !ready {
            let mut out = [libc::epoll_event { events: 0, u64: 0 }];
            // SAFETY: one event slot.
            unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, -1) };
        }
        // SAFETY: reading whole messages into a buffer of 16.
        let n = unsafe { libc::read(fd, msgs.as_mut_ptr().cast(), msgs.len()) };
        if n <= 0 {
            ready = false;
            continue;
        }
        let n = n as usize;
        ready = n == msgs.len();
        for m in msgs[..n].chunks_exact(32) {
            let addr = fault_page(m, page);
            raw_resolve(fd, op, addr, page, page_of_bytes().as_ptr());
            if addr == sentinel {
                return;
            }
        }
    }
}
