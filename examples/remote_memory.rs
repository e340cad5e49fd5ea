//! Remote memory: pages served over TCP by a page server process to a
//! client whose memory is filled on demand.
//!
//! The example starts itself a second time as the page server (`--serve`),
//! which holds a memory image and answers `(offset, length)` requests on
//! 127.0.0.1. The client maps fresh memory, serves its faults through a
//! `PageSource` that fetches pages from the page server (the same trait
//! that files use), lets worker threads touch it in random order, and
//! checks every byte.
//!
//! ```text
//! cargo run --release --example remote_memory -- --size 64 --threads 4
//! ```

mod common;

use std::io::{BufRead, BufReader};
use std::process::{ExitCode, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use common::{fill_image, image_byte, print_stats, read_at, Flags, Mapping, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_uffd::{AsyncUffd, PageSource, Region, RegisterMode, Server, SourceHandler, UffdBuilder};

const USAGE: &str = "usage: remote_memory [--size MIB] [--threads N] [--window PAGES]

  --size MIB      size of the remote image (default 64)
  --threads N     worker threads touching the memory (default 4)
  --window PAGES  fault-around window in pages (default 16)";

fn main() -> ExitCode {
    let flags = Flags::parse(USAGE, &["serve"]);
    flags.only(&["size", "threads", "window", "serve"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let result = if flags.switch("serve") {
        rt.block_on(page_server(flags.number("size", 64) << 20))
    } else {
        client(&flags, &rt)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The page server: answers each 12-byte request (offset: u64, len: u32,
/// big-endian) with `len` bytes of the image at `offset`.
async fn page_server(size: usize) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("PORT {}", listener.local_addr()?.port());
    loop {
        let (mut conn, _) = listener.accept().await?;
        conn.set_nodelay(true)?;
        tokio::spawn(async move {
            let mut req = [0u8; 12];
            let mut buf = Vec::new();
            while conn.read_exact(&mut req).await.is_ok() {
                let offset = u64::from_be_bytes(req[..8].try_into().unwrap());
                let len = u32::from_be_bytes(req[8..].try_into().unwrap()) as usize;
                if offset as usize + len > size {
                    return; // a bad request: hang up
                }
                buf.resize(len, 0);
                fill_image(offset, &mut buf);
                if conn.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Pages fetched from the page server, over a pool of connections so that
/// many fetches are in flight at once.
struct TcpSource {
    addr: String,
    pool: Mutex<Vec<TcpStream>>,
}

impl PageSource for TcpSource {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let pooled = self.pool.lock().unwrap().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let c = TcpStream::connect(&self.addr).await?;
                c.set_nodelay(true)?;
                c
            }
        };
        let mut req = [0u8; 12];
        req[..8].copy_from_slice(&offset.to_be_bytes());
        req[8..].copy_from_slice(&(buf.len() as u32).to_be_bytes());
        conn.write_all(&req).await?;
        conn.read_exact(buf).await?;
        self.pool.lock().unwrap().push(conn);
        Ok(())
    }
}

fn client(flags: &Flags, rt: &tokio::runtime::Runtime) -> Result<(), Box<dyn std::error::Error>> {
    let mib = flags.number("size", 64);
    let threads = flags.number("threads", 4);
    let window = flags.number("window", 16);

    // Start the page server and learn its port.
    let mut server = std::process::Command::new(std::env::current_exe()?)
        .args(["--serve", "--size", &mib.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("piped")).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("PORT ")
        .ok_or_else(|| format!("the page server said {line:?}"))?;
    let result = restore(rt, format!("127.0.0.1:{port}"), mib << 20, threads, window);
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn restore(
    rt: &tokio::runtime::Runtime,
    addr: String,
    len: usize,
    threads: usize,
    window: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let uffd = UffdBuilder::new().create()?;
    let page = uffd.page_size();
    let pages = len / page;
    let mem = Mapping::anon(len)?;
    // SAFETY: a fresh mapping that nothing references; its pages are filled
    // only from the page server.
    unsafe { uffd.register(mem.addr, len, RegisterMode::MISSING)? };
    let _guard = rt.enter();
    let source = TcpSource {
        addr: addr.clone(),
        pool: Mutex::new(Vec::new()),
    };
    let handle = Server::new(AsyncUffd::new(uffd)?, SourceHandler::new(source))
        .regions([Region::new(mem.addr, len, page, 0)])
        .prefetch(window)
        .spawn();
    println!(
        "filling {} MiB on demand from the page server at {addr}, {threads} threads",
        len >> 20
    );
    let started = Instant::now();
    let base = mem.addr;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut mine: Vec<usize> = (t..pages).step_by(threads).collect();
                Rng::new(t as u64 + 3).shuffle(&mut mine);
                for p in mine {
                    read_at(base + p * page);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "a worker panicked")?;
    }
    let elapsed = started.elapsed();
    let stats = rt.block_on(async {
        let stats = handle.stats_ref();
        handle.shutdown().await.map(|_| stats.snapshot())
    })?;
    if let Some(i) = (0..len).find(|&i| mem.bytes()[i] != image_byte(i as u64)) {
        return Err(format!("wrong byte at address {:#x} (offset {i:#x})", mem.addr + i).into());
    }
    println!("every byte verified in {:.3} s", elapsed.as_secs_f64());
    print_stats(&stats, elapsed);
    Ok(())
}
