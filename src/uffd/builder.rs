//! [`UffdBuilder`]: creating a userfaultfd (`/dev/userfaultfd` or the
//! system call) and negotiating its features.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::flags::{Features, Ioctls};
use crate::sys;

use super::{Info, Uffd};

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
