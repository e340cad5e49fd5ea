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
//! A VM that cannot be served correctly is stopped, never left to run on
//! wrong data: a region list that reaches past the end of the memory file
//! (the file of another snapshot) is refused when the VMM connects, and a
//! page that cannot be read later stops that VM's server
//! (`FailurePolicy::Stop`: the faulting vCPU stays asleep instead of being
//! given zeros or `SIGBUS` in the middle of guest code). Either way the
//! handler does what Firecracker's documentation asks of a failing handler:
//! it signals the VMM, whose pid comes with the socket's peer credentials
//! (`SO_PEERCRED`), with `SIGBUS` (Firecracker logs it and shuts the VM
//! down), then `SIGKILL` if it has not exited within a grace period. Only
//! once the VMM is gone is its userfaultfd closed (closing it earlier would
//! let the guest read zero pages). The other VMs are served on.
//!
//! ```text
//! cargo run --release --example firecracker_handler -- --socket /tmp/uffd.sock --mem-file snapshot.mem
//! ```

mod common;

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use common::{print_stats, LogArgs};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_uffd::{
    error_chain, AsyncUffd, FailurePolicy, FileSource, PageSource, Region, Server, ServerExit,
    SourceHandler, Uffd,
};

/// How long a VMM that was signalled to stop has before it is killed, and
/// then before the handler gives up waiting for it.
const GRACE: Duration = Duration::from_secs(2);

/// Serves Firecracker's guest memory from a snapshot's memory file over
/// userfaultfd (Firecracker's Uffd memory backend).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Unix socket to listen on (Firecracker's mem_backend.backend_path)
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The guest memory file of the snapshot
    #[arg(long, value_name = "PATH")]
    mem_file: PathBuf,
    /// Fault-around window in pages (1 turns it off)
    #[arg(long, value_name = "PAGES", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=common::MAX_WINDOW))]
    window: u64,
    /// Exit once N VMs have come and gone (default: serve forever)
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1 << 32))]
    exit_after: Option<u64>,
    /// Seconds a connected VMM has to send its regions and userfaultfd
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    connect_timeout: u64,
    #[command(flatten)]
    log: LogArgs,
}

/// One entry of the region list Firecracker sends. Unknown fields are
/// ignored; `page_size_kib` is the deprecated name of `page_size` (which,
/// despite its name, held bytes).
#[derive(Debug)]
struct GuestRegionUffdMapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    page_size: Option<usize>,
    page_size_kib: Option<usize>,
}

