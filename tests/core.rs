//! The synchronous layer against the real kernel: creation, negotiation,
//! every ioctl on every memory kind, and event decoding. Faults come from
//! `std::thread`s or child processes; every wait is bounded.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::thread;

use common::*;
use tokio_uffd::{
    ContinueFlags, CopyFlags, CreateMethod, Error, ErrorKind, Event, EventBuffer, FaultKind,
    Features, Ioctls, MoveFlags, Op, PoisonFlags, RegisterMode, Uffd, UffdBuilder, UnprotectFlags,
    ZeropageFlags,
};

/// Held by the tests that register with `EVENT_FORK` and fork: a fork in
/// one would raise a Fork event on the other's userfaultfd too (every
/// userfaultfd with `EVENT_FORK` in the process sees every fork) and wait
/// for it to be read.
static FORK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fork_lock() -> std::sync::MutexGuard<'static, ()> {
    FORK_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------
// Creation and negotiation
// ---------------------------------------------------------------------------

#[test]
fn both_creation_paths_work_and_are_nonblocking_cloexec() {
    for method in [
        CreateMethod::Device,
        CreateMethod::Syscall,
        CreateMethod::Auto,
    ] {
        let Some(uffd) = try_uffd(UffdBuilder::new().method(method)) else {
            return;
        };
        let expected = match method {
            CreateMethod::Syscall => CreateMethod::Syscall,
            _ => CreateMethod::Device,
        };
        assert_eq!(uffd.created_via(), Some(expected), "{method:?}");
        let fd = uffd.as_raw_fd();
        // SAFETY: fcntl queries on our own fd.
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0, "{method:?}: not O_NONBLOCK");
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "{method:?}: not FD_CLOEXEC");
        assert!(uffd
            .ioctls()
            .contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API));
        // A non-blocking uffd after UFFDIO_API does not report POLLERR, and
        // with nothing queued is not readable.
        assert!(!readable_within(fd, 0));
    }
}

/// The `O_NONBLOCK` flag of `fd`'s open file description.
fn is_nonblocking(fd: i32) -> bool {
    // SAFETY: an fcntl query on our own fd.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(fl >= 0, "F_GETFL failed");
    fl & libc::O_NONBLOCK != 0
}

#[test]
fn a_blocking_uffd_waits_in_read_events_until_a_fault_comes() {
    let Some(uffd) = try_uffd(UffdBuilder::new().blocking(true)) else {
        return;
    };
    assert!(
        !is_nonblocking(uffd.as_raw_fd()),
        "blocking(true) gave O_NONBLOCK"
    );
    // poll(2) reports POLLERR on a blocking userfaultfd: an error that says
    // so, not a wait that returns at once.
    let err = uffd
        .wait_readable(None)
        .expect_err("wait_readable on a blocking uffd");
    assert!(err.to_string().contains("read_events"), "{err}");
    let page = page_size();
    let mem = Mapping::anon(page);
    // SAFETY: a fresh private mapping of this test's own.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let reader = start_read(mem.addr);
    // No poll first: the read itself sleeps until the fault is queued.
    let uffd = std::sync::Arc::new(uffd);
    let (n, mut buf) = run_bounded("a blocking read_events", {
        let uffd = uffd.clone();
        move || {
            let mut buf = EventBuffer::new(4);
            let n = uffd.read_events(&mut buf).unwrap();
            (n, buf)
        }
    });
    assert_eq!(n, 1);
    let Some(Ok(Event::PageFault(f))) = buf.next_event() else {
        panic!("expected a page fault");
    };
    assert_eq!(f.page_start(page), mem.addr);
    uffd.zeropage(mem.addr, page, ZeropageFlags::empty())
        .unwrap();
    assert_eq!(reader.recv_timeout(BOUND).unwrap(), 0);

    // The reactor needs it non-blocking: AsyncUffd makes it so.
    #[cfg(feature = "async")]
    {
        let uffd = std::sync::Arc::into_inner(uffd).unwrap();
        let rt = current_thread_rt();
        let fd = uffd.as_raw_fd();
        let _async = rt.block_on(async move { tokio_uffd::AsyncUffd::new(uffd).unwrap() });
        assert!(is_nonblocking(fd), "AsyncUffd left the uffd blocking");
    }
}

