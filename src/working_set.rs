//! [`WorkingSet`]: the pages a restore touched, in first-touch order, per
//! region, and its file format.
//!
//! A server records one with [`Server::record`](crate::Server::record); the
//! next restore of the same image prefetches it with
//! [`Server::warm`](crate::Server::warm). Pages are named by region and
//! page index, never by address: the next restore maps its memory
//! elsewhere.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::region::{Region, SourceId};

const MAGIC: &[u8; 8] = b"UFFDWSET";
/// The version of the file format this crate writes and reads.
pub const WORKING_SET_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;
const REGION_BYTES: usize = 32;
const RUN_BYTES: usize = 16;
const CHECKSUM: usize = 8;

/// A region as a [`WorkingSet`] records it: what identifies the memory it
/// restores (its source and offset there, its length and page size), not
/// where it was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordedRegion {
    /// The region's page source.
    pub source: SourceId,
    /// Where the region starts in its source.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Its page size.
    pub page_size: u64,
}

impl RecordedRegion {
    /// The pages the region holds.
    pub fn pages(&self) -> u64 {
        self.len / self.page_size
    }

    /// The record of a checked region (whose page size is filled in).
    pub(crate) fn of(region: &Region) -> Self {
        Self {
            source: region.source,
            offset: region.offset,
            len: region.len as u64,
            page_size: region.page_size as u64,
        }
    }
}

impl fmt::Display for RecordedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} bytes at offset {:#x} of {}, page size {}",
            self.len, self.offset, self.source, self.page_size
        )
    }
}

/// Consecutive pages of one region, touched one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// The region's index in [`WorkingSet::regions`].
    pub region: usize,
    /// The index of the first page in the region.
    pub first: u64,
    /// How many pages.
    pub pages: u64,
}

/// Why a working set could not be read, written or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkingSetError {
    /// Reading or writing the file failed.
    #[error("working-set file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The bytes do not start with the working-set magic.
    #[error("not a working-set file: it does not start with the magic \"UFFDWSET\"")]
    BadMagic,
    /// The file was written in a version of the format this crate cannot read.
    #[error(
        "working-set file version {found} is not supported (this crate reads version {supported}): \
         record the working set again with this version"
    )]
    Version {
        /// The file's version.
        found: u32,
        /// The version this crate reads.
        supported: u32,
    },
    /// The file's length does not match the counts in its header.
    #[error(
        "working-set file is truncated or has trailing bytes: its header promises {expected} \
         bytes, it has {found}"
    )]
    Length {
        /// The length the header's counts give.
        expected: u64,
        /// The length found.
        found: u64,
    },
    /// The checksum does not match: the file was damaged.
    #[error(
        "working-set file is damaged: checksum {stored:#018x} stored, {computed:#018x} computed"
    )]
    Checksum {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of its bytes.
        computed: u64,
    },
    /// A region of the set is impossible.
    #[error("region #{index} of the working set ({region}) is invalid: {problem}")]
    BadRegion {
        /// Its index.
        index: usize,
        /// The region.
        region: RecordedRegion,
        /// What is wrong.
        problem: &'static str,
    },
    /// A run names a region the set does not have, or pages past its end.
    #[error(
        "run #{index} of the working set ({pages} pages from page {first} of region #{region}) \
         is outside its region{}",
        match region_pages { Some(n) => format!(" ({n} pages)"), None => " (no such region)".into() }
    )]
    OutOfRange {
        /// The run's index.
        index: usize,
        /// The region it names.
        region: usize,
        /// Its first page.
        first: u64,
        /// Its length in pages.
        pages: u64,
        /// The pages of that region, if it exists.
        region_pages: Option<u64>,
    },
    /// The set was recorded for other memory than the server's regions.
    #[error(
        "the working set was recorded for another image or region layout: {problem}; \
         record it again for this one"
    )]
    Layout {
        /// What differs.
        problem: String,
    },
}

