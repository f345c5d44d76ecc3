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
//! A leaf never moves from a CA every `caBundle` holds to one some `caBundle` lacks
//! (`moves_to_untrusted`): should the injection fail, the overlap alone would not protect the
//! handshakes.
//!
//! **Permissions** (for the chart): Secrets in `settings.namespace`: `list`, `watch` (by
//! `fieldSelector=metadata.name=…`, so RBAC `resourceNames` can limit them to the one Secret),
//! `create`, `patch`; MutatingWebhookConfigurations: `list`, `watch`, `patch` on the one name.
//! External mode needs only `list` and `watch` of the Secret.

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

use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::certs::{self, CA_CRT, CertMode, CertSettings, CertState, Signer, TLS_CRT, TLS_KEY};
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
    /// A leaf move held for want of injection was logged.
    told_held: bool,
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
        told_held: false,
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
                        // A leaf move held for the injection may go ahead now.
                        rotation.rotate().await;
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

/// Whether every webhook of `configuration` trusts the CA `der`.
fn trusted(configuration: &MutatingWebhookConfiguration, der: &[u8]) -> bool {
    configuration.webhooks.iter().flatten().all(|webhook| {
        webhook.client_config.ca_bundle.as_ref().is_some_and(|bundle| {
            CertificateDer::pem_slice_iter(&bundle.0).any(|ca| ca.is_ok_and(|ca| ca.as_ref() == der))
        })
    })
}

