//! An S3-compatible server for the object-store tests, and the stores that
//! reach it.
//!
//! The server is the one `.ci/run` started, named by the environment
//! (`TOKIO_UFFD_S3_ENDPOINT`, `TOKIO_UFFD_S3_ACCESS_KEY`,
//! `TOKIO_UFFD_S3_SECRET_KEY`, `TOKIO_UFFD_S3_BUCKET`); without those, an
//! `s3s-fs` of the test's own (found on `PATH` or in `~/.cargo/bin`) on a
//! port the kernel picks, over a fresh directory, killed and removed when
//! the test is done. Without either the test says so loudly, and fails
//! under `CI=true`.

#![allow(dead_code, unreachable_pub)]

pub mod proxy;

use std::io::Read;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use crate::common::{skip, BOUND};

/// The server's URL, `http://127.0.0.1:PORT`.
pub const ENDPOINT_VAR: &str = "TOKIO_UFFD_S3_ENDPOINT";
/// Its access key.
pub const ACCESS_KEY_VAR: &str = "TOKIO_UFFD_S3_ACCESS_KEY";
/// Its secret key.
pub const SECRET_KEY_VAR: &str = "TOKIO_UFFD_S3_SECRET_KEY";
/// A bucket that exists on it.
pub const BUCKET_VAR: &str = "TOKIO_UFFD_S3_BUCKET";

/// Credentials and bucket of a server the tests start themselves.
const OWN_ACCESS_KEY: &str = "tokio-uffd-test";
const OWN_SECRET_KEY: &str = "tokio-uffd-test-secret";
const OWN_BUCKET: &str = "tokio-uffd";

/// What the tests need installed, and how.
const INSTALL: &str = "cargo install s3s-fs@0.14.1 --features binary --locked";

/// An S3-compatible server the test may use.
pub struct S3 {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// Set when the server is this test's own.
    own: Option<OwnServer>,
}

/// How the tests' S3 client behaves: its own retries (object_store's
/// `RetryConfig`, with short backoffs) and its request timeout.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// Requests made again by the client after a 5xx answer, a lost
    /// connection, a timeout or a body cut short.
    pub max_retries: usize,
    /// The most a request (answer and body) may take.
    pub timeout: Duration,
}

impl Default for Client {
    fn default() -> Self {
        Self {
            max_retries: 2,
            timeout: Duration::from_secs(5),
        }
    }
}

impl S3 {
    /// The server from the environment, or one of our own; `None` (loudly,
    /// a failure under `CI=true`) when there is neither.
    pub fn get() -> Option<S3> {
        if let Ok(endpoint) = std::env::var(ENDPOINT_VAR) {
            let var = |name: &str| {
                std::env::var(name)
                    .unwrap_or_else(|_| panic!("{ENDPOINT_VAR} is set, but {name} is not"))
            };
            let s3 = S3 {
                access_key: var(ACCESS_KEY_VAR),
                secret_key: var(SECRET_KEY_VAR),
                bucket: var(BUCKET_VAR),
                endpoint,
                own: None,
            };
            let addr = s3.addr();
            if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                panic!(
                    "{ENDPOINT_VAR}={}: nothing answers there ({e}); is the server .ci/run \
                     started still running?",
                    s3.endpoint
                );
            }
            return Some(s3);
        }
        let Some(binary) = find_s3s_fs() else {
            skip(&format!(
                "the object-store tests need an S3-compatible server: none is named by \
                 {ENDPOINT_VAR} (.ci/run starts one), and no s3s-fs binary is on PATH or in \
                 ~/.cargo/bin to start one (install it: {INSTALL})"
            ));
            return None;
        };
        match OwnServer::start(&binary) {
            Ok((own, endpoint)) => Some(S3 {
                endpoint,
                access_key: OWN_ACCESS_KEY.into(),
                secret_key: OWN_SECRET_KEY.into(),
                bucket: OWN_BUCKET.into(),
                own: Some(own),
            }),
            Err(why) => {
                skip(&format!(
                    "cannot start an S3 server for the object-store tests: {} {why}",
                    binary.display()
                ));
                None
            }
        }
    }

    /// The server's socket address.
    pub fn addr(&self) -> SocketAddr {
        endpoint_addr(&self.endpoint)
    }

    /// A store on the server with the default [`Client`].
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store_via(&self.endpoint, Client::default())
    }

    /// A store on the server reached through `endpoint` (a proxy in front of
    /// it, or the server itself).
    pub fn store_via(&self, endpoint: &str, client: Client) -> Arc<dyn ObjectStore> {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(40),
                base: 2.0,
            },
            max_retries: client.max_retries,
            retry_timeout: Duration::from_secs(10),
        };
        let options = ClientOptions::new()
            .with_timeout(client.timeout)
            .with_connect_timeout(Duration::from_secs(2));
        let store = AmazonS3Builder::new()
            // First: `with_allow_http` sets an option of these.
            .with_client_options(options)
            .with_endpoint(endpoint)
            .with_allow_http(true)
            // s3s-fs serves path-style URLs (`/bucket/key`) unless started
            // with `--domain`.
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_region("us-east-1")
            .with_retry(retry)
            .build()
            .unwrap_or_else(|e| panic!("an S3 store for {endpoint}: {e}"));
        Arc::new(store)
    }

    /// A key of the bucket no other test (of this or another run) uses.
    pub fn fresh_key(&self, test: &str) -> Path {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Path::from(format!(
            "{test}/{}-{n}-{nanos:08x}/mem.snap",
            std::process::id()
        ))
    }

    /// Uploads `data` as `key` (one PUT), waiting at most `BOUND`.
    pub async fn upload(&self, key: &Path, data: &[u8]) {
        let store = self.store();
        let put = store.put(key, PutPayload::from(data.to_vec()));
        match tokio::time::timeout(BOUND, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "uploading {key} to {}: {}",
                self.endpoint,
                tokio_uffd::error_chain(&e)
            ),
            Err(_) => panic!(
                "uploading {key} to {}: no answer within {BOUND:?}",
                self.endpoint
            ),
        }
    }
}

