//! The RegistryCredential controller: watches, reconcile, status, Events and retry policy.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{PartialObjectMeta, Patch, PatchParams},
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
    crd::{CredentialSource, CredentialStatus, RegistryCredential},
    dockerconfig,
    metrics::{FailureLabels, KindLabels, Metrics, ObjectLabels},
    secret::{FIELD_MANAGER, SecretChange, delete_if_controlled, desired_secret, ensure_secret},
    source::{
        ApiSecretReader, CredentialProvider, SourceContext,
        ecr::{EcrProvider, EcrSettings},
    },
    status::{DEGRADED, READY, SYNCED, condition, conditions_changed},
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
    /// Reconciles running at once.
    pub concurrency: u16,
    /// This replica's name in Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// How ECR sources behave.
    pub ecr: EcrSettings,
    /// Only credentials matching this label selector (sharding, canaries); all when `None`.
    pub selector: Option<String>,
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
        }
    }
}

/// State shared by all reconciles.
pub struct Context {
    client: Client,
    recorder: Recorder,
    config: ControllerConfig,
    metrics: Arc<Metrics>,
    /// ECR settings, AWS configuration and the shared token cache.
    ecr: EcrProvider,
    /// The status each credential was last given, and when: the copy in the controller's
    /// cache lags behind its own writes, and comparing with it would write the same status
    /// again (and repeat its Events) on the next reconcile.
    written: Mutex<HashMap<ObjectRef<RegistryCredential>, (CredentialStatus, Instant)>>,
    /// Consecutive failures per credential, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<RegistryCredential>, u32>>,
}

/// Runs the controller until `shutdown` completes, reporting through `admin` (metrics, and
/// readiness once the credential cache has synced).
pub async fn run<F>(client: Client, config: ControllerConfig, admin: AdminState, shutdown: F)
where
    F: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let reporter = Reporter { controller: CONTROLLER_NAME.into(), instance: config.instance.clone() };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        ecr: EcrProvider::new(client.clone(), config.ecr.clone(), admin.metrics.clone()),
        metrics: admin.metrics.clone(),
        failures: Mutex::default(),
        written: Mutex::default(),
        config: config.clone(),
    });
    let mut credentials = watcher::Config::default().any_semantic();
    if let Some(selector) = &config.selector {
        credentials = credentials.labels(selector);
    }
    let controller = Controller::new(Api::<RegistryCredential>::all(client.clone()), credentials);
    let store = controller.store();
    let ready_store = store.clone();
    tokio::spawn(async move {
        // The store's readiness is a one-waker channel that the Controller waits on too, so a
        // second waiter may never be woken: poll it again on a short timer instead.
        loop {
            match tokio::time::timeout(Duration::from_millis(200), ready_store.wait_until_ready()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
        info!("credential cache synced; ready");
        admin.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // Metadata only (Api<PartialObjectMeta<_>> makes metadata requests): the controller sees
    // every Secret's name and resourceVersion, never their data, and keeps no Secret cache.
    let secrets = Api::<PartialObjectMeta<Secret>>::all(client);
    let controller = controller
        .watches(secrets, watcher::Config::default(), move |secret| credentials_using(&store, &secret))
        .with_config(ControllerRuntimeConfig::default().concurrency(config.concurrency));
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(namespace = object.namespace.as_deref(), name = %object.name, "reconciled"),
                Err(error) => debug!(%error, "reconcile did not complete"),
            }
        })
        .await;
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
        .filter(|cr| cr.secret_name() == name || cr.spec.source.secret_names().contains(&name))
        .map(|cr| ObjectRef::from(cr.as_ref()))
        .collect()
}

/// What a successful sync did.
struct Synced {
    change: SecretChange,
    secret_name: String,
    registries: Vec<String>,
    expires_at: Option<Timestamp>,
    refresh_at: Option<Timestamp>,
}

