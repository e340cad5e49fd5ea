//! [`Uffd`], [`UffdBuilder`] and every userfaultfd ioctl as a typed method.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};

use crate::error::{Error, Op, Result};
use crate::flags::{
    ContinueFlags, CopyFlags, Features, Ioctls, MoveFlags, PoisonFlags, RegisterMode,
    UnprotectFlags, ZeropageFlags,
};
use crate::sys;

mod builder;
mod probe;

pub use builder::{CreateMethod, UffdBuilder};

/// What the kernel granted a userfaultfd; shared by a [`Uffd`] and the
/// userfaultfds its `Fork` events carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Info {
    pub(crate) features: Features,
    pub(crate) available: Features,
    pub(crate) ioctls: Ioctls,
    pub(crate) page_size: usize,
}

/// What a forked child's userfaultfd inherits from its parent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parent {
    pub(crate) info: Info,
    pub(crate) user_mode_only: bool,
}

/// A userfaultfd: an owned, close-on-exec file descriptor (non-blocking
/// unless made with [`UffdBuilder::blocking`]) and what the kernel granted
/// it.
///
/// Create one with [`UffdBuilder`] (or [`Uffd::new`]), adopt one received
/// from another process with [`Uffd::from_fd`], or take one out of a
/// [`Fork`](crate::Fork) event. Every userfaultfd ioctl is a method taking
/// `&self`, so one `Uffd` (in an `Arc`) can resolve faults from many threads
/// while one of them reads events.
///
/// Addresses and lengths are plain `usize`s in the address space of the
/// process that registered the memory, which need not be this one.
///
/// # Example
///
/// A handler thread of its own, with the sync API only: register fresh
/// memory, let a thread touch it, read its fault and fill the page.
///
/// ```
/// use tokio_uffd::{CopyFlags, Event, EventBuffer, RegisterMode, UffdBuilder};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Blocking: `read_events` waits for the first message by itself.
/// let uffd = UffdBuilder::new().blocking(true).create()?;
/// let page = uffd.page_size();
/// // SAFETY: a fresh anonymous mapping that nothing else uses.
/// let mem = unsafe {
///     libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// assert_ne!(mem, libc::MAP_FAILED);
/// let addr = mem as usize;
/// // SAFETY: the mapping is ours, no reference into it exists, and only
/// // this handler fills it.
/// unsafe { uffd.register(addr, page, RegisterMode::MISSING)? };
///
/// // Touch it from a plain thread: it sleeps until the page is filled.
/// let reader = std::thread::spawn(move || unsafe { *((addr + 10) as *const u8) });
///
/// let mut events = EventBuffer::new(16);
/// uffd.read_events(&mut events)?;
/// while let Some(event) = events.next_event() {
///     if let Event::PageFault(fault) = event? {
///         let contents = vec![42u8; page];
///         // Copies the page in and wakes the faulting thread.
///         uffd.copy(fault.page_start(page), &contents, CopyFlags::empty())?;
///     }
/// }
/// assert_eq!(reader.join().unwrap(), 42);
/// # unsafe { libc::munmap(mem, page) };
/// # Ok(())
/// # }
/// ```
///
/// # References
///
/// - `userfaultfd(2)`, `ioctl_userfaultfd(2)`
/// - <https://docs.kernel.org/admin-guide/mm/userfaultfd.html>
pub struct Uffd {
    fd: OwnedFd,
    info: Info,
    method: Option<CreateMethod>,
    user_mode_only: bool,
}

impl fmt::Debug for Uffd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Uffd")
            .field("fd", &self.fd.as_raw_fd())
            .field("features", &self.info.features)
            .field("page_size", &self.info.page_size)
            .finish_non_exhaustive()
    }
}

/// Checks that `start..start+len` is a non-empty, page-aligned range that
/// does not overflow.
fn check_range(op: Op, start: usize, len: usize, page_size: usize) -> Result<()> {
    if start % page_size != 0 {
        return Err(Error::Unaligned {
            op,
            what: "start",
            value: start,
            page_size,
        });
    }
    if len % page_size != 0 {
        return Err(Error::Unaligned {
            op,
            what: "len",
            value: len,
            page_size,
        });
    }
    if len == 0 || start.checked_add(len).is_none() {
        return Err(Error::BadRange { op, start, len });
    }
    Ok(())
}

