//! `Uffd::owner_exited` against the real kernel: it sees this process and
//! live forked children as alive, sees a child that exited (zombie or
//! reaped) as gone, and changes nothing of the process it asks about: a
//! registered page stays missing, a write-protected page stays protected, a
//! sleeping faulting thread stays asleep.
//!
//! Children are forked with the raw system call (`common::raw_fork`): with
//! `EVENT_FORK` the fork waits until its event is read, and glibc's `fork()`
//! would hold the malloc locks meanwhile. A child runs only raw syscalls
//! (`read`, `_exit`) or a plain memory read.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tokio_uffd::{
    CopyFlags, Event, EventBuffer, FaultKind, Features, RegisterMode, Uffd, UffdBuilder,
    UnprotectFlags,
};

/// A child process that is killed and reaped if the test ends without
/// reaping it (a failed assertion, a timeout).
struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    reaped: bool,
}

impl Child {
    fn new(pid: libc::pid_t) -> Self {
        assert!(pid > 0);
        // SAFETY: plain syscall.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: plain syscalls on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            panic!("pidfd_open: {e}");
        }
        Self {
            pid,
            // SAFETY: a new fd nothing else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(fd) },
            reaped: false,
        }
    }

    /// Whether the child has exited (it may still be a zombie).
    fn exited_within(&self, ms: i32) -> bool {
        readable_within(self.pidfd.as_raw_fd(), ms)
    }

    /// Waits (at most `BOUND`) until the child has exited, without reaping
    /// it: it stays a zombie.
    fn wait_exited(&self) {
        assert!(
            self.exited_within(BOUND.as_millis() as i32),
            "child {} did not exit within {BOUND:?}",
            self.pid
        );
    }

    /// Waits for the child to exit and reaps it; returns the wait status.
    fn reap(&mut self) -> i32 {
        self.wait_exited();
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(r, self.pid, "waitpid: {}", std::io::Error::last_os_error());
        self.reaped = true;
        status
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: plain syscalls on our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// A pipe (read end, write end), close-on-exec.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: two new fds nothing else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A mapping that is unmapped on drop only when the test passes. A failing
/// test may leave a thread asleep on a fault there; closing the userfaultfd
/// wakes it and it touches the page again, which must not be a `SIGSEGV`
/// that kills every test of this binary.
struct KeepOnPanic(std::mem::ManuallyDrop<Mapping>);

impl KeepOnPanic {
    fn new(m: Mapping) -> Self {
        Self(std::mem::ManuallyDrop::new(m))
    }
}

impl std::ops::Deref for KeepOnPanic {
    type Target = Mapping;
    fn deref(&self) -> &Mapping {
        &self.0
    }
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if !thread::panicking() {
            // SAFETY: dropped once, here; the field is not used afterwards.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.0) };
        }
    }
}

/// Forks, from a thread of its own, a child that runs `child` (which must
/// end with `_exit` and use only async-signal-safe calls), reads the Fork
/// event from `uffd` and returns the child and its userfaultfd.
fn fork_child(uffd: &Uffd, child: fn(usize) -> !, arg: usize) -> (Child, Uffd) {
    let forker = thread::spawn(move || {
        let pid = raw_fork();
        if pid == 0 {
            child(arg);
        }
        pid
    });
    let mut buf = EventBuffer::new(1);
    let event = next_event(uffd, &mut buf);
    let pid = join_bounded("the forking thread", forker);
    let child = Child::new(pid);
    match event {
        Event::Fork(f) => (child, f.into_uffd()),
        other => panic!("expected the Fork event, got {other:?}"),
    }
}

/// A child body: reads one byte from fd `arg` (blocks until the parent
/// writes), then exits with status 7.
fn wait_on_pipe(arg: usize) -> ! {
    let mut b = 0u8;
    // SAFETY: read(2) and _exit(2) are async-signal-safe; `b` is ours.
    unsafe {
        libc::read(arg as RawFd, (&mut b as *mut u8).cast(), 1);
        libc::_exit(7)
    }
}

