//! The webhook's own caches: RegistryCredentials, ClusterRegistryCredentials and Namespaces
//! (metadata), watched by every replica whether or not it leads, so that a standby answers
//! from warm caches and no admission makes an API call. [`Caches::offers`] turns what
//! targets a namespace into the [`Offer`]s the pure decision (`admit`) takes.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{PartialObjectMeta, Selector},
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tokio::sync::Notify;
use tracing::debug;

use super::admit::{Offer, PodMatch};
use crate::{
    controller::{Credential, Namespaces},
    crd::{Attach, ClusterCredentialStatus, ClusterRegistryCredential, CredentialSource, RegistryCredential},
    plan::NamespaceMatcher,
    registry,
    status::{READY, SECRET_CONFLICT},
};

/// How long an admission waits for a namespace the watch has not shown yet (one created a
/// moment before its first Pod) before deciding without its labels.
const NEW_NAMESPACE_WAIT: Duration = Duration::from_millis(500);

pub struct Caches {
    namespaced: Store<RegistryCredential>,
    cluster: Store<ClusterRegistryCredential>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Woken at each Namespace event.
    namespace_seen: Notify,
    synced: [AtomicBool; 3],
    served: Namespaces,
    default_attach: Attach,
}

impl Caches {
    /// The caches, and the future that keeps them filled (run it until shutdown).
    pub fn start(
        client: &Client,
        served: Namespaces,
        selector: Option<&str>,
        default_attach: Attach,
    ) -> (Arc<Self>, impl std::future::Future<Output = ()> + Send + 'static) {
        let (namespaced, namespaced_writer) = reflector::store();
        let (cluster, cluster_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let caches = Arc::new(Caches {
            namespaced,
            cluster,
            namespaces,
            namespace_seen: Notify::new(),
            synced: Default::default(),
            default_attach,
            served: served.clone(),
        });
        let mut config = watcher::Config::default().any_semantic();
        if let Some(selector) = selector {
            // The credentials this controller serves (`--selector`): a shard's webhook hands out
            // only its own shard's Secrets.
            config = config.labels(selector);
        }
        let namespaced = RegistryCredential::watch(client, &served, config.clone());
        let cluster = watcher(Api::<ClusterRegistryCredential>::all(client.clone()), config);
        let namespace_watch =
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default()).modify(
                |ns: &mut PartialObjectMeta<Namespace>| {
                    (ns.metadata.annotations, ns.metadata.managed_fields) = (None, None)
                },
            );
        let run = {
            let caches = caches.clone();
            async move {
                let c = caches.clone();
                let namespaced = drive(namespaced.reflect(namespaced_writer), move || c.mark(0));
                let c = caches.clone();
                let cluster = drive(cluster.modify(drop_managed_fields).reflect(cluster_writer), move || c.mark(1));
                let c = caches.clone();
                let namespaces = namespace_watch.reflect(namespace_writer).for_each(move |event| {
                    match event {
                        Ok(watcher::Event::InitDone) => c.mark(2),
                        Ok(_) => {}
                        Err(error) => debug!(%error, "webhook namespace watch failed; retrying"),
                    }
                    c.namespace_seen.notify_waiters();
                    futures::future::ready(())
                });
                futures::join!(namespaced, cluster, namespaces);
            }
        };
        (caches, run)
    }

    fn mark(&self, which: usize) {
        self.synced[which].store(true, Ordering::Release);
    }

    /// Whether every cache has had its first full list.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    /// The Secrets of credentials that target `namespace` and attach to Pods.
    pub async fn offers(&self, namespace: &str) -> Vec<Offer> {
        if self.served.as_ref().is_some_and(|served| !served.contains(namespace)) {
            return Vec::new();
        }
        let mut offers: Vec<Offer> = self
            .namespaced
            .state()
            .iter()
            .filter(|c| c.namespace().as_deref() == Some(namespace))
            .filter(|c| !conflicted(c.status.as_ref().map(|s| &s.conditions[..]).unwrap_or_default()))
            .filter_map(|c| self.offer(c.as_ref()))
            .collect();
        let cluster = self.cluster.state();
        let pods_of_cluster: Vec<_> = cluster.iter().filter(|c| self.attaches_to_pods(c.as_ref())).collect();
        if pods_of_cluster.is_empty() {
            return offers;
        }
        let labels = self.namespace_labels(namespace, pods_of_cluster.iter().any(|c| needs_labels(c))).await;
        let meta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(namespace.to_string()),
            labels: Some(labels),
            ..Default::default()
        };
        for credential in pods_of_cluster {
            let Ok(matcher) = NamespaceMatcher::new(&credential.spec.namespaces) else { continue };
            if matcher.matches(&meta) && !conflicted_in(credential.status.as_ref(), namespace) {
                offers.extend(self.offer(credential.as_ref()));
            }
        }
        offers
    }

    fn attaches_to_pods<K: Credential>(&self, credential: &K) -> bool {
        credential.meta().deletion_timestamp.is_none()
            && credential.parts().attach.unwrap_or(self.default_attach).pods()
    }

    fn offer<K: Credential>(&self, credential: &K) -> Option<Offer> {
        if !self.attaches_to_pods(credential) {
            return None;
        }
        let parts = credential.parts();
        let pods = match parts.pods.and_then(|p| p.selector.clone()) {
            Some(selector) => PodMatch::Labels(Selector::try_from(selector).ok()?),
            None => PodMatch::Images,
        };
        let mut servers = declared_servers(parts.registry, parts.source);
        let reported = status_registries(credential);
        servers.extend(reported.into_iter().filter(|s| !servers.contains(s)).collect::<Vec<_>>());
        Some(Offer { secret: credential.secret_name(), servers, pods })
    }

    /// A namespace's labels; when `wait`, a namespace not seen yet is waited for a moment.
    async fn namespace_labels(&self, name: &str, wait: bool) -> BTreeMap<String, String> {
        let key = reflector::ObjectRef::<PartialObjectMeta<Namespace>>::new(name);
        let lookup = || self.namespaces.get(&key).map(|ns| ns.labels().clone());
        if let Some(labels) = lookup() {
            return labels;
        }
        if wait {
            let waited = tokio::time::timeout(NEW_NAMESPACE_WAIT, async {
                loop {
                    let seen = self.namespace_seen.notified();
                    if let Some(labels) = lookup() {
                        return labels;
                    }
                    seen.await;
                }
            });
            if let Ok(labels) = waited.await {
                return labels;
            }
            debug!(namespace = name, "namespace not in the cache yet; deciding without its labels");
        }
        BTreeMap::new()
    }
}

