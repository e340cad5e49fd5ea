//! A remote restore (issue 14, feature `remote`): the 1 GiB image of the
//! restore group ([`restore`](super::restore)) as an object of an S3 server
//! on 127.0.0.1 (`s3s-fs`, started here over a directory of its own and
//! killed on drop), reached through a [`DelayProxy`] that makes every
//! request arrive 1 ms late (or relays it at once: 0 ms). The working-set
//! workload of the restore group (same threads, same writes, same runs)
//! runs on the restored memory, and a restore is timed, as there, from just
//! before the pages start to come until the last worker is done:
//!
//! - (a) a blocking handler: one thread reads the userfaultfd and, for each
//!   fault, makes one ranged GET of that page (object_store's S3 client on a
//!   current-thread runtime's `block_on`), waits for it, copies it in, and
//!   reads the next fault: what a synchronous handler does. Bounded: it
//!   serves the first [`RemoteSettings::blocking_touches`] touches of the
//!   run, and its time to ready is that time scaled to the run's touches
//!   (it serves one fault at a time, each the same GET);
//! - (b) the `Server` with an `ObjectStoreSource`, fault-around window 16;
//! - (c) the same, warm from the window-16 recording of the restore group;
//! - (d) the whole object downloaded first (ranged GETs in parallel) into
//!   fresh memory, then the workload run on it;
//! - at 0 ms, the same restore as (b) from the local image file
//!   (`MmapSource`, window 16).

use std::ops::{Deref, Range};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};
use tokio_uffd::{
    CopyFlags, Event, EventBuffer, ObjectStoreSource, StatsSnapshot, UffdBuilder, ZeropageFlags,
};

use super::crate_paths::register_all;
use super::delay_proxy::DelayProxy;
use super::memory::{page_size, touch, Mapping};
use super::restore::{Background, RestoreBench, RestoreCase, THREADS, WARM_WINDOW};
use super::workload::Plan;

/// The bucket (a directory of the server's) and the object's key (a file in
/// it).
const BUCKET: &str = "bench";
const KEY: &str = "image";
/// Where s3s-fs keeps what it knows of an object besides its bytes:
/// `.bucket-{base64url(bucket)}.object-{base64url(key)}.internal.json`.
/// With an `e_tag` in it, a GET answers with that; without one, s3s-fs
/// reads the whole object to hash it, on every GET (seconds for 1 GiB).
const INTERNAL_INFO: &str = ".bucket-YmVuY2g.object-aW1hZ2U.internal.json";
/// The object's entity tag, as s3s-fs gives it (from `INTERNAL_INFO`); the
/// source asks for it with every GET (`If-Match`), as one opened with a
/// `HEAD` would.
const E_TAG: &str = "\"00000000000000000000000000000001\"";
const ACCESS_KEY: &str = "tokio-uffd-bench";
const SECRET_KEY: &str = "tokio-uffd-bench-secret";

/// How the remote restores are made: the crate's settings under test,
/// chosen for this server, or, to try others,
/// `TOKIO_UFFD_BENCH_REMOTE=CHUNK_BYTES,JOBS,BACKGROUND_CHUNK_BYTES`.
#[derive(Debug, Clone, Copy)]
pub struct RemoteSettings {
    /// `ObjectStoreSourceBuilder::chunk_size` of (b) and (c).
    pub chunk: u64,
    /// The warm prefetch of (c): `Server::background_concurrency` and
    /// `background_chunk`.
    pub background: Background,
    /// Touches (over every worker) that (a) serves before its time is
    /// scaled to the whole run.
    pub blocking_touches: usize,
    /// (d): bytes per ranged GET, and GETs in flight.
    pub download_part: usize,
    /// See `download_part`.
    pub download_jobs: usize,
}

