//! Status conditions: computed from a reconcile's outcome, written only when they change.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::{
    Error,
    crd::{CredentialSource, CredentialStatus},
    verify::Verification,
};

/// The condition that says whether the Secret holds the current credential.
pub const READY: &str = "Ready";
/// Reason of a Ready=True condition.
pub const SYNCED: &str = "Synced";
/// The condition that says a refresh is failing (sources with expiring tokens).
pub const DEGRADED: &str = "Degraded";
/// The condition that says whether the registry accepts the credential (`spec.verify`).
pub const VERIFIED: &str = "Verified";
/// The condition of a ClusterRegistryCredential that says whether every target namespace
/// holds its Secret; the namespaces that do not are their own business, not `Ready`'s, unless
/// every target failed.
pub const NAMESPACES_SYNCED: &str = "NamespacesSynced";
/// Reason of `NamespacesSynced=False` when some target namespaces failed other than by a
/// conflict (and of `Ready=False` when every target failed).
pub const NAMESPACES_FAILED: &str = "NamespacesFailed";
/// Reason of `NamespacesSynced=False` when every namespace without the Secret keeps one of
/// that name that is not the credential's to take (the same reason as the namespace's entry in
/// `status.failures`).
pub const SECRET_CONFLICT: &str = "SecretConflict";

/// A time as status keeps it. `metav1.Time` goes over the wire in whole seconds, so the API
/// serves a status back without the sub-second part it was built with: a status built with
/// it would differ from the one read back at every reconcile, and be written again each time
/// (a token's `expiresAt` and `nextRefreshAt`, `verifiedAt`, a condition's transition).
/// Truncated, the status built equals the status written, and an unchanged outcome writes
/// nothing.
pub fn status_time(at: Timestamp) -> Time {
    Time(Timestamp::from_second(at.as_second()).unwrap_or(at))
}

/// What a sync established about the credential itself (its Secret's content).
#[derive(Debug, Clone)]
pub struct Synced {
    pub secret_name: String,
    pub registries: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub refresh_at: Option<Timestamp>,
    /// The digest of the config written, for sources with a token (see
    /// `CredentialStatus::token_digest`).
    pub token_digest: Option<String>,
    /// The fingerprint of the identity the token was issued to (see
    /// `CredentialStatus::token_identity`).
    pub token_identity: Option<String>,
    /// What the source corrected on the way (a trailing line break removed), for the message.
    pub notes: Vec<String>,
}

