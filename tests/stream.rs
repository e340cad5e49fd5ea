//! The async layer against the real kernel: wake-ups, readiness, cancel
//! safety, many faulting threads, both runtime flavours, forked children.
//! Faults come from `std::thread`s or child processes, never from a worker
//! of the runtime that serves them; waits are on events, bounded.

#![cfg(feature = "async")]

mod common;

use std::collections::HashSet;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use tokio_uffd::{
    AsyncUffd, CopyFlags, ErrorKind, Event, EventStream, Features, RegisterMode, Uffd, UffdBuilder,
    ZeropageFlags,
};

/// A waker that records whether it was woken.
#[derive(Default)]
struct RecordingWaker {
    woken: Mutex<usize>,
    cv: Condvar,
}

impl Wake for RecordingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        *self.woken.lock().unwrap() += 1;
        self.cv.notify_all();
    }
}

impl RecordingWaker {
    fn count(&self) -> usize {
        *self.woken.lock().unwrap()
    }
    /// Waits up to `d` for at least `n` wake-ups; returns whether they came.
    fn wait_for(&self, n: usize, d: Duration) -> bool {
        let guard = self.woken.lock().unwrap();
        let (guard, _) = self.cv.wait_timeout_while(guard, d, |w| *w < n).unwrap();
        *guard >= n
    }
}

fn registered(pages: usize, features: Features) -> Option<(Uffd, Mapping)> {
    let uffd = try_uffd(UffdBuilder::new().require(features))?;
    let len = pages * uffd.page_size();
    let mem = Mapping::anon(len);
    // SAFETY: a fresh mapping touched only by the tests' own threads, whose
    // every page the tests resolve.
    unsafe { uffd.register(mem.addr, len, RegisterMode::MISSING) }.unwrap();
    Some((uffd, mem))
}

fn page_bytes(page: usize, v: u8) -> Vec<u8> {
    vec![v; page]
}

#[test]
fn stream_wakes_once_a_fault_arrives_and_not_before() {
    let Some((uffd, mem)) = registered(1, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    // One worker drives the reactor while this thread polls by hand.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let uffd = AsyncUffd::new(uffd).unwrap();
    let mut stream = uffd.event_stream().unwrap();
    let rec = Arc::new(RecordingWaker::default());
    let waker = Waker::from(rec.clone());
    let mut cx = Context::from_waker(&waker);

    assert!(stream.poll_event(&mut cx).is_pending());
    // Nothing queued: no wake-up, however long we wait (bounded here).
    assert!(
        !rec.wait_for(1, Duration::from_millis(100)),
        "woken without a message"
    );

    let addr = mem.addr;
    let toucher = thread::spawn(move || read_at(addr));
    assert!(rec.wait_for(1, BOUND), "not woken by a fault");
    let Poll::Ready(Ok(Event::PageFault(fault))) = stream.poll_event(&mut cx) else {
        panic!("woken, but no fault");
    };
    assert_eq!(fault.page_start(page), mem.addr);
    uffd.copy(mem.addr, &page_bytes(page, 1), CopyFlags::empty())
        .unwrap();
    assert_eq!(toucher.join().unwrap(), 1);
    // Drained again: pending, and no further wake-up.
    let before = rec.count();
    assert!(stream.poll_event(&mut cx).is_pending());
    assert!(
        !rec.wait_for(before + 1, Duration::from_millis(100)),
        "spurious wake-up"
    );
}

#[test]
fn a_fault_queued_since_the_last_poll_is_read_without_the_reactor() {
    let Some((uffd, mem)) = registered(1, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    // A current-thread runtime that nobody drives: its reactor never runs,
    // so only the stream's own early read can see the message.
    let rt = current_thread_rt();
    let _guard = rt.enter();
    let uffd = AsyncUffd::new(uffd).unwrap();
    let fd = uffd.as_raw_fd();
    let mut stream = uffd.event_stream().unwrap();
    let rec = Arc::new(RecordingWaker::default());
    let waker = Waker::from(rec.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(stream.poll_event(&mut cx).is_pending());

    let addr = mem.addr;
    let toucher = thread::spawn(move || read_at(addr));
    assert!(
        readable_within(fd, BOUND.as_millis() as i32),
        "no fault queued"
    );
    // The early read of the first poll found nothing, so the stream lets
    // one poll pass before it tries again; a few polls are enough.
    let fault = (0..4)
        .find_map(|_| match stream.poll_event(&mut cx) {
            Poll::Ready(Ok(Event::PageFault(f))) => Some(f),
            Poll::Ready(other) => panic!("expected a page fault, got {other:?}"),
            Poll::Pending => None,
        })
        .expect("the queued fault was not read without the reactor");
    assert_eq!(fault.page_start(page), mem.addr);
    uffd.zeropage(mem.addr, page, ZeropageFlags::empty())
        .unwrap();
    assert_eq!(toucher.join().unwrap(), 0);
}

#[test]
fn stream_does_not_busy_loop_while_idle() {
    let Some((uffd, mem)) = registered(1, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let uffd = AsyncUffd::new(uffd).unwrap();
        let mut stream = uffd.event_stream().unwrap();
        let polls = AtomicUsize::new(0);
        let mut counted = std::pin::pin!(std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            stream.poll_event(cx)
        }));
        // Idle for a while: polled once, then left alone. (`biased` lets the
        // timer end the wait without polling the stream again.)
        tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            e = counted.as_mut() => panic!("event while idle: {e:?}"),
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled while idle");
        let addr = mem.addr;
        let toucher = thread::spawn(move || read_at(addr));
        let event = tokio::time::timeout(BOUND, counted)
            .await
            .expect("no fault");
        assert!(matches!(event, Ok(Event::PageFault(_))));
        // One poll for the wake-up (maybe one more for a stale readiness).
        assert!(
            polls.load(Ordering::Relaxed) <= 3,
            "{} polls",
            polls.load(Ordering::Relaxed)
        );
        uffd.zeropage(mem.addr, page, ZeropageFlags::empty())
            .unwrap();
        assert_eq!(toucher.join().unwrap(), 0);
    });
}

