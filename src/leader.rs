//! Leader election on a coordination.k8s.io Lease (kube-lease-manager): only the leader runs
//! the controller, and it releases the Lease when it stops so a standby takes over at once.
//! kube-lease-manager's standby sleeps until the holder's term would end; this module also
//! watches the Lease and wakes the standby when the holder gives it up, and gates the
//! controller's writes on the term the Lease records ([`WriteGate`]): a leader writes nothing
//! once its term may have ended, before a standby may take the Lease.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

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

/// The Lease as each change of it is seen.
fn lease_events(api: Api<LeaseObject>, name: &str) -> impl Stream<Item = LeaseObject> + Send + 'static {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config).default_backoff().applied_objects().filter_map(|lease| async move { lease.ok() })
}

/// Whether nobody holds the Lease (its leader gave it up, or it was never taken).
fn is_released(lease: &LeaseObject) -> bool {
    lease.spec.as_ref().and_then(|spec| spec.holder_identity.as_deref()).is_none_or(str::is_empty)
}

/// Until when `identity` may write on the strength of `lease`: the end of the term its last
/// renewal began (`renewTime` + `leaseDurationSeconds`, which is when a standby may take it),
/// less `margin`. None when the Lease names another holder, or no term.
fn held_until(lease: &LeaseObject, identity: &str, margin: Duration) -> Option<Instant> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = SystemTime::from(spec.renew_time.as_ref()?.0);
    let term = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    let left = (renewed + term).duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).saturating_sub(margin);
    Some(Instant::now() + left)
}

/// How long before its term ends a leader stops writing: a quarter of the renewal margin
/// (`grace`; 1.25 s of a 15-second Lease). A write let through reaches the apiserver before a
/// standby may take the Lease (with clocks apart by less than that); the other three quarters
/// are the time a renewal on time has to be stored and seen before the gate would close (0.75 s
/// with the tests' 3- and 4-second Leases, on a machine the whole suite shares).
fn write_margin(settings: &LeaseSettings) -> Duration {
    Duration::from_millis(settings.grace_secs.saturating_mul(250))
}

/// Until when this replica may write to the apiserver: open only while it holds the Lease for
/// a term it has seen the apiserver record. Checked by [`Gated`] at every write request, so a
/// leader that was stopped (SIGSTOP, a paused VM) or cut off past its term sends nothing when
/// it runs again, whatever its reconciles were doing.
#[derive(Clone, Debug, Default)]
pub struct WriteGate(Arc<Mutex<Option<Instant>>>);

impl WriteGate {
    fn until(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, until: Option<Instant>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }

    /// Whether a write may be sent now.
    pub fn is_open(&self) -> bool {
        self.until().is_some_and(|until| Instant::now() < until)
    }

    /// The tower layer for the controller's client.
    pub fn layer(&self) -> GateLayer {
        GateLayer(self.clone())
    }
}

/// A write refused because this replica cannot be sure it still holds the Lease.
#[derive(Debug, thiserror::Error)]
#[error("not sent: this replica's leader Lease term has ended or is not confirmed")]
pub struct NotLeading;

/// Wraps a client's service in [`Gated`].
#[derive(Clone, Debug)]
pub struct GateLayer(WriteGate);

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated { inner, gate: self.0.clone() }
    }
}

/// Sends reads (GET, HEAD: gets, lists, watches) always and every other request only while
/// the [`WriteGate`] is open; a refused request fails with [`NotLeading`] without being sent.
#[derive(Clone, Debug)]
pub struct Gated<S> {
    inner: S,
    gate: WriteGate,
}

impl<S, B> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: Into<tower::BoxError>,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, tower::BoxError>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let read = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
        if !read && !self.gate.is_open() {
            tracing::debug!(method = %request.method(), path = request.uri().path(), "write refused: not leading");
            return Box::pin(futures::future::ready(Err(NotLeading.into())));
        }
        let call = self.inner.call(request);
        Box::pin(async move { call.await.map_err(Into::into) })
    }
}

/// How the Lease task ended.
#[derive(Debug)]
enum Ended {
    /// Given up on request (SIGTERM), or never held.
    Released,
    /// The term ended without a renewal seen, or another holder was seen: nothing was written
    /// to the Lease (it may be another replica's by now).
    Lost,
}

