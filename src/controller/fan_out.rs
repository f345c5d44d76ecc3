//! What one reconcile did across its target namespaces (`FanOut`), which the status, the
//! Events and the registry check are built from; and the tally a reconcile keeps as its
//! namespaces' writes come back.

use std::collections::BTreeMap;

use super::credential::{Credential, Scope};
use crate::{Error, plan::NamespaceStep, secret::Outcome, service_account::InLine, status::Synced};

/// One namespace's step, what writing its Secret gave, and how many old Secrets it retired.
pub(super) struct StepDone {
    pub(super) step: NamespaceStep,
    pub(super) written: Result<Outcome, Error>,
    pub(super) retired: Result<usize, Error>,
    /// The namespace's ServiceAccounts as the step left them, by name (none if it did not
    /// get to them).
    pub(super) accounts: BTreeMap<String, InLine>,
}

/// Writes and failures counted across a reconcile's namespaces.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) created: usize,
    pub(super) updated: usize,
    pub(super) removed: usize,
    /// (namespace, why), sorted by namespace once complete.
    pub(super) failures: Vec<(String, Error)>,
}

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
    /// The error of the credential itself, which makes `Ready` False: the namespace's own
    /// error for a credential with one target; for a fan-out, a failure in every target
    /// namespace (the credential cannot write anywhere: its RBAC, the apiserver) or a failed
    /// cleanup. A fan-out's failures in some of its targets are no error of the credential:
    /// anyone who can edit one namespace can make writes there fail (a Secret of that name
    /// that is not the credential's to take, a Secret quota filled), and one tenant must not
    /// make the credential fail for everyone. Those are reported per namespace
    /// (`NamespacesSynced`) and retried ([`FanOut::retry`]).
    pub(super) fn error<K: Credential>(&mut self, obj: &K) -> Option<Error> {
        match obj.parts().scope {
            Scope::Namespace(_) if !self.failures.is_empty() => Some(self.failures.remove(0).1),
            _ => {
                let (_, failed) = self.target_failures();
                let cleanup = self.failures.iter().filter(|(ns, _)| !self.targets.contains(ns)).count();
                match (failed, cleanup) {
                    (0, 0) => None,
                    (failed, _) if failed > 0 && failed == self.targets.len() => {
                        Some(Error::NamespacesFailed { failed, targets: self.targets.len() })
                    }
                    (_, 0) => None,
                    (_, namespaces) => Some(Error::CleanupFailed { namespaces }),
                }
            }
        }
    }

    /// Why a fan-out whose credential did not fail is retried with backoff: some target
    /// namespaces failed other than by a conflict (a conflict waits for its Secret's owner,
    /// whose changes trigger a reconcile).
    pub(super) fn retry(&self) -> Option<Error> {
        let (_, failed) = self.target_failures();
        (failed > 0).then(|| Error::NamespacesFailed { failed, targets: self.targets.len() })
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
pub(super) fn is_conflict(error: &Error) -> bool {
    matches!(error, Error::SecretConflict { .. })
}
