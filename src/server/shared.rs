//! What every task of one server shares.

use std::sync::Arc;
use std::time::Duration;

use crate::asyncfd::AsyncUffd;
use crate::flags::Features;
use crate::gate::RemovalGate;
use crate::stats::Stats;

use super::policy::{FailurePolicy, ForkPolicy};

/// The server's configuration, the same for the servers of its forked
/// children.
#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    /// The base page size.
    pub(super) page_size: usize,
    pub(super) failure: FailurePolicy,
    pub(super) fork: ForkPolicy,
    pub(super) retry_timeout: Duration,
    pub(super) prefetch: usize,
    pub(super) concurrency: usize,
    pub(super) batch: usize,
    pub(super) child_probe: Duration,
}

/// What every task of one server shares.
pub(super) struct Shared<H> {
    pub(super) uffd: AsyncUffd,
    pub(super) handler: Arc<H>,
    pub(super) stats: Arc<Stats>,
    pub(super) config: Config,
    /// With `EVENT_REMOVE`: the server is told about freed pages, and
    /// resolutions must not race with them.
    pub(super) gate: Option<Arc<RemovalGate>>,
}

impl<H> Shared<H> {
    /// For `uffd`, with a removal gate of its own if it reports removes.
    pub(super) fn new(uffd: AsyncUffd, handler: Arc<H>, stats: Arc<Stats>, config: Config) -> Self {
        let tracks_removal = uffd.features().contains(Features::EVENT_REMOVE);
        Shared {
            uffd,
            handler,
            stats,
            config,
            gate: tracks_removal.then(|| Arc::new(RemovalGate::default())),
        }
    }

    /// The same configuration and handler, for a forked child's `uffd`.
    pub(super) fn for_child(&self, uffd: AsyncUffd) -> Self {
        Shared::new(uffd, self.handler.clone(), self.stats.clone(), self.config)
    }
}
