//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): only the leader runs
//! the controller, and it releases the Lease when it stops so a standby takes over at once.
//! kube-lease-manager's standby sleeps until the holder's term would end; this module also
//! watches the Lease and wakes the standby when the holder gives it up.

use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease as LeaseObject;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};

/// How long [`Lease::release`] waits for the apiserver: an unreachable one must not hold up
/// the exit (the Lease then expires after its duration).
const RELEASE_LIMIT: Duration = Duration::from_secs(2);
/// The longest pause between attempts of [`Lease::start_retrying`].
const MAX_START_BACKOFF: Duration = Duration::from_secs(30);

/// Which Lease, and how long a leader holds it without renewing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    pub identity: String,
    pub duration_secs: u64,
    pub grace_secs: u64,
}

/// A lease manager that knows nothing of the Lease yet: its first step reads it.
async fn new_manager(client: &Client, settings: &LeaseSettings) -> Result<LeaseManager, LeaseManagerError> {
    LeaseManagerBuilder::new(client.clone(), &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(&settings.identity)
        .with_duration(settings.duration_secs)
        .with_grace(settings.grace_secs)
        .with_field_manager(crate::secret::FIELD_MANAGER)
        .build()
        .await
}

/// An item each time the Lease is seen without a holder (given up by its leader).
fn released(api: Api<LeaseObject>, name: &str) -> impl Stream<Item = ()> + Send + 'static {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config)
        .default_backoff()
        .applied_objects()
        .filter_map(|lease| async move { lease.ok().filter(is_released).map(drop) })
}

/// Whether nobody holds the Lease (its leader gave it up, or it was never taken).
fn is_released(lease: &LeaseObject) -> bool {
    lease.spec.as_ref().and_then(|spec| spec.holder_identity.as_deref()).is_none_or(str::is_empty)
}

/// kube-lease-manager's own loop (`LeaseManager::watch`), with one change: a standby that
/// sees the Lease given up stops waiting for the old term to end and competes at once (with a
/// fresh manager: the old one would trust the term it read until it ends). Sends whether this
/// replica leads; gives the Lease up when every receiver is gone.
async fn compete(
    mut manager: LeaseManager,
    sender: watch::Sender<bool>,
    released: impl Stream<Item = ()> + Send,
    client: Client,
    settings: LeaseSettings,
) -> Result<LeaseManager, LeaseManagerError> {
    let mut released = std::pin::pin!(released);
    let mut pause = Duration::from_secs(1);
    loop {
        let leading = *sender.borrow();
        tokio::select! {
            biased;
            _ = sender.closed() => return manager.release().await.map(|()| manager),
            // Dropping `changed` while it waits is safe: a standby holds nothing to give up.
            Some(()) = released.next(), if !leading => match new_manager(&client, &settings).await {
                Ok(fresh) => manager = fresh,
                Err(error) => tracing::warn!(%error, "leader election: cannot read the released Lease"),
            },
            result = manager.changed() => match result {
                Ok(state) => {
                    pause = Duration::from_secs(1);
                    if sender.send(state).is_err() {
                        return manager.release().await.map(|()| manager);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?pause, "leader election");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_START_BACKOFF);
                }
            },
        }
    }
}

/// A running lease manager.
pub struct Lease {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

impl Lease {
    /// Starts competing for the Lease.
    pub async fn start(client: Client, settings: &LeaseSettings) -> Result<Lease, LeaseManagerError> {
        let manager = new_manager(&client, settings).await?;
        let released = released(Api::namespaced(client.clone(), &settings.namespace), &settings.name);
        let (sender, state) = watch::channel(false);
        let task = tokio::spawn(compete(manager, sender, released, client, settings.clone()));
        Ok(Lease { state, task })
    }

    /// Starts competing for the Lease, retrying (1 s, 2 s, 4 s … 30 s apart) while the
    /// apiserver cannot be reached, as the controller's watches do. Cancel it by dropping it.
    pub async fn start_retrying(client: Client, settings: &LeaseSettings) -> Lease {
        let mut pause = Duration::from_secs(1);
        loop {
            match Lease::start(client.clone(), settings).await {
                Ok(lease) => return lease,
                Err(error) => tracing::warn!(%error, retry_in = ?pause, "cannot start leader election"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_START_BACKOFF);
        }
    }

    /// Returns once this replica holds the Lease.
    pub async fn acquired(&mut self) {
        while !*self.state.borrow_and_update() {
            if self.state.changed().await.is_err() {
                // The manager stopped; `lost` reports it.
                return;
            }
        }
    }

    /// Returns when this replica no longer holds the Lease.
    pub async fn lost(&mut self) {
        while *self.state.borrow_and_update() {
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the Lease up, so a standby need not wait for it to expire. Waits at most
    /// [`RELEASE_LIMIT`].
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(RELEASE_LIMIT, self.task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the leader Lease"),
            Ok(Ok(Err(error))) => tracing::warn!(%error, "could not release the leader Lease"),
            Ok(Err(error)) => tracing::warn!(%error, "the Lease task failed"),
            Err(_) => tracing::warn!(limit = ?RELEASE_LIMIT, "the leader Lease was not released in time; it expires"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_without_a_holder_is_released() {
        let lease = |holder: Option<&str>| LeaseObject {
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: holder.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(is_released(&lease(None)));
        assert!(is_released(&lease(Some(""))), "an empty holder is no holder");
        assert!(is_released(&LeaseObject::default()));
        assert!(!is_released(&lease(Some("replica-a"))));
    }
}
