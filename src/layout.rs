//! The server's page map: a checked table of [`Region`]s and the state of
//! each of their pages (served, in flight, removed), kept current through
//! remap, unmap and remove events; and the same for pages outside every
//! region.

use std::collections::{BTreeMap, HashSet};

use crate::error::Error;
pub(crate) use crate::region::{Region, SourceId};

/// Fills in the base page size and checks what one region can get
/// wrong on its own.
fn checked(mut region: Region, base_page: usize) -> Result<Region, Error> {
    region.page_size = region.given_page_size.unwrap_or(base_page);
    let bad = |problem: String| Error::InvalidRegion { region, problem };
    let ps = region.page_size;
    if !ps.is_power_of_two() || ps < base_page {
        return Err(bad(format!(
            "its page size {ps} is not a power of two at least the base page size {base_page}: \
             give the mapping's page size (the huge page size for hugetlbfs)"
        )));
    }
    if region.len == 0 {
        return Err(bad(
            "it is empty (its range ends at or before its start)".into()
        ));
    }
    if region.start.checked_add(region.len).is_none() {
        return Err(bad("it runs past the end of the address space".into()));
    }
    if region.start % ps != 0 || region.len % ps != 0 {
        return Err(bad(format!(
            "its start {:#x} and length {:#x} must be multiples of its page size {ps}: \
             round the range out to whole pages",
            region.start, region.len
        )));
    }
    if region.offset.checked_add(region.len as u64).is_none() {
        return Err(bad(format!(
            "its source offset {:#x} plus its length overflows 64 bits",
            region.offset
        )));
    }
    Ok(region)
}

/// Checks a server's region table (with `base_page`, the userfaultfd's
/// base page size, filled in where none was given): each region on its own,
/// then that no two overlap.
pub(crate) fn checked_regions(
    regions: impl IntoIterator<Item = Region>,
    base_page: usize,
) -> Result<Vec<Region>, Error> {
    let mut out = regions
        .into_iter()
        .map(|r| checked(r, base_page))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|r| r.start);
    for pair in out.windows(2) {
        if pair[1].start < pair[0].end() {
            return Err(Error::InvalidRegion {
                region: pair[1],
                problem: format!(
                    "it overlaps the region {:#x}..{:#x}: every address must belong to one region",
                    pair[0].start,
                    pair[0].end()
                ),
            });
        }
    }
    Ok(out)
}

/// A fixed-size set of page indices.
#[derive(Debug, Clone, Default)]
pub(crate) struct BitSet {
    words: Vec<u64>,
    len: usize,
}

impl BitSet {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    pub(crate) fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    pub(crate) fn set(&mut self, i: usize, v: bool) {
        if i >= self.len {
            return;
        }
        if v {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    pub(crate) fn set_range(&mut self, from: usize, to: usize, v: bool) {
        for i in from..to.min(self.len) {
            self.set(i, v);
        }
    }

    /// Splits off the bits from `at` on into a new set.
    pub(crate) fn split_off(&mut self, at: usize) -> BitSet {
        let at = at.min(self.len);
        let mut tail = BitSet::new(self.len - at);
        for i in at..self.len {
            tail.set(i - at, self.get(i));
        }
        self.len = at;
        self.words.truncate(at.div_ceil(64));
        if at % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (at % 64)) - 1;
            }
        }
        tail
    }
}

/// A region and the state of each of its pages.
#[derive(Debug, Clone)]
pub(crate) struct RegionState {
    pub(crate) region: Region,
    /// Pages resolved (and not freed since).
    pub(crate) served: BitSet,
    /// Pages a task is resolving now.
    pub(crate) inflight: BitSet,
    /// Pages freed by `MADV_DONTNEED`/`MADV_REMOVE`: served as zeros from
    /// now on, never from the source again.
    pub(crate) removed: BitSet,
    /// The index of the region (in the server's sorted table) this one was
    /// split from or is: splits and moves keep it.
    pub(crate) origin: usize,
    /// The index, in that region, of this one's first page.
    pub(crate) origin_first: usize,
}

