//! One table: every case quickly, the crate's figure beside the raw floor's
//! from the same run, their ratio, and syscalls per fault. Writes the table
//! as Markdown too.
//!
//! ```text
//! cargo bench --bench summary                 # prints the table, writes target/bench-summary.md
//! cargo bench --bench summary -- --out FILE   # ... or to FILE
//! ```
//!
//! Latency figures are medians of several runs; on these virtual machines
//! a wake-up across cores costs tens of microseconds, so every latency is
//! given with the handler on the faulting thread's core and on the other.

mod harness;

use std::fmt::Write as _;
use std::time::Duration;

use harness::{median, median_f64, paired_ratio, Op, Path, Pin, Side};

const RUNS: usize = 7;
/// Rounds of the latency cases: they are short, and noisier than the rest.
const LATENCY_RUNS: usize = 15;
/// Runs of the slow-source cases.
const SLOW_RUNS: usize = 5;
/// Rounds of each dirty-tracking method at each dirty fraction.
const DIRTY_ROUNDS: usize = 5;

fn med(f: impl Fn() -> Duration) -> Duration {
    median((0..RUNS).map(|_| f()).collect())
}

struct Row {
    group: &'static str,
    case: String,
    unit: &'static str,
    krate: f64,
    floor: f64,
    target: &'static str,
    syscalls: Option<(f64, f64)>,
    /// Handler thread CPU time per fault (crate, floor), in microseconds.
    cpu: Option<(f64, f64)>,
    /// Set for rows whose ratio is the median of per-round ratios.
    paired: Option<f64>,
}

impl Row {
    fn new(group: &'static str, case: String, unit: &'static str, krate: f64, floor: f64) -> Self {
        Row {
            group,
            case,
            unit,
            krate,
            floor,
            target: "",
            syscalls: None,
            cpu: None,
            paired: None,
        }
    }

