//! The reconcile core both kinds share: observe, plan (`crate::plan`), execute, report.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use futures::{StreamExt, stream};
use k8s_openapi::{
    api::core::v1::{Secret, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, ResourceExt,
    api::ListParams,
    runtime::{controller::Action, events::EventType},
};
use secrecy::{ExposeSecret, SecretSlice};
use tracing::{info, warn};

use super::{
    Context,
    credential::{Credential, Scope},
    fan_out::{FanOut, StepDone, Tally, is_conflict},
    observe::{accounts_to_check, own_secrets, own_secrets_by_name, previous_token, read_accounts},
    publish,
    report::report,
    retry_delay, verification,
};
use crate::{
    Error,
    crd::{ClusterCredentialStatus, SecretTemplate},
    dockerconfig,
    plan::{self, LiveSecret, NamespaceStep, Observed, Removal, Retire, SecretStep},
    secret::{
        Claim, DesiredSecret, Outcome, SecretChange, apply, config_hash, delete_seen, desired_secret, ensure_secret,
        metadata_digest,
    },
    service_account::{has_finalizer, release, set_finalizer, sync_namespace},
    source::{ApiSecretReader, CredentialProvider, Credentials, PreviousToken, ReadOnce, SourceContext},
    state::{Content, ObjectState, SeenCurrent, Version},
    status::Synced,
};

#[tracing::instrument(skip_all, fields(kind = K::KIND, namespace = obj.meta().namespace.as_deref(), object = %obj.name_any()))]
pub(crate) async fn reconcile<K: Credential>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = obj.uid().ok_or(Error::MissingObjectField("metadata.uid"))?;
    let busy = ctx.states.with(&uid, |s| s.busy.clone());
    let _busy = busy.lock().await;
    if !ctx.index.contains(&uid) {
        // Deleted, or gone from this controller's `--selector`, since it was queued: its
        // release (see `release_if_left`) is not to be undone.
        ctx.forget(&uid);
        return Ok(Action::await_change());
    }
    let api = K::api(ctx.client.clone(), obj.meta().namespace.as_deref());
    if !ctx.namespaces_synced() || !ctx.accounts_synced() || !ctx.secrets_synced() {
        // Without the namespace list every Secret would look unselected, without the
        // ServiceAccount list every entry unrecorded, and without the Secret list every
        // Secret missing.
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
    if !obj.wanted_accounts(ctx.config.attach).is_empty() {
        // Before the first entry is added, so none can outlive the credential.
        set_finalizer(&api, obj.as_ref(), true).await?;
    }
    let mut outcome = sync(obj.as_ref(), &uid, &ctx).await;
    let verify_in = outcome.as_ref().ok().and_then(|done| verification::schedule(obj.as_ref(), &uid, &ctx, done));
    let partial = outcome.as_mut().ok().and_then(|fan_out| fan_out.error(obj.as_ref()));
    let reported = report(obj.as_ref(), &uid, &ctx, &outcome, partial.as_ref()).await;
    let refresh_failed = outcome.as_ref().ok().and_then(|done| done.refresh_failed.as_ref());
    let retry = outcome.as_ref().ok().and_then(FanOut::retry);
    let error = outcome.as_ref().err().or(partial.as_ref()).or(retry.as_ref()).or(refresh_failed);
    let error = error.or(reported.as_ref().err());
    ctx.count_reconcile(K::KIND, started, error);
    ctx.forget_if_deleted(&uid);
    reported?;
    let mut done = outcome?;
    if let Some(error) = partial.or(retry) {
        return Err(error);
    }
    if obj.wanted_accounts(ctx.config.attach).is_empty() {
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
    let scope = targets_of(parts.scope, ctx)?;
    ctx.index.set_targets(uid, &scope.targets);
    let secret_name = obj.secret_name();
    let status = ctx.states.recent_status(uid).or_else(|| obj.status_view());
    let own = observe_own(ctx, uid, &scope, &secret_name, status.as_ref(), obj.meta().generation).await?;

    // One fetch for every namespace (tokens also come from the shared cache).
    let reader = ReadOnce::new(ApiSecretReader(ctx.client.clone()));
    let source_ctx = SourceContext {
        namespace: scope.own_namespace.unwrap_or_default(),
        registry: parts.registry,
        secrets: &reader,
        ecr: Some(&ctx.ecr),
        gcp: Some(&ctx.gcp),
        azure: Some(&ctx.azure),
        cluster_scoped: scope.own_namespace.is_none(),
        previous: own.previous_token.as_ref(),
        served: ctx.config.namespaces.as_ref(),
    };
    // After a failed refresh: the still-valid token it was to replace, which every target may
    // have (new and repaired namespaces too); `Degraded` says why it is not a new one.
    let mut credentials = parts.source.fetch(&source_ctx).await?;
    let refresh_failed = credentials.refresh_failed.take();
    credentials.notes.extend(plan::outside_scope_note(&scope.outside_scope));
    let desired = Desired::new(&secret_name, parts.secret, owner, &credentials);

    let contested = ctx.states.with(uid, |s| s.contested.clone());
    let plan = plan::plan(&Observed {
        targets: &scope.targets,
        terminating: &scope.terminating,
        secret_name: &secret_name,
        previous_name: own.previous_name.as_deref(),
        own: &own.live,
        contested: &contested,
        desired_hash: &desired.hash,
        desired_meta_digest: &desired.meta_digest,
    });
    let wanted = obj.wanted_accounts(ctx.config.attach);
    let accounts = match !wanted.is_empty() || has_finalizer(obj.meta()) {
        true => {
            let leaving = plan.removals.iter().map(|r| r.namespace.as_str()).collect();
            accounts_to_check(ctx, uid, &scope.targets, &leaving, wanted, &secret_name).await?
        }
        false => BTreeMap::new(),
    };
    let claim = Claim { owner: desired.owner.clone(), created: obj.meta().creation_timestamp.as_ref().map(|t| t.0) };
    let writing = Writing { ctx, uid, desired: &desired, claim: &claim, accounts: &accounts, wanted };
    // Each step is recorded as it completes: nothing of 10,000 steps' results is kept at once.
    let mut recorder = ctx.states.with(uid, |state| Recorder::new(state, &desired, &own.live));
    writing.steps(plan.steps, |done| ctx.states.with(uid, |state| recorder.record(state, done))).await;
    let mut tally = recorder.tally;
    ctx.states.with(uid, |state| forget_untargeted(state, &scope.targets, &secret_name, wanted));
    // Secrets of this credential in namespaces it no longer targets.
    for (removal, result) in writing.removals(plan.removals).await {
        match result {
            Ok(n) => tally.removed += n,
            Err(error) if namespace_gone(&error, &removal.namespace) => {}
            Err(error) => tally.failures.push((removal.namespace, error)),
        }
    }
    tally.failures.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(FanOut {
        synced: Synced {
            secret_name: secret_name.clone(),
            registries: credentials.auths.iter().map(|a| a.server.clone()).collect(),
            expires_at: credentials.expires_at,
            refresh_at: credentials.refresh_at,
            token_digest: credentials.expires_at.is_some().then(|| desired.hash.clone()),
            token_identity: credentials.expires_at.and(credentials.identity.clone()),
            notes: credentials.notes,
        },
        logins: credentials.auths,
        config_hash: desired.hash,
        targets: scope.targets,
        failures: tally.failures,
        refresh_failed,
        created: tally.created,
        updated: tally.updated,
        removed: tally.removed,
    })
}

/// The namespaces a reconcile writes into.
struct Targets<'a> {
    /// A RegistryCredential's own namespace; `None` for a cluster credential.
    own_namespace: Option<&'a str>,
    targets: Vec<String>,
    /// Selected namespaces being deleted: nothing is removed from them.
    terminating: BTreeSet<String>,
    /// Selected namespaces outside `--namespaces`, named in the Ready message.
    outside_scope: Vec<String>,
}

fn targets_of<'a>(scope: Scope<'a>, ctx: &Context) -> Result<Targets<'a>, Error> {
    match scope {
        Scope::Namespace(ns) => Ok(Targets {
            own_namespace: Some(ns),
            targets: vec![ns.to_string()],
            terminating: BTreeSet::new(),
            outside_scope: Vec::new(),
        }),
        Scope::Selection(selection) => {
            let namespaces = ctx.namespaces.state();
            let selected = plan::select(selection, namespaces.iter().map(|n| &n.metadata))?;
            let (targets, outside_scope) = plan::within(selected, ctx.config.namespaces.as_ref());
            let terminating = namespaces
                .iter()
                .filter(|n| n.metadata.deletion_timestamp.is_some())
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            Ok(Targets { own_namespace: None, targets, terminating, outside_scope })
        }
    }
}

