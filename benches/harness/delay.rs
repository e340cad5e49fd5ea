//! A precise asynchronous delay, the stand-in for a slow fetch.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long the stand-in for a disk read or a network round trip takes.
pub const SLOW_FETCH: Duration = Duration::from_micros(200);

/// A precise async delay: one timer thread sleeps until the earliest
/// deadline and wakes the futures whose time has come (Tokio's timer
/// rounds to a millisecond, which would turn 200 us into 1 ms). Stands in
/// for a network round trip or an asynchronous disk read: the fetching
/// task is woken by another thread when the data is there.
struct Timer {
    state: std::sync::Mutex<Vec<(Instant, Arc<WakerSlot>)>>,
    cv: std::sync::Condvar,
}

/// Where a pending [`Delay`] keeps the waker of its latest poll, as a real
/// timer or socket does: polled again (say by another task), it replaces
/// the waker instead of adding a second one to wake.
type WakerSlot = std::sync::Mutex<Option<std::task::Waker>>;

fn timer() -> &'static Timer {
    static TIMER: OnceLock<&'static Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            state: std::sync::Mutex::new(Vec::new()),
            cv: std::sync::Condvar::new(),
        }));
        std::thread::spawn(move || {
            let mut due = t.state.lock().unwrap();
            loop {
                let now = Instant::now();
                let mut i = 0;
                while i < due.len() {
                    if due[i].0 <= now {
                        if let Some(w) = due.swap_remove(i).1.lock().unwrap().take() {
                            w.wake();
                        }
                    } else {
                        i += 1;
                    }
                }
                let next = due.iter().map(|d| d.0).min();
                due = match next {
                    Some(at) => t.cv.wait_timeout(due, at - now).unwrap().0,
                    None => t.cv.wait(due).unwrap(),
                };
            }
        });
        t
    })
}

/// Resolves [`SLOW_FETCH`] after it is first polled.
#[derive(Default)]
pub(super) struct Delay {
    at: Option<Instant>,
    slot: Option<Arc<WakerSlot>>,
}

impl std::future::Future for Delay {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let at = *self.at.get_or_insert_with(|| Instant::now() + SLOW_FETCH);
        if Instant::now() >= at {
            return std::task::Poll::Ready(());
        }
        if let Some(slot) = &self.slot {
            let mut w = slot.lock().unwrap();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            return std::task::Poll::Pending;
        }
        let slot = Arc::new(std::sync::Mutex::new(Some(cx.waker().clone())));
        self.slot = Some(slot.clone());
        let t = timer();
        let mut due = t.state.lock().unwrap();
        let earliest = due.iter().map(|d| d.0).min();
        due.push((at, slot));
        // The timer thread only needs waking for a new earliest deadline.
        if earliest.is_none_or(|e| at < e) {
            t.cv.notify_one();
        }
        std::task::Poll::Pending
    }
}
