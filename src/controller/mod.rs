//! Runs the two credential controllers on one reconcile core: the watches, the index that
//! maps Secret, ServiceAccount and Namespace events to the credentials they concern, the
//! delete hooks that drop per-credential state, and the shared `Context`.

mod core;
mod credential;
mod fan_out;
mod observe;
mod report;
mod scope;
mod verification;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{FutureExt, Stream, StreamExt, channel::mpsc, future::BoxFuture};
use k8s_openapi::{
    api::core::v1::{Namespace, Secret, ServiceAccount},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::PartialObjectMeta,
    runtime::{
        Controller, WatchStreamExt,
        controller::{Action, Config as ControllerRuntimeConfig},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tracing::{debug, info, warn};

pub use credential::{Credential, Scope};
pub use scope::Namespaces;

use crate::{
    admin::AdminState,
    crd::{Attach, ClusterRegistryCredential, CredentialStatus, RegistryCredential},
    index::{Index, Trigger},
    metrics::{FailureLabels, KindLabels, Metrics, ObjectLabels},
    owned::OwnedSecrets,
    source::{
        acr::{AzureProvider, AzureSettings},
        ecr::{EcrProvider, EcrSettings},
        gcr::{GcpProvider, GcpSettings},
    },
    state::States,
    status::{READY, VERIFIED},
    verify::{Verifier, VerifySettings},
};

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
    /// Reconciles running at once, and writes at once within a fan-out.
    pub concurrency: u16,
    /// This replica's name in Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// How ECR sources behave.
    pub ecr: EcrSettings,
    /// How gcr sources with access tokens behave.
    pub gcp: GcpSettings,
    /// How acr sources behave.
    pub azure: AzureSettings,
    /// Only credentials matching this label selector (sharding, canaries); all when `None`.
    pub selector: Option<String>,
    /// Watch Secrets (metadata only) to react to drift, deletion and source changes at once;
    /// without it they are repaired at the next resync.
    pub watch_secrets: bool,
    /// Watch and write only these namespaces (`--namespaces`); all when `None`.
    pub namespaces: Namespaces,
    /// Registry checks (`Verified`).
    pub verify: VerifySettings,
    /// How Secrets reach Pods where a credential does not say (`--attach`).
    pub attach: Attach,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(15 * 60),
            max_backoff: Duration::from_secs(5 * 60),
            concurrency: 8,
            instance: None,
            ecr: EcrSettings::default(),
            gcp: GcpSettings::default(),
            azure: AzureSettings::default(),
            selector: None,
            watch_secrets: true,
            namespaces: None,
            verify: VerifySettings::default(),
            attach: Attach::ServiceAccounts,
        }
    }
}

/// State shared by all reconciles of both kinds.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) recorder: Recorder,
    pub(crate) config: ControllerConfig,
    pub(crate) metrics: Arc<Metrics>,
    /// ECR settings, AWS configuration and the shared token cache (one cache for both kinds).
    pub(crate) ecr: EcrProvider,
    /// Google settings, HTTP client and token cache.
    pub(crate) gcp: GcpProvider,
    /// Azure settings, HTTP client and token cache.
    pub(crate) azure: AzureProvider,
    /// Per-credential memory, by UID.
    pub(crate) states: States,
    /// Which credentials an event concerns.
    pub(crate) index: Index,
    /// Namespaces (metadata), for cluster credentials' selections.
    pub(crate) namespaces: Store<PartialObjectMeta<Namespace>>,
    namespaces_synced: AtomicBool,
    /// ServiceAccounts (metadata: names, annotations, resourceVersions), so a reconcile reads
    /// only the ServiceAccounts that may need a change.
    pub(crate) accounts: Store<PartialObjectMeta<ServiceAccount>>,
    accounts_synced: AtomicBool,
    /// The Secrets each credential controls, from the Secret watch.
    pub(crate) owned: OwnedSecrets,
    secrets_synced: AtomicBool,
    /// Registry checks: the HTTP clients, the rate, one check per host.
    pub(crate) verifier: Verifier,
    /// Reconciles a credential when its registry check has finished.
    retrigger: Triggers,
}

