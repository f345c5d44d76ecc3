//! The reconcile core both kinds share: observe, plan (`crate::plan`), execute, report.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{Api, ResourceExt, runtime::controller::Action};
use secrecy::ExposeSecret;
use tracing::{info, warn};

use super::{
    Context,
    credential::{Credential, Scope},
    observe::{accounts_to_check, own_secrets, own_secrets_by_name, previous_token, read_accounts},
    report::report,
    retry_delay, verification,
};
use crate::{
    Error, dockerconfig,
    plan::{self, NamespaceStep, Observed, Removal, Retire, SecretStep},
    secret::{
        Claim, DesiredSecret, Outcome, SecretChange, apply, config_hash, delete_seen, desired_secret, ensure_secret,
    },
    service_account::{has_finalizer, release, set_finalizer, sync_namespace},
    source::{ApiSecretReader, CredentialProvider, ReadOnce, SourceContext},
    status::Synced,
};

/// One namespace's step, what writing its Secret gave, and how many old Secrets it retired.
type StepResult = (NamespaceStep, Result<Outcome, Error>, Result<usize, Error>);

/// What one reconcile did across its target namespaces.
pub(super) struct FanOut {
    pub(super) synced: Synced,
    /// The logins written and the rendered config's hash, for the registry check.
    pub(super) logins: Vec<crate::dockerconfig::RegistryAuth>,
    pub(super) config_hash: String,
    pub(super) targets: Vec<String>,
    pub(super) failures: Vec<(String, Error)>,
    /// The token refresh that failed when the logins hold the still-valid token it was to
    /// replace: the fan-out went ahead with that token, and the reconcile is retried with
    /// backoff.
    pub(super) refresh_failed: Option<Error>,
    pub(super) created: usize,
    pub(super) updated: usize,
    pub(super) removed: usize,
}

impl FanOut {
    /// The error a reconcile with failing namespaces reports: the namespace's own error for a
    /// credential with one target, a count for a fan-out. A fan-out's conflicts (a target
    /// namespace keeps a Secret of that name that is not the credential's to take) are no
    /// error of the credential: they are reported per namespace (`NamespacesSynced`), and one
    /// tenant's Secret does not make the credential fail for everyone.
    fn error<K: Credential>(&mut self, obj: &K) -> Option<Error> {
        match obj.parts().scope {
            Scope::Namespace(_) if !self.failures.is_empty() => Some(self.failures.remove(0).1),
            _ => {
                let in_targets = |ns: &String| self.targets.contains(ns);
                let failed = self.failures.iter().filter(|(ns, e)| in_targets(ns) && !is_conflict(e)).count();
                let cleanup = self.failures.iter().filter(|(ns, _)| !in_targets(ns)).count();
                match (failed, cleanup) {
                    (0, 0) => None,
                    (0, namespaces) => Some(Error::CleanupFailed { namespaces }),
                    (failed, _) => Some(Error::NamespacesFailed { failed, targets: self.targets.len() }),
                }
            }
        }
    }

    /// Target namespaces that do not hold the Secret: (conflicts, other failures).
    pub(super) fn target_failures(&self) -> (usize, usize) {
        let in_targets = self.failures.iter().filter(|(ns, _)| self.targets.contains(ns));
        let conflicts = in_targets.clone().filter(|(_, e)| is_conflict(e)).count();
        (conflicts, in_targets.count() - conflicts)
    }
}

/// Whether a namespace failed only because a Secret of the name is not the credential's to
/// take there (a tenant's own, or an older credential's).
fn is_conflict(error: &Error) -> bool {
    matches!(error, Error::SecretConflict { .. })
}