#[test]
fn stream_is_cancel_safe() {
    let Some((uffd, mem)) = registered(2, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let uffd = AsyncUffd::new(uffd).unwrap();
        let mut stream = uffd.event_stream().unwrap();

        // Pending, dropped, then the fault: the next read gets it.
        {
            let mut next = std::pin::pin!(stream.next_event());
            assert!(futures::poll!(next.as_mut()).is_pending());
        }
        let addr = mem.addr;
        let t1 = thread::spawn(move || read_at(addr));
        let Ok(Event::PageFault(f)) = stream.next_event().await else {
            panic!("lost the fault");
        };
        assert_eq!(f.page_start(page), mem.addr);
        uffd.copy(mem.addr, &page_bytes(page, 5), CopyFlags::empty())
            .unwrap();
        assert_eq!(t1.join().unwrap(), 5);

        // Pending, woken by a fault, dropped before it is polled again.
        {
            let mut next = Box::pin(stream.next());
            assert!(futures::poll!(next.as_mut()).is_pending());
            let addr = mem.addr + page;
            let t2 = thread::spawn(move || read_at(addr));
            wait_readable(uffd.as_raw_fd());
            drop(next);
            let Some(Ok(Event::PageFault(f))) =
                tokio::time::timeout(BOUND, stream.next()).await.unwrap()
            else {
                panic!("lost the fault");
            };
            assert_eq!(f.page_start(page), mem.addr + page);
            uffd.copy(mem.addr + page, &page_bytes(page, 6), CopyFlags::empty())
                .unwrap();
            assert_eq!(t2.join().unwrap(), 6);
        }
    });
}

#[test]
fn short_reads_clear_readiness_without_missing_a_fault() {
    // Faults one at a time: every read is short (1 of 16), so readiness is
    // cleared after each without a second read. The next fault must still
    // wake the stream, every time, on both runtime flavours.
    for flavour in ["current_thread", "multi_thread"] {
        let pages = 200;
        let Some((uffd, mem)) = registered(pages, Features::empty()) else {
            return;
        };
        let page = uffd.page_size();
        let rt = runtime(flavour);
        rt.block_on(async {
            let uffd = AsyncUffd::new(uffd).unwrap();
            let mut stream = uffd.event_stream_with_batch(16).unwrap();
            let base = mem.addr;
            let toucher = thread::spawn(move || {
                (0..pages)
                    .map(|p| read_at(base + p * page) as usize)
                    .sum::<usize>()
            });
            for p in 0..pages {
                let event = tokio::time::timeout(BOUND, stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("{flavour}: fault {p} never woke the stream"));
                let Some(Ok(Event::PageFault(f))) = event else {
                    panic!("{flavour}: unexpected {event:?}");
                };
                assert_eq!(f.page_start(page), base + p * page);
                assert_eq!(stream.buffered_len(), 0);
                uffd.copy(f.page_start(page), &page_bytes(page, 1), CopyFlags::empty())
                    .unwrap();
            }
            assert_eq!(toucher.join().unwrap(), pages);
        });
    }
}

