//! Fork fds never leak. The kernel installs a forked child's userfaultfd in
//! the reader's fd table at `read(2)` time; whatever holds the message must
//! close it if the event is never taken. Counting `/proc/self/fd` needs a
//! process where nothing else opens fds meanwhile, so this file holds a
//! single test.

#![cfg(feature = "async")]

mod common;

use std::os::fd::AsRawFd;
use std::thread;

use common::*;
use futures::StreamExt;
use tokio_uffd::{AsyncUffd, Event, EventBuffer, Features, RegisterMode, UffdBuilder};

/// Forks a child that exits at once, reads the Fork message into a fresh
/// buffer, and returns the buffer (holding the unread message) and the
/// child's pid.
fn fork_into_buffer(uffd: &tokio_uffd::Uffd) -> (EventBuffer, libc::pid_t) {
    let forker = thread::spawn(|| {
        let pid = raw_fork();
        if pid == 0 {
            // SAFETY: async-signal-safe.
            unsafe { libc::_exit(0) };
        }
        pid
    });
    let mut buf = EventBuffer::new(4);
    wait_readable(uffd.as_raw_fd());
    assert_eq!(uffd.read_events(&mut buf).unwrap(), 1);
    let pid = forker.join().unwrap();
    assert!(pid > 0);
    (buf, pid)
}

#[test]
fn fork_fds_are_closed_whenever_their_event_is_not_taken() {
    let Some(uffd) = try_uffd(UffdBuilder::new().require(Features::EVENT_FORK)) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(page);
    // SAFETY: fresh mapping that no thread touches.
    unsafe { uffd.register(mem.addr, page, RegisterMode::MISSING) }.unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // 1. A buffer dropped with the Fork message unread.
    let before = count_fds();
    let (buf, pid) = fork_into_buffer(&uffd);
    assert_eq!(count_fds(), before + 1, "the read installs the child's fd");
    drop(buf);
    assert_eq!(
        count_fds(),
        before,
        "dropping the buffer leaked the fork fd"
    );
    assert_eq!(wait_child(pid) & 0x7f, 0);

    // 2. The event taken, then dropped.
    let before = count_fds();
    let (mut buf, pid) = fork_into_buffer(&uffd);
    let event = buf.next_event().unwrap().unwrap();
    assert!(matches!(event, Event::Fork(_)));
    assert_eq!(count_fds(), before + 1);
    drop(event);
    assert_eq!(count_fds(), before, "dropping the Fork event leaked its fd");
    drop(buf);
    assert_eq!(count_fds(), before);
    wait_child(pid);

    // 3. An EventStream dropped with a Fork message still buffered: queue a
    // fork, then a fault; one read takes both, the kernel hands out faults
    // first, so the stream yields the fault and keeps the Fork buffered.
    let uffd = rt.block_on(async { AsyncUffd::new(uffd).unwrap() });
    let before = count_fds();
    let forker = thread::spawn(|| {
        let pid = raw_fork();
        if pid == 0 {
            // SAFETY: async-signal-safe.
            unsafe { libc::_exit(0) };
        }
        pid
    });
    wait_readable(uffd.as_raw_fd()); // the Fork message is queued
    let addr = mem.addr;
    let toucher = thread::spawn(move || read_at(addr));
    wait_pending_faults(uffd.as_raw_fd(), 1);
    rt.block_on(async {
        let mut stream = uffd.event_stream_with_batch(4).unwrap();
        let first = stream.next().await.unwrap().unwrap();
        let Event::PageFault(fault) = first else {
            panic!("expected the fault first, got {first:?}")
        };
        assert_eq!(
            stream.buffered_len(),
            1,
            "the Fork message should be buffered"
        );
        assert_eq!(count_fds(), before + 1);
        // The fork is still in flight (its thread has not yet been told its
        // event was read), so the address space may still be "changing":
        // retry, as a handler must.
        let deadline = std::time::Instant::now() + BOUND;
        loop {
            match uffd.zeropage(
                fault.page_start(page),
                page,
                tokio_uffd::ZeropageFlags::empty(),
            ) {
                Ok(_) => break,
                Err(e) if e.kind() == tokio_uffd::ErrorKind::Retry => {
                    assert!(std::time::Instant::now() < deadline, "EAGAIN for too long");
                    std::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        }
        drop(stream);
    });
    assert_eq!(
        count_fds(),
        before,
        "dropping the stream leaked the fork fd"
    );
    assert_eq!(toucher.join().unwrap(), 0);
    wait_child(forker.join().unwrap());
    drop(mem);
}

/// Waits (bounded) until the kernel reports `n` unread faults on `fd` in
/// `/proc/self/fdinfo`.
fn wait_pending_faults(fd: i32, n: usize) {
    let deadline = std::time::Instant::now() + BOUND;
    let want = format!("pending:\t{n}\n");
    loop {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        if info.contains(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "fault never queued: {info}"
        );
        std::thread::yield_now();
    }
}
