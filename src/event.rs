//! Typed userfaultfd events and the buffer that reads and decodes them.

use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, Result};
use crate::flags::{Features, PageFaultFlags};
use crate::sys;
use crate::uffd::{Parent, ReadError, Uffd};

/// One event read from a userfaultfd.
///
/// Page faults are the common case; the others need their feature
/// (`EVENT_FORK`, `EVENT_REMAP`, `EVENT_REMOVE`, `EVENT_UNMAP`) and report
/// changes to the registered memory that a handler must track.
///
/// # Example
///
/// What a handler of its own does with each kind:
///
/// ```
/// use std::collections::HashSet;
/// use tokio_uffd::{Event, Uffd, ZeropageFlags};
///
/// /// Serves zeros, and remembers which pages it served.
/// fn handle(uffd: &Uffd, served: &mut HashSet<usize>, event: Event) -> tokio_uffd::Result<()> {
///     let page = uffd.page_size();
///     match event {
///         Event::PageFault(fault) => {
///             let at = fault.page_start(page);
///             match uffd.zeropage(at, page, ZeropageFlags::empty()) {
///                 Ok(_) => {}
///                 // Already there: the kernel did not wake the waiters.
///                 Err(e) if e.kind() == tokio_uffd::ErrorKind::Exists => uffd.wake(at, page)?,
///                 Err(e) => return Err(e),
///             }
///             served.insert(at);
///         }
///         // Freed by the owner: never serve the old contents there again.
///         Event::Remove(r) => served.retain(|&p| p < r.start || p >= r.end),
///         Event::Unmap(u) => served.retain(|&p| p < u.start || p >= u.end),
///         Event::Remap(r) => {
///             let moved: Vec<usize> =
///                 served.iter().copied().filter(|&p| p >= r.from && p < r.from + r.len).collect();
///             for p in moved {
///                 served.remove(&p);
///                 served.insert(p - r.from + r.to);
///             }
///         }
///         // The child's userfaultfd: serve it too, or drop it (closing it).
///         Event::Fork(fork) => drop(fork.into_uffd()),
///         // Kinds of later kernels.
///         _ => {}
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A thread touched a registered page and sleeps until it is resolved.
    PageFault(PageFault),
    /// The process forked; the child's copy of the registered memory is
    /// served through the userfaultfd this event owns.
    Fork(Fork),
    /// A registered range was moved with `mremap()`; later faults come at
    /// the new address.
    Remap(Remap),
    /// Pages of a registered range were freed (`MADV_DONTNEED`,
    /// `MADV_REMOVE`). Their next fault must not be served the old contents.
    Remove(Remove),
    /// A registered range was unmapped.
    Unmap(Unmap),
}

/// Why a page fault was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// The page is missing: resolve with copy, zeropage, poison or move.
    Missing,
    /// A write hit a write-protected page: resolve by removing protection.
    WriteProtect,
    /// The page is in the page cache but not mapped: resolve with continue.
    Minor,
}

/// A page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageFault {
    /// The faulting address, rounded down to the page by the kernel unless
    /// `EXACT_ADDRESS` was granted.
    pub address: usize,
    /// The kernel's flags for the fault, unknown bits kept.
    pub flags: PageFaultFlags,
    /// The id of the faulting thread, when `THREAD_ID` was granted.
    pub thread_id: Option<u32>,
}

impl PageFault {
    /// Why the fault was raised.
    pub fn kind(&self) -> FaultKind {
        if self.flags.contains(PageFaultFlags::MINOR) {
            FaultKind::Minor
        } else if self.flags.contains(PageFaultFlags::WP) {
            FaultKind::WriteProtect
        } else {
            FaultKind::Missing
        }
    }

    /// Whether the faulting access was a write.
    pub fn is_write(&self) -> bool {
        self.flags.contains(PageFaultFlags::WRITE)
    }

    /// The start of the page of `page_size` bytes (a power of two) that
    /// holds the faulting address.
    pub fn page_start(&self, page_size: usize) -> usize {
        self.address & !(page_size - 1)
    }
}