/// What a reconcile knows of the credential's own Secrets before it fetches.
struct OwnSecrets {
    live: Vec<LiveSecret>,
    /// The token one of them holds, reusable after a restart (see `observe::previous_token`).
    previous_token: Option<PreviousToken>,
    /// The Secret name the last status reported (a rename retires it).
    previous_name: Option<String>,
}

async fn observe_own(
    ctx: &Context,
    uid: &str,
    scope: &Targets<'_>,
    secret_name: &str,
    status: Option<&ClusterCredentialStatus>,
    generation: Option<i64>,
) -> Result<OwnSecrets, Error> {
    let previous_name = status.and_then(|s| s.credential.secret_name.clone());
    let seed = status.and_then(|s| s.credential.token_digest.as_deref());
    let targets = &scope.targets;
    let (live, sample) = match ctx.config.watch_secrets {
        true => own_secrets(ctx, scope.own_namespace, uid, targets, secret_name, seed).await?,
        // Where RBAC withholds list on Secrets: read the ones this credential may have, by name.
        false => {
            let names: Vec<&str> = [Some(secret_name), previous_name.as_deref()].into_iter().flatten().collect();
            own_secrets_by_name(ctx, uid, targets, &names, seed).await?
        }
    };
    let previous_token = sample.as_ref().and_then(|s| previous_token(s, status, generation));
    Ok(OwnSecrets { live, previous_token, previous_name })
}

