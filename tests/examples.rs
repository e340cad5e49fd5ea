//! Runs every example (with small sizes) and checks what it reports, and
//! plays Firecracker's part against the Firecracker-protocol handler.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::*;
use tokio_uffd::{CreateMethod, Features, RegisterMode, UffdBuilder};

/// The path of example `name`, built if `cargo test` did not build it.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().join("examples");
    let path = dir.join(name);
    if !path.exists() {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", name]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building example {name}");
    }
    path
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

#[test]
fn snapshot_restore_restores_and_verifies_an_image() {
    if !have_uffd() {
        return;
    }
    let out = run_ok(Command::new(example("snapshot_restore")).args([
        "--size",
        "8",
        "--threads",
        "3",
        "--window",
        "8",
        "--quiet",
    ]));
    assert!(out.contains("verified every byte"), "{out}");
    assert!(out.contains("fault latency: p50"), "{out}");
    assert!(out.contains("time to first byte"), "{out}");
    let out = run_ok(Command::new(example("snapshot_restore")).args([
        "--size",
        "4",
        "--pattern",
        "sequential",
        "--window",
        "1",
        "--quiet",
    ]));
    // Without fault-around every page is its own fault.
    assert!(out.contains("(0 prefetched"), "{out}");
}

#[test]
fn snapshot_restore_uses_a_given_image_and_reports_bad_input() {
    if !have_uffd() {
        return;
    }
    // A given image that is not a whole number of pages.
    let path = std::env::temp_dir().join(format!("tokio-uffd-given-{}", std::process::id()));
    let data: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let out = run_ok(
        Command::new(example("snapshot_restore"))
            .arg("--image")
            .arg(&path)
            .arg("--quiet"),
    );
    std::fs::remove_file(&path).unwrap();
    assert!(out.contains("verified every byte"), "{out}");

    let out =
        run(Command::new(example("snapshot_restore")).args(["--image", "/nonexistent/image"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open /nonexistent/image"), "{err}");
    let out = run(Command::new(example("snapshot_restore")).args(["--pattern", "diagonal"]));
    assert_eq!(out.status.code(), Some(1));
    let out = run(Command::new(example("snapshot_restore")).args(["--bogus", "1"]));
    assert_eq!(out.status.code(), Some(2));
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
    assert!(stdout.contains("VM 1: 2 region(s), 8.0 MiB"), "{stdout}");
    assert!(stdout.contains("VM 2: 2 region(s)"), "{stdout}");
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
