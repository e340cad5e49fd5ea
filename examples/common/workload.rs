//! A workload that behaves like a restored program: worker threads touch a
//! *stable working set* of the memory image, in a mostly repeatable order,
//! with a little per-run jitter and some work between touches.
//!
//! Record-and-prefetch (REAP, ASPLOS '21) rests on one observation: a
//! restored program touches much the same pages, in much the same order,
//! every time it is restored (its code, its heaps, its threads' stacks), and
//! only a fraction of its memory. This module makes such a program, so that
//! the examples and the benchmarks measure a restore as a user sees it.
//!
//! # The model
//!
//! - **The stable set** ([`Workload::clusters`]): about
//!   [`fraction`](Workload::fraction) of the image's pages (default 20%),
//!   made of *clusters* of consecutive pages whose lengths follow a
//!   [`RunMix`]: by default many short ones (1–4 pages, like stacks and
//!   scattered objects), some medium ones (8–64 pages, like heaps) and a few
//!   long ones (128–512 pages, like kernel text). The clusters are spread
//!   over the image with random gaps between them, and given a touch order.
//!   All of it depends only on the image's size, the fraction, the mix and
//!   the [`seed`](Workload::seed): the set is the same for a seed, run after
//!   run.
//! - **Threads**: the clusters, in touch order, are dealt to
//!   [`threads`](Workload::threads) workers, each cluster to the worker with
//!   the fewest pages so far (so the workers have about as much to do), and
//!   each worker touches its clusters in that order, each cluster from its
//!   first page to its last. Every page of the set is touched by one worker,
//!   once.
//! - **Per-run jitter** ([`Workload::run`]): no two runs of a real program
//!   are identical. The run number seeds a small perturbation of the stable
//!   order: about [`reorder`](Workload::reorder) of the touches (default
//!   4%) change places with a touch a few positions away (at most
//!   [`reorder_distance`](Workload::reorder_distance)), and about
//!   [`extra`](Workload::extra) more pages (default 1% of the set), outside
//!   the set, are touched at random points of random workers. Two runs with
//!   one seed share the set and differ only in that.
//! - **Think time** ([`Workload::think`]): after each touch the worker
//!   computes for a while, with a [`Spinner`] (a busy loop calibrated once,
//!   not a sleep: it is CPU work, which competes for the cores with the
//!   page server as a real program would).
//! - **Access** ([`Access`]): a touch reads one 8-byte word of the page, or
//!   reads it and writes the same value back (a write fault, the page's
//!   contents unchanged, so a restore can still be checked byte for byte).
//!
//! [`Workload::plan`] computes, before anything is timed, each worker's
//! ordered list of page indices ([`Plan`]); [`Plan::touched`] and
//! [`Plan::touched_runs`] give the distinct pages a run touches (to count
//! the prefetched pages a run never needed); [`run_worker`] is a worker's
//! loop.
//!
//! [`Plan::every_page`] gives the other kind of load: every page of the
//! image, split among the workers, in address or shuffled order.
//!
//! This file depends on `std` only, so that another crate (the benchmarks)
//! can use it as a module with `#[path = "..."] mod workload;`.
//!
//! ```ignore
//! let w = Workload { threads: 4, run: 1, ..Workload::new(65536) };
//! let plan = w.plan(); // per worker: the pages to touch, in order
//! let spin = Spinner::calibrate();
//! // in worker t, with `base` the restored memory:
//! unsafe { run_worker(base, page_size, &plan.threads[t], w.access, w.think, &spin) };
//! ```
#![allow(dead_code, unreachable_pub)]

use std::hint::black_box;
use std::time::{Duration, Instant};

/// How a worker touches a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads one word.
    Read,
    /// Reads one word and writes the same value back (a write fault; the
    /// page's contents are unchanged).
    Write,
}

/// One class of cluster lengths: how often it is drawn, and the lengths
/// (drawn uniformly from `min..=max` pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunClass {
    /// Relative weight among the classes (by number of clusters).
    pub weight: u32,
    /// Shortest cluster, in pages (at least 1).
    pub min: usize,
    /// Longest cluster, in pages.
    pub max: usize,
}

/// The mix of cluster lengths the stable set is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunMix {
    /// The classes; a cluster's class is drawn by weight.
    pub classes: Vec<RunClass>,
}