/// The pages a restore touched, per region, in first-touch order: what
/// [`Server::record`](crate::Server::record) records and
/// [`Server::warm`](crate::Server::warm) prefetches.
///
/// Pages are named by region and page index, so the set applies to the
/// same image mapped anywhere. It is saved in a small versioned file that
/// is validated when loaded (the format is below).
///
/// # File format (version 1)
///
/// All integers little-endian.
///
/// | bytes | field |
/// |---|---|
/// | 8 | magic `UFFDWSET` |
/// | 4 | version, 1 |
/// | 4 | region count `R` |
/// | 8 | run count `N` |
/// | 8 | page count (the sum of the runs' lengths) |
/// | `R` × 32 | per region: source id, source offset, length in bytes, page size (4 × u64) |
/// | `N` × 16 | per run, in first-touch order: region index (u32), pages (u32), first page index (u64) |
/// | 8 | FNV-1a 64 of every byte before it |
///
/// A file is refused with a [`WorkingSetError`] that says what is wrong:
/// another magic, another version, a length that does not match its
/// counts (truncated), a checksum that does not match (damaged), a region
/// whose page size or length is impossible, or a run outside its region.
///
/// ```
/// use tokio_uffd::{PageRun, RecordedRegion, SourceId, WorkingSet};
///
/// let region = RecordedRegion { source: SourceId::new(0), offset: 0, len: 64 << 12, page_size: 4096 };
/// let mut ws = WorkingSet::new(vec![region]);
/// ws.push(0, 10, 3)?; // pages 10, 11, 12 of region 0, touched first
/// ws.push(0, 13, 1)?; // then page 13: merged into the same run
/// ws.push(0, 2, 1)?;
/// assert_eq!(ws.runs(), [PageRun { region: 0, first: 10, pages: 4 }, PageRun { region: 0, first: 2, pages: 1 }]);
///
/// let bytes = ws.to_bytes();
/// assert_eq!(WorkingSet::from_bytes(&bytes)?, ws);
/// // A truncated file is refused, saying so.
/// let err = WorkingSet::from_bytes(&bytes[..bytes.len() - 3]).unwrap_err();
/// assert!(err.to_string().contains("truncated"));
/// # Ok::<(), tokio_uffd::WorkingSetError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkingSet {
    regions: Vec<RecordedRegion>,
    runs: Vec<PageRun>,
    pages: u64,
}

impl WorkingSet {
    /// An empty set for memory made of `regions`.
    pub fn new(regions: Vec<RecordedRegion>) -> Self {
        Self {
            regions,
            runs: Vec::new(),
            pages: 0,
        }
    }

    /// Appends `pages` pages of region `region` from page `first`, merged
    /// into the last run when they continue it.
    ///
    /// # Errors
    ///
    /// [`WorkingSetError::OutOfRange`] if the region does not exist or the
    /// pages run past its end.
    pub fn push(&mut self, region: usize, first: u64, pages: u64) -> Result<(), WorkingSetError> {
        let region_pages = self.regions.get(region).map(RecordedRegion::pages);
        let fits = region_pages.is_some_and(|n| first.checked_add(pages).is_some_and(|e| e <= n));
        if !fits {
            return Err(WorkingSetError::OutOfRange {
                index: self.runs.len(),
                region,
                first,
                pages,
                region_pages,
            });
        }
        self.append(region, first, pages);
        Ok(())
    }

    /// [`push`](Self::push) for pages known to be inside the region.
    pub(crate) fn append(&mut self, region: usize, first: u64, pages: u64) {
        if pages == 0 {
            return;
        }
        self.pages += pages;
        if let Some(last) = self.runs.last_mut() {
            if last.region == region && last.first + last.pages == first {
                last.pages += pages;
                return;
            }
        }
        self.runs.push(PageRun {
            region,
            first,
            pages,
        });
    }

    /// The regions, in the order runs name them.
    pub fn regions(&self) -> &[RecordedRegion] {
        &self.regions
    }

    /// The runs, in first-touch order.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// The pages of every run (a page listed twice counts twice).
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The bytes of every run.
    pub fn bytes(&self) -> u64 {
        self.runs
            .iter()
            .map(|r| r.pages * self.regions[r.region].page_size)
            .sum()
    }