#[test]
fn page_size_comes_from_sysconf() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    assert_eq!(uffd.page_size(), page_size());
}

#[test]
fn wanted_features_are_granted_where_the_kernel_has_them() {
    let unknown = Features::from_bits_retain(1 << 40);
    let Some(uffd) = try_uffd(
        UffdBuilder::new()
            .require(Features::EVENT_REMOVE)
            .want(Features::THREAD_ID | unknown),
    ) else {
        return;
    };
    assert!(uffd
        .features()
        .contains(Features::EVENT_REMOVE | Features::THREAD_ID));
    assert!(!uffd.features().contains(unknown));
    assert!(uffd
        .available_features()
        .contains(Features::EVENT_REMOVE | Features::THREAD_ID));
    // This machine's kernel has everything through MOVE.
    if !uffd.available_features().contains(Features::MOVE) {
        skip("kernel older than 6.8: no UFFD_FEATURE_MOVE");
    }
}

#[test]
fn missing_required_feature_names_the_bits() {
    let unknown = Features::from_bits_retain(1 << 40);
    let err = UffdBuilder::new()
        .require(Features::EVENT_REMOVE | unknown)
        .create()
        .unwrap_err();
    match &err {
        Error::MissingFeatures { missing, available } => {
            assert_eq!(*missing, unknown);
            assert!(available.contains(Features::EVENT_REMOVE));
        }
        Error::Create { .. } => return skip(&format!("no userfaultfd: {err}")),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("lacks required"), "{err}");
}

#[test]
fn adopting_an_fd_reads_its_features_without_a_second_api_call() {
    let Some(uffd) =
        try_uffd(UffdBuilder::new().require(Features::EVENT_REMOVE | Features::THREAD_ID))
    else {
        return;
    };
    // SAFETY: dup of our own fd.
    let dup = unsafe { libc::dup(uffd.as_raw_fd()) };
    assert!(dup >= 0);
    // SAFETY: a new fd nothing else owns.
    let adopted = Uffd::from_fd(unsafe { OwnedFd::from_raw_fd(dup) }).unwrap();
    assert_eq!(adopted.features(), uffd.features());
    assert!(adopted.ioctls().contains(Ioctls::REGISTER));
    assert_eq!(adopted.created_via(), None);

    // The adopted fd serves faults like the original.
    let page = page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { adopted.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(4);
    let f = expect_fault(&adopted, &mut buf);
    assert_eq!(f.page_start(page), mem.addr);
    adopted
        .copy(mem.addr, &vec![7u8; page], CopyFlags::empty())
        .unwrap();
    assert_eq!(t.join().unwrap(), 7);
}

#[test]
fn an_fd_that_is_not_a_uffd_is_refused() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let err = Uffd::from_fd(file.into()).unwrap_err();
    assert!(matches!(err, Error::NotUffd { .. }), "{err:?}");
    assert!(err.to_string().contains("/dev/null"), "{err}");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn an_uninitialised_uffd_is_refused_on_adoption() {
    // A raw userfaultfd without UFFDIO_API.
    // SAFETY: plain syscall.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | tokio_uffd::sys::UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return skip("userfaultfd(2) not permitted");
    }
    // SAFETY: new fd nothing else owns.
    let err = Uffd::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).unwrap_err();
    assert!(err.to_string().contains("UFFDIO_API was not done"), "{err}");
}

#[test]
fn into_raw_fd_does_not_close_the_fd() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let raw = uffd.into_raw_fd();
    // SAFETY: fcntl on an fd we own again.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    assert!(flags >= 0, "fd was closed");
    // SAFETY: we own it; close it.
    drop(unsafe { OwnedFd::from_raw_fd(raw) });
}

// ---------------------------------------------------------------------------
// Argument checking
// ---------------------------------------------------------------------------