/// Whether `plan` moves the leaf off a CA that every webhook trusts, and that stays in the bundle,
/// onto one some webhook does not trust yet: the overlap passed but the injection did not happen
/// (the configuration's patch failed, say). Such a move waits, so handshakes that work now keep
/// working; it goes ahead once the caBundle holds the CA, or when the current CA leaves the
/// bundle (expired: then the current leaf has too). Without the configuration there is nothing
/// to hold for.
fn moves_to_untrusted(
    state: Option<&CertState>,
    plan: &certs::CertPlan,
    configuration: Option<&MutatingWebhookConfiguration>,
) -> bool {
    let (Some(state), Some((Signer::Existing(to), _)), Some(configuration)) = (state, plan.leaf, configuration) else {
        return false;
    };
    let Some(from) = state.leaf.as_ref().and_then(|leaf| leaf.issuer) else { return false };
    let der = |i: usize| state.cas.get(i).map(|ca| ca.der());
    match (der(from), der(to)) {
        (Some(from_der), Some(to_der)) if from != to && plan.keep.contains(&from) => {
            trusted(configuration, from_der) && !trusted(configuration, to_der)
        }
        _ => false,
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
        if self.settings.mode != CertMode::SelfManaged || !self.secret.synced {
            return;
        }
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
        if moves_to_untrusted(state.as_ref(), &plan, self.configuration.object.as_ref()) {
            if !self.told_held {
                tracing::warn!(
                    configuration = %self.settings.configuration,
                    "webhook serving certificate not moved to the new CA: the caBundle does not hold it yet"
                );
                self.told_held = true;
            }
            self.next = now + RETRY;
            return;
        }
        self.told_held = false;
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

    // A fake apiserver: one Secret and one MutatingWebhookConfiguration, lists, watches (with
    // the events since the resourceVersion asked for), create, a merge patch guarded by
    // resourceVersion, the caBundle apply; it counts the writes that succeed.

    use std::convert::Infallible;
    use std::sync::Mutex;

    use axum::body::{Body, Bytes};
    use axum::extract::State;
    use axum::routing::{get, patch};
    use base64::{Engine, engine::general_purpose::STANDARD};
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
    use tokio::sync::broadcast;

    use crate::webhook::certs::{CA_CRT, CertMode, TLS_CRT};

    #[derive(Default)]
    struct Objects {
        version: u64,
        secret: Option<Secret>,
        configuration: Option<MutatingWebhookConfiguration>,
        /// (resourceVersion, is the Secret, watch event line)
        history: Vec<(u64, bool, String)>,
        secret_writes: usize,
        configuration_writes: usize,
        refuse_configuration_writes: bool,
    }

    struct Fake {
        objects: Mutex<Objects>,
        events: broadcast::Sender<(bool, String)>,
    }

    type Shared = Arc<Fake>;

    fn status(code: u16, reason: &str) -> http::Response<Body> {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason});
        respond(code, body)
    }

    fn respond(code: u16, body: serde_json::Value) -> http::Response<Body> {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("response")
    }

    impl Fake {
        fn new() -> Shared {
            Arc::new(Fake { objects: Mutex::new(Objects::default()), events: broadcast::channel(1024).0 })
        }

        fn client(self: &Shared) -> kube::Client {
            let router = axum::Router::new()
                .route("/api/v1/namespaces/{ns}/secrets", get(list_secrets).post(create_secret))
                .route("/api/v1/namespaces/{ns}/secrets/{name}", patch(patch_secret))
                .route("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", get(list_configurations))
                .route(
                    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
                    patch(apply_configuration),
                )
                .with_state(self.clone());
            kube::Client::new(router, "default")
        }

        /// Stores a new version of an object and tells the watches.
        fn store(
            &self,
            objects: &mut Objects,
            secret: Option<Secret>,
            configuration: Option<MutatingWebhookConfiguration>,
            kind: &str,
        ) -> serde_json::Value {
            objects.version += 1;
            let version = objects.version.to_string();
            let (is_secret, object) = match (secret, configuration) {
                (Some(mut secret), _) => {
                    secret.metadata.resource_version = Some(version);
                    objects.secret = Some(secret.clone());
                    (true, serde_json::to_value(&secret).expect("json"))
                }
                (None, Some(mut configuration)) => {
                    configuration.metadata.resource_version = Some(version);
                    objects.configuration = Some(configuration.clone());
                    (false, serde_json::to_value(&configuration).expect("json"))
                }
                (None, None) => unreachable!("an object"),
            };
            let line = format!("{}\n", json!({"type": kind, "object": object}));
            objects.history.push((objects.version, is_secret, line.clone()));
            let _ = self.events.send((is_secret, line));
            object
        }

        fn put_secret(&self, secret: Secret) {
            let mut objects = self.objects.lock().expect("lock");
            let kind = if objects.secret.is_some() { "MODIFIED" } else { "ADDED" };
            self.store(&mut objects, Some(secret), None, kind);
        }

        fn put_configuration(&self, configuration: MutatingWebhookConfiguration) {
            let mut objects = self.objects.lock().expect("lock");
            let kind = if objects.configuration.is_some() { "MODIFIED" } else { "ADDED" };
            self.store(&mut objects, None, Some(configuration), kind);
        }

        fn state(&self) -> CertState {
            let objects = self.objects.lock().expect("lock");
            let data = objects.secret.as_ref().and_then(|s| s.data.clone()).unwrap_or_default();
            CertState::from_data(&data).expect("readable")
        }

        fn refuse_configuration_writes(&self, refuse: bool) {
            self.objects.lock().expect("lock").refuse_configuration_writes = refuse;
        }

        fn writes(&self) -> (usize, usize) {
            let objects = self.objects.lock().expect("lock");
            (objects.secret_writes, objects.configuration_writes)
        }

        fn secret_data(&self, key: &str) -> Option<Vec<u8>> {
            let objects = self.objects.lock().expect("lock");
            Some(objects.secret.as_ref()?.data.as_ref()?.get(key)?.0.clone())
        }

        fn bundles(&self) -> Vec<Option<Vec<u8>>> {
            let objects = self.objects.lock().expect("lock");
            let webhooks = objects.configuration.as_ref().and_then(|c| c.webhooks.clone()).unwrap_or_default();
            webhooks.into_iter().map(|w| w.client_config.ca_bundle.map(|b| b.0)).collect()
        }

        /// Every webhook's caBundle is the Secret's ca.crt.
        fn injected(&self) -> bool {
            let bundle = self.secret_data(CA_CRT);
            bundle.is_some() && self.bundles().iter().all(|b| *b == bundle)
        }

        /// A watch (events after `since`, then the live ones) or a list.
        fn list_or_watch(self: &Shared, query: &str, secrets: bool) -> http::Response<Body> {
            let objects = self.objects.lock().expect("lock");
            let parameter = |name: &str| {
                query
                    .split('&')
                    .find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('=')).map(str::to_string))
            };
            if parameter("watch").as_deref() == Some("true") {
                let since: u64 = parameter("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
                let replay: Vec<String> = objects
                    .history
                    .iter()
                    .filter(|(version, is_secret, _)| *version > since && *is_secret == secrets)
                    .map(|(_, _, line)| line.clone())
                    .collect();
                let live = self.events.subscribe();
                drop(objects);
                let live = futures::stream::unfold(live, move |mut live| async move {
                    loop {
                        match live.recv().await {
                            Ok((is_secret, line)) if is_secret == secrets => return Some((line, live)),
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                });
                let stream = futures::stream::iter(replay).chain(live).map(Ok::<_, Infallible>);
                return http::Response::builder()
                    .header("content-type", "application/json")
                    .body(Body::from_stream(stream))
                    .expect("response");
            }
            let (kind, items) = if secrets {
                (
                    "SecretList",
                    objects.secret.iter().map(|s| serde_json::to_value(s).expect("json")).collect::<Vec<_>>(),
                )
            } else {
                (
                    "MutatingWebhookConfigurationList",
                    objects.configuration.iter().map(|c| serde_json::to_value(c).expect("json")).collect(),
                )
            };
            respond(
                200,
                json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": objects.version.to_string()}, "items": items}),
            )
        }
    }

    async fn list_secrets(State(fake): State<Shared>, uri: http::Uri) -> http::Response<Body> {
        fake.list_or_watch(uri.query().unwrap_or(""), true)
    }

    async fn list_configurations(State(fake): State<Shared>, uri: http::Uri) -> http::Response<Body> {
        fake.list_or_watch(uri.query().unwrap_or(""), false)
    }

    async fn create_secret(State(fake): State<Shared>, body: Bytes) -> http::Response<Body> {
        let secret: Secret = serde_json::from_slice(&body).expect("a Secret");
        let mut objects = fake.objects.lock().expect("lock");
        if objects.secret.is_some() {
            return status(409, "AlreadyExists");
        }
        objects.secret_writes += 1;
        respond(201, fake.store(&mut objects, Some(secret), None, "ADDED"))
    }

    async fn patch_secret(State(fake): State<Shared>, headers: http::HeaderMap, body: Bytes) -> http::Response<Body> {
        assert_eq!(headers["content-type"], "application/merge-patch+json");
        let patch: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let mut objects = fake.objects.lock().expect("lock");
        let Some(mut secret) = objects.secret.clone() else { return status(404, "NotFound") };
        if patch["metadata"]["resourceVersion"].as_str() != secret.metadata.resource_version.as_deref() {
            return status(409, "Conflict");
        }
        let data = secret.data.get_or_insert_default();
        for (key, value) in patch["data"].as_object().expect("data") {
            data.insert(key.clone(), ByteString(STANDARD.decode(value.as_str().expect("base64")).expect("base64")));
        }
        objects.secret_writes += 1;
        respond(200, fake.store(&mut objects, Some(secret), None, "MODIFIED"))
    }

    async fn apply_configuration(
        State(fake): State<Shared>,
        uri: http::Uri,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> http::Response<Body> {
        assert_eq!(headers["content-type"], "application/apply-patch+yaml");
        let query = uri.query().unwrap_or("");
        assert!(query.contains("fieldManager=regcred-webhook-ca") && query.contains("force=true"), "{query}");
        let patch: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let mut objects = fake.objects.lock().expect("lock");
        let Some(mut configuration) = objects.configuration.clone() else { return status(404, "NotFound") };
        for applied in patch["webhooks"].as_array().expect("webhooks") {
            assert_eq!(applied.as_object().map(|o| o.len()), Some(2), "only name and clientConfig: {applied}");
            let name = applied["name"].as_str().expect("name");
            let bundle =
                STANDARD.decode(applied["clientConfig"]["caBundle"].as_str().expect("caBundle")).expect("base64");
            for webhook in configuration.webhooks.iter_mut().flatten().filter(|w| w.name == name) {
                webhook.client_config.ca_bundle = Some(ByteString(bundle.clone()));
            }
        }
        if objects.refuse_configuration_writes {
            return status(403, "Forbidden");
        }
        objects.configuration_writes += 1;
        respond(200, fake.store(&mut objects, None, Some(configuration), "MODIFIED"))
    }

    fn configuration() -> MutatingWebhookConfiguration {
        let webhook = |name: &str| MutatingWebhook {
            name: name.into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            client_config: WebhookClientConfig {
                url: Some("https://127.0.0.1:1/".into()),
                ..WebhookClientConfig::default()
            },
            ..MutatingWebhook::default()
        };
        MutatingWebhookConfiguration {
            metadata: ObjectMeta { name: Some("regcred-webhook".into()), ..ObjectMeta::default() },
            webhooks: Some(vec![webhook("pods.regcred.dev"), webhook("pods-fallback.regcred.dev")]),
        }
    }

    fn settings(mode: CertMode) -> CertSettings {
        CertSettings {
            mode,
            namespace: "regcred-system".into(),
            secret: "regcred-webhook-tls".into(),
            configuration: "regcred-webhook".into(),
            hosts: vec!["127.0.0.1".into()],
            leaf_validity: Duration::from_secs(3600),
            ca_validity: Duration::from_secs(7200),
        }
    }

    struct Running {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        async fn stop(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("maintain returns").expect("no panic");
        }
    }

    fn run(fake: &Shared, settings: CertSettings, resolver: Arc<Resolver>) -> Running {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(maintain(fake.client(), settings, resolver, async move {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    /// A forced rotation (CA 12 s, leaf 6 s: a 2 s overlap) maintained and served on
    /// 127.0.0.1, once the first CA is injected.
    struct Forced {
        resolver: Arc<Resolver>,
        port: u16,
        running: Running,
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Forced {
        async fn start(fake: &Shared) -> Forced {
            let settings = CertSettings {
                leaf_validity: Duration::from_secs(6),
                ca_validity: Duration::from_secs(12),
                ..settings(CertMode::SelfManaged)
            };
            assert_eq!(certs::overlap(&settings), Duration::from_secs(2));
            let resolver = Resolver::new();
            let running = run(fake, settings, resolver.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("address").port();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let app = axum::Router::new().route("/", get(|| async { "ok" }));
            let server = tokio::spawn(crate::webhook::tls::serve(listener, resolver.clone(), app, async move {
                let _ = stopped.await;
            }));
            until("injected", || resolver.has_certificate() && fake.injected()).await;
            Forced { resolver, port, running, stop, server }
        }

        async fn stop(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(10), self.server).await.expect("serve returns").expect("no panic");
            self.running.stop().await;
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn serving(resolver: &Resolver) -> Option<Vec<u8>> {
        resolver.certificate().and_then(|chain| chain.first().map(|c| c.to_vec()))
    }

    fn written_leaf(fake: &Fake) -> Option<Vec<u8>> {
        fake.secret_data(TLS_CRT).and_then(|pem| CertificateDer::from_pem_slice(&pem).ok()).map(|c| c.to_vec())
    }

    #[tokio::test]
    async fn creates_injects_repairs_and_writes_nothing_at_rest_or_after_a_restart() {
        let fake = Fake::new();
        fake.put_configuration(configuration());
        let resolver = Resolver::new();
        let running = run(&fake, settings(CertMode::SelfManaged), resolver.clone());
        until("a certificate served and injected", || resolver.has_certificate() && fake.injected()).await;
        assert_eq!(serving(&resolver), written_leaf(&fake));
        assert_eq!(fake.writes(), (1, 1));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(fake.writes(), (1, 1), "no writes at rest");
        running.stop().await;

        // A restart loads the same certificate and writes nothing.
        let resolver = Resolver::new();
        let running = run(&fake, settings(CertMode::SelfManaged), resolver.clone());
        until("the certificate loaded", || resolver.has_certificate()).await;
        assert_eq!(serving(&resolver), written_leaf(&fake));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(fake.writes(), (1, 1), "no writes after a restart");

        // helm upgrade resets the caBundle: repaired at once.
        fake.put_configuration(configuration());
        until("the caBundle repaired", || fake.injected()).await;
        assert_eq!(fake.writes(), (1, 2));

        // Other hosts: a new leaf, the same CA.
        running.stop().await;
        let bundle = fake.secret_data(CA_CRT);
        let resolver = Resolver::new();
        let moved = CertSettings { hosts: vec!["127.0.0.2".into()], ..settings(CertMode::SelfManaged) };
        let running = run(&fake, moved, resolver.clone());
        until("the new leaf served", || fake.writes().0 == 2 && serving(&resolver) == written_leaf(&fake)).await;
        assert_eq!(fake.secret_data(CA_CRT), bundle);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(fake.writes(), (2, 2));
        running.stop().await;
    }

    #[tokio::test]
    async fn replicas_starting_together_converge_on_one_write() {
        let fake = Fake::new();
        let resolvers = [Resolver::new(), Resolver::new(), Resolver::new()];
        let running: Vec<Running> =
            resolvers.iter().map(|r| run(&fake, settings(CertMode::SelfManaged), r.clone())).collect();
        until("every replica serving the Secret's certificate", || {
            resolvers.iter().all(|r| r.has_certificate() && serving(r) == written_leaf(&fake))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(fake.writes(), (1, 0), "one create won; no configuration to inject into");
        // The configuration appears: one of them injects (maybe more than one, each only once).
        fake.put_configuration(configuration());
        until("injected", || fake.injected()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (secrets, configurations) = fake.writes();
        assert_eq!(secrets, 1);
        assert!((1..=3).contains(&configurations), "{configurations}");
        for running in running {
            running.stop().await;
        }
    }

    #[tokio::test]
    async fn external_mode_only_loads() {
        let fake = Fake::new();
        fake.put_configuration(configuration());
        let make = || {
            let s = settings(CertMode::External);
            let now = SystemTime::now();
            let files = certs::execute(now, None, &certs::plan(now, None, &s), &s).expect("generated");
            Secret {
                metadata: ObjectMeta { name: Some(s.secret.clone()), ..ObjectMeta::default() },
                data: Some(files.into_data().into_iter().filter(|(k, _)| k != certs::CA_KEY).collect()),
                ..Secret::default()
            }
        };
        fake.put_secret(make());
        let resolver = Resolver::new();
        let running = run(&fake, settings(CertMode::External), resolver.clone());
        until("the certificate loaded", || serving(&resolver).is_some() && serving(&resolver) == written_leaf(&fake))
            .await;
        fake.put_secret(make());
        until("the renewed certificate loaded", || serving(&resolver) == written_leaf(&fake)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(fake.writes(), (0, 0));
        assert_eq!(fake.bundles(), vec![None, None], "nothing injected");
        running.stop().await;
    }

    /// One TLS handshake with the webhook as the apiserver makes it: trusting exactly the
    /// configuration's caBundle, for the IP address. The leaf the server showed.
    async fn handshake(bundle: &[u8], port: u16) -> Result<Vec<u8>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(bundle) {
            roots.add(ca.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let tls =
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).ok_or("no certificate")?;
        Ok(leaf.to_vec())
    }

    const LAG: Duration = Duration::from_millis(1500);

    /// A forced rotation: a 12 s CA (overlap 2 s) and a 6 s leaf: the leaf renewed at about
    /// 4 s, a second CA at about 8 s (the leaf renewed on the first, up to its end), the leaf on
    /// the new CA 2 s later, the first CA gone at 12 s (issue times round up to the second, so
    /// each step may come up to a second later); a client trusting the configuration's caBundle
    /// of 1.5 s before completes every handshake (tried every 50 ms for 15 s).
    #[tokio::test]
    async fn a_forced_rotation_fails_no_handshake() {
        let fake = Fake::new();
        fake.put_configuration(configuration());
        let forced = Forced::start(&fake).await;
        let port = forced.port;
        let start = tokio::time::Instant::now();
        let (mut handshakes, mut failed) = (0, Vec::new());
        let mut leaves = std::collections::BTreeSet::new();
        let mut bundle_sizes = Vec::new();
        // The client lags: it trusts the caBundle as it was 1.5 s ago (an apiserver whose
        // watch of the configuration is slow), which the 2 s overlap covers.
        let mut seen: Vec<(tokio::time::Instant, Vec<u8>)> = Vec::new();
        while start.elapsed() < Duration::from_secs(15) {
            let now = tokio::time::Instant::now();
            let bundle = fake.bundles()[0].clone().expect("a caBundle");
            let size = CertificateDer::pem_slice_iter(&bundle).count();
            if bundle_sizes.last() != Some(&size) {
                bundle_sizes.push(size);
            }
            if seen.last().is_none_or(|(_, last)| *last != bundle) {
                seen.push((now, bundle));
            }
            let lagging = seen.iter().rev().find(|(at, _)| *at + LAG <= now).unwrap_or(&seen[0]);
            match handshake(&lagging.1, port).await {
                Ok(leaf) => {
                    handshakes += 1;
                    leaves.insert(leaf);
                }
                Err(error) => failed.push(format!("at {:?}: {error}", start.elapsed())),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(failed.is_empty(), "{} of {} handshakes failed: {failed:?}", failed.len(), handshakes + failed.len());
        assert_eq!(bundle_sizes, [1, 2, 1], "a second CA joined, the first one left");
        assert!(leaves.len() >= 4, "{} leaves served", leaves.len());
        let (secret_writes, configuration_writes) = fake.writes();
        assert!((5..=6).contains(&secret_writes), "{secret_writes} Secret writes");
        assert_eq!(configuration_writes, 3, "the first bundle, with the second CA, without the first");
        forced.stop().await;
    }

    /// The overlap passes while the configuration's patch is refused: the leaf stays on the CA
    /// the caBundle holds (until that CA expires), and moves once the injection succeeds.
    #[tokio::test]
    async fn the_leaf_waits_for_the_injection_of_its_new_ca() {
        let fake = Fake::new();
        fake.put_configuration(configuration());
        let forced = Forced::start(&fake).await;
        let (resolver, port) = (forced.resolver.clone(), forced.port);
        fake.refuse_configuration_writes(true);
        let injected = fake.bundles()[0].clone().expect("a caBundle");
        let first = fake.state().cas[0].issued;
        // The second CA comes about 8 s after the first was issued and settles 2 s later (each
        // up to a second later: issue times round up); the first expires at 12 s.
        let mut failed = Vec::new();
        while SystemTime::now() < first + Duration::from_millis(11_800) {
            if let Err(error) = handshake(&injected, port).await {
                failed.push(format!("at {:?}: {error}", SystemTime::now().duration_since(first)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(failed.is_empty(), "{failed:?}");
        let written = fake.secret_data(CA_CRT).expect("ca.crt");
        assert_eq!(CertificateDer::pem_slice_iter(&written).count(), 2, "the second CA was written");
        assert_eq!(fake.bundles()[0].as_ref(), Some(&injected), "and not injected");
        fake.refuse_configuration_writes(false);
        until("injected again", || fake.injected()).await;
        let bundle = fake.bundles()[0].clone().expect("a caBundle");
        until("the leaf on a CA of the bundle", || serving(&resolver) == written_leaf(&fake)).await;
        handshake(&bundle, port).await.expect("a handshake");
        forced.stop().await;
    }
}
