//! What every task of one server shares.

use super::policy::{FailurePolicy, ForkPolicy};
use std::sync::Arc;
use std::time::Duration;

use crate::asyncfd::AsyncUffd;
use crate::flags::Features;
use crate::gate::RemovalGate;
use crate::stats::Stats;

/// What every task of one server shares.
pub(super) struct Shared<H> {
    pub(super) uffd: AsyncUffd,
    pub(super) handler: Arc<H>,
    pub(super) stats: Arc<Stats>,
    pub(super) page_size: usize,
    pub(super) failure: FailurePolicy,
    pub(super) fork: ForkPolicy,
    pub(super) retry_timeout: Duration,
    pub(super) prefetch: usize,
    pub(super) concurrency: usize,
    pub(super) batch: usize,
    pub(super) child_probe: Duration,
    /// With `EVENT_REMOVE`: the server is told about freed pages, and
    /// resolutions must not race with them.
    pub(super) gate: Option<Arc<RemovalGate>>,
}

impl<H> Shared<H> {
    /// The same configuration and handler, for a forked child's `uffd`,
    /// with a gate and buffers of its own.
    pub(super) fn for_child(&self, uffd: AsyncUffd) -> Self {
        let tracks_removal = uffd.features().contains(Features::EVENT_REMOVE);
        Shared {
            uffd,
            handler: self.handler.clone(),
            stats: self.stats.clone(),
            page_size: self.page_size,
            failure: self.failure,
            fork: self.fork,
            retry_timeout: self.retry_timeout,
            prefetch: self.prefetch,
            concurrency: self.concurrency,
            batch: self.batch,
            child_probe: self.child_probe,
            gate: tracks_removal.then(|| Arc::new(RemovalGate::default())),
        }
    }
}
