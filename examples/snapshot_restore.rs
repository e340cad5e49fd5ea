//! Lazy restore of a memory snapshot: the job tokio-uffd exists for.
//!
//! Maps fresh memory the size of a memory image, registers it with a
//! userfaultfd and lets worker threads use it at once, while a `Server`
//! fills each page on first touch from the image file (with fault-around).
//! The workers behave like a restored program (`common/workload.rs`): they
//! touch a stable working set, about 20% of the image in clusters of
//! various lengths (like kernel text, heaps and stacks), in a mostly
//! repeatable order with a little per-run jitter, and compute for a while
//! after each touch. The figures that matter are the program's: *time to
//! ready* (from just before the server starts to the last worker done) and
//! the faults it took to get there.
//!
//! Run with no mode flag, it restores the image twice and compares:
//!
//! 1. *cold*, recording the working set (`Server::record`);
//! 2. *warm* from that recording (`Server::warm`: a background prefetch
//!    of the recorded pages, in recorded order, while faults are served),
//!    as the next run of the program (run number + 1: its jitter differs);
//! 3. the *reference*: the same workload, same run, on a private writable
//!    mapping of the image file (`MAP_PRIVATE`, page cache warm), where
//!    the kernel maps the pages itself.
//!
//! and prints them side by side: time to ready, faults, pages served by
//! then, pages the warm prefetch copied, pages served that the workers
//! never touched (wasted), and the ratio to the reference.
//!
//! One restore at a time instead: `--cold`, `--record FILE` (cold, saves
//! the working set), `--warm FILE` (prefetches a saved one; a set recorded
//! for another image size is refused with exit status 1), `--eager`
//! (copies every page first, then runs the workload: the baseline a lazy
//! restore must beat), and `--fill` (fills every page in the background
//! after the warm prefetch, if any, and prints when all were resident).
//!
//! After each restore every byte is checked against the file, outside the
//! timed interval (the pages the workers did not touch are faulted in then).
//!
//! Without `--image`, an image of `--size` MiB with a verifiable pattern is
//! made first in a temporary file that is unlinked as soon as it is
//! created: nothing is left behind, however the run ends. The image is
//! served from a read-only mapping of the file (`MmapSource`), or with
//! `pread(2)` (`FileSource`) when the file cannot be mapped.
//!
//! If the server cannot serve a page (an unreadable image), the worker that
//! touched it gets `SIGBUS` (the server's default policy): the example
//! reports the address, the server's failure (source offset and cause) and
//! exits with status 1 (see `common/touch.rs`).
//!
//! # An image in object storage
//!
//! Built with the `object-store` feature, `--image s3://BUCKET/KEY` restores
//! an S3 object through `ObjectStoreSource`: ranged GETs of `--chunk` KiB
//! (default 2 MiB), one per chunk however many faults wait on it, kept in a
//! cache of `--cache` MiB. Credentials and region come from the usual
//! environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_REGION`, `AWS_ENDPOINT`, ...); `--endpoint http://HOST:PORT` names
//! an S3-compatible server (path-style requests, plain HTTP allowed). See
//! `common/object.rs`. Each restore reads through a source of its own (an
//! empty cache, as a new process would have), and the figures of each
//! include the source's: GETs, bytes fetched, cache hits, time waited on
//! the network. The warm prefetch and the fill keep 8 copies in flight, a
//! source chunk each, unless `--background-concurrency` and
//! `--background-chunk` say otherwise: a copy waits a network round trip,
//! so more of them in flight hide it, and a copy of one chunk is one GET.
//! The check after each restore compares with a local copy of the object,
//! downloaded once with a plain GET (not through the source it checks)
//! after the first restore, outside any timed interval; the reference
//! (the private file mapping) maps that copy. Without the feature an
//! object URL is refused with a message saying to rebuild with it.
//!
//! ```text
//! cargo run --release --example snapshot_restore
//! cargo run --release --example snapshot_restore -- --image vm.mem --record vm.ws
//! cargo run --release --example snapshot_restore -- --image vm.mem --warm vm.ws --fill
//! cargo run --release --example snapshot_restore -- --pattern all-random --cold
//! AWS_ACCESS_KEY_ID=K AWS_SECRET_ACCESS_KEY=S cargo run --release --features object-store \
//!     --example snapshot_restore -- --image s3://snapshots/vm.mem --endpoint http://127.0.0.1:9000
//! ```

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use common::object::{FetchStats, Image, ObjectArgs, Probe, Remote, REMOTE_BACKGROUND_CONCURRENCY};
use common::touch::{failure_report, Outcome, Touchers, Watched};
use common::workload::{self, Access, Order, Plan, Spinner, Workload};
use common::{fill_image, print_stats, LogArgs, Mapping};
use tokio_uffd::{
    error_chain, AsyncUffd, BoxedSource, Features, FileSource, Fill, MmapSource, RecordedRegion,
    Region, RegisterMode, Server, SourceHandler, Stats, StatsSnapshot, UffdBuilder, WorkingSet,
};