/// A `fork()` of the process that owns the registered memory. Owns the
/// child's userfaultfd: dropping the event closes it, after which the
/// child's faults on that memory are no longer reported.
pub struct Fork {
    uffd: Uffd,
}

impl Fork {
    /// The child's userfaultfd.
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Takes the child's userfaultfd, to serve the child's faults.
    pub fn into_uffd(self) -> Uffd {
        self.uffd
    }
}

impl fmt::Debug for Fork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fork").field("uffd", &self.uffd).finish()
    }
}

/// An `mremap()` of a registered range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Remap {
    /// The old start address.
    pub from: usize,
    /// The new start address.
    pub to: usize,
    /// The length of the original range.
    pub len: usize,
}

/// Pages freed from a registered range: `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Remove {
    /// First byte of the range.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// A registered range unmapped: `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Unmap {
    /// First byte of the range.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// A message decoded without taking ownership of anything; see
/// [`decode_message`].
#[derive(Debug)]
#[non_exhaustive]
pub enum RawEvent {
    /// Any event but a fork (never [`Event::Fork`]).
    Event(Event),
    /// A fork, with the number of the fd the kernel installed for the
    /// child's userfaultfd when the message was read. Not owned: whoever
    /// read the message owns it.
    Fork(RawFd),
}

/// Decodes one 32-byte `uffd_msg` as read from a userfaultfd, purely: no
/// fd is touched or taken. `thread_id` says whether `THREAD_ID` was
/// granted (otherwise the thread id field means nothing).
///
/// [`EventBuffer`] does this for every message it reads and takes
/// ownership of fork fds; this function is for tools that see raw messages
/// (tests, fuzzers, recorders).
///
/// # Errors
///
/// [`Error::UnknownEvent`] for an event code this crate does not know,
/// [`Error::BadMessage`] for fields out of range. Never panics.
pub fn decode_message(bytes: &[u8; 32], thread_id: bool) -> Result<RawEvent> {
    decode(&sys::uffd_msg::from_bytes(bytes), thread_id)
}

fn addr(v: u64, what: &'static str, msg: &sys::uffd_msg) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::BadMessage {
        what,
        bytes: msg.to_bytes(),
    })
}

/// Decodes one message. Pure: no fd is touched. `thread_id` says whether
/// `THREAD_ID` was granted, so that `ptid` means something.
fn decode(msg: &sys::uffd_msg, thread_id: bool) -> Result<RawEvent> {
    // SAFETY (for every union read below): each variant is plain integers
    // and the union is always fully initialised (24 bytes read from the
    // kernel, or built by `uffd_msg::from_bytes`), so any variant may be read.
    let event = match msg.event {
        sys::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: see above.
            let pf = unsafe { msg.arg.pagefault };
            Event::PageFault(PageFault {
                address: addr(pf.address, "fault address out of range", msg)?,
                flags: PageFaultFlags::from_bits_retain(pf.flags),
                thread_id: thread_id.then_some(pf.ptid),
            })
        }
        sys::UFFD_EVENT_FORK => {
            // SAFETY: see above.
            let fork = unsafe { msg.arg.fork };
            let fd = RawFd::try_from(fork.ufd).map_err(|_| Error::BadMessage {
                what: "fork fd out of range",
                bytes: msg.to_bytes(),
            })?;
            return Ok(RawEvent::Fork(fd));
        }
        sys::UFFD_EVENT_REMAP => {
            // SAFETY: see above.
            let r = unsafe { msg.arg.remap };
            Event::Remap(Remap {
                from: addr(r.from, "remap source out of range", msg)?,
                to: addr(r.to, "remap destination out of range", msg)?,
                len: addr(r.len, "remap length out of range", msg)?,
            })
        }
        sys::UFFD_EVENT_REMOVE | sys::UFFD_EVENT_UNMAP => {
            // SAFETY: see above.
            let r = unsafe { msg.arg.remove };
            let start = addr(r.start, "range start out of range", msg)?;
            let end = addr(r.end, "range end out of range", msg)?;
            if msg.event == sys::UFFD_EVENT_REMOVE {
                Event::Remove(Remove { start, end })
            } else {
                Event::Unmap(Unmap { start, end })
            }
        }
        code => {
            return Err(Error::UnknownEvent {
                code,
                bytes: msg.to_bytes(),
            })
        }
    };
    Ok(RawEvent::Event(event))
}