/// A child body: exits at once.
fn exit_now(_: usize) -> ! {
    // SAFETY: async-signal-safe.
    unsafe { libc::_exit(0) }
}

/// A child body: reads the byte at address `arg` (registered memory: it
/// faults) and exits with it as its status.
fn read_byte(arg: usize) -> ! {
    // SAFETY: `arg` is a live mapping inherited from the parent; only a
    // memory read and _exit run in the child.
    unsafe {
        let v = std::ptr::read_volatile(arg as *const u8);
        libc::_exit(v as i32)
    }
}

/// Serialises the tests that register memory with an `EVENT_FORK`
/// userfaultfd: a fork by any thread of this process sends a Fork event to
/// *every* such userfaultfd and waits until each is read, so two of these
/// tests at once would each receive, and hold up, the other's forks.
static FORK_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A userfaultfd with `EVENT_FORK` and a registered page (a Fork event is
/// only sent for a process with registered memory), and the lock that keeps
/// other such tests out while it lives. Fields drop in order: the
/// userfaultfd, the mapping, then the lock.
struct Forking {
    uffd: Uffd,
    mem: KeepOnPanic,
    _lock: std::sync::MutexGuard<'static, ()>,
}

fn forking_uffd(builder: UffdBuilder) -> Option<Forking> {
    let lock = FORK_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let uffd = try_uffd(builder.require(Features::EVENT_FORK))?;
    let page = uffd.page_size();
    let mem = KeepOnPanic::new(Mapping::anon(page));
    // SAFETY: a fresh mapping no thread of this process touches.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    Some(Forking {
        uffd,
        mem,
        _lock: lock,
    })
}

#[test]
fn this_process_is_alive_whatever_the_configuration() {
    for umo in [true, false] {
        for features in [
            Features::empty(),
            Features::PAGEFAULT_FLAG_WP,
            Features::EVENT_FORK | Features::EVENT_REMOVE | Features::THREAD_ID,
        ] {
            let Some(uffd) = try_uffd(UffdBuilder::new().user_mode_only(umo).want(features)) else {
                return;
            };
            for _ in 0..100 {
                assert!(
                    !uffd.owner_exited().unwrap(),
                    "own process seen as gone (umo {umo}, {features:?})"
                );
            }
        }
    }
}

