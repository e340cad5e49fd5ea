//! System calls per fault: the summary re-executes itself for one case
//! (`--syscall-case`) under `perf stat` or `strace` and counts.

use std::process::Command;

use super::case::Op;
use super::cpu::Pin;
use super::cpu_time::last_handler_cpu;
use super::latency::{latency, Path};

/// The child side: when `args` ask for one case (`--syscall-case PATH N
/// [copy|zero] [same|other]`), runs it, prints its figures and returns
/// `true`; otherwise returns `false`. Also handy for profiling one case by
/// hand.
pub fn run_syscall_case(args: &[String]) -> bool {
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
        let t = latency(path, op, pin, n);
        println!(
            "{:.2} us/fault, handler CPU {:.2} us/fault",
            t.as_secs_f64() * 1e6 / n as f64,
            last_handler_cpu().as_secs_f64() * 1e6 / n as f64
        );
        return true;
    }
    false
}

/// Syscalls per fault of one path (copy, handler on the `pin` core): the
/// difference between two runs of different lengths, so that setup and
/// teardown cancel out. Counted with `perf stat` on the
/// `raw_syscalls:sys_enter` tracepoint, which barely slows the run, or
/// else with `strace -f -c`, which stretches every system call and so
/// changes how faults and reads interleave. `None` with neither.
pub fn syscalls_per_fault(path: &str, pin: &str) -> Option<f64> {
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

/// A path by its name on the `--syscall-case` command line.
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