/// The Secret a reconcile wants in every target namespace.
struct Desired<'a> {
    name: &'a str,
    template: &'a SecretTemplate,
    owner: OwnerReference,
    config: SecretSlice<u8>,
    /// `config_hash` of the config, and the metadata (as in any namespace) with its digest.
    hash: String,
    meta: ObjectMeta,
    meta_digest: String,
}

impl<'a> Desired<'a> {
    fn new(name: &'a str, template: &'a SecretTemplate, owner: OwnerReference, credentials: &Credentials) -> Self {
        let config = dockerconfig::render(&credentials.auths);
        let hash = config_hash(Some(config.expose_secret()));
        let mut desired =
            Desired { name, template, owner, config, hash, meta: ObjectMeta::default(), meta_digest: String::new() };
        desired.meta = desired.in_namespace("").metadata;
        desired.meta_digest = metadata_digest(&desired.meta);
        desired
    }

    fn in_namespace(&self, namespace: &str) -> DesiredSecret {
        desired_secret(self.name, namespace, self.template, Some(self.owner.clone()), self.config.clone())
    }
}

/// What the writes of one reconcile share.
struct Writing<'a> {
    ctx: &'a Context,
    uid: &'a str,
    desired: &'a Desired<'a>,
    claim: &'a Claim,
    /// The ServiceAccounts to bring in line, by namespace.
    accounts: &'a BTreeMap<String, Vec<ServiceAccount>>,
    wanted: &'a [String],
}