impl Context {
    fn namespaces_synced(&self) -> bool {
        self.namespaces_synced.load(Ordering::Acquire)
    }

    fn accounts_synced(&self) -> bool {
        self.accounts_synced.load(Ordering::Acquire)
    }

    /// Whether the record of owned Secrets is complete (always, without a Secret watch).
    fn secrets_synced(&self) -> bool {
        self.secrets_synced.load(Ordering::Acquire)
    }
}

/// Runs the controller until `shutdown` completes, reporting through `admin` (metrics, and
/// readiness once the caches have synced).
pub async fn run<F>(client: Client, config: ControllerConfig, admin: AdminState, shutdown: F)
where
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let shutdown = futures::FutureExt::shared(shutdown);
    let reporter = Reporter { controller: CONTROLLER_NAME.into(), instance: config.instance.clone() };
    let (namespaces, namespace_writer) = reflector::store();
    let (accounts, account_writer) = reflector::store();
    let (namespaced_tx, namespaced_rx) = mpsc::unbounded();
    let (cluster_tx, cluster_rx) = mpsc::unbounded();
    let triggers = Triggers { namespaced: namespaced_tx, cluster: cluster_tx };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        ecr: EcrProvider::new(client.clone(), config.ecr.clone(), admin.metrics.clone()),
        gcp: GcpProvider::new(client.clone(), config.gcp.clone(), admin.metrics.clone()),
        azure: AzureProvider::new(client.clone(), config.azure.clone(), admin.metrics.clone()),
        metrics: admin.metrics.clone(),
        states: States::default(),
        index: Index::default(),
        namespaces,
        namespaces_synced: AtomicBool::new(false),
        accounts,
        accounts_synced: AtomicBool::new(false),
        owned: OwnedSecrets::default(),
        secrets_synced: AtomicBool::new(!config.watch_secrets),
        verifier: Verifier::new(config.verify.clone()),
        retrigger: triggers.clone(),
        config: config.clone(),
    });

    let (namespaced, namespaced_store) = controller::<RegistryCredential, _>(&ctx, namespaced_rx, &shutdown);
    let (cluster, cluster_store) = controller::<ClusterRegistryCredential, _>(&ctx, cluster_rx, &shutdown);

    // Metadata only: the controller sees every Secret's, ServiceAccount's and Namespace's
    // name, labels and annotations, never a Secret's data.
    let scope = &config.namespaces;
    // Namespaces are cluster-scoped and hold nothing secret: one watch in either mode.
    let namespace_watch = watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default())
        .modify(namespace_identity);
    let namespace_events = cached_metadata(namespace_watch, namespace_writer, {
        let ctx = ctx.clone();
        move |event| {
            if let watcher::Event::InitDone = event {
                ctx.namespaces_synced.store(true, Ordering::Release);
            }
        }
    });
    let namespace_events = route(namespace_events, &triggers, {
        let ctx = ctx.clone();
        move |ns| ctx.index.namespace_event(&ns)
    });
    let account_events = route(
        cached_metadata(scope::watch(&client, scope, list_pages(), account_identity), account_writer, {
            let ctx = ctx.clone();
            move |event| match event {
                watcher::Event::Apply(account) | watcher::Event::InitApply(account) => {
                    ctx.index.account_seen(account, false)
                }
                watcher::Event::Delete(account) => ctx.index.account_seen(account, true),
                watcher::Event::InitDone => ctx.accounts_synced.store(true, Ordering::Release),
                watcher::Event::Init => {}
            }
        }),
        &triggers,
        {
            let ctx = ctx.clone();
            move |account| ctx.index.account_event(&account)
        },
    );
    let secret_events = match config.watch_secrets {
        true => route(
            scope::watch::<PartialObjectMeta<Secret>>(&client, scope, list_pages(), secret_identity)
                .backoff(WatchBackoff::new())
                .inspect({
                    let ctx = ctx.clone();
                    move |event| {
                        if let Ok(event) = event {
                            ctx.owned.observe(event);
                            if let watcher::Event::InitDone = event {
                                ctx.secrets_synced.store(true, Ordering::Release);
                            }
                        }
                    }
                })
                .touched_objects(),
            &triggers,
            {
                let ctx = ctx.clone();
                move |secret| ctx.index.secret_event(&secret)
            },
        )
        .boxed(),
        false => futures::future::ready(()).boxed(),
    };
    drop(triggers);

    let ready_ctx = ctx.clone();
    tokio::spawn(async move {
        if wait_ready(&namespaced_store).await && wait_ready(&cluster_store).await {
            while !ready_ctx.namespaces_synced() || !ready_ctx.accounts_synced() || !ready_ctx.secrets_synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            info!("caches synced; ready");
            admin.ready.store(true, Ordering::Relaxed);
        }
    });
    // The event routers end with the shutdown; the controllers drain first.
    let routers = async {
        futures::join!(namespace_events, account_events, secret_events);
    };
    tokio::select! {
        _ = async { futures::join!(namespaced, cluster) } => {}
        _ = async { routers.await; std::future::pending::<()>().await } => {}
    }
}