/// Runs a reflected watch, marking the cache synced at its first full list.
async fn drive<K>(events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>, synced: impl Fn()) {
    events
        .for_each(|event| {
            match event {
                Ok(watcher::Event::InitDone) => synced(),
                Ok(_) => {}
                Err(error) => debug!(%error, "webhook watch failed; retrying"),
            }
            futures::future::ready(())
        })
        .await;
}

fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Whether a cluster credential's selection reads namespace labels.
fn needs_labels(credential: &ClusterRegistryCredential) -> bool {
    credential.spec.namespaces.selector.is_some()
}

/// Whether a credential's Secret is someone else's (Ready False, SecretConflict): regcred does
/// not manage it, so the webhook does not hand it out.
fn conflicted(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == READY && c.status == "False" && c.reason == SECRET_CONFLICT)
}

/// Whether a cluster credential reports a conflict in `namespace` (its status lists the first
/// failing namespaces).
fn conflicted_in(status: Option<&ClusterCredentialStatus>, namespace: &str) -> bool {
    status.is_some_and(|s| s.failures.iter().any(|f| f.namespace == namespace && f.reason == SECRET_CONFLICT))
}

fn status_registries<K: Credential>(credential: &K) -> Vec<String> {
    credential.status_view().map(|s| s.credential.registries).unwrap_or_default()
}

/// The server keys a credential's spec names, before any reconcile has reported them: its
/// registry (or the source's default), or the ECR or ACR registry it names. An ECR source given
/// by region alone has its registries only in the status.
pub fn declared_servers(registry: Option<&str>, source: &CredentialSource) -> Vec<String> {
    let host = match source {
        CredentialSource::Basic(_) => registry,
        CredentialSource::Ghcr(_) => Some(registry.unwrap_or("ghcr.io")),
        CredentialSource::Gcr(_) => Some(registry.unwrap_or("gcr.io")),
        CredentialSource::Ecr(ecr) => ecr.registry.as_deref(),
        CredentialSource::Acr(acr) => Some(acr.registry.as_str()),
    };
    host.and_then(|h| registry::server_keys(h).ok()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source(value: serde_json::Value) -> CredentialSource {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn declared_servers_follow_the_spec_and_the_sources_defaults() {
        let basic = source(json!({"basic": {"username": "u", "passwordSecretRef": {"name": "s"}}}));
        assert_eq!(
            declared_servers(Some("docker.io"), &basic),
            ["https://index.docker.io/v1/", "registry-1.docker.io"]
        );
        assert!(declared_servers(None, &basic).is_empty());
        let ghcr = source(json!({"ghcr": {"username": "u", "tokenSecretRef": {"name": "s"}}}));
        assert_eq!(declared_servers(None, &ghcr), ["ghcr.io"]);
        let ecr = source(json!({"ecr": {"region": "eu-west-1", "auth": {"ambient": {}}}}));
        assert!(declared_servers(None, &ecr).is_empty(), "by region: only the status knows");
        let ecr = source(
            json!({"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "auth": {"ambient": {}}}}),
        );
        assert_eq!(declared_servers(None, &ecr), ["123456789012.dkr.ecr.eu-west-1.amazonaws.com"]);
    }

    #[test]
    fn only_a_conflict_of_ready_withholds_a_secret() {
        let condition =
            |type_: &str, status: &str, reason: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            };
        assert!(conflicted(&[condition(READY, "False", SECRET_CONFLICT)]));
        assert!(!conflicted(&[condition(READY, "False", "SourceSecretMissing")]));
        assert!(!conflicted(&[condition(READY, "True", "Synced")]));
    }
}
