//! What a reconcile reports: the status (written only when it changed), the metrics, and the
//! Events for writes and for new failures.

use std::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::EventType,
};

use super::{
    Context,
    credential::{Credential, Scope},
    fan_out::FanOut,
    publish,
};
use crate::{
    Error,
    crd::{CredentialStatus, NamespaceFailure},
    metrics::ObjectLabels,
    secret::FIELD_MANAGER,
    status::{
        NAMESPACES_FAILED, NAMESPACES_SYNCED, SECRET_CONFLICT, apply_namespaces_synced, apply_verification,
        conditions_changed, credential_status, namespaces_synced, verification_failed_anew,
    },
};

/// Failing namespaces listed in status; the counts cover the rest.
const MAX_LISTED_FAILURES: usize = 20;

/// Writes status when it changed, and publishes Events for writes and for new failures.
pub(super) async fn report<K: Credential>(
    obj: &K,
    uid: &str,
    ctx: &Context,
    outcome: &Result<FanOut, Error>,
    partial: Option<&Error>,
) -> Result<(), Error> {
    let previous = ctx.states.recent_status(uid).or_else(|| obj.status_view());
    let error = outcome.as_ref().err().or(partial);
    let refresh_failed = outcome.as_ref().ok().and_then(|d| d.refresh_failed.as_ref());
    let parts = obj.parts();
    let mut next = previous.clone().unwrap_or_default();
    next.credential = credential_status(
        previous.as_ref().map(|p| &p.credential),
        obj.meta().generation,
        parts.source,
        outcome.as_ref().ok().map(|d| &d.synced),
        refresh_failed,
        error,
    );
    // A fan-out's namespaces that do not hold its Secret, in a condition of their own.
    let namespaces = match (outcome, &parts.scope) {
        (Ok(done), Scope::Selection(_)) => {
            let (conflicts, failed) = done.target_failures();
            let secret = &done.synced.secret_name;
            let previous = previous.as_ref().map(|p| &p.credential);
            Some(namespaces_synced(previous, obj.meta().generation, secret, done.targets.len(), conflicts, failed))
        }
        _ => None,
    };
    if matches!(parts.scope, Scope::Selection(_)) {
        apply_namespaces_synced(&mut next.credential, previous.as_ref().map(|p| &p.credential), namespaces);
    }
    let verification = ctx.states.with(uid, |s| s.verification.result.clone());
    apply_verification(
        &mut next.credential,
        previous.as_ref().map(|p| &p.credential),
        super::verification::spec(obj, ctx).is_some(),
        verification.as_ref(),
        obj.meta().generation,
    );
    if let Ok(done) = outcome {
        let count = |n: usize| Some(u32::try_from(n).unwrap_or(u32::MAX));
        let failed = done.failures.iter().filter(|(ns, _)| done.targets.contains(ns)).count();
        next.target_namespaces = count(done.targets.len());
        next.synced_namespaces = count(done.targets.len() - failed);
        next.failed_namespaces = count(failed);
        next.failures = done
            .failures
            .iter()
            .take(MAX_LISTED_FAILURES)
            .map(|(namespace, error)| NamespaceFailure {
                namespace: namespace.clone(),
                reason: error.reason().into(),
                message: error.to_string(),
            })
            .collect();
    }
    let next = K::normalize(next);
    let labels = ObjectLabels {
        kind: K::KIND.into(),
        namespace: obj.meta().namespace.clone().unwrap_or_default(),
        name: obj.name_any(),
    };
    ctx.record_status(&labels, &next.credential);
    ctx.states.with(uid, |s| s.labels = Some(labels));

    let previous_credential = previous.as_ref().map(|p| &p.credential);
    // A fan-out can write and fail in one reconcile (a refresh failed, the still-valid token
    // went to a new namespace): both are told.
    let written = outcome.as_ref().ok().filter(|done| done.created + done.updated + done.removed > 0);
    // The credential's failure when its conditions changed, else the fan-out's failing namespaces
    // (conflicts and failures in some targets: no failure of the credential) when they changed.
    let shown = |c: &Condition| (c.status.clone(), c.reason.clone(), c.message.clone());
    let namespaces = |s: Option<&CredentialStatus>| s.and_then(|s| s.condition(NAMESPACES_SYNCED)).map(shown);
    let namespaces_failing = next.credential.condition(NAMESPACES_SYNCED).filter(|c| c.status == "False");
    let failed = match error.or(refresh_failed) {
        Some(error) => Some((error.reason(), error.to_string()))
            .filter(|_| conditions_changed(previous_credential, &next.credential)),
        None => {
            namespaces_failing.filter(|_| namespaces(previous_credential) != namespaces(Some(&next.credential))).map(
                |c| (if c.reason == SECRET_CONFLICT { SECRET_CONFLICT } else { NAMESPACES_FAILED }, c.message.clone()),
            )
        }
    };
    let events =
        [written.map(|done| write_event(obj, done)), failed.map(|(reason, note)| (EventType::Warning, reason, note))];
    for (type_, reason, note) in events.into_iter().flatten() {
        publish(ctx, &obj.object_ref(&()), type_, reason, note).await;
    }
    if verification_failed_anew(previous_credential, &next.credential)
        && let Some(failed) = &verification
    {
        let note = format!("the registry check failed: {}", failed.message);
        publish(ctx, &obj.object_ref(&()), EventType::Warning, failed.reason.as_str(), note).await;
    }

    if previous.as_ref() != Some(&next) {
        let api = K::api(ctx.client.clone(), obj.meta().namespace.as_deref());
        let patch = K::status_patch(&next);
        api.patch_status(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        ctx.states.with(uid, |s| s.written = Some((next, Instant::now())));
    }
    Ok(())
}

/// The Normal Event for a reconcile that wrote: per Secret for a credential with one target,
/// a summary for a fan-out.
fn write_event<K: Credential>(obj: &K, done: &FanOut) -> (EventType, &'static str, String) {
    let name = &done.synced.secret_name;
    match obj.parts().scope {
        Scope::Namespace(_) if done.created > 0 => (EventType::Normal, "Created", format!("Created Secret {name}")),
        Scope::Namespace(_) if done.updated > 0 => (EventType::Normal, "Updated", format!("Updated Secret {name}")),
        Scope::Namespace(_) => (EventType::Normal, "Deleted", format!("Deleted the Secret written before {name}")),
        Scope::Selection(_) => (
            EventType::Normal,
            "Synced",
            format!(
                "Secret {name}: created in {}, updated in {}, removed from {} namespaces",
                done.created, done.updated, done.removed
            ),
        ),
    }
}
