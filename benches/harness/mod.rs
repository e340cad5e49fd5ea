//! What the benchmarks measure, shared by the criterion benches
//! (`benches/faults.rs`) and the one-table summary (`benches/summary.rs`).
//!
//! Every crate path is measured next to a raw floor written here with libc
//! only: one thread, `read(2)` of the userfaultfd (blocking, or after
//! `poll(2)`), one `ioctl`. Faults come from the measuring thread itself,
//! one page at a time, on fresh missing pages (re-armed with
//! `MADV_DONTNEED` between batches, outside the timed part).
//!
//! One file per part:
//!
//! - the measurements: [`latency`](mod@latency), [`throughput`](mod@throughput),
//!   [`fault_around`](mod@fault_around), [`slow_source`](mod@slow_source)
//!   (with its precise [`delay`]), [`decode`](mod@decode),
//!   [`dirty`] (dirty-page tracking: async, sync write-protect faults,
//!   soft-dirty bits), [`file_fault`](mod@file_fault) (window 1 from a
//!   snapshot file), [`restore`](mod@restore) (a whole restore of a 1 GiB
//!   image by each strategy, the working-set workload of
//!   `examples/common/workload.rs` running on it), `remote` (feature
//!   `remote`: the same restore from an S3 server through a
//!   `delay_proxy`);
//! - what they run: [`raw`], the floor's handlers (libc only), and
//!   [`crate_paths`], the crate's handlers, runtimes and server thread;
//! - what they stand on: [`case`] (the words a case is described in),
//!   [`memory`] (mappings, the pattern bytes, the faulting loop),
//!   [`image_file`] (the image on disk), [`cpu`] (pinning), [`cpu_time`]
//!   (the handler's CPU time);
//! - what the summary makes of them: [`stats`] (medians, paired ratios) and
//!   [`syscalls`] (system calls per fault, counted with `perf` or `strace`).
// Each bench uses part of the harness.
#![allow(dead_code, unused_imports, unreachable_pub, clippy::missing_safety_doc)]

mod case;
mod cpu;
mod cpu_time;
mod crate_paths;
mod decode;
mod delay;
#[cfg(feature = "remote")]
mod delay_proxy;
mod dirty;
mod fault_around;
mod file_fault;
mod image_file;
mod latency;
mod memory;
mod raw;
#[cfg(feature = "remote")]
mod remote;
mod restore;
mod slow_source;
mod stats;
mod syscalls;
mod throughput;
// The working-set workload the examples run, so that a benchmark restores
// the same program.
#[path = "../../examples/common/workload.rs"]
mod workload;

pub use case::{Op, Side};
pub use cpu::{cpus, Pin};
pub use cpu_time::last_handler_cpu;
pub use decode::{decode, fault_messages};
pub use dirty::{dirty_tracking, soft_dirty_supported, DirtyRun, Method as DirtyMethod};
pub use fault_around::fault_around;
pub use file_fault::file_latency;
pub use image_file::ImageFile;
pub use latency::{latency, Path};
pub use memory::page_size;
#[cfg(feature = "remote")]
pub use remote::{RemoteBench, RemoteCase, RemoteRestored, RemoteSettings};
pub use restore::{RestoreBench, RestoreCase, Restored, RESTORE_IMAGE, WARM_WINDOW};
pub use slow_source::slow_source;
pub use stats::{median, median_f64, paired_ratio};
pub use syscalls::{run_syscall_case, syscalls_per_fault};
pub use throughput::throughput;
