//! [`AsyncUffd`] and [`EventStream`]: the userfaultfd on Tokio's reactor.

use std::fmt;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::Stream;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::{Error, Result};
use crate::event::{Event, EventBuffer, DEFAULT_BATCH};
use crate::gate::RemovalGate;
use crate::uffd::{ReadError, Uffd};

/// A [`Uffd`] registered with Tokio's reactor.
///
/// Cloning is cheap (an `Arc`): every clone is a handle through which any
/// task can resolve faults (it derefs to [`Uffd`], whose ioctls take
/// `&self`), while one [`EventStream`] reads the events.
///
/// # Examples
///
/// ```no_run
/// # async fn f() -> tokio_uffd::Result<()> {
/// use futures::StreamExt;
/// use tokio_uffd::{AsyncUffd, Event, Uffd, ZeropageFlags};
///
/// let uffd = AsyncUffd::new(Uffd::new()?)?;
/// let mut events = uffd.event_stream()?;
/// while let Some(event) = events.next().await {
///     if let Event::PageFault(fault) = event? {
///         let page = uffd.page_size();
///         let handle = uffd.clone();
///         tokio::spawn(async move {
///             let _ = handle.zeropage(fault.page_start(page), page, ZeropageFlags::empty());
///         });
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncUffd {
    inner: Arc<Inner>,
}

struct Inner {
    fd: AsyncFd<Uffd>,
    /// Whether an `EventStream` exists.
    reading: AtomicBool,
}

impl fmt::Debug for AsyncUffd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AsyncUffd")
            .field(self.inner.fd.get_ref())
            .finish()
    }
}

fn register(uffd: Uffd) -> std::result::Result<AsyncUffd, (Uffd, io::Error)> {
    // A uffd made with `UffdBuilder::blocking` would stall the reactor.
    if let Err(e) = crate::sys::set_nonblocking_cloexec(uffd.borrowed()) {
        return Err((uffd, e));
    }
    // SAFETY: `Uffd` owns its fd (an `OwnedFd` it never replaces), so the fd
    // stays open and refers to the same file description for as long as the
    // `AsyncFd` owns the `Uffd`, and `as_raw_fd` always returns it.
    unsafe { AsyncFd::register_with_interest(uffd, Interest::READABLE) }
        .map(|fd| AsyncUffd {
            inner: Arc::new(Inner {
                fd,
                reading: AtomicBool::new(false),
            }),
        })
        .map_err(|e| e.into_parts())
}

impl AsyncUffd {
    /// Registers `uffd` with the reactor of the current Tokio runtime,
    /// making it non-blocking first if it was made with
    /// [`UffdBuilder::blocking`](crate::UffdBuilder::blocking).
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime, or in one built without
    /// `enable_io`. [`try_new`](Self::try_new) does not panic outside a
    /// runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Os`] if the reactor refuses the fd (the `Uffd` is closed).
    #[track_caller]
    pub fn new(uffd: Uffd) -> Result<Self> {
        register(uffd).map_err(|(_, source)| reactor_error(source))
    }