impl RemoteSettings {
    fn from_env() -> Self {
        let mut s = RemoteSettings {
            // A fault-around window of 16 pages: one GET per fault, and a
            // recording of aligned 16-page windows is fetched as it is,
            // with nothing around it.
            chunk: 64 << 10,
            // 4 copies of 256 KiB: 16 GETs of a chunk in flight, the
            // source's limit, enough to keep this server busy (its pace,
            // not the 1 ms, bounds the prefetch). With 2 the workers
            // overtook the prefetch and faulted on their own GETs (about
            // 280 faults ahead of it instead of 50): slower than
            // downloading everything first. The local group's 2 copies of
            // 1 MiB (32 GETs asked for at once, twice the source's limit,
            // faults queueing behind them for its permits) did about as
            // well here: 0.80 x (d)'s time, against 0.71-0.79.
            background: Background {
                jobs: 4,
                chunk: 256 << 10,
            },
            blocking_touches: 1500,
            download_part: 8 << 20,
            download_jobs: 16,
        };
        if let Ok(v) = std::env::var("TOKIO_UFFD_BENCH_REMOTE") {
            let n: Vec<usize> = v
                .split(',')
                .map(|x| x.trim().parse().ok())
                .collect::<Option<_>>()
                .filter(|n: &Vec<usize>| n.len() == 3)
                .unwrap_or_else(|| {
                    panic!("TOKIO_UFFD_BENCH_REMOTE={v:?}: give CHUNK,JOBS,BACKGROUND_CHUNK")
                });
            s.chunk = n[0] as u64;
            s.background = Background {
                jobs: n[1],
                chunk: n[2],
            };
        }
        s
    }
}

/// The restores of the remote group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteCase {
    /// (a): a blocking handler, one GET per fault.
    Blocking,
    /// (b): `Server` + `ObjectStoreSource`, window 16.
    OnDemand,
    /// (c): the same, warm from the window-16 recording.
    Warm,
    /// (d): the whole object downloaded, then the workload.
    Download,
    /// The same restore as (b) from the local image file.
    Local,
}

impl RemoteCase {
    /// Every case, in the order of the issue.
    pub const ALL: [RemoteCase; 5] = [
        RemoteCase::Blocking,
        RemoteCase::OnDemand,
        RemoteCase::Warm,
        RemoteCase::Download,
        RemoteCase::Local,
    ];

    /// Its letter in the issue.
    pub fn letter(self) -> &'static str {
        match self {
            RemoteCase::Blocking => "a",
            RemoteCase::OnDemand => "b",
            RemoteCase::Warm => "c",
            RemoteCase::Download => "d",
            RemoteCase::Local => "local",
        }
    }

    /// What it is, in a few words.
    pub fn name(self) -> &'static str {
        match self {
            RemoteCase::Blocking => "blocking handler, one ranged GET per fault",
            RemoteCase::OnDemand => "Server + ObjectStoreSource, window 16",
            RemoteCase::Warm => "warm (window-16 recording), Server + ObjectStoreSource",
            RemoteCase::Download => "download the whole object, then run",
            RemoteCase::Local => "local file: Server + MmapSource, window 16",
        }
    }

    /// Whether it reads the object store.
    pub fn remote(self) -> bool {
        self != RemoteCase::Local
    }
}

/// The figures of one remote restore.
#[derive(Debug, Clone, Copy)]
pub struct RemoteRestored {
    /// Time to ready of the whole run (for (a), the time measured scaled by
    /// `scale`).
    pub ready: Duration,
    /// The whole run's touches over the touches timed (1 but for (a)).
    pub scale: f64,
    /// Faults the handler served (scaled, for (a)).
    pub faults: f64,
    /// GETs made: the source's count, or (a)'s and (d)'s own (scaled, for
    /// (a)).
    pub requests: f64,
    /// Bytes of the object received (scaled, for (a)).
    pub bytes: f64,
    /// The server's statistics ((b), (c), local).
    pub stats: Option<StatsSnapshot>,
    /// (d): the download's part of `ready`.
    pub download: Option<Duration>,
}

/// An `s3s-fs` of the bench's own, serving a fresh directory, killed (and
/// the directory removed) on drop.
struct S3sFs {
    child: Child,
    dir: PathBuf,
    endpoint: String,
}