/// How long the server may take to stop, and a restore to become
/// resident (plus the time a bounded fill needs).
const BOUND: Duration = Duration::from_secs(60);

/// Restores a memory image lazily through userfaultfd, with a workload
/// that behaves like a restored program; checks every byte and prints the
/// figures. Without a mode flag: a cold restore (recording the working
/// set), a warm one from that recording, and the same workload on a
/// private mapping of the file, side by side.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Restore this file, or this object (s3://BUCKET/KEY, with the
    /// object-store feature: see the options below) (default: make a
    /// --size MiB image with a known pattern). It must not change while it
    /// is restored
    #[arg(long, value_name = "PATH|URL")]
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
    /// What the workers touch
    #[arg(long, value_enum, default_value_t = Pattern::Workload)]
    pattern: Pattern,
    /// Size of the workload's stable working set, in percent of the image
    #[arg(long, value_name = "PERCENT", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=100))]
    working_set: u64,
    /// Work (a calibrated busy loop) after each touch, in nanoseconds
    #[arg(long, value_name = "NANOS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    think: u64,
    /// Seeds the workload's working set (the same set for the same seed)
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Run number: seeds the per-run jitter of the touch order and the
    /// extra pages [default: 0; 1 with --warm, the run after the recorded
    /// one; the comparison's warm restore and reference use run + 1]
    #[arg(long, value_name = "N")]
    run: Option<u64>,
    /// Touches write a word (the value just read: the contents stay the
    /// image's) instead of reading it
    #[arg(long)]
    write: bool,
    /// One cold restore (no recording, no comparison)
    #[arg(long, conflicts_with_all = ["record", "warm", "eager"])]
    cold: bool,
    /// One cold restore, saving its working set to FILE
    #[arg(long, value_name = "FILE", conflicts_with_all = ["warm", "eager"])]
    record: Option<PathBuf>,
    /// One warm restore, prefetching the working set saved in FILE by
    /// --record (one recorded for an image of another size is refused)
    #[arg(long, value_name = "FILE", conflicts_with = "eager")]
    warm: Option<PathBuf>,
    /// One eager restore: every page copied before the workload starts
    /// (the baseline of a lazy restore)
    #[arg(long, conflicts_with = "fill")]
    eager: bool,
    /// Fill every page in the background (after the warm prefetch, if
    /// any) and print when all were resident; alone, with a cold restore
    #[arg(long)]
    fill: bool,
    /// Rate of the background fill in MiB/s [default: unbounded]
    #[arg(long, value_name = "MIBPS", requires = "fill",
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    fill_rate: Option<u64>,
    /// Largest copy of the warm prefetch and the fill, in KiB
    /// [default: the crate's, 1024]
    #[arg(long, value_name = "KIB",
          value_parser = clap::value_parser!(u64).range(4..=1 << 20))]
    background_chunk: Option<u64>,
    /// Warm-prefetch and fill copies in flight at once [default: the
    /// crate's, 2]
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=64))]
    background_concurrency: Option<u64>,
    /// No progress line
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    object: ObjectArgs,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// A stable working set, like a restored program (--working-set,
    /// --seed, --run)
    Workload,
    /// Every page, each worker its share in shuffled order
    #[value(alias = "random")]
    AllRandom,
    /// Every page, each worker its share in address order
    #[value(alias = "sequential")]
    AllSequential,
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

type BoxError = Box<dyn std::error::Error>;

