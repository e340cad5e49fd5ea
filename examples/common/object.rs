//! Memory images in object storage, for `snapshot_restore --image
//! s3://BUCKET/KEY` and `firecracker_handler --mem-file s3://BUCKET/KEY`.
//!
//! The URL is parsed whatever the build; the object is read through the
//! crate's `ObjectStoreSource` only with the `object-store` feature.
//! Without it, [`Remote::open`] refuses with a message saying how to
//! rebuild, and [`Remote`] and [`Probe`] are empty enums: the examples call
//! them without a `cfg` of their own.
//!
//! The store is an S3 one (`object_store`'s `AmazonS3Builder`), set up from
//! the usual environment variables (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` or
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT`, `AWS_SKIP_SIGNATURE`, ...), with
//! `--endpoint` overriding the endpoint. With an endpoint (an S3-compatible
//! server such as MinIO or s3s-fs) requests are path-style
//! (`ENDPOINT/BUCKET/KEY`, which such servers serve without DNS names per
//! bucket), and an `http://` endpoint is allowed.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest `--chunk`, in KiB (1 GiB).
const MAX_CHUNK_KIB: u64 = 1 << 20;

/// The flags of an image in object storage, shared by the examples.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Object storage (an s3:// image; feature object-store)")]
pub struct ObjectArgs {
    /// S3 endpoint of an s3:// image, for an S3-compatible server
    /// (path-style requests; http:// allowed) [default: AWS_ENDPOINT if
    /// set, else AWS]. Credentials and region come from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION (AWS_SKIP_SIGNATURE=true for
    /// none)
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Bytes per ranged GET of an s3:// image, in KiB [default: the
    /// crate's, 2048]
    #[arg(long, value_name = "KIB",
          value_parser = clap::value_parser!(u64).range(4..=MAX_CHUNK_KIB))]
    pub chunk: Option<u64>,
    /// Fetched chunks kept in memory, in MiB (0: none) [default: the
    /// crate's, 256]
    #[arg(long, value_name = "MIB",
          value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub cache: Option<u64>,
}

impl ObjectArgs {
    /// An error if any flag is given though the image is a file.
    pub fn only_for_objects(&self, image: &Path) -> Result<(), String> {
        let given = [
            ("--endpoint", self.endpoint.is_some()),
            ("--chunk", self.chunk.is_some()),
            ("--cache", self.cache.is_some()),
        ];
        match given.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(format!(
                "{flag} applies to an image in object storage (s3://BUCKET/KEY), and {} is a file",
                image.display()
            )),
            None => Ok(()),
        }
    }
}

/// Where a memory image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    /// A local file (a path, or a `file://` URL).
    File(PathBuf),
    /// An S3 object.
    Object(ObjectUrl),
}

/// `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    pub bucket: String,
    pub key: String,
}

impl std::fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

impl Image {
    /// A path, or an object URL: anything that starts with `SCHEME://`
    /// (`s3://BUCKET/KEY`, also `s3a://`; `file:///PATH` is a path). Other
    /// schemes and malformed S3 URLs are errors that say what was wrong.
    pub fn parse(arg: &Path) -> Result<Image, String> {
        // A path that is not UTF-8 is no URL.
        let Some(text) = arg.to_str() else {
            return Ok(Image::File(arg.into()));
        };
        let Some((scheme, rest)) = text.split_once("://") else {
            return Ok(Image::File(arg.into()));
        };
        // RFC 3986: a letter, then letters, digits, `+`, `-`, `.`. Anything
        // else before `://` (`./a://b`) is part of a path.
        let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !is_scheme {
            return Ok(Image::File(arg.into()));
        }
        let bad = |why: &str| {
            Err(format!(
                "{text}: not an object URL this example can read: {why}"
            ))
        };
        match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => {}
            "file" => {
                return match rest.strip_prefix('/') {
                    Some(_) => Ok(Image::File(PathBuf::from(rest))),
                    None => bad("a file URL is file:///ABSOLUTE/PATH"),
                }
            }
            "gs" | "az" | "adl" | "azure" | "abfs" | "abfss" | "http" | "https" => {
                return bad(&format!(
                    "{scheme}:// objects are not supported by this example, which builds S3 \
                     stores only (the crate's ObjectStoreSource takes any ObjectStore); give \
                     s3://BUCKET/KEY, with --endpoint URL for an S3-compatible server"
                ))
            }
            _ => {
                return bad(&format!(
                    "unknown scheme {scheme}://; give s3://BUCKET/KEY, or a file's path"
                ))
            }
        }
        let Some((bucket, key)) = rest.split_once('/') else {
            return bad("no key: give s3://BUCKET/KEY");
        };
        if bucket.is_empty() {
            return bad("no bucket: give s3://BUCKET/KEY");
        }
        // S3's rules, loosely: lowercase letters, digits, dots and hyphens
        // (and underscores, which some S3-compatible servers allow).
        if let Some(c) = bucket
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(*c)))
        {
            return bad(&format!(
                "the bucket name {bucket:?} has {c:?} in it (bucket names are lowercase \
                 letters, digits, dots and hyphens)"
            ));
        }
        if key.is_empty() {
            return bad("no key: give s3://BUCKET/KEY");
        }
        if let Some(part) = key
            .split('/')
            .find(|p| p.is_empty() || *p == "." || *p == "..")
        {
            return bad(&format!(
                "the key {key:?} has an empty, `.` or `..` part ({part:?}), which object paths \
                 cannot have"
            ));
        }
        Ok(Image::Object(ObjectUrl {
            bucket: bucket.into(),
            key: key.into(),
        }))
    }
}