impl GuestRegionUffdMapping {
    /// Reads one entry of the JSON array (read as `serde_json::Value`s:
    /// five numbers do not need serde's derive macros in every example's
    /// build).
    fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let number = |name: &str| v.get(name).and_then(serde_json::Value::as_u64);
        let required = |name: &str| {
            number(name).ok_or_else(|| format!("a region without a numeric `{name}`: {v}"))
        };
        let size = |n: u64| {
            usize::try_from(n).map_err(|_| format!("{n} does not fit this machine's usize"))
        };
        Ok(Self {
            base_host_virt_addr: required("base_host_virt_addr")?,
            size: size(required("size")?)?,
            offset: required("offset")?,
            page_size: number("page_size").map(size).transpose()?,
            page_size_kib: number("page_size_kib").map(size).transpose()?,
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::init_tracing(args.log);
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Into::into)
        .and_then(|rt| rt.block_on(serve(&args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mem_file = &args.mem_file;
    let source = FileSource::open(mem_file).map_err(|e| {
        format!(
            "cannot open the guest memory file {}: {e}",
            mem_file.display()
        )
    })?;
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    println!(
        "listening on {} for Firecracker, serving {} ({} bytes)",
        args.socket.display(),
        mem_file.display(),
        source.len()
    );
    let vm = VmConfig {
        source,
        mem_file: mem_file.display().to_string(),
        window: args.window as usize,
        connect_timeout: Duration::from_secs(args.connect_timeout),
    };
    let mut vms = tokio::task::JoinSet::new();
    let mut next_vm = 0u64;
    let mut gone = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                next_vm += 1;
                let vm = vm.clone();
                vms.spawn(async move {
                    let id = next_vm;
                    if let Err(e) = serve_vm(id, stream, vm).await {
                        println!("VM {id}: {e}");
                    }
                });
            }
            Some(done) = vms.join_next() => {
                if let Err(e) = done {
                    println!("a VM's handler panicked: {e}");
                }
                gone += 1;
                if args.exit_after.is_some_and(|n| gone >= n) {
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// What every VM's task needs.
#[derive(Clone)]
struct VmConfig {
    source: FileSource,
    mem_file: String,
    window: usize,
    connect_timeout: Duration,
}

/// Serves one VM: receive its userfaultfd and regions, check them against
/// the memory file, serve until the VMM hangs up or exits; stop the VMM if
/// it cannot be served.
async fn serve_vm(vm: u64, mut stream: UnixStream, cfg: VmConfig) -> Result<(), String> {
    let pid = nix::sys::socket::getsockopt(&stream, sockopt::PeerCredentials)
        .map(|c| c.pid())
        .map_err(|e| format!("no peer credentials on the socket: {e}"))?;
    let (fd, mappings) = tokio::time::timeout(cfg.connect_timeout, receive(&mut stream))
        .await
        .map_err(|_| {
            format!(
                "the VMM (pid {pid}) sent no regions within {:?}",
                cfg.connect_timeout
            )
        })?
        .map_err(|e| format!("the VMM (pid {pid}): {e}"))?;
    let uffd = Uffd::from_fd(fd).map_err(|e| format!("the VMM (pid {pid}): {e}"))?;
    let page = uffd.page_size();
    let file_len = cfg.source.len();
    let mut regions = Vec::with_capacity(mappings.len());
    for (i, m) in mappings.iter().enumerate() {
        let end = m.offset.checked_add(m.size as u64);
        if end.is_none_or(|end| end > file_len) {
            let why = format!(
                "refused: region {i} (offset {:#x}, {:#x} bytes) ends past the end of the memory file {} ({file_len:#x} bytes): the VM would read wrong or no data",
                m.offset, m.size, cfg.mem_file
            );
            println!("VM {vm} (pid {pid}): {why}");
            stop_vmm(vm, pid, &mut stream).await;
            drop(uffd); // only now: the VMM is gone
            return Ok(());
        }
        let page_size = m.page_size.or(m.page_size_kib).unwrap_or(page);
        let start = m.base_host_virt_addr as usize;
        regions.push(
            Region::new(start..start.saturating_add(m.size))
                .with_page_size(page_size)
                .with_offset(m.offset),
        );
    }
    println!(
        "VM {vm} (pid {pid}): {} region(s), {:.1} MiB, features {:?}",
        regions.len(),
        regions.iter().map(|r| r.len()).sum::<usize>() as f64 / (1 << 20) as f64,
        uffd.features()
    );
    let uffd = AsyncUffd::new(uffd).map_err(|e| format!("pid {pid}: {e}"))?;
    let started = Instant::now();
    let busy = Arc::new(Busy::default());
    let source = Timed {
        inner: cfg.source,
        busy: busy.clone(),
    };
    // Stop, not poison: a guest must not take SIGBUS in the middle of its
    // code; the VMM is stopped below instead.
    let keep = uffd.clone();
    let server = match Server::new(uffd, SourceHandler::new(source)).regions(regions) {
        Ok(server) => server,
        Err(e) => {
            println!("VM {vm} (pid {pid}): refused: {e}");
            stop_vmm(vm, pid, &mut stream).await;
            drop(keep); // only now: the VMM is gone
            return Ok(());
        }
    };
    drop(keep);
    let mut handle = server
        .prefetch(cfg.window)
        .on_failure(FailurePolicy::Stop)
        .spawn();
    let stats = handle.stats_ref();
    // The VMM never writes again: a read returning 0 bytes is its hang-up.
    let mut byte = [0u8; 1];
    let failed = tokio::select! {
        exit = handle.join() => match exit {
            Ok(ServerExit::ProcessExited) => {
                println!("VM {vm}: the VMM's process exited");
                None
            }
            Ok(exit) => {
                println!("VM {vm}: the server ended: {exit:?}");
                None
            }
            Err(e) => Some(error_chain(&e)),
        },
        _ = stream.read(&mut byte) => {
            handle.stop();
            let _ = handle.join().await;
            println!("VM {vm}: the VMM hung up");
            None
        }
    };
    if let Some(why) = &failed {
        println!("VM {vm} (pid {pid}): serving failed: {why}");
        stop_vmm(vm, pid, &mut stream).await;
    }
    drop(handle); // the userfaultfd closes only after the VMM is gone
    let s = stats.snapshot();
    println!(
        "VM {vm}: connected for {:.3} s; {} Remove event(s), {} page(s) zeroed after a Remove, {} poisoned, {} failure(s)",
        started.elapsed().as_secs_f64(),
        s.removes,
        s.pages_zeroed_after_remove,
        s.poisoned,
        s.handler_failures
    );
    let failures = common::failures(&stats);
    if !failures.is_empty() {
        println!("VM {vm}: {failures}");
    }
    // The rate over the time a page read was in flight, not the VM's life.
    println!("VM {vm}: figures over the time spent serving (a page read in flight):");
    print_stats(&s, busy.total());
    Ok(())
}

/// Stops a VMM that cannot be served: `SIGBUS` (Firecracker logs it and
/// shuts down), `SIGKILL` if it has not hung up within [`GRACE`], and waits
/// (bounded) until it has, so that its userfaultfd is closed only then.
async fn stop_vmm(vm: u64, pid: i32, stream: &mut UnixStream) {
    let pid = Pid::from_raw(pid);
    let mut byte = [0u8; 1];
    for signal in [Signal::SIGBUS, Signal::SIGKILL] {
        match kill(pid, signal) {
            Ok(()) => println!("VM {vm}: sent {signal} to the VMM (pid {pid})"),
            Err(e) => println!("VM {vm}: cannot signal the VMM (pid {pid}): {e}"),
        }
        // Its socket hangs up when it has exited.
        if let Ok(Ok(0)) = tokio::time::timeout(GRACE, stream.read(&mut byte)).await {
            println!("VM {vm}: the VMM (pid {pid}) is gone");
            return;
        }
    }
    println!("VM {vm}: the VMM (pid {pid}) still holds its socket after SIGKILL");
}

/// Time during which at least one page read is in flight.
#[derive(Default)]
struct Busy {
    /// Reads in flight, since when the count was last above zero, and
    /// the busy time of the intervals already ended.
    state: Mutex<(usize, Option<Instant>, Duration)>,
}

impl Busy {
    fn enter(&self) {
        let mut s = self.state.lock().unwrap();
        if s.0 == 0 {
            s.1 = Some(Instant::now());
        }
        s.0 += 1;
    }

    fn leave(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 -= 1;
        if s.0 == 0 {
            if let Some(since) = s.1.take() {
                s.2 += since.elapsed();
            }
        }
    }

    fn total(&self) -> Duration {
        let s = self.state.lock().unwrap();
        s.2 + s.1.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Leaves [`Busy`] when dropped (a cancelled read too).
struct InFlight<'a>(&'a Busy);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A page source that measures the time spent reading.
struct Timed<S> {
    inner: S,
    busy: Arc<Busy>,
}

impl<S: PageSource> PageSource for Timed<S> {
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.busy.enter();
        let _in_flight = InFlight(&self.busy);
        self.inner.read_at(offset, buf).await
    }

    fn bytes_at(&self, offset: u64, len: usize) -> Option<&[u8]> {
        self.inner.bytes_at(offset, len)
    }
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
        match serde_json::from_slice::<Vec<serde_json::Value>>(&json) {
            Ok(values) => {
                let regions = values
                    .iter()
                    .map(GuestRegionUffdMapping::from_json)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("bad region list: {e}"))
                    })?;
                return Ok((fd, regions));
            }
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

/// One `recvmsg(2)` (non-blocking, close-on-exec): bytes into `buf`, and
/// the first fd attached if any (others are closed).
fn recv_with_fd(sock: i32, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
    let msg = recvmsg::<UnixAddr>(
        sock,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut first = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in our table for us;
                // nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if first.is_none() {
                    first = Some(fd);
                }
            }
        }
    }
    Ok((msg.bytes, first))
}