/// A buffer of whole `uffd_msg`s, filled by one `read(2)` and emptied one
/// decoded [`Event`] at a time.
///
/// The kernel installs a `Fork` event's fd in this process when the message
/// is read, so the buffer owns those fds until their events are taken:
/// dropping the buffer (or reading past an undecodable message) never leaks
/// one.
///
/// ```no_run
/// use tokio_uffd::{Event, EventBuffer, Uffd};
///
/// let uffd = Uffd::new()?;
/// let mut buf = EventBuffer::new(64);
/// match uffd.read_events(&mut buf) {
///     Ok(_) => {
///         while let Some(event) = buf.next_event() {
///             println!("{:?}", event?);
///         }
///     }
///     Err(e) if e.kind() == tokio_uffd::ErrorKind::WouldBlock => { /* nothing queued */ }
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), tokio_uffd::Error>(())
/// ```
pub struct EventBuffer {
    msgs: Box<[MaybeUninit<sys::uffd_msg>]>,
    /// Messages `head..tail` are initialised and not yet taken.
    head: usize,
    tail: usize,
    /// What the userfaultfd that filled the buffer grants (thread ids) and
    /// passes on to forked children.
    parent: Option<Parent>,
}

impl fmt::Debug for EventBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBuffer")
            .field("capacity", &self.capacity())
            .field("unread", &self.len())
            .finish()
    }
}

/// The default number of messages read at once.
pub const DEFAULT_BATCH: usize = 64;

impl Default for EventBuffer {
    fn default() -> Self {
        Self::new(DEFAULT_BATCH)
    }
}

impl EventBuffer {
    /// A buffer for up to `capacity` messages per read (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            msgs: (0..capacity).map(|_| MaybeUninit::uninit()).collect(),
            head: 0,
            tail: 0,
            parent: None,
        }
    }

    /// How many messages one read can return.
    pub fn capacity(&self) -> usize {
        self.msgs.len()
    }

    /// Messages read but not yet taken.
    pub fn len(&self) -> usize {
        self.tail - self.head
    }

    /// Whether every message read has been taken.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Takes and decodes the next message: `None` when the buffer is empty,
    /// an `Err` for a message that cannot be decoded (it is consumed; the
    /// next one is unaffected).
    pub fn next_event(&mut self) -> Option<Result<Event>> {
        if self.head == self.tail {
            return None;
        }
        // Messages are only ever stored together with their parent.
        let parent = self.parent?;
        // SAFETY: `head < tail`, and messages `head..tail` are initialised.
        let msg = unsafe { self.msgs[self.head].assume_init_read() };
        self.head += 1;
        let thread_id = parent.info.features.contains(Features::THREAD_ID);
        Some(decode(&msg, thread_id).and_then(|d| match d {
            RawEvent::Event(e) => Ok(e),
            RawEvent::Fork(fd) => {
                // SAFETY: the kernel installed this fd in our table when
                // `read(2)` returned the message, and the message was just
                // taken from the buffer, so nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // On error the fd is closed with `fd`.
                Uffd::from_fork(fd, parent).map(|uffd| Event::Fork(Fork { uffd }))
            }
        }))
    }

    /// The ranges of the Remove messages read but not yet taken.
    #[cfg(feature = "async")]
    pub(crate) fn unread_removes(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (self.head..self.tail).filter_map(|i| {
            // SAFETY: messages `head..tail` are initialised.
            let msg = unsafe { self.msgs[i].assume_init_ref() };
            if msg.event != sys::UFFD_EVENT_REMOVE {
                return None;
            }
            // SAFETY: every variant of the union is plain integers.
            let r = unsafe { msg.arg.remove };
            Some((usize::try_from(r.start).ok()?, usize::try_from(r.end).ok()?))
        })
    }

    /// Appends a raw message as if it had been read from `uffd` (for
    /// replaying recorded messages, and for tests and fuzzers). Returns
    /// `false`, and takes nothing, when the buffer is full.
    ///
    /// # Safety
    ///
    /// If the message is a fork (`UFFD_EVENT_FORK`), its `ufd` field must
    /// be an open fd that the caller owns and hands over: the buffer closes
    /// it if the event is never taken, and the event owns it if it is.
    pub unsafe fn push_message(&mut self, bytes: &[u8; 32], uffd: &Uffd) -> bool {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
        if self.tail == self.msgs.len() {
            return false;
        }
        self.msgs[self.tail] = MaybeUninit::new(sys::uffd_msg::from_bytes(bytes));
        self.tail += 1;
        self.parent = Some(uffd.parent());
        true
    }

    /// Appends a message as if it had been read (tests of decoding).
    #[cfg(test)]
    fn push_for_test(&mut self, msg: sys::uffd_msg, parent: Parent) {
        assert!(self.tail < self.msgs.len());
        self.msgs[self.tail] = MaybeUninit::new(msg);
        self.tail += 1;
        self.parent = Some(parent);
    }

    /// One `read(2)` of `fd` into the free space of the buffer.
    pub(crate) fn fill_from(&mut self, uffd: &Uffd) -> Result<usize, ReadError> {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.tail == self.msgs.len() && self.head > 0 {
            self.msgs.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if self.tail == self.msgs.len() {
            return Err(ReadError::Os(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the EventBuffer is full: take its events before reading again",
            )));
        }
        self.parent = Some(uffd.parent());
        let n =
            sys::read_msgs(uffd.borrowed(), &mut self.msgs[self.tail..]).map_err(ReadError::Os)?;
        let whole = n / size_of::<sys::uffd_msg>();
        // Keep every whole message, so that the fds of fork messages are
        // owned (and closed on drop) even if the read is reported as bad.
        self.tail += whole;
        if n == 0 || n % size_of::<sys::uffd_msg>() != 0 {
            return Err(ReadError::Partial(n));
        }
        Ok(whole)
    }
}