/// `http://HOST:PORT[/]` as a socket address.
pub fn endpoint_addr(endpoint: &str) -> SocketAddr {
    let host = endpoint
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{endpoint}: not an http:// URL"))
        .trim_end_matches('/');
    host.to_socket_addrs()
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{endpoint}: no address"))
}

/// `s3s-fs` on `PATH`, or in Cargo's `bin` directory.
fn find_s3s_fs() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
}

/// An `s3s-fs` process of this test and its directory, both gone on drop.
struct OwnServer {
    child: Child,
    dir: PathBuf,
}

impl OwnServer {
    /// Starts `binary` on 127.0.0.1 at a port the kernel picks (so no
    /// other server can take it between a choice and the bind), over a
    /// fresh directory holding the bucket, and waits (at most `BOUND`)
    /// until it says where it listens. Returns it and its endpoint.
    fn start(binary: &std::path::Path) -> Result<(Self, String), String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tokio-uffd-s3s-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        // A directory under the root is a bucket to s3s-fs.
        std::fs::create_dir_all(data.join(OWN_BUCKET))
            .map_err(|e| format!("creating {}: {e}", data.display()))?;
        let log_path = dir.join("s3s-fs.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(binary);
        cmd.args(["--host", "127.0.0.1", "--port", "0"])
            .args([
                "--access-key",
                OWN_ACCESS_KEY,
                "--secret-key",
                OWN_SECRET_KEY,
            ])
            .arg(&data)
            // Its "server is running at" line is an INFO event.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // kill the server when the thread that started it (this test's)
        // ends, so a test killed midway leaves no server behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("did not start: {e}"))?;
        let mut own = OwnServer { child, dir };
        let deadline = Instant::now() + BOUND;
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log_path) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(endpoint) = listening_at(&text) {
                let addr = endpoint_addr(&endpoint);
                if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
                    return Ok((own, endpoint));
                }
            }
            if let Ok(Some(status)) = own.child.try_wait() {
                return Err(format!("exited ({status}):\n{text}"));
            }
            if Instant::now() > deadline {
                return Err(format!("did not listen within {BOUND:?}:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The endpoint in s3s-fs's "server is running at http://ADDR" line.
fn listening_at(log: &str) -> Option<String> {
    let at = log.find("server is running at http://")? + "server is running at ".len();
    let url: String = log[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && !c.is_control())
        .collect();
    Some(url)
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