impl RegionState {
    fn new(region: Region, origin: usize) -> Self {
        let pages = region.len / region.page_size;
        Self {
            region,
            served: BitSet::new(pages),
            inflight: BitSet::new(pages),
            removed: BitSet::new(pages),
            origin,
            origin_first: 0,
        }
    }

    /// The pages the region holds.
    pub(crate) fn pages(&self) -> usize {
        self.region.len / self.region.page_size
    }

    /// Whether page `i` is neither served, nor being resolved, nor freed.
    pub(crate) fn is_free(&self, i: usize) -> bool {
        !self.served.get(i) && !self.inflight.get(i) && !self.removed.get(i)
    }

    /// How many pages are free (see [`is_free`](Self::is_free)) and how
    /// many are being resolved.
    pub(crate) fn unsettled(&self) -> (usize, usize) {
        let (mut free, mut inflight) = (0, 0);
        let words = self.served.words.iter().zip(&self.inflight.words);
        for (w, ((s, i), r)) in words.zip(&self.removed.words).enumerate() {
            let valid = if (w + 1) * 64 <= self.served.len {
                u64::MAX
            } else {
                (1u64 << (self.served.len % 64)) - 1
            };
            free += (!(s | i | r) & valid).count_ones() as usize;
            inflight += (i & valid).count_ones() as usize;
        }
        (free, inflight)
    }

    pub(crate) fn page_index(&self, addr: usize) -> usize {
        (addr - self.region.start) / self.region.page_size
    }

    /// Splits at `addr` (page-aligned, strictly inside): `self` keeps the
    /// front, the back is returned.
    fn split_at(&mut self, addr: usize) -> RegionState {
        let idx = self.page_index(addr);
        let front = addr - self.region.start;
        let back = Region {
            start: addr,
            len: self.region.len - front,
            offset: self.region.offset + front as u64,
            ..self.region
        };
        self.region.len = front;
        RegionState {
            region: back,
            served: self.served.split_off(idx),
            inflight: self.inflight.split_off(idx),
            removed: self.removed.split_off(idx),
            origin: self.origin,
            origin_first: self.origin_first + idx,
        }
    }
}

/// The served regions, sorted by start and disjoint.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layout {
    pub(crate) regions: Vec<RegionState>,
}

impl Layout {
    pub(crate) fn new(mut regions: Vec<Region>) -> Self {
        regions.sort_by_key(|r| r.start);
        Self {
            regions: regions
                .into_iter()
                .enumerate()
                .map(|(i, r)| RegionState::new(r, i))
                .collect(),
        }
    }

    /// Index of the region holding `addr`.
    pub(crate) fn find(&self, addr: usize) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.region.start <= addr);
        let i = i.checked_sub(1)?;
        self.regions[i].region.contains(addr).then_some(i)
    }

    /// The region holding page `page` of the server's region `origin`
    /// (wherever it is now), and the page's index there.
    pub(crate) fn find_origin(&self, origin: usize, page: usize) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            (r.origin == origin && page >= r.origin_first && page - r.origin_first < r.pages())
                .then(|| (i, page - r.origin_first))
        })
    }

    /// Makes `addr` a region boundary if it falls strictly inside one.
    fn split(&mut self, addr: usize) {
        if let Some(i) = self.find(addr) {
            let r = &self.regions[i];
            let aligned = addr - (addr - r.region.start) % r.region.page_size;
            if aligned > r.region.start {
                let back = self.regions[i].split_at(aligned);
                self.regions.insert(i + 1, back);
            }
        }
    }

    /// Indices of the regions inside `start..end` after splitting there.
    fn carve(&mut self, start: usize, end: usize) -> std::ops::Range<usize> {
        self.split(start);
        self.split(end);
        let from = self.regions.partition_point(|r| r.region.end() <= start);
        let to = self.regions.partition_point(|r| r.region.start < end);
        from..to.max(from)
    }

    /// `MADV_DONTNEED`/`MADV_REMOVE` freed `start..end`.
    pub(crate) fn remove(&mut self, start: usize, end: usize) {
        for r in &mut self.regions {
            let (s, e) = (start.max(r.region.start), end.min(r.region.end()));
            if s >= e {
                continue;
            }
            let ps = r.region.page_size;
            // Partly covered pages are not freed by the kernel either.
            let first = (s - r.region.start).div_ceil(ps);
            let last = (e - r.region.start) / ps;
            r.served.set_range(first, last, false);
            r.removed.set_range(first, last, true);
        }
    }

    /// `start..end` was unmapped: forget it.
    pub(crate) fn unmap(&mut self, start: usize, end: usize) {
        let range = self.carve(start, end);
        self.regions.drain(range);
    }

    /// `from..from+len` moved to `to`.
    pub(crate) fn remap(&mut self, from: usize, to: usize, len: usize) {
        let range = self.carve(from, from + len);
        let moved: Vec<RegionState> = self.regions.drain(range).collect();
        // Whatever was at the destination is gone (MREMAP_FIXED unmaps it).
        self.unmap(to, to + len);
        for mut r in moved {
            r.region.start = r.region.start - from + to;
            // Resolutions in flight target the old address and will find it
            // gone; faults at the new address are planned afresh.
            let pages = r.region.len / r.region.page_size;
            r.inflight = BitSet::new(pages);
            let i = self
                .regions
                .partition_point(|x| x.region.start < r.region.start);
            self.regions.insert(i, r);
        }
    }
}