/// What an object source has done, for printing.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchStats {
    pub requests: u64,
    pub bytes_fetched: u64,
    pub cache_hits: u64,
    pub joined: u64,
    pub retries: u64,
    pub failures: u64,
    pub evicted: u64,
    pub network_wait: Duration,
    pub chunk: u64,
}

impl std::fmt::Display for FetchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} GETs of chunks of {} KiB ({} retried, {} failed), {:.1} MiB fetched, {} cache \
             hits, {} waits on a GET in flight, {} chunks evicted; network wait {:.1} ms \
             (summed over reads)",
            self.requests,
            self.chunk >> 10,
            self.retries,
            self.failures,
            self.bytes_fetched as f64 / (1 << 20) as f64,
            self.cache_hits,
            self.joined,
            self.evicted,
            self.network_wait.as_secs_f64() * 1e3
        )
    }
}

/// Warm-prefetch and fill copies in flight at once with a remote source:
/// each copy waits a network round trip for its chunk, so more of them hide
/// the latency (the crate's default, 2, suits a local file, where a copy is
/// memory bandwidth).
pub const REMOTE_BACKGROUND_CONCURRENCY: usize = 8;

// Not every example that shares `common` uses them.
#[allow(unused_imports)]
pub use imp::{Probe, Remote};