/// The next status of a credential, from the previous one and what the reconcile found:
/// `synced` when the source gave logins (with `refresh_failed` when those hold the still-valid
/// token a failed refresh was to replace), `error` when anything else failed. A failing
/// refresh leaves `Ready` True while the token in the Secret is still valid (only `Degraded`
/// turns True); any other failure makes `Ready` False with the error's reason.
pub fn credential_status(
    previous: Option<&CredentialStatus>,
    generation: Option<i64>,
    source: &CredentialSource,
    synced: Option<&Synced>,
    refresh_failed: Option<&Error>,
    error: Option<&Error>,
) -> CredentialStatus {
    let has_expiry = source.expires();
    let mut next = previous.cloned().unwrap_or_default();
    next.observed_generation = generation;
    next.source = Some(source.kind().into());
    if let Some(synced) = synced {
        next.secret_name = Some(synced.secret_name.clone());
        next.registries = synced.registries.clone();
        next.expires_at = synced.expires_at.map(status_time);
        next.next_refresh_at = synced.refresh_at.map(status_time);
        next.token_digest = synced.token_digest.clone();
        next.token_identity = synced.token_identity.clone();
    }
    let degraded = |failure: &Error, valid_until: Option<Timestamp>| {
        let mut message = failure.to_string();
        if let Some(at) = valid_until.filter(|t| *t > Timestamp::now()) {
            message.push_str(&format!("; the Secret keeps the current token, valid until {at}"));
        }
        condition(previous, DEGRADED, true, failure.reason(), message, generation)
    };
    // The logins are current, or hold the still-valid token of a failed refresh.
    let refresh = |synced: Option<&Synced>| match refresh_failed {
        Some(failure) => degraded(failure, synced.and_then(|s| s.expires_at)),
        None => condition(previous, DEGRADED, false, "Refreshed", "the token is current".into(), generation),
    };
    next.conditions = match (error, synced) {
        (None, synced) => {
            let message = synced.map_or_else(String::new, |s| {
                let mut message =
                    format!("Secret {} holds the credential for {}", s.secret_name, s.registries.join(", "));
                for note in &s.notes {
                    message.push_str("; ");
                    message.push_str(note);
                }
                message
            });
            let mut conditions = vec![condition(previous, READY, true, SYNCED, message, generation)];
            conditions.extend(has_expiry.then(|| refresh(synced)));
            conditions
        }
        // The logins are current; writing them somewhere failed.
        (Some(error), Some(synced)) => {
            let mut conditions = vec![condition(previous, READY, false, error.reason(), error.to_string(), generation)];
            conditions.extend(has_expiry.then(|| refresh(Some(synced))));
            conditions
        }
        (Some(error), None) => {
            let valid_until = previous.and_then(|s| s.expires_at.as_ref()).map(|t| t.0);
            let still_valid = valid_until.is_some_and(|t| t > Timestamp::now());
            let ready = match (still_valid, previous.and_then(|s| s.condition(READY))) {
                // The Secret keeps a token that still works for this very spec: pulls are
                // fine, refreshing is not. After a spec change the Secret holds the old
                // generation's credential, and Ready says so.
                (true, Some(ready)) if ready.status == "True" && ready.observed_generation == generation => {
                    ready.clone()
                }
                _ => {
                    let mut message = error.to_string();
                    if let (Some(at), Some(name)) = (valid_until, previous.and_then(|s| s.secret_name.as_ref())) {
                        message.push_str(&format!("; the token in Secret {name} expired at {at}"));
                    }
                    condition(previous, READY, false, error.reason(), message, generation)
                }
            };
            let mut conditions = vec![ready];
            conditions.extend(has_expiry.then(|| degraded(error, valid_until)));
            conditions
        }
    };
    next
}

/// A fan-out's `NamespacesSynced` condition, from the number of target namespaces and of
/// those without the Secret: `conflicts` keep a Secret of its name that is not the
/// credential's to take, `failed` failed otherwise.
pub fn namespaces_synced(
    previous: Option<&CredentialStatus>,
    generation: Option<i64>,
    secret_name: &str,
    targets: usize,
    conflicts: usize,
    failed: usize,
) -> Condition {
    let taken = |n: usize| {
        format!(
            "Secret {secret_name} is not this credential's to take in {n} of {targets} target namespaces (a tenant's \
             own, or an older credential's), and regcred leaves it alone there"
        )
    };
    let (truth, reason, message) = match (conflicts, failed) {
        (0, 0) if targets == 0 => (true, SYNCED, "no namespace is selected".to_string()),
        (0, 0) => (true, SYNCED, format!("all {targets} target namespaces hold Secret {secret_name}")),
        (conflicts, 0) => (false, SECRET_CONFLICT, format!("{} (status.failures names them)", taken(conflicts))),
        (conflicts, failed) => {
            let mut message = format!("{failed} of {targets} target namespaces did not get Secret {secret_name}");
            if conflicts > 0 {
                message.push_str(&format!("; {}", taken(conflicts)));
            }
            (false, NAMESPACES_FAILED, format!("{message} (status.failures names them)"))
        }
    };
    condition(previous, NAMESPACES_SYNCED, truth, reason, message, generation)
}

/// Puts a fan-out's `NamespacesSynced` condition into `next`, or keeps the previous one when
/// the reconcile did not get as far as the namespaces (`None`).
pub fn apply_namespaces_synced(
    next: &mut CredentialStatus,
    previous: Option<&CredentialStatus>,
    now: Option<Condition>,
) {
    next.conditions.retain(|c| c.type_ != NAMESPACES_SYNCED);
    next.conditions.extend(now.or_else(|| previous.and_then(|p| p.condition(NAMESPACES_SYNCED)).cloned()));
}