#[test]
fn unaligned_ranges_are_refused_before_the_syscall_naming_the_page_size() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(2 * page);
    let err = uffd
        .zeropage(mem.addr + 1, page, ZeropageFlags::empty())
        .unwrap_err();
    match err {
        Error::Unaligned {
            op: Op::Zeropage,
            what: "start",
            value,
            page_size,
        } => {
            assert_eq!(value, mem.addr + 1);
            assert_eq!(page_size, page);
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = uffd
        .copy(mem.addr, &[0u8; 100], CopyFlags::empty())
        .unwrap_err();
    assert!(err.to_string().contains("page size"), "{err}");
    assert!(matches!(
        err,
        Error::Unaligned {
            what: "len",
            value: 100,
            ..
        }
    ));
    let err = uffd.wake(mem.addr, 0).unwrap_err();
    assert!(matches!(err, Error::BadRange { .. }));
    let err = uffd.wake(usize::MAX - page + 1, 2 * page).unwrap_err();
    assert!(matches!(err, Error::BadRange { .. }));
    // SAFETY: the call is refused before it reaches the kernel.
    let err = unsafe { uffd.register(mem.addr, page + 8, RegisterMode::MISSING) }.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn operations_on_an_unregistered_range_fail_clearly() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    let err = uffd
        .copy(mem.addr, &vec![1u8; page], CopyFlags::empty())
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::RangeGone | ErrorKind::InvalidInput),
        "{err:?}"
    );
    assert_eq!(err.bytes_done(), 0);
    assert!(err.to_string().contains("UFFDIO_COPY"), "{err}");
}

// ---------------------------------------------------------------------------
// Every operation on anonymous memory
// ---------------------------------------------------------------------------

#[test]
fn copy_resolves_a_missing_fault_with_the_given_bytes() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(2 * page);
    // SAFETY: fresh mapping, touched only by the thread below.
    let ioctls = unsafe { uffd.register(mem.addr, 2 * page, RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));
    let addr = mem.addr + page + 123;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::Missing);
    assert!(!f.is_write());
    assert_eq!(f.page_start(page), mem.addr + page);
    let data = pattern(page, 9);
    assert_eq!(
        uffd.copy(mem.addr + page, &data, CopyFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(t.join().unwrap(), data[123]);
    assert_eq!(&mem.slice()[page..], &data[..]);
}

#[test]
fn copy_with_dontwake_needs_a_wake() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    expect_fault(&uffd, &mut buf);
    uffd.copy(mem.addr, &vec![3u8; page], CopyFlags::DONTWAKE)
        .unwrap();
    // The thread stays asleep until the explicit wake.
    assert!(!t.is_finished());
    uffd.wake(mem.addr, page).unwrap();
    assert_eq!(t.join().unwrap(), 3);
}

#[test]
fn zeropage_resolves_with_zeros() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr + page - 1;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(
        uffd.zeropage(f.page_start(page), page, ZeropageFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(t.join().unwrap(), 0);
}

#[test]
fn eexist_is_already_there_and_needs_a_wake() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    // Fill the page before anyone faults, with DONTWAKE.
    uffd.copy(mem.addr, &vec![5u8; page], CopyFlags::DONTWAKE)
        .unwrap();
    let err = uffd
        .copy(mem.addr, &vec![6u8; page], CopyFlags::empty())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists);
    assert_eq!(err.bytes_done(), 0);
    assert!(err.to_string().contains("UFFDIO_WAKE"), "{err}");
    let err = uffd
        .zeropage(mem.addr, page, ZeropageFlags::empty())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Exists);
    assert_eq!(mem.read(0), 5);
}

#[test]
fn multi_page_copy_stops_at_an_existing_page_and_reports_progress() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(3 * page);
    // SAFETY: fresh mapping that no thread touches.
    unsafe { uffd.register(mem.addr, 3 * page, RegisterMode::MISSING) }.unwrap();
    uffd.copy(mem.addr + page, &vec![1u8; page], CopyFlags::empty())
        .unwrap();
    let err = uffd
        .copy(mem.addr, &vec![2u8; 3 * page], CopyFlags::empty())
        .unwrap_err();
    // One page done, then the existing page stops it: reported as a retry
    // with the progress, never as a negative count.
    assert_eq!(err.kind(), ErrorKind::Retry);
    assert_eq!(err.bytes_done(), page);
    assert_eq!(mem.read(0), 2);
    assert_eq!(mem.read(page), 1);
}