    /// Like [`new`](Self::new), but hands the `Uffd` back on failure,
    /// including when there is no current Tokio runtime. A blocking `Uffd`
    /// that the reactor refused comes back non-blocking.
    ///
    /// # Panics
    ///
    /// Panics in a runtime built without `enable_io`, which Tokio does not
    /// let a caller detect.
    ///
    /// # Errors
    ///
    /// The `Uffd` with [`Error::NoRuntime`] outside a runtime, or with
    /// [`Error::Os`] if the reactor refused the fd.
    #[track_caller]
    pub fn try_new(uffd: Uffd) -> std::result::Result<Self, (Uffd, Error)> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err((uffd, Error::NoRuntime { what: "AsyncUffd" }));
        }
        register(uffd).map_err(|(uffd, source)| (uffd, reactor_error(source)))
    }

    /// The userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        self.inner.fd.get_ref()
    }

    /// The stream of the events of this userfaultfd, reading up to
    /// [`DEFAULT_BATCH`] messages per `read(2)`.
    ///
    /// # Errors
    ///
    /// [`Error::StreamExists`] while another stream of this userfaultfd is
    /// alive: there is one reader per userfaultfd (each message goes to one
    /// reader, and Tokio wakes only the last reader that waited).
    pub fn event_stream(&self) -> Result<EventStream> {
        self.event_stream_with_batch(DEFAULT_BATCH)
    }

    /// The stream reading up to `batch` messages (at least 1) per `read(2)`.
    ///
    /// # Errors
    ///
    /// As for [`event_stream`](Self::event_stream).
    pub fn event_stream_with_batch(&self, batch: usize) -> Result<EventStream> {
        if self.inner.reading.swap(true, Ordering::AcqRel) {
            return Err(Error::StreamExists);
        }
        Ok(EventStream {
            uffd: self.clone(),
            buf: EventBuffer::new(batch),
            gate: None,
            early: EarlyRead::default(),
        })
    }

    /// Deregisters from the reactor and returns the `Uffd`, if this is the
    /// last handle (no clone and no stream alive); otherwise `Err(self)`.
    pub fn into_inner(self) -> std::result::Result<Uffd, Self> {
        match Arc::try_unwrap(self.inner) {
            Ok(inner) => Ok(inner.fd.into_inner()),
            Err(inner) => Err(Self { inner }),
        }
    }
}

fn reactor_error(source: io::Error) -> Error {
    Error::Os {
        what: "registering the userfaultfd with the Tokio reactor",
        source,
    }
}

impl Deref for AsyncUffd {
    type Target = Uffd;

    fn deref(&self) -> &Uffd {
        self.inner.fd.get_ref()
    }
}

/// A [`Stream`] of the [`Event`]s of one userfaultfd.
///
/// It reads up to a batch of messages per `read(2)` into a buffer it owns
/// and yields them one at a time; it waits on the reactor only once the
/// buffer is empty and the kernel's queue drained. A message that cannot be
/// decoded is one `Err` item, and the stream goes on. The stream never ends
/// on its own: a userfaultfd has no end of file (when the process that owns
/// the memory exits, it just stays silent).
///
/// Three ways to read, each built on the one below:
/// [`poll_event`](Self::poll_event), [`next_event`](Self::next_event), and
/// the `Stream` impl.
///
/// # Example
///
/// The stream in a `select!` beside a shutdown signal, resolving each fault
/// from the loop (a [`Server`](crate::Server) does this, and more, for you):
///
/// ```
/// use tokio_uffd::{AsyncUffd, Event, RegisterMode, Uffd, ZeropageFlags};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let uffd = Uffd::new()?;
/// let page = uffd.page_size();
/// // SAFETY: a fresh anonymous mapping that nothing else uses.
/// let mem = unsafe {
///     libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE,
///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
/// };
/// assert_ne!(mem, libc::MAP_FAILED);
/// let addr = mem as usize;
/// // SAFETY: the mapping is ours, no reference into it exists, and only the
/// // loop below fills it.
/// unsafe { uffd.register(addr, page, RegisterMode::MISSING)? };
/// let uffd = AsyncUffd::new(uffd)?;
/// let mut events = uffd.event_stream()?;
///
/// let (done_tx, mut done) = tokio::sync::oneshot::channel();
/// // A plain thread touches the memory (never the runtime's own thread).
/// std::thread::spawn(move || {
///     let v = unsafe { *(addr as *const u8) };
///     let _ = done_tx.send(v);
/// });
/// let value = loop {
///     tokio::select! {
///         event = events.next_event() => {
///             if let Event::PageFault(fault) = event? {
///                 uffd.zeropage(fault.page_start(page), page, ZeropageFlags::empty())?;
///             }
///         }
///         v = &mut done => break v?,
///     }
/// };
/// assert_eq!(value, 0);
/// # unsafe { libc::munmap(mem, page) };
/// # Ok(())
/// # }
/// ```
///
/// # Cancel safety
///
/// Messages live in the stream, never in a future: dropping a pending
/// `next_event()` or `next()` future loses no message.
pub struct EventStream {
    uffd: AsyncUffd,
    buf: EventBuffer,
    /// The server's removal gate, held for writing across each read.
    gate: Option<Arc<RemovalGate>>,
    early: EarlyRead,
}

