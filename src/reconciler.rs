//! The RegistryCredential controller: watches, reconcile, status, Events and retry policy.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{Namespace, Secret, ServiceAccount},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, PartialObjectMeta, Patch, PatchParams},
    runtime::{
        Controller,
        controller::{Action, Config as ControllerRuntimeConfig},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::{
    Error,
    admin::AdminState,
    crd::{ClusterCredentialStatus, ClusterRegistryCredential, CredentialStatus, RegistryCredential},
    dockerconfig, fanout,
    metrics::{FailureLabels, KindLabels, Metrics, ObjectLabels},
    secret::{Claim, FIELD_MANAGER, SecretChange, delete_if_controlled, desired_secret, ensure_secret},
    service_account::{has_finalizer, set_finalizer, sync_namespace},
    source::{
        ApiSecretReader, CredentialProvider, SourceContext,
        ecr::{EcrProvider, EcrSettings},
    },
    status::{READY, Synced, conditions_changed, credential_status},
};

/// The status each credential was last given by this controller, and when: the copy in the
/// controller's cache lags behind its own writes, and comparing with it would write the same
/// status again (and repeat its Events) on the next reconcile.
pub(crate) struct RecentStatuses<K: Resource, S> {
    written: Mutex<HashMap<ObjectRef<K>, (S, Instant)>>,
}

impl<K, S: Clone> RecentStatuses<K, S>
where
    K: Resource,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    /// Longer than a watch event takes to arrive.
    const FRESH: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { written: Mutex::default() }
    }

    /// The status written for the object within the last few seconds, if any. Older records
    /// are dropped.
    pub(crate) fn get(&self, object: &ObjectRef<K>) -> Option<S> {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        written.retain(|_, (_, at)| at.elapsed() < Self::FRESH);
        written.get(object).map(|(status, _)| status.clone())
    }

    pub(crate) fn insert(&self, object: ObjectRef<K>, status: S) {
        self.written.lock().unwrap_or_else(PoisonError::into_inner).insert(object, (status, Instant::now()));
    }
}

/// Name the controller reports in Events.
pub const CONTROLLER_NAME: &str = "regcred";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Every credential is reconciled again after this long even without events, so a
    /// missed event is repaired within this bound.
    pub resync_interval: Duration,
    /// Longest wait between retries of a failing credential.
    pub max_backoff: Duration,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// This replica's name in Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// How ECR sources behave.
    pub ecr: EcrSettings,
    /// Only credentials matching this label selector (sharding, canaries); all when `None`.
    pub selector: Option<String>,
    /// Watch Secrets (metadata only) to react to drift, deletion and source changes at once;
    /// without it they are repaired at the next resync.
    pub watch_secrets: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(15 * 60),
            max_backoff: Duration::from_secs(5 * 60),
            concurrency: 8,
            instance: None,
            ecr: EcrSettings::default(),
            selector: None,
            watch_secrets: true,
        }
    }
}

/// State shared by all reconciles.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) recorder: Recorder,
    pub(crate) config: ControllerConfig,
    pub(crate) metrics: Arc<Metrics>,
    /// ECR settings, AWS configuration and the shared token cache (one cache for both kinds).
    pub(crate) ecr: EcrProvider,
    written: RecentStatuses<RegistryCredential, CredentialStatus>,
    pub(crate) written_cluster: RecentStatuses<ClusterRegistryCredential, ClusterCredentialStatus>,
    /// Consecutive failures per credential, for exponential backoff.
    pub(crate) failures: Mutex<HashMap<ObjectRef<kube::core::DynamicObject>, u32>>,
}

