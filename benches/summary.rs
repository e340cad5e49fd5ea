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
use std::process::Command;
use std::time::Duration;

use harness::{Op, Path, Pin, Side};

const RUNS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

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
}

impl Row {
    /// Crate over floor: for latency lower is better, for rates higher.
    fn ratio(&self) -> f64 {
        self.krate / self.floor
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Re-executed under strace to count the syscalls of one case.
    if let Some(i) = args.iter().position(|a| a == "--syscall-case") {
        let path = parse_path(&args[i + 1]);
        let n: usize = args[i + 2].parse().unwrap();
        // Optional, for profiling one case by hand: `zero`, `same`.
        let op = match args.get(i + 3).map(String::as_str) {
            Some("zero") => Op::Zero,
            _ => Op::Copy,
        };
        let pin = match args.get(i + 4).map(String::as_str) {
            Some("same") => Pin::SameCore,
            _ => Pin::OtherCore,
        };
        let t = harness::latency(path, op, pin, n);
        println!(
            "{:.2} us/fault, handler CPU {:.2} us/fault",
            t.as_secs_f64() * 1e6 / n as f64,
            harness::last_handler_cpu().as_secs_f64() * 1e6 / n as f64
        );
        return;
    }
    let out = args
        .iter()
        .position(|a| a == "--out")
        .map(|i| args[i + 1].clone())
        .unwrap_or_else(|| "target/bench-summary.md".into());

    // `--only WORD` runs the groups whose name contains WORD.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .map(|i| args[i + 1].clone());
    let run = |group: &str| only.as_ref().is_none_or(|o| group.contains(o.as_str()));
    let mut rows = Vec::new();
    let faults = 3000;
    let paths = [
        (Path::Sync, "<= 1.05"),
        (Path::StreamCurrent, "<= 1.15"),
        (Path::StreamMulti, ""),
        (Path::Server, "<= 1.30"),
    ];
    for (op, opn) in [(Op::Copy, "copy"), (Op::Zero, "zeropage")] {
        if !run("fault latency") {
            break;
        }
        for (pin, pinn) in [(Pin::SameCore, "same core"), (Pin::OtherCore, "other core")] {
            let per = |d: Duration| d.as_secs_f64() * 1e6 / faults as f64;
            // Interleaved: every run measures the floor and every path
            // back to back, so that drift in the machine hits them alike.
            let all = [
                Path::RawRead,
                Path::RawPoll,
                Path::Sync,
                Path::StreamCurrent,
                Path::StreamMulti,
                Path::Server,
            ];
            let mut times: Vec<Vec<Duration>> = vec![Vec::new(); all.len()];
            for _ in 0..RUNS {
                for (i, &path) in all.iter().enumerate() {
                    times[i].push(harness::latency(path, op, pin, faults));
                }
            }
            let mut medians = times.into_iter().map(|t| per(median(t)));
            let floor = medians.next().unwrap();
            let poll = medians.next().unwrap();
            rows.push(Row {
                group: "fault latency",
                case: format!("{opn}, {pinn}: raw poll+read+ioctl"),
                unit: "us/fault",
                krate: poll,
                floor,
                target: "",
                syscalls: None,
            });
            for ((path, target), v) in paths.into_iter().zip(medians) {
                rows.push(Row {
                    group: "fault latency",
                    case: format!("{opn}, {pinn}: {}", path.name()),
                    unit: "us/fault",
                    krate: v,
                    floor,
                    target,
                    syscalls: None,
                });
            }
            eprintln!("measured latency: {opn}, {pinn}");
        }
    }

    // Syscalls per fault (copy, other core), counted with strace.
    let floor_calls = if run("fault latency") {
        syscalls_per_fault("raw")
    } else {
        None
    };
    for row in rows
        .iter_mut()
        .filter(|r| r.case.starts_with("copy, other core"))
    {
        let name = row.case.rsplit(": ").next().unwrap().to_string();
        let key = match name.as_str() {
            "raw poll+read+ioctl" => "poll",
            "sync Uffd" => "sync",
            "EventStream current-thread" => "stream-current",
            "EventStream multi-thread" => "stream-multi",
            "Server" => "server",
            _ => continue,
        };
        if let (Some(c), Some(f)) = (syscalls_per_fault(key), floor_calls) {
            row.syscalls = Some((c, f));
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
        rows.push(Row {
            group: "throughput",
            case: format!("{threads} faulting thread(s): Server"),
            unit: "pages/s",
            krate,
            floor,
            target: "grows with threads",
            syscalls: None,
        });
    }
    eprintln!("measured throughput");

    let mib = 64;
    for window in [1usize, 16, 512] {
        if !run("fault-around") {
            break;
        }
        let rate = |d: Duration| mib as f64 / d.as_secs_f64();
        let floor = rate(median(
            (0..3)
                .map(|_| harness::fault_around(Side::Raw, window, mib))
                .collect(),
        ));
        let krate = rate(median(
            (0..3)
                .map(|_| harness::fault_around(Side::Server, window, mib))
                .collect(),
        ));
        rows.push(Row {
            group: "fault-around",
            case: format!("sequential {mib} MiB, window {window}: Server"),
            unit: "MiB/s",
            krate,
            floor,
            target: if window > 1 { ">= 0.90" } else { "" },
            syscalls: None,
        });
    }
    eprintln!("measured fault-around");

    let mut one = (0.0, 0.0);
    for threads in [1usize, 4, 16] {
        if !run("slow source") {
            break;
        }
        let per = 40;
        let rate = |d: Duration| (threads * per) as f64 / d.as_secs_f64();
        let floor = rate(median(
            (0..3)
                .map(|_| harness::slow_source(Side::Raw, threads, per))
                .collect(),
        ));
        let krate = rate(median(
            (0..3)
                .map(|_| harness::slow_source(Side::Server, threads, per))
                .collect(),
        ));
        if threads == 1 {
            one = (krate, floor);
        }
        rows.push(Row {
            group: "slow source (200 us/page)",
            case: format!(
                "{threads} faulting thread(s): Server (x{:.1} of its 1-thread figure; sync x{:.1})",
                krate / one.0,
                floor / one.1
            ),
            unit: "pages/s",
            krate,
            floor,
            target: if threads > 1 {
                ">= 0.8 x T x 1-thread"
            } else {
                ""
            },
            syscalls: None,
        });
    }
    eprintln!("measured slow sources");

    let msgs = harness::fault_messages();
    let rounds = 20_000;
    let d = median((0..3).map(|_| harness::decode(&msgs, rounds)).collect());
    let rate = (msgs.len() * rounds) as f64 / d.as_secs_f64();

    // The table.
    let mut md = String::new();
    let _ = writeln!(md, "# tokio-uffd benchmark summary\n");
    let _ = writeln!(
        md,
        "Machine: {} cores, kernel {}, page size {}. Each figure is the median of {RUNS} runs \
         (3 for fault-around and slow sources); the floor is a raw synchronous handler \
         (one thread, blocking `read(2)` + one `ioctl`, libc only) measured in the same run. \
         Ratio = crate / floor (for latency lower is better; for rates higher is better).\n",
        harness::cpus(),
        kernel(),
        harness::page_size()
    );
    let _ = writeln!(
        md,
        "| group | case | crate | floor | unit | ratio | target | syscalls/fault (crate / floor) |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---|---:|---|---|");
    for r in &rows {
        let sc = r
            .syscalls
            .map(|(c, f)| format!("{c:.2} / {f:.2}"))
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {} | {:.2} | {} | {} |",
            r.group,
            r.case,
            r.krate,
            r.floor,
            r.unit,
            r.ratio(),
            r.target,
            sc
        );
    }
    let _ = writeln!(
        md,
        "\nDecode: {:.1} M messages/s through `decode_message`.",
        rate / 1e6
    );
    print!("{md}");
    if let Some(dir) = std::path::Path::new(&out).parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&out, &md) {
        Ok(()) => eprintln!("written to {out}"),
        Err(e) => eprintln!("could not write {out}: {e}"),
    }
}

