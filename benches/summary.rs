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
/// Rounds of the latency cases: they are short, and noisier than the rest.
const LATENCY_RUNS: usize = 15;
/// Runs of the slow-source cases.
const SLOW_RUNS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The median of `v` (not empty).
fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of the per-round ratios `krate[i] / floor[i]`: rounds that
/// ran back to back share whatever the machine was doing then.
fn paired_ratio(krate: &[f64], floor: &[f64]) -> f64 {
    let ratios: Vec<f64> = krate.iter().zip(floor).map(|(k, f)| k / f).collect();
    median_f64(&ratios)
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
            syscalls_per_fault("raw", pin)
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
            if let (Some(c), Some(f)) = (syscalls_per_fault(key, pin), floor_calls) {
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
         paired rounds; slow sources: of {SLOW_RUNS} rounds.\n",
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

/// Syscalls per fault of one path (copy, handler on the `pin` core): the
/// difference between two runs of different lengths, so that setup and
/// teardown cancel out. Counted with `perf stat` on the
/// `raw_syscalls:sys_enter` tracepoint, which barely slows the run, or
/// else with `strace -f -c`, which stretches every system call and so
/// changes how faults and reads interleave. `None` with neither.
fn syscalls_per_fault(path: &str, pin: &str) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    let case = |n: usize| {
        let mut args: Vec<std::ffi::OsString> = vec![exe.clone().into()];
        args.extend(
            ["--syscall-case", path, &n.to_string(), "copy", pin]
                .iter()
                .map(Into::into),
        );
        args
    };
    let with_perf = |n: usize| -> Option<f64> {
        let out = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "--"])
            .args(case(n))
            .stdout(std::process::Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        // "12345,,raw_syscalls:sys_enter,..." on stderr.
        let text = String::from_utf8_lossy(&out.stderr);
        let line = text
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))?;
        line.split(',').next()?.trim().parse().ok()
    };
    let with_strace = |n: usize| -> Option<f64> {
        let file = std::env::temp_dir().join(format!(
            "tokio-uffd-strace-{}-{path}-{n}",
            std::process::id()
        ));
        let status = Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&file)
            .args(case(n))
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
    let (a, b) = (1000, 6000);
    let per_fault =
        |count: &dyn Fn(usize) -> Option<f64>| Some((count(b)? - count(a)?) / (b - a) as f64);
    per_fault(&with_perf).or_else(|| per_fault(&with_strace))
}