impl Writing<'_> {
    /// Each namespace's step, `--concurrency` at a time: the Secret, then the named
    /// ServiceAccounts, then, only if both succeeded, the old-name Secrets (so a rename never
    /// leaves a namespace without a pull Secret).
    async fn steps(&self, steps: Vec<NamespaceStep>, mut each: impl FnMut(StepDone)) {
        let mut done = stream::iter(steps).map(|step| self.step(step)).buffer_unordered(self.concurrency());
        while let Some(step) = done.next().await {
            each(step);
        }
    }

    async fn step(&self, step: NamespaceStep) -> StepDone {
        let ctx = self.ctx;
        let written = write_secret(ctx, &step, &self.desired.in_namespace(&step.namespace), self.claim).await;
        let accounts = self.accounts.get(&step.namespace).map(Vec::as_slice);
        let after = match (&written, accounts) {
            (Ok(_), Some(list)) => {
                let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &step.namespace);
                sync_namespace(&api, list, self.desired.name, self.wanted, self.uid).await
            }
            _ => Ok(BTreeMap::new()),
        };
        let (retired, accounts) = match (&written, after) {
            (Ok(_), Ok(left)) => (retire_all(ctx, &step.namespace, &step.retire, accounts, self.uid).await, left),
            (Ok(_), Err(error)) => (Err(error), BTreeMap::new()),
            (Err(_), _) => (Ok(0), BTreeMap::new()),
        };
        StepDone { step, written, retired, accounts }
    }

    /// Takes the credential's Secrets out of namespaces it no longer targets (after releasing
    /// their ServiceAccount entries). One failure does not discard what the others did.
    async fn removals(&self, removals: Vec<Removal>) -> Vec<(Removal, Result<usize, Error>)> {
        let remove = |removal: Removal| async move {
            let (ctx, uid) = (self.ctx, self.uid);
            let released = match self.accounts.get(&removal.namespace) {
                Some(list) => {
                    let api = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &removal.namespace);
                    release(&api, list, uid).await.map(|_| ())
                }
                None => Ok(()),
            };
            let result = match released {
                Ok(()) => retire_all(ctx, &removal.namespace, std::slice::from_ref(&removal.retire), None, uid).await,
                Err(error) => Err(error),
            };
            (removal, result)
        };
        stream::iter(removals).map(remove).buffer_unordered(self.concurrency()).collect().await
    }

    fn concurrency(&self) -> usize {
        usize::from(self.ctx.config.concurrency.max(1))
    }
}

/// Counts what the steps did, and remembers per namespace what is now known current (so the
/// next reconcile reads nothing that did not change) and what was lost to another owner.
struct Recorder<'a> {
    /// The resourceVersion each namespace's Secret was observed at: an unchanged Secret stays
    /// known at it.
    observed: BTreeMap<&'a str, &'a str>,
    /// What the Secrets written or found current hold.
    content: Arc<Content>,
    tally: Tally,
}

impl<'a> Recorder<'a> {
    fn new(state: &mut ObjectState, desired: &Desired<'_>, live: &'a [LiveSecret]) -> Self {
        let observed = live
            .iter()
            .filter(|l| l.name() == desired.name)
            .filter_map(|l| Some((l.namespace(), l.resource_version.as_deref()?)))
            .collect();
        if state.verified_name != desired.name {
            state.verified.clear();
            state.verified_name = desired.name.to_string();
        }
        Recorder { observed, content: shared_content(state, desired), tally: Tally::default() }
    }

    fn record(&mut self, state: &mut ObjectState, done: StepDone) {
        let StepDone { step, written, retired, accounts } = done;
        if let (Ok(_), Ok(_)) = (&written, &retired) {
            // Read and brought in line in this pass: unchanged, they need no read next time.
            for (name, in_line) in accounts {
                state.accounts_verified.insert((step.namespace.clone(), name), in_line);
            }
        }
        match written {
            Ok(outcome) => self.written(state, &step.namespace, outcome),
            // Deleted or terminating since the list: nothing to keep there.
            Err(error) if namespace_gone(&error, &step.namespace) => {}
            Err(error) => {
                if is_conflict(&error) {
                    state.contested.insert(step.namespace.clone());
                }
                state.verified.remove(step.namespace.as_str());
                self.tally.failures.push((step.namespace.clone(), error));
            }
        }
        match retired {
            Ok(n) => self.tally.removed += n,
            Err(error) if namespace_gone(&error, &step.namespace) => {}
            Err(error) => self.tally.failures.push((step.namespace, error)),
        }
    }