// `object`, not `name`: JSON logs already use `name` for the span's own name.
#[tracing::instrument(skip_all, fields(kind = "RegistryCredential", namespace = cr.metadata.namespace.as_deref(), object = %cr.name_any()))]
async fn reconcile(cr: Arc<RegistryCredential>, ctx: Arc<Context>) -> Result<Action, Error> {
    if cr.metadata.deletion_timestamp.is_some() {
        // The Secret carries an owner reference; the garbage collector removes it.
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let outcome = sync(&cr, &ctx).await;
    let reported = report(&cr, &ctx, &outcome).await;
    let kind = KindLabels { kind: "RegistryCredential".into() };
    ctx.metrics.reconciles.get_or_create(&kind).inc();
    ctx.metrics.reconcile_duration.get_or_create(&kind).observe(started.elapsed().as_secs_f64());
    if let Some(error) = outcome.as_ref().err().or(reported.as_ref().err()) {
        let labels = FailureLabels { kind: kind.kind.clone(), reason: error.reason().into() };
        ctx.metrics.reconcile_failures.get_or_create(&labels).inc();
    }
    reported?;
    match outcome {
        Ok(synced) => {
            ctx.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(&ObjectRef::from(cr.as_ref()));
            let refresh_in = synced.refresh_at.map(|at| until(at) + Duration::from_secs(1));
            Ok(Action::requeue(refresh_in.map_or(ctx.config.resync_interval, |r| r.min(ctx.config.resync_interval))))
        }
        Err(error) => Err(error),
    }
}

async fn sync(cr: &RegistryCredential, ctx: &Context) -> Result<Synced, Error> {
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
    let desired =
        desired_secret(&secret_name, namespace, &cr.spec.secret, Some(owner), dockerconfig::render(&credentials.auths));
    let api = Api::<Secret>::namespaced(ctx.client.clone(), namespace);
    let change = ensure_secret(&api, &desired).await?;

    // spec.secret.name changed: remove the Secret written under the old name.
    let previous = cr.status.as_ref().and_then(|s| s.secret_name.as_deref());
    if let Some(previous) = previous.filter(|p| *p != secret_name)
        && delete_if_controlled(&api, previous, &owner_uid).await?
    {
        info!(secret = previous, "deleted Secret written under the previous name");
    }
    Ok(Synced {
        change,
        secret_name,
        registries: credentials.auths.into_iter().map(|a| a.server).collect(),
        expires_at: credentials.expires_at,
        refresh_at: credentials.refresh_at,
    })
}

/// Writes status when it changed, and publishes Events for writes and for new failures.
async fn report(cr: &RegistryCredential, ctx: &Context, outcome: &Result<Synced, Error>) -> Result<(), Error> {
    let object = ObjectRef::from(cr);
    let recent = ctx.recently_written(&object);
    // What the apiserver holds: our own recent write if the cache has not caught up yet.
    let previous = recent.as_ref().or(cr.status.as_ref());
    let generation = cr.metadata.generation;
    let has_expiry = matches!(cr.spec.source, CredentialSource::Ecr(_));
    let mut next = previous.cloned().unwrap_or_default();
    next.observed_generation = generation;
    next.source = Some(cr.spec.source.kind().into());
    match outcome {
        Ok(synced) => {
            let message =
                format!("Secret {} holds the credential for {}", synced.secret_name, synced.registries.join(", "));
            next.conditions = vec![condition(previous, READY, true, SYNCED, message, generation)];
            if has_expiry {
                next.conditions.push(condition(
                    previous,
                    DEGRADED,
                    false,
                    "Refreshed",
                    "the token is current".into(),
                    generation,
                ));
            }
            next.secret_name = Some(synced.secret_name.clone());
            next.registries = synced.registries.clone();
            next.expires_at = synced.expires_at.map(Time);
            next.next_refresh_at = synced.refresh_at.map(Time);
        }
        Err(error) => {
            let valid_until = previous.and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
            let still_valid = valid_until.is_some_and(|t| t > Timestamp::now());
            let ready = match (still_valid, previous.and_then(|s| s.condition(READY))) {
                // The Secret keeps a token that still works: pulls are fine, refreshing is not.
                (true, Some(ready)) if ready.status == "True" => ready.clone(),
                _ => {
                    let mut message = error.to_string();
                    if let (Some(at), Some(name)) = (valid_until, previous.and_then(|s| s.secret_name.as_ref())) {
                        message.push_str(&format!("; the token in Secret {name} expired at {at}"));
                    }
                    condition(previous, READY, false, error.reason(), message, generation)
                }
            };
            next.conditions = vec![ready];
            if has_expiry {
                let mut message = error.to_string();
                if let Some(at) = valid_until.filter(|_| still_valid) {
                    message.push_str(&format!("; the Secret keeps the current token, valid until {at}"));
                }
                next.conditions.push(condition(previous, DEGRADED, true, error.reason(), message, generation));
            }
        }
    }

    let labels = ObjectLabels {
        kind: "RegistryCredential".into(),
        namespace: cr.metadata.namespace.clone().unwrap_or_default(),
        name: cr.name_any(),
    };
    let ready = next.condition(READY).is_some_and(|c| c.status == "True");
    ctx.metrics.ready_credentials.get_or_create(&labels).set(i64::from(ready));
    if let Some(expires) = &next.expires_at {
        ctx.metrics.token_expiry.get_or_create(&labels).set(expires.0.as_millisecond() as f64 / 1000.0);
    }

    let event = match outcome {
        Ok(synced) => match synced.change {
            SecretChange::Created => {
                Some((EventType::Normal, "Created", format!("Created Secret {}", synced.secret_name)))
            }
            SecretChange::Updated => {
                Some((EventType::Normal, "Updated", format!("Updated Secret {}", synced.secret_name)))
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
        publish(ctx, cr, type_, reason, note).await;
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
        ctx.written.lock().unwrap_or_else(PoisonError::into_inner).insert(object, (next, Instant::now()));
    }
    Ok(())
}

impl Context {
    /// The status this controller wrote for the object within the last few seconds (longer
    /// than a watch event takes to arrive), if any. Older records are dropped.
    fn recently_written(&self, object: &ObjectRef<RegistryCredential>) -> Option<CredentialStatus> {
        const FRESH: Duration = Duration::from_secs(5);
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        written.retain(|_, (_, at)| at.elapsed() < FRESH);
        written.get(object).map(|(status, _)| status.clone())
    }
}

/// Time from now until `at` (zero if past).
fn until(at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default()
}

async fn publish(ctx: &Context, cr: &RegistryCredential, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Sync".into(), secondary: None };
    if let Err(error) = ctx.recorder.publish(&event, &cr.object_ref(&())).await {
        // An Event is best effort; the status carries the same information.
        warn!(%error, reason, "could not publish Event");
    }
}

fn error_policy(cr: Arc<RegistryCredential>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempt = {
        let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(ObjectRef::from(cr.as_ref())).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    // Wake up when a token in the Secret expires, so Ready turns False on time.
    let expiry = cr.status.as_ref().and_then(|s| s.expires_at.as_ref()).map(|t| until(t.0)).filter(|d| !d.is_zero());
    let delay =
        backoff(attempt, ctx.config.max_backoff).min(expiry.map_or(Duration::MAX, |d| d + Duration::from_secs(1)));
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