    /// Whether the set lists no page.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// How many distinct pages of this set `other` does not list: for
    /// instance the pages a warm restore prefetched from this set that the
    /// program did not touch (wasted), with `other` the pages it touched.
    /// Regions are matched by what they record (source, offset, length,
    /// page size); pages of a region `other` lacks all count.
    pub fn pages_not_in(&self, other: &WorkingSet) -> u64 {
        let theirs: Vec<Option<PageSet>> = self
            .regions
            .iter()
            .map(|r| {
                let i = other.regions.iter().position(|o| o == r)?;
                Some(PageSet::of(other, i))
            })
            .collect();
        let mut counted: Vec<PageSet> = self.regions.iter().map(PageSet::empty).collect();
        let mut n = 0;
        for run in &self.runs {
            for p in run.first..run.first + run.pages {
                if counted[run.region].insert(p)
                    && !theirs[run.region].as_ref().is_some_and(|t| t.contains(p))
                {
                    n += 1;
                }
            }
        }
        n
    }

    /// The set in the file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER + self.regions.len() * REGION_BYTES + self.runs.len() * RUN_BYTES + CHECKSUM,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        // Runs longer than u32 pages are written as several.
        let split = |r: &PageRun| r.pages.div_ceil(u64::from(u32::MAX)).max(1);
        let nruns: u64 = self.runs.iter().map(split).sum();
        out.extend_from_slice(&nruns.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        for r in &self.regions {
            for v in [r.source.index() as u64, r.offset, r.len, r.page_size] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        for r in &self.runs {
            let (mut first, mut left) = (r.first, r.pages);
            while left > 0 {
                let n = left.min(u64::from(u32::MAX));
                out.extend_from_slice(&(r.region as u32).to_le_bytes());
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&first.to_le_bytes());
                first += n;
                left -= n;
            }
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads a set from the file format, checking everything.
    ///
    /// # Errors
    ///
    /// A [`WorkingSetError`] saying what is wrong with the bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WorkingSetError> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(WorkingSetError::BadMagic);
        }
        let mut at = 8;
        let mut take = |n: usize| {
            let v = bytes.get(at..at + n);
            at += n;
            v
        };
        let short = |expected: u64| WorkingSetError::Length {
            expected,
            found: bytes.len() as u64,
        };
        let version = take(4).map(le_u32).ok_or(short(HEADER as u64))?;
        if version != WORKING_SET_VERSION {
            return Err(WorkingSetError::Version {
                found: version,
                supported: WORKING_SET_VERSION,
            });
        }
        let nregions = take(4).map(le_u32).ok_or(short(HEADER as u64))? as u64;
        let nruns = take(8).map(le_u64).ok_or(short(HEADER as u64))?;
        let npages = take(8).map(le_u64).ok_or(short(HEADER as u64))?;
        let expected = (HEADER as u64)
            .checked_add(nregions * REGION_BYTES as u64)
            .and_then(|n| n.checked_add(nruns.checked_mul(RUN_BYTES as u64)?))
            .and_then(|n| n.checked_add(CHECKSUM as u64))
            .unwrap_or(u64::MAX);
        if expected != bytes.len() as u64 {
            return Err(short(expected));
        }
        let body = bytes.len() - CHECKSUM;
        let stored = le_u64(&bytes[body..]);
        let computed = fnv1a(&bytes[..body]);
        if stored != computed {
            return Err(WorkingSetError::Checksum { stored, computed });
        }
        let mut at = HEADER;
        let mut regions = Vec::with_capacity(nregions as usize);
        for index in 0..nregions as usize {
            let f = |i: usize| le_u64(&bytes[at + 8 * i..]);
            let region = RecordedRegion {
                source: SourceId::new(usize::try_from(f(0)).unwrap_or(usize::MAX)),
                offset: f(1),
                len: f(2),
                page_size: f(3),
            };
            at += REGION_BYTES;
            let problem = if !region.page_size.is_power_of_two() {
                Some("its page size is not a power of two")
            } else if region.len == 0 || region.len % region.page_size != 0 {
                Some("its length is not a positive multiple of its page size")
            } else if region.offset.checked_add(region.len).is_none() {
                Some("its offset plus its length overflows 64 bits")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(WorkingSetError::BadRegion {
                    index,
                    region,
                    problem,
                });
            }
            regions.push(region);
        }
        let mut set = WorkingSet::new(regions);
        for _ in 0..nruns {
            let region = le_u32(&bytes[at..]) as usize;
            let pages = u64::from(le_u32(&bytes[at + 4..]));
            let first = le_u64(&bytes[at + 8..]);
            at += RUN_BYTES;
            set.push(region, first, pages)?;
        }
        if set.pages != npages {
            return Err(WorkingSetError::Layout {
                problem: format!(
                    "its header counts {npages} pages, its runs {}: the file is inconsistent",
                    set.pages
                ),
            });
        }
        Ok(set)
    }