#[test]
fn write_protect_blocks_a_write_until_unprotect() {
    let Some(uffd) = uffd_with(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    let ioctls =
        unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING | RegisterMode::WP) }.unwrap();
    assert!(ioctls.contains(Ioctls::WRITEPROTECT));
    uffd.copy(mem.addr, &vec![1u8; page], CopyFlags::DONTWAKE)
        .unwrap();
    uffd.write_protect(mem.addr, page).unwrap();
    let addr = mem.addr + 10;
    let t = thread::spawn(move || write_at(addr, 0x42));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::WriteProtect);
    assert!(f.is_write());
    // The write has not landed: the writer sleeps in the kernel.
    assert_eq!(mem.read(10), 1);
    assert!(!t.is_finished());
    uffd.write_unprotect(mem.addr, page, UnprotectFlags::empty())
        .unwrap();
    t.join().unwrap();
    assert_eq!(mem.read(10), 0x42);
}

#[test]
fn copy_mode_wp_leaves_the_page_protected() {
    let Some(uffd) = uffd_with(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING | RegisterMode::WP) }.unwrap();
    let addr = mem.addr;
    let t = thread::spawn(move || write_at(addr, 0x77));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::Missing);
    assert!(f.is_write());
    uffd.copy(mem.addr, &vec![9u8; page], CopyFlags::WP)
        .unwrap();
    // The retried write hits the protection.
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::WriteProtect);
    assert_eq!(mem.read(0), 9);
    uffd.write_unprotect(mem.addr, page, UnprotectFlags::empty())
        .unwrap();
    t.join().unwrap();
    assert_eq!(mem.read(0), 0x77);
    assert_eq!(mem.read(1), 9);
}

#[test]
fn unregister_releases_the_range() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    uffd.unregister(mem.addr, page).unwrap();
    // No longer registered: touching it just maps a zero page, no message.
    assert_eq!(mem.read(0), 0);
    assert!(!readable_within(uffd.as_raw_fd(), 0));
}

#[test]
fn move_takes_pages_from_the_source_to_the_destination() {
    let Some(uffd) = try_uffd(UffdBuilder::new().want(Features::MOVE)) else {
        return;
    };
    if !uffd.features().contains(Features::MOVE) {
        return skip("kernel lacks UFFD_FEATURE_MOVE (6.8+)");
    }
    let page = uffd.page_size();
    let src = Mapping::anon(2 * page);
    let dst = Mapping::anon(2 * page);
    let data = pattern(2 * page, 77);
    // SAFETY: `src` is ours and nothing references it.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), src.ptr(0), 2 * page) };
    // SAFETY: fresh mapping, touched only by the thread below.
    let ioctls = unsafe { uffd.register(dst.addr, 2 * page, RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::MOVE));
    let addr = dst.addr + page;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    expect_fault(&uffd, &mut buf);
    // SAFETY: nothing relies on the contents of `src` after this.
    let moved =
        unsafe { uffd.move_pages(dst.addr, src.addr, 2 * page, MoveFlags::empty()) }.unwrap();
    assert_eq!(moved, 2 * page);
    assert_eq!(t.join().unwrap(), data[page]);
    assert_eq!(dst.slice(), &data[..]);
    // The pages left the source: it reads as fresh zero memory.
    assert!(src.slice().iter().all(|&b| b == 0));
}

#[test]
fn move_checks_its_source_range() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    // SAFETY: refused before the kernel is asked.
    let err = unsafe { uffd.move_pages(0x10000, 0x20001, page, MoveFlags::empty()) }.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unaligned {
                op: Op::Move,
                what: "src",
                ..
            }
        ),
        "{err:?}"
    );
    // SAFETY: refused before the kernel is asked.
    let err =
        unsafe { uffd.move_pages(0x10000, usize::MAX - page + 1, 2 * page, MoveFlags::empty()) }
            .unwrap_err();
    assert!(
        matches!(err, Error::BadRange { op: Op::Move, .. }),
        "{err:?}"
    );
}