/// Reading events is part of the events module: [`Uffd`] knows nothing of
/// events, and events build on it (a `Fork` event owns a [`Uffd`]).
impl Uffd {
    /// Reads as many queued messages as fit into the free space of `buf`
    /// with one `read(2)`, and returns how many were read (at least one).
    /// On a uffd made with [`UffdBuilder::blocking`](crate::UffdBuilder::blocking) it waits for the first
    /// message; on a non-blocking one (the default) it never waits.
    ///
    /// A `Fork` message's new userfaultfd is installed in this process's fd
    /// table by this read; `buf` owns it until the event is taken.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::WouldBlock`](crate::ErrorKind::WouldBlock) when no
    /// message is queued on a non-blocking uffd (never "zero messages");
    /// [`Error::Read`] with an `Interrupted` source when a signal cut a
    /// blocking wait short; [`Error::PartialMessage`] if the kernel returned
    /// something that is not whole messages; [`Error::Read`] otherwise.
    pub fn read_events(&self, buf: &mut EventBuffer) -> Result<usize> {
        self.read_raw(buf).map_err(Error::from)
    }

    /// One `read(2)` into `buf`, with the OS error kept raw so the async
    /// layer can see `WouldBlock`.
    pub(crate) fn read_raw(&self, buf: &mut EventBuffer) -> Result<usize, ReadError> {
        buf.fill_from(self)
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        // Close the fds of fork messages that were read but never taken.
        while self.head < self.tail {
            // SAFETY: messages `head..tail` are initialised.
            let msg = unsafe { self.msgs[self.head].assume_init_read() };
            self.head += 1;
            if let Ok(RawEvent::Fork(fd)) = decode(&msg, false) {
                // SAFETY: as in `next_event`: the read installed this fd and
                // nothing took it.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}

use std::mem::size_of;

const _: () = {
    const fn assert_send<T: Send>() {}
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<Event>();
    assert_send_sync::<EventBuffer>();
    assert_send_sync::<PageFault>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u8, words: [u64; 3]) -> sys::uffd_msg {
        let mut m = sys::uffd_msg::zeroed();
        m.event = event;
        m.arg = sys::uffd_msg_arg { reserved: words };
        m
    }

    #[test]
    fn decodes_pagefault_with_and_without_thread_id() {
        let m = msg(sys::UFFD_EVENT_PAGEFAULT, [0b101, 0x7000, 42]);
        let RawEvent::Event(Event::PageFault(pf)) = decode(&m, true).unwrap() else {
            panic!("not a page fault")
        };
        assert_eq!(pf.address, 0x7000);
        assert_eq!(pf.kind(), FaultKind::Minor);
        assert!(pf.is_write());
        assert_eq!(pf.thread_id, Some(42));
        let RawEvent::Event(Event::PageFault(pf)) = decode(&m, false).unwrap() else {
            panic!("not a page fault")
        };
        assert_eq!(pf.thread_id, None);
    }

    #[test]
    fn keeps_unknown_fault_flags() {
        let m = msg(sys::UFFD_EVENT_PAGEFAULT, [1 << 40 | 2, 0x1000, 0]);
        let RawEvent::Event(Event::PageFault(pf)) = decode(&m, false).unwrap() else {
            panic!("not a page fault")
        };
        assert_eq!(pf.flags.bits(), 1 << 40 | 2);
        assert_eq!(pf.kind(), FaultKind::WriteProtect);
    }

    #[test]
    fn unknown_event_is_an_error_not_a_panic() {
        let m = msg(0x77, [1, 2, 3]);
        let e = decode(&m, false).unwrap_err();
        assert!(matches!(e, Error::UnknownEvent { code: 0x77, .. }));
        assert!(e.to_string().contains("0x77"));
    }

    #[test]
    fn fork_fd_out_of_range_is_an_error() {
        let m = msg(sys::UFFD_EVENT_FORK, [u32::MAX as u64, 0, 0]);
        assert!(matches!(decode(&m, false), Err(Error::BadMessage { .. })));
    }

    #[test]
    fn decodes_remap_remove_unmap() {
        let m = msg(sys::UFFD_EVENT_REMAP, [0x1000, 0x9000, 0x2000]);
        let RawEvent::Event(Event::Remap(r)) = decode(&m, false).unwrap() else {
            panic!()
        };
        assert_eq!((r.from, r.to, r.len), (0x1000, 0x9000, 0x2000));
        let m = msg(sys::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0]);
        assert!(matches!(
            decode(&m, false).unwrap(),
            RawEvent::Event(Event::Remove(Remove {
                start: 0x1000,
                end: 0x3000
            }))
        ));
        let m = msg(sys::UFFD_EVENT_UNMAP, [0x1000, 0x3000, 0]);
        assert!(matches!(
            decode(&m, false).unwrap(),
            RawEvent::Event(Event::Unmap(Unmap {
                start: 0x1000,
                end: 0x3000
            }))
        ));
    }

    #[test]
    fn an_undecodable_message_is_one_error_item_and_the_next_is_unaffected() {
        let info = Parent {
            info: crate::uffd::Info {
                features: Features::empty(),
                available: Features::empty(),
                ioctls: crate::Ioctls::empty(),
                page_size: 4096,
            },
            user_mode_only: true,
        };
        let mut buf = EventBuffer::new(4);
        buf.push_for_test(msg(0x42, [0, 0, 0]), info);
        buf.push_for_test(msg(sys::UFFD_EVENT_PAGEFAULT, [0, 0x5000, 0]), info);
        assert!(matches!(
            buf.next_event(),
            Some(Err(Error::UnknownEvent { code: 0x42, .. }))
        ));
        match buf.next_event() {
            Some(Ok(Event::PageFault(pf))) => assert_eq!(pf.address, 0x5000),
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.next_event().is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn msg_bytes_round_trip() {
        let m = msg(sys::UFFD_EVENT_REMAP, [1, 2, 3]);
        let b = m.to_bytes();
        assert_eq!(sys::uffd_msg::from_bytes(&b).to_bytes(), b);
        assert_eq!(b[0], sys::UFFD_EVENT_REMAP);
    }
}