    /// Writes the set to `path` (created or replaced).
    ///
    /// # Errors
    ///
    /// [`WorkingSetError::Io`] naming the file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), WorkingSetError> {
        let path = path.as_ref();
        let io = |source| WorkingSetError::Io {
            path: path.to_owned(),
            source,
        };
        // Written beside it, then renamed over it: a reader (or a crash)
        // sees the old file or the new one, never half of either.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let written =
            std::fs::write(&tmp, self.to_bytes()).and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// Checks that the set was recorded for memory laid out as `regions`
    /// (what [`Server::warm`](crate::Server::warm) checks), without a
    /// server: every region of one must be a region of the other (same
    /// source, offset, length and page size; a region without a page size
    /// has the base page size). The set names the layout, not the image: a
    /// set recorded for another image of the same layout fits.
    ///
    /// # Errors
    ///
    /// [`WorkingSetError::Layout`] saying what differs.
    pub fn fits(&self, regions: &[Region]) -> Result<(), WorkingSetError> {
        let base = crate::sys::page_size();
        let mut filled: Vec<Region> = regions
            .iter()
            .map(|r| Region {
                page_size: r.given_page_size.unwrap_or(base),
                ..*r
            })
            .collect();
        filled.sort_by_key(|r| r.start);
        self.match_regions(&filled).map(drop)
    }