    /// Crate over floor: for latency lower is better, for rates higher.
    fn ratio(&self) -> f64 {
        self.paired.unwrap_or(self.krate / self.floor)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Re-executed under perf or strace to count the syscalls of one case.
    if harness::run_syscall_case(&args) {
        return;
    }
    // TOKIO_UFFD_BENCH_LOG=info: a subscriber that takes the crate's events at
    // that level, to show what observability costs per fault (per-fault
    // events are at TRACE, so at INFO they must cost nothing measurable).
    if let Ok(level) = std::env::var("TOKIO_UFFD_BENCH_LOG") {
        let level: tracing_subscriber::filter::LevelFilter = level
            .parse()
            .expect("TOKIO_UFFD_BENCH_LOG: a level such as info");
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(std::io::stderr)
            .init();
        eprintln!("tracing subscriber installed at {level}");
    }
    // Cargo runs a benchmark in its package's directory (`benches/`): paths
    // are taken from the workspace root, as when the benches were targets of
    // the root package.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the bench package sits in the workspace");
    let out = root.join(
        args.iter()
            .position(|a| a == "--out")
            .map(|i| args[i + 1].as_str())
            .unwrap_or("target/bench-summary.md"),
    );

    // `--only WORD` runs the groups whose name contains WORD.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args[i + 1].clone());
    let run = |group: &str| only.as_ref().is_none_or(|o| group.contains(o.as_str()));
    let mut rows = Vec::new();
    let faults = 3000;
    for (op, opn) in [(Op::Copy, "copy"), (Op::Zero, "zeropage")] {
        if !run("fault latency") {
            break;
        }
        for (pin, pinn) in [(Pin::SameCore, "same core"), (Pin::OtherCore, "other core")] {
            // A fault across cores costs about ten times one on the same
            // core: fewer of them per round keep the run short.
            let faults = if pin == Pin::SameCore {
                faults
            } else {
                faults / 2
            };
            let per = |d: Duration| d.as_secs_f64() * 1e6 / faults as f64;
            // Interleaved: every round measures the floor and every path
            // back to back (in an order that rotates), so that drift in the
            // machine hits them alike; a path's ratio is the median of its
            // per-round ratios to the same round's floor.
            let all = [
                (Path::RawRead, ""),
                (Path::RawPoll, ""),
                (Path::RawEpoll, ""),
                (Path::Sync, "<= 1.05"),
                (Path::StreamCurrent, "<= 1.15"),
                (Path::StreamMulti, ""),
                (Path::Server, "<= 1.30"),
            ];
            let mut lat = vec![Vec::new(); all.len()];
            let mut cpu = vec![Vec::new(); all.len()];
            for round in 0..LATENCY_RUNS {
                for k in 0..all.len() {
                    let i = (k + round) % all.len();
                    lat[i].push(per(harness::latency(all[i].0, op, pin, faults)));
                    cpu[i].push(per(harness::last_handler_cpu()));
                }
            }
            let floor = median_f64(&lat[0]);
            let floor_cpu = median_f64(&cpu[0]);
            for (i, &(path, target)) in all.iter().enumerate().skip(1) {
                let mut row = Row::new(
                    "fault latency",
                    format!("{opn}, {pinn}: {}", path.name()),
                    "us/fault",
                    median_f64(&lat[i]),
                    floor,
                );
                row.target = target;
                row.paired = Some(paired_ratio(&lat[i], &lat[0]));
                // The multi-thread runtime's worker is not measured.
                if path != Path::StreamMulti {
                    row.cpu = Some((median_f64(&cpu[i]), floor_cpu));
                }
                rows.push(row);
            }
            eprintln!("measured latency: {opn}, {pinn}");
        }
    }

    // Syscalls per fault (copy, on either core).
    for (prefix, pin) in [("copy, same core", "same"), ("copy, other core", "other")] {
        let floor_calls = if run("fault latency") {
            harness::syscalls_per_fault("raw", pin)
        } else {
            None
        };
        for row in rows.iter_mut().filter(|r| r.case.starts_with(prefix)) {
            let name = row.case.rsplit(": ").next().unwrap().to_string();
            let key = match name.as_str() {
                "raw poll+read+ioctl" => "poll",
                "raw epoll+read+ioctl" => "epoll",
                "sync Uffd" => "sync",
                "EventStream current-thread" => "stream-current",
                "EventStream multi-thread" => "stream-multi",
                "Server" => "server",
                _ => continue,
            };
            if let (Some(c), Some(f)) = (harness::syscalls_per_fault(key, pin), floor_calls) {
                row.syscalls = Some((c, f));
            }
        }
    }

    for threads in [1usize, 2, 4] {
        if !run("throughput") {
            break;
        }
        let per = 2000;
        let rate = |d: Duration| (threads * per) as f64 / d.as_secs_f64();
        let floor = rate(med(|| harness::throughput(Side::Raw, threads, per)));
        let krate = rate(med(|| harness::throughput(Side::Server, threads, per)));
        let mut row = Row::new(
            "throughput",
            format!("{threads} faulting thread(s): Server"),
            "pages/s",
            krate,
            floor,
        );
        row.target = "grows with threads";
        rows.push(row);
    }
    eprintln!("measured throughput");

    // The restore of the issue: 256 MiB, in rounds that measure the floor
    // and the server back to back (in alternating order); the ratio is the
    // median of the per-round ratios.
    let mib = 256;
    for window in [1usize, 16, 512] {
        if !run("fault-around") {
            break;
        }
        let rate = |d: Duration| mib as f64 / d.as_secs_f64();
        let (mut floor, mut krate) = (Vec::new(), Vec::new());
        for round in 0..RUNS {
            let one = |side| rate(harness::fault_around(side, window, mib));
            if round % 2 == 0 {
                floor.push(one(Side::Raw));
                krate.push(one(Side::Server));
            } else {
                krate.push(one(Side::Server));
                floor.push(one(Side::Raw));
            }
        }
        let mut row = Row::new(
            "fault-around",
            format!("sequential {mib} MiB, window {window}: Server"),
            "MiB/s",
            median_f64(&krate),
            median_f64(&floor),
        );
        row.paired = Some(paired_ratio(&krate, &floor));
        row.target = if window > 1 { ">= 0.90" } else { "" };
        rows.push(row);
    }
    eprintln!("measured fault-around");

    if run("slow source") {
        // Rounds of every thread count back to back, for the crate and the
        // synchronous handler alike: on a virtual machine how long an idle
        // CPU takes to wake up drifts by several times over seconds, and
        // this case is made of such wake-ups. The scaling is the median of
        // the per-round ratios to the same round's 1-thread figure. Runs are
        // long enough (a 1-thread run of the server takes about 0.1 s) that
        // the start and the end of a run weigh little.
        let per = 250;
        let counts = [1usize, 4, 16];
        let mut server = vec![Vec::new(); counts.len()];
        let mut sync = vec![Vec::new(); counts.len()];
        for _ in 0..SLOW_RUNS {
            for (i, &threads) in counts.iter().enumerate() {
                let rate = |d: Duration| (threads * per) as f64 / d.as_secs_f64();
                server[i].push(rate(harness::slow_source(Side::Server, threads, per)));
                sync[i].push(rate(harness::slow_source(Side::Raw, threads, per)));
            }
        }
        let scale = |rates: &[Vec<f64>], i: usize| paired_ratio(&rates[i], &rates[0]);
        for (i, &threads) in counts.iter().enumerate() {
            let mut row = Row::new(
                "slow source (200 us/page)",
                format!(
                    "{threads} faulting thread(s): Server (x{:.1} of its 1-thread figure; sync x{:.1})",
                    scale(&server, i),
                    scale(&sync, i)
                ),
                "pages/s",
                median_f64(&server[i]),
                median_f64(&sync[i]),
            );
            row.target = if threads > 1 {
                ">= 0.8 x T x 1-thread"
            } else {
                ""
            };
            rows.push(row);
        }
    }
    eprintln!("measured slow sources");

    let mut notes = Vec::new();
    if run("dirty tracking") {
        notes.extend(dirty_rows(&mut rows));
        eprintln!("measured dirty tracking");
    }

    let msgs = harness::fault_messages();
    let rounds = 20_000;
    let d = median((0..3).map(|_| harness::decode(&msgs, rounds)).collect());
    let rate = (msgs.len() * rounds) as f64 / d.as_secs_f64();

    // The table.
    let mut md = String::new();
    let _ = writeln!(md, "# tokio-uffd benchmark summary\n");
    let _ = writeln!(
        md,
        "Machine: {} cores, kernel {}, page size {}. The floor is a raw synchronous handler \
         (one thread, blocking `read(2)` + one `ioctl`, libc only) measured in the same run. \
         Ratio = crate / floor (for latency lower is better; for rates higher is better). \
         Latency: medians of {LATENCY_RUNS} interleaved rounds of {faults} faults ({} across \
         cores), the ratio \
         being the median of the per-round ratios; handler CPU is the handler thread's CPU \
         time (user and system) per fault. Throughput: medians of {RUNS} runs; fault-around: of {RUNS} \
         paired rounds; slow sources: of {SLOW_RUNS} rounds; dirty tracking: of {DIRTY_ROUNDS} \
         rounds per method and fraction; there the writer's floor is the same writes untracked \
         (ratio = slowdown) and a round's floor is the synchronous write-protect round.\n",
        harness::cpus(),
        kernel(),
        harness::page_size(),
        faults / 2
    );
    let _ = writeln!(
        md,
        "| group | case | crate | floor | unit | ratio | target | syscalls/fault (crate / floor) | handler CPU us/fault (crate / floor) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---|---:|---|---|---|");
    for r in &rows {
        let sc = r
            .syscalls
            .map(|(c, f)| format!("{c:.2} / {f:.2}"))
            .unwrap_or_default();
        let cpu = r
            .cpu
            .map(|(c, f)| format!("{c:.2} / {f:.2}"))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {} | {:.2} | {} | {} | {} |",
            r.group,
            r.case,
            r.krate,
            r.floor,
            r.unit,
            r.ratio(),
            r.target,
            sc,
            cpu
        );
    }
    let _ = writeln!(
        md,
        "\nDecode: {:.1} M messages/s through `decode_message`.",
        rate / 1e6
    );
    for note in &notes {
        let _ = writeln!(md, "\n{note}");
    }
    print!("{md}");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out, &md) {
        Ok(()) => eprintln!("written to {}", out.display()),
        Err(e) => eprintln!("could not write {}: {e}", out.display()),
    }
}