/// Runs the controller until `shutdown` completes, reporting through `admin` (metrics, and
/// readiness once the credential cache has synced).
pub async fn run<F>(client: Client, config: ControllerConfig, admin: AdminState, shutdown: F)
where
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let shutdown = futures::FutureExt::shared(shutdown);
    let reporter = Reporter { controller: CONTROLLER_NAME.into(), instance: config.instance.clone() };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        ecr: EcrProvider::new(client.clone(), config.ecr.clone(), admin.metrics.clone()),
        metrics: admin.metrics.clone(),
        failures: Mutex::default(),
        written: RecentStatuses::new(),
        written_cluster: RecentStatuses::new(),
        config: config.clone(),
    });
    let mut credentials = watcher::Config::default().any_semantic();
    if let Some(selector) = &config.selector {
        credentials = credentials.labels(selector);
    }
    let controller = Controller::new(Api::<RegistryCredential>::all(client.clone()), credentials.clone());
    let store = controller.store();
    let cluster = Controller::new(Api::<ClusterRegistryCredential>::all(client.clone()), credentials);
    let cluster_store = cluster.store();
    let (ready_stores, ready_cluster) = (store.clone(), cluster_store.clone());
    tokio::spawn(async move {
        if wait_ready(&ready_stores).await && wait_ready(&ready_cluster).await {
            info!("credential caches synced; ready");
            admin.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Metadata only (Api<PartialObjectMeta<_>> makes metadata requests): the controller sees
    // every Secret's and ServiceAccount's name and resourceVersion, never their data, and
    // keeps no cache of them.
    let secrets = Api::<PartialObjectMeta<Secret>>::all(client.clone());
    let accounts = Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone());
    let namespaces = Api::<PartialObjectMeta<Namespace>>::all(client);
    let concurrency = ControllerRuntimeConfig::default().concurrency(config.concurrency);
    let (accounts_store, secrets_store) = (store.clone(), store.clone());
    let controller = match config.watch_secrets {
        true => controller.watches(secrets.clone(), watcher::Config::default(), move |secret| {
            credentials_using(&secrets_store, &secret)
        }),
        false => controller,
    };
    let namespaced = controller
        .watches(accounts.clone(), watcher::Config::default(), move |account| {
            credentials_patching(&accounts_store, &account)
        })
        .with_config(concurrency.clone())
        .trigger_backoff(WatchBackoff::new())
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(log_result);
    let cluster =
        fanout::controller(cluster, cluster_store, config.watch_secrets.then_some(secrets), accounts, namespaces)
            .with_config(concurrency)
            .trigger_backoff(WatchBackoff::new())
            .graceful_shutdown_on(shutdown)
            .run(fanout::reconcile, fanout::error_policy, ctx)
            .for_each(log_result);
    futures::join!(namespaced, cluster);
}

/// The pause of all of a controller's watches after any of them fails. kube's default
/// (0.8 s doubling to 30 s) stacks up when a restarting apiserver or etcd fails every watch
/// at once, and left the controller deaf for half a minute in the restart tests; short pauses
/// resume the watches within a few seconds. Any event resets it.
#[derive(Clone)]
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(Self::MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Waits until a store has its first full list; false if it never will (shutdown).
async fn wait_ready<K: Resource + Clone>(store: &Store<K>) -> bool
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    // The store's readiness is a one-waker channel that the Controller waits on too, so a
    // second waiter may never be woken: poll it again on a short timer instead.
    loop {
        match tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready()).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) => continue,
        }
    }
}

async fn log_result<K: Resource, E: std::fmt::Display>(result: Result<(ObjectRef<K>, Action), E>) {
    match result {
        Ok((object, _)) => debug!(namespace = object.namespace.as_deref(), name = %object.name, "reconciled"),
        Err(error) => debug!(%error, "reconcile did not complete"),
    }
}

/// The credentials that patch a ServiceAccount of this name in its namespace.
fn credentials_patching(
    store: &Store<RegistryCredential>,
    account: &PartialObjectMeta<ServiceAccount>,
) -> Vec<ObjectRef<RegistryCredential>> {
    let (Some(namespace), Some(name)) = (account.metadata.namespace.as_deref(), account.metadata.name.as_deref())
    else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|cr| cr.metadata.namespace.as_deref() == Some(namespace))
        .filter(|cr| cr.spec.service_accounts.iter().any(|a| a == name) || has_finalizer(&cr.metadata))
        .map(|cr| ObjectRef::from(cr.as_ref()))
        .collect()
}

