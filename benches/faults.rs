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
    decode
);
criterion_main!(benches);
