//! Serves every page of a fresh memory region from an async handler.
//!
//! Maps `--mib` MiB (default 64) of anonymous memory, registers it with a
//! userfaultfd, and lets `--threads` plain threads (default 2) touch every
//! page while a current-thread Tokio runtime reads the faults from an
//! `EventStream` and fills each page with a pattern through `UFFDIO_COPY`.
//! Then every byte is checked and the figures printed.
//!
//! ```text
//! cargo run --release --example serve_faults -- --mib 256 --threads 4
//! ```

mod common;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use common::LogArgs;
use futures::StreamExt;
use tokio_uffd::{AsyncUffd, CopyFlags, ErrorKind, Event, RegisterMode, Uffd};

fn byte_at(offset: usize) -> u8 {
    (offset as u8) ^ ((offset >> 12) as u8).wrapping_mul(7)
}

/// Serves every page of fresh memory from an async handler reading the
/// userfaultfd's event stream, and checks every byte.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Size of the memory in MiB
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_MIB))]
    mib: u64,
    /// Threads touching the memory
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_THREADS))]
    threads: u64,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing(args.log);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let uffd = Uffd::new()?;
    let page = uffd.page_size();
    let threads = args.threads as usize;
    let len = (args.mib as usize) << 20;
    let pages = len / page;
    // SAFETY: a fresh anonymous mapping that nothing else uses.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    let base = mem as usize;
    // SAFETY: the mapping is ours, no reference into it exists, and its pages
    // are filled only by the handler below.
    unsafe { uffd.register(base, len, RegisterMode::MISSING)? };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let started = Instant::now();
    // Touchers: plain threads, never the runtime that serves the faults.
    let touchers = (0..threads)
        .map(|t| {
            std::thread::Builder::new().spawn(move || {
                let mut sum = 0u64;
                for p in (t..pages).step_by(threads) {
                    // SAFETY: inside the registered mapping; the handler
                    // fills the page before the read completes.
                    sum +=
                        unsafe { std::ptr::read_volatile((base + p * page) as *const u8) } as u64;
                }
                sum
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;

    let faults = rt.block_on(async {
        let uffd = AsyncUffd::new(uffd)?;
        let mut events = uffd.event_stream()?;
        let mut buf = vec![0u8; page];
        let mut served = 0usize;
        let mut faults = 0usize;
        while served < pages {
            let Event::PageFault(fault) = events.next().await.expect("stream never ends")? else {
                continue;
            };
            faults += 1;
            let start = fault.page_start(page);
            let offset = start - base;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = byte_at(offset + i);
            }
            match uffd.copy(start, &buf, CopyFlags::empty()) {
                Ok(_) => served += 1,
                // Two threads faulted on the same page: already served.
                Err(e) if e.kind() == ErrorKind::Exists => uffd.wake(start, page)?,
                Err(e) => return Err(e),
            }
        }
        Ok::<_, tokio_uffd::Error>(faults)
    })?;
    for t in touchers {
        t.join().expect("toucher panicked");
    }
    let elapsed = started.elapsed();

    // SAFETY: every page is now resolved; the slice covers the mapping.
    let all = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
    if let Some(bad) = (0..len).find(|&i| all[i] != byte_at(i)) {
        return Err(format!("wrong byte at {:#x}: {:#04x}", base + bad, all[bad]).into());
    }
    let secs = elapsed.as_secs_f64();
    println!(
        "served {pages} pages ({} MiB, page size {page}) to {} threads: {faults} faults in {:.3} s, \
         {:.0} faults/s, {:.1} MiB/s, {:.1} us/fault; every byte verified",
        args.mib,
        args.threads,
        secs,
        faults as f64 / secs,
        args.mib as f64 / secs,
        secs * 1e6 / faults as f64,
    );
    // SAFETY: unmapping our own mapping (the uffd was closed with the runtime's task).
    unsafe { libc::munmap(mem, len) };
    Ok(())
}
