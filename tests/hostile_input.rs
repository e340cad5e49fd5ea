//! Hostile input: the decoder and the event buffer fed arbitrary bytes
//! never panic and never leak a fork fd; misuse gives clear errors;
//! failing handlers under load never hang a thread.
//!
//! Counting `/proc/self/fd` needs no other test opening fds at the same
//! time, so every test here takes `SERIAL` first.

mod common;

use std::os::fd::IntoRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use tokio_uffd::{decode_message, ErrorKind, Event, EventBuffer, Features, RawEvent, RegisterMode};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn message(&mut self) -> [u8; 32] {
        let mut m = [0u8; 32];
        for chunk in m.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_ne_bytes());
        }
        // Half the time a known event code, to reach the field decoders.
        if self.next() % 2 == 0 {
            m[0] = 0x12 + (self.next() % 5) as u8;
        }
        m
    }
}

/// How long the randomized tests run: a few seconds in CI, longer with
/// `TOKIO_UFFD_FUZZ_SECS`.
fn budget() -> Duration {
    let secs = std::env::var("TOKIO_UFFD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    Duration::from_secs(secs)
}

#[test]
fn decoding_arbitrary_bytes_never_panics_and_touches_no_fd() {
    let _s = serial();
    let fds = count_fds();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let deadline = Instant::now() + budget();
    let mut seen = [0usize; 4]; // ok event, fork, unknown, bad
    let mut n = 0u64;
    while Instant::now() < deadline || n < 100_000 {
        let m = rng.message();
        match decode_message(&m, rng.next() % 2 == 0) {
            Ok(RawEvent::Event(_)) => seen[0] += 1,
            Ok(RawEvent::Fork(_)) => seen[1] += 1,
            Ok(_) => unreachable!("a new RawEvent variant"),
            Err(e) => {
                let text = e.to_string();
                assert!(!text.is_empty());
                match e {
                    tokio_uffd::Error::UnknownEvent { code, bytes } => {
                        assert_eq!((code, bytes), (m[0], m));
                        seen[2] += 1
                    }
                    tokio_uffd::Error::BadMessage { .. } => seen[3] += 1,
                    other => panic!("unexpected error {other:?}"),
                }
            }
        }
        n += 1;
    }
    // Edge values of every field.
    for code in 0u8..=255 {
        for fill in [0u8, 0xff, 0x80, 0x7f] {
            let mut m = [fill; 32];
            m[0] = code;
            let _ = decode_message(&m, true);
            let _ = decode_message(&m, false);
        }
    }
    assert!(
        seen.iter().all(|&c| c > 0),
        "every outcome reached: {seen:?}"
    );
    assert_eq!(count_fds(), fds, "decoding touched fds");
}

#[test]
fn a_buffer_of_arbitrary_messages_yields_one_item_each_and_leaks_no_fork_fd() {
    let _s = serial();
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let before = count_fds();
    let mut rng = Rng(0xfeed_face_cafe_beef);
    let deadline = Instant::now() + budget();
    let mut forks_taken = 0;
    let mut forks_dropped = 0;
    let mut rounds = 0;
    while Instant::now() < deadline || rounds < 2_000 {
        rounds += 1;
        let mut buf = EventBuffer::new(16);
        let count = 1 + (rng.next() % 16) as usize;
        for _ in 0..count {
            let mut m = rng.message();
            if m[0] == 0x13 {
                // A fork message must carry an fd the buffer may own: give
                // it a real one.
                let fd = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
                m[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
            }
            // SAFETY: a fork message carries a fresh fd we hand over.
            assert!(unsafe { buf.push_message(&m, &uffd) });
        }
        // Take some of the events (each message is exactly one item), drop
        // the rest with the buffer.
        let take = (rng.next() % (count as u64 + 1)) as usize;
        for _ in 0..take {
            match buf.next_event() {
                Some(Ok(Event::Fork(f))) => {
                    forks_taken += 1;
                    drop(f);
                }
                Some(_) => {}
                None => panic!("a message yielded no item"),
            }
        }
        assert_eq!(buf.len(), count - take);
        forks_dropped += buf.len();
        drop(buf);
    }
    assert!(forks_taken > 0 && forks_dropped > 0);
    assert_eq!(count_fds(), before, "a fork fd leaked");
}

#[test]
fn misuse_gives_errors_that_say_what_is_wrong() {
    let _s = serial();
    let Some(uffd) = uffd_with(Features::empty()) else {
        return;
    };
    let page = uffd.page_size();
    let mem = Mapping::anon(2 * page);
    // A register mode bit no kernel knows.
    let mode = RegisterMode::MISSING | RegisterMode::from_bits_retain(1 << 20);
    // SAFETY: refused by the kernel; nothing is registered.
    let err = unsafe { uffd.register(mem.addr, page, mode) }.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:?}");
    assert!(err.to_string().contains("UFFDIO_REGISTER"), "{err}");
    // MINOR on anonymous memory: the kernel refuses the mode for it.
    // SAFETY: as above.
    let err = unsafe { uffd.register(mem.addr, page, RegisterMode::MINOR) }.unwrap_err();
    assert!(err.to_string().contains("memory kind"), "{err}");
    // A range that is not mapped.
    let hole = Mapping::anon(page);
    let addr = hole.addr;
    drop(hole);
    // SAFETY: as above.
    let err = unsafe { uffd.register(addr, page, RegisterMode::MISSING) }.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::RangeGone),
        "{err:?}"
    );
    // Wake of an unregistered range is harmless; copy into it is not.
    let err = uffd
        .copy(mem.addr, &vec![0u8; page], tokio_uffd::CopyFlags::empty())
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!("{:#x}", mem.addr)),
        "{err}"
    );
    // Overflowing and unaligned ranges never reach the kernel.
    let err = uffd
        .zeropage(usize::MAX & !(page - 1), 2 * page, Default::default())
        .unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
    let err = uffd.wake(mem.addr + 1, page).unwrap_err();
    assert!(err.to_string().contains("page size"), "{err}");
}

