//! Lazy restore of a memory snapshot: the job tokio-uffd exists for.
//!
//! Maps fresh memory the size of a memory image, registers it with a
//! userfaultfd and lets worker threads use it at once, while a `Server`
//! fills each page on first touch from the image file (with fault-around).
//! Then every byte is checked against the file, and the figures printed.
//! The time reported is from the first touch until the last worker is done.
//!
//! Without `--image`, an image of `--size` MiB with a verifiable pattern is
//! made first in a temporary file that is unlinked as soon as it is
//! created: nothing is left behind, however the run ends.
//!
//! If the server cannot serve a page (an unreadable image), the worker that
//! touched it gets `SIGBUS` (the server's default policy): the example
//! reports the address, the server's failure (source offset and cause) and
//! exits with status 1 (see `common/touch.rs`).
//!
//! ```text
//! cargo run --release --example snapshot_restore
//! cargo run --release --example snapshot_restore -- --image vm.mem --threads 8 --window 64 --pattern sequential
//! ```

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use common::touch::{failure_report, Outcome, Touchers, Watched};
use common::{fill_image, print_stats, read_at, LogArgs, Mapping, Rng};
use tokio_uffd::{
    AsyncUffd, Features, FileSource, Region, RegisterMode, Server, SourceHandler, UffdBuilder,
};

