//! A server with `ForkPolicy::Serve` keeps one userfaultfd and one task per
//! forked child; a child that exits without ever faulting again must be
//! released all the same, or a server of a process that forks many
//! short-lived children grows without bound.
//!
//! This binary holds one test: it counts the userfaultfd fds of the whole
//! process, and any fork in a process whose userfaultfd has `EVENT_FORK`
//! waits for a reader, so nothing may run beside it.

#![cfg(feature = "async")]

mod common;

use std::time::Duration;

use common::*;
use tokio_uffd::{AsyncUffd, Features, Region, Server, SourceHandler, ZeroSource};

/// The userfaultfds open in this process.
fn uffd_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().contains("userfaultfd"))
        .count()
}

#[test]
fn a_hundred_children_that_exit_without_faulting_are_released() {
    let Some((uffd, mem)) = registered_anon(4, Features::EVENT_FORK) else {
        return;
    };
    let page = uffd.page_size();
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(ZeroSource),
        )
        .regions([Region::new(mem.addr..mem.addr + 4 * page)])
        .unwrap()
        .child_probe_interval(Duration::from_millis(10))
        .spawn();
        let addr = mem.addr;
        // The server's own (its watchdog holds a second one).
        let before = uffd_fds();
        tokio::task::spawn_blocking(move || {
            // Page 0 is served before the forks: the children share it.
            assert_eq!(read_at(addr), 0);
            for _ in 0..100 {
                let pid = raw_fork();
                if pid == 0 {
                    // SAFETY: only _exit in the child of a raw fork.
                    unsafe { libc::_exit(0) };
                }
                assert_eq!(wait_child(pid), 0);
            }
            // Released within a few probes each: back to the parent's own.
            wait_until("the servers of the exited children to end", || {
                uffd_fds() == before
            });
        })
        .await
        .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.forks, 100, "{stats:?}");
    });
}
