//! Stopping a server and the servers of its forked children.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// The stop signal of a server and of the servers of its forked children.
///
/// A reader checks it every time it waits for the next event, so it costs
/// one atomic load there; a `watch` channel would take a lock each time.
#[derive(Debug, Default)]
pub(super) struct StopSignal {
    pub(super) stopped: AtomicBool,
    /// The readers waiting, woken (and forgotten) by `stop`.
    pub(super) waiting: Mutex<Vec<Waker>>,
}

impl StopSignal {
    pub(super) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in waiting {
            waker.wake();
        }
    }

    pub(super) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// Gives the stop signal when dropped.
#[derive(Debug)]
pub(super) struct StopOnDrop(pub(super) Arc<StopSignal>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// One reader's wait for its [`StopSignal`].
#[derive(Debug)]
pub(super) struct StopWait {
    pub(super) signal: Arc<StopSignal>,
    /// The waker this reader left with the signal, if any.
    pub(super) registered: Option<Waker>,
}

impl StopWait {
    pub(super) fn new(signal: Arc<StopSignal>) -> Self {
        Self {
            signal,
            registered: None,
        }
    }

    /// Ready once stopped; registers `cx`'s waker only when it is not the
    /// one already registered (a task's waker seldom changes).
    pub(super) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.is_stopped() {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let mut waiting = self
            .signal
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock: `stop` sets the flag before it takes
        // the list, so a stop either is seen here or finds this waker.
        if self.signal.is_stopped() {
            return Poll::Ready(());
        }
        if let Some(old) = self.registered.take() {
            waiting.retain(|w| !w.will_wake(&old));
        }
        waiting.push(cx.waker().clone());
        self.registered = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for StopWait {
    /// A reader that ends before the stop (a forked child's, when its
    /// process exits) takes its waker back: the list does not grow with
    /// every child that came and went.
    fn drop(&mut self) {
        if let Some(old) = self.registered.take() {
            let mut waiting = self
                .signal
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            waiting.retain(|w| !w.will_wake(&old));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(super) fn waiting(signal: &StopSignal) -> usize {
        signal.waiting.lock().unwrap().len()
    }

    #[test]
    pub(super) fn a_reader_that_ends_before_the_stop_takes_its_waker_back() {
        let signal = Arc::new(StopSignal::default());
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = StopWait::new(signal.clone());
        assert!(wait.poll_stopped(&mut cx).is_pending());
        // Polled again with the same waker: registered once.
        assert!(wait.poll_stopped(&mut cx).is_pending());
        assert_eq!(waiting(&signal), 1);
        drop(wait);
        assert_eq!(waiting(&signal), 0);
        signal.stop();
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "a gone reader was woken");
    }

    #[test]
    pub(super) fn dropping_the_guard_of_run_stops_and_wakes_every_reader() {
        let signal = Arc::new(StopSignal::default());
        let counts: Vec<Arc<Count>> = (0..3).map(|_| Arc::default()).collect();
        let mut waits: Vec<StopWait> = (0..3).map(|_| StopWait::new(signal.clone())).collect();
        for (wait, count) in waits.iter_mut().zip(&counts) {
            let waker = Waker::from(count.clone());
            assert!(wait
                .poll_stopped(&mut Context::from_waker(&waker))
                .is_pending());
        }
        drop(StopOnDrop(signal.clone()));
        for (wait, count) in waits.iter_mut().zip(&counts) {
            assert_eq!(count.0.load(Ordering::SeqCst), 1);
            let waker = Waker::from(count.clone());
            assert!(wait
                .poll_stopped(&mut Context::from_waker(&waker))
                .is_ready());
        }
    }
}