fn runtime(flavour: &str) -> tokio::runtime::Runtime {
    match flavour {
        "current_thread" => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
    }
    .enable_all()
    .build()
    .unwrap()
}

/// Many threads fault at once, more than one read can return: every fault
/// is delivered exactly once, resolved by a spawned task through a cloned
/// handle, and every thread finishes with its page's bytes.
fn many_faulting_threads(flavour: &str) {
    let threads = 48;
    let batch = 8;
    let Some((uffd, mem)) = registered(threads, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = runtime(flavour);
    rt.block_on(async {
        let uffd = AsyncUffd::new(uffd).unwrap();
        let stream = uffd.event_stream_with_batch(batch).unwrap();
        let base = mem.addr;
        let touchers: Vec<_> = (0..threads)
            .map(|i| thread::spawn(move || read_at(base + i * page + i)))
            .collect();
        // The reader runs in its own task; resolutions in tasks of their own.
        let reader = tokio::spawn(read_and_resolve(stream, threads, page));
        let seen = tokio::time::timeout(BOUND, reader)
            .await
            .expect("faults not all delivered")
            .unwrap();
        assert_eq!(seen.len(), threads, "each fault exactly once");
        for (i, t) in touchers.into_iter().enumerate() {
            assert_eq!(t.join().unwrap(), i as u8, "thread {i} read the wrong byte");
        }
        let expected: HashSet<usize> = (0..threads).map(|i| base + i * page).collect();
        assert_eq!(seen, expected);
    });
}

async fn read_and_resolve(mut stream: EventStream, faults: usize, page: usize) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut tasks = Vec::new();
    while seen.len() < faults {
        let Event::PageFault(f) = stream.next().await.unwrap().unwrap() else {
            panic!("unexpected event");
        };
        let start = f.page_start(page);
        assert!(seen.insert(start), "fault on {start:#x} delivered twice");
        let handle = stream.handle().clone();
        tasks.push(tokio::spawn(async move {
            // Byte `j` of every page reads `j as u8`; thread `i` reads byte
            // `i` of page `i`.
            let data: Vec<u8> = (0..page).map(|j| j as u8).collect();
            handle.copy(start, &data, CopyFlags::empty())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    seen
}

#[test]
fn many_faulting_threads_on_a_current_thread_runtime() {
    many_faulting_threads("current_thread");
}

#[test]
fn many_faulting_threads_on_a_multi_thread_runtime() {
    many_faulting_threads("multi_thread");
}

#[test]
fn threads_faulting_on_one_page_are_resolved_once_and_all_woken() {
    let Some((uffd, mem)) = registered(1, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = runtime("multi_thread");
    rt.block_on(async {
        let uffd = AsyncUffd::new(uffd).unwrap();
        let mut stream = uffd.event_stream_with_batch(4).unwrap();
        let addr = mem.addr;
        let touchers: Vec<_> = (0..16)
            .map(|_| thread::spawn(move || read_at(addr)))
            .collect();
        // The first fault is resolved; later messages for the same page find
        // it there (Exists) and only need a wake.
        let mut resolved = false;
        while !touchers.iter().all(|t| t.is_finished()) {
            let next = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
            let Ok(Some(Ok(Event::PageFault(_)))) = next else {
                continue;
            };
            match uffd.copy(addr, &page_bytes(page, 9), CopyFlags::empty()) {
                Ok(_) => {
                    assert!(!resolved, "copied twice");
                    resolved = true;
                }
                Err(e) if e.kind() == ErrorKind::Exists => uffd.wake(addr, page).unwrap(),
                Err(e) => panic!("{e}"),
            }
        }
        assert!(resolved);
        for t in touchers {
            assert_eq!(t.join().unwrap(), 9);
        }
    });
}

#[test]
fn a_forked_child_is_served_through_a_stream_of_its_own() {
    let Some((uffd, mem)) = registered(1, Features::EVENT_FORK) else {
        return;
    };
    let page = uffd.page_size();
    let rt = runtime("multi_thread");
    rt.block_on(async {
        let uffd = AsyncUffd::new(uffd).unwrap();
        let mut stream = uffd.event_stream().unwrap();
        let addr = mem.addr;
        let forker = thread::spawn(move || fork_reader(addr));
        let event = tokio::time::timeout(BOUND, stream.next()).await.unwrap();
        let Some(Ok(Event::Fork(fork))) = event else {
            panic!("expected Fork, got {event:?}");
        };
        let child = AsyncUffd::new(fork.into_uffd()).unwrap();
        let mut child_events = child.event_stream().unwrap();
        let event = tokio::time::timeout(BOUND, child_events.next())
            .await
            .unwrap();
        let Some(Ok(Event::PageFault(f))) = event else {
            panic!("expected the child's fault, got {event:?}");
        };
        assert_eq!(f.page_start(page), mem.addr);
        child
            .copy(mem.addr, &page_bytes(page, 0x3c), CopyFlags::empty())
            .unwrap();
        let pid = forker.join().unwrap();
        let status = tokio::task::spawn_blocking(move || wait_child(pid))
            .await
            .unwrap();
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0x3c);
    });
}

#[test]
fn try_new_outside_a_runtime_hands_the_uffd_back() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let fd = uffd.as_raw_fd();
    let (uffd, err) = AsyncUffd::try_new(uffd).unwrap_err();
    assert_eq!(uffd.as_raw_fd(), fd);
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
    // Inside a runtime it works, and the Uffd can be taken back out.
    let rt = runtime("current_thread");
    let _guard = rt.enter();
    let a = AsyncUffd::try_new(uffd).map_err(|(_, e)| e).unwrap();
    let b = a.clone();
    let a = a.into_inner().unwrap_err(); // `b` still holds it
    drop(b);
    assert_eq!(a.into_inner().unwrap().as_raw_fd(), fd);
}

#[test]
fn streams_and_handles_are_send() {
    fn assert_send<T: Send + 'static>(_: &T) {}
    fn assert_send_future<F: Future + Send>(_: &F) {}
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let rt = runtime("current_thread");
    let _guard = rt.enter();
    let uffd = AsyncUffd::new(uffd).unwrap();
    let mut stream = uffd.event_stream().unwrap();
    assert_send(&uffd);
    assert_send_future(&stream.next_event());
    assert_send(&stream);
}

#[test]
fn a_second_stream_is_refused_while_the_first_lives() {
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let rt = runtime("current_thread");
    let _guard = rt.enter();
    let uffd = AsyncUffd::new(uffd).unwrap();
    let first = uffd.event_stream().unwrap();
    let err = uffd.clone().event_stream().unwrap_err();
    assert!(matches!(err, tokio_uffd::Error::StreamExists), "{err:?}");
    drop(first);
    assert!(uffd.event_stream().is_ok());
}

#[test]
fn short_reads_under_concurrent_faults_lose_no_wakeup() {
    // Four threads fault continuously while the stream reads with room for
    // sixteen: every read is short and clears readiness, and faults keep
    // landing between a read and its clear. None may be lost.
    let threads = 4;
    let per_thread = 500;
    let Some((uffd, mem)) = registered(threads * per_thread, Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let rt = runtime("multi_thread");
    rt.block_on(async {
        let uffd = AsyncUffd::new(uffd).unwrap();
        let mut stream = uffd.event_stream_with_batch(16).unwrap();
        let base = mem.addr;
        let touchers: Vec<_> = (0..threads)
            .map(|t| {
                thread::spawn(move || {
                    (0..per_thread)
                        .map(|i| read_at(base + (i * threads + t) * page) as usize)
                        .sum::<usize>()
                })
            })
            .collect();
        let data = page_bytes(page, 1);
        for n in 0..threads * per_thread {
            let event = tokio::time::timeout(BOUND, stream.next())
                .await
                .unwrap_or_else(|_| panic!("fault {n} never woke the stream"));
            let Some(Ok(Event::PageFault(f))) = event else {
                panic!("unexpected {event:?}");
            };
            uffd.copy(f.page_start(page), &data, CopyFlags::empty())
                .unwrap();
        }
        for t in touchers {
            assert_eq!(t.join().unwrap(), per_thread);
        }
    });
}
