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
    /// The error a reconcile with failing namespaces reports: the namespace's own error for a
    /// credential with one target, a count for a fan-out. A fan-out's conflicts (a target
    /// namespace keeps a Secret of that name that is not the credential's to take) are no
    /// error of the credential: they are reported per namespace (`NamespacesSynced`), and one
    /// tenant's Secret does not make the credential fail for everyone.
    pub(super) fn error<K: Credential>(&mut self, obj: &K) -> Option<Error> {
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
pub(super) fn is_conflict(error: &Error) -> bool {
    matches!(error, Error::SecretConflict { .. })
}