/// How long the server may take to stop.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// Restores a memory image lazily through userfaultfd, checks every byte
/// and prints the figures.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Restore this file (default: make a --size MiB image with a known pattern)
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Size of the generated image in MiB
    #[arg(long, value_name = "MIB", default_value_t = 256,
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
    /// Order in which workers touch pages
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
    /// No progress line
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// Each worker shuffles its pages
    Random,
    /// Each worker walks its pages in address order
    Sequential,
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing(args.log);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Makes a `mib` MiB image in a file that is unlinked right after it is
/// created, so that no exit path (an error, a panic, `SIGKILL`) leaves it
/// behind; the open `File` is the only way to it.
fn make_image(mib: u64) -> std::io::Result<File> {
    let path = std::env::temp_dir().join(format!("tokio-uffd-snapshot-{}.img", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
    std::fs::remove_file(&path)?;
    let mut w = std::io::BufWriter::new(&file);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..mib {
        fill_image(i << 20, &mut chunk);
        w.write_all(&chunk)?;
    }
    w.flush()?;
    drop(w);
    Ok(file)
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let threads = args.threads as usize;
    let window = args.window as usize;
    let sequential = args.pattern == Pattern::Sequential;
    let (source, file, name) = match &args.image {
        Some(p) => {
            let cannot = |e| format!("cannot open {}: {e}", p.display());
            // FileSource::open refuses what is not a regular file (without
            // blocking on a FIFO); a second handle is for the final check.
            let source = FileSource::open(p).map_err(cannot)?;
            let file = File::open(p).map_err(cannot)?;
            (source, file, p.display().to_string())
        }
        None => {
            eprintln!("making a {} MiB image with a known pattern...", args.size);
            let file = make_image(args.size)?;
            let source = FileSource::new(file.try_clone()?)?;
            (source, file, "a temporary image".to_string())
        }
    };
    let file_len = source.len() as usize;
    if file_len == 0 {
        return Err(format!("{name} is empty").into());
    }

    let uffd = UffdBuilder::new()
        .want(Features::EVENT_REMOVE | Features::THREAD_ID)
        .create()?;
    let page = uffd.page_size();
    let len = file_len.div_ceil(page) * page;
    let pages = len / page;
    let mem = Mapping::anon(len)?;
    // SAFETY: a fresh mapping that nothing references; its pages are filled
    // only by the server from the image.
    unsafe { uffd.register(mem.addr, len, RegisterMode::MISSING)? };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let handle = Server::new(AsyncUffd::new(uffd)?, SourceHandler::new(source))
        .regions([Region::new(mem.addr..mem.addr + len)])?
        .prefetch(window)
        .spawn();
    let server = Watched::new(handle);
    let stats = server.stats.clone();

    println!(
        "restoring {name} ({:.1} MiB, {pages} pages of {page} bytes): {threads} threads, {} order, window {window}",
        len as f64 / (1 << 20) as f64,
        if sequential { "sequential" } else { "random" },
    );
    let start = Instant::now();
    let first_byte = Arc::new(AtomicU64::new(u64::MAX));
    let base = mem.addr;
    let workers = {
        let first_byte = first_byte.clone();
        Touchers::spawn(threads, move |t| {
            // Each worker owns every `threads`-th page.
            let mut mine: Vec<usize> = (t..pages).step_by(threads).collect();
            if !sequential {
                Rng::new(t as u64 + 1).shuffle(&mut mine);
            }
            let mut sum = 0u64;
            for (i, p) in mine.into_iter().enumerate() {
                sum += read_at(base + p * page) as u64;
                if i == 0 {
                    first_byte.fetch_min(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
            }
            sum
        })?
    };

    // Progress from a thread of its own: the measured interval ends when
    // the last worker does, not at a progress tick.
    let (stop_progress, ticks) = mpsc::channel::<()>();
    let progress = (!args.quiet).then(|| {
        let stats = stats.clone();
        std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                ticks.recv_timeout(Duration::from_millis(200))
            {
                let s = stats.snapshot();
                eprint!(
                    "\r  {:>6.1}% served ({} faults, {} prefetched)   ",
                    s.pages_served as f64 * 100.0 / pages as f64,
                    s.faults(),
                    s.pages_prefetched
                );
            }
        })
    });
    let outcome = workers.wait()?;
    let elapsed = start.elapsed();
    drop(stop_progress);
    if let Some(p) = progress {
        let _ = p.join();
        eprintln!();
    }

    let exit = rt.block_on(server.shutdown(STOP_BOUND));
    if let Outcome::Sigbus(_) | Outcome::ServerEnded = outcome {
        let sigbus = match outcome {
            Outcome::Sigbus(addr) => Some(addr),
            _ => None,
        };
        // Workers may still sleep on (or be parked after touching) this
        // memory: leave it mapped until the process exits.
        std::mem::forget(mem);
        return Err(format!(
            "restoring {name} failed after {:.3} s\n{}",
            elapsed.as_secs_f64(),
            failure_report(sigbus, &exit, &stats)
        )
        .into());
    }
    exit?;
    let snapshot = stats.snapshot();

    // Every byte against the file.
    let mut chunk = vec![0u8; 1 << 20];
    let restored = mem.bytes();
    let mut offset = 0;
    while offset < file_len {
        let n = chunk.len().min(file_len - offset);
        file.read_exact_at(&mut chunk[..n], offset as u64)?;
        if let Some(i) = (0..n).find(|&i| restored[offset + i] != chunk[i]) {
            return Err(format!(
                "wrong byte at address {:#x} (image offset {:#x}): {:#04x}, the image has {:#04x}",
                mem.addr + offset + i,
                offset + i,
                restored[offset + i],
                chunk[i]
            )
            .into());
        }
        offset += n;
    }
    // Past the end of a file that is not page-sized, the image reads zero.
    if restored[file_len..].iter().any(|&b| b != 0) {
        return Err("bytes past the end of the image are not zero".into());
    }

    let ttfb = Duration::from_nanos(first_byte.load(Ordering::Relaxed));
    println!(
        "restored and verified every byte in {:.3} s; time to first byte {}",
        elapsed.as_secs_f64(),
        common::micros(ttfb)
    );
    print_stats(&snapshot, elapsed);
    let failures = common::failures(&stats);
    if !failures.is_empty() {
        // Only prefetches can have failed here (their pages were served
        // when touched); say so all the same.
        println!("  {failures}");
    }
    Ok(())
}