#[tracing::instrument(skip_all, fields(kind = K::KIND, namespace = obj.meta().namespace.as_deref(), object = %obj.name_any()))]
pub(crate) async fn reconcile<K: Credential>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = obj.uid().ok_or(Error::MissingObjectField("metadata.uid"))?;
    let api = K::api(ctx.client.clone(), obj.meta().namespace.as_deref());
    if !ctx.namespaces_synced() || !ctx.accounts_synced() {
        // Without the namespace list every Secret would look unselected, and without the
        // ServiceAccount list every entry unrecorded.
        return Ok(Action::requeue(std::time::Duration::from_millis(500)));
    }
    if obj.meta().deletion_timestamp.is_some() {
        // Secrets go with the garbage collector (owner references); the ServiceAccount
        // entries are regcred's to remove, found through their annotation.
        if has_finalizer(obj.meta()) {
            release_everywhere(&uid, &ctx).await?;
            set_finalizer(&api, obj.as_ref(), false).await?;
        }
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    if !obj.parts().service_accounts.is_empty() {
        // Before the first entry is added, so none can outlive the credential.
        set_finalizer(&api, obj.as_ref(), true).await?;
    }
    let mut outcome = sync(obj.as_ref(), &uid, &ctx).await;
    let verify_in = outcome.as_ref().ok().and_then(|done| verification::schedule(obj.as_ref(), &uid, &ctx, done));
    let partial = outcome.as_mut().ok().and_then(|fan_out| fan_out.error(obj.as_ref()));
    let reported = report(obj.as_ref(), &uid, &ctx, &outcome, partial.as_ref()).await;
    let refresh_failed = outcome.as_ref().ok().and_then(|done| done.refresh_failed.as_ref());
    let error = outcome.as_ref().err().or(partial.as_ref()).or(refresh_failed).or(reported.as_ref().err());
    ctx.count_reconcile(K::KIND, started, error);
    ctx.forget_if_deleted(&uid);
    reported?;
    let mut done = outcome?;
    if let Some(error) = partial {
        return Err(error);
    }
    if obj.parts().service_accounts.is_empty() {
        set_finalizer(&api, obj.as_ref(), false).await?;
    }
    if let Some(error) = done.refresh_failed.take() {
        // Every target got the still-valid token; the refresh is retried with backoff.
        return Err(error);
    }
    ctx.states.with(&uid, |s| s.failures = 0);
    Ok(ctx.requeue_after(done.synced.refresh_at, verify_in))
}

pub(crate) fn error_policy<K: Credential>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let uid = obj.uid().unwrap_or_default();
    let attempt = ctx.states.with(&uid, |s| {
        s.failures = s.failures.saturating_add(1);
        s.failures
    });
    ctx.forget_if_deleted(&uid);
    let status = obj.status_view();
    let delay = retry_delay(attempt, ctx.config.max_backoff, status.as_ref().map(|s| &s.credential));
    warn!(
        kind = K::KIND,
        namespace = obj.meta().namespace.as_deref(),
        name = %obj.name_any(),
        reason = error.reason(),
        %error,
        retry_in_secs = delay.as_secs_f32(),
        "sync failed"
    );
    Action::requeue(delay)
}

