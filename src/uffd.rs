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

/// How [`UffdBuilder::create`] obtains the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CreateMethod {
    /// `/dev/userfaultfd` first; the system call if the device is missing
    /// (`ENOENT`) or not accessible (`EACCES`, `EPERM`).
    #[default]
    Auto,
    /// Only `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`, kernel 6.1+).
    Device,
    /// Only the `userfaultfd(2)` system call.
    Syscall,
}

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

/// Builds a [`Uffd`]: how to create it and which features to negotiate.
///
/// ```no_run
/// use tokio_uffd::{Features, UffdBuilder};
///
/// let uffd = UffdBuilder::new()
///     .require(Features::EVENT_REMOVE)
///     .want(Features::THREAD_ID | Features::POISON)
///     .create()?;
/// assert!(uffd.features().contains(Features::EVENT_REMOVE));
/// # Ok::<(), tokio_uffd::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct UffdBuilder {
    required: Features,
    wanted: Features,
    user_mode_only: bool,
    method: CreateMethod,
    blocking: bool,
}

impl Default for UffdBuilder {
    fn default() -> Self {
        Self::new()
    }
}

const CREATE_HINT: &str =
    "run as root or with CAP_SYS_PTRACE, give this user read/write access to \
    /dev/userfaultfd, set `sysctl vm.unprivileged_userfaultfd=1`, or keep user_mode_only(true) \
    (the default), which unprivileged processes may use on kernels 5.11+";
const NOSYS_HINT: &str = "the kernel was built without CONFIG_USERFAULTFD, or a seccomp \
    filter (e.g. a container runtime's) forbids userfaultfd(2)";

impl UffdBuilder {
    /// A builder with no features, user-mode-only faults and
    /// [`CreateMethod::Auto`].
    pub fn new() -> Self {
        Self {
            required: Features::empty(),
            wanted: Features::empty(),
            user_mode_only: true,
            method: CreateMethod::Auto,
            blocking: false,
        }
    }

    /// Features that must be granted: [`create`](Self::create) fails with
    /// [`Error::MissingFeatures`] naming the missing bits if the kernel lacks
    /// them. Accumulates over calls.
    pub fn require(mut self, features: Features) -> Self {
        self.required |= features;
        self
    }

    /// Features to enable where the kernel has them; the others are left
    /// out silently. Check [`Uffd::features`] for what was granted.
    /// Accumulates over calls.
    pub fn want(mut self, features: Features) -> Self {
        self.wanted |= features;
        self
    }

    /// Whether to refuse faults raised in kernel mode (`UFFD_USER_MODE_ONLY`,
    /// the default). A fault from a system call touching registered memory
    /// (say `read(2)` into it) then fails with `EFAULT` instead of reaching
    /// the handler. That closes a known kernel-exploit primitive and lets
    /// unprivileged processes create userfaultfds. Kernels before 5.11 lack
    /// the flag; it is dropped there automatically.
    ///
    /// **A VMM, or any program whose memory the kernel touches on its
    /// behalf, must pass `false`.** KVM reading or writing guest memory,
    /// `read(2)`/`recv(2)` into registered memory, `O_DIRECT` I/O and
    /// io_uring all fault in kernel mode: with the default those accesses
    /// fail (`EFAULT` from the system call, or a guest that cannot run)
    /// instead of waiting for the handler. Creating such a userfaultfd needs
    /// `/dev/userfaultfd` access, `CAP_SYS_PTRACE`, or
    /// `vm.unprivileged_userfaultfd = 1`.
    pub fn user_mode_only(mut self, yes: bool) -> Self {
        self.user_mode_only = yes;
        self
    }

    /// Whether to create the fd in blocking mode (default: non-blocking).
    ///
    /// For a handler that waits in a thread of its own: a blocking
    /// [`Uffd::read_events`] sleeps until a message comes, so a fault costs
    /// two system calls (the `read(2)` and the resolving ioctl) instead of
    /// three with [`Uffd::wait_readable`] first. [`AsyncUffd::new`]
    /// makes the fd non-blocking, as the reactor needs; so are the
    /// userfaultfds of forked children, whatever this says.
    ///
    /// [`AsyncUffd::new`]: crate::AsyncUffd::new
    pub fn blocking(mut self, yes: bool) -> Self {
        self.blocking = yes;
        self
    }

    /// How to create the fd; see [`CreateMethod`].
    pub fn method(mut self, method: CreateMethod) -> Self {
        self.method = method;
        self
    }