fn parse_path(s: &str) -> Path {
    match s {
        "raw" => Path::RawRead,
        "poll" => Path::RawPoll,
        "epoll" => Path::RawEpoll,
        "sync" => Path::Sync,
        "stream-current" => Path::StreamCurrent,
        "stream-multi" => Path::StreamMulti,
        "server" => Path::Server,
        other => panic!("unknown path {other}"),
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Syscalls per fault of one path (copy, handler on the other core): the
/// difference between two runs of different lengths under `strace -f -c`,
/// so that setup and teardown cancel out. `None` without strace.
fn syscalls_per_fault(path: &str) -> Option<f64> {
    let count = |n: usize| -> Option<f64> {
        let file = std::env::temp_dir().join(format!(
            "tokio-uffd-strace-{}-{path}-{n}",
            std::process::id()
        ));
        let exe = std::env::current_exe().ok()?;
        let status = Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&file)
            .arg(&exe)
            .args(["--syscall-case", path, &n.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        let text = std::fs::read_to_string(&file).ok()?;
        let _ = std::fs::remove_file(&file);
        if !status.success() {
            return None;
        }
        // "100.00    0.012345           3      4321        12 total"
        let total = text
            .lines()
            .rev()
            .find(|l| l.trim_end().ends_with("total"))?;
        let fields: Vec<&str> = total.split_whitespace().collect();
        fields.get(3)?.parse().ok()
    };
    let (a, b) = (300, 1300);
    let ca = count(a)?;
    let cb = count(b)?;
    Some((cb - ca) / (b - a) as f64)
}
