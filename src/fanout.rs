//! ClusterRegistryCredential: one source, fetched once per reconcile, written as the same
//! Secret into every selected namespace, and into the named ServiceAccounts there.
//!
//! A reconcile lists the namespaces (metadata only) and this credential's own Secrets (one
//! list, by the uid label), so it needs no request per namespace to find out that nothing
//! changed; writes go out with bounded concurrency. Namespaces, Secrets and ServiceAccounts
//! are watched metadata-only, so a new or relabelled namespace, a drifted or deleted
//! Secret, or a new ServiceAccount triggers a reconcile within moments.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, PoisonError},
    time::Instant,
};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::{
    Api, Resource, ResourceExt,
    api::{ListParams, PartialObjectMeta, Patch, PatchParams},
    core::{Selector, SelectorExt},
    runtime::{
        Controller,
        controller::Action,
        events::EventType,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;
use tracing::{info, warn};

use crate::{
    Error,
    crd::{ClusterRegistryCredential, NamespaceFailure, NamespaceSelection},
    dockerconfig,
    metrics::ObjectLabels,
    reconciler::{Context, publish, retry_delay},
    secret::{
        CREDENTIAL_UID_LABEL, Claim, FIELD_MANAGER, SecretChange, delete_if_controlled, desired_secret, ensure_secret,
    },
    service_account::{has_finalizer, set_finalizer, sync_namespace},
    source::{ApiSecretReader, CredentialProvider, SourceContext},
    status::{Synced, conditions_changed, credential_status},
};

const KIND: &str = "ClusterRegistryCredential";
/// Failing namespaces listed in status; the counts cover the rest.
const MAX_LISTED_FAILURES: usize = 20;

/// The ClusterRegistryCredential controller with its triggers: its Secrets (and source
/// Secrets), ServiceAccounts it patches, and every Namespace.
pub(crate) fn controller(
    controller: Controller<ClusterRegistryCredential>,
    store: Store<ClusterRegistryCredential>,
    secrets: Option<Api<PartialObjectMeta<Secret>>>,
    accounts: Api<PartialObjectMeta<ServiceAccount>>,
    namespaces: Api<PartialObjectMeta<Namespace>>,
) -> Controller<ClusterRegistryCredential> {
    let (by_secret, by_account, by_namespace) = (store.clone(), store.clone(), store);
    let controller = match secrets {
        Some(secrets) => controller.watches(secrets, watcher::Config::default(), move |secret| {
            let (Some(namespace), Some(name)) = (secret.namespace(), secret.metadata.name.clone()) else {
                return Vec::new();
            };
            matching(&by_secret, |c| {
                c.secret_name() == name
                    || c.spec.source.secret_refs().contains(&(Some(namespace.as_str()), name.as_str()))
            })
        }),
        None => controller,
    };
    controller
        .watches(accounts, watcher::Config::default(), move |account| {
            let name = account.name_any();
            matching(&by_account, |c| c.spec.service_accounts.contains(&name) || has_finalizer(&c.metadata))
        })
        // Any namespace may start or stop matching; there are few cluster credentials.
        .watches(namespaces, watcher::Config::default(), move |_| matching(&by_namespace, |_| true))
}

fn matching(
    store: &Store<ClusterRegistryCredential>,
    predicate: impl Fn(&ClusterRegistryCredential) -> bool,
) -> Vec<ObjectRef<ClusterRegistryCredential>> {
    store.state().iter().filter(|c| predicate(c)).map(|c| ObjectRef::from(c.as_ref())).collect()
}

/// What one reconcile did across namespaces.
struct FanOut {
    synced: Synced,
    targets: usize,
    failures: Vec<NamespaceFailure>,
    created: usize,
    updated: usize,
    removed: usize,
}

impl FanOut {
    /// The error a fan-out with failing namespaces reports (it wrote the others).
    fn partial_failure(&self) -> Option<Error> {
        (!self.failures.is_empty())
            .then(|| Error::NamespacesFailed { failed: self.failures.len(), targets: self.targets })
    }
}

#[tracing::instrument(skip_all, fields(kind = KIND, object = %crc.name_any()))]
pub(crate) async fn reconcile(crc: Arc<ClusterRegistryCredential>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api = Api::<ClusterRegistryCredential>::all(ctx.client.clone());
    if crc.metadata.deletion_timestamp.is_some() {
        // Secrets go with the garbage collector (owner references); the ServiceAccount
        // entries are regcred's to remove.
        if has_finalizer(&crc.metadata) {
            release_everywhere(&crc, &ctx).await?;
            set_finalizer(&api, crc.as_ref(), false).await?;
        }
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    if !crc.spec.service_accounts.is_empty() {
        set_finalizer(&api, crc.as_ref(), true).await?;
    }
    let outcome = fan_out(&crc, &ctx).await;
    let reported = report(&crc, &ctx, &outcome).await;
    let partial = outcome.as_ref().ok().and_then(FanOut::partial_failure);
    ctx.count_reconcile(KIND, started, outcome.as_ref().err().or(partial.as_ref()).or(reported.as_ref().err()));
    reported?;
    let done = outcome?;
    if let Some(error) = partial {
        return Err(error);
    }
    if crc.spec.service_accounts.is_empty() {
        set_finalizer(&api, crc.as_ref(), false).await?;
    }
    ctx.failures.lock().unwrap_or_else(PoisonError::into_inner).remove(&ObjectRef::from(crc.as_ref()).erase());
    Ok(ctx.requeue_after(done.synced.refresh_at))
}

pub(crate) fn error_policy(crc: Arc<ClusterRegistryCredential>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.count_failure(&ObjectRef::from(crc.as_ref()).erase());
    let delay = retry_delay(attempt, ctx.config.max_backoff, crc.status.as_ref().map(|s| &s.credential));
    warn!(kind = KIND, name = %crc.name_any(), reason = error.reason(), %error, retry_in_secs = delay.as_secs_f32(), "sync failed");
    Action::requeue(delay)
}

async fn fan_out(crc: &ClusterRegistryCredential, ctx: &Context) -> Result<FanOut, Error> {
    let uid = crc.uid().ok_or(Error::MissingObjectField("metadata.uid"))?;
    let owner = crc.controller_owner_ref(&()).ok_or(Error::MissingObjectField("metadata.uid"))?;
    let secret_name = crc.secret_name();

    let namespaces = Api::<Namespace>::all(ctx.client.clone()).list_metadata(&ListParams::default()).await?.items;
    let terminating: BTreeSet<String> =
        namespaces.iter().filter(|n| n.metadata.deletion_timestamp.is_some()).map(|n| n.name_any()).collect();
    let targets = select(&crc.spec.namespaces, &namespaces)?;

    // One fetch for every namespace (ECR tokens also come from the shared cache).
    let reader = ApiSecretReader(ctx.client.clone());
    let source_ctx = SourceContext {
        namespace: "",
        registry: crc.spec.registry.as_deref(),
        secrets: &reader,
        ecr: Some(&ctx.ecr),
        cluster_scoped: true,
    };
    let credentials = crc.spec.source.fetch(&source_ctx).await?;
    let docker_config = dockerconfig::render(&credentials.auths);

    let mut template = crc.spec.secret.clone();
    template.labels.insert(CREDENTIAL_UID_LABEL.into(), uid.clone());
    let ours = Api::<Secret>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&format!("{CREDENTIAL_UID_LABEL}={uid}")))
        .await?
        .items;
    let mut existing: HashMap<(String, String), Secret> =
        ours.into_iter().map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s)).collect();

    let patch_accounts = !crc.spec.service_accounts.is_empty() || has_finalizer(&crc.metadata);
    let accounts = if patch_accounts { accounts_by_namespace(ctx).await? } else { BTreeMap::new() };

    let claim = Claim { owner: owner.clone(), created: crc.metadata.creation_timestamp.as_ref().map(|t| t.0) };
    // Where the Secret belonged to someone else last time, read it rather than try a create
    // that is bound to fail.
    let contested: BTreeSet<&str> = crc
        .status
        .iter()
        .flat_map(|s| &s.failures)
        .filter(|f| f.reason == "SecretConflict")
        .map(|f| f.namespace.as_str())
        .collect();
    let jobs: Vec<_> = targets
        .iter()
        .map(|namespace| {
            let ours = existing.remove(&(namespace.clone(), secret_name.clone()));
            let known = (ours.is_some() || !contested.contains(namespace.as_str())).then_some(ours);
            let desired =
                desired_secret(&secret_name, namespace, &template, Some(owner.clone()), docker_config.clone());
            (namespace.clone(), desired, known)
        })
        .collect();
    let results: Vec<(String, Result<SecretChange, Error>)> = stream::iter(jobs)
        .map(|(namespace, desired, known)| {
            let (claim, accounts, secret_name) = (&claim, &accounts, &secret_name);
            async move {
                let mut result = ensure_secret(&ctx.client, &desired, claim, known).await;
                if result.is_ok() && patch_accounts {
                    let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace);
                    let list = accounts.get(&namespace).map(Vec::as_slice).unwrap_or_default();
                    if let Err(error) = sync_namespace(&api, list, secret_name, &crc.spec.service_accounts).await {
                        result = Err(error);
                    }
                }
                (namespace, result)
            }
        })
        .buffer_unordered(usize::from(ctx.config.concurrency.max(1)))
        .collect()
        .await;

    let (mut created, mut updated, mut failures) = (0, 0, Vec::new());
    for (namespace, result) in results {
        match result {
            Ok(SecretChange::Created) => created += 1,
            Ok(SecretChange::Updated) => updated += 1,
            Ok(SecretChange::Unchanged) => {}
            // Deleted or terminating since the list: nothing to keep there.
            Err(error) if namespace_gone(&error) => {}
            Err(error) => {
                failures.push(NamespaceFailure { namespace, reason: error.reason().into(), message: error.to_string() })
            }
        }
    }

    // Secrets of this credential that are no longer wanted: the namespace stopped matching,
    // or spec.secret.name changed. Terminating namespaces take theirs along.
    let leftovers = existing.into_keys().filter(|(namespace, _)| !terminating.contains(namespace));
    let removed = stream::iter(leftovers)
        .map(|(namespace, name)| {
            let (accounts, uid) = (&accounts, &uid);
            async move {
                if let Some(list) = accounts.get(&namespace) {
                    let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace);
                    sync_namespace(&api, list, &name, &[]).await?;
                }
                let api = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
                let deleted = delete_if_controlled(&api, &name, uid).await?;
                if deleted {
                    info!(namespace, secret = name, "deleted Secret no longer targeted");
                }
                Ok::<_, Error>(usize::from(deleted))
            }
        })
        .buffer_unordered(usize::from(ctx.config.concurrency.max(1)))
        .try_fold(0, |sum, n| async move { Ok(sum + n) })
        .await?;

    failures.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    Ok(FanOut {
        synced: Synced {
            secret_name,
            registries: credentials.auths.into_iter().map(|a| a.server).collect(),
            expires_at: credentials.expires_at,
            refresh_at: credentials.refresh_at,
        },
        targets: targets.len(),
        failures,
        created,
        updated,
        removed,
    })
}