#[test]
fn a_fork_of_a_blocking_adopted_uffd_is_made_nonblocking_cloexec() {
    let _fork = fork_lock();
    // A userfaultfd made elsewhere without O_NONBLOCK/O_CLOEXEC: the kernel
    // gives its forked children those creation flags.
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, 0) };
    if fd < 0 {
        return skip("userfaultfd(2) not permitted");
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = tokio_uffd::sys::uffdio_api {
        api: tokio_uffd::sys::UFFD_API,
        features: tokio_uffd::sys::UFFD_FEATURE_EVENT_FORK,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API with its argument type, as its creator would.
    unsafe { tokio_uffd::sys::ioctl(fd.as_raw_fd(), tokio_uffd::sys::UFFDIO_API, &mut api) }
        .unwrap();
    let uffd = Uffd::from_fd(fd).unwrap();
    assert!(uffd.features().contains(Features::EVENT_FORK));
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping; only the child touches it.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr;
    let forker = thread::spawn(move || fork_reader(addr));
    let mut buf = EventBuffer::new(4);
    let child = match next_event(&uffd, &mut buf) {
        Event::Fork(f) => f.into_uffd(),
        other => panic!("expected Fork, got {other:?}"),
    };
    // SAFETY: fcntl queries on the child's fd, which we own.
    let (fl, fdfl) = unsafe {
        (
            libc::fcntl(child.as_raw_fd(), libc::F_GETFL),
            libc::fcntl(child.as_raw_fd(), libc::F_GETFD),
        )
    };
    assert_ne!(fl & libc::O_NONBLOCK, 0, "fork fd is blocking");
    assert_ne!(
        fdfl & libc::FD_CLOEXEC,
        0,
        "fork fd is inherited across exec"
    );
    let pid = forker.join().unwrap();
    let mut cbuf = EventBuffer::new(4);
    let f = expect_fault(&child, &mut cbuf);
    child
        .copy(f.page_start(page), &vec![0x21; page], CopyFlags::empty())
        .unwrap();
    assert_eq!(libc::WEXITSTATUS(wait_child(pid)), 0x21);
}

/// Child entry point for `auto_creation_falls_back_to_the_syscall_without_the_device`:
/// runs where /dev is empty and checks that Auto used the system call.
#[test]
#[ignore = "child entry point, run by auto_creation_falls_back_to_the_syscall_without_the_device"]
fn child_no_device_entry() {
    if std::env::var("TOKIO_UFFD_CHILD").as_deref() != Ok("nodev") {
        return;
    }
    assert!(!std::path::Path::new("/dev/userfaultfd").exists());
    let uffd = UffdBuilder::new().create().unwrap();
    assert_eq!(uffd.created_via(), Some(CreateMethod::Syscall));
    let err = UffdBuilder::new()
        .method(CreateMethod::Device)
        .create()
        .unwrap_err();
    assert!(matches!(err, Error::Create { .. }), "{err:?}");
    assert!(err.to_string().contains("/dev/userfaultfd"), "{err}");
}

#[test]
fn auto_creation_falls_back_to_the_syscall_without_the_device() {
    if uffd_with(Features::empty()).is_none() {
        return;
    }
    // A private mount namespace with an empty /dev (needs root and unshare).
    let exe = std::env::current_exe().unwrap();
    let status = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs none /dev && exec "$0" child_no_device_entry --exact --ignored --test-threads=1"#)
        .arg(&exe)
        .env("TOKIO_UFFD_CHILD", "nodev")
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("the child without /dev/userfaultfd failed: {s:?}"),
        Err(e) => skip(&format!("cannot run unshare(1): {e}")),
    }
}

// ---------------------------------------------------------------------------
// Poison: a child process dies of SIGBUS
// ---------------------------------------------------------------------------

/// Child entry point for `poison_gives_the_faulting_thread_sigbus`: a thread
/// touches a registered page, the main thread poisons it, and the whole
/// process must die of SIGBUS. Does nothing unless run as that child.
#[test]
#[ignore = "child entry point, run by poison_gives_the_faulting_thread_sigbus"]
fn child_poison_entry() {
    if std::env::var("TOKIO_UFFD_CHILD").as_deref() != Ok("poison") {
        return;
    }
    let uffd = UffdBuilder::new().create().unwrap();
    let page = uffd.page_size();
    let mem = Mapping::anon(2 * page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, 2 * page, RegisterMode::MISSING) }.unwrap();
    // A pre-poisoned page and a page poisoned while its fault waits.
    assert_eq!(
        uffd.poison(mem.addr + page, page, PoisonFlags::empty())
            .unwrap(),
        page
    );
    let addr = mem.addr;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    expect_fault(&uffd, &mut buf);
    uffd.poison(mem.addr, page, PoisonFlags::empty()).unwrap();
    let _ = t.join();
    // Not reached: SIGBUS killed the process.
    std::process::exit(0);
}

