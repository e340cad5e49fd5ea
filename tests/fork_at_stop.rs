//! With `EVENT_FORK` a forking thread sleeps until its Fork event is read,
//! and nothing else wakes it: not even closing the userfaultfd, since the
//! half-made child holds a copy of it. A server asked to stop while a fork
//! is waiting must read that Fork before it ends.
//!
//! This binary holds one test: any fork in a process whose userfaultfd has
//! `EVENT_FORK` waits for a reader, so it must not run beside other tests.

#![cfg(feature = "async")]

mod common;

use std::sync::Arc;
use std::thread;

use common::*;
use tokio_uffd::{AsyncUffd, CopyFlags, EventBuffer, Features, Region, Server, ServerExit};

/// Page A's fetch holds the only permit and page B's fault makes the server
/// wait for it, so the server reads nothing; then the server is asked to
/// stop and a thread forks (its Fork queued, unread). Once A and B are
/// served the stopping server must read the Fork before it ends.
#[test]
fn a_stopping_server_reads_a_pending_fork_so_the_forking_thread_returns() {
    let Some((uffd, mem)) = registered_anon(2, Features::EVENT_FORK) else {
        return;
    };
    let page = uffd.page_size();
    let (a, b) = (mem.addr, mem.addr + page);
    // Held pages are only woken: the test fills them itself, so that no
    // resolution meets the fork's EAGAIN and drains the queue by the way.
    let mut handler = HeldPages::new(2 * page, [a, b]);
    Arc::get_mut(&mut handler).unwrap().wake_held = true;
    let rt = multi_thread_rt();
    rt.block_on(async {
        let async_uffd = AsyncUffd::new(uffd).unwrap();
        let mut handle = Server::new(async_uffd.clone(), handler.clone())
            .regions([Region::new(mem.addr..mem.addr + 2 * page)])
            .unwrap()
            .concurrency(1)
            .spawn();
        let h = handler.clone();
        let (a_read, b_read) = tokio::task::spawn_blocking(move || {
            let a_read = start_read(a);
            wait_until("A's fetch started", || h.calls() >= 1);
            let b_read = start_read(b);
            wait_until("B's fetch started", || h.calls() >= 2);
            (a_read, b_read)
        })
        .await
        .unwrap();
        // Filled, not woken: the held handler calls only wake them.
        async_uffd
            .copy(a, &vec![7u8; 2 * page], CopyFlags::DONTWAKE)
            .unwrap();
        // The server waits for the permit A holds: it sees the stop before
        // it reads again.
        handle.stop();
        let h = handler.clone();
        let forking = tokio::task::spawn_blocking(move || {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let forking = thread::spawn(move || {
                tid_tx.send(gettid()).unwrap();
                let pid = raw_fork();
                if pid == 0 {
                    // SAFETY: only _exit in the child of a raw fork.
                    unsafe { libc::_exit(0) };
                }
                pid
            });
            let tid = tid_rx.recv_timeout(BOUND).unwrap();
            wait_until("the fork waiting for its event to be read", || {
                wchan(tid).starts_with("userfaultfd")
            });
            h.open.add_permits(2);
            assert_eq!(a_read.recv_timeout(BOUND), Ok(7), "page A");
            assert_eq!(b_read.recv_timeout(BOUND), Ok(7), "page B");
            forking
        })
        .await
        .unwrap();
        let exit = tokio::time::timeout(BOUND, handle.join())
            .await
            .expect("the stopped server did not end");
        assert_eq!(exit.unwrap(), ServerExit::Stopped);
        let returned = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + BOUND;
            while !forking.is_finished() && std::time::Instant::now() < deadline {
                thread::sleep(std::time::Duration::from_millis(1));
            }
            if forking.is_finished() {
                return Some(forking.join().unwrap());
            }
            // Free the stranded thread before failing: read the Fork here.
            let mut buf = EventBuffer::new(8);
            let _ = async_uffd.read_events(&mut buf);
            while buf.next_event().is_some() {}
            let pid = forking.join().unwrap();
            wait_child(pid);
            None
        })
        .await
        .unwrap();
        let pid = returned.expect("the forking thread was left asleep after the server stopped");
        assert_eq!(wait_child(pid), 0);
        assert_eq!(handle.stats().forks, 1);
    });
}
