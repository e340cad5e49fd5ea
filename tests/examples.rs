//! Runs every example (with small sizes) and checks what it reports, and
//! plays Firecracker's part against the Firecracker-protocol handler. With
//! the `object-store` feature, the examples also restore from an object on
//! an S3-compatible server (`tests/s3`).

#![cfg(feature = "async")]

mod common;
#[cfg(feature = "object-store")]
mod s3;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::*;
use tokio_uffd::{
    CreateMethod, Features, RecordedRegion, RegisterMode, SourceId, UffdBuilder, WorkingSet,
};

/// The examples' workload generator, with its unit tests (examples' own
/// tests are not run by `cargo test`).
#[path = "../examples/common/workload.rs"]
mod workload;

/// The path of example `name`, built if `cargo test` did not build it.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(name);
    if !path.exists() {
        build_example(name);
    }
    path
}

/// Builds example `name` in this test's profile, with the object-store
/// feature if this test has it.
fn build_example(name: &str) {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--example", name]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    if cfg!(feature = "object-store") {
        cmd.args(["--features", "object-store"]);
    }
    assert!(cmd.status().unwrap().success(), "building example {name}");
}

/// Runs a command to completion, killing it past `BOUND * 3`.
fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOUND * 3;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran too long; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn have_uffd() -> bool {
    uffd_with(Features::empty()).is_some()
}

/// A fresh, empty directory to run an example in as its `TMPDIR`, removed
/// on drop.
struct TmpDir(PathBuf);

impl TmpDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tokio-uffd-ex-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// What the example left behind.
    fn leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `snapshot_restore` with its temporary image in `tmp`.
fn snapshot_restore(tmp: &TmpDir) -> Command {
    let mut cmd = Command::new(example("snapshot_restore"));
    cmd.env("TMPDIR", &tmp.0);
    cmd
}

/// The row of the comparison table that starts with `name`, split in
/// columns.
fn table_row<'a>(out: &'a str, name: &str) -> Vec<&'a str> {
    let line = out
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{out}"));
    line[name.len()..].split_whitespace().collect()
}

#[test]
fn snapshot_restore_compares_cold_warm_and_a_file_mapping() {
    if !have_uffd() {
        return;
    }
    let tmp = TmpDir::new("restore");
    let out = run_ok(snapshot_restore(&tmp).args([
        "--size",
        "8",
        "--threads",
        "3",
        "--window",
        "8",
        "--quiet",
    ]));
    // Both restores verified every byte; the table has the three rows:
    // time to ready ("6.0 ms"), faults, served, prefetched, wasted, ratio.
    assert_eq!(out.matches("verified every byte").count(), 2, "{out}");
    let cold = table_row(&out, "cold (recording)");
    let warm = table_row(&out, "warm");
    let reference = table_row(&out, "private file mapping");
    assert_eq!(cold.len(), 7, "{cold:?}");
    assert_eq!(warm.len(), 7, "{warm:?}");
    assert_eq!(cold[1], "ms", "{cold:?}");
    assert_eq!(reference.last(), Some(&"1.00x"), "{reference:?}");
    let cold_faults: u64 = cold[2].parse().unwrap();
    let warm_faults: u64 = warm[2].parse().unwrap();
    let prefetched: u64 = warm[4].parse().unwrap();
    assert!(cold_faults > 0, "{out}");
    assert!(prefetched > 0, "{out}");
    // The warm restore's faults: the run's few pages outside the recording,
    // and pages the prefetch had not copied yet; far fewer than cold.
    assert!(warm_faults < cold_faults, "{out}");
    assert!(out.contains("pages recorded in"), "{out}");
    // The working set's temporary file is gone, as is the image.
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());

    // One cold restore over every page (the old default), without
    // fault-around: every page is its own fault.
    let out = run_ok(snapshot_restore(&tmp).args([
        "--size",
        "4",
        "--cold",
        "--pattern",
        "sequential",
        "--window",
        "1",
        "--quiet",
    ]));
    assert!(out.contains("cold restore: ready in"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    assert!(out.contains("fault latency: p50"), "{out}");
    assert!(out.contains("time to first byte"), "{out}");
    assert!(out.contains("faults: 1024 missing"), "{out}");
    assert!(out.contains("(0 prefetched"), "{out}");
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());
}

