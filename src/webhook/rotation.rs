//! Keeps the webhook's serving certificate current: [`maintain`] watches the Secret, loads every
//! version into the [`Resolver`], and in self-managed mode writes the rotations
//! [`certs::plan`] asks for and keeps the MutatingWebhookConfiguration's `caBundle` equal to the
//! Secret's `ca.crt`.
//!
//! **Several replicas.** Every replica runs `maintain`; writes are guarded (a create fails with
//! 409 when the Secret exists, a merge patch carries the `resourceVersion` it was planned from),
//! so one replica's rotation wins and the others see it through their watch and find nothing left
//! to do. Nothing is written when the plan is nothing: at rest and across restarts, 0 writes.
//!
//! **Injection.** A server-side apply of the configuration with field manager
//! `regcred-webhook-ca` holding only each webhook's `name` and `clientConfig.caBundle`:
//! `webhooks` is a list map keyed by `name`, so the apply touches exactly those fields of the
//! webhooks named and nothing else (a JSON merge patch would replace the whole list, a JSON patch
//! addresses entries by index). It is forced: after a `helm upgrade` that resets `caBundle`, Helm
//! owns the field and the apply takes it back. It is sent only when some `caBundle` differs, and
//! the configuration is watched by name, so such a reset is repaired as soon as it is seen.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, stream::BoxStream};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use super::certs::{self, CA_CRT, CertMode, CertSettings, CertState, TLS_CRT, TLS_KEY};
use super::tls::Resolver;

/// Field manager of the Secret's writes.
pub const FIELD_MANAGER: &str = "regcred";
/// Field manager of the `caBundle` injection.
pub const INJECTION_MANAGER: &str = "regcred-webhook-ca";
/// The longest sleep between two plans when no event comes.
pub const MAX_SLEEP: Duration = Duration::from_secs(3600);
/// After a failed write, when to plan again (the watch usually comes first).
pub const RETRY: Duration = Duration::from_secs(5);
/// The shortest time between two writes of the Secret by one replica: a plan converges in one
/// write, this only bounds the damage should it not.
pub const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Certs(#[from] certs::CertError),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

fn is_conflict(error: &WriteError) -> bool {
    matches!(error, WriteError::Kube(kube::Error::Api(status)) if status.code == 409)
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// One watched object: its latest version once the first listing is complete.
struct Watched<K> {
    object: Option<K>,
    listing: Option<K>,
    synced: bool,
}

impl<K> Watched<K> {
    fn new() -> Self {
        Watched { object: None, listing: None, synced: false }
    }

    /// Applies an event; true when the object as known changed (or first became known).
    fn apply(&mut self, event: watcher::Event<K>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing = None;
                false
            }
            watcher::Event::InitApply(object) => {
                self.listing = Some(object);
                false
            }
            watcher::Event::InitDone => {
                self.object = self.listing.take();
                self.synced = true;
                true
            }
            watcher::Event::Apply(object) => {
                self.object = Some(object);
                self.synced
            }
            watcher::Event::Delete(_) => {
                self.object = None;
                self.synced
            }
        }
    }
}

struct Rotation {
    settings: CertSettings,
    secrets: Api<Secret>,
    configurations: Api<MutatingWebhookConfiguration>,
    resolver: Arc<Resolver>,
    secret: Watched<Secret>,
    configuration: Watched<MutatingWebhookConfiguration>,
    /// When to plan again.
    next: SystemTime,
    /// The configuration's absence was logged (until it appears).
    told_missing: bool,
    /// The last Secret found unreadable (resourceVersion), so it is logged once.
    told_unreadable: Option<String>,
    last_write: Option<tokio::time::Instant>,
}