/// A forked child is alive while it runs, gone once it exited (a zombie),
/// and still gone once reaped; with and without `UFFD_USER_MODE_ONLY` and
/// the WP feature (a child's userfaultfd inherits both).
#[test]
fn forked_child_is_alive_then_gone_then_still_gone_when_reaped() {
    for umo in [true, false] {
        for wp in [false, true] {
            let mut builder = UffdBuilder::new().user_mode_only(umo);
            if wp {
                builder = builder.want(Features::PAGEFAULT_FLAG_WP);
            }
            let Some(fx) = forking_uffd(builder) else {
                return;
            };
            let uffd = &fx.uffd;
            let what = format!(
                "umo {}, features {:?}",
                uffd.user_mode_only(),
                uffd.features()
            );
            let (r, w) = pipe();
            let (mut child, cu) = fork_child(uffd, wait_on_pipe, r.as_raw_fd() as usize);
            assert_eq!(cu.features(), uffd.features());
            for _ in 0..20 {
                assert!(
                    !cu.owner_exited().unwrap(),
                    "live child seen as gone ({what})"
                );
            }
            assert!(!child.exited_within(0), "the child ended early");
            // Let it go.
            // SAFETY: writing one byte from a live buffer to our pipe.
            let n = unsafe { libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
            assert_eq!(n, 1);
            child.wait_exited();
            assert!(
                cu.owner_exited().unwrap(),
                "zombie child seen as alive ({what})"
            );
            let status = child.reap();
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
            assert!(
                cu.owner_exited().unwrap(),
                "reaped child seen as alive ({what})"
            );
            // The parent's own userfaultfd is not affected.
            assert!(!uffd.owner_exited().unwrap());
        }
    }
}

/// A hundred children that exit without ever faulting are each detected;
/// half are asked about as zombies, half after being reaped.
#[test]
fn hundred_children_that_never_fault_are_all_detected() {
    let Some(fx) = forking_uffd(UffdBuilder::new()) else {
        return;
    };
    let uffd = &fx.uffd;
    let mut children = Vec::new();
    for _ in 0..100 {
        children.push(fork_child(uffd, exit_now, 0));
    }
    let mut detected = 0;
    let started = Instant::now();
    for (i, (child, cu)) in children.iter_mut().enumerate() {
        if i % 2 == 0 {
            child.wait_exited();
        } else {
            let status = child.reap();
            assert!(libc::WIFEXITED(status));
        }
        if cu.owner_exited().unwrap() {
            detected += 1;
        }
    }
    assert_eq!(detected, 100, "children that exited but were not detected");
    eprintln!(
        "100 exited children detected in {:?} (waits included)",
        started.elapsed()
    );
    // One probe is one ioctl: time a batch on the parent's (live) fd.
    let t = Instant::now();
    for _ in 0..1000 {
        assert!(!uffd.owner_exited().unwrap());
    }
    eprintln!(
        "owner_exited on a live process: {:?} per call",
        t.elapsed() / 1000
    );
}

/// The probe changes nothing in this process: a thread asleep on a missing
/// page stays asleep (no second fault message, which a woken thread would
/// raise as it faults again), another missing page still faults, both are
/// still missing when resolved (a copy succeeds, it would fail with
/// `EEXIST` on a present page), and a write-protected page still raises a
/// write-protect fault, whose writer the probe does not wake either.
#[test]
fn probe_leaves_registered_memory_and_sleepers_alone() {
    let Some(uffd) = try_uffd(UffdBuilder::new().want(Features::PAGEFAULT_FLAG_WP)) else {
        return;
    };
    let page = uffd.page_size();
    let fd = uffd.as_raw_fd();
    let mut buf = EventBuffer::new(4);
    let a = KeepOnPanic::new(Mapping::anon(2 * page));
    // SAFETY: a fresh mapping touched only by this test's threads.
    unsafe { uffd.register(a.addr, 2 * page, RegisterMode::MISSING) }.unwrap();

    let sleeper = start_read(a.addr);
    let fault = expect_fault(&uffd, &mut buf);
    assert_eq!(fault.page_start(page), a.addr);
    for _ in 0..100 {
        assert!(!uffd.owner_exited().unwrap());
    }
    assert!(
        !readable_within(fd, 200),
        "a message was queued after the probes: the sleeper was woken and faulted again"
    );
    assert!(
        sleeper.try_recv().is_err(),
        "the sleeping thread returned without its page being served"
    );
    let second = start_read(a.addr + page);
    let fault = expect_fault(&uffd, &mut buf);
    assert_eq!(
        fault.page_start(page),
        a.addr + page,
        "the second page no longer faults"
    );
    assert_eq!(
        uffd.copy(a.addr, &vec![7; page], CopyFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(
        uffd.copy(a.addr + page, &vec![8; page], CopyFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(sleeper.recv_timeout(BOUND).unwrap(), 7);
    assert_eq!(second.recv_timeout(BOUND).unwrap(), 8);

    if !uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
        skip("the kernel lacks PAGEFAULT_FLAG_WP: write-protect half not run");
        return;
    }
    let b = KeepOnPanic::new(Mapping::anon(page));
    // SAFETY: as above.
    unsafe { uffd.register(b.addr, page, RegisterMode::MISSING | RegisterMode::WP) }.unwrap();
    assert_eq!(
        uffd.copy(b.addr, &vec![1; page], CopyFlags::WP).unwrap(),
        page
    );
    for _ in 0..100 {
        assert!(!uffd.owner_exited().unwrap());
    }
    let addr = b.addr;
    let writer = thread::spawn(move || write_at(addr, 9));
    let fault = expect_fault(&uffd, &mut buf);
    assert_eq!(
        fault.kind(),
        FaultKind::WriteProtect,
        "the probe removed write protection"
    );
    for _ in 0..100 {
        assert!(!uffd.owner_exited().unwrap());
    }
    assert!(!readable_within(fd, 200), "the probe woke the writer");
    assert!(
        !writer.is_finished(),
        "the write went through a protected page"
    );
    uffd.write_unprotect(b.addr, page, UnprotectFlags::empty())
        .unwrap();
    join_bounded("the writer", writer);
    assert_eq!(read_at(b.addr), 9);
}

/// The same in a forked child, through its own userfaultfd: the child
/// sleeps on a fault of the registered page it inherited; probing its
/// userfaultfd neither wakes it nor fills the page; a copy then serves it
/// and the child exits with the byte it read.
#[test]
fn probe_leaves_a_live_childs_memory_and_sleeping_thread_alone() {
    let Some(fx) = forking_uffd(UffdBuilder::new()) else {
        return;
    };
    let (uffd, mem) = (&fx.uffd, &fx.mem);
    let page = uffd.page_size();
    let (mut child, cu) = fork_child(uffd, read_byte, mem.addr);
    let mut buf = EventBuffer::new(4);
    let fault = expect_fault(&cu, &mut buf);
    assert_eq!(fault.page_start(page), mem.addr);
    for _ in 0..100 {
        assert!(
            !cu.owner_exited().unwrap(),
            "a child asleep on a fault seen as gone"
        );
    }
    assert!(
        !readable_within(cu.as_raw_fd(), 200),
        "the probe woke the child (it faulted again)"
    );
    assert!(!child.exited_within(0), "the child ran on without its page");
    assert_eq!(
        cu.copy(mem.addr, &vec![42; page], CopyFlags::empty())
            .unwrap(),
        page,
        "the child's page was not missing any more"
    );
    let status = child.reap();
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 42);
    assert!(cu.owner_exited().unwrap());
    // Nothing happened to the parent's page either.
    assert!(!uffd.owner_exited().unwrap());
    let reader = start_read(mem.addr);
    let fault = expect_fault(uffd, &mut buf);
    assert_eq!(fault.page_start(page), mem.addr);
    assert_eq!(
        uffd.copy(mem.addr, &vec![5; page], CopyFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(reader.recv_timeout(BOUND).unwrap(), 5);
}

/// Shared memory and hugetlbfs pages registered in this process stay
/// missing across probes: a fault is still delivered and a copy still
/// fills them.
#[test]
fn probe_leaves_shmem_and_hugetlb_pages_missing() {
    let Some(uffd) =
        try_uffd(UffdBuilder::new().want(Features::MISSING_SHMEM | Features::MISSING_HUGETLBFS))
    else {
        return;
    };
    let mut cases = vec![(
        "shmem",
        KeepOnPanic::new(Mapping::shmem(uffd.page_size())),
        uffd.page_size(),
    )];
    let huge = huge_page_size();
    if let Some(m) = Mapping::hugetlb(huge) {
        cases.push(("hugetlb", KeepOnPanic::new(m), huge));
    }
    let mut buf = EventBuffer::new(4);
    for (name, mem, len) in &cases {
        // SAFETY: a fresh mapping touched only by this test's threads.
        unsafe { uffd.register(mem.addr, *len, RegisterMode::MISSING) }.unwrap();
        for _ in 0..100 {
            assert!(!uffd.owner_exited().unwrap());
        }
        let reader = start_read(mem.addr);
        let fault = expect_fault(&uffd, &mut buf);
        assert_eq!(fault.page_start(*len), mem.addr, "{name}");
        for _ in 0..100 {
            assert!(!uffd.owner_exited().unwrap());
        }
        assert!(
            reader.recv_timeout(Duration::from_millis(100)).is_err(),
            "{name}: the reader returned before its page was served"
        );
        assert_eq!(
            uffd.copy(mem.addr, &vec![3; *len], CopyFlags::empty())
                .unwrap(),
            *len,
            "{name}: the page was no longer missing"
        );
        assert_eq!(reader.recv_timeout(BOUND).unwrap(), 3, "{name}");
    }
}