/// The credentials a Secret matters to: those that read it, and those that write a Secret
/// of that name (so a conflicting Secret's removal is noticed at once).
fn credentials_using(
    store: &Store<RegistryCredential>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<RegistryCredential>> {
    let (Some(namespace), Some(name)) = (secret.metadata.namespace.as_deref(), secret.metadata.name.as_deref()) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|cr| cr.metadata.namespace.as_deref() == Some(namespace))
        .filter(|cr| cr.secret_name() == name || cr.spec.source.secret_refs().iter().any(|(_, n)| *n == name))
        .map(|cr| ObjectRef::from(cr.as_ref()))
        .collect()
}

/// What a sync wrote.
struct Written {
    synced: Synced,
    change: SecretChange,
}

// `object`, not `name`: JSON logs already use `name` for the span's own name.
#[tracing::instrument(skip_all, fields(kind = "RegistryCredential", namespace = cr.metadata.namespace.as_deref(), object = %cr.name_any()))]
async fn reconcile(cr: Arc<RegistryCredential>, ctx: Arc<Context>) -> Result<Action, Error> {
    if cr.metadata.deletion_timestamp.is_some() {
        // The Secret carries an owner reference, so the garbage collector removes it; the
        // ServiceAccount entries are regcred's to remove.
        if has_finalizer(&cr.metadata) {
            release_service_accounts(&cr, &ctx).await?;
            let api = Api::<RegistryCredential>::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
            set_finalizer(&api, cr.as_ref(), false).await?;
        }
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let outcome = sync(&cr, &ctx).await;
    let reported = report(&cr, &ctx, &outcome).await;
    ctx.count_reconcile("RegistryCredential", started, outcome.as_ref().err().or(reported.as_ref().err()));
    reported?;
    let written = outcome?;
    ctx.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(&ObjectRef::from(cr.as_ref()).erase());
    Ok(ctx.requeue_after(written.synced.refresh_at))
}

async fn sync(cr: &RegistryCredential, ctx: &Context) -> Result<Written, Error> {
    let namespace = cr.metadata.namespace.as_deref().ok_or(Error::MissingObjectField("metadata.namespace"))?;
    let owner = cr.controller_owner_ref(&()).ok_or(Error::MissingObjectField("metadata.uid"))?;
    let secrets = ApiSecretReader(ctx.client.clone());
    let source_ctx = SourceContext {
        namespace,
        registry: cr.spec.registry.as_deref(),
        secrets: &secrets,
        ecr: Some(&ctx.ecr),
        cluster_scoped: false,
    };
    let credentials = cr.spec.source.fetch(&source_ctx).await?;

    let secret_name = cr.secret_name();
    let owner_uid = owner.uid.clone();
    let desired = desired_secret(
        &secret_name,
        namespace,
        &cr.spec.secret,
        Some(owner.clone()),
        dockerconfig::render(&credentials.auths),
    );
    let claim = Claim { owner, created: cr.metadata.creation_timestamp.as_ref().map(|t| t.0) };
    let change = ensure_secret(&ctx.client, &desired, &claim, None).await?;

    // spec.secret.name changed: remove the Secret written under the old name. The name comes
    // from the status this controller wrote last, which the cache may not show yet.
    let api = Api::<Secret>::namespaced(ctx.client.clone(), namespace);
    let written = ctx.written.get(&ObjectRef::from(cr));
    let previous = written.as_ref().or(cr.status.as_ref()).and_then(|s| s.secret_name.as_deref());
    let previous = previous.filter(|p| *p != secret_name);
    if let Some(previous) = previous
        && delete_if_controlled(&api, previous, &owner_uid).await?
    {
        info!(secret = previous, "deleted Secret written under the previous name");
    }

    let wanted = &cr.spec.service_accounts;
    if !wanted.is_empty() || has_finalizer(&cr.metadata) {
        let credentials = Api::<RegistryCredential>::namespaced(ctx.client.clone(), namespace);
        if !wanted.is_empty() {
            // Before the first entry is added, so none can outlive the credential.
            set_finalizer(&credentials, cr, true).await?;
        }
        let accounts = Api::<ServiceAccount>::namespaced(ctx.client.clone(), namespace);
        let list = accounts.list(&ListParams::default()).await?.items;
        sync_namespace(&accounts, &list, &secret_name, wanted).await?;
        if let Some(previous) = previous {
            let list = accounts.list(&ListParams::default()).await?.items;
            sync_namespace(&accounts, &list, previous, &[]).await?;
        }
        if wanted.is_empty() {
            set_finalizer(&credentials, cr, false).await?;
        }
    }
    Ok(Written {
        synced: Synced {
            secret_name,
            registries: credentials.auths.into_iter().map(|a| a.server).collect(),
            expires_at: credentials.expires_at,
            refresh_at: credentials.refresh_at,
        },
        change,
    })
}

/// Removes this credential's entries from its namespace's ServiceAccounts, unless another
/// credential holds the Secret of that name now (the entry is then theirs).
async fn release_service_accounts(cr: &RegistryCredential, ctx: &Context) -> Result<(), Error> {
    let namespace = cr.namespace().unwrap_or_default();
    let uid = cr.uid().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    let accounts = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace);
    let mut names = vec![cr.secret_name()];
    names.extend(cr.status.as_ref().and_then(|s| s.secret_name.clone()));
    names.dedup();
    for name in names {
        let held_by_other = secrets.get_opt(&name).await?.is_some_and(|s| !crate::secret::is_controlled_by(&s, &uid));
        if !held_by_other {
            let list = accounts.list(&ListParams::default()).await?.items;
            sync_namespace(&accounts, &list, &name, &[]).await?;
        }
    }
    Ok(())
}