/// Every ServiceAccount in the cluster (one list), by namespace.
async fn accounts_by_namespace(ctx: &Context) -> Result<BTreeMap<String, Vec<ServiceAccount>>, Error> {
    let mut by_namespace: BTreeMap<String, Vec<ServiceAccount>> = BTreeMap::new();
    for account in Api::<ServiceAccount>::all(ctx.client.clone()).list(&ListParams::default()).await?.items {
        by_namespace.entry(account.namespace().unwrap_or_default()).or_default().push(account);
    }
    Ok(by_namespace)
}

/// Removes this credential's ServiceAccount entries from every namespace that holds its
/// Secret (the Secrets themselves go with the garbage collector).
async fn release_everywhere(crc: &ClusterRegistryCredential, ctx: &Context) -> Result<(), Error> {
    let uid = crc.uid().unwrap_or_default();
    let ours = Api::<Secret>::all(ctx.client.clone())
        .list(&ListParams::default().labels(&format!("{CREDENTIAL_UID_LABEL}={uid}")))
        .await?
        .items;
    let accounts = accounts_by_namespace(ctx).await?;
    for secret in ours.iter().filter(|s| crate::secret::is_controlled_by(s, &uid)) {
        let namespace = secret.namespace().unwrap_or_default();
        if let Some(list) = accounts.get(&namespace) {
            let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace);
            sync_namespace(&api, list, &secret.name_any(), &[]).await?;
        }
    }
    Ok(())
}