#[test]
fn poison_gives_the_faulting_thread_sigbus() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    if !uffd.available_features().contains(Features::POISON) {
        return skip("kernel lacks UFFD_FEATURE_POISON (6.6+)");
    }
    let status = run_child_test("child_poison_entry", &[("TOKIO_UFFD_CHILD", "poison")]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGBUS),
        "child status {status:?}"
    );
}

// ---------------------------------------------------------------------------
// Retry while the address space is changing
// ---------------------------------------------------------------------------

#[test]
fn unread_remove_makes_copy_and_zeropage_retry_until_it_is_read() {
    let Some(uffd) = uffd_with(Features::EVENT_REMOVE) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(4 * page);
    // SAFETY: fresh mapping.
    unsafe { uffd.register(mem.addr, 4 * page, RegisterMode::MISSING) }.unwrap();
    uffd.copy(mem.addr, &vec![1u8; page], CopyFlags::empty())
        .unwrap();
    let (addr, len) = (mem.addr, page);
    // MADV_DONTNEED on registered memory raises Remove and waits until it is
    // read; meanwhile the mm is "changing".
    let t = thread::spawn(move || {
        // SAFETY: dropping pages of our own mapping.
        unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) }
    });
    wait_readable(uffd.as_raw_fd());
    let err = uffd
        .copy(mem.addr + page, &vec![2u8; page], CopyFlags::empty())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Retry, "{err:?}");
    assert_eq!(err.bytes_done(), 0);
    let err = uffd
        .zeropage(mem.addr + 2 * page, page, ZeropageFlags::empty())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Retry, "{err:?}");
    let mut buf = EventBuffer::new(8);
    match next_event(&uffd, &mut buf) {
        Event::Remove(r) => {
            assert_eq!((r.start, r.end), (mem.addr, mem.addr + page));
        }
        other => panic!("expected Remove, got {other:?}"),
    }
    assert_eq!(t.join().unwrap(), 0);
    // Once read, the same calls succeed.
    uffd.copy(mem.addr + page, &vec![2u8; page], CopyFlags::empty())
        .unwrap();
    uffd.zeropage(mem.addr + 2 * page, page, ZeropageFlags::empty())
        .unwrap();
    assert_eq!(mem.read(page), 2);
}

// ---------------------------------------------------------------------------
// Non-cooperative events
// ---------------------------------------------------------------------------

#[test]
fn remap_is_decoded_with_old_and_new_addresses() {
    let Some(uffd) = uffd_with(Features::EVENT_REMAP) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(2 * page);
    let target = Mapping::anon(2 * page);
    // SAFETY: fresh mapping.
    unsafe { uffd.register(mem.addr, 2 * page, RegisterMode::MISSING) }.unwrap();
    let (from, to) = (mem.addr, target.addr);
    let t = thread::spawn(move || {
        // SAFETY: moving our own mapping onto another of ours.
        unsafe {
            libc::mremap(
                from as *mut libc::c_void,
                2 * page,
                2 * page,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            ) as usize
        }
    });
    let mut buf = EventBuffer::new(8);
    match next_event(&uffd, &mut buf) {
        Event::Remap(r) => assert_eq!((r.from, r.to, r.len), (from, to, 2 * page)),
        other => panic!("expected Remap, got {other:?}"),
    }
    assert_eq!(t.join().unwrap(), to);
    // The range is registered at its new address: faults come from there.
    let addr = to + page;
    let t = thread::spawn(move || read_at(addr));
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.page_start(page), to + page);
    uffd.copy(to + page, &vec![4u8; page], CopyFlags::empty())
        .unwrap();
    assert_eq!(t.join().unwrap(), 4);
    std::mem::forget(mem); // its pages now belong to `target`
}