/// Turns a kernel progress field (bytes done, or a negative errno) into the
/// bytes done, never casting a negative value.
fn progress(field: i64) -> usize {
    usize::try_from(field).unwrap_or(0)
}

impl Uffd {
    /// Creates a userfaultfd with the defaults of [`UffdBuilder::new`] and no
    /// features.
    ///
    /// # Errors
    ///
    /// See [`UffdBuilder::create`].
    pub fn new() -> Result<Self> {
        UffdBuilder::new().create()
    }

    /// Adopts a userfaultfd made elsewhere, typically received from another
    /// process over a Unix socket (`SCM_RIGHTS`), whose `UFFDIO_API` was
    /// already done there. `UFFDIO_API` is not called again (the kernel
    /// allows it once per fd); the enabled features are read from
    /// `/proc/self/fdinfo`. The fd is made non-blocking (which also affects
    /// the sender's copy: they share one open file description) and
    /// close-on-exec.
    ///
    /// # Errors
    ///
    /// [`Error::NotUffd`] if `fd` is not a userfaultfd or its `UFFDIO_API`
    /// was not done; the fd is closed then.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let raw = fd.as_raw_fd();
        let not = |reason: String| Error::NotUffd { fd: raw, reason };
        let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
            .map_err(|e| not(format!("cannot read /proc/self/fd/{raw}: {e}")))?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(not(format!("it refers to {}", link.display())));
        }
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))
            .map_err(|e| not(format!("cannot read /proc/self/fdinfo/{raw}: {e}")))?;
        let (features, ioctls) = parse_fdinfo(&fdinfo).ok_or_else(|| {
            not(format!(
                "no API line in /proc/self/fdinfo/{raw}: {fdinfo:?}"
            ))
        })?;
        const INITIALIZED: u64 = 1 << 31;
        sys::set_nonblocking_cloexec(fd.as_fd()).map_err(|source| Error::Os {
            what: "making the adopted userfaultfd non-blocking",
            source,
        })?;
        // Before UFFDIO_API a userfaultfd polls as POLLERR, on every kernel.
        if sys::poll_error(fd.as_fd()) {
            return Err(not(
                "UFFDIO_API was not done on it yet; create it with UffdBuilder instead, \
                 or call UFFDIO_API where it was made"
                    .into(),
            ));
        }
        Ok(Uffd {
            fd,
            info: Info {
                features: Features::from_bits_retain(features & !INITIALIZED),
                available: Features::empty(),
                ioctls: Ioctls::from_bits_retain(ioctls & sys::UFFD_API_IOCTLS),
                page_size: sys::page_size(),
            },
            method: None,
            user_mode_only: false,
        })
    }

    /// The userfaultfd of a forked child. The kernel gives it the flags its
    /// parent was *created* with, which for an adopted parent may lack
    /// `O_NONBLOCK`/`O_CLOEXEC`: set them.
    pub(crate) fn from_fork(fd: OwnedFd, parent: Parent) -> Result<Self> {
        sys::set_nonblocking_cloexec(fd.as_fd()).map_err(|source| Error::Os {
            what: "making a forked child's userfaultfd non-blocking",
            source,
        })?;
        Ok(Uffd {
            fd,
            info: parent.info,
            method: None,
            user_mode_only: parent.user_mode_only,
        })
    }

    /// What a forked child's userfaultfd inherits from this one.
    pub(crate) fn parent(&self) -> Parent {
        Parent {
            info: self.info,
            user_mode_only: self.user_mode_only,
        }
    }

    pub(crate) fn borrowed(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether faults from kernel mode are refused (`UFFD_USER_MODE_ONLY`).
    /// False when it was asked for but the kernel (before 5.11) lacks it, and
    /// for adopted fds, where it is not known.
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// The features enabled on this userfaultfd.
    pub fn features(&self) -> Features {
        self.info.features
    }

    /// Every feature the running kernel offers, as `UFFDIO_API` reported it
    /// (empty for an adopted fd, where it is not known).
    pub fn available_features(&self) -> Features {
        self.info.available
    }

    /// The ioctls `UFFDIO_API` reported for the fd itself (register,
    /// unregister, API). The ioctls usable on a range are what
    /// [`register`](Self::register) returns.
    pub fn ioctls(&self) -> Ioctls {
        self.info.ioctls
    }

    /// The base page size (`sysconf(_SC_PAGESIZE)`) that ranges are checked
    /// against. Hugetlb ranges must also be aligned to their huge page size,
    /// which the kernel checks.
    pub fn page_size(&self) -> usize {
        self.info.page_size
    }

    /// How this userfaultfd was created; `None` if it was adopted with
    /// [`from_fd`](Self::from_fd) or came from a fork event.
    pub fn created_via(&self) -> Option<CreateMethod> {
        self.method
    }

    fn ioctl<T>(&self, request: u32, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the request that matches `T`; the
        // operations reachable through here without `unsafe` only fill
        // missing pages, change protection, or wake, which registration
        // (an `unsafe` promise) allowed.
        unsafe { sys::ioctl(self.fd.as_raw_fd(), request, arg) }
    }

    fn fail(op: Op, start: usize, len: usize, done: usize, source: io::Error) -> Error {
        Error::Ioctl {
            op,
            start,
            len,
            done,
            source,
        }
    }

    /// Registers `start..start+len` with this userfaultfd for the faults in
    /// `mode`, and returns the ioctls the kernel allows on the range.
    ///
    /// The range must be mapped, page-aligned (huge-page aligned for
    /// hugetlbfs), and of a memory kind that supports `mode`: MISSING works
    /// on anonymous, shmem and hugetlbfs memory, MINOR on shmem and
    /// hugetlbfs, WP on anonymous (and shmem/hugetlbfs with
    /// `WP_HUGETLBFS_SHMEM`).
    ///
    /// # Safety
    ///
    /// From now on a thread that touches a page of the range in a way `mode`
    /// covers sleeps until this userfaultfd resolves the fault, and reads
    /// whatever the handler supplies. The caller promises that the memory
    /// may be handed over like that: no Rust reference into the range
    /// relies on its current contents (a missing page has none, but a page
    /// dropped later with `MADV_DONTNEED` is refilled by the handler), and
    /// that every thread that may touch it can wait for the handler. The
    /// range may belong to another process (a uffd received over a socket).
    ///
    /// # Errors
    ///
    /// [`Error::Unaligned`]/[`Error::BadRange`] before the call;
    /// [`Error::Ioctl`] from the kernel (`EINVAL` for a bad range or mode,
    /// `EBUSY` if another userfaultfd holds it).
    pub unsafe fn register(&self, start: usize, len: usize, mode: RegisterMode) -> Result<Ioctls> {
        check_range(Op::Register, start, len, self.page_size())?;
        let mut arg = sys::uffdio_register {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl(sys::UFFDIO_REGISTER, &mut arg)
            .map_err(|e| Self::fail(Op::Register, start, len, 0, e))?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregisters `start..start+len`. Threads waiting on the range are
    /// woken and fault again without the userfaultfd.
    ///
    /// # Errors
    ///
    /// Range errors before the call; [`Error::Ioctl`] from the kernel.
    pub fn unregister(&self, start: usize, len: usize) -> Result<()> {
        check_range(Op::Unregister, start, len, self.page_size())?;
        let mut arg = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(sys::UFFDIO_UNREGISTER, &mut arg)
            .map_err(|e| Self::fail(Op::Unregister, start, len, 0, e))
    }

    /// Wakes the threads waiting on `start..start+len` without changing the
    /// memory. Needed after an operation with `DONTWAKE`, and after one that
    /// failed with [`ErrorKind::Exists`](crate::ErrorKind::Exists).
    ///
    /// # Errors
    ///
    /// Range errors before the call; [`Error::Ioctl`] from the kernel.
    pub fn wake(&self, start: usize, len: usize) -> Result<()> {
        check_range(Op::Wake, start, len, self.page_size())?;
        let mut arg = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        self.ioctl(sys::UFFDIO_WAKE, &mut arg)
            .map_err(|e| Self::fail(Op::Wake, start, len, 0, e))
    }

    /// Copies `src` into the missing pages at `dst` (`UFFDIO_COPY`) and,
    /// unless `DONTWAKE`, wakes the threads waiting there. Returns the bytes
    /// copied, which is `src.len()`.
    ///
    /// # Errors
    ///
    /// Range errors before the call. From the kernel, [`Error::Ioctl`] with
    /// [`Error::bytes_done`]: [`ErrorKind::Exists`](crate::ErrorKind::Exists) if the first page is
    /// already there (waiters are *not* woken: call [`wake`](Self::wake));
    /// [`ErrorKind::Retry`](crate::ErrorKind::Retry) if the address space is changing or the copy
    /// stopped part way (for example at a page that already existed; the
    /// pages done were woken); [`ErrorKind::RangeGone`](crate::ErrorKind::RangeGone);
    /// [`ErrorKind::ProcessExited`](crate::ErrorKind::ProcessExited).
    pub fn copy(&self, dst: usize, src: &[u8], flags: CopyFlags) -> Result<usize> {
        let len = src.len();
        check_range(Op::Copy, dst, len, self.page_size())?;
        let mut arg = sys::uffdio_copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: len as u64,
            mode: flags.bits(),
            copy: 0,
        };
        match self.ioctl(sys::UFFDIO_COPY, &mut arg) {
            Ok(()) => Ok(progress(arg.copy)),
            Err(e) => Err(Self::fail(Op::Copy, dst, len, progress(arg.copy), e)),
        }
    }

    /// Maps zero pages at the missing pages of `start..start+len`
    /// (`UFFDIO_ZEROPAGE`). Returns the bytes zeroed, which is `len`.
    /// Not supported on hugetlbfs: copy a zeroed huge page there.
    ///
    /// # Errors
    ///
    /// As for [`copy`](Self::copy).
    pub fn zeropage(&self, start: usize, len: usize, flags: ZeropageFlags) -> Result<usize> {
        check_range(Op::Zeropage, start, len, self.page_size())?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: flags.bits(),
            zeropage: 0,
        };
        match self.ioctl(sys::UFFDIO_ZEROPAGE, &mut arg) {
            Ok(()) => Ok(progress(arg.zeropage)),
            Err(e) => Err(Self::fail(
                Op::Zeropage,
                start,
                len,
                progress(arg.zeropage),
                e,
            )),
        }
    }

    /// Write-protects `start..start+len` (`UFFDIO_WRITEPROTECT` with
    /// `MODE_WP`): a later write to it raises a write-protect fault. The
    /// range must be registered with [`RegisterMode::WP`].
    ///
    /// # Errors
    ///
    /// Range errors before the call; [`Error::Ioctl`] from the kernel.
    pub fn write_protect(&self, start: usize, len: usize) -> Result<()> {
        self.writeprotect(start, len, sys::UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from `start..start+len` and, unless
    /// `DONTWAKE`, wakes the writers waiting there, whose writes then land.
    ///
    /// # Errors
    ///
    /// Range errors before the call; [`Error::Ioctl`] from the kernel.
    pub fn write_unprotect(&self, start: usize, len: usize, flags: UnprotectFlags) -> Result<()> {
        self.writeprotect(start, len, flags.bits())
    }

    fn writeprotect(&self, start: usize, len: usize, mode: u64) -> Result<()> {
        check_range(Op::WriteProtect, start, len, self.page_size())?;
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
        };
        self.ioctl(sys::UFFDIO_WRITEPROTECT, &mut arg)
            .map_err(|e| Self::fail(Op::WriteProtect, start, len, 0, e))
    }

    /// Resolves minor faults on `start..start+len` (`UFFDIO_CONTINUE`): maps
    /// the pages already in the page cache (filled through another mapping
    /// of the same shmem or hugetlbfs file). Returns the bytes mapped.
    ///
    /// # Errors
    ///
    /// As for [`copy`](Self::copy). A page that is not in the page cache
    /// makes the kernel fail with `EFAULT` (kind [`ErrorKind::Other`](crate::ErrorKind::Other)): fill
    /// it through the second mapping first.
    pub fn continue_range(&self, start: usize, len: usize, flags: ContinueFlags) -> Result<usize> {
        check_range(Op::Continue, start, len, self.page_size())?;
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: flags.bits(),
            mapped: 0,
        };
        match self.ioctl(sys::UFFDIO_CONTINUE, &mut arg) {
            Ok(()) => Ok(progress(arg.mapped)),
            Err(e) => Err(Self::fail(
                Op::Continue,
                start,
                len,
                progress(arg.mapped),
                e,
            )),
        }
    }

    /// Marks the missing pages of `start..start+len` poisoned
    /// (`UFFDIO_POISON`, kernel 6.6+): a thread that touches them gets
    /// `SIGBUS`. The way to fail a fault that cannot be served without
    /// leaving its thread asleep or handing it wrong data. Returns the bytes
    /// poisoned.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] if the kernel lacks `POISON`; otherwise as for
    /// [`copy`](Self::copy).
    pub fn poison(&self, start: usize, len: usize, flags: PoisonFlags) -> Result<usize> {
        self.check_available(Op::Poison, Features::POISON, "needs kernel 6.6 or later")?;
        check_range(Op::Poison, start, len, self.page_size())?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: flags.bits(),
            updated: 0,
        };
        match self.ioctl(sys::UFFDIO_POISON, &mut arg) {
            Ok(()) => Ok(progress(arg.updated)),
            Err(e) => Err(Self::fail(Op::Poison, start, len, progress(arg.updated), e)),
        }
    }

    /// Moves the pages at `src..src+len` to the missing pages at
    /// `dst..dst+len` (`UFFDIO_MOVE`, kernel 6.8+, anonymous private memory
    /// of one process) without copying, and wakes the waiters at `dst`
    /// unless `DONTWAKE`. Returns the bytes moved.
    ///
    /// The kernel allows it only when the memory belongs to the calling
    /// process (`EINVAL` otherwise).
    ///
    /// # Safety
    ///
    /// The pages leave `src`: afterwards it reads as missing (zeros, or a
    /// fault if registered). The caller promises that nothing relies on the
    /// contents of `src..src+len` any more (no live references into it),
    /// just as for `munmap`.
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] if the kernel lacks `MOVE`; range errors before the call;
    /// `EBUSY` (kind [`ErrorKind::Other`](crate::ErrorKind::Other)) if a
    /// source page is shared with a forked child (mark the source
    /// `MADV_DONTFORK`);
    /// otherwise as for [`copy`](Self::copy), and `RangeGone` for a hole in
    /// `src` without `ALLOW_SRC_HOLES`.
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        flags: MoveFlags,
    ) -> Result<usize> {
        self.check_available(Op::Move, Features::MOVE, "needs kernel 6.8 or later")?;
        check_range(Op::Move, dst, len, self.page_size())?;
        if src % self.page_size() != 0 {
            return Err(Error::Unaligned {
                op: Op::Move,
                what: "src",
                value: src,
                page_size: self.page_size(),
            });
        }
        if src.checked_add(len).is_none() {
            return Err(Error::BadRange {
                op: Op::Move,
                start: src,
                len,
            });
        }
        let mut arg = sys::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: flags.bits(),
            move_: 0,
        };
        match self.ioctl(sys::UFFDIO_MOVE, &mut arg) {
            Ok(()) => Ok(progress(arg.move_)),
            Err(e) => Err(Self::fail(Op::Move, dst, len, progress(arg.move_), e)),
        }
    }

    fn check_available(&self, op: Op, needs: Features, hint: &'static str) -> Result<()> {
        // Adopted and forked fds do not know what the kernel offers; let the
        // kernel decide there.
        if !self.info.available.is_empty() && !self.info.available.contains(needs) {
            return Err(Error::Unsupported {
                op,
                needs,
                has: self.info.available,
                hint,
            });
        }
        Ok(())
    }

    /// Waits until a message is queued or `timeout` passes (`None`: no
    /// limit), with `poll(2)`: the blocking wait of a synchronous handler
    /// thread. Returns whether a message is queued.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] if `poll` fails (an interrupted wait is retried), or
    /// if the uffd is blocking ([`UffdBuilder::blocking`]): the kernel
    /// reports `POLLERR` for those, so there [`read_events`](Self::read_events)
    /// does the waiting.
    pub fn wait_readable(&self, timeout: Option<std::time::Duration>) -> Result<bool> {
        let os = |source| Error::Os {
            what: "waiting for the userfaultfd with poll(2)",
            source,
        };
        match sys::poll_in(self.fd.as_fd(), timeout).map_err(os)? {
            sys::PollIn::Readable => Ok(true),
            sys::PollIn::TimedOut => Ok(false),
            sys::PollIn::Error => Err(os(io::Error::other(
                "poll(2) reports an error on a blocking userfaultfd (UffdBuilder::blocking): \
                 call read_events, which waits by itself",
            ))),
        }
    }
}