/// Observes, plans and writes. `Err` when nothing could be written (the source, the template
/// or the observation failed); per-namespace failures are in the `FanOut`.
async fn sync<K: Credential>(obj: &K, uid: &str, ctx: &Context) -> Result<FanOut, Error> {
    let parts = obj.parts();
    if let Some(key) = plan::reserved_template_key(parts.secret) {
        return Err(Error::ReservedKey { key: key.into() });
    }
    let owner = obj.controller_owner_ref(&()).ok_or(Error::MissingObjectField("metadata.uid"))?;
    let mut outside_scope = Vec::new();
    let (own_namespace, targets, terminating) = match parts.scope {
        Scope::Namespace(ns) => (Some(ns), vec![ns.to_string()], BTreeSet::new()),
        Scope::Selection(selection) => {
            let namespaces = ctx.namespaces.state();
            let selected = plan::select(selection, namespaces.iter().map(|n| &n.metadata))?;
            let (targets, outside) = plan::within(selected, ctx.config.namespaces.as_ref());
            outside_scope = outside;
            let terminating = namespaces
                .iter()
                .filter(|n| n.metadata.deletion_timestamp.is_some())
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            (None, targets, terminating)
        }
    };
    ctx.index.set_targets(uid, &targets);
    let secret_name = obj.secret_name();
    let status = ctx.states.recent_status(uid).or_else(|| obj.status_view());
    let previous_name = status.as_ref().and_then(|s| s.credential.secret_name.clone());
    let seed = status.as_ref().and_then(|s| s.credential.token_digest.as_deref());
    let (own, sample) = match ctx.config.watch_secrets {
        true => own_secrets(ctx, own_namespace, uid, &targets, &secret_name, seed).await?,
        // Where RBAC withholds list on Secrets: read the ones this credential may have, by name.
        false => {
            let names: Vec<&str> =
                [Some(secret_name.as_str()), previous_name.as_deref()].into_iter().flatten().collect();
            own_secrets_by_name(ctx, uid, &targets, &names, seed).await?
        }
    };
    let previous_token = sample.as_ref().and_then(|s| previous_token(s, status.as_ref(), obj.meta().generation));

    // One fetch for every namespace (ECR tokens also come from the shared cache).
    let reader = ReadOnce::new(ApiSecretReader(ctx.client.clone()));
    let source_ctx = SourceContext {
        namespace: own_namespace.unwrap_or_default(),
        registry: parts.registry,
        secrets: &reader,
        ecr: Some(&ctx.ecr),
        gcp: Some(&ctx.gcp),
        cluster_scoped: own_namespace.is_none(),
        previous: previous_token.as_ref(),
        served: ctx.config.namespaces.as_ref(),
    };
    // After a failed refresh: the still-valid token it was to replace, which every target may
    // have (new and repaired namespaces too); `Degraded` says why it is not a new one.
    let mut credentials = parts.source.fetch(&source_ctx).await?;
    let refresh_failed = credentials.refresh_failed.take();
    credentials.notes.extend(plan::outside_scope_note(&outside_scope));
    let docker_config = dockerconfig::render(&credentials.auths);
    let desired_hash = config_hash(Some(docker_config.expose_secret()));
    let identity = credentials.identity.as_deref();
    let desired_in = |namespace: &str| {
        desired_secret(&secret_name, namespace, parts.secret, Some(owner.clone()), docker_config.clone(), identity)
    };

    let contested = ctx.states.with(uid, |s| s.contested.clone());
    let desired_meta = desired_in("").metadata;
    let plan = plan::plan(&Observed {
        targets: &targets,
        terminating: &terminating,
        secret_name: &secret_name,
        previous_name: previous_name.as_deref(),
        own: &own,
        contested: &contested,
        desired: &desired_meta,
        desired_hash: &desired_hash,
    });

    let wanted = parts.service_accounts;
    let accounts = match !wanted.is_empty() || has_finalizer(obj.meta()) {
        true => accounts_to_check(ctx, uid, &targets, wanted, &secret_name).await?,
        false => BTreeMap::new(),
    };
    let claim = Claim { owner: owner.clone(), created: obj.meta().creation_timestamp.as_ref().map(|t| t.0) };
    let concurrency = usize::from(ctx.config.concurrency.max(1));
    let accounts_ref = &accounts;
    let results: Vec<StepResult> = stream::iter(plan.steps)
        .map(|step| {
            let desired = desired_in(&step.namespace);
            let (claim, secret_name) = (&claim, &secret_name);
            async move {
                let written = write_secret(ctx, &step, &desired, claim).await;
                let accounts = accounts_ref.get(&step.namespace).map(Vec::as_slice);
                let after = match (&written, accounts) {
                    (Ok(_), Some(list)) => {
                        let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &step.namespace);
                        sync_namespace(&api, list, secret_name, wanted, uid).await.map(|_| ())
                    }
                    _ => Ok(()),
                };
                // The old name goes only once the new one is in place here.
                let retired = match (&written, after) {
                    (Ok(_), Ok(())) => retire_all(ctx, &step.namespace, &step.retire, accounts, uid).await,
                    (Ok(_), Err(error)) => Err(error),
                    (Err(_), _) => Ok(0),
                };
                (step, written, retired)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;

    let (mut created, mut updated, mut removed, mut failures) = (0, 0, 0, Vec::new());
    ctx.states.with(uid, |state| {
        for (step, written, retired) in results {
            if let (Ok(_), Ok(_), Some(list)) = (&written, &retired, accounts_ref.get(&step.namespace)) {
                // Read and brought in line in this pass: unchanged, they need no read next time.
                for account in list {
                    let key = (step.namespace.clone(), account.name_any());
                    if let Some(rv) = &account.metadata.resource_version {
                        state.accounts_verified.insert(key, rv.clone());
                    }
                }
            }
            let key = (step.namespace.clone(), secret_name.clone());
            match written {
                Ok(outcome) => {
                    state.contested.remove(&step.namespace);
                    match outcome.change {
                        SecretChange::Created => created += 1,
                        SecretChange::Updated => updated += 1,
                        SecretChange::Unchanged => {}
                    }
                    if let Some(rv) = outcome.resource_version {
                        state.verified.insert(key, (rv, desired_hash.clone()));
                    }
                }
                // Deleted or terminating since the list: nothing to keep there.
                Err(error) if namespace_gone(&error) => {}
                Err(error) => {
                    if matches!(error, Error::SecretConflict { .. }) {
                        state.contested.insert(step.namespace.clone());
                    }
                    state.verified.remove(&key);
                    failures.push((step.namespace.clone(), error));
                }
            }
            match retired {
                Ok(n) => removed += n,
                Err(error) if namespace_gone(&error) => {}
                Err(error) => failures.push((step.namespace, error)),
            }
        }
        state.targets = targets.iter().cloned().collect();
        // Remember only what this credential may still have.
        let targets: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
        state.verified.retain(|(ns, name), _| targets.contains(ns.as_str()) && *name == secret_name);
        state.accounts_verified.retain(|(ns, name), _| targets.contains(ns.as_str()) && wanted.contains(name));
        state.contested.retain(|ns| targets.contains(ns.as_str()));
    });

    // Secrets of this credential in namespaces it no longer targets. One failure does not
    // discard what the others did.
    let removals: Vec<(Removal, Result<usize, Error>)> = stream::iter(plan.removals)
        .map(|removal| async move {
            let accounts = accounts_ref.get(&removal.namespace).map(Vec::as_slice);
            let result = match accounts {
                Some(list) => {
                    let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &removal.namespace);
                    release(&api, list, uid).await.map(|_| ())
                }
                None => Ok(()),
            };
            let result = match result {
                Ok(()) => retire_all(ctx, &removal.namespace, std::slice::from_ref(&removal.retire), None, uid).await,
                Err(error) => Err(error),
            };
            (removal, result)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    for (removal, result) in removals {
        match result {
            Ok(n) => removed += n,
            Err(error) if namespace_gone(&error) => {}
            Err(error) => failures.push((removal.namespace, error)),
        }
    }

    failures.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(FanOut {
        synced: Synced {
            secret_name,
            registries: credentials.auths.iter().map(|a| a.server.clone()).collect(),
            expires_at: credentials.expires_at,
            refresh_at: credentials.refresh_at,
            token_digest: credentials.expires_at.is_some().then(|| desired_hash.clone()),
            notes: credentials.notes,
        },
        logins: credentials.auths,
        config_hash: desired_hash,
        targets,
        failures,
        refresh_failed,
        created,
        updated,
        removed,
    })
}

/// Carries out one namespace's Secret step.
async fn write_secret(
    ctx: &Context,
    step: &NamespaceStep,
    desired: &DesiredSecret,
    claim: &Claim,
) -> Result<Outcome, Error> {
    match &step.secret {
        SecretStep::Unchanged => Ok(Outcome { change: SecretChange::Unchanged, resource_version: None }),
        SecretStep::Create => ensure_secret(&ctx.client, desired, claim, Some(None)).await,
        SecretStep::Inspect => ensure_secret(&ctx.client, desired, claim, None).await,
        SecretStep::Apply { resource_version } => {
            let api = Api::<Secret>::namespaced(ctx.client.clone(), &step.namespace);
            let name = desired.metadata.name.as_deref().unwrap_or_default();
            match apply(&api, name, desired, Some(resource_version.clone())).await {
                Ok(rv) => Ok(Outcome { change: SecretChange::Updated, resource_version: rv }),
                // Changed since the list: read it and decide again (not a failure).
                Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => {
                    ensure_secret(&ctx.client, desired, claim, None).await
                }
                Err(error) => Err(error),
            }
        }
    }
}

/// Deletes Secrets this credential no longer wants in one namespace, after taking them out of
/// the ServiceAccounts there.
async fn retire_all(
    ctx: &Context,
    namespace: &str,
    retire: &[Retire],
    accounts: Option<&[ServiceAccount]>,
    uid: &str,
) -> Result<usize, Error> {
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), namespace);
    let mut removed = 0;
    for old in retire {
        if let Some(list) = accounts {
            let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), namespace);
            sync_namespace(&api, list, &old.name, &[], uid).await?;
        }
        // The owner uid is the credential's own uid.
        if delete_seen(&secrets, &old.name, old.resource_version.as_deref(), uid).await? {
            info!(namespace, secret = old.name, "deleted Secret no longer wanted");
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes every ServiceAccount entry this credential added, wherever their annotations say
/// it did (found through the index; it does not depend on the credential's Secrets).
async fn release_everywhere(uid: &str, ctx: &Context) -> Result<(), Error> {
    for (namespace, list) in read_accounts(ctx, ctx.index.accounts_recording(uid)).await? {
        let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace);
        release(&api, &list, uid).await?;
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

impl Context {
    /// A reconcile that was running when its credential was deleted may have recorded state
    /// and metrics after the delete hook dropped them: drop them again.
    fn forget_if_deleted(&self, uid: &str) {
        if !self.index.contains(uid) {
            self.forget(uid);
        }
    }

    /// Drops everything kept for a deleted credential: its state and its metric series.
    pub(crate) fn forget(&self, uid: &str) {
        self.index.remove(uid);
        if let Some(state) = self.states.remove(uid)
            && let Some(labels) = state.labels
        {
            self.metrics.ready_credentials.remove(&labels);
            self.metrics.token_expiry.remove(&labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fan_out(targets: &[&str], failures: Vec<(&str, Error)>) -> FanOut {
        FanOut {
            synced: Synced {
                secret_name: "pull".into(),
                registries: vec!["r.example.com".into()],
                expires_at: None,
                refresh_at: None,
                token_digest: None,
                notes: Vec::new(),
            },
            logins: Vec::new(),
            config_hash: String::new(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            failures: failures.into_iter().map(|(ns, e)| (ns.to_string(), e)).collect(),
            refresh_failed: None,
            created: 0,
            updated: 0,
            removed: 0,
        }
    }

    fn credential<K: serde::de::DeserializeOwned>(kind: &str, namespace: Option<&str>) -> K {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "regcred.dev/v1alpha1", "kind": kind,
            "metadata": {"name": "c", "namespace": namespace, "uid": "u"},
            "spec": {"registry": "r.example.com",
                     "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "s", "namespace": "p"}}}},
        }))
        .unwrap()
    }

    /// Issue 20, item 5: a fan-out's conflicts (a tenant's own Secret, an older credential's)
    /// are not the credential's failure; other failures in targets and failed cleanups are.
    /// A credential with one target still fails with its conflict.
    #[test]
    fn a_fan_outs_conflicts_are_no_failure_of_the_credential() {
        let crc: crate::crd::ClusterRegistryCredential = credential("ClusterRegistryCredential", None);
        let conflict = |ns: &str| Error::SecretConflict { namespace: ns.into(), name: "pull".into() };
        let failure = || Error::ObjectContended { name: "x".into() };
        let mut only_conflicts = fan_out(&["a", "b", "c"], vec![("b", conflict("b")), ("c", conflict("c"))]);
        assert_eq!(only_conflicts.target_failures(), (2, 0));
        assert!(only_conflicts.error(&crc).is_none());
        let mut mixed = fan_out(&["a", "b", "c"], vec![("b", conflict("b")), ("c", failure())]);
        assert_eq!(mixed.target_failures(), (1, 1));
        let error = mixed.error(&crc).map(|e| (e.reason(), e.to_string()));
        assert_eq!(error.unwrap().0, "NamespacesFailed");
        let mut cleanup = fan_out(&["a", "b"], vec![("b", conflict("b")), ("gone", failure())]);
        assert_eq!(cleanup.error(&crc).map(|e| e.reason()), Some("CleanupFailed"));

        let rc: crate::crd::RegistryCredential = credential("RegistryCredential", Some("a"));
        let mut single = fan_out(&["a"], vec![("a", conflict("a"))]);
        assert_eq!(single.error(&rc).map(|e| e.reason()), Some("SecretConflict"));
    }

    #[test]
    fn status_counts_are_dropped_for_the_namespaced_kind() {
        let status = crate::crd::ClusterCredentialStatus { target_namespaces: Some(1), ..Default::default() };
        assert_eq!(<crate::crd::RegistryCredential as Credential>::normalize(status.clone()).target_namespaces, None);
        assert_eq!(<crate::crd::ClusterRegistryCredential as Credential>::normalize(status).target_namespaces, Some(1));
    }
}
