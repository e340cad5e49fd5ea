//! The stall watchdog: a fault that waits too long is reported even when
//! the server cannot run, and a slow handler's fault is reported with its
//! address. Faults come from `std::thread`s (and, on purpose, from the
//! runtime's own thread); every wait is bounded.

#![cfg(feature = "async")]

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use tokio_uffd::{
    thread_id, AsyncUffd, Features, Region, Server, SourceHandler, ZeroSource, ZeropageFlags,
};

/// The runtime's only thread touches registered memory: it sleeps in the
/// kernel and the server (on that runtime) can never read the fault. The
/// watchdog, a thread of its own, reports it naming that thread; the test
/// then resolves the fault itself so that the runtime wakes.
#[test]
fn a_current_thread_runtime_that_faults_on_its_own_memory_is_reported() {
    let Some((uffd, mem)) = registered_anon(1, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = current_thread_rt();
    let _guard = rt.enter();
    let uffd = AsyncUffd::new(uffd).unwrap();
    let server = Server::new(uffd.clone(), SourceHandler::new(ZeroSource))
        .regions([Region::new(mem.addr..mem.addr + page)])
        .unwrap()
        .stall_watchdog(Some(Duration::from_millis(200)));
    let stats = server.stats();
    let handle = server.spawn();
    let runtime_tid = thread_id();
    let addr = mem.addr;
    let rescuer = {
        let stats = stats.clone();
        let uffd = uffd.clone();
        thread::spawn(move || {
            let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_until("the watchdog reporting the stall", || {
                    stats.snapshot().stalls >= 1
                });
                stats.last_stall().expect("a stall is recorded")
            }));
            // Wake the runtime's thread whatever was seen.
            uffd.zeropage(addr, page, ZeropageFlags::empty()).unwrap();
            seen
        })
    };
    let byte = rt.block_on(async {
        // SAFETY: a byte of our own mapping; this thread sleeps until the
        // rescuer resolves it.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    });
    assert_eq!(byte, 0);
    let stall =
        join_bounded("the rescuer", rescuer).unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert_eq!(stall.fault_addr, None, "{stall}");
    assert_eq!(stall.thread, Some(runtime_tid), "{stall}");
    assert!(stall.unread >= 1, "{stall}");
    assert!(stall.waited >= Duration::from_millis(200), "{stall}");
    let text = stall.to_string();
    assert!(text.contains(&runtime_tid.to_string()), "{text}");
    rt.block_on(async {
        tokio::time::timeout(BOUND, handle.shutdown())
            .await
            .expect("the server did not stop")
            .unwrap();
    });
}

/// A handler that does not answer: the fault was read, so the report names
/// its address and its thread; the server keeps serving other pages; once
/// answered, the fault is served.
#[test]
fn a_fault_whose_handler_does_not_answer_is_reported_with_its_address() {
    let Some((uffd, mem)) = registered_anon(2, Features::THREAD_ID) else {
        return;
    };
    let page = uffd.page_size();
    // Page 1 is not answered until the test says so.
    let handler = HeldPages::new(2 * page, [mem.addr + page]);
    let rt = multi_thread_rt();
    rt.block_on(async {
        let server = Server::new(AsyncUffd::new(uffd).unwrap(), handler.clone())
            .regions([Region::new(mem.addr..mem.addr + 2 * page)])
            .unwrap()
            .stall_watchdog(Some(Duration::from_millis(200)));
        let stats = server.stats();
        let handle = server.spawn();
        let addr = mem.addr;
        let h = handler.clone();
        let (stall, tid, other) = tokio::task::spawn_blocking(move || {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let stuck = thread::spawn(move || {
                tid_tx.send(gettid()).unwrap();
                read_at(addr + page + 3)
            });
            let tid = tid_rx.recv_timeout(BOUND).unwrap();
            wait_until("the watchdog reporting the stall", || {
                stats.snapshot().stalls >= 1
            });
            let stall = stats.last_stall().unwrap();
            // Other pages are still served meanwhile.
            let other = read_within(addr + 1, BOUND);
            h.open.add_permits(1);
            assert_eq!(
                join_bounded("the stuck reader", stuck),
                image_byte(page + 3)
            );
            (stall, tid, other)
        })
        .await
        .unwrap();
        assert_eq!(other, Some(image_byte(1)));
        // The kernel reports the page, not the byte (no EXACT_ADDRESS).
        assert_eq!(stall.fault_addr, Some(mem.addr + page), "{stall}");
        assert_eq!(stall.thread, Some(tid as u32), "{stall}");
        assert!(
            stall
                .to_string()
                .contains(&format!("{:#x}", mem.addr + page)),
            "{stall}"
        );
        let end = final_stats(handle).await;
        assert_eq!(end.stalls, 1, "{end:?}");
    });
}

/// A healthy server reports nothing, and turning the watchdog off works.
#[test]
fn a_healthy_server_reports_no_stall() {
    let Some((uffd, mem)) = registered_anon(64, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = multi_thread_rt();
    rt.block_on(async {
        let handle = Server::new(
            AsyncUffd::new(uffd).unwrap(),
            SourceHandler::new(ZeroSource),
        )
        .regions([Region::new(mem.addr..mem.addr + 64 * page)])
        .unwrap()
        .stall_watchdog(Some(Duration::from_millis(100)))
        .spawn();
        let addr = mem.addr;
        tokio::task::spawn_blocking(move || {
            for p in 0..64 {
                assert_eq!(read_at(addr + p * page), 0);
                // Across several watchdog checks.
                thread::sleep(Duration::from_millis(5));
            }
        })
        .await
        .unwrap();
        let stats = final_stats(handle).await;
        assert_eq!(stats.stalls, 0, "{stats:?}");
    });
}