/// A new file in the temporary directory, unlinked right after it is
/// created, so that no exit path (an error, a panic, `SIGKILL`) leaves it
/// behind; the open `File` is the only way to it.
fn unlinked_file(what: &str) -> std::io::Result<File> {
    let path =
        std::env::temp_dir().join(format!("tokio-uffd-snapshot-{}.{what}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// Makes a `mib` MiB image in an [`unlinked_file`].
fn make_image(mib: u64) -> std::io::Result<File> {
    let file = unlinked_file("img")?;
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

/// The image, its page source and what every restore shares.
struct Ctx<'a> {
    args: &'a Args,
    rt: tokio::runtime::Runtime,
    source: ImageSource,
    /// The image's bytes, for the final check and the reference mapping:
    /// the file itself or, for an object, a local copy downloaded after the
    /// first restore.
    file: std::cell::OnceCell<File>,
    file_len: usize,
    name: String,
    page: usize,
    /// The restored memory's length: the file's, in whole pages.
    len: usize,
    spinner: Spinner,
    access: Access,
}

/// Where the pages of every restore come from.
enum ImageSource {
    /// A file's source, shared by the restores.
    Local(Arc<BoxedSource>),
    /// An object: each restore reads it through a source of its own.
    Remote(Remote),
}

impl Ctx<'_> {
    /// The page source of one restore, and, for an object, what tells its
    /// statistics.
    fn source(&self) -> Result<(Arc<BoxedSource>, Option<Probe>), BoxError> {
        match &self.source {
            ImageSource::Local(source) => Ok((source.clone(), None)),
            ImageSource::Remote(remote) => {
                let (source, probe) = self.rt.block_on(remote.source())?;
                Ok((Arc::new(source), Some(probe)))
            }
        }
    }

    /// The image's bytes in a local file: an object's downloaded the first
    /// time they are needed.
    fn file(&self) -> Result<&File, BoxError> {
        if let Some(file) = self.file.get() {
            return Ok(file);
        }
        let ImageSource::Remote(remote) = &self.source else {
            unreachable!("a local image's file is opened with it");
        };
        let mut file = unlinked_file("copy")?;
        let took = self.rt.block_on(remote.download(&mut file))?;
        eprintln!(
            "downloaded a copy of {} for the check ({:.1} MiB in {:.3} s, one GET)",
            remote.name(),
            remote.len() as f64 / (1 << 20) as f64,
            took.as_secs_f64()
        );
        Ok(self.file.get_or_init(|| file))
    }
}

/// Opens (or makes) the image: a file mapped read-only if it can be, read
/// with `pread(2)` otherwise; an object through the object store.
fn open_image(
    args: &Args,
    rt: &tokio::runtime::Runtime,
) -> Result<(ImageSource, Option<File>, u64, String), BoxError> {
    let image = match &args.image {
        Some(p) => Some(Image::parse(p)?),
        None => None,
    };
    if let Some(Image::File(p)) = &image {
        args.object.only_for_objects(p)?;
    }
    match image {
        Some(Image::Object(url)) => {
            let remote = rt.block_on(Remote::open(&url, &args.object))?;
            let (len, name) = (remote.len(), remote.name());
            Ok((ImageSource::Remote(remote), None, len, name))
        }
        Some(Image::File(p)) => {
            let p = &p;
            let cannot = |e| format!("cannot open {}: {e}", p.display());
            // SAFETY: the user promises (--help says so) that the image does
            // not change while it is restored.
            let (source, len) = match unsafe { MmapSource::open(p) } {
                Ok(s) => {
                    let len = s.len();
                    (BoxedSource::new(s), len)
                }
                // A file that cannot be mapped (procfs, sysfs) may still be
                // read; FileSource also refuses what is not a regular file
                // (without blocking on a FIFO).
                Err(map_err) => {
                    let s = FileSource::open(p).map_err(cannot)?;
                    eprintln!(
                        "cannot map {} ({map_err}): reading it with pread(2) instead",
                        p.display()
                    );
                    let len = s.len();
                    (BoxedSource::new(s), len)
                }
            };
            // A second handle, for the final check.
            let file = File::open(p).map_err(cannot)?;
            Ok((
                ImageSource::Local(Arc::new(source)),
                Some(file),
                len,
                p.display().to_string(),
            ))
        }
        None => {
            args.object
                .only_for_objects(Path::new("the generated image"))?;
            eprintln!("making a {} MiB image with a known pattern...", args.size);
            let file = make_image(args.size)?;
            // SAFETY: the file was unlinked at once: only this process can
            // reach it, and nothing writes or truncates it from now on.
            let source = unsafe { MmapSource::new(file.try_clone()?)? };
            let len = source.len();
            Ok((
                ImageSource::Local(Arc::new(BoxedSource::new(source))),
                Some(file),
                len,
                "a temporary image".to_string(),
            ))
        }
    }
}

/// The base page size.
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

fn run(args: &Args) -> Result<(), BoxError> {
    let threads = args.threads as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (source, file, file_len, name) = open_image(args, &rt)?;
    if file_len == 0 {
        return Err(format!("{name} is empty").into());
    }
    let file_len = usize::try_from(file_len)?;
    let page = page_size();
    let len = file_len.div_ceil(page) * page;
    let pages = len / page;
    let ctx = Ctx {
        args,
        rt,
        source,
        file: file.map(std::cell::OnceCell::from).unwrap_or_default(),
        file_len,
        name,
        page,
        len,
        spinner: Spinner::calibrate(),
        access: if args.write {
            Access::Write
        } else {
            Access::Read
        },
    };
    println!(
        "restoring {} ({:.1} MiB, {pages} pages of {page} bytes), fault-around window {}",
        ctx.name,
        len as f64 / (1 << 20) as f64,
        args.window
    );
    let workload = Workload {
        fraction: args.working_set as f64 / 100.0,
        seed: args.seed,
        threads,
        think: Duration::from_nanos(args.think),
        access: ctx.access,
        ..Workload::new(pages)
    };
    let plan_for = |run: u64| match args.pattern {
        Pattern::Workload => Workload {
            run,
            ..workload.clone()
        }
        .plan(),
        Pattern::AllRandom => Plan::every_page(pages, threads, Order::Random, args.seed),
        Pattern::AllSequential => Plan::every_page(pages, threads, Order::Sequential, args.seed),
    };
    let describe = |run: u64, plan: &Plan| {
        let what = match args.pattern {
            Pattern::Workload => format!(
                "a working set of {}% ({} pages in {} clusters, seed {}; run {run}: {} touches)",
                args.working_set,
                workload.set_pages(),
                workload.clusters().len(),
                args.seed,
                plan.touches()
            ),
            Pattern::AllRandom => "every page, in shuffled order".to_string(),
            Pattern::AllSequential => "every page, in address order".to_string(),
        };
        println!(
            "workload: {threads} threads touch {what}, {} a word, {} of work per touch",
            match ctx.access {
                Access::Read => "reading",
                Access::Write => "writing",
            },
            common::micros(Duration::from_nanos(args.think))
        );
    };
    let fill = args.fill.then_some(match args.fill_rate {
        Some(mibps) => Fill::BytesPerSecond(mibps << 20),
        None => Fill::Unbounded,
    });

    let single = args.cold || args.record.is_some() || args.warm.is_some() || args.eager;
    if !single && !args.fill {
        return compare(&ctx, args.run.unwrap_or(0), &plan_for, &describe);
    }
    let run = args.run.unwrap_or(if args.warm.is_some() { 1 } else { 0 });
    // Read the working set before anything is timed.
    let warm = match &args.warm {
        Some(path) => Some(WorkingSet::load(path).map_err(|e| {
            format!(
                "cannot use the working set {}: {}",
                path.display(),
                error_chain(&e)
            )
        })?),
        None => None,
    };
    let plan = plan_for(run);
    describe(run, &plan);
    let kind = if args.eager {
        "eager"
    } else if warm.is_some() {
        "warm"
    } else {
        "cold"
    };
    let opts = Opts {
        record: args.record.is_some(),
        warm,
        fill: if args.eager {
            Some(Fill::Unbounded)
        } else {
            fill
        },
        eager: args.eager,
    };
    let warm_path = args.warm.as_deref();
    let r = restore(&ctx, &plan, opts, warm_path)?;
    println!(
        "{kind} restore: ready in {:.3} s (time to first byte {}); verified every byte",
        r.ready.as_secs_f64(),
        r.first_touch.map_or("-".into(), common::micros),
    );
    if let Some(eager) = r.eager {
        println!(
            "  eager: every page resident after {:.3} s, then the workload took {:.3} s",
            eager.as_secs_f64(),
            (r.ready - eager).as_secs_f64()
        );
    }
    println!("  at ready:");
    print_stats(&r.at_ready, r.ready);
    if let Some(f) = &r.fetched {
        println!("  object store: {f}");
    }
    if let Some(plan_set) = &r.warm {
        println!(
            "  warm: {} pages in the working set, {} prefetched, {} faults ahead of the prefetch, {} prefetch failures; {} of the set's pages never touched (wasted)",
            r.at_ready.working_set_pages,
            r.at_ready.pages_warmed,
            r.at_ready.faults_ahead_of_prefetch,
            r.at_ready.background_failures,
            plan_set.pages_not_in(&touched_set(plan_set.regions(), &plan))
        );
    }
    if let Some(recorded) = &r.recorded {
        let path = args.record.as_deref().expect("recording with --record");
        recorded.save(path).map_err(|e| error_chain(&e))?;
        println!(
            "  working set: {} pages in {} runs saved to {} ({} of them served around faults but never touched)",
            recorded.pages(),
            recorded.runs().len(),
            path.display(),
            recorded.pages_not_in(&touched_set(recorded.regions(), &plan))
        );
    }
    if r.eager.is_none() {
        if let Some(after) = r.resident {
            println!(
                "  fill: {} pages filled; every page resident {:.3} s after the server started",
                r.last.pages_filled,
                after.as_secs_f64()
            );
        }
    }
    let failures = common::failures(&r.stats);
    if !failures.is_empty() {
        // Only prefetches can have failed here (their pages were served
        // when touched); say so all the same.
        println!("  {failures}");
    }
    Ok(())
}

/// The default run: cold (recording), warm from that recording, and the
/// reference, side by side.
fn compare(
    ctx: &Ctx<'_>,
    run: u64,
    plan_for: &dyn Fn(u64) -> Plan,
    describe: &dyn Fn(u64, &Plan),
) -> Result<(), BoxError> {
    let cold_plan = plan_for(run);
    let warm_plan = plan_for(run + 1);
    describe(run, &cold_plan);

    println!("1. cold restore, recording the working set (run {run})...");
    let cold = restore(
        ctx,
        &cold_plan,
        Opts {
            record: true,
            ..Opts::default()
        },
        None,
    )?;
    let recorded = cold.recorded.clone().expect("recorded");
    println!(
        "   ready in {:.3} s, {} faults; {} pages recorded in {} runs; verified every byte",
        cold.ready.as_secs_f64(),
        cold.at_ready.faults_missing,
        recorded.pages(),
        recorded.runs().len()
    );
    if let Some(f) = &cold.fetched {
        println!("   object store by ready: {f}");
    }
    // Saved and read back as `--record` and `--warm` do, in a file of its
    // own that is removed whatever happens next.
    let ws_file = TempFile::new("ws");
    recorded.save(&ws_file.0).map_err(|e| error_chain(&e))?;
    let loaded = WorkingSet::load(&ws_file.0).map_err(|e| error_chain(&e))?;
    drop(ws_file);

    println!(
        "2. warm restore from that working set (run {}: {} touches)...",
        run + 1,
        warm_plan.touches()
    );
    let warm = restore(
        ctx,
        &warm_plan,
        Opts {
            warm: Some(loaded.clone()),
            ..Opts::default()
        },
        None,
    )?;
    println!(
        "   ready in {:.3} s, {} faults ({} ahead of the prefetch, {} waited for a copy in flight); {} pages prefetched; verified every byte",
        warm.ready.as_secs_f64(),
        warm.at_ready.faults_missing,
        warm.at_ready.faults_ahead_of_prefetch,
        warm.at_ready.duplicates,
        warm.at_ready.pages_warmed,
    );
    if let Some(f) = &warm.fetched {
        println!("   object store by ready: {f}");
    }

    println!(
        "3. reference: the same workload on a private mapping of {} (run {})...",
        match ctx.source {
            ImageSource::Local(_) => "the image file",
            ImageSource::Remote(_) => "a local copy of the object",
        },
        run + 1
    );
    let (reference, kernel_faults) = reference(ctx, &warm_plan)?;
    println!(
        "   ready in {:.3} s, {kernel_faults} page faults handled by the kernel",
        reference.as_secs_f64()
    );

    let cold_wasted = recorded.pages_not_in(&touched_set(recorded.regions(), &cold_plan));
    let warm_wasted = loaded.pages_not_in(&touched_set(loaded.regions(), &warm_plan));
    let ratio = |d: Duration| format!("{:.2}x", d.as_secs_f64() / reference.as_secs_f64());
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!();
    println!(
        "{:<22} {:>13} {:>8} {:>8} {:>11} {:>8} {:>13}",
        "", "time to ready", "faults", "served", "prefetched", "wasted", "vs reference"
    );
    println!(
        "{:<22} {:>13} {:>8} {:>8} {:>11} {:>8} {:>13}",
        "cold (recording)",
        ms(cold.ready),
        cold.at_ready.faults_missing,
        cold.at_ready.pages_served,
        "-",
        cold_wasted,
        ratio(cold.ready)
    );
    println!(
        "{:<22} {:>13} {:>8} {:>8} {:>11} {:>8} {:>13}",
        "warm",
        ms(warm.ready),
        warm.at_ready.faults_missing,
        warm.at_ready.pages_served,
        warm.at_ready.pages_warmed,
        warm_wasted,
        ratio(warm.ready)
    );
    println!(
        "{:<22} {:>13} {:>8} {:>8} {:>11} {:>8} {:>13}",
        "private file mapping",
        ms(reference),
        format!("({kernel_faults})"),
        "-",
        "-",
        "-",
        "1.00x"
    );
    println!(
        "time to ready: from just before the server starts to the last worker done; faults: \
         userfaultfd faults (in parentheses: the kernel's page faults); served: pages copied by \
         then; wasted: pages served around faults (cold) or prefetched (warm) that the workers \
         never touched"
    );
    Ok(())
}

/// A file in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(what: &str) -> Self {
        Self(
            std::env::temp_dir().join(format!("tokio-uffd-snapshot-{}.{what}", std::process::id())),
        )
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pages `plan` touches, as a working set over `regions` (the one
/// region of the restore), to compare with a recorded one.
fn touched_set(regions: &[RecordedRegion], plan: &Plan) -> WorkingSet {
    let mut set = WorkingSet::new(regions.to_vec());
    for (first, n) in plan.touched_runs() {
        // The plan's pages are inside the image, and so inside the region.
        let _ = set.push(0, first as u64, n as u64);
    }
    set
}

/// What one restore does besides serving faults.
#[derive(Debug, Default)]
struct Opts {
    record: bool,
    warm: Option<WorkingSet>,
    fill: Option<Fill>,
    /// Wait until every page is resident before the workers start.
    eager: bool,
}

/// What one restore measured.
struct Restored {
    /// From just before the server started to the last worker done.
    ready: Duration,
    /// Eager: from the same start to every page resident.
    eager: Option<Duration>,
    /// From the same start to the first touch done.
    first_touch: Option<Duration>,
    /// The statistics at ready.
    at_ready: StatsSnapshot,
    /// An object's source's statistics at ready.
    fetched: Option<FetchStats>,
    /// ... and after the server stopped.
    last: StatsSnapshot,
    stats: Arc<Stats>,
    /// The working set recorded by ready.
    recorded: Option<WorkingSet>,
    /// The working set prefetched.
    warm: Option<WorkingSet>,
    /// With a fill: when every page was resident, after the server started.
    resident: Option<Duration>,
}

/// One restore of the image into fresh memory, the workers running
/// `plan`; then every byte checked.
fn restore(
    ctx: &Ctx<'_>,
    plan: &Plan,
    opts: Opts,
    warm_path: Option<&Path>,
) -> Result<Restored, BoxError> {
    let args = ctx.args;
    let (page, len) = (ctx.page, ctx.len);
    let uffd = UffdBuilder::new()
        .want(Features::EVENT_REMOVE | Features::THREAD_ID)
        .create()?;
    assert_eq!(uffd.page_size(), page);
    let mem = Mapping::anon(len)?;
    // SAFETY: a fresh mapping that nothing references; its pages are filled
    // only by the server from the image.
    unsafe { uffd.register(mem.addr, len, RegisterMode::MISSING)? };

    // Made before the timed interval (no request: the length is known).
    let (source, probe) = ctx.source()?;
    let _guard = ctx.rt.enter();
    let mut server = Server::new(AsyncUffd::new(uffd)?, SourceHandler::new(source))
        .regions([Region::new(mem.addr..mem.addr + len)])?
        .prefetch(args.window as usize);
    if opts.record {
        server = server.record();
    }
    if let Some(ws) = &opts.warm {
        server = server.warm(ws.clone()).map_err(|e| {
            format!(
                "cannot use the working set{}: {}",
                warm_path.map_or(String::new(), |p| format!(" {}", p.display())),
                error_chain(&e)
            )
        })?;
    }
    if let Some(fill) = opts.fill {
        server = server.fill(fill);
    }
    // From an object, a background copy waits a network round trip: more
    // copies in flight, a source chunk each (one GET), unless told
    // otherwise (see the module docs).
    let remote = probe.as_ref().map(|p| {
        (
            REMOTE_BACKGROUND_CONCURRENCY,
            usize::try_from(p.chunk_size()).unwrap_or(usize::MAX),
        )
    });
    if let Some(bytes) = args
        .background_chunk
        .map(|kib| kib as usize * 1024)
        .or(remote.map(|r| r.1))
    {
        server = server.background_chunk(bytes);
    }
    if let Some(n) = args
        .background_concurrency
        .map(|n| n as usize)
        .or(remote.map(|r| r.0))
    {
        server = server.background_concurrency(n);
    }

    // The workers wait at a barrier until the server runs.
    let barrier = Arc::new(Barrier::new(plan.threads.len() + 1));
    let workers = {
        let (barrier, plan) = (barrier.clone(), Arc::new(plan.clone()));
        let (base, access, think, spinner) = (
            mem.addr,
            ctx.access,
            Duration::from_nanos(args.think),
            ctx.spinner,
        );
        Touchers::spawn(plan.threads.len(), move |t| {
            barrier.wait();
            let Some((&first, rest)) = plan.threads[t].split_first() else {
                return (0, None);
            };
            // SAFETY: the plan's pages lie inside `mem`, which stays mapped
            // (readable and writable) while workers run; a write stores back
            // the value read.
            let mut sum = unsafe { workload::touch(base, page, first, access) };
            let first_at = Instant::now();
            spinner.think(think);
            // SAFETY: as above.
            sum = sum.wrapping_add(unsafe {
                workload::run_worker(base, page, rest, access, think, &spinner)
            });
            (sum, Some(first_at))
        })?
    };

    let start = Instant::now();
    let handle = server.spawn();
    let eager = if opts.eager {
        match ctx
            .rt
            .block_on(tokio::time::timeout(BOUND, handle.resident()))
        {
            Ok(Ok(_)) => Some(start.elapsed()),
            Ok(Err(e)) => {
                return Err(format!("eager population failed: {}", error_chain(&e)).into())
            }
            Err(_) => return Err(format!("eager population took more than {BOUND:?}").into()),
        }
    } else {
        None
    };
    let server = Watched::new(handle);
    let stats = server.stats.clone();
    barrier.wait();

    // Progress from a thread of its own: the measured interval ends when
    // the last worker does, not at a progress tick.
    let (stop_progress, ticks) = mpsc::channel::<()>();
    let progress = (!args.quiet).then(|| {
        let stats = stats.clone();
        let pages = len / page;
        std::thread::spawn(move || {
            let mut printed = false;
            while let Err(mpsc::RecvTimeoutError::Timeout) =
                ticks.recv_timeout(Duration::from_millis(200))
            {
                printed = true;
                let s = stats.snapshot();
                eprint!(
                    "\r  {:>6.1}% served ({} faults, {} prefetched around them, {} warmed, {} filled)   ",
                    s.pages_served as f64 * 100.0 / pages as f64,
                    s.faults(),
                    s.pages_prefetched,
                    s.pages_warmed,
                    s.pages_filled
                );
            }
            if printed {
                eprintln!();
            }
        })
    });
    let outcome = workers.wait()?;
    let ready = start.elapsed();
    let at_ready = stats.snapshot();
    let fetched = probe.as_ref().map(Probe::stats);
    drop(stop_progress);
    if let Some(p) = progress {
        let _ = p.join();
    }

    let failed = |sigbus: Option<usize>, exit: &tokio_uffd::Result<tokio_uffd::ServerExit>| {
        format!(
            "restoring {} failed after {:.3} s\n{}",
            ctx.name,
            ready.as_secs_f64(),
            failure_report(sigbus, exit, &stats)
        )
    };
    let first_touch = match outcome {
        Outcome::Done(results) => results.iter().filter_map(|r| r.1).min(),
        Outcome::Sigbus(addr) => {
            let exit = ctx.rt.block_on(server.shutdown(BOUND));
            // Workers may still sleep on (or be parked after touching) this
            // memory: leave it mapped until the process exits.
            std::mem::forget(mem);
            return Err(failed(Some(addr), &exit).into());
        }
        Outcome::ServerEnded => {
            let exit = ctx.rt.block_on(server.shutdown(BOUND));
            std::mem::forget(mem);
            return Err(failed(None, &exit).into());
        }
    };
    let handle = match ctx.rt.block_on(server.release()) {
        Ok(handle) => handle,
        Err(exit) => return Err(failed(None, &exit).into()),
    };
    // What the program needed to get ready (the check below faults in the
    // rest).
    let recorded = handle.working_set();
    let resident = if opts.fill.is_some() {
        let bound = match opts.fill {
            Some(Fill::BytesPerSecond(rate)) => {
                BOUND + Duration::from_secs_f64(2.0 * len as f64 / rate as f64)
            }
            _ => BOUND,
        };
        match ctx
            .rt
            .block_on(tokio::time::timeout(bound, handle.resident()))
        {
            Ok(Ok(after)) => Some(after),
            Ok(Err(e)) => return Err(format!("the background fill: {}", error_chain(&e)).into()),
            Err(_) => return Err(format!("not every page was resident within {bound:?}").into()),
        }
    } else {
        None
    };

    verify(ctx, &mem)?;
    let exit = ctx
        .rt
        .block_on(tokio::time::timeout(BOUND, handle.shutdown()));
    match exit {
        Ok(exit) => {
            exit?;
        }
        Err(_) => return Err(format!("the server did not stop within {BOUND:?}").into()),
    }
    Ok(Restored {
        ready,
        eager,
        first_touch: first_touch.map(|t| t.saturating_duration_since(start)),
        at_ready,
        fetched,
        last: stats.snapshot(),
        stats,
        recorded,
        warm: opts.warm,
        resident,
    })
}

/// Every byte of the restored memory against the file.
fn verify(ctx: &Ctx<'_>, mem: &Mapping) -> Result<(), BoxError> {
    let file_len = ctx.file_len;
    let file = ctx.file()?;
    let mut chunk = vec![0u8; 1 << 20];
    let restored = mem.bytes();
    let mut offset = 0;
    while offset < file_len {
        let n = chunk.len().min(file_len - offset);
        file.read_exact_at(&mut chunk[..n], offset as u64)?;
        if restored[offset..offset + n] != chunk[..n] {
            let i = (0..n)
                .find(|&i| restored[offset + i] != chunk[i])
                .unwrap_or(0);
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
    Ok(())
}

/// Page faults of this process so far (minor and major).
fn page_faults() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (ru.ru_minflt + ru.ru_majflt) as u64
}

/// The reference: the workers run `plan` on a private, writable mapping of
/// the image file, or of the local copy of an object (its page cache warm
/// from the restores' checks), the kernel mapping each page on first touch.
/// Returns the time from the workers' start to the last one done, and the
/// process's page faults meanwhile.
fn reference(ctx: &Ctx<'_>, plan: &Plan) -> Result<(Duration, u64), BoxError> {
    let fd = ctx.file()?.as_raw_fd();
    // SAFETY: a fresh private mapping of our own file descriptor at an
    // address the kernel picks; every page of it holds bytes of the file
    // (the length is the file's, rounded up to a page).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ctx.len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mapping the image file: {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    let mem = Mapping {
        addr: p as usize,
        len: ctx.len,
    };
    let barrier = Arc::new(Barrier::new(plan.threads.len() + 1));
    let plan = Arc::new(plan.clone());
    let (base, page, access, spinner) = (mem.addr, ctx.page, ctx.access, ctx.spinner);
    let think = Duration::from_nanos(ctx.args.think);
    let workers: Vec<_> = (0..plan.threads.len())
        .map(|t| {
            let (barrier, plan) = (barrier.clone(), plan.clone());
            std::thread::Builder::new()
                .name(format!("reference-{t}"))
                .spawn(move || {
                    barrier.wait();
                    // SAFETY: the plan's pages lie inside the mapping, which
                    // outlives the workers (joined below).
                    unsafe {
                        workload::run_worker(base, page, &plan.threads[t], access, think, &spinner)
                    }
                })
        })
        .collect::<Result<_, _>>()?;
    let faults = page_faults();
    let start = Instant::now();
    barrier.wait();
    for w in workers {
        w.join().map_err(|_| "a reference worker panicked")?;
    }
    let took = start.elapsed();
    let faults = page_faults() - faults;
    drop(mem);
    Ok((took, faults))
}