#[test]
fn unmap_is_decoded_with_its_range() {
    let Some(uffd) = uffd_with(Features::EVENT_UNMAP) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(3 * page);
    // SAFETY: fresh mapping.
    unsafe { uffd.register(mem.addr, 3 * page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr + page;
    let t = thread::spawn(move || {
        // SAFETY: unmapping the middle page of our own mapping.
        unsafe { libc::munmap(addr as *mut libc::c_void, page) }
    });
    let mut buf = EventBuffer::new(8);
    match next_event(&uffd, &mut buf) {
        Event::Unmap(u) => assert_eq!((u.start, u.end), (addr, addr + page)),
        other => panic!("expected Unmap, got {other:?}"),
    }
    assert_eq!(t.join().unwrap(), 0);
    // Resolving the unmapped page now says the range is gone.
    let err = uffd
        .copy(addr, &vec![1u8; page], CopyFlags::empty())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RangeGone, "{err:?}");
    // Unmapping the rest would raise another Unmap and wait for it to be
    // read: close the uffd first.
    drop(uffd);
}

#[test]
fn thread_id_is_reported_when_granted() {
    let Some(uffd) = uffd_with(Features::THREAD_ID) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr;
    let (tx, rx) = std::sync::mpsc::channel();
    let t = thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        tx.send(unsafe { libc::gettid() } as u32).unwrap();
        read_at(addr)
    });
    let tid = rx.recv().unwrap();
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.thread_id, Some(tid));
    uffd.zeropage(mem.addr, page, ZeropageFlags::empty())
        .unwrap();
    t.join().unwrap();
}

#[test]
fn fork_event_owns_a_uffd_that_serves_the_child() {
    let _fork = fork_lock();
    let Some(uffd) = try_uffd(UffdBuilder::new().require(Features::EVENT_FORK)) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping; the parent never touches it.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr;
    // fork() waits until the Fork event is read, so fork from a thread.
    let forker = thread::spawn(move || fork_reader(addr));
    let mut buf = EventBuffer::new(8);
    let child_uffd = match next_event(&uffd, &mut buf) {
        Event::Fork(fork) => fork.into_uffd(),
        other => panic!("expected Fork, got {other:?}"),
    };
    assert_eq!(child_uffd.features(), uffd.features());
    let pid = forker.join().unwrap();
    let mut child_buf = EventBuffer::new(8);
    let f = expect_fault(&child_uffd, &mut child_buf);
    assert_eq!(f.page_start(page), mem.addr);
    child_uffd
        .copy(mem.addr, &vec![0x5a; page], CopyFlags::empty())
        .unwrap();
    let status = wait_child(pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0x5a);
    // The parent's own page is untouched by the child's resolution.
    assert!(!readable_within(uffd.as_raw_fd(), 0));
}

// ---------------------------------------------------------------------------
// shmem and hugetlb
// ---------------------------------------------------------------------------

#[test]
fn minor_fault_on_shmem_is_resolved_with_continue() {
    let Some(uffd) = uffd_with(Features::MINOR_SHMEM) else {
        return;
    };
    let page = uffd.page_size();
    let len = 2 * page;
    let Some(fd) = memfd(len, false) else { return };
    let area = Mapping::new(len, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    let fill = Mapping::new(len, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    // SAFETY: fresh mapping, touched only by the thread below.
    let ioctls = unsafe { uffd.register(area.addr, len, RegisterMode::MINOR) }.unwrap();
    assert!(ioctls.contains(Ioctls::CONTINUE));
    // Fill the page cache through the second mapping.
    let data = pattern(len, 3);
    // SAFETY: `fill` is ours, writable for `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), fill.ptr(0), len) };
    let addr = area.addr + page + 5;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::Minor);
    assert_eq!(
        uffd.continue_range(f.page_start(page), page, ContinueFlags::empty())
            .unwrap(),
        page
    );
    assert_eq!(t.join().unwrap(), data[page + 5]);
}

#[test]
fn missing_fault_on_shmem_is_resolved_with_copy() {
    let Some(uffd) = uffd_with(Features::MISSING_SHMEM) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::shmem(page);
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let addr = mem.addr;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    expect_fault(&uffd, &mut buf);
    uffd.copy(mem.addr, &vec![8u8; page], CopyFlags::empty())
        .unwrap();
    assert_eq!(t.join().unwrap(), 8);
}

#[test]
fn hugetlb_missing_fault_is_resolved_with_a_whole_huge_page() {
    let Some(uffd) = uffd_with(Features::MISSING_HUGETLBFS) else {
        return;
    };
    let huge = huge_page_size();
    let Some(mem) = Mapping::hugetlb(huge) else {
        return;
    };
    // SAFETY: fresh mapping, touched only by the thread below.
    let ioctls = unsafe { uffd.register(mem.addr, huge, RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::COPY));
    // hugetlbfs has no zeropage.
    assert!(!ioctls.contains(Ioctls::ZEROPAGE));
    let addr = mem.addr + huge - 1;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.page_start(huge), mem.addr);

    // zeropage is refused with an error that says what to do.
    let err = uffd
        .zeropage(mem.addr, huge, ZeropageFlags::empty())
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:?}");
    assert!(err.to_string().contains("hugetlbfs"), "{err}");

    // A base page is not enough: the kernel wants the whole huge page.
    let small = uffd.copy(mem.addr, &vec![1u8; page_size()], CopyFlags::empty());
    assert!(small.is_err());

    let data = pattern(huge, 21);
    assert_eq!(
        uffd.copy(mem.addr, &data, CopyFlags::empty()).unwrap(),
        huge
    );
    assert_eq!(t.join().unwrap(), data[huge - 1]);
    assert_eq!(mem.slice(), &data[..]);
}

