//! Lazy restore of a memory snapshot: the job tokio-uffd exists for.
//!
//! Maps fresh memory the size of a memory image, registers it with a
//! userfaultfd and lets worker threads use it at once, while a `Server`
//! fills each page on first touch from the image file (with fault-around).
//! Then every byte is checked against the file, and the figures printed.
//!
//! Without `--image`, a 256 MiB image with a verifiable pattern is made in
//! a temporary file first.
//!
//! ```text
//! cargo run --release --example snapshot_restore
//! cargo run --release --example snapshot_restore -- --image vm.mem --threads 8 --window 64 --pattern sequential
//! ```

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fill_image, print_stats, read_at, Flags, Mapping, Rng};
use tokio_uffd::{
    AsyncUffd, Features, FileSource, Region, RegisterMode, Server, SourceHandler, UffdBuilder,
};

const USAGE: &str = "usage: snapshot_restore [--image PATH] [--size MIB] [--threads N] [--window PAGES] [--pattern random|sequential] [--quiet]

  --image PATH    restore this file (default: make a --size MiB image with a known pattern)
  --size MIB      size of the generated image (default 256)
  --threads N     worker threads touching the memory (default 4)
  --window PAGES  fault-around window in pages (default 16; 1 turns it off)
  --pattern P     order in which workers touch pages: random (default) or sequential
  --quiet         no progress line";

fn main() -> ExitCode {
    let flags = Flags::parse(USAGE, &["quiet"]);
    flags.only(&["image", "size", "threads", "window", "pattern", "quiet"]);
    match run(&flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A temporary image file, removed on drop.
struct TempImage(std::path::PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn make_image(mib: usize) -> std::io::Result<TempImage> {
    let path = std::env::temp_dir().join(format!("tokio-uffd-snapshot-{}.img", std::process::id()));
    let image = TempImage(path);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&image.0)?);
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..mib {
        fill_image((i << 20) as u64, &mut chunk);
        f.write_all(&chunk)?;
    }
    f.flush()?;
    Ok(image)
}

fn run(flags: &Flags) -> Result<(), Box<dyn std::error::Error>> {
    let threads = flags.number("threads", 4);
    let window = flags.number("window", 16);
    let sequential = match flags.string("pattern").as_deref() {
        None | Some("random") => false,
        Some("sequential") => true,
        Some(other) => {
            return Err(format!("--pattern must be random or sequential, not {other:?}").into())
        }
    };
    let _temp;
    let path = match flags.string("image") {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let mib = flags.number("size", 256);
            eprintln!("making a {mib} MiB image with a known pattern...");
            _temp = make_image(mib)?;
            _temp.0.clone()
        }
    };
    let source =
        FileSource::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let file_len = source.len() as usize;
    if file_len == 0 {
        return Err(format!("{} is empty", path.display()).into());
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
        .regions([Region::new(mem.addr, len, page, 0)])
        .prefetch(window)
        .spawn();
    let stats = handle.stats_ref();

    println!(
        "restoring {} ({:.1} MiB, {pages} pages of {page} bytes): {threads} threads, {} order, window {window}",
        path.display(),
        len as f64 / (1 << 20) as f64,
        if sequential { "sequential" } else { "random" },
    );
    let start = Instant::now();
    let first_byte = Arc::new(AtomicU64::new(u64::MAX));
    let base = mem.addr;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let first_byte = first_byte.clone();
            std::thread::spawn(move || {
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
            })
        })
        .collect();

    // Progress, until the workers are done.
    let quiet = flags.switch("quiet");
    while !workers.iter().all(|w| w.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if !quiet {
            let s = stats.snapshot();
            eprint!(
                "\r  {:>6.1}% served ({} faults, {} prefetched)   ",
                s.pages_served as f64 * 100.0 / pages as f64,
                s.faults(),
                s.pages_prefetched
            );
        }
    }
    for w in workers {
        w.join().map_err(|_| "a worker thread panicked")?;
    }
    let elapsed = start.elapsed();
    if !quiet {
        eprintln!();
    }
    let snapshot = rt.block_on(async {
        let stats = handle.stats_ref();
        handle.shutdown().await.map(|_| stats.snapshot())
    })?;

    // Every byte against the file.
    let file = std::fs::File::open(&path)?;
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
    Ok(())
}