/// Builds a condition, keeping the previous transition time unless the status flips (so an
/// unchanged outcome yields an identical status and no write).
pub fn condition(
    previous: Option<&CredentialStatus>,
    type_: &str,
    truth: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if truth { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|s| s.condition(type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| status_time(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Puts the `Verified` condition and `verifiedAt` into `next`: from the latest check when
/// there is one, else as they were (a check is pending, or the controller restarted); gone
/// when verification is off.
pub fn apply_verification(
    next: &mut CredentialStatus,
    previous: Option<&CredentialStatus>,
    enabled: bool,
    result: Option<&Verification>,
    generation: Option<i64>,
) {
    next.conditions.retain(|c| c.type_ != VERIFIED);
    next.verified_at = None;
    if !enabled {
        return;
    }
    match result {
        Some(result) => {
            let message = result.message.clone();
            next.conditions.push(condition(
                previous,
                VERIFIED,
                result.verified(),
                result.reason.as_str(),
                message,
                generation,
            ));
            next.verified_at = Some(status_time(result.at));
        }
        None => {
            let kept = previous.and_then(|p| p.condition(VERIFIED)).cloned();
            next.verified_at = kept.as_ref().and_then(|_| previous.and_then(|p| p.verified_at.clone()));
            next.conditions.extend(kept);
        }
    }
}

/// Whether `Verified` turned False (or failed for another reason) in `next`.
pub fn verification_failed_anew(previous: Option<&CredentialStatus>, next: &CredentialStatus) -> bool {
    let key = |s: Option<&CredentialStatus>| {
        s.and_then(|s| s.condition(VERIFIED)).map(|c| (c.status.clone(), c.reason.clone()))
    };
    match key(Some(next)) {
        Some((status, _)) if status == "False" => key(previous) != key(Some(next)),
        _ => false,
    }
}

/// Whether any condition but `Verified` changed in anything but its timestamps and generation.
pub fn conditions_changed(previous: Option<&CredentialStatus>, next: &CredentialStatus) -> bool {
    let key = |s: Option<&CredentialStatus>| -> Vec<(String, String, String, String)> {
        s.map(|s| {
            s.conditions
                .iter()
                .filter(|c| c.type_ != VERIFIED)
                .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone()))
                .collect()
        })
        .unwrap_or_default()
    };
    key(previous) != key(Some(next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ecr() -> CredentialSource {
        serde_json::from_value(serde_json::json!({"ecr": {"region": "eu-west-1", "auth": {"ambient": {}}}})).unwrap()
    }

    fn ready_for(generation: i64) -> CredentialStatus {
        let synced = Synced {
            secret_name: "pull".into(),
            registries: vec!["r".into()],
            expires_at: Some(Timestamp::now() + std::time::Duration::from_secs(3600)),
            refresh_at: Some(Timestamp::now() + std::time::Duration::from_secs(600)),
            token_digest: None,
            token_identity: None,
            notes: Vec::new(),
        };
        credential_status(None, Some(generation), &ecr(), Some(&synced), None, None)
    }

    fn refresh_failed() -> Error {
        Error::Aws { operation: "ecr:GetAuthorizationToken", code: "Throttling".into(), message: "slow down".into() }
    }

    /// Item 3: `Ready` is True only while the Secret holds the current generation's credential.
    #[test]
    fn a_failed_write_after_a_good_fetch_is_not_ready() {
        let previous = ready_for(1);
        let synced = Synced {
            secret_name: "taken".into(),
            registries: vec!["r".into()],
            expires_at: previous.expires_at.as_ref().map(|t| t.0),
            refresh_at: None,
            token_digest: None,
            token_identity: None,
            notes: Vec::new(),
        };
        let conflict = Error::SecretConflict { namespace: "ns".into(), name: "taken".into() };
        let next = credential_status(Some(&previous), Some(2), &ecr(), Some(&synced), None, Some(&conflict));
        let ready = next.condition(READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "SecretConflict"));
        assert_eq!(next.condition(DEGRADED).unwrap().status, "False", "the refresh itself worked");
    }

    #[test]
    fn a_failed_refresh_keeps_ready_only_for_the_same_generation() {
        let previous = ready_for(1);
        let same = credential_status(Some(&previous), Some(1), &ecr(), None, None, Some(&refresh_failed()));
        assert_eq!(same.condition(READY).unwrap().status, "True");
        assert_eq!(same.condition(DEGRADED).unwrap().status, "True");
        let changed = credential_status(Some(&previous), Some(2), &ecr(), None, None, Some(&refresh_failed()));
        assert_eq!(changed.condition(READY).unwrap().status, "False", "the Secret holds the old spec's token");
    }

    /// Issue 20, item 8: the Secrets were written with the still-valid token of a failed
    /// refresh. `Ready` says they hold the credential (for this generation: the Secrets were
    /// written for it), `Degraded` why the token is not a new one and how long it lasts.
    #[test]
    fn secrets_written_with_the_token_of_a_failed_refresh_are_ready_and_degraded() {
        let previous = ready_for(1);
        let expires_at = previous.expires_at.as_ref().map(|t| t.0);
        let synced = Synced {
            secret_name: "pull".into(),
            registries: vec!["r".into()],
            expires_at,
            refresh_at: Some(Timestamp::now() - std::time::Duration::from_secs(5)),
            token_digest: None,
            token_identity: None,
            notes: Vec::new(),
        };
        for generation in [1, 2] {
            let next = credential_status(
                Some(&previous),
                Some(generation),
                &ecr(),
                Some(&synced),
                Some(&refresh_failed()),
                None,
            );
            let ready = next.condition(READY).unwrap();
            assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", SYNCED));
            let degraded = next.condition(DEGRADED).unwrap();
            assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "AwsRequestFailed"));
            let until = format!("keeps the current token, valid until {}", expires_at.unwrap());
            assert!(degraded.message.contains(&until), "{}", degraded.message);
        }
        let conflict = Error::SecretConflict { namespace: "ns".into(), name: "pull".into() };
        let both = credential_status(
            Some(&previous),
            Some(1),
            &ecr(),
            Some(&synced),
            Some(&refresh_failed()),
            Some(&conflict),
        );
        assert_eq!(both.condition(READY).unwrap().reason, "SecretConflict");
        assert_eq!(both.condition(DEGRADED).unwrap().reason, "AwsRequestFailed");
    }

    /// Issue 20, item 5: `NamespacesSynced` tells a fan-out's conflicts from its failures,
    /// with counts.
    #[test]
    fn namespaces_synced_tells_conflicts_from_failures() {
        let c = |targets, conflicts, failed| namespaces_synced(None, Some(1), "pull", targets, conflicts, failed);
        let shown = |c: Condition| (c.status, c.reason, c.message);
        let (status, reason, message) = shown(c(3, 0, 0));
        assert_eq!((status.as_str(), reason.as_str()), ("True", SYNCED));
        assert_eq!(message, "all 3 target namespaces hold Secret pull");
        assert_eq!(shown(c(0, 0, 0)).2, "no namespace is selected");
        let (status, reason, message) = shown(c(3, 1, 0));
        assert_eq!((status.as_str(), reason.as_str()), ("False", SECRET_CONFLICT));
        assert!(
            message.starts_with("Secret pull is not this credential's to take in 1 of 3 target namespaces"),
            "{message}"
        );
        let (status, reason, message) = shown(c(3, 1, 1));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "NamespacesFailed"));
        assert!(
            message.starts_with("1 of 3 target namespaces did not get Secret pull; ") && message.contains("in 1 of 3")
        );

        let mut next = CredentialStatus::default();
        let previous = CredentialStatus { conditions: vec![c(3, 1, 0)], ..Default::default() };
        apply_namespaces_synced(&mut next, Some(&previous), None);
        assert_eq!(next.condition(NAMESPACES_SYNCED), previous.condition(NAMESPACES_SYNCED), "kept on a failed fetch");
        apply_namespaces_synced(&mut next, Some(&previous), Some(c(3, 0, 0)));
        assert_eq!(next.conditions.len(), 1);
        assert_eq!(next.condition(NAMESPACES_SYNCED).unwrap().status, "True");
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let first = CredentialStatus {
            conditions: vec![condition(None, READY, false, "SourceSecretNotFound", "a".into(), Some(1))],
            ..Default::default()
        };
        let again = condition(Some(&first), READY, false, "SourceKeyMissing", "b".into(), Some(2));
        assert_eq!(again.last_transition_time, first.conditions[0].last_transition_time);
        let healed = condition(Some(&first), READY, true, SYNCED, "c".into(), Some(2));
        assert!(healed.last_transition_time.0 >= first.conditions[0].last_transition_time.0);
        assert_eq!(healed.status, "True");
    }

    #[test]
    fn only_status_reason_and_message_count_as_change() {
        let a = CredentialStatus {
            conditions: vec![condition(None, READY, true, SYNCED, "m".into(), Some(1))],
            ..Default::default()
        };
        let b = CredentialStatus {
            conditions: vec![condition(Some(&a), READY, true, SYNCED, "m".into(), Some(2))],
            ..Default::default()
        };
        assert!(!conditions_changed(Some(&a), &b));
        let c = CredentialStatus {
            conditions: vec![condition(Some(&a), READY, false, "X", "m".into(), Some(2))],
            ..Default::default()
        };
        assert!(conditions_changed(Some(&a), &c));
        assert!(conditions_changed(None, &a));
    }

    /// Issue 20, item 10: a status built from times with a sub-second part is the status the
    /// API serves back (whole seconds), so the next reconcile finds no change to write.
    #[test]
    fn a_status_survives_the_round_trip_through_the_api_unchanged() {
        use crate::verify::{Reason, Verification};
        let now = Timestamp::now();
        let sub_second = now.checked_add(k8s_openapi::jiff::SignedDuration::from_millis(1_234)).unwrap();
        assert_ne!(sub_second.subsec_nanosecond(), 0);
        let synced = Synced {
            secret_name: "pull".into(),
            registries: vec!["r".into()],
            expires_at: Some(sub_second + std::time::Duration::from_secs(3600)),
            refresh_at: Some(sub_second + std::time::Duration::from_secs(600)),
            token_digest: Some("d".into()),
            token_identity: Some("i".into()),
            notes: Vec::new(),
        };
        let mut built = credential_status(None, Some(1), &ecr(), Some(&synced), None, None);
        let check = Verification { reason: Reason::Verified, message: "r: accepted".into(), at: sub_second };
        apply_verification(&mut built, None, true, Some(&check), Some(1));
        let served: CredentialStatus = serde_json::from_value(serde_json::to_value(&built).unwrap()).unwrap();
        assert_eq!(served, built, "the API serves back what was built");
        // And the next reconcile, from the status served, builds it again unchanged.
        let mut again = credential_status(Some(&served), Some(1), &ecr(), Some(&synced), None, None);
        apply_verification(&mut again, Some(&served), true, Some(&check), Some(1));
        assert_eq!(again, served);
    }

    #[test]
    fn verified_comes_from_the_latest_check_stays_while_one_is_pending_and_goes_when_off() {
        use crate::verify::{Reason, Verification};
        let check = |reason| Verification { reason, message: "r: said so".into(), at: Timestamp::now() };
        let mut first = CredentialStatus::default();
        apply_verification(&mut first, None, true, None, Some(1));
        assert!(first.condition(VERIFIED).is_none() && first.verified_at.is_none(), "nothing before the first check");

        apply_verification(&mut first, None, true, Some(&check(Reason::Unauthorized)), Some(1));
        let verified = first.condition(VERIFIED).expect("Verified");
        assert_eq!((verified.status.as_str(), verified.reason.as_str()), ("False", "Unauthorized"));
        assert!(first.verified_at.is_some());
        assert!(verification_failed_anew(None, &first));
        assert!(!verification_failed_anew(Some(&first), &first), "the same failure is not news");

        // A reconcile whose check is still pending keeps what the last one said.
        let mut pending = CredentialStatus { conditions: vec![], ..Default::default() };
        apply_verification(&mut pending, Some(&first), true, None, Some(2));
        assert_eq!(pending.condition(VERIFIED), first.condition(VERIFIED));
        assert_eq!(pending.verified_at, first.verified_at);

        let mut fixed = first.clone();
        apply_verification(&mut fixed, Some(&first), true, Some(&check(Reason::Verified)), Some(2));
        assert_eq!(fixed.condition(VERIFIED).map(|c| c.status.as_str()), Some("True"));
        assert!(!verification_failed_anew(Some(&first), &fixed));
        let mut other_failure = fixed.clone();
        apply_verification(&mut other_failure, Some(&fixed), true, Some(&check(Reason::Unreachable)), Some(2));
        assert!(verification_failed_anew(Some(&fixed), &other_failure));

        let mut off = fixed.clone();
        apply_verification(&mut off, Some(&fixed), false, Some(&check(Reason::Verified)), Some(3));
        assert!(off.condition(VERIFIED).is_none() && off.verified_at.is_none());
        assert!(!conditions_changed(Some(&first), &fixed), "Verified alone is not a change of the sync's conditions");
    }
}