/// Dirty-page tracking over 1 GiB (issue 15): for each method and each
/// fraction of pages written per round, the writer's time per round beside
/// the same writes untracked (ratio = slowdown), and the round time beside
/// the synchronous write-protect round's (ratio = method / sync).
/// Returns a note when a method could not be measured here.
fn dirty_rows(rows: &mut Vec<Row>) -> Option<String> {
    use harness::DirtyMethod as M;
    const GROUP: &str = "dirty tracking (1 GiB)";
    let percents = [1usize, 10];
    let soft_dirty = harness::soft_dirty_supported();
    let methods: &[M] = if soft_dirty {
        &[M::Async, M::SyncWp, M::SoftDirty]
    } else {
        &[M::Async, M::SyncWp]
    };
    let runs: Vec<Vec<harness::DirtyRun>> = methods
        .iter()
        .map(|&m| {
            let r = harness::dirty_tracking(m, 1 << 30, &percents, DIRTY_ROUNDS);
            eprintln!("measured dirty tracking: {}", m.name());
            r
        })
        .collect();
    let ms = |v: &[Duration]| median(v.to_vec()).as_secs_f64() * 1e3;
    for (p, &pct) in percents.iter().enumerate() {
        let slowdown = |m: usize| ms(&runs[m][p].writer) / ms(&runs[m][p].floor);
        // Slowdown as the time added to the writer, over the untracked floor.
        let added = |m: usize| ms(&runs[m][p].writer) - ms(&runs[m][p].floor);
        for (m, method) in methods.iter().enumerate() {
            let row = Row::new(
                GROUP,
                format!("{pct}% of pages per round: writer, {}", method.name()),
                "ms/round",
                ms(&runs[m][p].writer),
                ms(&runs[m][p].floor),
            );
            rows.push(row);
        }
        // Async (0) against sync write-protect faults (1).
        let mut row = Row::new(
            GROUP,
            format!(
                "{pct}%: writer time added, async / sync WP (slowdown x{:.2} / x{:.2}, ratio of \
                 slowdowns {:.3})",
                slowdown(0),
                slowdown(1),
                slowdown(0) / slowdown(1)
            ),
            "ms/round",
            added(0),
            added(1),
        );
        if pct == 10 {
            row.target = "async slowdown <= 1/10 of sync WP at 10% (<= 0.10)";
        }
        rows.push(row);
        let sync_round = ms(&runs[1][p].round);
        for (m, method) in methods.iter().enumerate() {
            let mut row = Row::new(
                GROUP,
                format!(
                    "{pct}% of pages per round: round, {} / sync WP round",
                    method.name()
                ),
                "ms/round",
                ms(&runs[m][p].round),
                sync_round,
            );
            if pct == 1 && *method == M::Async {
                row.target = "async round <= 10% of sync round at 1% (<= 0.10)";
            }
            rows.push(row);
        }
    }
    (!soft_dirty).then(|| {
        "Dirty tracking: soft-dirty bits not measured, this kernel keeps none \
         (built without `CONFIG_MEM_SOFT_DIRTY`: pagemap bit 55 stays clear after a write)."
            .to_string()
    })
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