/// When to read the userfaultfd before the reactor says it is readable.
///
/// A thread woken by a resolution often faults again at once: on the
/// handler's own CPU it runs before the handler has even returned from the
/// ioctl. Its message is then queued by the time the stream is polled
/// again, and reading it straight away saves the reactor's `epoll_wait(2)`
/// and the wake-up of the task. Where faults do not come back to back
/// (each such read finding the queue empty) the attempts back off
/// exponentially, to one in [`MAX_SKIP`]` + 1` waits: faults that come one
/// at a time then cost 3 system calls and a read in 256. A read that finds
/// several messages queued (a burst) resets the backoff.
#[derive(Debug, Default)]
struct EarlyRead {
    /// Waits to let pass before the next attempt.
    skip: u32,
    /// Waits skipped after the last failed attempt.
    backoff: u32,
}

const MAX_SKIP: u32 = 255;

impl EarlyRead {
    /// Whether to try a read now.
    fn attempt(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// Several messages were queued at once: try again at the next wait.
    fn burst(&mut self) {
        self.skip = 0;
        self.backoff = 0;
    }

    fn found(&mut self, messages: bool) {
        if messages {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2 + 1).min(MAX_SKIP);
            self.skip = self.backoff;
        }
    }
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStream")
            .field("uffd", &self.uffd)
            .field("buffer", &self.buf)
            .finish()
    }
}

impl EventStream {
    /// The handle this stream reads from; clone it to resolve faults
    /// elsewhere.
    pub fn handle(&self) -> &AsyncUffd {
        &self.uffd
    }