/// The server under a flaky handler (the async layer).
#[cfg(feature = "async")]
mod server_under_load {
    use super::*;
    use std::sync::Arc;
    use std::thread;
    use tokio_uffd::{
        AsyncUffd, FailurePolicy, FaultHandler, FaultRequest, HandlerError, MemorySource, Region,
        Resolution, Server, SourceHandler, UffdBuilder,
    };

    /// Fails the first attempt at every third page, then serves the image.
    ///
    /// Keyed by address, not by a call counter: with a counter, jobs that retry
    /// in lockstep can land on the failing calls every time, run out of
    /// attempts and poison a page, which this test must not do.
    struct Flaky {
        failed: Mutex<std::collections::HashSet<usize>>,
        inner: SourceHandler<MemorySource>,
    }

    impl FaultHandler for Flaky {
        async fn fault<'a>(
            &'a self,
            req: &'a FaultRequest,
            buf: &'a mut [u8],
        ) -> Result<Resolution, HandlerError> {
            let first_try =
                (req.addr / req.page_size) % 3 == 0 && self.failed.lock().unwrap().insert(req.addr);
            if first_try {
                return Err("flaky source".into());
            }
            self.inner.fault(req, buf).await
        }
    }

    #[test]
    fn handler_failures_under_load_never_hang_a_thread() {
        let _s = serial();
        let Some(uffd) = try_uffd(UffdBuilder::new().want(Features::EVENT_REMOVE)) else {
            return;
        };
        let page = uffd.page_size();
        let pages = 512;
        let len = pages * page;
        let image: Vec<u8> = (0..len).map(|i| (i / page) as u8 ^ i as u8).collect();
        let mem = Mapping::anon(len);
        // SAFETY: fresh mapping served by the server below.
        unsafe { uffd.register(mem.addr, len, RegisterMode::MISSING) }.unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let handler = Flaky {
                failed: Mutex::default(),
                inner: SourceHandler::new(MemorySource::new(image.clone())),
            };
            let handle = Server::new(AsyncUffd::new(uffd).unwrap(), handler)
                .regions([Region::new(mem.addr..mem.addr + len)])
                .unwrap()
                .prefetch(4)
                .on_failure(FailurePolicy::Retry {
                    attempts: 5,
                    backoff: Duration::from_micros(100),
                })
                .spawn();
            let base = mem.addr;
            let image = Arc::new(image);
            let workers: Vec<_> = (0..6)
                .map(|t| {
                    let image = image.clone();
                    thread::spawn(move || {
                        for k in 0..pages {
                            let p = (k * 7 + t * 13) % pages;
                            let off = p * page + t;
                            assert_eq!(read_at(base + off), image[off]);
                        }
                    })
                })
                .collect();
            tokio::time::timeout(
                BOUND,
                tokio::task::spawn_blocking(move || {
                    workers.into_iter().for_each(|w| w.join().unwrap())
                }),
            )
            .await
            .expect("a faulting thread hung")
            .unwrap();
            let stats = handle.stats_ref();
            handle.shutdown().await.unwrap();
            let s = stats.snapshot();
            assert!(s.handler_failures > 0, "{s:?}");
            assert_eq!(s.poisoned, 0, "{s:?}");
        });
        assert!(mem
            .slice()
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i / page) as u8 ^ i as u8));
    }
}