#[test]
fn hugetlb_minor_fault_is_resolved_with_continue() {
    let Some(uffd) = uffd_with(Features::MINOR_HUGETLBFS) else {
        return;
    };
    let huge = huge_page_size();
    let Some(fd) = memfd(huge, true) else { return };
    let area = match Mapping::new(huge, libc::MAP_SHARED, fd.as_raw_fd()) {
        Ok(m) => m,
        Err(e) => return skip(&format!("no hugetlb pages: {e}")),
    };
    let fill = Mapping::new(huge, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(area.addr, huge, RegisterMode::MINOR) }.unwrap();
    let data = pattern(huge, 5);
    // The shared mapping reserved its huge page at mmap time, so filling it
    // through the second mapping cannot run out.
    // SAFETY: `fill` is ours, writable for `huge` bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), fill.ptr(0), huge) };
    let addr = area.addr + 4097;
    let t = thread::spawn(move || read_at(addr));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::Minor);
    uffd.continue_range(area.addr, huge, ContinueFlags::empty())
        .unwrap();
    assert_eq!(t.join().unwrap(), data[4097]);
    assert_eq!(area.slice(), &data[..]);
}

#[test]
fn move_of_a_source_hole_needs_allow_src_holes() {
    let Some(uffd) = try_uffd(UffdBuilder::new().want(Features::MOVE)) else {
        return;
    };
    if !uffd.features().contains(Features::MOVE) {
        return skip("kernel lacks UFFD_FEATURE_MOVE (6.8+)");
    }
    let page = uffd.page_size();
    let src = Mapping::anon(page); // never touched: a hole
    let dst = Mapping::anon(page);
    // SAFETY: fresh mapping that no thread touches.
    unsafe { uffd.register(dst.addr, page, RegisterMode::MISSING) }.unwrap();
    // SAFETY: `src` holds nothing anyone relies on.
    let err = unsafe { uffd.move_pages(dst.addr, src.addr, page, MoveFlags::empty()) }.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RangeGone, "{err:?}");
    // SAFETY: as above.
    let moved =
        unsafe { uffd.move_pages(dst.addr, src.addr, page, MoveFlags::ALLOW_SRC_HOLES) }.unwrap();
    assert_eq!(moved, page);
}

#[test]
fn continue_mode_wp_maps_the_page_write_protected() {
    let Some(uffd) = uffd_with(
        Features::MINOR_SHMEM | Features::PAGEFAULT_FLAG_WP | Features::WP_HUGETLBFS_SHMEM,
    ) else {
        return;
    };
    let page = uffd.page_size();
    let Some(fd) = memfd(page, false) else { return };
    let area = Mapping::new(page, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    let fill = Mapping::new(page, libc::MAP_SHARED, fd.as_raw_fd()).unwrap();
    // SAFETY: fresh mapping, touched only by the thread below.
    unsafe { uffd.register(area.addr, page, RegisterMode::MINOR | RegisterMode::WP) }.unwrap();
    write_at(fill.addr, 0x11);
    let addr = area.addr;
    let t = thread::spawn(move || write_at(addr, 0x22));
    let mut buf = EventBuffer::new(8);
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::Minor);
    uffd.continue_range(area.addr, page, ContinueFlags::WP)
        .unwrap();
    // The retried write now hits the write protection.
    let f = expect_fault(&uffd, &mut buf);
    assert_eq!(f.kind(), FaultKind::WriteProtect);
    assert_eq!(area.read(0), 0x11);
    uffd.write_unprotect(area.addr, page, UnprotectFlags::empty())
        .unwrap();
    t.join().unwrap();
    assert_eq!(fill.read(0), 0x22);
}