/// Hashes page addresses for the reader's sets: one multiply instead of
/// SipHash, which the reader does not need (it hashes addresses the kernel
/// reports, not input an attacker picks to collide).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PageHash;

impl std::hash::BuildHasher for PageHash {
    type Hasher = PageHasher;

    fn build_hasher(&self) -> PageHasher {
        PageHasher(0)
    }
}

#[derive(Debug)]
pub(crate) struct PageHasher(u64);

impl std::hash::Hasher for PageHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing; the high half folded down so that the low bits
        // (the table index) depend on the page number, not the zero offset
        // bits.
        let h = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^ (h >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 ^= n as u64;
    }

    fn write_u32(&mut self, n: u32) {
        self.0 ^= u64::from(n);
    }
}

/// The state of pages outside every region, served page by page with the
/// base page size: pages in flight and served (a set each, growing with the
/// pages served there), and the ranges freed by `Remove` (one entry per
/// disjoint range, however large).
#[derive(Debug, Clone, Default)]
pub(crate) struct LoosePages {
    inflight: HashSet<usize, PageHash>,
    served: HashSet<usize, PageHash>,
    /// Freed ranges, `start -> end`, disjoint and not touching.
    removed: BTreeMap<usize, usize>,
}

impl LoosePages {
    pub(crate) fn is_inflight(&self, page: usize) -> bool {
        self.inflight.contains(&page)
    }

    pub(crate) fn set_inflight(&mut self, page: usize, v: bool) {
        if v {
            self.inflight.insert(page);
        } else {
            self.inflight.remove(&page);
        }
    }

    pub(crate) fn is_served(&self, page: usize) -> bool {
        self.served.contains(&page)
    }

    pub(crate) fn set_served(&mut self, page: usize) {
        self.served.insert(page);
    }

    pub(crate) fn is_removed(&self, page: usize) -> bool {
        self.removed
            .range(..=page)
            .next_back()
            .is_some_and(|(_, &end)| page < end)
    }

    /// Forgets the served pages in `start..end`.
    fn forget_served(&mut self, start: usize, end: usize) {
        if self.served.is_empty() {
            return;
        }
        self.served.retain(|&p| p < start || p >= end);
    }

