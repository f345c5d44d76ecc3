//! Stopping on SIGTERM or SIGINT within a bounded time, whatever the controller is doing:
//! building its client, failing to reach the apiserver, competing for the Lease, reconciling.

use std::{future::Future, time::Duration};

use tokio::sync::watch;

/// Whether SIGTERM or SIGINT has arrived. Cheap to clone; every clone sees the request.
///
/// Listening starts in [`Shutdown::listen`] and lasts for the life of the process. Once tokio
/// has registered a handler for a signal, that signal no longer ends the process, so a
/// signal arriving while nothing waits for it would be lost: one listener, installed before
/// anything that can block, leaves no such gap.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Starts listening for SIGTERM and SIGINT (needs a tokio runtime).
    pub fn listen() -> std::io::Result<Shutdown> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let (requested, shutdown) = Shutdown::manual();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                _ = interrupt.recv() => tracing::info!("SIGINT received; stopping"),
            }
            let _ = requested.send(true);
            // The receivers may wait on; keep the sender (and with it their value) alive.
            std::future::pending::<()>().await;
        });
        Ok(shutdown)
    }

    /// A shutdown requested by sending `true` (tests).
    pub fn manual() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Resolves once a shutdown has been requested (at once if it already has been).
    pub async fn requested(mut self) {
        // An error means the sender is gone, which only happens as the runtime shuts down.
        let _ = self.0.wait_for(|requested| *requested).await;
    }
}

/// Runs `work`, which is expected to end some time after `stop` resolves, but gives up on it
/// `limit` after `stop`, or as soon as `stop` resolves if `idle()` then says it holds nothing
/// worth waiting for. `None` when it gave up (dropping `work` cancels it).
pub async fn bounded<T>(
    work: impl Future<Output = T>,
    stop: impl Future<Output = ()>,
    limit: Duration,
    idle: impl Fn() -> bool,
) -> Option<T> {
    let cut_off = async {
        stop.await;
        if !idle() {
            tokio::time::sleep(limit).await;
        }
    };
    tokio::select! {
        biased;
        output = work => Some(output),
        () = cut_off => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generous: every case here ends in well under a second, or hangs.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_request_reaches_every_clone_even_those_made_after_it() {
        let (tx, shutdown) = Shutdown::manual();
        let early = tokio::spawn(shutdown.clone().requested());
        tx.send(true).unwrap();
        tokio::time::timeout(TEST_DEADLINE, early).await.unwrap().unwrap();
        tokio::time::timeout(TEST_DEADLINE, shutdown.requested()).await.unwrap();
    }

    #[tokio::test]
    async fn work_that_never_ends_is_cut_off_after_the_limit() {
        let (tx, shutdown) = Shutdown::manual();
        tx.send(true).unwrap();
        let started = tokio::time::Instant::now();
        let limit = Duration::from_millis(200);
        let ended = bounded(std::future::pending::<()>(), shutdown.requested(), limit, || false);
        assert_eq!(tokio::time::timeout(TEST_DEADLINE, ended).await.unwrap(), None);
        assert!(started.elapsed() >= limit, "cut off before the limit");
    }

    #[tokio::test]
    async fn idle_work_is_dropped_at_once() {
        let (tx, shutdown) = Shutdown::manual();
        tx.send(true).unwrap();
        let ended = bounded(std::future::pending::<()>(), shutdown.requested(), TEST_DEADLINE * 2, || true);
        assert_eq!(tokio::time::timeout(TEST_DEADLINE, ended).await.unwrap(), None);
    }

    #[tokio::test]
    async fn work_that_ends_keeps_its_output() {
        let (_tx, shutdown) = Shutdown::manual();
        let ended = bounded(async { 7 }, shutdown.requested(), Duration::ZERO, || true);
        assert_eq!(tokio::time::timeout(TEST_DEADLINE, ended).await.unwrap(), Some(7));
    }
}