    fn written(&mut self, state: &mut ObjectState, namespace: &str, outcome: Outcome) {
        state.contested.remove(namespace);
        let resource_version = match outcome.change {
            SecretChange::Created => {
                self.tally.created += 1;
                outcome.resource_version
            }
            SecretChange::Updated => {
                self.tally.updated += 1;
                outcome.resource_version
            }
            SecretChange::Unchanged => self.observed.get(namespace).map(|rv| rv.to_string()),
        };
        if let Some(resource_version) = resource_version {
            let seen = SeenCurrent { resource_version: Version::of(&resource_version), content: self.content.clone() };
            state.verified.insert(namespace.into(), seen);
        }
    }
}

/// What this reconcile's Secrets hold, shared by all of them (and with those an earlier
/// reconcile recorded with the same content).
fn shared_content(state: &ObjectState, desired: &Desired<'_>) -> Arc<Content> {
    let fresh = Content { data_hash: desired.hash.clone(), meta_digest: desired.meta_digest.clone() };
    let known = state.verified.values().map(|seen| &seen.content).find(|content| ***content == fresh);
    known.cloned().unwrap_or_else(|| Arc::new(fresh))
}

/// Keeps only what this credential may still have: its targets, its Secret name, the
/// ServiceAccounts it names.
fn forget_untargeted(state: &mut ObjectState, targets: &[String], secret_name: &str, wanted: &[String]) {
    state.targets = targets.iter().cloned().collect();
    let targets: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    if state.verified_name != secret_name {
        state.verified.clear();
    }
    state.verified.retain(|ns, _| targets.contains(ns.as_ref()));
    state.accounts_verified.retain(|(ns, name), _| targets.contains(ns.as_str()) && wanted.contains(name));
    state.contested.retain(|ns| targets.contains(ns.as_str()));
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

/// A credential this controller's watch no longer shows: where it was, and its uid.
pub(super) struct Gone {
    pub(super) namespace: Option<String>,
    pub(super) name: String,
    pub(super) uid: String,
}

/// Attempts at releasing a credential that left the selector, a second apart and more.
const RELEASE_ATTEMPTS: u32 = 6;

/// Gives back what this controller added to a credential its label-selected watch no longer
/// shows, if the credential still exists: it left `--selector` (relabelled), which the watch
/// reports as a deletion. Its ServiceAccount entries are removed and its finalizer too, so
/// that a credential no controller serves any more can be deleted (nothing would remove the
/// finalizer), and one that another controller serves now is that one's alone (it adds
/// them back). Its Secrets stay: the credential owns them, and the garbage collector removes
/// them with it. Runs after any reconcile of it in flight (`busy`); retried with backoff.
pub(super) async fn release_if_left<K: Credential>(ctx: Arc<Context>, gone: Gone, busy: Arc<tokio::sync::Mutex<()>>) {
    let _busy = busy.lock().await;
    for attempt in 1..=RELEASE_ATTEMPTS {
        match released_if_left::<K>(&ctx, &gone).await {
            Ok(Released::Nothing) => return,
            Ok(Released::LeftSelector) => {
                info!(
                    kind = K::KIND,
                    namespace = gone.namespace.as_deref(),
                    name = gone.name,
                    "released a credential that left --selector"
                );
                return;
            }
            Ok(Released::Deleted { accounts }) => {
                info!(
                    kind = K::KIND,
                    namespace = gone.namespace.as_deref(),
                    name = gone.name,
                    accounts,
                    "released the ServiceAccount entries of a credential deleted without its finalizer"
                );
                return;
            }
            Err(error) => {
                let delay = super::backoff(attempt, std::time::Duration::from_secs(30));
                warn!(
                    kind = K::KIND,
                    namespace = gone.namespace.as_deref(),
                    name = gone.name,
                    reason = error.reason(),
                    %error,
                    retry_in_secs = delay.as_secs_f32(),
                    "could not release a credential that left --selector"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// What one attempt of [`release_if_left`] gave back.
enum Released {
    Nothing,
    /// The credential left `--selector`: its entries and its finalizer.
    LeftSelector,
    /// The credential is deleted: the entries still recorded for it, in this many accounts.
    Deleted {
        accounts: usize,
    },
}

/// One attempt of [`release_if_left`].
async fn released_if_left<K: Credential>(ctx: &Context, gone: &Gone) -> Result<Released, Error> {
    let api = K::api(ctx.client.clone(), gone.namespace.as_deref());
    // Deleted (and perhaps another one made under its name).
    let current = api.get_opt(&gone.name).await?.filter(|c| c.uid().as_deref() == Some(gone.uid.as_str()));
    let Some(current) = current else {
        return released_if_deleted(ctx, &gone.uid).await;
    };
    let Some(selector) = ctx.config.selector.as_deref() else {
        return Ok(Released::Nothing); // still there: the watch shows it again
    };
    // Still (or again) selected: the watch will show it; nothing to give back.
    let selected = ListParams::default().fields(&format!("metadata.name={}", gone.name)).labels(selector);
    if api.list_metadata(&selected).await?.items.iter().any(|c| c.uid().as_deref() == Some(gone.uid.as_str())) {
        return Ok(Released::Nothing);
    }
    let accounts = ctx.index.accounts_recording(&gone.uid);
    if accounts.is_empty() && !has_finalizer(current.meta()) {
        return Ok(Released::Nothing);
    }
    release_everywhere(&gone.uid, ctx).await?;
    set_finalizer(&api, &current, false).await?;
    let note = format!(
        "no longer matches this controller's --selector {selector:?}: removed its entries from {} ServiceAccounts and its finalizer",
        accounts.len()
    );
    publish(ctx, &current.object_ref(&()), EventType::Normal, "Released", note).await;
    Ok(Released::LeftSelector)
}

/// A deleted credential normally released its entries before its finalizer let it go. Not
/// when the finalizer went first: in a `--selector` handover the controller it left removes
/// the finalizer that the one it moved to relies on after that one has added its entries (until
/// it adds the finalizer again), and anyone may remove it by hand. What is still recorded for
/// its uid is released here; with nothing recorded, nothing is read.
async fn released_if_deleted(ctx: &Context, uid: &str) -> Result<Released, Error> {
    let accounts = ctx.index.accounts_recording(uid).len();
    if accounts == 0 {
        return Ok(Released::Nothing);
    }
    release_everywhere(uid, ctx).await?;
    Ok(Released::Deleted { accounts })
}

/// Whether a write into `namespace` failed because the namespace is gone or being deleted,
/// as the apiserver's namespace lifecycle admission reports it: `404 NotFound` about the
/// namespace itself (`details.kind` "namespaces", `details.name` the namespace), or
/// `403 Forbidden` with a `NamespaceTerminating` cause. Decided by the Status's code, reason
/// and details, never its message: a missing Secret named `namespaces-…` is not a gone
/// namespace.
fn namespace_gone(error: &Error, namespace: &str) -> bool {
    let Error::Kube(kube::Error::Api(status)) = error else {
        return false;
    };
    let Some(details) = status.details.as_ref() else {
        return false;
    };
    match (status.code, status.reason.as_str()) {
        (404, "NotFound") => details.kind == "namespaces" && details.group.is_empty() && details.name == namespace,
        (403, "Forbidden") => details.causes.iter().any(|cause| cause.reason == NAMESPACE_TERMINATING),
        _ => false,
    }
}

/// The cause type (`StatusCause.reason` on the wire) of a write refused in a terminating
/// namespace (`k8s.io/api/core/v1.NamespaceTerminatingCause`).
const NAMESPACE_TERMINATING: &str = "NamespaceTerminating";

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
            self.metrics.forget_credential(&labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apiserver error, from the Status JSON it sends.
    fn api_error(status: serde_json::Value) -> Error {
        Error::Kube(kube::Error::Api(Box::new(serde_json::from_value(status).unwrap())))
    }

    /// Issue 20, item 11a: only the namespace lifecycle's refusals count as a gone namespace,
    /// told by code, reason and details (the Statuses below are the ones kube-apiserver 1.34
    /// sends), never by the message.
    #[test]
    fn a_gone_namespace_is_told_by_the_status_not_its_message() {
        let gone = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound",
            "message": "namespaces \"team-a\" not found",
            "details": {"name": "team-a", "kind": "namespaces"},
        }));
        assert!(namespace_gone(&gone, "team-a"));
        assert!(!namespace_gone(&gone, "team-b"), "another namespace is gone, not this one");
        let terminating = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "secrets \"pull\" is forbidden: unable to create new content in namespace team-a because it is being terminated",
            "details": {"name": "pull", "kind": "secrets", "causes": [{"reason": "NamespaceTerminating",
                "message": "namespace team-a is being terminated", "field": "metadata.namespace"}]},
        }));
        assert!(namespace_gone(&terminating, "team-a"));

        // A Secret named like a namespace's message is just a missing Secret.
        let missing_secret = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound",
            "message": "secrets \"namespaces-pull\" not found",
            "details": {"name": "namespaces-pull", "kind": "secrets"},
        }));
        assert!(!namespace_gone(&missing_secret, "team-a"));
        // A refusal that only says so in its text (a webhook, RBAC) is a failure to report.
        let webhook = api_error(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "admission webhook \"x\" denied the request: namespaces being terminated are frozen",
            "details": {"name": "pull", "kind": "secrets"},
        }));
        assert!(!namespace_gone(&webhook, "team-a"));
        let no_details = api_error(serde_json::json!({
            "status": "Failure", "code": 404, "reason": "NotFound", "message": "namespaces \"team-a\" not found",
        }));
        assert!(!namespace_gone(&no_details, "team-a"));
        assert!(!namespace_gone(&Error::SecretConflict { namespace: "team-a".into(), name: "pull".into() }, "team-a"));
    }

    fn fan_out(targets: &[&str], failures: Vec<(&str, Error)>) -> FanOut {
        FanOut {
            synced: Synced {
                secret_name: "pull".into(),
                registries: vec!["r.example.com".into()],
                expires_at: None,
                refresh_at: None,
                token_digest: None,
                token_identity: None,
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
    /// and failures in some of its targets (a tenant's filled Secret quota) are not the
    /// credential's failure, though those failures are retried; a failure in every target and
    /// a failed cleanup are. A credential with one target still fails with its conflict.
    #[test]
    fn a_fan_outs_conflicts_and_partial_failures_are_no_failure_of_the_credential() {
        let crc: crate::crd::ClusterRegistryCredential = credential("ClusterRegistryCredential", None);
        let conflict = |ns: &str| Error::SecretConflict { namespace: ns.into(), name: "pull".into() };
        let failure = || Error::ObjectContended { name: "x".into() };
        let mut only_conflicts = fan_out(&["a", "b", "c"], vec![("b", conflict("b")), ("c", conflict("c"))]);
        assert_eq!(only_conflicts.target_failures(), (2, 0));
        assert!(only_conflicts.error(&crc).is_none());
        assert!(only_conflicts.retry().is_none(), "a conflict waits for its Secret's owner");
        let mut mixed = fan_out(&["a", "b", "c"], vec![("b", conflict("b")), ("c", failure())]);
        assert_eq!(mixed.target_failures(), (1, 1));
        assert!(mixed.error(&crc).is_none(), "one namespace's failure is not the credential's");
        assert_eq!(mixed.retry().map(|e| e.reason()), Some("NamespacesFailed"));
        let mut everywhere = fan_out(&["a", "b"], vec![("a", failure()), ("b", failure())]);
        let error = everywhere.error(&crc).map(|e| (e.reason(), e.to_string()));
        assert_eq!(error.unwrap().0, "NamespacesFailed");
        let mut cleanup = fan_out(&["a", "b"], vec![("b", conflict("b")), ("gone", failure())]);
        assert_eq!(cleanup.error(&crc).map(|e| e.reason()), Some("CleanupFailed"));
        let mut no_targets = fan_out(&[], vec![("gone", failure())]);
        assert_eq!(no_targets.error(&crc).map(|e| e.reason()), Some("CleanupFailed"));

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