/// Writes status when it changed, and publishes Events for writes and for new failures.
async fn report(cr: &RegistryCredential, ctx: &Context, outcome: &Result<Written, Error>) -> Result<(), Error> {
    let object = ObjectRef::from(cr);
    let recent = ctx.written.get(&object);
    // What the apiserver holds: our own recent write if the cache has not caught up yet.
    let previous = recent.as_ref().or(cr.status.as_ref());
    let next = credential_status(
        previous,
        cr.metadata.generation,
        &cr.spec.source,
        outcome.as_ref().ok().map(|w| &w.synced),
        outcome.as_ref().err(),
    );
    let labels = ObjectLabels {
        kind: "RegistryCredential".into(),
        namespace: cr.metadata.namespace.clone().unwrap_or_default(),
        name: cr.name_any(),
    };
    ctx.record_status(labels, &next);

    let event = match outcome {
        Ok(written) => match written.change {
            SecretChange::Created => {
                Some((EventType::Normal, "Created", format!("Created Secret {}", written.synced.secret_name)))
            }
            SecretChange::Updated => {
                Some((EventType::Normal, "Updated", format!("Updated Secret {}", written.synced.secret_name)))
            }
            SecretChange::Unchanged => None,
        },
        // A failure that persists is reported once, not on every retry.
        Err(error) if conditions_changed(previous, &next) => {
            Some((EventType::Warning, error.reason(), error.to_string()))
        }
        Err(_) => None,
    };
    if let Some((type_, reason, note)) = event {
        publish(ctx, &cr.object_ref(&()), type_, reason, note).await;
    }

    if previous != Some(&next) {
        let api = Api::<RegistryCredential>::namespaced(
            ctx.client.clone(),
            cr.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let patch = json!({
            "apiVersion": RegistryCredential::api_version(&()),
            "kind": RegistryCredential::kind(&()),
            "status": next,
        });
        api.patch_status(&cr.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.written.insert(object, next);
    }
    Ok(())
}

impl Context {
    /// Counts a reconcile, its duration and its failure (by reason) in the metrics.
    pub(crate) fn count_reconcile(&self, kind: &str, started: Instant, error: Option<&Error>) {
        let kind = KindLabels { kind: kind.into() };
        self.metrics.reconciles.get_or_create(&kind).inc();
        self.metrics.reconcile_duration.get_or_create(&kind).observe(started.elapsed().as_secs_f64());
        if let Some(error) = error {
            let labels = FailureLabels { kind: kind.kind.clone(), reason: error.reason().into() };
            self.metrics.reconcile_failures.get_or_create(&labels).inc();
        }
    }

    /// Publishes a credential's readiness and token expiry as metrics.
    pub(crate) fn record_status(&self, labels: ObjectLabels, status: &CredentialStatus) {
        let ready = status.condition(READY).is_some_and(|c| c.status == "True");
        self.metrics.ready_credentials.get_or_create(&labels).set(i64::from(ready));
        if let Some(expires) = &status.expires_at {
            self.metrics.token_expiry.get_or_create(&labels).set(expires.0.as_millisecond() as f64 / 1000.0);
        }
    }

    /// When to look again after a successful sync: at the next token refresh, and at the
    /// latest after the resync interval.
    pub(crate) fn requeue_after(&self, refresh_at: Option<Timestamp>) -> Action {
        let refresh_in = refresh_at.map(|at| until(at) + Duration::from_secs(1));
        Action::requeue(refresh_in.map_or(self.config.resync_interval, |r| r.min(self.config.resync_interval)))
    }
}

/// Time from now until `at` (zero if past).
fn until(at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default()
}

pub(crate) async fn publish(
    ctx: &Context,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Sync".into(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, object).await {
        // An Event is best effort; the status carries the same information.
        warn!(%error, reason, "could not publish Event");
    }
}

fn error_policy(cr: Arc<RegistryCredential>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.count_failure(&ObjectRef::from(cr.as_ref()).erase());
    let delay = retry_delay(attempt, ctx.config.max_backoff, cr.status.as_ref());
    warn!(
        kind = "RegistryCredential",
        namespace = cr.metadata.namespace.as_deref(),
        name = %cr.name_any(),
        reason = error.reason(),
        %error,
        retry_in_secs = delay.as_secs_f32(),
        "sync failed"
    );
    Action::requeue(delay)
}

impl Context {
    /// Counts one more consecutive failure of the object; returns the count.
    pub(crate) fn count_failure(&self, object: &ObjectRef<kube::core::DynamicObject>) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(object.clone()).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }
}

