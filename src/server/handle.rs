//! The handle to a spawned server.

use std::sync::Arc;

use crate::asyncfd::AsyncUffd;
use crate::error::{Error, Result};
use crate::stats::{Stats, StatsSnapshot};

use super::policy::ServerExit;
use super::restore::{Progress, SharedRecorder};
use super::stop::StopSignal;
use crate::working_set::WorkingSet;

/// A handle to a spawned [`Server`](crate::Server): its statistics, and a graceful stop.
///
/// Dropping the handle stops the server too.
///
/// When the server ends it drops its handle to the userfaultfd. If that was
/// the last one, the kernel closes it, unregisters the memory and wakes
/// every waiting thread, which then sees the memory as if it had never been
/// registered: zeros for anonymous memory. Keep a clone of the
/// [`AsyncUffd`] for as long as the memory must stay served.
#[derive(Debug)]
pub struct ServerHandle {
    pub(super) stop: Arc<StopSignal>,
    pub(super) stats: Arc<Stats>,
    pub(super) uffd: AsyncUffd,
    pub(super) task: Option<tokio::task::JoinHandle<Result<ServerExit>>>,
    pub(super) recorder: Option<SharedRecorder>,
    /// With a background fill: where the restore stands.
    pub(super) resident: Option<tokio::sync::watch::Receiver<Progress>>,
}

impl ServerHandle {
    /// The server's statistics now. They are updated right after each
    /// resolution, so they may trail a thread that was just woken by a
    /// moment; after [`shutdown`](Self::shutdown) they are final.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The live statistics, to keep after the handle is gone.
    pub fn stats_ref(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The working set recorded so far, with
    /// [`Server::record`](crate::Server::record); `None` without it. Take
    /// it once the program is ready (what it needed to get there), or at
    /// the end.
    pub fn working_set(&self) -> Option<WorkingSet> {
        let recorder = self.recorder.as_ref()?;
        let recorder = recorder.lock().unwrap_or_else(|p| p.into_inner());
        Some(recorder.working_set())
    }

    /// Waits until every page of every region is resident (served by a
    /// fault, the warm prefetch or the fill, or freed by the program), and
    /// returns how long after the server's start that was. With
    /// [`Fill::Unbounded`](crate::Fill::Unbounded), awaiting this before
    /// the program runs is eager population.
    ///
    /// The future does not borrow the handle: it can wait in a `select!`
    /// beside [`join`](Self::join), or in a task of its own.
    ///
    /// # Errors
    ///
    /// [`Error::NotResident`] without [`Server::fill`](crate::Server::fill),
    /// if the server ended first, or if pages stayed missing because their
    /// copies kept failing (see [`Stats::last_failure`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub fn resident(
        &self,
    ) -> impl std::future::Future<Output = Result<std::time::Duration>> + Send + 'static {
        let rx = self.resident.clone();
        async move {
            let Some(mut rx) = rx else {
                return Err(Error::NotResident {
                    reason: "the server has no background fill: give it one with Server::fill"
                        .into(),
                });
            };
            let outcome = rx.wait_for(|p| *p != Progress::Running).await.map(|p| *p);
            match outcome {
                Ok(Progress::Resident(after)) => Ok(after),
                Ok(Progress::Incomplete { missing }) => Err(Error::NotResident {
                    reason: format!(
                        "{missing} pages are still missing after the fill's last pass: their \
                         copies failed (Stats::last_failure says why)"
                    ),
                }),
                Ok(Progress::Running) | Err(_) => Err(Error::NotResident {
                    reason: "the server ended before every page was resident".into(),
                }),
            }
        }
    }

    /// The userfaultfd the server reads. The handle keeps it open; clone it
    /// to keep the memory registered after the server ends.
    pub fn uffd(&self) -> &AsyncUffd {
        &self.uffd
    }

    /// Asks the server to stop: it reads no new event, finishes the faults
    /// in flight (their threads get the right data), then ends with
    /// [`ServerExit::Stopped`]. Faults not yet read stay queued in the
    /// kernel, their threads asleep, until the userfaultfd is read by
    /// someone else or closed.
    ///
    /// With `EVENT_FORK`, a fork in flight sleeps until its event is read,
    /// and closing the userfaultfd would not wake it (see the crate's
    /// gotchas): so before it ends, a stopping server reads what is queued
    /// (up to 64 reads), serves those faults, and closes the uffds of
    /// those forks' children (a stopping server serves no new child).
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// Whether the server has ended.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the server to end. It can be awaited by reference (in a
    /// `select!` next to something else), and again after it finished.
    ///
    /// # Errors
    ///
    /// The server's error; a panic inside the server, or a second call after
    /// the first returned, is an [`Error::Server`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future leaves the server running and the
    /// handle usable.
    pub async fn join(&mut self) -> Result<ServerExit> {
        let Some(task) = self.task.as_mut() else {
            return Err(Error::Server {
                reason: "the server was already joined".into(),
            });
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(r) => r,
            Err(e) => Err(Error::Server {
                reason: format!("the server task failed: {e}"),
            }),
        }
    }

    /// [`stop`](Self::stop), then [`join`](Self::join).
    ///
    /// # Errors
    ///
    /// As for [`join`](Self::join).
    pub async fn shutdown(mut self) -> Result<ServerExit> {
        self.stop();
        self.join().await
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.stop();
    }
}
