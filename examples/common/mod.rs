//! Pieces the examples share: logging flags, bounds on counts, an anonymous
//! mapping, a verifiable image pattern, shuffled page orders, a summary
//! printer, worker threads whose `SIGBUS` becomes a clear report
//! ([`touch`]), and images in object storage ([`object`]).
#![allow(dead_code, unreachable_pub)]

pub mod object;
pub mod touch;
pub mod workload;

use std::io::IsTerminal;
use std::time::Duration;

use tokio_uffd::{Stats, StatsSnapshot};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Most threads an example starts to touch memory (each one is a real OS
/// thread with its own stack).
pub const MAX_THREADS: u64 = 1024;

/// Largest memory image the examples make or map, in MiB.
pub const MAX_MIB: u64 = 64 << 10;

/// Largest fault-around window, in pages.
pub const MAX_WINDOW: u64 = 1024;

/// `-v`/`--verbose`, shared by every example.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct LogArgs {
    /// Print tokio_uffd's debug events on stderr (RUST_LOG=... adds or
    /// refines filters; the default shows warnings and errors only)
    #[arg(short, long)]
    pub verbose: bool,
}

/// Installs a `tracing` subscriber on stderr: the `target=level,...`
/// filters of `RUST_LOG` if set (default: warnings and errors), plus
/// `tokio_uffd=debug` with `--verbose`.
pub fn init_tracing(log: LogArgs) {
    let mut filter = Targets::new().with_default(LevelFilter::WARN);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        match spec.parse::<Targets>() {
            Ok(parsed) => filter = parsed,
            Err(e) => eprintln!(
                "RUST_LOG={spec:?} ignored ({e}): give target=level pairs, comma-separated"
            ),
        }
    }
    if log.verbose {
        filter = filter.with_target("tokio_uffd", LevelFilter::DEBUG);
    }
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();
}

/// The byte at `offset` of a generated image: depends on the offset and
/// the page, so a page served at the wrong place is caught.
pub fn image_byte(offset: u64) -> u8 {
    (offset as u8) ^ ((offset >> 12) as u8).wrapping_mul(31) ^ ((offset >> 20) as u8)
}

/// Fills `buf` with the image bytes from `offset`.
pub fn fill_image(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = image_byte(offset + i as u64);
    }
}

/// An anonymous private mapping, unmapped on drop.
pub struct Mapping {
    pub addr: usize,
    pub len: usize,
}

impl Mapping {
    pub fn anon(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// The whole mapping; call only once every page is resolved.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: readable for `len` bytes, every page resolved.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Reads the byte at `addr` (which may fault and wait for the handler).
pub fn read_at(addr: usize) -> u8 {
    // SAFETY: callers pass addresses inside live mappings.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// Writes the byte at `addr` (which may fault and wait for the handler).
pub fn write_at(addr: usize, v: u8) {
    // SAFETY: callers pass addresses inside live, writable mappings.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

pub fn micros(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

/// Prints the server's figures; `elapsed` is the time the work took.
pub fn print_stats(s: &StatsSnapshot, elapsed: Duration) {
    let mib = s.bytes_served as f64 / (1 << 20) as f64;
    println!(
        "  faults: {} missing, {} write-protect, {} minor; {} duplicates",
        s.faults_missing, s.faults_write_protect, s.faults_minor, s.duplicates
    );
    println!(
        "  pages served: {} ({} prefetched, {} zeroed after remove); {:.1} MiB in {:.3} s = {:.1} MiB/s",
        s.pages_served,
        s.pages_prefetched,
        s.pages_zeroed_after_remove,
        mib,
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64().max(1e-9)
    );
    println!(
        "  fault latency: p50 {}, p99 {}, max {} (over {} faults)",
        micros(s.latency.p50),
        micros(s.latency.p99),
        micros(s.latency.max),
        s.latency.count
    );
    println!(
        "  removes {}, EEXIST {}, EAGAIN {}, handler failures {}, poisoned pages {}",
        s.removes, s.eexist, s.eagain, s.handler_failures, s.poisoned
    );
}

/// The server's first and latest failures with their whole cause chains,
/// one per line, or nothing when it had none.
pub fn failures(stats: &Stats) -> String {
    let mut out = String::new();
    if let Some(first) = stats.first_failure() {
        out += &format!("first failure: {}", tokio_uffd::error_chain(&first));
        if let Some(last) = stats.last_failure() {
            if last.fault_addr != first.fault_addr || last.addr != first.addr {
                out += &format!("\nlatest failure: {}", tokio_uffd::error_chain(&last));
            }
        }
    }
    out
}