/// Whether a write failed because its namespace is being deleted or is gone.
fn namespace_gone(error: &Error) -> bool {
    match error {
        Error::Kube(kube::Error::Api(status)) => {
            (status.code == 403 && status.message.contains("being terminated"))
                || (status.code == 404 && status.message.contains("namespaces"))
        }
        _ => false,
    }
}

/// The namespaces a selection picks, by name: listed or matching the selector, not
/// excluded, not terminating. No selector and no names: all.
pub fn select(
    selection: &NamespaceSelection,
    namespaces: &[PartialObjectMeta<Namespace>],
) -> Result<Vec<String>, Error> {
    let selector = match &selection.selector {
        Some(selector) => {
            Some(Selector::try_from(selector.clone()).map_err(|e| Error::InvalidNamespaceSelector(e.to_string()))?)
        }
        None => None,
    };
    let everything = selector.is_none() && selection.names.is_empty();
    let empty = BTreeMap::new();
    let mut names: Vec<String> = namespaces
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            let name = n.metadata.name.as_deref().unwrap_or_default();
            let labels = n.metadata.labels.as_ref().unwrap_or(&empty);
            everything
                || selection.names.iter().any(|listed| listed == name)
                || selector.as_ref().is_some_and(|s| s.matches(labels))
        })
        .filter_map(|n| n.metadata.name.clone())
        .filter(|name| !selection.exclude.contains(name))
        .collect();
    names.sort();
    Ok(names)
}