    /// Reads and checks the set saved at `path`.
    ///
    /// # Errors
    ///
    /// [`WorkingSetError::Io`] naming the file, or what
    /// [`from_bytes`](Self::from_bytes) finds wrong with it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, WorkingSetError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| WorkingSetError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// For each of the set's regions, the index of the server region (in
    /// `regions`, checked and sorted) that records the same: every region
    /// of one must be a region of the other.
    pub(crate) fn match_regions(&self, regions: &[Region]) -> Result<Vec<usize>, WorkingSetError> {
        let ours: Vec<RecordedRegion> = regions.iter().map(RecordedRegion::of).collect();
        let describe = |rs: &[RecordedRegion]| {
            rs.iter()
                .map(|r| format!("[{r}]"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mismatch = |what: String| WorkingSetError::Layout {
            problem: format!(
                "{what} (recorded: {}; this server: {})",
                describe(&self.regions),
                describe(&ours)
            ),
        };
        if self.regions.len() != ours.len() {
            return Err(mismatch(format!(
                "it has {} regions, the server {}",
                self.regions.len(),
                ours.len()
            )));
        }
        let mut map = Vec::with_capacity(self.regions.len());
        for (i, r) in self.regions.iter().enumerate() {
            match ours.iter().position(|o| o == r) {
                Some(j) if !map.contains(&j) => map.push(j),
                _ => {
                    return Err(mismatch(format!(
                        "its region #{i} ({r}) matches none of the server's regions"
                    )))
                }
            }
        }
        Ok(map)
    }
}

/// The pages of one region of a set, as a bitmap.
struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    fn empty(region: &RecordedRegion) -> Self {
        Self {
            words: vec![0; region.pages().div_ceil(64) as usize],
        }
    }

    fn of(set: &WorkingSet, region: usize) -> Self {
        let mut s = Self::empty(&set.regions[region]);
        for run in set.runs.iter().filter(|r| r.region == region) {
            for p in run.first..run.first + run.pages {
                s.insert(p);
            }
        }
        s
    }

    /// Adds page `p`; whether it was new.
    fn insert(&mut self, p: u64) -> bool {
        let (w, b) = ((p / 64) as usize, p % 64);
        let new = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        new
    }

    fn contains(&self, p: u64) -> bool {
        self.words
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("four bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("eight bytes"))
}

/// FNV-1a, 64 bits: catches a damaged file, not an attacker.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(len_pages: u64) -> RecordedRegion {
        RecordedRegion {
            source: SourceId::new(0),
            offset: 0x1000,
            len: len_pages * 4096,
            page_size: 4096,
        }
    }

    fn sample() -> WorkingSet {
        let mut ws = WorkingSet::new(vec![region(100), region(8)]);
        ws.regions[1].offset = 0x100_0000;
        ws.push(0, 5, 3).unwrap();
        ws.push(1, 0, 8).unwrap();
        ws.push(0, 8, 1).unwrap();
        ws.push(0, 99, 1).unwrap();
        ws
    }

    #[test]
    fn round_trips_and_merges_contiguous_pushes() {
        let ws = sample();
        assert_eq!(ws.runs().len(), 4);
        assert_eq!(ws.pages(), 13);
        assert_eq!(ws.bytes(), 13 * 4096);
        let back = WorkingSet::from_bytes(&ws.to_bytes()).unwrap();
        assert_eq!(back, ws);
        let mut merged = WorkingSet::new(vec![region(100)]);
        merged.push(0, 1, 1).unwrap();
        merged.push(0, 2, 2).unwrap();
        assert_eq!(merged.runs().len(), 1);
    }

    #[test]
    fn refuses_what_is_wrong_saying_what() {
        let bytes = sample().to_bytes();
        let err = |b: &[u8]| WorkingSet::from_bytes(b).unwrap_err().to_string();
        assert!(err(b"hello world, not a set").contains("magic"));
        assert!(err(&bytes[..20]).contains("truncated"));
        assert!(err(&bytes[..bytes.len() - 1]).contains("truncated"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(err(&longer).contains("trailing"));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        let e = err(&v2);
        assert!(e.contains("version 2 is not supported"), "{e}");
        let mut flipped = bytes.clone();
        flipped[HEADER + 3] ^= 1;
        assert!(err(&flipped).contains("damaged"));
        // A run past its region, with a valid checksum.
        let mut ws = sample();
        ws.runs[3].first = 100;
        let e = err(&ws.to_bytes());
        assert!(e.contains("outside its region (100 pages)"), "{e}");
        ws.runs[3].region = 7;
        let e = err(&ws.to_bytes());
        assert!(e.contains("no such region"), "{e}");
        let mut ws = sample();
        ws.regions[0].page_size = 3000;
        assert!(err(&ws.to_bytes()).contains("not a power of two"));
    }

    #[test]
    fn fits_checks_the_layout_as_warm_does() {
        let page = crate::sys::page_size();
        let mut ws = WorkingSet::new(vec![RecordedRegion {
            source: SourceId::new(0),
            offset: 0,
            len: 16 * page as u64,
            page_size: page as u64,
        }]);
        ws.push(0, 1, 2).unwrap();
        let base = 0x7f00_0000_0000usize;
        assert!(ws.fits(&[Region::new(base..base + 16 * page)]).is_ok());
        let e = ws.fits(&[Region::new(base..base + 32 * page)]).unwrap_err();
        assert!(e.to_string().contains("matches none"), "{e}");
        let moved = Region::new(base..base + 16 * page).with_offset(page as u64);
        assert!(ws.fits(&[moved]).is_err());
    }

    #[test]
    fn push_checks_the_region() {
        let mut ws = WorkingSet::new(vec![region(4)]);
        assert!(ws.push(0, 3, 2).is_err());
        assert!(ws.push(1, 0, 1).is_err());
        assert!(ws.push(0, u64::MAX, 2).is_err());
        assert!(ws.push(0, 0, 4).is_ok());
    }

    #[test]
    fn pages_not_in_counts_distinct_pages_the_other_lacks() {
        let ws = sample();
        let mut touched = WorkingSet::new(ws.regions().to_vec());
        touched.push(0, 5, 2).unwrap();
        touched.push(1, 0, 8).unwrap();
        // Missing: page 7, 8, 99 of region 0.
        assert_eq!(ws.pages_not_in(&touched), 3);
        assert_eq!(ws.pages_not_in(&ws), 0);
        assert_eq!(ws.pages_not_in(&WorkingSet::default()), 13);
    }

    #[test]
    fn a_file_round_trips_and_a_missing_one_names_its_path() {
        let path = std::env::temp_dir().join(format!("tokio-uffd-ws-{}", std::process::id()));
        sample().save(&path).unwrap();
        assert_eq!(WorkingSet::load(&path).unwrap(), sample());
        std::fs::remove_file(&path).unwrap();
        let e = WorkingSet::load(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
}