    /// Messages read from the kernel but not yet yielded.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Polls for the next event.
    ///
    /// Returns a buffered event at once; otherwise reads the userfaultfd
    /// when the reactor says it is readable, and registers `cx`'s waker
    /// when it is not. Readiness is cleared only when the kernel's queue is
    /// known to be empty: the read returned `EAGAIN`, or fewer messages than
    /// it had room for (the kernel wakes the reactor for every message it
    /// queues, and Tokio ignores a clear that races with a newer wake-up, so
    /// no message is missed; this saves one `read(2)` per fault).
    ///
    /// When the reactor has nothing and recent faults came back to back,
    /// the stream reads once more before it waits (with the waker already
    /// registered): a message queued meanwhile is returned without a trip
    /// through the reactor. Such reads back off while they find nothing.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event>> {
        // Yielding buffered events costs Tokio's cooperative budget too, so
        // a flood of faults cannot starve the other tasks of the runtime.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            if let Some(event) = self.buf.next_event() {
                coop.made_progress();
                return Poll::Ready(event);
            }
            let mut guard = match self.uffd.inner.fd.poll_read_ready(cx) {
                Poll::Ready(guard) => guard.map_err(|source| Error::Read { source })?,
                Poll::Pending => {
                    if !self.early.attempt() {
                        return Poll::Pending;
                    }
                    // The waker is registered: if this finds nothing, a
                    // message queued after it still wakes the task.
                    let uffd = self.uffd.uffd();
                    match gated(&self.gate, &mut self.buf, |buf| uffd.read_raw(buf)) {
                        Ok(_) => {
                            self.early.found(true);
                            continue;
                        }
                        Err(ReadError::Os(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.early.found(false);
                            return Poll::Pending;
                        }
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                }
            };
            let room = self.buf.capacity() - self.buf.len();
            let uffd = guard.get_inner();
            let read = gated(&self.gate, &mut self.buf, |buf| uffd.read_raw(buf));
            if matches!(read, Ok(n) if n > 1) {
                self.early.burst();
            }
            match read {
                Ok(n) if n < room => guard.clear_ready(),
                Ok(_) => guard.retain_ready(),
                Err(ReadError::Os(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready()
                }
                Err(e) => {
                    guard.retain_ready();
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }

    /// Waits for the next event.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, no event
    /// is lost; the next call returns it.
    pub async fn next_event(&mut self) -> Result<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The server reads under its removal gate.
    pub(crate) fn set_removal_gate(&mut self, gate: Arc<RemovalGate>) {
        self.gate = Some(gate);
    }

    /// The next event already read from the kernel, without reading more.
    pub(crate) fn next_buffered(&mut self) -> Option<Result<Event>> {
        self.buf.next_event()
    }

    /// Returns the next event if one is buffered or queued in the kernel now,
    /// without waiting: `Ok(None)` when none is. Useful to drain the queue
    /// while retrying a resolution that failed with
    /// [`ErrorKind::Retry`](crate::ErrorKind::Retry).
    ///
    /// # Errors
    ///
    /// As for [`next_event`](Self::next_event).
    pub fn try_next_event(&mut self) -> Result<Option<Event>> {
        if let Some(event) = self.buf.next_event() {
            return event.map(Some);
        }
        let uffd = self.uffd.uffd();
        let read = gated(&self.gate, &mut self.buf, |buf| uffd.read_events(buf));
        match read {
            Ok(_) => self.buf.next_event().transpose(),
            Err(e) if e.kind() == crate::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Runs `read` into `buf`, under the server's removal gate if there is
/// one: the gate is held for writing across the read, and every Remove the
/// read brought in is recorded before it is released.
fn gated<R>(
    gate: &Option<Arc<RemovalGate>>,
    buf: &mut EventBuffer,
    read: impl FnOnce(&mut EventBuffer) -> R,
) -> R {
    let Some(gate) = gate else {
        return read(buf);
    };
    let mut log = gate.lock_for_read();
    let result = read(buf);
    for (start, end) in buf.unread_removes() {
        log.record(start, end);
    }
    result
}

impl Stream for EventStream {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx).map(Some)
    }
}

impl futures::stream::FusedStream for EventStream {
    /// Never: a userfaultfd has no end of file.
    fn is_terminated(&self) -> bool {
        false
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.uffd.inner.reading.store(false, Ordering::Release);
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    const fn assert_send<T: Send>() {}
    const fn assert_unpin<T: Unpin>() {}
    assert_send_sync::<AsyncUffd>();
    assert_send::<EventStream>();
    assert_unpin::<EventStream>();
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Attempts until one is allowed, and how many were skipped first.
    fn skipped_before_next(e: &mut EarlyRead) -> u32 {
        let mut n = 0;
        while !e.attempt() {
            n += 1;
        }
        n
    }

    #[test]
    fn early_reads_back_off_while_they_find_nothing_and_resume_on_a_find() {
        let mut e = EarlyRead::default();
        assert!(e.attempt(), "the first wait tries");
        let mut gaps = Vec::new();
        for _ in 0..8 {
            e.found(false);
            gaps.push(skipped_before_next(&mut e));
        }
        assert_eq!(gaps, [1, 3, 7, 15, 31, 63, 127, 255]);
        e.found(false);
        assert_eq!(skipped_before_next(&mut e), 255, "capped");
        e.found(true);
        assert!(e.attempt(), "a find makes the next wait try again");
        e.found(false);
        assert_eq!(skipped_before_next(&mut e), 1, "and restarts the backoff");
        for _ in 0..5 {
            e.found(false);
            skipped_before_next(&mut e);
        }
        e.found(false);
        e.burst();
        assert!(e.attempt(), "a burst makes the next wait try again");
    }
}