impl Default for RunMix {
    /// Many short clusters (70% of clusters, 1–4 pages: stacks, scattered
    /// objects), some medium ones (25%, 8–64 pages: heaps, data) and a few
    /// long ones (5%, 128–512 pages: kernel and program text). By pages
    /// that is about 6% short, 34% medium and 60% long.
    fn default() -> Self {
        Self {
            classes: vec![
                RunClass {
                    weight: 70,
                    min: 1,
                    max: 4,
                },
                RunClass {
                    weight: 25,
                    min: 8,
                    max: 64,
                },
                RunClass {
                    weight: 5,
                    min: 128,
                    max: 512,
                },
            ],
        }
    }
}

/// A cluster of the stable set: `len` pages from page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    /// Its first page (an index into the image).
    pub first: usize,
    /// Its length in pages.
    pub len: usize,
}

/// The parameters of a workload; see the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Pages in the image.
    pub pages: usize,
    /// Fraction of the image's pages in the stable set (0 to 1; default
    /// 0.20). At least one page.
    pub fraction: f64,
    /// Seeds the stable set: its clusters, where they lie and their order.
    pub seed: u64,
    /// The cluster lengths.
    pub mix: RunMix,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// The run number: seeds this run's jitter.
    pub run: u64,
    /// Fraction of the touches that change places with a nearby one
    /// (default 0.04).
    pub reorder: f64,
    /// How far (in touches) a reordered touch moves at most (default 8).
    pub reorder_distance: usize,
    /// Extra pages outside the set this run touches, as a fraction of the
    /// set's pages (default 0.01).
    pub extra: f64,
    /// Work after each touch (default 2 µs).
    pub think: Duration,
    /// How a page is touched (default [`Access::Read`]).
    pub access: Access,
}

impl Workload {
    /// The default think time per touch.
    pub const DEFAULT_THINK: Duration = Duration::from_micros(2);

    /// The default workload over an image of `pages` pages: 20% of it,
    /// seed 1, the default [`RunMix`], 4 threads, run 0, 4% reordered
    /// within 8 touches, 1% extra pages, 2 µs of work per touch, reads.
    pub fn new(pages: usize) -> Self {
        Self {
            pages,
            fraction: 0.20,
            seed: 1,
            mix: RunMix::default(),
            threads: 4,
            run: 0,
            reorder: 0.04,
            reorder_distance: 8,
            extra: 0.01,
            think: Self::DEFAULT_THINK,
            access: Access::Read,
        }
    }

    /// The number of pages in the stable set.
    pub fn set_pages(&self) -> usize {
        if self.pages == 0 {
            return 0;
        }
        let f = self.fraction.clamp(0.0, 1.0);
        ((self.pages as f64 * f).round() as usize).clamp(1, self.pages)
    }

    /// The stable set: its clusters in touch order. Depends on the image's
    /// size, [`fraction`](Self::fraction), [`mix`](Self::mix) and
    /// [`seed`](Self::seed) only (not on the threads or the run).
    pub fn clusters(&self) -> Vec<Cluster> {
        let target = self.set_pages();
        let mut rng = Rng::new(self.seed ^ 0x5eed_c1a5_7e55_0001);
        let total_weight: u64 = self.mix.classes.iter().map(|c| u64::from(c.weight)).sum();
        // The lengths, until the set is full (the last one clipped).
        let mut lens = Vec::new();
        let mut sum = 0;
        while sum < target {
            let mut len = 1;
            if total_weight > 0 {
                let mut pick = rng.below(total_weight);
                for c in &self.mix.classes {
                    if pick < u64::from(c.weight) {
                        let (lo, hi) = (c.min.max(1), c.max.max(c.min.max(1)));
                        len = lo + rng.below((hi - lo + 1) as u64) as usize;
                        break;
                    }
                    pick -= u64::from(c.weight);
                }
            }
            let len = len.min(target - sum);
            lens.push(len);
            sum += len;
        }
        // Where they lie: in a shuffled order along the image, with the
        // free pages split at random into the gaps before, between and
        // after them.
        rng.shuffle(&mut lens);
        let free = self.pages - target;
        let mut cuts: Vec<usize> = (0..lens.len())
            .map(|_| rng.below(free as u64 + 1) as usize)
            .collect();
        cuts.sort_unstable();
        let mut clusters = Vec::with_capacity(lens.len());
        let mut at = 0;
        let mut prev_cut = 0;
        for (len, cut) in lens.into_iter().zip(cuts) {
            at += cut - prev_cut;
            prev_cut = cut;
            clusters.push(Cluster { first: at, len });
            at += len;
        }
        // The order they are touched in.
        rng.shuffle(&mut clusters);
        clusters
    }

