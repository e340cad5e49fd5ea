//! A page-fault handler for Firecracker snapshot restore, built on the
//! crate's `Server`.
//!
//! Firecracker, when it loads a snapshot with a `Uffd` memory backend,
//! creates a userfaultfd (`EVENT_REMOVE`), registers guest memory, connects
//! to this handler's Unix socket and sends, in one `sendmsg`, the JSON list
//! of guest memory regions with the userfaultfd attached (`SCM_RIGHTS`):
//!
//! ```text
//! [{"base_host_virt_addr":139797226061824,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]
//! ```
//!
//! The handler serves every region from the guest memory file at its
//! offset, with fault-around. Pages the guest's balloon frees (`Remove`) are
//! served as zeros afterwards, as Firecracker's own on-demand handler does.
//! Several VMs (connections) are served at once. When a VMM exits its
//! socket hangs up while its userfaultfd just goes silent: that ends that
//! VM's server.
//!
//! ```text
//! cargo run --release --example firecracker_handler -- --socket /tmp/uffd.sock --mem-file snapshot.mem
//! ```

mod common;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use common::{print_stats, Flags};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_uffd::{AsyncUffd, FileSource, Region, Server, ServerExit, SourceHandler, Uffd};

const USAGE: &str =
    "usage: firecracker_handler --socket PATH --mem-file PATH [--window PAGES] [--exit-after N]

  --socket PATH     Unix socket to listen on (Firecracker's mem_backend.backend_path)
  --mem-file PATH   the guest memory file of the snapshot
  --window PAGES    fault-around window in pages (default 16)
  --exit-after N    exit once N VMs have come and gone (default: serve forever)";

/// One entry of the region list Firecracker sends. Unknown fields are
/// ignored; `page_size_kib` is the deprecated name of `page_size` (which,
/// despite its name, held bytes).
#[derive(Debug, Deserialize)]
struct GuestRegionUffdMapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    #[serde(default)]
    page_size: Option<usize>,
    #[serde(default)]
    page_size_kib: Option<usize>,
}

fn main() -> ExitCode {
    let flags = Flags::parse(USAGE, &[]);
    flags.only(&["socket", "mem-file", "window", "exit-after"]);
    let (Some(socket), Some(mem_file)) = (flags.string("socket"), flags.string("mem-file")) else {
        eprintln!("error: --socket and --mem-file are required\n{USAGE}");
        return ExitCode::from(2);
    };
    let window = flags.number("window", 16);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let exit_after = flags
        .string("exit-after")
        .map(|_| flags.number("exit-after", 1));
    match rt.block_on(serve(socket.into(), mem_file.into(), window, exit_after)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    socket: PathBuf,
    mem_file: PathBuf,
    window: usize,
    exit_after: Option<usize>,
) -> Result<(), Box<dyn std::error::Error>> {
    let source = FileSource::open(&mem_file).map_err(|e| {
        format!(
            "cannot open the guest memory file {}: {e}",
            mem_file.display()
        )
    })?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    println!(
        "listening on {} for Firecracker, serving {}",
        socket.display(),
        mem_file.display()
    );
    let mut vms = tokio::task::JoinSet::new();
    let mut next_vm = 0;
    let mut gone = 0;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                next_vm += 1;
                vms.spawn(serve_vm(next_vm, stream, source.clone(), window));
            }
            Some(done) = vms.join_next() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("a VM's handler failed: {e}"),
                    Err(e) => eprintln!("a VM's handler panicked: {e}"),
                }
                gone += 1;
                if exit_after.is_some_and(|n| gone >= n) {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Serves one VM: receive its userfaultfd and regions, serve until the VMM
/// hangs up or exits.
async fn serve_vm(
    vm: u32,
    mut stream: UnixStream,
    source: FileSource,
    window: usize,
) -> Result<(), String> {
    let (fd, regions) = receive(&mut stream)
        .await
        .map_err(|e| format!("VM {vm}: {e}"))?;
    let uffd = Uffd::from_fd(fd).map_err(|e| format!("VM {vm}: {e}"))?;
    let page = uffd.page_size();
    let regions: Vec<Region> = regions
        .iter()
        .map(|r| {
            let page_size = r.page_size.or(r.page_size_kib).unwrap_or(page);
            Region::new(r.base_host_virt_addr as usize, r.size, page_size, r.offset)
        })
        .collect();
    println!(
        "VM {vm}: {} region(s), {:.1} MiB, features {:?}",
        regions.len(),
        regions.iter().map(|r| r.len).sum::<usize>() as f64 / (1 << 20) as f64,
        uffd.features()
    );
    let uffd = AsyncUffd::new(uffd).map_err(|e| format!("VM {vm}: {e}"))?;
    let started = Instant::now();
    let mut handle = Server::new(uffd, SourceHandler::new(source))
        .regions(regions)
        .prefetch(window)
        .spawn();
    let stats = handle.stats_ref();
    // The VMM never writes again: a read returning 0 bytes is its hang-up.
    let mut byte = [0u8; 1];
    let how = tokio::select! {
        exit = handle.join() => match exit {
            Ok(ServerExit::ProcessExited) => "the VMM's process exited".to_string(),
            Ok(exit) => format!("the server ended: {exit:?}"),
            Err(e) => format!("the server failed: {e}"),
        },
        _ = stream.read(&mut byte) => {
            handle.stop();
            let _ = handle.join().await;
            "the VMM hung up".to_string()
        }
    };
    println!("VM {vm}: {how}");
    print_stats(&stats.snapshot(), started.elapsed());
    Ok(())
}

/// Receives Firecracker's one message: the JSON region list with the
/// userfaultfd attached.
async fn receive(stream: &mut UnixStream) -> io::Result<(OwnedFd, Vec<GuestRegionUffdMapping>)> {
    let mut json = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let fd = loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || {
            recv_with_fd(stream.as_raw_fd(), &mut buf)
        }) {
            Ok((0, _)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer hung up before sending its regions",
                ))
            }
            Ok((n, fd)) => {
                json.extend_from_slice(&buf[..n]);
                match fd {
                    Some(fd) => break fd,
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the first message carried no file descriptor",
                        ))
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // The JSON has no terminator: read until it parses.
    loop {
        match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(&json) {
            Ok(regions) => return Ok((fd, regions)),
            Err(e) if e.is_eof() => {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("truncated region list: {e}"),
                    ));
                }
                json.extend_from_slice(&buf[..n]);
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad region list: {e}"),
                ))
            }
        }
    }
}

/// One `recvmsg(2)`: bytes into `buf`, and the fd if one is attached.
fn recv_with_fd(sock: i32, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for a few fds; only the first is kept, the others closed.
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(4 * std::mem::size_of::<i32>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at live, writable buffers.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut first = None;
    // SAFETY: walking the control messages the kernel wrote into `cbuf`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<i32>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<i32>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if first.is_none() {
                        first = Some(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, first))
}