/// Exponential backoff, but a wake-up when a token in the Secret expires, so Ready turns
/// False on time.
pub(crate) fn retry_delay(attempt: u32, max: Duration, status: Option<&CredentialStatus>) -> Duration {
    let expiry = status.and_then(|s| s.expires_at.as_ref()).map(|t| until(t.0)).filter(|d| !d.is_zero());
    backoff(attempt, max).min(expiry.map_or(Duration::MAX, |d| d + Duration::from_secs(1)))
}

/// 1 s, 2 s, 4 s, … up to `max`.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(20);
    Duration::from_secs(1u64 << exp).min(max)
}

impl RegistryCredential {
    /// Name of the Secret this credential writes.
    pub fn secret_name(&self) -> String {
        self.spec.secret.name.clone().unwrap_or_else(|| self.name_any())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_is_short_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut backoff = WatchBackoff::new();
        let pauses: Vec<u128> = backoff.by_ref().take(7).map(|d| d.as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1600, 2000, 2000]);
        backoff.reset();
        assert_eq!(backoff.next(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let max = Duration::from_secs(300);
        assert_eq!(backoff(1, max), Duration::from_secs(1));
        assert_eq!(backoff(2, max), Duration::from_secs(2));
        assert_eq!(backoff(5, max), Duration::from_secs(16));
        assert_eq!(backoff(9, max), Duration::from_secs(256));
        assert_eq!(backoff(10, max), max);
        assert_eq!(backoff(u32::MAX, max), max);
    }
}