/// Keeps the serving certificate current until `shutdown`: watches the Secret
/// (`settings.namespace`, field selector `metadata.name=<settings.secret>`) and loads each version
/// into `resolver`; in [`CertMode::SelfManaged`] also creates and rotates the CA and leaf in that
/// Secret ([`certs::plan`]) and keeps every `caBundle` of the MutatingWebhookConfiguration
/// `settings.configuration` equal to its `ca.crt`, watching that configuration by name. Plans
/// again on every Secret event and at the plan's next due time (at most [`MAX_SLEEP`] later).
pub async fn maintain(
    client: kube::Client,
    settings: CertSettings,
    resolver: Arc<Resolver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client);
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut secret_events: BoxStream<'static, _> =
        watcher(secrets.clone(), by_name(&settings.secret)).default_backoff().boxed();
    let mut configuration_events: BoxStream<'static, _> = match settings.mode {
        CertMode::SelfManaged => {
            watcher(configurations.clone(), by_name(&settings.configuration)).default_backoff().boxed()
        }
        CertMode::External => futures::stream::pending().boxed(),
    };
    let mut rotation = Rotation {
        settings,
        secrets,
        configurations,
        resolver,
        secret: Watched::new(),
        configuration: Watched::new(),
        next: SystemTime::now() + MAX_SLEEP,
        told_missing: false,
        told_unreadable: None,
        last_write: None,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let sleep = rotation.next.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).min(MAX_SLEEP);
        tokio::select! {
            () = &mut shutdown => return,
            event = secret_events.next() => match event {
                Some(Ok(event)) => {
                    if rotation.secret.apply(event) {
                        rotation.secret_changed().await;
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "webhook certificate Secret watch failed"),
                None => return,
            },
            event = configuration_events.next() => match event {
                Some(Ok(event)) => {
                    if rotation.configuration.apply(event) {
                        rotation.inject().await;
                    }
                }
                Some(Err(error)) => tracing::warn!(%error, "MutatingWebhookConfiguration watch failed"),
                None => return,
            },
            () = tokio::time::sleep(sleep) => {
                if rotation.secret.synced && rotation.settings.mode == CertMode::SelfManaged {
                    rotation.rotate().await;
                    rotation.inject().await;
                } else {
                    rotation.next = SystemTime::now() + MAX_SLEEP;
                }
            }
        }
    }
}

fn data(secret: Option<&Secret>) -> Option<&BTreeMap<String, ByteString>> {
    secret.and_then(|s| s.data.as_ref())
}

impl Rotation {
    async fn secret_changed(&mut self) {
        self.load();
        if self.settings.mode == CertMode::SelfManaged {
            self.rotate().await;
            self.inject().await;
        }
    }