    /// Each worker's pages, in order, for this run (see the [module
    /// docs](self)). Computed up front: call it before timing.
    pub fn plan(&self) -> Plan {
        let threads = self.threads.max(1);
        let clusters = self.clusters();
        // Deal the clusters, in touch order, to the least loaded worker.
        let mut lists: Vec<Vec<usize>> = vec![Vec::new(); threads];
        for c in &clusters {
            let t = (0..threads).min_by_key(|&t| lists[t].len()).unwrap_or(0);
            lists[t].extend(c.first..c.first + c.len);
        }
        let mut rng = Rng::new(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17)
                ^ self.run.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        // Local reordering: a swap moves two touches.
        let p_swap = (self.reorder.clamp(0.0, 1.0) / 2.0 * (1u64 << 32) as f64) as u64;
        let distance = self.reorder_distance.max(1);
        for list in &mut lists {
            for i in 0..list.len() {
                if rng.below(1 << 32) < p_swap {
                    let j = (i + 1 + rng.below(distance as u64) as usize).min(list.len() - 1);
                    list.swap(i, j);
                }
            }
        }
        // Extra pages outside the set, at random points of random workers.
        let set_pages: usize = clusters.iter().map(|c| c.len).sum();
        let outside = self.pages - set_pages;
        let want = ((set_pages as f64 * self.extra.max(0.0)).round() as usize).min(outside);
        if want > 0 {
            let mut in_set = vec![false; self.pages];
            for c in &clusters {
                in_set[c.first..c.first + c.len].fill(true);
            }
            let mut extra = Vec::with_capacity(want);
            if outside >= 2 * want {
                while extra.len() < want {
                    let p = rng.below(self.pages as u64) as usize;
                    if !in_set[p] {
                        in_set[p] = true;
                        extra.push(p);
                    }
                }
            } else {
                let mut rest: Vec<usize> = (0..self.pages).filter(|&p| !in_set[p]).collect();
                rng.shuffle(&mut rest);
                extra.extend_from_slice(&rest[..want]);
            }
            for p in extra {
                let t = rng.below(threads as u64) as usize;
                let at = rng.below(lists[t].len() as u64 + 1) as usize;
                lists[t].insert(at, p);
            }
        }
        Plan { threads: lists }
    }
}

/// The order of [`Plan::every_page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Each worker walks its pages in address order.
    Sequential,
    /// Each worker shuffles its pages.
    Random,
}

/// What each worker touches in one run: its pages, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Per worker, the page indices it touches, in order.
    pub threads: Vec<Vec<usize>>,
}

impl Plan {
    /// Every page of an image of `pages` pages: worker `t` of `threads`
    /// owns pages `t`, `t + threads`, ... and walks them in `order`
    /// (shuffled with `seed` and its index).
    pub fn every_page(pages: usize, threads: usize, order: Order, seed: u64) -> Self {
        let threads = threads.max(1);
        let lists = (0..threads)
            .map(|t| {
                let mut mine: Vec<usize> = (t..pages).step_by(threads).collect();
                if order == Order::Random {
                    Rng::new(seed.wrapping_add(t as u64 + 1)).shuffle(&mut mine);
                }
                mine
            })
            .collect();
        Self { threads: lists }
    }

    /// How many touches, over every worker.
    pub fn touches(&self) -> usize {
        self.threads.iter().map(Vec::len).sum()
    }