/// kube-lease-manager's own loop (`LeaseManager::watch`), with these changes: a standby that
/// sees the Lease given up stops waiting for the old term to end and competes at once (with a
/// fresh manager: the old one would trust the term it read until it ends); this replica is
/// announced as leading, and the [`WriteGate`] opened, only for a term the Lease watch shows
/// it holding; the leadership ends when that term ends unrenewed or another holder is seen.
/// Sends whether this replica leads; gives the Lease up when every receiver is gone, unless
/// its term may be over.
async fn compete(
    mut manager: LeaseManager,
    sender: watch::Sender<bool>,
    leases: impl Stream<Item = LeaseObject> + Send,
    client: Client,
    settings: LeaseSettings,
    gate: WriteGate,
) -> Result<Ended, LeaseManagerError> {
    let mut leases = std::pin::pin!(leases);
    let margin = write_margin(&settings);
    let mut pause = Duration::from_secs(1);
    // After a failed step, when to try the next (waiting must not hold up the other branches:
    // the end of the term, above all).
    let mut retry_at: Option<Instant> = None;
    // The manager says it holds the Lease; and until when the Lease watch last showed it so.
    let mut acquired = false;
    let mut held: Option<Instant> = None;
    loop {
        // One step of the manager, kept across Lease events: dropping it between its renewal
        // and the read that follows would leave it with the old term, and it would renew again.
        let (manager_now, wait) = (&manager, retry_at);
        let next = {
            let mut step = std::pin::pin!(async move {
                if let Some(at) = wait {
                    tokio::time::sleep_until(at.into()).await;
                }
                manager_now.changed().await
            });
            loop {
                let leading = *sender.borrow();
                let until = gate.until().unwrap_or_else(Instant::now);
                tokio::select! {
                    biased;
                    _ = sender.closed() => break Next::Closed { leading },
                    () = tokio::time::sleep_until(until.into()), if leading => {
                        tracing::warn!("leader election: the Lease was not renewed within its term; no more writes");
                        break Next::Lost;
                    }
                    Some(lease) = leases.next() => {
                        held = held_until(&lease, &settings.identity, margin);
                        match (leading, held) {
                            (true, Some(until)) => gate.set(Some(until)),
                            (true, None) => {
                                tracing::warn!("leader election: the Lease names another holder; no more writes");
                                break Next::Lost;
                            }
                            (false, Some(until)) if acquired => {
                                gate.set(Some(until));
                                let _ = sender.send(true);
                            }
                            // A standby competes at once for a Lease given up, with a fresh manager.
                            (false, _) if is_released(&lease) => break Next::Released,
                            (false, _) => {}
                        }
                    }
                    result = &mut step => break Next::Stepped { result, leading },
                }
            }
        };
        match next {
            Next::Closed { leading } => {
                if leading && !gate.is_open() {
                    return Ok(Ended::Lost);
                }
                return manager.release().await.map(|()| Ended::Released);
            }
            Next::Lost => return Ok(lose(&gate, &sender)),
            Next::Released => {
                // Dropping `changed` while it waits is safe: a standby holds nothing.
                match new_manager(&client, &settings).await {
                    Ok(fresh) => {
                        manager = fresh;
                        acquired = false;
                    }
                    Err(error) => tracing::warn!(%error, "leader election: cannot read the released Lease"),
                }
            }
            Next::Stepped { result: Ok(state), leading } => {
                pause = Duration::from_secs(1);
                retry_at = None;
                acquired = state;
                match (state, held) {
                    (false, _) if leading => return Ok(lose(&gate, &sender)),
                    // Announced once the Lease watch shows the term (at once if it has).
                    (true, Some(until)) if !leading => {
                        gate.set(Some(until));
                        let _ = sender.send(true);
                    }
                    _ => {}
                }
            }
            Next::Stepped { result: Err(error), .. } => {
                tracing::warn!(%error, retry_in = ?pause, "leader election");
                retry_at = Some(Instant::now() + pause);
                pause = (pause * 2).min(MAX_START_BACKOFF);
            }
        }
    }
}

/// What ended a turn of [`compete`]'s loop.
enum Next {
    /// Every receiver is gone (SIGTERM): give the Lease up if it is surely still ours.
    Closed { leading: bool },
    /// The term ended unrenewed, or another holder was seen.
    Lost,
    /// A standby saw the Lease given up.
    Released,
    /// The manager's step ended.
    Stepped { result: Result<bool, LeaseManagerError>, leading: bool },
}

/// Closes the gate and tells the controller it no longer leads.
fn lose(gate: &WriteGate, sender: &watch::Sender<bool>) -> Ended {
    gate.set(None);
    let _ = sender.send(false);
    Ended::Lost
}