#[test]
fn snapshot_restore_records_then_warms_and_refuses_another_images_set() {
    if !have_uffd() {
        return;
    }
    let tmp = TmpDir::new("record");
    let sets = TmpDir::new("record-sets");
    let ws = sets.0.join("image.ws");
    let out = run_ok(
        snapshot_restore(&tmp)
            .args([
                "--size",
                "8",
                "--threads",
                "2",
                "--write",
                "--quiet",
                "--record",
            ])
            .arg(&ws),
    );
    assert!(out.contains("cold restore: ready in"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    assert!(out.contains("writing a word"), "{out}");
    assert!(out.contains(&format!("saved to {}", ws.display())), "{out}");
    let set = WorkingSet::load(&ws).unwrap();
    // 20% of 2048 pages, with fault-around neighbours.
    assert!(set.pages() >= 410 && set.pages() <= 2048, "{}", set.pages());
    assert_eq!(set.regions().len(), 1);
    assert_eq!(set.regions()[0].len, 8 << 20);

    let out = run_ok(
        snapshot_restore(&tmp)
            .args(["--size", "8", "--threads", "2", "--quiet", "--warm"])
            .arg(&ws),
    );
    assert!(out.contains("warm restore: ready in"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    assert!(
        out.contains(&format!("warm: {} pages in the working set", set.pages())),
        "{out}"
    );
    // The same set with a background fill: every page resident.
    let out = run_ok(
        snapshot_restore(&tmp)
            .args(["--size", "8", "--quiet", "--fill", "--warm"])
            .arg(&ws),
    );
    assert!(out.contains("every page resident"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");

    // Another image size: the crate refuses the set, exit status 1.
    let out = run(snapshot_restore(&tmp)
        .args(["--size", "4", "--quiet", "--warm"])
        .arg(&ws));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("recorded for another image or region layout"),
        "{err}"
    );
    assert!(err.contains(&ws.display().to_string()), "{err}");
    // Not a working set at all.
    let out =
        run(snapshot_restore(&tmp).args(["--size", "4", "--quiet", "--warm", "/nonexistent/set"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());
}

#[test]
fn snapshot_restore_eager_and_fill_report_resident() {
    if !have_uffd() {
        return;
    }
    let tmp = TmpDir::new("eager");
    let out = run_ok(snapshot_restore(&tmp).args(["--size", "8", "--eager", "--quiet"]));
    assert!(out.contains("eager restore: ready in"), "{out}");
    assert!(out.contains("eager: every page resident after"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    // Every page was copied before the workers started: no fault.
    assert!(out.contains("faults: 0 missing"), "{out}");
    let out = run_ok(snapshot_restore(&tmp).args([
        "--size",
        "8",
        "--fill",
        "--fill-rate",
        "256",
        "--quiet",
    ]));
    assert!(out.contains("cold restore: ready in"), "{out}");
    assert!(out.contains("pages filled; every page resident"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());
}

/// The seconds in "ready in 0.012 s".
fn restore_seconds(out: &str) -> f64 {
    let rest = out
        .split("ready in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no elapsed time in:\n{out}"));
    rest.split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn snapshot_restore_reports_when_the_work_ended_not_a_polling_tick() {
    if !have_uffd() {
        return;
    }
    // 1 MiB restores in a few milliseconds; the old progress loop slept
    // 200 ms before taking the time, so it printed 0.200 s at least.
    let tmp = TmpDir::new("elapsed");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let out = run_ok(snapshot_restore(&tmp).args(["--size", "1", "--cold", "--quiet"]));
        let secs = restore_seconds(&out);
        assert!(secs > 0.0, "{out}");
        best = best.min(secs);
    }
    assert!(best < 0.2, "the restore of 1 MiB took {best} s");
    // Without --quiet (a progress line every 200 ms) too.
    let out = run_ok(snapshot_restore(&tmp).args(["--size", "1", "--cold"]));
    assert!(restore_seconds(&out) < 0.2, "{out}");
}

#[test]
fn snapshot_restore_uses_a_given_image_and_reports_bad_input() {
    if !have_uffd() {
        return;
    }
    // A given image that is not a whole number of pages.
    let tmp = TmpDir::new("given");
    let path = tmp.0.join("given.img");
    let data: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let out = run_ok(
        Command::new(example("snapshot_restore"))
            .arg("--image")
            .arg(&path)
            .arg("--quiet"),
    );
    assert_eq!(out.matches("verified every byte").count(), 2, "{out}");
    assert!(out.contains("private file mapping"), "{out}");

    let out =
        run(Command::new(example("snapshot_restore")).args(["--image", "/nonexistent/image"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open /nonexistent/image"), "{err}");
    // clap's usage errors: exit status 2, naming the flag.
    let out = run(Command::new(example("snapshot_restore")).args(["--pattern", "diagonal"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pattern"));
    let out = run(Command::new(example("snapshot_restore")).args(["--bogus", "1"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn snapshot_restore_refuses_a_directory_with_a_clear_message() {
    if !have_uffd() {
        return;
    }
    // It used to die of a bare SIGBUS ("Bus error", status 135).
    let tmp = TmpDir::new("dir");
    let out = run(Command::new(example("snapshot_restore"))
        .arg("--image")
        .arg(&tmp.0)
        .arg("--quiet"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}\n{err}", out.status);
    assert!(
        err.contains(&format!("{} is a directory", tmp.0.display())),
        "{err}"
    );
}

#[test]
fn snapshot_restore_names_the_page_offset_and_cause_it_could_not_serve() {
    if !have_uffd() {
        return;
    }
    // A sysfs attribute: a regular file that claims a page (st_size 4096)
    // but reads a few bytes, so the server cannot fill the page and poisons
    // it (the default policy); the worker that touched it gets SIGBUS.
    let image = Path::new("/sys/kernel/uevent_seqnum");
    assert!(image.is_file(), "this test needs {}", image.display());
    let out = run(Command::new(example("snapshot_restore"))
        .arg("--image")
        .arg(image)
        .arg("--quiet"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{:?}\n{err}", out.status);
    assert!(err.contains("got SIGBUS"), "{err}");
    // The address the worker touched, and the server's failure with the
    // same address, the source offset and the cause.
    let addr = err
        .split("a worker thread touched ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or_else(|| panic!("no address in:\n{err}"));
    assert!(addr.starts_with("0x"), "{err}");
    assert!(
        err.contains(&format!("first failure: serving 0x1000 bytes at {addr}")),
        "{err}"
    );
    assert!(err.contains("from source 0 offset 0x0 failed"), "{err}");
    assert!(err.contains("failed to fill whole buffer"), "{err}");
}

#[test]
fn count_arguments_are_bounded_and_leave_nothing_behind() {
    let tmp = TmpDir::new("bounds");
    for (name, args) in [
        ("snapshot_restore", &["--threads", "100000"][..]),
        ("snapshot_restore", &["--size", "0"][..]),
        ("snapshot_restore", &["--window", "100000"][..]),
        ("snapshot_restore", &["--working-set", "101"][..]),
        ("snapshot_restore", &["--think", "100000000"][..]),
        ("snapshot_restore", &["--fill", "--fill-rate", "0"][..]),
        ("dirty_tracking", &["--writers", "100000"][..]),
        ("dirty_tracking", &["--async", "--percent", "101"][..]),
        ("serve_faults", &["--threads", "100000"][..]),
        ("remote_memory", &["--threads", "0"][..]),
        (
            "firecracker_handler",
            &["--socket", "s", "--mem-file", "m", "--window", "0"][..],
        ),
    ] {
        let out = run(Command::new(example(name)).env("TMPDIR", &tmp.0).args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} {args:?}: {err}");
        assert!(err.contains(args[args.len() - 2]), "{name} {args:?}: {err}");
        assert!(err.contains("is not in"), "{name} {args:?}: {err}");
    }
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());
}

#[test]
fn every_example_prints_help() {
    for name in [
        "snapshot_restore",
        "serve_faults",
        "dirty_tracking",
        "remote_memory",
        "firecracker_handler",
    ] {
        let out = run(Command::new(example(name)).arg("--help"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{name}: {text}");
        assert!(text.contains("Usage:"), "{name}: {text}");
        assert!(text.contains("--verbose"), "{name}: {text}");
    }
}

#[test]
fn snapshot_restore_killed_mid_run_leaves_no_temporary_image() {
    if !have_uffd() {
        return;
    }
    let tmp = TmpDir::new("killed");
    let mut child = snapshot_restore(&tmp)
        .args(["--size", "64", "--threads", "1", "--window", "1", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the image is made and the restore has begun.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx.recv_timeout(BOUND);
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line.expect("snapshot_restore printed nothing");
    assert!(line.starts_with("restoring"), "{line}");
    // SIGKILL runs no destructor: only a file unlinked at once is gone.
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());
}

#[test]
fn serve_faults_runs() {
    if !have_uffd() {
        return;
    }
    let out = run_ok(Command::new(example("serve_faults")).args(["--mib", "4", "--threads", "3"]));
    assert!(out.contains("every byte verified"), "{out}");
}

#[test]
fn dirty_tracking_matches_the_pages_written() {
    if !have_uffd() {
        return;
    }
    let out = run_ok(Command::new(example("dirty_tracking")).args([
        "--pages",
        "256",
        "--writers",
        "2",
        "--intervals",
        "3",
        "--writes",
        "50",
    ]));
    assert!(out.contains("interval 3:"), "{out}");
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(out.contains("every interval's dirty set matched"), "{out}");
    assert!(out.contains("sync (write-protect faults)"), "{out}");
    assert!(out.contains("slowdown"), "{out}");
}

/// The figures every run of `dirty_tracking` prints after its check.
fn assert_dirty_tracking_figures(out: &str, method: &str, rounds: usize) {
    assert!(
        out.contains(&format!(
            "every interval's dirty set matched the pages written exactly ({rounds} rounds"
        )),
        "{out}"
    );
    assert!(!out.contains("MISMATCH"), "{out}");
    assert!(out.contains(method), "{out}");
    assert!(out.contains(" rounds/s"), "{out}");
    assert!(
        out.contains("round (scan and re-protect) time: mean "),
        "{out}"
    );
    assert!(out.contains("ns per page write untracked"), "{out}");
    assert!(out.contains(" writes each): slowdown "), "{out}");
}

#[test]
fn dirty_tracking_sync_with_a_percentage_is_exact() {
    if !have_uffd() {
        return;
    }
    let out = run_ok(Command::new(example("dirty_tracking")).args([
        "--pages",
        "512",
        "--writers",
        "3",
        "--intervals",
        "4",
        "--percent",
        "10",
    ]));
    // 10% of 512 pages, distinct, every round.
    assert_eq!(out.matches(": 51 dirty pages of 512").count(), 4, "{out}");
    assert_dirty_tracking_figures(&out, "sync (write-protect faults)", 4);
}

#[test]
fn dirty_tracking_async_matches_the_pages_written_exactly() {
    if !have_uffd() {
        return;
    }
    for args in [
        &["--writes", "50"][..],
        &["--percent", "10"][..],
        &["--percent", "100"][..],
    ] {
        let out = run(Command::new(example("dirty_tracking"))
            .args([
                "--async",
                "--pages",
                "512",
                "--writers",
                "2",
                "--intervals",
                "4",
            ])
            .args(args));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains("UFFD_FEATURE_WP_ASYNC") {
            // A kernel before 6.7: the example must say so clearly.
            assert!(stderr.contains("Linux 6.7"), "{stderr}");
            skip(&format!(
                "dirty_tracking --async cannot run on this kernel: {}",
                stderr.trim()
            ));
            return;
        }
        assert!(
            out.status.success(),
            "dirty_tracking --async {args:?} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        assert!(stdout.contains("interval 4:"), "{stdout}");
        assert_dirty_tracking_figures(&stdout, "async (WP_ASYNC + PAGEMAP_SCAN)", 4);
        if args[1] == "100" {
            assert_eq!(
                stdout.matches(": 512 dirty pages of 512").count(),
                4,
                "{stdout}"
            );
        }
    }
}

#[test]
fn remote_memory_fills_memory_from_a_page_server() {
    if !have_uffd() {
        return;
    }
    let out =
        run_ok(Command::new(example("remote_memory")).args(["--size", "8", "--threads", "3"]));
    assert!(out.contains("every byte verified"), "{out}");
}

// ---------------------------------------------------------------------------
// Firecracker's part
// ---------------------------------------------------------------------------

/// The byte at `offset` of the test guest memory file.
fn guest_byte(offset: usize) -> u8 {
    (offset as u8).wrapping_mul(7) ^ ((offset >> 12) as u8) ^ 0xa5
}

const REGION: usize = 4 << 20;

/// Child entry point: does what Firecracker does when it restores a
/// snapshot with a Uffd backend, then checks the guest memory and balloons
/// part of it away.
#[test]
#[ignore = "child entry point, run by the_firecracker_handler_serves_firecracker"]
fn child_firecracker_entry() {
    let Ok(socket) = std::env::var("TOKIO_UFFD_FC_SOCKET") else {
        return;
    };
    // As Firecracker: /dev/userfaultfd, close-on-exec, non-blocking, not
    // user-mode-only, only EVENT_REMOVE.
    let uffd = UffdBuilder::new()
        .method(CreateMethod::Device)
        .user_mode_only(false)
        .require(Features::EVENT_REMOVE)
        .create()
        .unwrap();
    let page = uffd.page_size();
    let regions = [Mapping::anon(REGION), Mapping::anon(REGION)];
    for r in &regions {
        // SAFETY: fresh guest memory, served by the handler.
        unsafe { uffd.register(r.addr, REGION, RegisterMode::MISSING) }.unwrap();
    }
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{REGION},"offset":0,"page_size":{page},"page_size_kib":{page}}},{{"base_host_virt_addr":{},"size":{REGION},"offset":{REGION},"page_size":{page},"page_size_kib":{page},"some_future_field":true}}]"#,
        regions[0].addr, regions[1].addr
    );
    let sock = UnixStream::connect(socket).unwrap();
    send_fd(&sock, uffd.as_raw_fd(), json.as_bytes());

    // The guest runs: every byte of both regions, from two vCPU threads.
    let bases = [regions[0].addr, regions[1].addr];
    let vcpus: Vec<_> = (0..2)
        .map(|v| {
            std::thread::spawn(move || {
                for (r, base) in bases.iter().enumerate() {
                    for p in (v..REGION / page).step_by(2) {
                        let off = p * page + (p % page);
                        let want = guest_byte(r * REGION + off);
                        assert_eq!(read_at(base + off), want, "region {r} offset {off:#x}");
                    }
                }
            })
        })
        .collect();
    for v in vcpus {
        v.join().unwrap();
    }
    for (r, m) in regions.iter().enumerate() {
        let want: Vec<u8> = (0..REGION).map(|i| guest_byte(r * REGION + i)).collect();
        assert!(m.slice() == &want[..], "region {r} differs");
    }
    // The balloon takes the first MiB of region 0: it must read zero after.
    // SAFETY: freeing guest memory we own.
    let rc = unsafe {
        libc::madvise(
            regions[0].addr as *mut libc::c_void,
            1 << 20,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    assert!((0..(1 << 20))
        .step_by(page)
        .all(|o| read_at(regions[0].addr + o) == 0));
    assert_eq!(read_at(regions[0].addr + (1 << 20)), guest_byte(1 << 20));
    // The VMM exits: the socket hangs up.
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + BOUND;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn the_firecracker_handler_serves_firecracker() {
    if !have_uffd() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tokio-uffd-fc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("guest.mem");
    let socket = dir.join("uffd.sock");
    {
        let mut f = std::fs::File::create(&mem).unwrap();
        let data: Vec<u8> = (0..2 * REGION).map(guest_byte).collect();
        f.write_all(&data).unwrap();
    }
    // Two VMs, one after the other on one socket, and the handler exits
    // after both have gone.
    let handler = Command::new(example("firecracker_handler"))
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(&mem)
        .args(["--exit-after", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&socket);
    let vms: Vec<_> = (0..2)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                run_child_test(
                    "child_firecracker_entry",
                    &[("TOKIO_UFFD_FC_SOCKET", socket.to_str().unwrap())],
                )
            })
        })
        .collect();
    for vm in vms {
        let status = vm.join().unwrap();
        assert!(
            status.success(),
            "a Firecracker stand-in failed: {status:?}"
        );
    }
    let deadline = Instant::now() + BOUND;
    let mut handler = handler;
    while handler.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            handler.kill().unwrap();
            panic!("the handler did not exit after both VMs had gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = handler.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "handler: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        stdout.matches("): 2 region(s), 8.0 MiB").count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("the VMM hung up").count() + stdout.matches("process exited").count(),
        2,
        "{stdout}"
    );
    // The ballooned MiB (256 pages) was served as zeros, in each VM.
    assert_eq!(
        stdout.matches("256 zeroed after remove").count(),
        2,
        "{stdout}"
    );
}

/// Runs `firecracker_handler` over `mem` with `extra` arguments for one VM
/// (`child_firecracker_entry`), checks that both succeeded and returns the
/// handler's output.
fn firecracker_one_vm(dir: &TmpDir, mem: &Path, extra: &[&std::ffi::OsStr]) -> String {
    firecracker_one_vm_with(dir, mem, extra, |_| {})
}

/// [`firecracker_one_vm`], with `setup` applied to the handler's command
/// (its environment).
fn firecracker_one_vm_with(
    dir: &TmpDir,
    mem: &Path,
    extra: &[&std::ffi::OsStr],
    setup: impl FnOnce(&mut Command),
) -> String {
    let socket = dir.0.join("uffd.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(example("firecracker_handler"));
    setup(&mut cmd);
    let mut handler = cmd
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(mem)
        .args(["--exit-after", "1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&socket);
    let vmm = run_child_test(
        "child_firecracker_entry",
        &[("TOKIO_UFFD_FC_SOCKET", socket.to_str().unwrap())],
    );
    let deadline = Instant::now() + BOUND;
    while handler.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            handler.kill().unwrap();
            panic!("the handler did not exit after the VM had gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = handler.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "handler: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        vmm.success(),
        "the Firecracker stand-in failed: {vmm:?}\n{stdout}"
    );
    stdout
}

#[test]
fn the_firecracker_handler_records_and_prefetches_the_working_set() {
    if !have_uffd() {
        return;
    }
    let dir = TmpDir::new("fc-record");
    let mem = dir.0.join("guest.mem");
    let data: Vec<u8> = (0..2 * REGION).map(guest_byte).collect();
    std::fs::write(&mem, &data).unwrap();
    let ws = dir.0.join("guest.ws");

    // A cold restore, recorded: the stand-in reads every page of both
    // regions, so the set is all 2048 pages, saved when the VMM hangs up.
    let out = firecracker_one_vm(&dir, &mem, &["--record".as_ref(), ws.as_os_str()]);
    assert!(out.contains("the VMM hung up"), "{out}");
    assert!(
        out.contains(&format!(
            "working set of 2048 pages in 2 runs saved to {}",
            ws.display()
        )),
        "{out}"
    );
    let set = WorkingSet::load(&ws).unwrap();
    assert_eq!(set.pages(), 2048);
    // Each region by its offset in the memory file.
    let mut offsets: Vec<u64> = set.regions().iter().map(|r| r.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, [0, REGION as u64]);

    // The next restore prefetches it, and fills the rest: the guest reads
    // the right bytes, and the ballooned MiB still reads zero.
    let out = firecracker_one_vm(
        &dir,
        &mem,
        &["--warm".as_ref(), ws.as_os_str(), "--fill".as_ref()],
    );
    assert!(out.contains("VM 1: prefetching the working set"), "{out}");
    assert!(
        out.contains("VM 1: restore: 2048 pages in the working set, "),
        "{out}"
    );
    assert!(out.contains("every page resident after"), "{out}");
    assert!(out.contains("256 zeroed after remove"), "{out}");
    let warmed: u64 = out
        .split("pages in the working set, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefetched count in:\n{out}"));
    assert!(warmed > 0, "{out}");

    // A set recorded for other memory (one region of 8 MiB) is not used:
    // the VM is served on demand.
    let other = dir.0.join("other.ws");
    let mut wrong = WorkingSet::new(vec![RecordedRegion {
        source: SourceId::new(0),
        offset: 0,
        len: 2 * REGION as u64,
        page_size: 4096,
    }]);
    wrong.push(0, 0, 16).unwrap();
    wrong.save(&other).unwrap();
    let out = firecracker_one_vm(&dir, &mem, &["--warm".as_ref(), other.as_os_str()]);
    assert!(
        out.contains("VM 1: not prefetching the working set"),
        "{out}"
    );
    assert!(
        out.contains("recorded for another image or region layout"),
        "{out}"
    );
    assert!(out.contains("the VMM hung up"), "{out}");
    // A file that is not a working set: the handler does not start.
    let out = run(Command::new(example("firecracker_handler"))
        .arg("--socket")
        .arg(dir.0.join("never.sock"))
        .arg("--mem-file")
        .arg(&mem)
        .arg("--warm")
        .arg(&mem));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a working-set file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Child entry point: a VMM whose snapshot's memory file is not the one the
/// handler serves (its second region lies past that file's end). It sends
/// its regions and runs the guest, which must never get a byte: the
/// handler must stop this process instead.
#[test]
#[ignore = "child entry point, run by the_firecracker_handler_stops_a_vm_its_file_does_not_cover"]
fn child_firecracker_wrong_file_entry() {
    let Ok(socket) = std::env::var("TOKIO_UFFD_FC_WRONG_SOCKET") else {
        return;
    };
    let uffd = UffdBuilder::new()
        .method(CreateMethod::Device)
        .user_mode_only(false)
        .require(Features::EVENT_REMOVE)
        .create()
        .unwrap();
    let page = uffd.page_size();
    let regions = [Mapping::anon(REGION), Mapping::anon(REGION)];
    for r in &regions {
        // SAFETY: fresh guest memory, served by the handler.
        unsafe { uffd.register(r.addr, REGION, RegisterMode::MISSING) }.unwrap();
    }
    // The handler's file holds 2 * REGION bytes; region 1 starts there.
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{REGION},"offset":0,"page_size":{page}}},{{"base_host_virt_addr":{},"size":{REGION},"offset":{},"page_size":{page}}}]"#,
        regions[0].addr,
        regions[1].addr,
        2 * REGION
    );
    let sock = UnixStream::connect(socket).unwrap();
    send_fd(&sock, uffd.as_raw_fd(), json.as_bytes());
    // The guest runs. Reaching the next line means the handler let a VM it
    // cannot serve read memory (served it, or closed its uffd: zeros).
    let b = read_at(regions[0].addr);
    eprintln!("the refused guest read {b:#04x}");
    std::process::exit(3);
}

#[test]
fn the_firecracker_handler_stops_a_vm_its_file_does_not_cover() {
    if !have_uffd() {
        return;
    }
    let dir = TmpDir::new("fc-wrong");
    let mem = dir.0.join("guest.mem");
    let socket = dir.0.join("uffd.sock");
    let data: Vec<u8> = (0..2 * REGION).map(guest_byte).collect();
    std::fs::write(&mem, &data).unwrap();
    // One handler, two VMMs at once: one whose regions the file covers, one
    // whose regions reach past its end.
    let handler = Command::new(example("firecracker_handler"))
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(&mem)
        .args(["--exit-after", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&socket);
    let vm = |entry: &'static str, var: &'static str| {
        let socket = socket.clone();
        std::thread::spawn(move || run_child_test(entry, &[(var, socket.to_str().unwrap())]))
    };
    let good = vm("child_firecracker_entry", "TOKIO_UFFD_FC_SOCKET");
    let wrong = vm(
        "child_firecracker_wrong_file_entry",
        "TOKIO_UFFD_FC_WRONG_SOCKET",
    );
    let good = good.join().unwrap();
    let wrong = wrong.join().unwrap();
    let mut handler = handler;
    let deadline = Instant::now() + BOUND;
    while handler.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            handler.kill().unwrap();
            panic!("the handler did not exit after both VMs had gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = handler.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "handler: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(good.success(), "the served VMM failed: {good:?}\n{stdout}");
    // The other one was stopped by a signal, never ran on.
    assert!(
        matches!(wrong.signal(), Some(libc::SIGBUS | libc::SIGKILL)),
        "the refused VMM ended with {wrong:?}\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "refused: region 1 (offset {:#x}, {REGION:#x} bytes) ends past the end of the memory file {} ({:#x} bytes)",
            2 * REGION,
            mem.display(),
            2 * REGION
        )),
        "{stdout}"
    );
    assert!(stdout.contains("sent SIGBUS to the VMM (pid "), "{stdout}");
    assert!(stdout.contains("is gone"), "{stdout}");
    // The good VM: served, ballooned, hung up.
    assert_eq!(
        stdout.matches("): 2 region(s), 8.0 MiB").count(),
        1,
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("256 zeroed after remove").count(),
        1,
        "{stdout}"
    );
    assert_eq!(stdout.matches("the VMM hung up").count(), 1, "{stdout}");
}

/// Child entry point: a VMM whose memory file shrinks after the handler
/// accepted it. The guest reads one page (served), truncates the file, then
/// touches a page of its second region: that page cannot be read any more,
/// and the handler must stop this process rather than let it run on.
#[test]
#[ignore = "child entry point, run by the_firecracker_handler_stops_a_vm_it_fails_to_serve_later"]
fn child_firecracker_file_shrinks_entry() {
    let (Ok(socket), Ok(mem)) = (
        std::env::var("TOKIO_UFFD_FC_SHRINK_SOCKET"),
        std::env::var("TOKIO_UFFD_FC_SHRINK_MEM"),
    ) else {
        return;
    };
    let uffd = UffdBuilder::new()
        .method(CreateMethod::Device)
        .user_mode_only(false)
        .require(Features::EVENT_REMOVE)
        .create()
        .unwrap();
    let page = uffd.page_size();
    let regions = [Mapping::anon(REGION), Mapping::anon(REGION)];
    for r in &regions {
        // SAFETY: fresh guest memory, served by the handler.
        unsafe { uffd.register(r.addr, REGION, RegisterMode::MISSING) }.unwrap();
    }
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{REGION},"offset":0,"page_size":{page}}},{{"base_host_virt_addr":{},"size":{REGION},"offset":{REGION},"page_size":{page}}}]"#,
        regions[0].addr, regions[1].addr
    );
    let sock = UnixStream::connect(socket).unwrap();
    send_fd(&sock, uffd.as_raw_fd(), json.as_bytes());
    assert_eq!(read_at(regions[0].addr), guest_byte(0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(mem)
        .unwrap()
        .set_len(0)
        .unwrap();
    let b = read_at(regions[1].addr + REGION / 2);
    eprintln!("the guest read {b:#04x} from a page its handler could not read");
    std::process::exit(3);
}

#[test]
fn the_firecracker_handler_stops_a_vm_it_fails_to_serve_later() {
    if !have_uffd() {
        return;
    }
    let dir = TmpDir::new("fc-shrink");
    let mem = dir.0.join("guest.mem");
    let socket = dir.0.join("uffd.sock");
    let data: Vec<u8> = (0..2 * REGION).map(guest_byte).collect();
    std::fs::write(&mem, &data).unwrap();
    let handler = Command::new(example("firecracker_handler"))
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(&mem)
        .args(["--exit-after", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&socket);
    let vmm = run_child_test(
        "child_firecracker_file_shrinks_entry",
        &[
            ("TOKIO_UFFD_FC_SHRINK_SOCKET", socket.to_str().unwrap()),
            ("TOKIO_UFFD_FC_SHRINK_MEM", mem.to_str().unwrap()),
        ],
    );
    let mut handler = handler;
    let deadline = Instant::now() + BOUND;
    while handler.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            handler.kill().unwrap();
            panic!("the handler did not exit after the VM had gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = handler.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "handler: {:?}\n{stdout}", out.status);
    assert!(
        matches!(vmm.signal(), Some(libc::SIGBUS | libc::SIGKILL)),
        "the VMM ended with {vmm:?}\n{stdout}"
    );
    // The failure, with the source offset (in the second region) and cause.
    assert!(stdout.contains("serving failed: "), "{stdout}");
    assert!(
        stdout.contains(&format!("from source 0 offset {:#x}", REGION + REGION / 2)),
        "{stdout}"
    );
    // The memory file is mapped (MmapSource): a read past its new end is
    // an error that says so, not a SIGBUS in the handler.
    assert!(
        stdout.contains("the file shrank while it was served"),
        "{stdout}"
    );
    assert!(stdout.contains("sent SIGBUS to the VMM (pid "), "{stdout}");
    assert!(stdout.contains("1 failure(s)"), "{stdout}");
    assert!(stdout.contains("first failure: "), "{stdout}");
}

// ---------------------------------------------------------------------------
// Images in object storage
// ---------------------------------------------------------------------------

#[test]
fn an_object_url_that_cannot_be_read_is_a_clear_error() {
    // Whatever the build: the URL is checked before anything is read.
    for (image, says) in [
        ("s3://bucket", "no key: give s3://BUCKET/KEY"),
        ("s3:///key", "no bucket: give s3://BUCKET/KEY"),
        ("s3://Bucket/key", "the bucket name \"Bucket\""),
        ("s3://bucket/a//b", "has an empty, `.` or `..` part"),
        (
            "gs://bucket/key",
            "gs:// objects are not supported by this example",
        ),
        ("ftp://host/key", "unknown scheme ftp://"),
    ] {
        let out = run(Command::new(example("snapshot_restore")).args(["--image", image]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{image}: {err}");
        assert!(err.contains(image) && err.contains(says), "{image}: {err}");
    }
    // The object flags are refused with a file image.
    let out = run(Command::new(example("snapshot_restore")).args([
        "--size",
        "1",
        "--endpoint",
        "http://127.0.0.1:1",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--endpoint applies to an image in object storage"),
        "{err}"
    );
    let out = run(Command::new(example("firecracker_handler")).args([
        "--socket",
        "/nonexistent/s",
        "--mem-file",
        "s3://bucket",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("s3://bucket: not an object URL"), "{err}");
}

/// The arguments that make example `name` read its image from `image`
/// (before it does anything else).
fn image_args<'a>(name: &str, image: &'a str) -> Vec<&'a str> {
    match name {
        "snapshot_restore" => vec!["--image", image],
        "firecracker_handler" => vec!["--socket", "/nonexistent/uffd.sock", "--mem-file", image],
        _ => panic!("{name} reads no image"),
    }
}

#[cfg(not(feature = "object-store"))]
#[test]
fn without_the_feature_an_object_image_says_how_to_rebuild() {
    for name in ["snapshot_restore", "firecracker_handler"] {
        let out = run(Command::new(example(name)).args(image_args(name, "s3://bucket/key")));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains("s3://bucket/key is an object")
                && err.contains("rebuild it with `--features object-store`")
                && err.contains(&format!("--example {name} ")),
            "{name}: {err}"
        );
    }
}

/// Example `name` built with the object-store feature: one that
/// `cargo test` built without it (an earlier run without the feature, then
/// `--test examples`, which builds no example) is built again.
#[cfg(feature = "object-store")]
fn object_example(name: &str) -> PathBuf {
    let path = example(name);
    // An endpoint that is no URL: refused before any request with the
    // feature, while a build without it refuses the object itself.
    let probe = || {
        let out = run(Command::new(&path)
            .args(image_args(name, "s3://bucket/key"))
            .args(["--endpoint", "not-a-url"]));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = probe();
    if err.contains("rebuild it with `--features object-store`") {
        eprintln!("{name} was built without the object-store feature: building it with it");
        build_example(name);
    }
    let err = probe();
    assert!(
        err.contains("--endpoint not-a-url: give an http:// or https:// URL"),
        "{name}: {err}"
    );
    path
}

/// `cmd` set up for `s3`: its credentials in the environment (and no other
/// `AWS_*` variable of ours), `--endpoint`.
#[cfg(feature = "object-store")]
fn on_s3<'a>(cmd: &'a mut Command, s3: &s3::S3) -> &'a mut Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
        .env("AWS_REGION", "us-east-1")
        .args(["--endpoint", &s3.endpoint])
}

/// Uploads `data` to `s3` under a key of its own; returns its URL.
#[cfg(feature = "object-store")]
fn upload(s3: &s3::S3, test: &str, data: &[u8]) -> String {
    let key = s3.fresh_key(test);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(s3.upload(&key, data));
    format!("s3://{}/{key}", s3.bucket)
}

/// The figures of "object store...: N GETs of chunks of C KiB (R retried,
/// F failed), M MiB fetched" lines: (GETs, chunk KiB, retried, failed,
/// MiB), one per line.
#[cfg(feature = "object-store")]
fn object_figures(out: &str) -> Vec<(u64, u64, u64, u64, f64)> {
    out.lines()
        .filter(|l| l.contains("object store") && l.contains(" GETs of chunks of "))
        .map(|l| {
            // From the count of GETs on ("VM 1: object store...: 32 GETs").
            let at = l.find(" GETs of chunks of ").unwrap();
            let l = &l[l[..at].rfind(' ').map_or(0, |i| i + 1)..];
            let nums: Vec<f64> = l
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter(|w| !w.is_empty() && *w != ".")
                .map(|w| w.parse().unwrap_or_else(|_| panic!("{w:?} in {l}")))
                .collect();
            (
                nums[0] as u64,
                nums[1] as u64,
                nums[2] as u64,
                nums[3] as u64,
                nums[4],
            )
        })
        .collect()
}

#[cfg(feature = "object-store")]
#[test]
fn snapshot_restore_restores_an_object_from_an_s3_server() {
    if !have_uffd() {
        return;
    }
    let Some(s3) = s3::S3::get() else {
        return;
    };
    let exe = object_example("snapshot_restore");
    // 8 MiB and a bit: the last page is the object's only in part.
    let len = (8 << 20) + 3000;
    let data: Vec<u8> = (0..len).map(guest_byte).collect();
    let url = upload(&s3, "examples-restore", &data);
    let chunks = (len as u64).div_ceil(256 << 10);
    let tmp = TmpDir::new("s3-restore");

    // Cold (recording) and warm, each from a source of its own, both
    // checked against the object's bytes; the reference maps a local copy.
    let out = run_ok(
        on_s3(&mut Command::new(&exe), &s3)
            .env("TMPDIR", &tmp.0)
            .args([
                "--image",
                &url,
                "--chunk",
                "256",
                "--threads",
                "3",
                "--quiet",
            ]),
    );
    assert!(
        out.contains(&format!("restoring {url} (at {})", s3.endpoint)),
        "{out}"
    );
    assert_eq!(out.matches("verified every byte").count(), 2, "{out}");
    let figures = object_figures(&out);
    assert_eq!(figures.len(), 2, "{out}");
    for (gets, chunk, retried, failed, mib) in figures {
        // One GET per chunk at most, none again, none failed.
        assert!(gets > 0 && gets <= chunks, "{out}");
        assert_eq!((chunk, retried, failed), (256, 0, 0), "{out}");
        assert!(mib > 0.0 && mib <= len as f64 / (1 << 20) as f64, "{out}");
    }
    assert!(
        out.contains("private mapping of a local copy of the object"),
        "{out}"
    );
    assert_eq!(
        table_row(&out, "private file mapping").last(),
        Some(&"1.00x")
    );
    // The local copy was a file unlinked at once.
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());

    // --record, then --warm with a fill, from the object.
    let sets = TmpDir::new("s3-restore-sets");
    let ws = sets.0.join("object.ws");
    let out = run_ok(
        on_s3(&mut Command::new(&exe), &s3)
            .env("TMPDIR", &tmp.0)
            .args(["--image", &url, "--quiet", "--record"])
            .arg(&ws),
    );
    assert!(out.contains("cold restore: ready in"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    assert!(out.contains("object store: "), "{out}");
    let set = WorkingSet::load(&ws).unwrap();
    assert_eq!(set.regions()[0].len, len.next_multiple_of(4096) as u64);
    let out = run_ok(
        on_s3(&mut Command::new(&exe), &s3)
            .env("TMPDIR", &tmp.0)
            .args([
                "--image", &url, "--quiet", "--fill", "--cache", "1", "--warm",
            ])
            .arg(&ws),
    );
    assert!(out.contains("warm restore: ready in"), "{out}");
    assert!(
        out.contains(&format!("warm: {} pages in the working set", set.pages())),
        "{out}"
    );
    assert!(out.contains("pages filled; every page resident"), "{out}");
    assert!(out.contains("verified every byte"), "{out}");
    assert_eq!(object_figures(&out).len(), 1, "{out}");
    assert_eq!(tmp.leftovers(), Vec::<PathBuf>::new());

    // An object that is not there: status 1, naming it and the endpoint.
    let missing = format!("s3://{}/no/such/object", s3.bucket);
    let out = run(on_s3(&mut Command::new(&exe), &s3).args(["--image", &missing, "--quiet"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot read {missing} (at {})", s3.endpoint)),
        "{err}"
    );
    // Wrong credentials: the server's refusal, named.
    let out = run(on_s3(&mut Command::new(&exe), &s3)
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .args(["--image", &url, "--quiet"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot read {url}")), "{err}");
}

#[cfg(feature = "object-store")]
#[test]
fn the_firecracker_handler_serves_guest_memory_from_an_object() {
    if !have_uffd() {
        return;
    }
    let Some(s3) = s3::S3::get() else {
        return;
    };
    let _exe = object_example("firecracker_handler");
    let data: Vec<u8> = (0..2 * REGION).map(guest_byte).collect();
    let url = upload(&s3, "examples-firecracker", &data);
    let dir = TmpDir::new("fc-s3");
    let ws = dir.0.join("guest.ws");
    let env = |cmd: &mut Command| {
        on_s3(cmd, &s3);
    };
    let chunk = ["--chunk".as_ref(), "256".as_ref()];

    // The stand-in reads every byte of both regions (its own check), and
    // balloons a MiB away; the working set is recorded.
    let out = firecracker_one_vm_with(
        &dir,
        Path::new(&url),
        &[&chunk[..], &["--record".as_ref(), ws.as_os_str()]].concat(),
        env,
    );
    assert!(
        out.contains(&format!("serving {url} (at {})", s3.endpoint)),
        "{out}"
    );
    assert!(out.contains("): 2 region(s), 8.0 MiB"), "{out}");
    assert!(out.contains("256 zeroed after remove"), "{out}");
    assert!(out.contains("the VMM hung up"), "{out}");
    assert!(
        out.contains("working set of 2048 pages in 2 runs saved"),
        "{out}"
    );
    let figures = object_figures(&out);
    assert_eq!(figures.len(), 1, "{out}");
    let (gets, chunk_kib, retried, failed, mib) = figures[0];
    // Every byte was read: every chunk, once.
    assert_eq!((gets, chunk_kib, retried, failed), (32, 256, 0, 0), "{out}");
    assert_eq!(mib, 8.0, "{out}");

    // Prefetched and filled from the object.
    let out = firecracker_one_vm_with(
        &dir,
        Path::new(&url),
        &["--warm".as_ref(), ws.as_os_str(), "--fill".as_ref()],
        env,
    );
    assert!(out.contains("VM 1: prefetching the working set"), "{out}");
    assert!(out.contains("every page resident after"), "{out}");
    assert!(out.contains("0 background copies failed"), "{out}");
    assert!(out.contains("256 zeroed after remove"), "{out}");

    // Regions past the object's end: the VM is refused and stopped.
    let socket = dir.0.join("wrong.sock");
    let mut cmd = Command::new(example("firecracker_handler"));
    on_s3(&mut cmd, &s3);
    let handler = cmd
        .arg("--socket")
        .arg(&socket)
        .args(["--mem-file", &url, "--exit-after", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_path(&socket);
    let wrong = run_child_test(
        "child_firecracker_wrong_file_entry",
        &[("TOKIO_UFFD_FC_WRONG_SOCKET", socket.to_str().unwrap())],
    );
    let mut handler = handler;
    let deadline = Instant::now() + BOUND;
    while handler.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            handler.kill().unwrap();
            panic!("the handler did not exit after the VM had gone");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out = handler.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "handler: {:?}\n{stdout}", out.status);
    assert!(
        matches!(wrong.signal(), Some(libc::SIGBUS | libc::SIGKILL)),
        "the refused VMM ended with {wrong:?}\n{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "refused: region 1 (offset {:#x}, {REGION:#x} bytes) ends past the end of the memory file {url} (at {}) ({:#x} bytes)",
            2 * REGION,
            s3.endpoint,
            2 * REGION
        )),
        "{stdout}"
    );
}