    /// The distinct pages the run touches, in address order.
    pub fn touched(&self) -> Vec<usize> {
        let mut all: Vec<usize> = self.threads.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// [`touched`](Self::touched) as runs of consecutive pages
    /// `(first, pages)`, in address order (for instance to build a working
    /// set to compare with a recorded one).
    pub fn touched_runs(&self) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for p in self.touched() {
            match runs.last_mut() {
                Some((first, n)) if *first + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }
}

/// A busy loop calibrated to run for a given time: think time that is
/// CPU work, not a sleep.
///
/// The loop does a fixed amount of work per nanosecond measured when it
/// was calibrated; a worker that is descheduled meanwhile takes longer,
/// as a program's computation would.
#[derive(Debug, Clone, Copy)]
pub struct Spinner {
    /// Loop iterations per microsecond.
    per_us: f64,
}

impl Spinner {
    /// Calibrates the loop: the fastest of a few timed rounds (a round
    /// disturbed by the scheduler is slower, never faster). Takes a few
    /// milliseconds.
    pub fn calibrate() -> Self {
        const ITERS: u64 = 200_000;
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            spin(ITERS);
            best = best.min(t.elapsed());
        }
        let us = best.as_secs_f64() * 1e6;
        Self {
            per_us: ITERS as f64 / us.max(1e-3),
        }
    }

    /// Loop iterations per microsecond.
    pub fn per_us(&self) -> f64 {
        self.per_us
    }

    /// Computes for about `d`.
    pub fn think(&self, d: Duration) {
        if !d.is_zero() {
            spin((d.as_secs_f64() * 1e6 * self.per_us) as u64);
        }
    }
}

/// `iters` rounds of a multiply-add the compiler cannot drop.
fn spin(iters: u64) {
    let mut x = black_box(0x1234_5678_u64);
    for _ in 0..iters {
        x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
    }
    black_box(x);
}

/// The address a worker touches in page `page`: one 8-byte word, at an
/// offset that varies with the page (so that touches do not all land in one
/// cache set).
pub fn word_addr(base: usize, page_size: usize, page: usize) -> usize {
    base + page * page_size + (page * 64) % page_size
}

/// Touches page `page` of the memory at `base` (see [`Access`]) and returns
/// the word read.
///
/// # Safety
///
/// `base + page * page_size` must start a page of a live mapping, readable
/// and, for [`Access::Write`], writable, that nothing else writes
/// concurrently (a write stores back the value just read).
pub unsafe fn touch(base: usize, page_size: usize, page: usize, access: Access) -> u64 {
    let p = word_addr(base, page_size, page) as *mut u64;
    // SAFETY: the caller promises a live, readable page; the word is
    // 8-aligned inside it (page sizes are multiples of 64).
    let v = unsafe { std::ptr::read_volatile(p) };
    if access == Access::Write {
        // SAFETY: the caller promises a writable page that nothing else
        // writes: storing back the value read leaves it unchanged.
        unsafe { std::ptr::write_volatile(p, v) };
    }
    v
}

/// A worker's loop: touches `pages` in order, computing for `think` after
/// each touch, and returns a sum of the words read (to keep the reads).
///
/// # Safety
///
/// As for [`touch`], for every page in `pages`.
pub unsafe fn run_worker(
    base: usize,
    page_size: usize,
    pages: &[usize],
    access: Access,
    think: Duration,
    spinner: &Spinner,
) -> u64 {
    let mut sum = 0u64;
    for &p in pages {
        // SAFETY: the caller's promise, for each page.
        sum = sum.wrapping_add(unsafe { touch(base, page_size, p, access) });
        spinner.think(think);
    }
    sum
}

/// A small deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`; 0 for `n == 0`).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(w: &Workload) -> Vec<usize> {
        let mut v: Vec<usize> = w
            .clusters()
            .iter()
            .flat_map(|c| c.first..c.first + c.len)
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn the_set_is_stable_for_a_seed_and_about_the_fraction() {
        let w = Workload::new(65536);
        assert_eq!(w.clusters(), w.clusters());
        assert_eq!(w.plan(), w.plan());
        let set = set_of(&w);
        // Distinct pages, inside the image, exactly the fraction.
        let mut dedup = set.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), set.len());
        assert!(set.iter().all(|&p| p < 65536));
        assert_eq!(set.len(), 13107);
        // Another run or thread count: the same set. Another seed: another.
        let other_run = Workload {
            run: 7,
            threads: 3,
            ..w.clone()
        };
        assert_eq!(set_of(&other_run), set);
        let other_seed = Workload {
            seed: 2,
            ..w.clone()
        };
        assert_ne!(set_of(&other_seed), set);
        // Clusters of various lengths: many short, a few long.
        let lens: Vec<usize> = w.clusters().iter().map(|c| c.len).collect();
        let short = lens.iter().filter(|&&l| l <= 4).count();
        let long = lens.iter().filter(|&&l| l >= 128).count();
        assert!(short > lens.len() / 2, "{short} short of {}", lens.len());
        assert!(long > 0 && long < lens.len() / 10, "{long} long");
    }

    #[test]
    fn every_page_of_the_set_is_touched_once_with_a_little_extra() {
        let w = Workload {
            threads: 4,
            ..Workload::new(65536)
        };
        let plan = w.plan();
        let set = set_of(&w);
        let touched = plan.touched();
        assert_eq!(touched.len(), plan.touches(), "a page touched twice");
        let extra: Vec<usize> = touched
            .iter()
            .copied()
            .filter(|p| set.binary_search(p).is_err())
            .collect();
        assert_eq!(extra.len(), (set.len() as f64 * 0.01).round() as usize);
        assert_eq!(touched.len(), set.len() + extra.len());
        // The workers have about as much to do.
        let lens: Vec<usize> = plan.threads.iter().map(Vec::len).collect();
        let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
        assert!(max - min <= 512 + extra.len(), "{lens:?}");
        let runs: usize = plan.touched_runs().iter().map(|r| r.1).sum();
        assert_eq!(runs, touched.len());
    }

    #[test]
    fn jitter_changes_a_little_but_not_much() {
        let a = Workload::new(65536);
        let b = Workload {
            run: 1,
            ..a.clone()
        };
        let (pa, pb) = (a.plan(), b.plan());
        assert_ne!(pa, pb);
        // Each worker touches the set's pages in nearly the same order:
        // without the extra pages, a few percent are out of place.
        let set = set_of(&a);
        let stable = |l: &Vec<usize>| -> Vec<usize> {
            l.iter()
                .copied()
                .filter(|p| set.binary_search(p).is_ok())
                .collect()
        };
        let total = set.len();
        let same: usize = pa
            .threads
            .iter()
            .zip(&pb.threads)
            .map(|(x, y)| {
                let (x, y) = (stable(x), stable(y));
                assert_eq!(x.len(), y.len(), "the set is dealt to workers alike");
                x.iter().zip(&y).filter(|(p, q)| p == q).count()
            })
            .sum();
        assert!(
            same as f64 > 0.85 * total as f64,
            "{same} of {total} in place"
        );
        // Touched sets: the same but for the extra pages of each run.
        let (ta, tb) = (pa.touched(), pb.touched());
        let only_b = tb.iter().filter(|p| ta.binary_search(p).is_err()).count();
        assert!(only_b > 0 && only_b <= ta.len() / 50, "{only_b}");
        // Without jitter, runs are identical.
        let still = Workload {
            reorder: 0.0,
            extra: 0.0,
            ..a.clone()
        };
        let still_b = Workload {
            run: 9,
            ..still.clone()
        };
        assert_eq!(still.plan(), still_b.plan());
    }

    #[test]
    fn small_and_whole_images() {
        for pages in [1, 2, 5, 256] {
            for fraction in [0.0, 0.2, 1.0] {
                let w = Workload {
                    fraction,
                    ..Workload::new(pages)
                };
                let plan = w.plan();
                assert!(plan.touched().iter().all(|&p| p < pages));
                assert!(!plan.touched().is_empty());
                assert_eq!(set_of(&w).len(), w.set_pages());
            }
        }
        let all = Workload {
            fraction: 1.0,
            ..Workload::new(1000)
        };
        assert_eq!(all.plan().touched(), (0..1000).collect::<Vec<_>>());
        let every = Plan::every_page(10, 3, Order::Random, 1);
        assert_eq!(every.touched(), (0..10).collect::<Vec<_>>());
        assert_eq!(every.touches(), 10);
    }

    #[test]
    fn the_spinner_takes_about_the_time_asked() {
        let s = Spinner::calibrate();
        assert!(s.per_us() > 0.0);
        let t = Instant::now();
        s.think(Duration::from_millis(5));
        // Never much shorter; longer only when descheduled.
        assert!(t.elapsed() >= Duration::from_millis(3), "{:?}", t.elapsed());
    }

    #[test]
    fn a_write_touch_keeps_the_contents() {
        let mut mem = vec![0u64; 4096 / 8 * 4];
        for (i, w) in mem.iter_mut().enumerate() {
            *w = i as u64;
        }
        let before = mem.clone();
        let base = mem.as_mut_ptr() as usize;
        // SAFETY: 4 pages of our own vector (the base is 8-aligned; the
        // page size here is only used to compute offsets).
        let sum = unsafe {
            run_worker(
                base,
                4096,
                &[3, 0, 2],
                Access::Write,
                Duration::ZERO,
                &Spinner::calibrate(),
            )
        };
        assert_eq!(mem, before);
        let word = |p: usize| ((p * 4096 + (p * 64) % 4096) / 8) as u64;
        assert_eq!(sum, word(3) + word(0) + word(2));
    }
}