/// A running lease manager.
pub struct Lease {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<Ended, LeaseManagerError>>,
}

impl Lease {
    /// Starts competing for the Lease; `gate` opens while this replica holds it. `client` is
    /// the Lease's own, not gated by `gate`.
    pub async fn start(client: Client, settings: &LeaseSettings, gate: WriteGate) -> Result<Lease, LeaseManagerError> {
        let manager = new_manager(&client, settings).await?;
        let leases = lease_events(Api::namespaced(client.clone(), &settings.namespace), &settings.name);
        let (sender, state) = watch::channel(false);
        let task = tokio::spawn(compete(manager, sender, leases, client, settings.clone(), gate));
        Ok(Lease { state, task })
    }

    /// Starts competing for the Lease, retrying (1 s, 2 s, 4 s … 30 s apart) while the
    /// apiserver cannot be reached, as the controller's watches do. Cancel it by dropping it.
    pub async fn start_retrying(client: Client, settings: &LeaseSettings, gate: WriteGate) -> Lease {
        let mut pause = Duration::from_secs(1);
        loop {
            match Lease::start(client.clone(), settings, gate.clone()).await {
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

    /// Gives the Lease up, so a standby need not wait for it to expire, unless this replica's
    /// term may be over (then the Lease may be another's: it is left alone). Waits at most
    /// [`RELEASE_LIMIT`].
    pub async fn release(self) {
        drop(self.state);
        match tokio::time::timeout(RELEASE_LIMIT, self.task).await {
            Ok(Ok(Ok(Ended::Released))) => tracing::info!("released the leader Lease"),
            Ok(Ok(Ok(Ended::Lost))) => tracing::info!("the leader Lease was lost; left alone"),
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

    fn held(holder: &str, renewed_secs_ago: u64, duration: i32) -> LeaseObject {
        let renewed = SystemTime::now() - Duration::from_secs(renewed_secs_ago);
        let renewed = k8s_openapi::jiff::Timestamp::try_from(renewed).expect("a timestamp");
        LeaseObject {
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(renewed)),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_may_write_until_its_recorded_term_ends_less_the_margin() {
        let margin = Duration::from_secs(2);
        let until = held_until(&held("a", 3, 15), "a", margin).expect("held by a");
        let left = until.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_secs(10) && left > Duration::from_secs(9), "{left:?}");
        // Another holder, or a term already over, gives no time at all.
        assert_eq!(held_until(&held("b", 0, 15), "a", margin), None);
        let over = held_until(&held("a", 14, 15), "a", margin).expect("held by a");
        assert!(over <= Instant::now());
        assert_eq!(held_until(&LeaseObject::default(), "a", margin), None);
    }

    #[test]
    fn the_gate_is_open_only_before_its_deadline() {
        let gate = WriteGate::default();
        assert!(!gate.is_open(), "closed until a term is seen");
        gate.set(Some(Instant::now() + Duration::from_secs(60)));
        assert!(gate.is_open());
        gate.set(Some(Instant::now()));
        assert!(!gate.is_open());
        gate.set(None);
        assert!(!gate.is_open());
    }

    #[tokio::test]
    async fn a_closed_gate_sends_reads_and_refuses_writes_unsent() {
        use tower::{Layer, Service, ServiceExt};
        let sent = Arc::new(Mutex::new(Vec::new()));
        let inner = tower::service_fn({
            let sent = sent.clone();
            move |request: http::Request<()>| {
                sent.lock().unwrap().push(request.method().clone());
                async { Ok::<_, std::convert::Infallible>(http::Response::new(())) }
            }
        });
        let gate = WriteGate::default();
        let mut service = gate.layer().layer(inner);
        for method in [http::Method::GET, http::Method::PATCH, http::Method::POST, http::Method::DELETE] {
            let request = http::Request::builder().method(method).body(()).unwrap();
            let read = request.method() == http::Method::GET;
            match service.ready().await.unwrap().call(request).await {
                Ok(_) => assert!(read, "a write was sent through a closed gate"),
                Err(error) => assert!(!read && error.is::<NotLeading>(), "{error}"),
            }
        }
        assert_eq!(*sent.lock().unwrap(), [http::Method::GET], "only the read was sent");
        gate.set(Some(Instant::now() + Duration::from_secs(60)));
        let request = http::Request::builder().method(http::Method::PATCH).body(()).unwrap();
        service.ready().await.unwrap().call(request).await.expect("sent while open");
        assert_eq!(*sent.lock().unwrap(), [http::Method::GET, http::Method::PATCH]);
    }
}
