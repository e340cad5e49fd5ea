//! A TCP relay on 127.0.0.1 that makes what a client sends arrive a fixed
//! time late: a link `delay` long one way, for the remote restore.
//!
//! It works on bytes, not on HTTP: each connection of a client gets one to
//! the server, and what the client sends is forwarded `delay` after it came
//! in (a thread reads and stamps, another waits for each stamp and writes),
//! while the answers flow back at once. So every request takes `delay`
//! longer however it is split into reads, requests on one connection keep
//! their order and spacing, and a client keeps its connections open across
//! requests (HTTP keep-alive), as it would with a real object store (and
//! acknowledges what it receives at once: see [`quick_ack`]). Its threads
//! sleep with a timer slack of 1 ns, so the delay is the one asked
//! for to within some microseconds (Tokio's timer, which rounds up to the
//! next millisecond, would make 1 ms anything up to 2 or 3).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The relay; dropping it stops accepting (connections still open end
/// when either side closes).
pub struct DelayProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// A relay on a free port of 127.0.0.1 to `upstream`, delaying what
    /// clients send by `delay`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                relay(client, server, delay);
            }
        });
        DelayProxy {
            addr,
            stop,
            accept: Some(accept),
        }
    }

    /// The URL to give the client instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Relays one connection: client to server `delay` late, server to client
/// at once, each direction closed when its sender closes.
fn relay(client: TcpStream, server: TcpStream, delay: Duration) {
    for s in [&client, &server] {
        // Each write goes out as it is: no segment held for an ACK.
        let _ = s.set_nodelay(true);
    }
    let (Ok(mut from_client), Ok(mut to_client), Ok(mut to_server)) =
        (client.try_clone(), client.try_clone(), server.try_clone())
    else {
        return;
    };
    let mut from_server = server;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from_client.read(&mut buf) {
            quick_ack(&from_client);
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        precise_sleeps();
        for (at, bytes) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if to_server.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to_server.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n @ 1..) = from_server.read(&mut buf) {
            quick_ack(&from_server);
            if to_client.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to_client.shutdown(Shutdown::Write);
    });
}

/// Acknowledges what `s` received at once, not up to 40 ms later.
///
/// On a connection kept open, a sender that holds back a short segment
/// until its last one is acknowledged (Nagle's algorithm, which s3s-fs
/// leaves on) and a receiver that delays its acknowledgements wait for
/// each other: an answer sent in two writes (head, then body) then takes
/// tens of milliseconds. The kernel clears the flag as it sees fit, so it
/// is set again after every read.
fn quick_ack(s: &TcpStream) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with an int option.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// A timer slack of 1 ns for the calling thread: its sleeps end when asked
/// (the default slack lets the kernel end them up to 50 us late).
fn precise_sleeps() {
    // SAFETY: prctl on the calling thread, with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}
