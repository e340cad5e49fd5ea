//! Checks every constant, struct size and field offset that the machine's
//! `<linux/userfaultfd.h>` defines against the crate's hand-written `sys`
//! module, by compiling and running a small C program. Values newer than
//! the installed header are skipped here (the header on these machines stops
//! at kernel 6.1) and proven by the kernel tests instead.
#![allow(clippy::unnecessary_cast)] // the constants have mixed types; the table casts all

mod common;

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use tokio_uffd::sys::*;

/// (name, the crate's value) for every `#define` the crate mirrors.
fn constants() -> Vec<(&'static str, u64)> {
    vec![
        ("USERFAULTFD_IOC", USERFAULTFD_IOC as u64),
        ("USERFAULTFD_IOC_NEW", USERFAULTFD_IOC_NEW as u64),
        ("UFFD_API", UFFD_API as u64),
        ("UFFD_USER_MODE_ONLY", UFFD_USER_MODE_ONLY as u64),
        ("_UFFDIO_REGISTER", _UFFDIO_REGISTER as u64),
        ("_UFFDIO_UNREGISTER", _UFFDIO_UNREGISTER as u64),
        ("_UFFDIO_WAKE", _UFFDIO_WAKE as u64),
        ("_UFFDIO_COPY", _UFFDIO_COPY as u64),
        ("_UFFDIO_ZEROPAGE", _UFFDIO_ZEROPAGE as u64),
        ("_UFFDIO_MOVE", _UFFDIO_MOVE as u64),
        ("_UFFDIO_WRITEPROTECT", _UFFDIO_WRITEPROTECT as u64),
        ("_UFFDIO_CONTINUE", _UFFDIO_CONTINUE as u64),
        ("_UFFDIO_POISON", _UFFDIO_POISON as u64),
        ("_UFFDIO_API", _UFFDIO_API as u64),
        ("UFFDIO", UFFDIO as u64),
        ("UFFDIO_API", UFFDIO_API as u64),
        ("UFFDIO_REGISTER", UFFDIO_REGISTER as u64),
        ("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER as u64),
        ("UFFDIO_WAKE", UFFDIO_WAKE as u64),
        ("UFFDIO_COPY", UFFDIO_COPY as u64),
        ("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE as u64),
        ("UFFDIO_MOVE", UFFDIO_MOVE as u64),
        ("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT as u64),
        ("UFFDIO_CONTINUE", UFFDIO_CONTINUE as u64),
        ("UFFDIO_POISON", UFFDIO_POISON as u64),
        ("UFFD_API_IOCTLS", UFFD_API_IOCTLS as u64),
        ("UFFD_API_RANGE_IOCTLS", UFFD_API_RANGE_IOCTLS as u64),
        (
            "UFFD_API_RANGE_IOCTLS_BASIC",
            UFFD_API_RANGE_IOCTLS_BASIC as u64,
        ),
        ("UFFD_EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT as u64),
        ("UFFD_EVENT_FORK", UFFD_EVENT_FORK as u64),
        ("UFFD_EVENT_REMAP", UFFD_EVENT_REMAP as u64),
        ("UFFD_EVENT_REMOVE", UFFD_EVENT_REMOVE as u64),
        ("UFFD_EVENT_UNMAP", UFFD_EVENT_UNMAP as u64),
        (
            "UFFD_PAGEFAULT_FLAG_WRITE",
            UFFD_PAGEFAULT_FLAG_WRITE as u64,
        ),
        ("UFFD_PAGEFAULT_FLAG_WP", UFFD_PAGEFAULT_FLAG_WP as u64),
        (
            "UFFD_PAGEFAULT_FLAG_MINOR",
            UFFD_PAGEFAULT_FLAG_MINOR as u64,
        ),
        (
            "UFFD_FEATURE_PAGEFAULT_FLAG_WP",
            UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64,
        ),
        ("UFFD_FEATURE_EVENT_FORK", UFFD_FEATURE_EVENT_FORK as u64),
        ("UFFD_FEATURE_EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP as u64),
        (
            "UFFD_FEATURE_EVENT_REMOVE",
            UFFD_FEATURE_EVENT_REMOVE as u64,
        ),
        (
            "UFFD_FEATURE_MISSING_HUGETLBFS",
            UFFD_FEATURE_MISSING_HUGETLBFS as u64,
        ),
        (
            "UFFD_FEATURE_MISSING_SHMEM",
            UFFD_FEATURE_MISSING_SHMEM as u64,
        ),
        ("UFFD_FEATURE_EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP as u64),
        ("UFFD_FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS as u64),
        ("UFFD_FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID as u64),
        (
            "UFFD_FEATURE_MINOR_HUGETLBFS",
            UFFD_FEATURE_MINOR_HUGETLBFS as u64,
        ),
        ("UFFD_FEATURE_MINOR_SHMEM", UFFD_FEATURE_MINOR_SHMEM as u64),
        (
            "UFFD_FEATURE_EXACT_ADDRESS",
            UFFD_FEATURE_EXACT_ADDRESS as u64,
        ),
        (
            "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
            UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64,
        ),
        (
            "UFFD_FEATURE_WP_UNPOPULATED",
            UFFD_FEATURE_WP_UNPOPULATED as u64,
        ),
        ("UFFD_FEATURE_POISON", UFFD_FEATURE_POISON as u64),
        ("UFFD_FEATURE_WP_ASYNC", UFFD_FEATURE_WP_ASYNC as u64),
        ("UFFD_FEATURE_MOVE", UFFD_FEATURE_MOVE as u64),
        ("UFFD_API_FEATURES", UFFD_API_FEATURES as u64),
        (
            "UFFDIO_REGISTER_MODE_MISSING",
            UFFDIO_REGISTER_MODE_MISSING as u64,
        ),
        ("UFFDIO_REGISTER_MODE_WP", UFFDIO_REGISTER_MODE_WP as u64),
        (
            "UFFDIO_REGISTER_MODE_MINOR",
            UFFDIO_REGISTER_MODE_MINOR as u64,
        ),
        ("UFFD_API_REGISTER_MODES", UFFD_API_REGISTER_MODES as u64),
        (
            "UFFDIO_COPY_MODE_DONTWAKE",
            UFFDIO_COPY_MODE_DONTWAKE as u64,
        ),
        ("UFFDIO_COPY_MODE_WP", UFFDIO_COPY_MODE_WP as u64),
        (
            "UFFDIO_ZEROPAGE_MODE_DONTWAKE",
            UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64,
        ),
        (
            "UFFDIO_WRITEPROTECT_MODE_WP",
            UFFDIO_WRITEPROTECT_MODE_WP as u64,
        ),
        (
            "UFFDIO_WRITEPROTECT_MODE_DONTWAKE",
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE as u64,
        ),
        (
            "UFFDIO_CONTINUE_MODE_DONTWAKE",
            UFFDIO_CONTINUE_MODE_DONTWAKE as u64,
        ),
        ("UFFDIO_CONTINUE_MODE_WP", UFFDIO_CONTINUE_MODE_WP as u64),
        (
            "UFFDIO_POISON_MODE_DONTWAKE",
            UFFDIO_POISON_MODE_DONTWAKE as u64,
        ),
        (
            "UFFDIO_MOVE_MODE_DONTWAKE",
            UFFDIO_MOVE_MODE_DONTWAKE as u64,
        ),
        (
            "UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES",
            UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES as u64,
        ),
    ]
}

/// (key, the crate's value) for struct sizes and field offsets.
fn layouts() -> Vec<(String, u64)> {
    let mut v = Vec::new();
    v.push(("sizeof uffd_msg".to_string(), size_of::<uffd_msg>() as u64));
    v.push((
        "offsetof uffd_msg.event".to_string(),
        offset_of!(uffd_msg, event) as u64,
    ));
    v.push((
        "offsetof uffd_msg.reserved1".to_string(),
        offset_of!(uffd_msg, reserved1) as u64,
    ));
    v.push((
        "offsetof uffd_msg.reserved2".to_string(),
        offset_of!(uffd_msg, reserved2) as u64,
    ));
    v.push((
        "offsetof uffd_msg.reserved3".to_string(),
        offset_of!(uffd_msg, reserved3) as u64,
    ));
    v.push((
        "offsetof uffd_msg.arg".to_string(),
        offset_of!(uffd_msg, arg) as u64,
    ));
    v.push((
        "sizeof uffdio_api".to_string(),
        size_of::<uffdio_api>() as u64,
    ));
    v.push((
        "offsetof uffdio_api.api".to_string(),
        offset_of!(uffdio_api, api) as u64,
    ));
    v.push((
        "offsetof uffdio_api.features".to_string(),
        offset_of!(uffdio_api, features) as u64,
    ));
    v.push((
        "offsetof uffdio_api.ioctls".to_string(),
        offset_of!(uffdio_api, ioctls) as u64,
    ));
    v.push((
        "sizeof uffdio_range".to_string(),
        size_of::<uffdio_range>() as u64,
    ));
    v.push((
        "offsetof uffdio_range.start".to_string(),
        offset_of!(uffdio_range, start) as u64,
    ));
    v.push((
        "offsetof uffdio_range.len".to_string(),
        offset_of!(uffdio_range, len) as u64,
    ));
    v.push((
        "sizeof uffdio_register".to_string(),
        size_of::<uffdio_register>() as u64,
    ));
    v.push((
        "offsetof uffdio_register.range".to_string(),
        offset_of!(uffdio_register, range) as u64,
    ));
    v.push((
        "offsetof uffdio_register.mode".to_string(),
        offset_of!(uffdio_register, mode) as u64,
    ));
    v.push((
        "offsetof uffdio_register.ioctls".to_string(),
        offset_of!(uffdio_register, ioctls) as u64,
    ));
    v.push((
        "sizeof uffdio_copy".to_string(),
        size_of::<uffdio_copy>() as u64,
    ));
    v.push((
        "offsetof uffdio_copy.dst".to_string(),
        offset_of!(uffdio_copy, dst) as u64,
    ));
    v.push((
        "offsetof uffdio_copy.src".to_string(),
        offset_of!(uffdio_copy, src) as u64,
    ));
    v.push((
        "offsetof uffdio_copy.len".to_string(),
        offset_of!(uffdio_copy, len) as u64,
    ));
    v.push((
        "offsetof uffdio_copy.mode".to_string(),
        offset_of!(uffdio_copy, mode) as u64,
    ));
    v.push((
        "offsetof uffdio_copy.copy".to_string(),
        offset_of!(uffdio_copy, copy) as u64,
    ));
    v.push((
        "sizeof uffdio_zeropage".to_string(),
        size_of::<uffdio_zeropage>() as u64,
    ));
    v.push((
        "offsetof uffdio_zeropage.range".to_string(),
        offset_of!(uffdio_zeropage, range) as u64,
    ));
    v.push((
        "offsetof uffdio_zeropage.mode".to_string(),
        offset_of!(uffdio_zeropage, mode) as u64,
    ));
    v.push((
        "offsetof uffdio_zeropage.zeropage".to_string(),
        offset_of!(uffdio_zeropage, zeropage) as u64,
    ));
    v.push((
        "sizeof uffdio_writeprotect".to_string(),
        size_of::<uffdio_writeprotect>() as u64,
    ));
    v.push((
        "offsetof uffdio_writeprotect.range".to_string(),
        offset_of!(uffdio_writeprotect, range) as u64,
    ));
    v.push((
        "offsetof uffdio_writeprotect.mode".to_string(),
        offset_of!(uffdio_writeprotect, mode) as u64,
    ));
    v.push((
        "sizeof uffdio_continue".to_string(),
        size_of::<uffdio_continue>() as u64,
    ));
    v.push((
        "offsetof uffdio_continue.range".to_string(),
        offset_of!(uffdio_continue, range) as u64,
    ));
    v.push((
        "offsetof uffdio_continue.mode".to_string(),
        offset_of!(uffdio_continue, mode) as u64,
    ));
    v.push((
        "offsetof uffdio_continue.mapped".to_string(),
        offset_of!(uffdio_continue, mapped) as u64,
    ));
    v.push((
        "sizeof uffdio_poison".to_string(),
        size_of::<uffdio_poison>() as u64,
    ));
    v.push((
        "offsetof uffdio_poison.range".to_string(),
        offset_of!(uffdio_poison, range) as u64,
    ));
    v.push((
        "offsetof uffdio_poison.mode".to_string(),
        offset_of!(uffdio_poison, mode) as u64,
    ));
    v.push((
        "offsetof uffdio_poison.updated".to_string(),
        offset_of!(uffdio_poison, updated) as u64,
    ));
    v.push((
        "sizeof uffdio_move".to_string(),
        size_of::<uffdio_move>() as u64,
    ));
    v.push((
        "offsetof uffdio_move.dst".to_string(),
        offset_of!(uffdio_move, dst) as u64,
    ));
    v.push((
        "offsetof uffdio_move.src".to_string(),
        offset_of!(uffdio_move, src) as u64,
    ));
    v.push((
        "offsetof uffdio_move.len".to_string(),
        offset_of!(uffdio_move, len) as u64,
    ));
    v.push((
        "offsetof uffdio_move.mode".to_string(),
        offset_of!(uffdio_move, mode) as u64,
    ));
    v.push((
        "offsetof uffdio_move.move".to_string(),
        offset_of!(uffdio_move, move_) as u64,
    ));
    v
}

fn c_program() -> String {
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\nint main(void) {\n",
    );
    for (name, _) in constants() {
        c += &format!(
            "#ifdef {name}\nprintf(\"{name} %llu\\n\", (unsigned long long)({name}));\n#endif\n"
        );
    }
    let structs: &[(&str, &[&str], Option<&str>)] = &[
        (
            "uffd_msg",
            &["event", "reserved1", "reserved2", "reserved3", "arg"],
            None,
        ),
        ("uffdio_api", &["api", "features", "ioctls"], None),
        ("uffdio_range", &["start", "len"], None),
        ("uffdio_register", &["range", "mode", "ioctls"], None),
        ("uffdio_copy", &["dst", "src", "len", "mode", "copy"], None),
        ("uffdio_zeropage", &["range", "mode", "zeropage"], None),
        ("uffdio_writeprotect", &["range", "mode"], None),
        ("uffdio_continue", &["range", "mode", "mapped"], None),
        (
            "uffdio_poison",
            &["range", "mode", "updated"],
            Some("UFFDIO_POISON"),
        ),
        (
            "uffdio_move",
            &["dst", "src", "len", "mode", "move"],
            Some("UFFDIO_MOVE"),
        ),
    ];
    for (s, fields, guard) in structs {
        if let Some(g) = guard {
            c += &format!("#ifdef {g}\n");
        }
        c += &format!("printf(\"sizeof {s} %zu\\n\", sizeof(struct {s}));\n");
        for f in *fields {
            c += &format!("printf(\"offsetof {s}.{f} %zu\\n\", offsetof(struct {s}, {f}));\n");
        }
        if guard.is_some() {
            c += "#endif\n";
        }
    }
    c + "return 0;\n}\n"
}

#[test]
fn sys_matches_the_installed_kernel_header() {
    let dir = std::env::temp_dir().join(format!("tokio-uffd-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("abi.c");
    let bin = dir.join("abi");
    std::fs::write(&src, c_program()).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let compiled = match Command::new(&cc).arg(&src).arg("-o").arg(&bin).output() {
        Ok(out) => out,
        Err(e) => return common::skip(&format!("no C compiler ({cc}): {e}")),
    };
    assert!(
        compiled.status.success(),
        "compiling against <linux/userfaultfd.h> failed (install linux-libc-dev):\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let out = Command::new(&bin).output().unwrap();
    assert!(out.status.success());
    let _ = std::fs::remove_dir_all(&dir);

    let ours: BTreeMap<String, u64> = constants()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(layouts())
        .collect();
    let mut checked = 0;
    let mut mismatches = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let (key, value) = line.rsplit_once(' ').unwrap();
        let value: u64 = value.parse().unwrap();
        let mine = ours[key];
        // The aggregate masks grow with each kernel: an older header's mask
        // must be a subset of the crate's.
        let aggregate = matches!(
            key,
            "UFFD_API_RANGE_IOCTLS" | "UFFD_API_RANGE_IOCTLS_BASIC" | "UFFD_API_FEATURES"
        );
        if aggregate && value & !mine != 0 || !aggregate && mine != value {
            mismatches.push(format!("{key}: header {value:#x}, crate {mine:#x}"));
        }
        checked += 1;
    }
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
    // A 6.1 header defines at least these; fewer means the program checked
    // nothing real.
    assert!(checked >= 80, "only {checked} values were checked");
    eprintln!(
        "checked {checked} of {} values against the header",
        ours.len()
    );
}
