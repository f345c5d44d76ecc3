//! Status conditions: computed from a reconcile's outcome, written only when they change.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use crate::crd::CredentialStatus;

/// The condition that says whether the Secret holds the current credential.
pub const READY: &str = "Ready";
/// Reason of a Ready=True condition.
pub const SYNCED: &str = "Synced";
/// The condition that says a refresh is failing (sources with expiring tokens).
pub const DEGRADED: &str = "Degraded";

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
        .unwrap_or_else(|| Time(Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether any condition changed in anything but its timestamps and generation.
pub fn conditions_changed(previous: Option<&CredentialStatus>, next: &CredentialStatus) -> bool {
    let key = |s: Option<&CredentialStatus>| -> Vec<(String, String, String, String)> {
        s.map(|s| {
            s.conditions
                .iter()
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
}
