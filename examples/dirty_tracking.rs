//! Dirty-page tracking with write protection: the basis of incremental
//! snapshots and pre-copy live migration.
//!
//! A populated region is write-protected. Writer threads write to random
//! pages; each first write to a protected page raises a write-protect
//! fault, which the tracker (a task reading the `EventStream`) records as
//! dirty before removing the protection, so the write lands. At the end of
//! each interval the writers pause, the tracker prints the dirty set and
//! protects the region again. The example checks each interval's dirty set
//! against the pages the writers really wrote.
//!
//! ```text
//! cargo run --release --example dirty_tracking -- --pages 4096 --writers 2 --intervals 5
//! ```

mod common;

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::sync::{Arc, Barrier, Mutex};

use clap::Parser;
use common::{write_at, LogArgs, Mapping, Rng};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_uffd::{
    AsyncUffd, Event, FaultKind, Features, RegisterMode, UffdBuilder, UnprotectFlags,
};

/// Tracks dirty pages with userfaultfd write protection and checks each
/// interval's dirty set against the pages really written.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Size of the tracked region in pages
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    pages: u64,
    /// Writer threads
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_THREADS))]
    writers: u64,
    /// Tracking intervals
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    intervals: u64,
    /// Writes per writer per interval
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    writes: u64,
    #[command(flatten)]
    log: LogArgs,
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

type Snapshot = oneshot::Sender<tokio_uffd::Result<BTreeSet<usize>>>;

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let pages = args.pages as usize;
    let writers = args.writers as usize;
    let intervals = args.intervals as usize;
    let writes = args.writes as usize;

    let uffd = UffdBuilder::new()
        .require(Features::PAGEFAULT_FLAG_WP)
        .create()?;
    let page = uffd.page_size();
    let len = pages * page;
    let mem = Mapping::anon(len)?;
    // Populate every page, then protect the region.
    for p in 0..pages {
        write_at(mem.addr + p * page, 0);
    }
    // SAFETY: the mapping is ours and fully populated; write-protect faults
    // only delay writers until the tracker unprotects the page.
    unsafe { uffd.register(mem.addr, len, RegisterMode::WP)? };
    uffd.write_protect(mem.addr, len)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let uffd = rt.block_on(async { AsyncUffd::new(uffd) })?;
    let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>(1);
    let base = mem.addr;
    let tracker = rt.spawn(track(uffd, base, len, snap_rx));

    // Writers write `writes` random pages per interval, then wait.
    let barrier = Arc::new(Barrier::new(writers + 1));
    let written: Arc<Mutex<Vec<BTreeSet<usize>>>> =
        Arc::new(Mutex::new(vec![BTreeSet::new(); intervals]));
    let threads = (0..writers)
        .map(|w| {
            let barrier = barrier.clone();
            let written = written.clone();
            std::thread::Builder::new().spawn(move || {
                let mut rng = Rng::new(w as u64 + 7);
                for i in 0..intervals {
                    barrier.wait(); // interval starts
                    let mut mine = Vec::with_capacity(writes);
                    for _ in 0..writes {
                        let p = rng.below(pages);
                        write_at(base + p * page + w, i as u8 + 1);
                        mine.push(p);
                    }
                    written.lock().unwrap()[i].extend(mine);
                    barrier.wait(); // interval ends
                }
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;

    let mut ok = true;
    for i in 0..intervals {
        barrier.wait();
        barrier.wait();
        let (tx, rx) = oneshot::channel();
        let dirty = rt.block_on(async {
            snap_tx.send(tx).await.map_err(|_| "the tracker stopped")?;
            rx.await
                .map_err(|_| "the tracker stopped")?
                .map_err(|e| e.to_string())
        })?;
        let truth = written.lock().unwrap()[i].clone();
        let head: Vec<_> = dirty.iter().take(8).collect();
        println!(
            "interval {}: {} dirty pages of {pages} (first: {head:?}){}",
            i + 1,
            dirty.len(),
            if dirty == truth { "" } else { "  MISMATCH" }
        );
        if dirty != truth {
            ok = false;
            let missed: Vec<_> = truth.difference(&dirty).take(8).collect();
            let extra: Vec<_> = dirty.difference(&truth).take(8).collect();
            eprintln!("  written but not tracked: {missed:?}; tracked but not written: {extra:?}");
        }
    }
    for t in threads {
        t.join().map_err(|_| "a writer panicked")?;
    }
    drop(snap_tx);
    rt.block_on(tracker)??;
    if !ok {
        return Err("the tracked dirty sets differ from what was written".into());
    }
    println!("every interval's dirty set matched the pages written");
    Ok(())
}

/// Records write-protect faults as dirty pages and unprotects them; on a
/// snapshot request, hands over the dirty set and protects everything
/// again.
async fn track(
    uffd: AsyncUffd,
    base: usize,
    len: usize,
    mut requests: mpsc::Receiver<Snapshot>,
) -> tokio_uffd::Result<()> {
    let page = uffd.page_size();
    let mut events = uffd.event_stream()?;
    let mut dirty = BTreeSet::new();
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                if let Event::PageFault(f) = event? {
                    if f.kind() == FaultKind::WriteProtect {
                        let start = f.page_start(page);
                        dirty.insert((start - base) / page);
                        uffd.write_unprotect(start, page, UnprotectFlags::empty())?;
                    }
                }
            }
            request = requests.recv() => {
                let Some(reply) = request else { break };
                // Writers are paused: protect the whole region again.
                let result = uffd.write_protect(base, len).map(|()| std::mem::take(&mut dirty));
                let _ = reply.send(result);
            }
        }
    }
    Ok(())
}