#[cfg(feature = "object-store")]
mod imp {
    use std::fs::File;
    use std::io::Write;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::path::Path;
    use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig};
    use tokio_uffd::{error_chain, BoxedSource, ObjectStoreSource};

    use super::{FetchStats, ObjectArgs, ObjectUrl};

    /// An object the examples restore from: its store, path, length and
    /// the source settings.
    #[derive(Debug)]
    pub struct Remote {
        store: Arc<dyn ObjectStore>,
        path: Path,
        url: ObjectUrl,
        endpoint: Option<String>,
        len: u64,
        e_tag: Option<String>,
        chunk: Option<u64>,
        cache: Option<u64>,
    }

    /// The statistics of one source made by [`Remote::source`].
    #[derive(Debug, Clone)]
    pub struct Probe(ObjectStoreSource);

    impl Probe {
        pub fn stats(&self) -> FetchStats {
            let s = self.0.stats();
            FetchStats {
                requests: s.requests,
                bytes_fetched: s.bytes_fetched,
                cache_hits: s.cache_hits,
                joined: s.joined,
                retries: s.retries,
                failures: s.failures,
                evicted: s.evicted,
                network_wait: s.network_wait,
                chunk: self.0.chunk_size(),
            }
        }

        /// Bytes per GET.
        pub fn chunk_size(&self) -> u64 {
            self.0.chunk_size()
        }
    }

    impl Remote {
        /// Builds the store and reads the object's length (one `HEAD`).
        pub async fn open(url: &ObjectUrl, args: &ObjectArgs) -> Result<Remote, String> {
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
            if let Some(endpoint) = &args.endpoint {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(format!(
                        "--endpoint {endpoint}: give an http:// or https:// URL"
                    ));
                }
                // An S3-compatible server: path-style requests
                // (ENDPOINT/BUCKET/KEY), no DNS name per bucket.
                builder = builder
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint);
            if endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
            {
                // Never `with_client_options` after this: it would reset it.
                builder = builder.with_allow_http(true);
            }
            if builder
                .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
                .is_none()
                && std::env::var_os("AWS_SKIP_SIGNATURE").is_none()
            {
                eprintln!(
                    "note: no AWS_ACCESS_KEY_ID: object_store looks for credentials elsewhere \
                     (web identity, the instance metadata service); set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, or AWS_SKIP_SIGNATURE=true for a public bucket"
                );
            }
            // Fewer and shorter retries than object_store's default (10, for
            // up to 3 minutes): an unreachable server is reported in seconds.
            builder = builder.with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
            });
            let store: Arc<dyn ObjectStore> = Arc::new(
                builder
                    .build()
                    .map_err(|e| format!("an S3 store for {url}: {}", error_chain(&e)))?,
            );
            let path = Path::from(url.key.as_str());
            let meta = store.head(&path).await.map_err(|e| {
                format!(
                    "cannot read {url}{}: {}",
                    via(endpoint.as_deref()),
                    error_chain(&e)
                )
            })?;
            Ok(Remote {
                store,
                path,
                url: url.clone(),
                endpoint,
                len: meta.size,
                e_tag: meta.e_tag,
                chunk: args.chunk.map(|kib| kib << 10),
                cache: args.cache.map(|mib| mib << 20),
            })
        }

        /// The object's length in bytes.
        pub fn len(&self) -> u64 {
            self.len
        }

        /// The URL, and the endpoint if one was set.
        pub fn name(&self) -> String {
            format!("{}{}", self.url, via(self.endpoint.as_deref()))
        }

        /// A source of its own (an empty cache, counters from zero) for the
        /// object: no request yet (the length is known).
        pub async fn source(&self) -> Result<(BoxedSource, Probe), String> {
            let mut builder =
                ObjectStoreSource::builder(self.store.clone(), self.path.clone()).len(self.len);
            if let Some(chunk) = self.chunk {
                builder = builder.chunk_size(chunk);
            }
            if let Some(cache) = self.cache {
                builder = builder.cache_bytes(cache);
            }
            let source = builder
                .open()
                .await
                .map_err(|e| format!("{}: {}", self.name(), error_chain(&e)))?;
            Ok((BoxedSource::new(source.clone()), Probe(source)))
        }

        /// Downloads the whole object into `file` with one GET (not
        /// through a source: the check must not rely on what it checks),
        /// checking that it is the object the restore read (same length,
        /// same ETag). Returns the time it took.
        pub async fn download(&self, file: &mut File) -> Result<Duration, String> {
            let start = Instant::now();
            let what = || format!("downloading {}", self.name());
            let got = self
                .store
                .get(&self.path)
                .await
                .map_err(|e| format!("{}: {}", what(), error_chain(&e)))?;
            if got.meta.size != self.len
                || (self.e_tag.is_some()
                    && got.meta.e_tag.is_some()
                    && got.meta.e_tag != self.e_tag)
            {
                return Err(format!(
                    "{}: the object changed during the restore (length {} and ETag {:?} then, {} \
                     and {:?} now)",
                    what(),
                    self.len,
                    self.e_tag,
                    got.meta.size,
                    got.meta.e_tag
                ));
            }
            let mut stream = got.into_stream();
            let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut written = 0u64;
            while let Some(bytes) = stream.next().await {
                let bytes = bytes.map_err(|e| format!("{}: {}", what(), error_chain(&e)))?;
                w.write_all(&bytes)
                    .map_err(|e| format!("{}: {e}", what()))?;
                written += bytes.len() as u64;
            }
            w.flush().map_err(|e| format!("{}: {e}", what()))?;
            if written != self.len {
                return Err(format!(
                    "{}: {written} bytes came, not {}",
                    what(),
                    self.len
                ));
            }
            Ok(start.elapsed())
        }
    }

    fn via(endpoint: Option<&str>) -> String {
        endpoint.map_or(String::new(), |e| format!(" (at {e})"))
    }
}

#[cfg(not(feature = "object-store"))]
mod imp {
    use std::fs::File;
    use std::time::Duration;

    use tokio_uffd::BoxedSource;

    use super::{FetchStats, ObjectArgs, ObjectUrl};

    /// Nothing: this build cannot read objects.
    #[derive(Debug)]
    pub enum Remote {}

    /// Nothing: this build cannot read objects.
    #[derive(Debug, Clone)]
    pub enum Probe {}

    impl Probe {
        pub fn stats(&self) -> FetchStats {
            match *self {}
        }

        pub fn chunk_size(&self) -> u64 {
            match *self {}
        }
    }

    impl Remote {
        /// Refuses: this build has no object-store support.
        pub async fn open(url: &ObjectUrl, _: &ObjectArgs) -> Result<Remote, String> {
            let name = std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "NAME".into());
            Err(format!(
                "{url} is an object, and this build of the example cannot read objects: \
                 rebuild it with `--features object-store` (cargo run --release --features \
                 object-store --example {name} -- ...)"
            ))
        }

        pub fn len(&self) -> u64 {
            match *self {}
        }

        pub fn name(&self) -> String {
            match *self {}
        }

        pub async fn source(&self) -> Result<(BoxedSource, Probe), String> {
            match *self {}
        }

        pub async fn download(&self, _: &mut File) -> Result<Duration, String> {
            match *self {}
        }
    }
}
