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
use std::time::{Duration, Instant};

/// How long the server may take to stop.
const STOP_BOUND: Duration = Duration::from_secs(10);

use clap::Parser;
use common::touch::{failure_report, Outcome, Touchers, Watched};
use common::{fill_image, image_byte, print_stats, read_at, LogArgs, Mapping, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_uffd::{AsyncUffd, PageSource, Region, RegisterMode, Server, SourceHandler, UffdBuilder};

/// Fills memory on demand from a page server over TCP and checks every
/// byte.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Size of the remote image in MiB
    #[arg(long, value_name = "MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_MIB))]
    size: u64,
    /// Worker threads touching the memory
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_THREADS))]
    threads: u64,
    /// Fault-around window in pages (1 turns it off)
    #[arg(long, value_name = "PAGES", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_WINDOW))]
    window: u64,
    /// Run as the page server (the example starts itself this way)
    #[arg(long, hide = true)]
    serve: bool,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing(args.log);
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Into::into)
        .and_then(|rt| {
            if args.serve {
                rt.block_on(page_server((args.size as usize) << 20))
            } else {
                client(&args, &rt)
            }
        });
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

fn client(args: &Args, rt: &tokio::runtime::Runtime) -> Result<(), Box<dyn std::error::Error>> {
    let mib = args.size as usize;
    let threads = args.threads as usize;
    let window = args.window as usize;

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
        .regions([Region::new(mem.addr..mem.addr + len)])?
        .prefetch(window)
        .spawn();
    let server = Watched::new(handle);
    let stats = server.stats.clone();
    println!(
        "filling {} MiB on demand from the page server at {addr}, {threads} threads",
        len >> 20
    );
    let started = Instant::now();
    let base = mem.addr;
    // A page the page server cannot send is poisoned by the server: the
    // worker's SIGBUS becomes a report (see common/touch.rs).
    let workers = Touchers::spawn(threads, move |t| {
        let mut mine: Vec<usize> = (t..pages).step_by(threads).collect();
        Rng::new(t as u64 + 3).shuffle(&mut mine);
        for p in mine {
            read_at(base + p * page);
        }
    })?;
    let outcome = workers.wait()?;
    let elapsed = started.elapsed();
    let exit = rt.block_on(server.shutdown(STOP_BOUND));
    if let Outcome::Sigbus(_) | Outcome::ServerEnded = outcome {
        let sigbus = match outcome {
            Outcome::Sigbus(addr) => Some(addr),
            _ => None,
        };
        // Workers may still sleep on (or be parked after touching) this
        // memory: leave it mapped until the process exits.
        std::mem::forget(mem);
        return Err(failure_report(sigbus, &exit, &stats).into());
    }
    exit?;
    let stats = stats.snapshot();
    if let Some(i) = (0..len).find(|&i| mem.bytes()[i] != image_byte(i as u64)) {
        return Err(format!("wrong byte at address {:#x} (offset {i:#x})", mem.addr + i).into());
    }
    println!("every byte verified in {:.3} s", elapsed.as_secs_f64());
    print_stats(&stats, elapsed);
    Ok(())
}
