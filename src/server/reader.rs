//! The reading side of a server: its loop, the events it applies and
//! the forked children it serves.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

use crate::asyncfd::{AsyncUffd, EventStream};
use crate::error::{Error, Result};
use crate::event::{Event, PageFault};
use crate::flags::Features;
use crate::handler::FaultHandler;
use crate::layout::{Layout, LoosePages, PageHash};
use crate::stats::Stats;
use crate::trace;

use super::job::{Done, Job};
use super::policy::{ForkPolicy, ServerExit};
use super::restore::{Restore, SharedRecorder};
use super::shared::Shared;
use super::stop::{StopSignal, StopWait};
use super::watchdog::{StallBoard, Watchdog};
use super::{thread_id, DRAIN_READS, STOP_DRAIN_READS};

/// The reading side of a server: owns the page state and every decision.
// Jobs stay boxed in its lists: they move between the lists, tasks and the
// channel as one pointer, and a spare job keeps its allocation.
#[allow(clippy::vec_box)]
pub(super) struct Reader<H> {
    pub(super) shared: Arc<Shared<H>>,
    pub(super) layout: Layout,
    /// The state of pages outside every region.
    pub(super) loose: LoosePages,
    pub(super) parked: Vec<Box<Job>>,
    /// The faults of the batch being handled, planned once its other
    /// events are applied (kept for its allocation).
    pub(super) batch_faults: Vec<PageFault>,
    /// The ranges the batch's Unmap and Remap events took away: a fault of
    /// the batch there was raised before the change (it is woken to fault
    /// again, never planned from a page map that no longer has its page).
    pub(super) batch_gone: Vec<(usize, usize)>,
    /// Finished jobs kept for reuse, with their buffers (at most
    /// `concurrency`): no allocation per fault.
    pub(super) spare: Vec<Box<Job>>,
    pub(super) inflight: usize,
    pub(super) tx: mpsc::UnboundedSender<Done>,
    pub(super) rx: mpsc::UnboundedReceiver<Done>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) tids: HashSet<u32, PageHash>,
    pub(super) last_tid: u32,
    /// The stop signal, shared with the servers of forked children.
    pub(super) stop: Arc<StopSignal>,
    /// Stop was asked for: no new event is read except to finish work
    /// and to let forks complete.
    pub(super) stopping: bool,
    /// Whether the uffd reports forks (`EVENT_FORK`).
    pub(super) forks: bool,
    /// The stall board and its watchdog (the top-level server's only).
    pub(super) watch: Option<(Arc<StallBoard>, Watchdog)>,
    /// For a forked child's server: how often to check that the child
    /// still exists.
    pub(super) child_probe: Option<Duration>,
    /// The servers of forked children: awaited when this one stops (they
    /// stop with it), left running (detached) when it ends otherwise.
    pub(super) children: Vec<tokio::task::JoinHandle<()>>,
    /// The warm prefetch and background fill (the top-level server's only).
    pub(super) restore: Option<Restore>,
    /// The working set being recorded (the top-level server's only).
    pub(super) recorder: Option<SharedRecorder>,
}

