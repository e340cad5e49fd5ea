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
//! The memory file is mapped read-only (`MmapSource`): a fault whose pages
//! are in the page cache is served with one `UFFDIO_COPY` straight from the
//! mapping, as in Firecracker's own example handler. The file must not be
//! written or truncated while it is served; if it shrinks anyway, the pages
//! past its new end cannot be served and the VM is stopped as above (the
//! handler's own process gets no `SIGBUS`).
//!
//! # Recording and prefetching the working set
//!
//! A restored guest touches much the same pages every time it is restored.
//! With `--record FILE` the handler records, per VM, the pages the guest
//! faulted (with their fault-around neighbours) in first-touch order, and
//! saves them to FILE when the VM disconnects (its VMM hangs up or exits;
//! not when it is stopped for a failure). The regions are recorded by what
//! identifies them, each one's offset in the memory file, length and page
//! size, so the set applies to the next restore of the same snapshot
//! wherever Firecracker maps the guest's memory. Several VMs at once each
//! record their own set and save it when they leave (written to a temporary
//! file and renamed: FILE is always whole): FILE then holds the set of the
//! VM that left last.
//!
//! With `--warm FILE` every VM's server prefetches that set in the
//! background, in recorded order, from the moment the VMM connects, while
//! faults are served as usual. A set recorded for another region layout
//! (another snapshot) is not used for that VM, which is then served on
//! demand (the handler says so). `--fill` copies every other page too, in
//! the background after the prefetch, so that the guest stops faulting
//! (`--fill-rate` bounds its rate). Each VM's figures at the end say how
//! many pages were prefetched, how many faults came ahead of the prefetch,
//! and when every page was resident.
//!
//! # A memory file in object storage
//!
//! Built with the `object-store` feature, `--mem-file s3://BUCKET/KEY`
//! serves the guest memory from an S3 object through `ObjectStoreSource`
//! (ranged GETs of `--chunk` KiB, a cache of `--cache` MiB), one source
//! shared by every VM, so VMs restored from the same snapshot share the
//! chunks fetched; credentials from the usual `AWS_*` environment
//! variables, `--endpoint` for an S3-compatible server (see
//! `common/object.rs`). The region list is checked against the object's
//! length as it is against a file's. The warm prefetch and the fill keep 8
//! copies in flight, a source chunk each: each waits a network round trip.
//! Each VM's figures end with the object store's (over all VMs so far).
//!
//! ```text
//! cargo run --release --example firecracker_handler -- --socket /tmp/uffd.sock --mem-file snapshot.mem
//! cargo run --release --example firecracker_handler -- --socket /tmp/uffd.sock --mem-file snapshot.mem --record snapshot.ws
//! cargo run --release --example firecracker_handler -- --socket /tmp/uffd.sock --mem-file snapshot.mem --warm snapshot.ws --fill
//! cargo run --release --features object-store --example firecracker_handler -- --socket /tmp/uffd.sock \
//!     --mem-file s3://snapshots/vm1.mem --endpoint http://127.0.0.1:9000
//! ```