/// Why a read of the userfaultfd failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    Os(io::Error),
    Partial(usize),
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Error {
        match e {
            ReadError::Os(source) => Error::Read { source },
            ReadError::Partial(len) => Error::PartialMessage { len },
        }
    }
}

fn parse_fdinfo(fdinfo: &str) -> Option<(u64, u64)> {
    let line = fdinfo.lines().find_map(|l| l.strip_prefix("API:"))?;
    let mut parts = line.trim().split(':');
    let _api = parts.next()?;
    let features = u64::from_str_radix(parts.next()?.trim(), 16).ok()?;
    let ioctls = u64::from_str_radix(parts.next()?.trim(), 16).ok()?;
    Some((features, ioctls))
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl IntoRawFd for Uffd {
    /// Gives up ownership of the fd without closing it.
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(uffd: Uffd) -> OwnedFd {
        uffd.fd
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Uffd>();
    assert_send_sync::<UffdBuilder>();
};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ErrorKind;

    /// A userfaultfd for the tests below, or None (a failure under CI=true).
    pub(super) fn test_uffd(want: Features) -> Option<Uffd> {
        match UffdBuilder::new().want(want).create() {
            Ok(u) => Some(u),
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "CI=true and no userfaultfd: {e}");
                eprintln!("*** SKIPPED (not in CI): no userfaultfd: {e} ***");
                None
            }
        }
    }

    /// The owner probe's second guard on its own: a `UFFDIO_COPY` from the
    /// inaccessible probe page onto registered, missing memory (anonymous
    /// with and without WP, shmem, hugetlb) fails with `EFAULT` and leaves
    /// the page missing: a real copy there still succeeds (it would fail
    /// with `EEXIST` had the probe filled it).
    #[test]
    fn fdinfo_parses_kernel_format() {
        let s = "pos:\t0\nflags:\t02004000\nmnt_id:\t17\nino:\t3974\npending:\t0\ntotal:\t0\nAPI:\taa:80000108:80000000000001ff\n";
        assert_eq!(parse_fdinfo(s), Some((0x8000_0108, 0x8000_0000_0000_01ff)));
        assert_eq!(parse_fdinfo("pos:\t0\n"), None);
        assert_eq!(parse_fdinfo("API:\taa:zz:1\n"), None);
    }

    #[test]
    fn progress_never_casts_negative() {
        assert_eq!(progress(-(libc::EAGAIN as i64)), 0);
        assert_eq!(progress(8192), 8192);
    }

    #[test]
    fn check_range_names_bad_values() {
        let e = check_range(Op::Copy, 4097, 4096, 4096).unwrap_err();
        assert!(matches!(
            e,
            Error::Unaligned {
                what: "start",
                value: 4097,
                page_size: 4096,
                ..
            }
        ));
        let e = check_range(Op::Copy, 4096, 100, 4096).unwrap_err();
        assert!(matches!(
            e,
            Error::Unaligned {
                what: "len",
                value: 100,
                ..
            }
        ));
        assert!(matches!(
            check_range(Op::Copy, 4096, 0, 4096),
            Err(Error::BadRange { .. })
        ));
        assert!(matches!(
            check_range(Op::Copy, usize::MAX - 4095, 8192, 4096),
            Err(Error::BadRange { .. })
        ));
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
}