impl<H: FaultHandler> Reader<H> {
    pub(super) fn new(
        shared: Arc<Shared<H>>,
        layout: Layout,
        tids: impl IntoIterator<Item = u32>,
        stop: Arc<StopSignal>,
        child_probe: Option<Duration>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(shared.config.concurrency));
        let forks = shared.uffd.features().contains(Features::EVENT_FORK);
        Self {
            shared,
            layout,
            loose: LoosePages::default(),
            parked: Vec::new(),
            batch_faults: Vec::new(),
            batch_gone: Vec::new(),
            spare: Vec::new(),
            inflight: 0,
            tx,
            rx,
            permits,
            tids: tids.into_iter().collect(),
            last_tid: 0,
            forks,
            watch: None,
            child_probe,
            stop,
            stopping: false,
            children: Vec::new(),
            restore: None,
            recorder: None,
        }
    }

    /// The loop: read events and completions until stopped, then finish
    /// what is in flight (reading events only while parked work needs the
    /// queue drained), then end. Errors end it at once; tasks in flight
    /// still finish their own faults.
    // Without `tracing` the events below name nothing.
    #[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
    pub(super) async fn run(self, stream: EventStream) -> Result<ServerExit> {
        trace::event!(debug, "serving");
        let result = self.serve(stream).await;
        match &result {
            Ok(ServerExit::Stopped) => trace::event!(debug, "stopped: asked to stop"),
            Ok(ServerExit::ProcessExited) => {
                trace::event!(debug, "stopped: the process that owns the memory exited")
            }
            Err(e) => trace::event!(
                warn,
                error = %crate::error::error_chain(e),
                "stopped by an error"
            ),
        }
        result
    }

    pub(super) async fn serve(mut self, mut stream: EventStream) -> Result<ServerExit> {
        if let Some(gate) = &self.shared.gate {
            stream.set_removal_gate(gate.clone());
        }
        let mut stop = StopWait::new(self.stop.clone());
        // Reads left to drain the queue once stopped (see below).
        let mut drains = STOP_DRAIN_READS;
        let mut probe = self.child_probe.map(|every| {
            let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe
        });
        loop {
            // Seen here too, not only when the select below polls it: once
            // asked to stop, the server reads no new event (but to finish
            // its work and to let forks complete).
            if !self.stopping && self.stop.is_stopped() {
                self.begin_stopping();
            }
            if !self.stopping {
                self.feed_background();
            }
            let background = self.restore.as_ref().map_or(0, |r| r.inflight);
            if self.stopping && self.inflight == 0 && background == 0 && self.parked.is_empty() {
                // With EVENT_FORK a forking thread sleeps until its Fork is
                // read, even once this uffd is dropped (the half-made child
                // holds a copy of it): read what is queued before ending,
                // serving its faults and closing its children's uffds.
                if self.forks && drains > 0 {
                    drains -= 1;
                    if let Some(event) = stream.try_next_event()? {
                        if let Some(exit) = self.after_read(Ok(event), &mut stream).await? {
                            return Ok(exit);
                        }
                        continue;
                    }
                }
                for child in std::mem::take(&mut self.children) {
                    let _ = child.await;
                }
                return Ok(ServerExit::Stopped);
            }
            let tid = thread_id();
            if tid != self.last_tid {
                self.last_tid = tid;
                self.tids.insert(tid);
            }
            let retry_at = self.parked.iter().filter_map(|j| j.deadline).min();
            let reading = !self.stopping || !self.parked.is_empty();
            // A bounded fill waits for its next slot.
            let fill_at = self
                .restore
                .as_ref()
                .and_then(Restore::waiting_until)
                .filter(|_| !self.stopping);
            let step = tokio::select! {
                biased;
                // Only spawned tasks report here; none, none to wait for.
                Some(done) = self.rx.recv(), if self.inflight > 0 || background > 0 => {
                    self.finish(done).await
                }
                event = stream.next_event(), if reading => self.after_read(event, &mut stream).await,
                _ = sleep_until_retry(retry_at), if retry_at.is_some() => self.retry_parked().await,
                _ = tick(&mut probe), if probe.is_some() => self.probe_owner(&mut probe),
                () = sleep_until_fill(fill_at), if fill_at.is_some() => Ok(None),
                () = std::future::poll_fn(|cx| stop.poll_stopped(cx)), if !self.stopping => {
                    self.begin_stopping();
                    Ok(None)
                }
            };
            if let Some(exit) = step? {
                return Ok(exit);
            }
        }
    }

    /// A forked child's server ends once the child is gone, even if it
    /// never faults again.
    pub(super) fn probe_owner(
        &mut self,
        probe: &mut Option<tokio::time::Interval>,
    ) -> Result<Option<ServerExit>> {
        match self.shared.uffd.owner_exited() {
            Ok(true) => {
                trace::event!(debug, "the forked child exited: releasing its userfaultfd");
                Ok(Some(ServerExit::ProcessExited))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                trace::event!(
                    warn,
                    error = %crate::error::error_chain(&e),
                    "cannot probe whether the forked child exists; it is released when a \
                     resolution finds it gone, or when the server stops"
                );
                let _ = e;
                *probe = None;
                Ok(None)
            }
        }
    }

    /// Waits for a concurrency permit for a job about to run in a task.
    pub(super) async fn take_slot(&mut self) -> tokio::sync::OwnedSemaphorePermit {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.inflight += 1;
        permit
    }

    /// Puts `job` on the stall board, if there is one and it is not on yet.
    pub(super) fn watch(&self, job: &mut Job) {
        if let (None, Some((board, _))) = (job.watch, &self.watch) {
            job.watch = Some(board.begin(job.fault.address, job.fault.thread_id));
        }
    }

    /// Takes `job` off the stall board.
    pub(super) fn unwatch(&self, job: &mut Job) {
        if let (Some(token), Some((board, _))) = (job.watch.take(), &self.watch) {
            board.end(token);
        }
    }

    pub(super) fn begin_stopping(&mut self) {
        trace::event!(
            debug,
            inflight = self.inflight,
            parked = self.parked.len(),
            "stopping"
        );
        self.stopping = true;
    }

    /// Handles the event just read and the rest of its batch, then retries
    /// parked work.
    ///
    /// A batch's `Remove`, `Unmap` and `Remap` events update the page map
    /// before any of its faults is planned. One `read(2)` returns every
    /// pending fault before any pending event, so a batch can hold a fault
    /// on a page *and* the `Remove` that zapped that page after the fault
    /// was raised; the removal gate already counts that Remove (it was
    /// recorded by the read), so a fault planned from a page map that did
    /// not know of it would pass the gate and copy the stale image into a
    /// page the owner has just freed. Events keep their own order among
    /// themselves (a fork's child gets the page map as of its Fork).
    pub(super) async fn after_read(
        &mut self,
        event: Result<Event>,
        stream: &mut EventStream,
    ) -> Result<Option<ServerExit>> {
        if let Some((board, _)) = &self.watch {
            board.note_read();
        }
        let mut next = Some(event);
        // Batches read here while parked work needs the queue drained: a
        // few, then back to the loop (completions, the stop, retries).
        let mut reads = 0;
        loop {
            // The whole batch: events applied in order, faults kept.
            self.batch_gone.clear();
            while let Some(event) = next {
                match event {
                    Ok(event) => self.on_event(event),
                    // One message that cannot be decoded is consumed; the
                    // rest of the batch is unaffected.
                    Err(e @ (Error::UnknownEvent { .. } | Error::BadMessage { .. })) => {
                        trace::event!(warn, error = %e, "skipped an undecodable message");
                        self.shared.stats.set_error(e.to_string());
                    }
                    Err(e) => return Err(e),
                }
                next = stream.next_buffered();
            }
            let mut faults = std::mem::take(&mut self.batch_faults);
            let mut exit = Ok(None);
            for &fault in &faults {
                exit = self.on_fault(fault).await;
                if !matches!(exit, Ok(None)) {
                    break;
                }
            }
            faults.clear();
            self.batch_faults = faults;
            if !matches!(exit, Ok(None)) {
                return exit;
            }
            // Only with parked work is the kernel's queue drained too (the
            // event that makes it fail may be there); otherwise that would
            // cost a read(2) per fault.
            if self.parked.is_empty() {
                return Ok(None);
            }
            if reads == DRAIN_READS {
                // The rest is read by the loop, parked work retried there.
                return self.retry_parked().await;
            }
            reads += 1;
            next = stream.try_next_event().transpose();
            if next.is_none() {
                return self.retry_parked().await;
            }
        }
    }

    /// Applies a non-fault event to the page state; keeps a fault for
    /// [`after_read`](Self::after_read) to plan once the batch's events are
    /// applied.
    pub(super) fn on_event(&mut self, event: Event) {
        let stats = &self.shared.stats;
        match event {
            Event::PageFault(fault) => self.batch_faults.push(fault),
            Event::Remove(r) => {
                trace::event!(debug, start = %format_args!("{:#x}", r.start), end = %format_args!("{:#x}", r.end), "remove");
                Stats::add(&stats.removes, 1);
                self.layout.remove(r.start, r.end);
                self.loose
                    .remove(r.start, r.end, self.shared.config.page_size);
                self.notify(|h| h.on_remove(r.start, r.end));
            }
            Event::Unmap(u) => {
                trace::event!(debug, start = %format_args!("{:#x}", u.start), end = %format_args!("{:#x}", u.end), "unmap");
                Stats::add(&stats.unmaps, 1);
                self.layout.unmap(u.start, u.end);
                self.batch_gone.push((u.start, u.end));
                self.loose.unmap(u.start, u.end);
                self.notify(|h| h.on_unmap(u.start, u.end));
            }
            Event::Remap(r) => {
                trace::event!(debug, from = %format_args!("{:#x}", r.from), to = %format_args!("{:#x}", r.to), len = r.len, "remap");
                Stats::add(&stats.remaps, 1);
                self.layout.remap(r.from, r.to, r.len);
                self.batch_gone.push((r.from, r.from + r.len));
                self.loose.remap(r.from, r.to, r.len);
                self.notify(|h| h.on_remap(&r));
            }
            Event::Fork(fork) => {
                Stats::add(&stats.forks, 1);
                self.notify(|h| h.on_fork());
                if self.stopping {
                    // Read only so that the fork completes: a stopping
                    // server serves no new child.
                    trace::event!(
                        warn,
                        child_uffd = fork.uffd().as_raw_fd(),
                        "a process forked while the server was stopping: its child's memory is not served"
                    );
                } else if self.shared.config.fork == ForkPolicy::Serve {
                    trace::event!(
                        debug,
                        child_uffd = fork.uffd().as_raw_fd(),
                        "fork: serving the child"
                    );
                    if let Err(e) = self.serve_child(fork.into_uffd()) {
                        // The child's failure alone: the parent serves on.
                        trace::event!(
                            warn,
                            error = %crate::error::error_chain(&e),
                            "cannot serve a forked child: its registered memory reads as unregistered"
                        );
                        self.shared.stats.set_error(format!(
                            "cannot serve a forked child: {}",
                            crate::error::error_chain(&e)
                        ));
                    }
                } else {
                    trace::event!(debug, "fork: the child is not served (ForkPolicy::Ignore)");
                }
            }
        }
    }

    /// Calls one of the handler's `on_*` methods; a panic there is
    /// reported, and the server goes on.
    fn notify(&self, call: impl FnOnce(&H)) {
        let handler = &*self.shared.handler;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(handler))).is_err() {
            trace::event!(warn, "the handler panicked in one of its on_* methods");
            self.shared
                .stats
                .set_error("the handler panicked in one of its on_* methods".into());
        }
    }

    /// Serves a forked child with the same handler and a copy of the page
    /// state, in a task of its own that ends with the parent's stop signal
    /// (or when the child's process is found gone).
    pub(super) fn serve_child(&mut self, uffd: crate::Uffd) -> Result<()> {
        let uffd = AsyncUffd::new(uffd)?;
        let mut layout = self.layout.clone();
        // Pages outside regions: those freed stay freed in the child; those
        // being resolved for the parent are still missing there.
        let loose = self.loose.for_child();
        for r in &mut layout.regions {
            // Pages being resolved for the parent are still missing in the
            // child.
            let pages = r.region.len / r.region.page_size;
            for i in 0..pages {
                if r.inflight.get(i) {
                    r.inflight.set(i, false);
                    r.served.set(i, false);
                }
            }
        }
        let span = trace::server_span(uffd.uffd().as_raw_fd(), layout.regions.len(), true);
        let shared = Arc::new(self.shared.for_child(uffd.clone()));
        let stream = uffd.event_stream_with_batch(self.shared.config.batch)?;
        let probe = Some(shared.config.child_probe);
        let mut reader = Reader::new(shared, layout, self.tids.clone(), self.stop.clone(), probe);
        reader.loose = loose;
        let stats = self.shared.stats.clone();
        self.children.retain(|c| !c.is_finished());
        self.children
            .push(tokio::spawn(trace::in_span(span, async move {
                if let Err(e) = Box::pin(reader.run(stream)).await {
                    stats.set_error(format!(
                        "a forked child's server failed: {}",
                        crate::error::error_chain(&e)
                    ));
                }
            })));
        Ok(())
    }
}

/// The next tick of `probe`; never without one.
pub(super) async fn tick(probe: &mut Option<tokio::time::Interval>) {
    match probe {
        Some(probe) => {
            probe.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Until the bounded fill may start its next job.
async fn sleep_until_fill(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

pub(super) async fn sleep_until_retry(at: Option<Instant>) {
    // Retry parked work every millisecond (or at its deadline), whichever
    // comes first; events that arrive meanwhile retry it sooner.
    let soon = Instant::now() + Duration::from_millis(1);
    let at = at.map_or(soon, |d| d.min(soon));
    tokio::time::sleep_until(at.into()).await;
}
