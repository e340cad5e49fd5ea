//! Criterion benchmarks of fault latency and throughput, each crate path
//! beside a raw synchronous floor measured in the same run. See
//! `benches/summary.rs` for the same cases as one table.

mod harness;

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use harness::{Op, Path, Pin, Side};

fn latency(c: &mut Criterion) {
    for (op, op_name) in [(Op::Copy, "copy"), (Op::Zero, "zeropage")] {
        for (pin, pin_name) in [(Pin::SameCore, "same core"), (Pin::OtherCore, "other core")] {
            let mut g = c.benchmark_group(format!("fault latency/{op_name}/{pin_name}"));
            g.warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(2))
                .sample_size(20)
                .throughput(Throughput::Elements(1));
            for path in [
                Path::RawRead,
                Path::RawPoll,
                Path::RawEpoll,
                Path::Sync,
                Path::StreamCurrent,
                Path::StreamMulti,
                Path::Server,
            ] {
                g.bench_function(path.name(), |b| {
                    b.iter_custom(|iters| harness::latency(path, op, pin, iters as usize))
                });
            }
            g.finish();
        }
    }
}

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("throughput");
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    for threads in [1usize, 2, 4] {
        let per = 2000;
        g.throughput(Throughput::Elements((threads * per) as u64));
        for (side, name) in [(Side::Raw, "raw"), (Side::Server, "Server")] {
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &t| {
                b.iter_custom(|iters| (0..iters).map(|_| harness::throughput(side, t, per)).sum())
            });
        }
    }
    g.finish();
}

fn fault_around(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault-around 256 MiB");
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .throughput(Throughput::Bytes(256 << 20));
    for window in [1usize, 16, 512] {
        for (side, name) in [(Side::Raw, "raw"), (Side::Server, "Server")] {
            g.bench_with_input(BenchmarkId::new(name, window), &window, |b, &w| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| harness::fault_around(side, w, 256))
                        .sum()
                })
            });
        }
    }
    g.finish();
}

fn slow_source(c: &mut Criterion) {
    let mut g = c.benchmark_group("slow source 200us");
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    for threads in [1usize, 4, 16] {
        let per = 40;
        g.throughput(Throughput::Elements((threads * per) as u64));
        for (side, name) in [(Side::Raw, "sync one thread"), (Side::Server, "Server")] {
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &t| {
                b.iter_custom(|iters| (0..iters).map(|_| harness::slow_source(side, t, per)).sum())
            });
        }
    }
    g.finish();
}

/// A whole restore of the 1 GiB image by each strategy, side by side: time
/// to ready of the working-set workload (see `harness/restore.rs`). The
/// image file and the recorded working set are made once.
fn restore(c: &mut Criterion) {
    let bench = harness::RestoreBench::shared(harness::RESTORE_IMAGE);
    let mut g = c.benchmark_group("restore 1 GiB");
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10);
    // Every restore runs its own run of the workload (run 0 was recorded).
    let run = std::cell::Cell::new(1u64);
    for case in harness::RestoreCase::ALL {
        let id = format!("({}) {}", case.letter(), case.name());
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        run.set(run.get() + 1);
                        bench.restore(case, run.get()).ready
                    })
                    .sum()
            })
        });
    }
    g.finish();
}

/// Window 1 from the image file: the server with an `MmapSource` beside a
/// blocking handler copying from its own mapping of the file.
fn file_fault(c: &mut Criterion) {
    let image = harness::ImageFile::shared(harness::RESTORE_IMAGE);
    for (pin, pin_name) in [(Pin::SameCore, "same core"), (Pin::OtherCore, "other core")] {
        let mut g = c.benchmark_group(format!("fault from a file/{pin_name}"));
        g.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20)
            .throughput(Throughput::Elements(1));
        for (side, name) in [
            (Side::Raw, "blocking handler, mmap"),
            (Side::Server, "Server + MmapSource"),
        ] {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    // Fresh pages of the file for every fault, 64 MiB
                    // of them per call at most.
                    let mut left = iters;
                    let mut t = Duration::ZERO;
                    while left > 0 {
                        let n = left.min(16384);
                        t += harness::file_latency(side, pin, &image, n as usize);
                        left -= n;
                    }
                    t
                })
            });
        }
        g.finish();
    }
}

fn decode(c: &mut Criterion) {
    let msgs = harness::fault_messages();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(msgs.len() as u64));
    g.bench_function("decode_message x64", |b| {
        b.iter_custom(|iters| harness::decode(&msgs, iters as usize))
    });
    g.finish();
}

criterion_group!(
    benches,
    latency,
    throughput,
    fault_around,
    slow_source,
    file_fault,
    restore,
    decode
);
criterion_main!(benches);
