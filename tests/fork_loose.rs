//! A forked child starts with the parent's page state outside regions too:
//! a page the parent freed (`MADV_DONTNEED`) before the fork reads zero in
//! the child, never the handler's contents again.
//!
//! This binary holds one test: any fork in a process whose userfaultfd has
//! `EVENT_FORK` waits for a reader, so it must not run beside tests whose
//! servers stop while it forks.

#![cfg(feature = "async")]

mod common;

use common::*;
use tokio_uffd::{AsyncUffd, Features, Server};

#[test]
fn a_page_freed_outside_regions_before_a_fork_reads_zero_in_the_child() {
    let Some((uffd, mem)) = registered_anon(2, Features::EVENT_FORK | Features::EVENT_REMOVE)
    else {
        return;
    };
    let page = uffd.page_size();
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(AsyncUffd::new(uffd).unwrap(), Filled).spawn();
        let addr = mem.addr;
        let (parent, child) = tokio::task::spawn_blocking(move || {
            let served = read_at(addr + 3);
            // Freed in the parent: its next fault there gets zeros...
            dontneed(addr, page);
            // ...and so does the child's, forked after the Remove.
            let status = wait_child(fork_reader(addr + 3));
            assert!(libc::WIFEXITED(status), "child status {status:#x}");
            (served, libc::WEXITSTATUS(status) as u8)
        })
        .await
        .unwrap();
        assert_eq!(parent, 0xa5);
        assert_eq!(
            child, 0,
            "the child got the handler's bytes for a page freed before the fork"
        );
        let stats = final_stats(handle).await;
        assert_eq!(stats.forks, 1, "{stats:?}");
    });
}
