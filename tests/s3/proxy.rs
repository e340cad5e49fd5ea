//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1, in front of the S3
//! server: the network faults of the object-store tests.
//!
//! One request per connection: the proxy reads a request, answers
//! `Connection: close`, and closes, so every request the client makes is
//! one connection here and no answer can be mistaken for another's. The
//! faults set with [`FaultProxy::inject`] apply to the next GET requests
//! (object reads) only; other requests (HEAD, PUT) pass through untouched.
//! Every read and write is bounded by `BOUND`, every loop by the bytes it
//! reads, and dropping the proxy stops it.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::common::{join_bounded, BOUND};

/// The most bytes of a request or response head the proxy reads.
const MAX_HEAD: usize = 64 << 10;

/// What the proxy does to a GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Waits this long before forwarding it (a slow server).
    Delay(Duration),
    /// Answers it itself with this status (500 or 503) and an S3 error
    /// body; the server never sees it.
    Status(u16),
    /// Forwards it, sends the answer's head (its `Content-Length`
    /// unchanged) and the first half of its body, then closes the
    /// connection: a connection dropped mid-body.
    Cut,
    /// Forwards it and sends the first half of the body as if it were all
    /// of it: `Content-Length` says half, `Content-Range` still names the
    /// whole range asked for, and the connection closes cleanly. A short
    /// body that no framing check catches.
    Short,
}

/// A GET the proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Get {
    /// Its `Range` header.
    pub range: Option<String>,
    /// The fault applied to it, if any.
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    /// GETs still to fault.
    left: usize,
    gets: Vec<Get>,
}

/// The proxy: its own thread and runtime (so it keeps answering whatever
/// the tested runtime does), stopped on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `upstream`,
    /// faulting nothing yet.
    pub fn start(upstream: SocketAddr) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel();
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            // Out of fds, say: not a reason to spin.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        };
                        let state = shared.clone();
                        tokio::spawn(async move {
                            // A client that went away is no failure of the
                            // proxy's; the test sees what its client saw.
                            let _ = serve(client, upstream, state).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection still open.
        });
        Self {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The URL to give the S3 client instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to the next `times` GETs (`usize::MAX`: to all),
    /// in place of any fault set before.
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut s = self.state.lock().unwrap();
        s.fault = Some(fault);
        s.left = times;
    }

    /// The GETs seen so far, in order.
    pub fn gets(&self) -> Vec<Get> {
        self.state.lock().unwrap().gets.clone()
    }

    /// How many of the GETs seen so far were faulted.
    pub fn faulted(&self) -> usize {
        self.gets().iter().filter(|g| g.fault.is_some()).count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            join_bounded("the fault proxy stopping", thread);
        }
    }
}

/// A request or response head: its first line and its headers.
struct Head {
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: &[u8]) -> io::Result<Self> {
        let text = std::str::from_utf8(raw).map_err(|_| bad("a head that is not UTF-8"))?;
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        let first = lines
            .next()
            .ok_or_else(|| bad("an empty head"))?
            .to_string();
        let headers = lines
            .map(|l| {
                let (k, v) = l
                    .split_once(':')
                    .ok_or_else(|| bad("a header without ':'"))?;
                Ok((k.trim().to_string(), v.trim().to_string()))
            })
            .collect::<io::Result<_>>()?;
        Ok(Self { first, headers })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Replaces header `name` (or adds it).
    fn set(&mut self, name: &str, value: String) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value));
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn content_length(&self) -> io::Result<usize> {
        match self.get("content-length") {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| bad("a bad Content-Length")),
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("fault proxy: {what}"))
}

/// Runs `f` for at most `BOUND`.
async fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(BOUND, f).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("fault proxy: {what} took over {BOUND:?}"),
        )
    })?
}

/// Reads a head (up to its blank line) and returns it with the bytes read
/// past it; `None` if the peer closed first.
async fn read_head(s: &mut TcpStream) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("a head over 64 KiB"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Serves one connection: one request, faulted or forwarded.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> io::Result<()> {
    let Some((raw, mut body)) = bounded("reading a request", read_head(&mut client)).await? else {
        return Ok(());
    };
    let mut head = Head::parse(&raw)?;
    let want = head.content_length()?;
    while body.len() < want {
        let mut chunk = vec![0u8; (want - body.len()).min(1 << 20)];
        let n = bounded("reading a request body", client.read(&mut chunk)).await?;
        if n == 0 {
            return Err(bad("the client closed mid-request"));
        }
        body.extend_from_slice(&chunk[..n]);
    }

    let fault = if head.first.starts_with("GET ") {
        let mut s = state.lock().unwrap();
        let fault = s.fault.filter(|_| s.left > 0);
        if fault.is_some() && s.left != usize::MAX {
            s.left -= 1;
        }
        let range = head.get("range").map(str::to_string);
        s.gets.push(Get { range, fault });
        fault
    } else {
        None
    };

    match fault {
        Some(Fault::Status(code)) => {
            let answer = status_answer(code);
            return bounded("answering", async {
                client.write_all(&answer).await?;
                client.shutdown().await
            })
            .await;
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        _ => {}
    }

    // Forward, one request on a connection of its own, and read the whole
    // answer (the server closes after it).
    head.set("connection", "close".into());
    let answer = bounded("forwarding to the server", async {
        let mut up = TcpStream::connect(upstream).await?;
        up.write_all(&head.encode()).await?;
        up.write_all(&body).await?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer).await?;
        Ok(answer)
    })
    .await?;

    let out = match fault {
        Some(f @ (Fault::Cut | Fault::Short)) => cut(&answer, f)?,
        _ => answer,
    };
    bounded("answering", async {
        client.write_all(&out).await?;
        client.shutdown().await
    })
    .await
}

/// The server's `answer` with half its body: `Content-Length` unchanged
/// (`Cut`, the client sees the connection close early) or halved
/// (`Short`). Answers other than 206 pass unchanged.
fn cut(answer: &[u8], fault: Fault) -> io::Result<Vec<u8>> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("an answer without a head"))?;
    let mut head = Head::parse(&answer[..end])?;
    let body = &answer[end + 4..];
    if !head.first.contains(" 206 ") {
        return Ok(answer.to_vec());
    }
    if head.content_length()? != body.len() || head.get("transfer-encoding").is_some() {
        return Err(bad("a 206 answer not framed by its Content-Length"));
    }
    let half = body.len() / 2;
    if fault == Fault::Short {
        head.set("content-length", half.to_string());
    }
    head.set("connection", "close".into());
    let mut out = head.encode();
    out.extend_from_slice(&body[..half]);
    Ok(out)
}

/// A complete answer with `code` and an S3 error body.
fn status_answer(code: u16) -> Vec<u8> {
    let (reason, s3_code) = match code {
        503 => ("Service Unavailable", "SlowDown"),
        _ => ("Internal Server Error", "InternalError"),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{s3_code}</Code>\
         <Message>injected by the tests' fault proxy</Message></Error>"
    );
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/xml\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