/// Writes status when it changed, and publishes Events for writes and for new failures.
async fn report(crc: &ClusterRegistryCredential, ctx: &Context, outcome: &Result<FanOut, Error>) -> Result<(), Error> {
    let name = crc.name_any();
    let recent = ctx.written_cluster.get(&ObjectRef::from(crc));
    let previous = recent.as_ref().or(crc.status.as_ref());
    let partial = outcome.as_ref().ok().and_then(FanOut::partial_failure);
    let error = outcome.as_ref().err().or(partial.as_ref());
    let mut next = previous.cloned().unwrap_or_default();
    next.credential = credential_status(
        previous.map(|p| &p.credential),
        crc.metadata.generation,
        &crc.spec.source,
        outcome.as_ref().ok().map(|d| &d.synced),
        error,
    );
    if let Ok(done) = outcome {
        let count = |n: usize| Some(u32::try_from(n).unwrap_or(u32::MAX));
        next.target_namespaces = count(done.targets);
        next.synced_namespaces = count(done.targets - done.failures.len());
        next.failed_namespaces = count(done.failures.len());
        next.failures = done.failures.iter().take(MAX_LISTED_FAILURES).cloned().collect();
    }
    ctx.record_status(
        ObjectLabels { kind: KIND.into(), namespace: String::new(), name: name.clone() },
        &next.credential,
    );

    let event = match (outcome, error) {
        (Ok(done), _) if done.created + done.updated + done.removed > 0 => Some((
            EventType::Normal,
            "Synced",
            format!(
                "Secret {}: created in {}, updated in {}, removed from {} namespaces",
                done.synced.secret_name, done.created, done.updated, done.removed
            ),
        )),
        (_, Some(error)) if conditions_changed(previous.map(|p| &p.credential), &next.credential) => {
            Some((EventType::Warning, error.reason(), error.to_string()))
        }
        _ => None,
    };
    if let Some((type_, reason, note)) = event {
        publish(ctx, &crc.object_ref(&()), type_, reason, note).await;
    }

    if previous != Some(&next) {
        let patch = json!({
            "apiVersion": ClusterRegistryCredential::api_version(&()),
            "kind": ClusterRegistryCredential::kind(&()),
            "status": next,
        });
        Api::<ClusterRegistryCredential>::all(ctx.client.clone())
            .patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await?;
        ctx.written_cluster.insert(ObjectRef::from(crc), next);
    }
    Ok(())
}

impl ClusterRegistryCredential {
    /// Name of the Secret this credential writes in each namespace.
    pub fn secret_name(&self) -> String {
        self.spec.secret.name.clone().unwrap_or_else(|| self.name_any())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
    use kube::api::ObjectMeta;

    use super::*;

    fn ns(name: &str, labels: &[(&str, &str)], terminating: bool) -> PartialObjectMeta<Namespace> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                deletion_timestamp: terminating.then(|| Time(k8s_openapi::jiff::Timestamp::now())),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn cluster() -> Vec<PartialObjectMeta<Namespace>> {
        vec![
            ns("a1", &[("team", "a")], false),
            ns("a2", &[("team", "a")], true),
            ns("b1", &[("team", "b")], false),
            ns("build", &[], false),
            ns("kube-system", &[("team", "a")], false),
        ]
    }

    #[test]
    fn selector_or_names_minus_excluded_and_terminating() {
        let selection = NamespaceSelection {
            selector: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "a".to_string())].into()),
                ..Default::default()
            }),
            names: vec!["build".into(), "missing".into()],
            exclude: vec!["kube-system".into()],
        };
        assert_eq!(select(&selection, &cluster()).unwrap(), ["a1", "build"]);
    }

    #[test]
    fn nothing_given_or_an_empty_selector_selects_all_live_namespaces() {
        let all = ["a1", "b1", "build", "kube-system"];
        assert_eq!(select(&NamespaceSelection::default(), &cluster()).unwrap(), all);
        let empty = NamespaceSelection { selector: Some(LabelSelector::default()), ..Default::default() };
        assert_eq!(select(&empty, &cluster()).unwrap(), all);
    }

    #[test]
    fn names_alone_select_only_those() {
        let selection = NamespaceSelection { names: vec!["b1".into()], ..Default::default() };
        assert_eq!(select(&selection, &cluster()).unwrap(), ["b1"]);
    }
}
