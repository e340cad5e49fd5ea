//! The removal gate: a lock the event stream holds across each `read(2)`
//! while it records the `Remove` events the read brought in, so that a
//! resolution checked against it cannot land after the kernel zapped the
//! pages of a Remove it has not seen. Below both the stream, which records,
//! and the server, which checks.

use std::collections::VecDeque;
use std::sync::RwLock;

/// The writes of `Remove` events that tasks must not race with.
///
/// The kernel zaps the pages of a `MADV_DONTNEED` right after its Remove
/// message is read. A resolution in flight for one of those pages that
/// lands after the zap would leave the old contents there: silent
/// corruption. So the stream holds this lock for writing across each
/// `read(2)` and records every Remove it read, and tasks hold it for reading
/// across their ioctl after checking that no Remove overlapping their pages
/// was read since they were planned (if one was, the fault is planned again,
/// and the freed pages get zeros).
#[derive(Debug, Default)]
pub(crate) struct RemovalGate {
    pub(crate) log: RwLock<RemovalLog>,
}

#[derive(Debug, Default)]
pub(crate) struct RemovalLog {
    generation: u64,
    /// `(generation, start, end)` of recent removes, oldest first.
    recent: VecDeque<(u64, usize, usize)>,
}

/// How many recent removes the gate remembers; a job older than that is
/// planned again.
pub(crate) const REMOVE_LOG: usize = 1024;

impl RemovalGate {
    /// Called by the stream with the write lock held, for every Remove in
    /// the batch just read.
    pub(crate) fn lock_for_read(&self) -> std::sync::RwLockWriteGuard<'_, RemovalLog> {
        self.log.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn generation(&self) -> u64 {
        self.log
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }
}

impl RemovalLog {
    pub(crate) fn record(&mut self, start: usize, end: usize) {
        self.generation += 1;
        self.recent.push_back((self.generation, start, end));
        if self.recent.len() > REMOVE_LOG {
            self.recent.pop_front();
        }
    }

    /// Whether a remove read after generation `since` overlaps `ranges`.
    pub(crate) fn overlaps_since(
        &self,
        since: u64,
        ranges: impl Iterator<Item = (usize, usize)> + Clone,
    ) -> bool {
        if self.generation == since {
            return false;
        }
        if self.recent.front().is_none_or(|&(g, _, _)| g > since + 1) {
            return true; // forgotten: assume the worst
        }
        self.recent
            .iter()
            .filter(|&&(g, _, _)| g > since)
            .any(|&(_, s, e)| ranges.clone().any(|(a, b)| a < e && s < b))
    }
}