/// What the controller uses of a Secret's metadata (its namespace, name, resourceVersion and
/// owner references): its labels and annotations, which whoever writes it chooses (up to 256
/// KiB), are dropped as it arrives, so no Secret costs more than its name.
fn secret_identity(secret: &mut PartialObjectMeta<Secret>) {
    let meta = &mut secret.metadata;
    (meta.managed_fields, meta.annotations, meta.labels) = (None, None, None);
}

/// What the controller uses of a ServiceAccount's metadata (kept in a store): its namespace,
/// name, resourceVersion and regcred's own annotation; the rest, which whoever writes it
/// chooses, is dropped as it arrives.
fn account_identity(account: &mut PartialObjectMeta<ServiceAccount>) {
    let meta = &mut account.metadata;
    (meta.managed_fields, meta.labels) = (None, None);
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key == crate::service_account::ADDED_ANNOTATION);
    }
}

/// What the controller uses of a Namespace's metadata (kept in a store): its name, labels
/// and deletion timestamp; its annotations, which can be long, are dropped as it arrives.
fn namespace_identity(namespace: &mut PartialObjectMeta<Namespace>) {
    namespace.metadata.annotations = None;
}

/// Drops from a cached object what no reconcile reads: its managedFields, type, uid and
/// the like. A store of 10,000 Namespaces and 10,000 ServiceAccounts keeps less per object.
fn slim<K>(object: &mut PartialObjectMeta<K>) {
    object.types = None;
    let meta = &mut object.metadata;
    (meta.managed_fields, meta.uid, meta.self_link, meta.generate_name) = (None, None, None, None);
    (meta.creation_timestamp, meta.owner_references, meta.finalizers) = (None, None, None);
}

/// Objects per page of a watch's (re)list: every object's metadata carries up to 256 KiB of
/// annotations that anyone who can write it chooses, and a page is read whole before they are
/// dropped, so a page holds at most 6.25 MiB of them. (A restart beside 200 Secrets with 100 KB
/// annotations peaked at 71 MiB with pages of 100, 42 MiB with 25.)
const LIST_PAGE: u32 = 25;

/// The watch configuration for Secrets and ServiceAccounts: lists in pages of [`LIST_PAGE`].
fn list_pages() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE)
}

/// A metadata-only watch of `K`, [`slim`]med, kept in `writer`'s store; `observe`
/// sees each event before the objects go on to be routed.
fn cached_metadata<K>(
    watch: impl Stream<Item = Result<watcher::Event<PartialObjectMeta<K>>, watcher::Error>> + Send + 'static,
    writer: reflector::store::Writer<PartialObjectMeta<K>>,
    observe: impl Fn(&watcher::Event<PartialObjectMeta<K>>) + Send + 'static,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    watch
        .backoff(WatchBackoff::new())
        .modify(slim)
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                observe(event);
            }
        })
        .touched_objects()
}