impl S3sFs {
    /// Starts it on a port the kernel picks; `Err` says why it could not.
    fn start() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("tokio-uffd-bench-s3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data").join(BUCKET))
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let log = dir.join("log");
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        // `s3s-fs` on PATH or where `cargo install` puts it.
        let mut path = std::env::var_os("PATH").unwrap_or_default();
        if let Some(home) = std::env::var_os("HOME") {
            let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
            dirs.push(PathBuf::from(home).join(".cargo/bin"));
            path = std::env::join_paths(dirs).map_err(|e| e.to_string())?;
        }
        let mut cmd = Command::new("s3s-fs");
        cmd.env("PATH", path)
            // The line that says where it listens is an INFO event.
            .env("RUST_LOG", "info")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(dir.join("data"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out);
        // SAFETY: prctl only asks the kernel to kill the server when the
        // thread that started it ends, so a bench that dies leaves none.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            format!("s3s-fs did not start ({e}); install it: cargo install s3s-fs@0.14.1 --features binary --locked")
        })?;
        let mut server = S3sFs {
            child,
            dir,
            endpoint: String::new(),
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(at) = text.find("http://127.0.0.1:") {
                let url: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_graphic())
                    .collect();
                server.endpoint = url.trim_end_matches('/').to_string();
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("s3s-fs exited ({status}):\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("s3s-fs did not say where it listens within 20 s".into())
    }

    fn addr(&self) -> std::net::SocketAddr {
        let host = self.endpoint.trim_start_matches("http://");
        host.parse()
            .unwrap_or_else(|e| panic!("{}: {e}", self.endpoint))
    }

    /// Puts `file` (its first `len` bytes) into the bucket as the object
    /// (an in-kernel copy, no upload), synced, with the `e_tag` s3s-fs
    /// answers GETs with.
    fn put_file(&self, file: &std::fs::File, len: usize) -> std::io::Result<()> {
        let data = self.dir.join("data");
        let dst = std::fs::File::create(data.join(BUCKET).join(KEY))?;
        let (mut off_in, mut off_out) = (0i64, 0i64);
        while (off_in as usize) < len {
            // SAFETY: a copy between two open files, at offsets of ours.
            let n = unsafe {
                libc::copy_file_range(
                    file.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    len - off_in as usize,
                    0,
                )
            };
            if n <= 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        dst.sync_all()?;
        std::fs::write(
            data.join(INTERNAL_INFO),
            format!("{{\"e_tag\":{:?}}}", E_TAG.trim_matches('"')),
        )
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The remote group's server, proxies and settings; the image, workload
/// and recordings are the restore group's.
pub struct RemoteBench {
    bench: Arc<RestoreBench>,
    // Dropped before the server (fields drop in order).
    plain: DelayProxy,
    delayed: DelayProxy,
    server: S3sFs,
    /// The delay of the delayed proxy.
    pub delay: Duration,
    /// How the restores are made.
    pub settings: RemoteSettings,
}

impl RemoteBench {
    /// The server started, the image put in it, two proxies in front of it
    /// (one forwarding at once, one holding every GET for `delay`); `Err`
    /// when there is no s3s-fs to start.
    pub fn start(bench: Arc<RestoreBench>, delay: Duration) -> Result<Self, String> {
        let server = S3sFs::start()?;
        let t0 = Instant::now();
        let image = bench.image();
        server
            .put_file(&image.file(), image.len())
            .map_err(|e| format!("putting the image into the bucket: {e}"))?;
        eprintln!(
            "remote: s3s-fs at {}, the {} MiB image copied into its bucket in {:.1} s",
            server.endpoint,
            image.len() >> 20,
            t0.elapsed().as_secs_f64()
        );
        let plain = DelayProxy::start(server.addr(), Duration::ZERO);
        let delayed = DelayProxy::start(server.addr(), delay);
        Ok(RemoteBench {
            bench,
            plain,
            delayed,
            server,
            delay,
            settings: RemoteSettings::from_env(),
        })
    }

    /// The restore group's bench (image, workload, recordings).
    pub fn bench(&self) -> &RestoreBench {
        &self.bench
    }

    fn proxy(&self, delayed: bool) -> &DelayProxy {
        if delayed {
            &self.delayed
        } else {
            &self.plain
        }
    }

    /// A new S3 client of the object's bucket, through the proxy.
    fn store(&self, delayed: bool) -> Arc<dyn ObjectStore> {
        let endpoint = self.proxy(delayed).endpoint();
        let store = AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_allow_http(true)
            // s3s-fs serves `/bucket/key`.
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_region("us-east-1")
            .build()
            .unwrap_or_else(|e| panic!("an S3 client for {endpoint}: {e}"));
        Arc::new(store)
    }

    /// The median time of `n` one-page GETs, one after another, through
    /// either proxy.
    pub fn round_trip(&self, delayed: bool, n: usize) -> Duration {
        let store = self.store(delayed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let page = page_size() as u64;
        let mut times: Vec<Duration> = (0..n as u64)
            .map(|i| {
                let t = Instant::now();
                let off = (i * 7919 % 1000) * page;
                rt.block_on(get(&*store, off..off + page)).expect("a GET");
                t.elapsed()
            })
            .collect();
        times.sort();
        times[n / 2]
    }

    /// The chunks of `chunk` bytes that hold a page of the window-16
    /// recording or a page run `run` touches: what (c) needs, at most.
    pub fn warm_chunks(&self, run: u64, chunk: u64) -> usize {
        let page = page_size() as u64;
        let mut chunks: Vec<u64> = self
            .bench
            .recorded(WARM_WINDOW)
            .runs()
            .iter()
            .flat_map(|r| (r.first..r.first + r.pages).map(|p| p * page / chunk))
            .chain(
                self.bench
                    .plan(run)
                    .touched()
                    .into_iter()
                    .map(|p| p as u64 * page / chunk),
            )
            .collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks.len()
    }

    /// One restore of `case` through either proxy, the workers running run
    /// `run` of the workload.
    pub fn restore(&self, case: RemoteCase, delayed: bool, run: u64) -> RemoteRestored {
        match case {
            RemoteCase::Blocking => self.blocking(delayed, run),
            RemoteCase::Download => self.download(delayed, run),
            RemoteCase::OnDemand | RemoteCase::Warm => self.served(case, delayed, run),
            RemoteCase::Local => {
                let r = self.bench.restore(RestoreCase::OnDemand(16), run);
                RemoteRestored {
                    ready: r.ready,
                    scale: 1.0,
                    faults: r.faults as f64,
                    requests: 0.0,
                    bytes: 0.0,
                    stats: r.stats,
                    download: None,
                }
            }
        }
    }

    /// (b) and (c).
    fn served(&self, case: RemoteCase, delayed: bool, run: u64) -> RemoteRestored {
        let source = ObjectStoreSource::builder(self.store(delayed), KEY)
            .chunk_size(self.settings.chunk)
            .len(self.bench.image().len() as u64)
            .e_tag(E_TAG)
            .open();
        // Told the length, it opens without a request.
        let source = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(source)
            .expect("the source opened");
        let case = match case {
            RemoteCase::Warm => RestoreCase::Warm(WARM_WINDOW),
            _ => RestoreCase::OnDemand(16),
        };
        // Both with fault-around window 16: (c) is (b) warm.
        let background = self.settings.background;
        let (_, r) = self
            .bench
            .serve(source.clone(), case, 16, run, false, background);
        let s = source.stats();
        assert_eq!(s.failures, 0, "failed reads: {s:?}");
        RemoteRestored {
            ready: r.ready,
            scale: 1.0,
            faults: r.faults as f64,
            requests: s.requests as f64,
            bytes: s.bytes_fetched as f64,
            stats: r.stats,
            download: None,
        }
    }

    /// (a): the first touches of the run, served by one blocking thread.
    fn blocking(&self, delayed: bool, run: u64) -> RemoteRestored {
        let full = self.bench.plan(run);
        let per_worker = self.settings.blocking_touches.div_ceil(THREADS);
        let plan = Arc::new(Plan {
            threads: full
                .threads
                .iter()
                .map(|t| t[..per_worker.min(t.len())].to_vec())
                .collect(),
        });
        let scale = full.touches() as f64 / plan.touches() as f64;
        let page = page_size();
        let len = self.bench.image().len();
        let mem = Mapping::new(len);
        let base = mem.addr;
        let uffd = Arc::new(register_all(UffdBuilder::new().blocking(true), &mem));
        // A page no worker touches: the main thread faults it when the
        // workers are done, to stop the handler.
        let touched = plan.touched();
        let sentinel = (0..len / page)
            .rev()
            .find(|p| touched.binary_search(p).is_err())
            .expect("a page nobody touches")
            * page
            + base;
        let store = self.store(delayed);
        let u = uffd.clone();
        let handler = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut buf = EventBuffer::new(16);
            let (mut faults, mut bytes) = (0u64, 0u64);
            loop {
                if u.read_events(&mut buf).is_err() {
                    continue;
                }
                while let Some(Ok(Event::PageFault(f))) = buf.next_event() {
                    let addr = f.page_start(page);
                    if addr == sentinel {
                        let _ = u.zeropage(addr, page, ZeropageFlags::empty());
                        return (faults, bytes);
                    }
                    let off = (addr - base) as u64;
                    let data = match rt.block_on(get(&*store, off..off + page as u64)) {
                        Ok(data) => data,
                        Err(e) => {
                            // The workers would wait for this page forever.
                            eprintln!("remote (a): GET of page {}: {e}", off / page as u64);
                            std::process::exit(1);
                        }
                    };
                    faults += 1;
                    bytes += data.len() as u64;
                    if u.copy(addr, &data[..], CopyFlags::empty()).is_err() {
                        let _ = u.wake(addr, page);
                    }
                }
            }
        });
        let workers = self.bench.start_workers(&plan);
        let t0 = Instant::now();
        let out = workers.run(base);
        let ready = out.restored(t0, None).ready;
        touch(sentinel);
        let (faults, bytes) = handler.join().expect("the blocking handler");
        self.bench.check(base, &plan);
        RemoteRestored {
            ready: ready.mul_f64(scale),
            scale,
            faults: faults as f64 * scale,
            // One GET per fault.
            requests: faults as f64 * scale,
            bytes: bytes as f64 * scale,
            stats: None,
            download: None,
        }
    }

    /// (d): ranged GETs of the whole object into fresh memory, in parallel,
    /// then the workload on it.
    fn download(&self, delayed: bool, run: u64) -> RemoteRestored {
        let plan = Arc::new(self.bench.plan(run));
        let len = self.bench.image().len();
        let mem = Mapping::new(len);
        let base = mem.addr;
        let store = self.store(delayed);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(THREADS)
            .enable_all()
            .build()
            .unwrap();
        let (part, jobs) = (self.settings.download_part, self.settings.download_jobs);
        let workers = self.bench.start_workers(&plan);
        let t0 = Instant::now();
        let bytes: usize = rt.block_on(async {
            let parts = futures::stream::iter((0..len).step_by(part)).map(|start| {
                let store = store.clone();
                let end = (start + part).min(len);
                // A task each, so that the copies run on both workers.
                tokio::spawn(async move {
                    let data = get(&*store, start as u64..end as u64)
                        .await
                        .unwrap_or_else(|e| panic!("GET of bytes {start}..{end}: {e}"));
                    assert_eq!(data.len(), end - start, "GET of bytes {start}..{end}");
                    // SAFETY: bytes `start..end` of the fresh mapping at
                    // `base`, written by this task only, before the workers
                    // are let go.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut((base + start) as *mut u8, end - start)
                    };
                    dst.copy_from_slice(&data);
                    data.len()
                })
            });
            let done: Vec<_> = parts.buffer_unordered(jobs).collect().await;
            done.into_iter().map(|r| r.expect("a download task")).sum()
        });
        let downloaded = t0.elapsed();
        let out = workers.run(base);
        let ready = out.restored(t0, None).ready;
        self.bench.check(base, &plan);
        RemoteRestored {
            ready,
            scale: 1.0,
            faults: 0.0,
            requests: len.div_ceil(part) as f64,
            bytes: bytes as f64,
            stats: None,
            download: Some(downloaded),
        }
    }
}

/// One ranged GET of the object.
async fn get(
    store: &dyn ObjectStore,
    range: Range<u64>,
) -> object_store::Result<impl Deref<Target = [u8]>> {
    let options = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    store
        .get_opts(&ObjectPath::from(KEY), options)
        .await?
        .bytes()
        .await
}