    /// Serves the Secret's `tls.crt`/`tls.key` from the next handshake on.
    fn load(&mut self) {
        let Some(data) = data(self.secret.object.as_ref()) else { return };
        let (Some(crt), Some(key)) = (data.get(TLS_CRT), data.get(TLS_KEY)) else { return };
        match self.resolver.load_pem(&crt.0, &key.0) {
            Ok(true) => tracing::info!(secret = %self.settings.secret, "webhook serving certificate loaded"),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(secret = %self.settings.secret, %error, "webhook serving certificate not loaded")
            }
        }
    }

    /// Plans, and writes what the plan asks for (self-managed mode).
    async fn rotate(&mut self) {
        let now = SystemTime::now();
        let state = match data(self.secret.object.as_ref()).map(CertState::from_data) {
            None => None,
            Some(Ok(state)) => Some(state),
            Some(Err(error)) => {
                let version = self.secret.object.as_ref().and_then(|s| s.metadata.resource_version.clone());
                if self.told_unreadable != version {
                    tracing::warn!(secret = %self.settings.secret, %error, "webhook certificates unreadable: regenerating");
                    self.told_unreadable = version;
                }
                None
            }
        };
        let plan = certs::plan(now, state.as_ref(), &self.settings);
        if plan.is_nothing() {
            self.next = plan.next_check;
            return;
        }
        if let Some(wait) = self.last_write.and_then(|at| MIN_WRITE_INTERVAL.checked_sub(at.elapsed())) {
            self.next = now + wait;
            return;
        }
        self.last_write = Some(tokio::time::Instant::now());
        match self.write(now, state.as_ref(), &plan).await {
            Ok(written) => {
                tracing::info!(
                    secret = %self.settings.secret,
                    new_ca = plan.new_ca,
                    leaf = ?plan.leaf.map(|(_, reason)| reason),
                    expired_cas = plan.dropped(),
                    "webhook certificates rotated"
                );
                self.secret.object = Some(written);
                self.load();
                // Plan again on the written state.
                self.next = now;
            }
            Err(error) if is_conflict(&error) => {
                tracing::debug!(secret = %self.settings.secret, "webhook certificates written by another replica first");
                self.next = now + RETRY;
            }
            Err(error) => {
                tracing::warn!(secret = %self.settings.secret, %error, "webhook certificates not written");
                self.next = now + RETRY;
            }
        }
    }

    /// Creates the Secret, or patches it guarded by the resourceVersion it was planned from.
    async fn write(
        &self,
        now: SystemTime,
        state: Option<&CertState>,
        plan: &certs::CertPlan,
    ) -> Result<Secret, WriteError> {
        let data = certs::execute(now, state, plan, &self.settings)?.into_data();
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
        match &self.secret.object {
            Some(live) => {
                let patch = json!({
                    "metadata": { "resourceVersion": live.metadata.resource_version },
                    "data": data,
                });
                Ok(self.secrets.patch(&self.settings.secret, &params, &Patch::Merge(&patch)).await?)
            }
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(self.settings.secret.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        labels: Some(BTreeMap::from([("app.kubernetes.io/name".into(), "regcred".into())])),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(data),
                    ..Secret::default()
                };
                let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
                Ok(self.secrets.create(&params, &secret).await?)
            }
        }
    }

    /// Makes every `caBundle` of the configuration the Secret's `ca.crt` (self-managed mode).
    async fn inject(&mut self) {
        if self.settings.mode != CertMode::SelfManaged || !self.configuration.synced || !self.secret.synced {
            return;
        }
        let Some(bundle) = data(self.secret.object.as_ref()).and_then(|d| d.get(CA_CRT)) else { return };
        let Some(configuration) = &self.configuration.object else {
            if !self.told_missing {
                tracing::warn!(configuration = %self.settings.configuration, "MutatingWebhookConfiguration not found: its caBundle is set once it exists");
                self.told_missing = true;
            }
            return;
        };
        self.told_missing = false;
        let webhooks = configuration.webhooks.as_deref().unwrap_or_default();
        let stale: Vec<&str> = webhooks
            .iter()
            .filter(|w| w.client_config.ca_bundle.as_ref() != Some(bundle))
            .map(|w| w.name.as_str())
            .collect();
        if stale.is_empty() {
            return;
        }
        let patch = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": self.settings.configuration },
            "webhooks": webhooks.iter().map(|w| json!({
                "name": w.name,
                "clientConfig": { "caBundle": bundle },
            })).collect::<Vec<_>>(),
        });
        let params = PatchParams::apply(INJECTION_MANAGER).force();
        match self.configurations.patch(&self.settings.configuration, &params, &Patch::Apply(&patch)).await {
            Ok(written) => {
                tracing::info!(configuration = %self.settings.configuration, webhooks = ?stale, "webhook caBundle updated");
                self.configuration.object = Some(written);
            }
            Err(error) if is_not_found(&error) => {
                tracing::debug!(configuration = %self.settings.configuration, "MutatingWebhookConfiguration gone before its caBundle was set");
            }
            Err(error) => {
                tracing::warn!(configuration = %self.settings.configuration, %error, "webhook caBundle not updated");
                self.next = self.next.min(SystemTime::now() + RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(version: &str) -> Secret {
        Secret {
            metadata: ObjectMeta { resource_version: Some(version.into()), ..ObjectMeta::default() },
            ..Secret::default()
        }
    }

    fn version(watched: &Watched<Secret>) -> Option<&str> {
        watched.object.as_ref().and_then(|s| s.metadata.resource_version.as_deref())
    }

    #[test]
    fn the_watched_object_is_known_once_listed_and_follows_events() {
        let mut watched = Watched::new();
        assert!(!watched.apply(watcher::Event::Init));
        assert!(!watched.apply(watcher::Event::InitApply(secret("1"))));
        assert!(!watched.synced);
        assert!(watched.apply(watcher::Event::InitDone));
        assert_eq!(version(&watched), Some("1"));
        assert!(watched.apply(watcher::Event::Apply(secret("2"))));
        assert_eq!(version(&watched), Some("2"));
        // A relist that no longer shows it: gone once the listing is complete.
        assert!(!watched.apply(watcher::Event::Init));
        assert_eq!(version(&watched), Some("2"));
        assert!(watched.apply(watcher::Event::InitDone));
        assert_eq!(version(&watched), None);
        assert!(watched.apply(watcher::Event::Apply(secret("3"))));
        assert!(watched.apply(watcher::Event::Delete(secret("3"))));
        assert_eq!(version(&watched), None);
    }

    #[test]
    fn an_absent_object_is_known_absent_after_the_first_listing() {
        let mut watched: Watched<Secret> = Watched::new();
        assert!(!watched.apply(watcher::Event::Init));
        assert!(watched.apply(watcher::Event::InitDone));
        assert!(watched.synced);
        assert_eq!(version(&watched), None);
    }
}