    /// `MADV_DONTNEED`/`MADV_REMOVE` freed `start..end` (whole pages of
    /// `page_size` only, as the kernel frees them).
    pub(crate) fn remove(&mut self, start: usize, end: usize, page_size: usize) {
        let start = start.next_multiple_of(page_size);
        let end = end - end % page_size;
        if start >= end {
            return;
        }
        self.forget_served(start, end);
        // Merge with every range that overlaps or touches.
        let (mut lo, mut hi) = (start, end);
        let touching: Vec<usize> = self
            .removed
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, _)| s)
            .collect();
        for s in touching {
            let e = self.removed.remove(&s).unwrap_or(s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.removed.insert(lo, hi);
    }

    /// Cuts `start..end` out of the freed ranges, returning the parts that
    /// were inside it.
    fn cut_removed(&mut self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let overlapping: Vec<(usize, usize)> = self
            .removed
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let mut inside = Vec::new();
        for (s, e) in overlapping {
            self.removed.remove(&s);
            if s < start {
                self.removed.insert(s, start);
            }
            if e > end {
                self.removed.insert(end, e);
            }
            inside.push((s.max(start), e.min(end)));
        }
        inside
    }

    /// `start..end` was unmapped: forget it. Resolutions in flight there
    /// find it gone; none marks a page served there when it settles.
    pub(crate) fn unmap(&mut self, start: usize, end: usize) {
        self.forget_served(start, end);
        self.cut_removed(start, end);
        self.inflight.retain(|&p| p < start || p >= end);
    }

    /// The state a forked child starts with: the pages freed stay freed,
    /// the pages served stay served (the child has copies of them), and
    /// the pages in flight for the parent are neither (still missing in the
    /// child).
    pub(crate) fn for_child(&self) -> Self {
        let mut child = self.clone();
        for p in self.inflight.iter() {
            child.served.remove(p);
        }
        child.inflight.clear();
        child
    }

    /// Takes `page` out of the in-flight set; whether it was in it.
    pub(crate) fn take_inflight(&mut self, page: usize) -> bool {
        self.inflight.remove(&page)
    }

    /// `from..from+len` moved to `to`, with what was served or freed there.
    pub(crate) fn remap(&mut self, from: usize, to: usize, len: usize) {
        let moved: Vec<usize> = self
            .served
            .iter()
            .copied()
            .filter(|&p| p >= from && p < from + len)
            .collect();
        let freed = self.cut_removed(from, from + len);
        self.unmap(to, to + len);
        for p in moved {
            self.served.remove(&p);
            self.served.insert(p - from + to);
        }
        for (s, e) in freed {
            self.removed.insert(s - from + to, e - from + to);
        }
        // In flight at the old address: those resolutions find it gone.
        self.inflight.retain(|&p| p < from || p >= from + len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 4096;

    #[test]
    fn bitset_split_keeps_bits() {
        let mut b = BitSet::new(130);
        for i in [0, 63, 64, 100, 129] {
            b.set(i, true);
        }
        let t = b.split_off(64);
        assert!(b.get(0) && b.get(63) && !b.get(64));
        assert!(t.get(0) && t.get(36) && t.get(65) && !t.get(1));
        assert_eq!(t.len, 66);
    }

    #[test]
    fn remap_moves_part_of_a_region_with_its_offset_and_state() {
        let mut l = Layout::new(
            checked_regions(
                [Region::new(0x10000..0x10000 + 4 * P)
                    .with_page_size(P)
                    .with_offset(0x1000)],
                P,
            )
            .unwrap(),
        );
        let i = l.find(0x10000 + 2 * P).unwrap();
        let idx = l.regions[i].page_index(0x10000 + 2 * P);
        l.regions[i].served.set(idx, true);
        l.remap(0x10000 + 2 * P, 0x90000, 2 * P);
        assert_eq!(l.regions.len(), 2);
        let moved = &l.regions[l.find(0x90000).unwrap()];
        assert_eq!(moved.region.offset, 0x1000 + 2 * P as u64);
        assert!(moved.served.get(0));
        assert!(!moved.served.get(1));
        assert!(l.find(0x10000 + 2 * P).is_none());
        assert_eq!(l.regions[l.find(0x10000).unwrap()].region.len, 2 * P);
    }

    #[test]
    fn region_tables_are_checked_with_clear_errors() {
        let ok = Region::new(0x10000..0x10000 + 4 * P);
        assert_eq!(ok.page_size(), None);
        let regions = checked_regions([ok], P).unwrap();
        assert_eq!(regions[0].page_size, P, "the base page size is filled in");
        let cases = [
            (
                Region::new(0x10000..0x20000).with_page_size(0),
                "power of two",
            ),
            (
                Region::new(0x10000..0x20000).with_page_size(3000),
                "power of two",
            ),
            (
                Region::new(0x10000..0x20000).with_page_size(1024),
                "power of two",
            ),
            (Region::new(0x10000..0x10000), "empty"),
            #[allow(clippy::reversed_empty_ranges)]
            (Region::new(0x20000..0x10000), "empty"),
            (Region::new(0x10001..0x20001), "multiples"),
            (Region::new(0x10000..0x10800), "multiples"),
            (
                Region::new(0x100000..0x300000).with_page_size(2 << 20),
                "multiples",
            ),
            (
                Region::new(0x10000..0x20000).with_offset(u64::MAX - P as u64),
                "overflows",
            ),
        ];
        for (region, want) in cases {
            let err = checked_regions([region], P).unwrap_err();
            assert!(err.to_string().contains(want), "{region:?}: {err}");
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        }
        let mut end_of_space = Region::new(0..P);
        end_of_space.start = usize::MAX - P + 1;
        end_of_space.len = 2 * P;
        let err = checked_regions([end_of_space], P).unwrap_err();
        assert!(err.to_string().contains("address space"), "{err}");
        let err = checked_regions(
            [Region::new(0x10000..0x30000), Region::new(0x2f000..0x40000)],
            P,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps the region 0x10000..0x30000"),
            "{err}"
        );
        // Touching is not overlapping.
        checked_regions(
            [Region::new(0x10000..0x30000), Region::new(0x30000..0x40000)],
            P,
        )
        .unwrap();
    }

    #[test]
    fn loose_pages_remember_removed_ranges_merged_and_moved() {
        let mut l = LoosePages::default();
        l.set_served(0x10000);
        l.set_served(0x20000);
        l.remove(0x10000, 0x12000, P);
        l.remove(0x12000, 0x14000, P);
        l.remove(0x13000, 0x13800, P); // inside a whole page only: nothing more
        assert!(!l.is_served(0x10000) && l.is_served(0x20000));
        assert_eq!(l.removed.len(), 1, "{:?}", l.removed);
        assert!(l.is_removed(0x13fff) && !l.is_removed(0x14000) && !l.is_removed(0xffff));
        l.remap(0x11000, 0x50000, 2 * P);
        assert!(l.is_removed(0x10000) && !l.is_removed(0x11000) && l.is_removed(0x13000));
        assert!(l.is_removed(0x50000) && l.is_removed(0x51fff) && !l.is_removed(0x52000));
        l.unmap(0x10000, 0x14000);
        assert!(!l.is_removed(0x10000) && !l.is_removed(0x13000));
        assert!(l.is_removed(0x50000));
    }

    #[test]
    fn loose_pages_unmapped_in_flight_are_not_marked_served_and_a_child_keeps_what_was_freed() {
        let mut l = LoosePages::default();
        l.set_inflight(0x10000, true);
        l.set_inflight(0x20000, true);
        l.set_served(0x30000);
        l.remove(0x40000, 0x42000, P);
        l.unmap(0x10000, 0x11000);
        assert!(
            !l.take_inflight(0x10000),
            "an unmapped page stays in flight"
        );
        let child = l.for_child();
        assert!(!child.is_inflight(0x20000) && !child.is_served(0x20000));
        assert!(child.is_served(0x30000) && child.is_removed(0x41000));
        assert!(l.take_inflight(0x20000));
    }

    #[test]
    fn unmap_and_remove_update_the_pages() {
        let mut l = Layout::new(
            checked_regions([Region::new(0x10000..0x10000 + 4 * P).with_page_size(P)], P).unwrap(),
        );
        l.regions[0].served.set_range(0, 4, true);
        l.remove(0x10000 + P, 0x10000 + 3 * P);
        assert!(l.regions[0].served.get(0) && !l.regions[0].served.get(1));
        assert!(l.regions[0].removed.get(2) && !l.regions[0].removed.get(3));
        l.unmap(0x10000, 0x10000 + P);
        assert!(l.find(0x10000).is_none());
        let r = &l.regions[l.find(0x10000 + P).unwrap()];
        assert!(r.removed.get(0));
    }
}