mod common;

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::object::{Image, ObjectArgs, Probe, Remote, REMOTE_BACKGROUND_CONCURRENCY};
use common::{print_stats, LogArgs};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recvmsg, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio_uffd::{
    error_chain, AsyncUffd, BoxedSource, FailurePolicy, Fill, MmapSource, Region, Server,
    ServerExit, SourceHandler, Uffd, WorkingSet,
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
    /// The guest memory file of the snapshot, or an object holding it
    /// (s3://BUCKET/KEY, with the object-store feature: see the options
    /// below)
    #[arg(long, value_name = "PATH|URL")]
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
    /// Record each VM's working set and save it to FILE when the VM
    /// disconnects (with several VMs, the last one to leave wins)
    #[arg(long, value_name = "FILE", conflicts_with = "warm")]
    record: Option<PathBuf>,
    /// Prefetch the working set saved in FILE (by --record) for every VM
    #[arg(long, value_name = "FILE")]
    warm: Option<PathBuf>,
    /// Copy every page of every VM in the background (after the prefetch
    /// of --warm), so that guests stop faulting
    #[arg(long)]
    fill: bool,
    /// Rate of the background fill per VM, in MiB/s [default: unbounded]
    #[arg(long, value_name = "MIBPS", requires = "fill",
          value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    fill_rate: Option<u64>,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    object: ObjectArgs,
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

/// The guest memory: its source, length, name, and for an object what
/// tells its source's statistics.
async fn open_memory(
    args: &Args,
) -> Result<(BoxedSource, u64, String, Option<Probe>), Box<dyn std::error::Error>> {
    match Image::parse(&args.mem_file)? {
        Image::File(mem_file) => {
            args.object.only_for_objects(&mem_file)?;
            // SAFETY: the memory file of a snapshot is not written or
            // truncated while it is served (the module docs say so). If it
            // shrinks anyway, the server hands the mapping only to the
            // kernel, whose copy from a page past the new end fails: that VM
            // is stopped, and this process gets no SIGBUS (MmapSource's
            // docs).
            let source = unsafe { MmapSource::open(&mem_file) }.map_err(|e| {
                format!(
                    "cannot open the guest memory file {}: {e}",
                    mem_file.display()
                )
            })?;
            let len = source.len();
            Ok((
                BoxedSource::new(source),
                len,
                mem_file.display().to_string(),
                None,
            ))
        }
        Image::Object(url) => {
            let remote = Remote::open(&url, &args.object).await?;
            // One source for every VM: VMs of the same snapshot share the
            // chunks fetched.
            let (source, probe) = remote.source().await?;
            Ok((source, remote.len(), remote.name(), Some(probe)))
        }
    }
}

async fn serve(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let (source, mem_len, mem_name, probe) = open_memory(args).await?;
    // Read (and checked) before any VM is served.
    let warm = match &args.warm {
        Some(path) => {
            let ws = WorkingSet::load(path).map_err(|e| {
                format!(
                    "cannot use the working set {}: {}",
                    path.display(),
                    error_chain(&e)
                )
            })?;
            println!(
                "prefetching the working set {} for every VM: {} pages in {} runs, {} region(s)",
                path.display(),
                ws.pages(),
                ws.runs().len(),
                ws.regions().len()
            );
            Some((Arc::new(ws), path.display().to_string()))
        }
        None => None,
    };
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
    println!(
        "listening on {} for Firecracker, serving {mem_name} ({mem_len} bytes)",
        args.socket.display(),
    );
    let vm = VmConfig {
        source: Arc::new(source),
        mem_len,
        mem_file: mem_name,
        probe,
        window: args.window as usize,
        connect_timeout: Duration::from_secs(args.connect_timeout),
        record: args.record.clone().map(Arc::new),
        warm,
        fill: args.fill.then_some(match args.fill_rate {
            Some(mibps) => Fill::BytesPerSecond(mibps << 20),
            None => Fill::Unbounded,
        }),
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
    source: Arc<BoxedSource>,
    /// The memory file's (or object's) length.
    mem_len: u64,
    mem_file: String,
    /// An object's source's statistics.
    probe: Option<Probe>,
    window: usize,
    connect_timeout: Duration,
    /// Where to save each VM's working set.
    record: Option<Arc<PathBuf>>,
    /// The working set to prefetch, and its file's name.
    warm: Option<(Arc<WorkingSet>, String)>,
    fill: Option<Fill>,
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
    let file_len = cfg.mem_len;
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
    let build = || {
        Server::new(uffd.clone(), SourceHandler::new(cfg.source.clone())).regions(regions.clone())
    };
    let mut server = match build() {
        Ok(server) => server,
        Err(e) => {
            println!("VM {vm} (pid {pid}): refused: {e}");
            stop_vmm(vm, pid, &mut stream).await;
            drop(uffd); // only now: the VMM is gone
            return Ok(());
        }
    };
    if let Some((ws, name)) = &cfg.warm {
        server = match server.warm(WorkingSet::clone(ws)) {
            Ok(server) => {
                println!("VM {vm}: prefetching the working set {name}");
                server
            }
            Err(e) => {
                // Only a prefetch hint: the VM is served on demand.
                println!(
                    "VM {vm}: not prefetching the working set {name}, serving on demand: {}",
                    error_chain(&e)
                );
                build().map_err(|e| format!("pid {pid}: {e}"))?
            }
        };
    }
    if cfg.record.is_some() {
        server = server.record();
    }
    if let Some(fill) = cfg.fill {
        server = server.fill(fill);
    }
    if let Some(probe) = &cfg.probe {
        // From an object, a background copy waits a network round trip:
        // more in flight, a source chunk (one GET) each.
        server = server
            .background_concurrency(REMOTE_BACKGROUND_CONCURRENCY)
            .background_chunk(usize::try_from(probe.chunk_size()).unwrap_or(usize::MAX));
    }
    // Stop, not poison: a guest must not take SIGBUS in the middle of its
    // code; the VMM is stopped below instead.
    let mut handle = server
        .prefetch(cfg.window)
        .on_failure(FailurePolicy::Stop)
        .spawn();
    // The server keeps its own handle to the userfaultfd.
    drop(uffd);
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
    let connected = started.elapsed();
    // The recorder outlives the server: what the guest faulted, all its life.
    let recorded = handle.working_set();
    drop(handle); // the userfaultfd closes only after the VMM is gone
    let s = stats.snapshot();
    println!(
        "VM {vm}: connected for {:.3} s; {} Remove event(s), {} page(s) zeroed after a Remove, {} poisoned, {} failure(s)",
        connected.as_secs_f64(),
        s.removes,
        s.pages_zeroed_after_remove,
        s.poisoned,
        s.handler_failures
    );
    let failures = common::failures(&stats);
    if !failures.is_empty() {
        println!("VM {vm}: {failures}");
    }
    if cfg.warm.is_some() || cfg.fill.is_some() {
        println!(
            "VM {vm}: restore: {} pages in the working set, {} prefetched, {} faults ahead of the prefetch, {} filled, {} background copies failed; {}",
            s.working_set_pages,
            s.pages_warmed,
            s.faults_ahead_of_prefetch,
            s.pages_filled,
            s.background_failures,
            match s.time_to_resident {
                Some(t) => format!("every page resident after {:.3} s", t.as_secs_f64()),
                None => "not every page was resident when it left".to_string(),
            }
        );
    }
    match (&cfg.record, recorded) {
        (Some(path), Some(ws)) if failed.is_none() => match save(&ws, path, vm) {
            Ok(()) => println!(
                "VM {vm}: working set of {} pages in {} runs saved to {}",
                ws.pages(),
                ws.runs().len(),
                path.display()
            ),
            Err(e) => println!("VM {vm}: cannot save its working set: {e}"),
        },
        (Some(_), _) => println!("VM {vm}: its working set is not saved: it was stopped"),
        _ => {}
    }
    println!(
        "VM {vm}: figures over the {:.3} s it was connected:",
        connected.as_secs_f64()
    );
    print_stats(&s, connected);
    if let Some(probe) = &cfg.probe {
        println!(
            "VM {vm}: object store so far (every VM's): {}",
            probe.stats()
        );
    }
    Ok(())
}

/// Saves `ws` to `path` whole: written to a file of its own, then renamed
/// over `path` (VMs leaving at once never interleave their writes).
fn save(ws: &WorkingSet, path: &Path, vm: u64) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{vm}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    ws.save(&tmp).map_err(|e| error_chain(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("renaming {} to {}: {e}", tmp.display(), path.display())
    })
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