    /// Creates the userfaultfd and negotiates features with `UFFDIO_API`.
    ///
    /// # Errors
    ///
    /// [`Error::Create`] if no userfaultfd can be had (its message says what
    /// to do), [`Error::MissingFeatures`] if a required feature is missing,
    /// [`Error::Api`] if the kernel refuses the request otherwise (for
    /// example `EVENT_FORK` without `CAP_SYS_PTRACE`).
    pub fn create(&self) -> Result<Uffd> {
        let mut request = self.required | self.wanted;
        let mut probed = false;
        loop {
            let (fd, method, user_mode_only) = self.open()?;
            let source = match api(&fd, request) {
                Ok(reply) => {
                    let mut features = request;
                    if features.contains(Features::WP_ASYNC) {
                        // The kernel turns WP_UNPOPULATED on with WP_ASYNC.
                        features |= Features::WP_UNPOPULATED;
                    }
                    return Ok(Uffd {
                        fd,
                        info: Info {
                            features,
                            available: Features::from_bits_retain(reply.features),
                            ioctls: Ioctls::from_bits_retain(reply.ioctls),
                            page_size: sys::page_size(),
                        },
                        method: Some(method),
                        user_mode_only,
                    });
                }
                Err(e) => e,
            };
            drop(fd);
            let fork_only_wanted = request.contains(Features::EVENT_FORK)
                && !self.required.contains(Features::EVENT_FORK);
            if source.raw_os_error() == Some(libc::EPERM) && fork_only_wanted {
                // EVENT_FORK needs CAP_SYS_PTRACE, and it was only wanted.
                request -= Features::EVENT_FORK;
                continue;
            }
            if !probed {
                probed = true;
                // A failed UFFDIO_API reports nothing back: ask what the
                // kernel offers on a throwaway fd.
                let (probe, _, _) = self.open()?;
                let offered = api(&probe, Features::empty()).map_err(|source| Error::Api {
                    requested: Features::empty(),
                    hint: "",
                    source,
                })?;
                let available = Features::from_bits_retain(offered.features);
                let missing = self.required - available;
                if !missing.is_empty() {
                    return Err(Error::MissingFeatures { missing, available });
                }
                let narrowed = request & (self.required | available);
                if narrowed != request {
                    request = narrowed;
                    continue;
                }
            }
            let hint = if source.raw_os_error() == Some(libc::EPERM)
                && request.contains(Features::EVENT_FORK)
            {
                " (EVENT_FORK needs CAP_SYS_PTRACE)"
            } else {
                ""
            };
            return Err(Error::Api {
                requested: request,
                hint,
                source,
            });
        }
    }

    /// Opens a userfaultfd; also says whether it is user-mode-only.
    fn open(&self) -> Result<(OwnedFd, CreateMethod, bool)> {
        let base = if self.blocking {
            libc::O_CLOEXEC
        } else {
            libc::O_CLOEXEC | libc::O_NONBLOCK
        };
        if self.user_mode_only {
            match self.open_flags(base | sys::UFFD_USER_MODE_ONLY) {
                // Kernels before 5.11 reject the flag with EINVAL.
                Err(Error::Create {
                    device, syscall, ..
                }) if device.raw_os_error() == Some(libc::EINVAL)
                    || syscall.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other.map(|(fd, m)| (fd, m, true)),
            }
        }
        self.open_flags(base).map(|(fd, m)| (fd, m, false))
    }

    fn open_flags(&self, flags: i32) -> Result<(OwnedFd, CreateMethod)> {
        let not_tried = || io::Error::other("not tried");
        let fail = |device: io::Error, syscall: io::Error| {
            let hint = match syscall.raw_os_error().or(device.raw_os_error()) {
                Some(libc::ENOSYS) => NOSYS_HINT,
                Some(libc::EMFILE) | Some(libc::ENFILE) => {
                    "the process or the system is out of file descriptors: close some or raise `ulimit -n`"
                }
                Some(libc::ENOMEM) => "the kernel is out of memory",
                _ => CREATE_HINT,
            };
            Error::Create {
                device,
                syscall,
                hint,
            }
        };
        let device = match self.method {
            CreateMethod::Syscall => not_tried(),
            CreateMethod::Auto | CreateMethod::Device => {
                match sys::userfaultfd_from_device(flags) {
                    Ok(fd) => return Ok((fd, CreateMethod::Device)),
                    Err(e) => e,
                }
            }
        };
        let fall_back = matches!(
            device.raw_os_error(),
            Some(libc::ENOENT) | Some(libc::EACCES) | Some(libc::EPERM)
        );
        match self.method {
            CreateMethod::Device => Err(fail(device, not_tried())),
            CreateMethod::Auto if !fall_back => Err(fail(device, not_tried())),
            _ => match sys::userfaultfd(flags) {
                Ok(fd) => Ok((fd, CreateMethod::Syscall)),
                Err(syscall) => Err(fail(device, syscall)),
            },
        }
    }
}

fn api(fd: &OwnedFd, features: Features) -> io::Result<sys::uffdio_api> {
    let mut arg = sys::uffdio_api {
        api: sys::UFFD_API,
        features: features.bits(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `uffdio_api`, which `arg` is; it only
    // configures the fd.
    unsafe { sys::ioctl(fd.as_raw_fd(), sys::UFFDIO_API, &mut arg) }?;
    Ok(arg)
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
mod tests {
    use super::*;
    use crate::ErrorKind;
    use nix::sys::mman::{self, MapFlags, ProtFlags};

    /// A userfaultfd for the tests below, or None (a failure under CI=true).
    fn test_uffd(want: Features) -> Option<Uffd> {
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

    /// An anonymous mapping of `len` bytes with `flags`, or None.
    fn map(len: usize, flags: MapFlags) -> Option<usize> {
        let len = std::num::NonZeroUsize::new(len)?;
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe { mman::mmap_anonymous(None, len, prot, flags) }.ok()?;
        Some(p.as_ptr() as usize)
    }

    /// The owner probe's second guard on its own: a `UFFDIO_COPY` from the
    /// inaccessible probe page onto registered, missing memory (anonymous
    /// with and without WP, shmem, hugetlb) fails with `EFAULT` and leaves
    /// the page missing: a real copy there still succeeds (it would fail
    /// with `EEXIST` had the probe filled it).
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