/// Where routed events go.
#[derive(Clone)]
struct Triggers {
    namespaced: mpsc::UnboundedSender<ObjectRef<RegistryCredential>>,
    cluster: mpsc::UnboundedSender<ObjectRef<ClusterRegistryCredential>>,
}

impl Triggers {
    fn send(&self, trigger: Trigger) {
        // A closed channel means the controllers stopped: nothing left to tell.
        let _ = match trigger {
            Trigger::Namespaced(r) => self.namespaced.unbounded_send(r).map_err(drop),
            Trigger::Cluster(r) => self.cluster.unbounded_send(r).map_err(drop),
        };
    }
}

/// Maps each object of a watch to the credentials it concerns, through the index.
fn route<T, S>(
    events: S,
    triggers: &Triggers,
    concerns: impl Fn(T) -> Vec<Trigger> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    T: Send + 'static,
{
    let triggers = triggers.clone();
    events.for_each(move |event| {
        match event {
            Ok(object) => {
                for trigger in concerns(object) {
                    triggers.send(trigger);
                }
            }
            Err(error) => debug!(%error, "watch failed; retrying"),
        }
        futures::future::ready(())
    })
}

/// One kind's controller: its own watch (with the delete hook that drops its state), the
/// index's triggers, and the shared core.
fn controller<K, F>(
    ctx: &Arc<Context>,
    triggers: mpsc::UnboundedReceiver<ObjectRef<K>>,
    shutdown: &futures::future::Shared<F>,
) -> (BoxFuture<'static, ()>, Store<K>)
where
    K: Credential,
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let mut config = watcher::Config::default().any_semantic();
    if let Some(selector) = &ctx.config.selector {
        config = config.labels(selector);
    }
    let (store, writer) = reflector::store();
    let hooks = Mutex::new(DeleteHooks::default());
    let hook_ctx = ctx.clone();
    let objects = K::watch(&ctx.client, &ctx.config.namespaces, config)
        .backoff(WatchBackoff::new())
        .reflect(writer)
        .inspect(move |event| {
            if let Ok(event) = event {
                hooks.lock().unwrap_or_else(PoisonError::into_inner).observe(event, &hook_ctx);
            }
        })
        .applied_objects();
    let run = Controller::for_stream(objects, store.clone())
        .reconcile_on(triggers)
        .with_config(ControllerRuntimeConfig::default().concurrency(ctx.config.concurrency))
        .graceful_shutdown_on(shutdown.clone())
        .run(core::reconcile::<K>, core::error_policy::<K>, ctx.clone())
        .for_each(log_result)
        .boxed();
    (run, store)
}

/// Keeps the index and per-credential state in step with one kind's watch: entries are
/// (re)written when an object is seen and dropped when it is deleted, including deletions a
/// watch gap hid (found at the next relist).
///
/// With `--selector`, an object the watch stops showing may still exist: relabelled, it left
/// the selection, which a label-selected watch reports as a deletion. Each such object is
/// checked, and released if it left (`core::release_if_left`); a deleted one whose entries are
/// still recorded (its finalizer went first) has them released.
#[derive(Default)]
struct DeleteHooks {
    /// uid → (namespace, name) of every object seen.
    known: HashMap<String, (Option<String>, String)>,
    relisted: Option<HashSet<String>>,
}

impl DeleteHooks {
    fn observe<K: Credential>(&mut self, event: &watcher::Event<K>, ctx: &Arc<Context>) {
        match event {
            watcher::Event::Apply(object) => self.seen(object, ctx),
            watcher::Event::InitApply(object) => {
                self.seen(object, ctx);
                if let (Some(relisted), Some(uid)) = (&mut self.relisted, object.uid()) {
                    relisted.insert(uid);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some(uid) = object.uid() {
                    self.known.remove(&uid);
                    gone::<K>(ctx, uid, object.namespace(), object.name_any());
                }
            }
            watcher::Event::Init => self.relisted = Some(HashSet::new()),
            watcher::Event::InitDone => {
                let relisted = self.relisted.take().unwrap_or_default();
                let (kept, missing) =
                    std::mem::take(&mut self.known).into_iter().partition(|(uid, _)| relisted.contains(uid));
                self.known = kept;
                for (uid, (namespace, name)) in missing {
                    gone::<K>(ctx, uid, namespace, name);
                }
            }
        }
    }

    fn seen<K: Credential>(&mut self, object: &K, ctx: &Context) {
        let Some(uid) = object.uid() else { return };
        let selection = match object.parts().scope {
            credential::Scope::Selection(selection) => Some(selection.clone()),
            credential::Scope::Namespace(_) => None,
        };
        ctx.index.upsert(&uid, object.trigger(), object.index_keys(), selection);
        self.known.insert(uid, (object.namespace(), object.name_any()));
    }
}

/// Forgets an object the watch no longer shows, and checks in the background whether it left
/// the selection (`--selector`) rather than the cluster, or left the cluster with entries still
/// recorded for it.
fn gone<K: Credential>(ctx: &Arc<Context>, uid: String, namespace: Option<String>, name: String) {
    let busy = ctx.states.with(&uid, |s| s.busy.clone());
    ctx.forget(&uid);
    tokio::spawn(core::release_if_left::<K>(ctx.clone(), core::Gone { namespace, name, uid }, busy));
}

/// The pause of a watch after it fails. kube's default (0.8 s doubling to 30 s) stacks up
/// when a restarting apiserver or etcd fails every watch at once, and left the controller
/// deaf for half a minute in the restart tests; short pauses resume the watches within a few
/// seconds. Any event resets it.
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

impl Context {
    /// Counts a reconcile, its duration and its failure (by reason) in the metrics.
    pub(crate) fn count_reconcile(&self, kind: &str, started: Instant, error: Option<&crate::Error>) {
        let kind = KindLabels { kind: kind.into() };
        self.metrics.reconciles.get_or_create(&kind).inc();
        self.metrics.reconcile_duration.get_or_create(&kind).observe(started.elapsed().as_secs_f64());
        if let Some(error) = error {
            let labels = FailureLabels { kind: kind.kind.clone(), reason: error.reason().into() };
            self.metrics.reconcile_failures.get_or_create(&labels).inc();
        }
    }

    /// Publishes a credential's status as metrics: Ready, Verified, each condition's status and
    /// reason, and its token's expiry and next refresh (series absent where the status has none).
    pub(crate) fn record_status(&self, labels: &ObjectLabels, status: &CredentialStatus) {
        let metrics = &self.metrics;
        let ready = status.condition(READY).is_some_and(|c| c.status == "True");
        metrics.ready_credentials.get_or_create(labels).set(i64::from(ready));
        match status.condition(VERIFIED) {
            Some(verified) => {
                metrics.verified_credentials.get_or_create(labels).set(i64::from(verified.status == "True"));
            }
            None => {
                metrics.verified_credentials.remove(labels);
            }
        }
        metrics.set_conditions(
            labels,
            status.conditions.iter().map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str())),
        );
        let timestamp = |t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| t.0.as_millisecond() as f64 / 1000.0;
        for (gauge, at) in
            [(&metrics.token_expiry, &status.expires_at), (&metrics.token_refresh, &status.next_refresh_at)]
        {
            match at {
                Some(at) => {
                    gauge.get_or_create(labels).set(timestamp(at));
                }
                None => {
                    gauge.remove(labels);
                }
            }
        }
    }

    /// When to look again after a successful sync: at the next token refresh or registry
    /// check, and at the latest after the resync interval.
    pub(crate) fn requeue_after(&self, refresh_at: Option<Timestamp>, verify_in: Option<Duration>) -> Action {
        let refresh_in = refresh_at.map(|at| until(at) + Duration::from_secs(1));
        let soonest = [refresh_in, verify_in].into_iter().flatten().min();
        Action::requeue(soonest.map_or(self.config.resync_interval, |r| r.min(self.config.resync_interval)))
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
