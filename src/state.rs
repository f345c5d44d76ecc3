//! What the controller remembers about each credential between reconciles, keyed by the
//! credential's UID and dropped when the credential is deleted (a recreated credential of the
//! same name starts afresh).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::{crd::ClusterCredentialStatus, metrics::ObjectLabels};

/// A resourceVersion, kept without an allocation when it is a plain number (etcd's are):
/// 100,000 Secrets are remembered by theirs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    Number(u64),
    Text(Box<str>),
}

impl Version {
    pub fn of(resource_version: &str) -> Version {
        match resource_version.parse::<u64>() {
            // Only where it reads back the same ("007" stays text).
            Ok(n) if n.to_string() == resource_version => Version::Number(n),
            _ => Version::Text(resource_version.into()),
        }
    }

    /// Whether this is `resource_version`.
    pub fn is(&self, resource_version: &str) -> bool {
        match self {
            Version::Number(n) => {
                resource_version.parse::<u64>().is_ok_and(|v| v == *n && v.to_string() == resource_version)
            }
            Version::Text(text) => **text == *resource_version,
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::Number(n) => write!(f, "{n}"),
            Version::Text(text) => f.write_str(text),
        }
    }
}

/// What one reconcile wrote (or found) in every namespace: the hash of the data and the
/// `secret::metadata_digest` of the desired metadata. Shared by all the namespaces it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub data_hash: String,
    pub meta_digest: String,
}

/// A Secret seen holding what regcred wants: at this resourceVersion, this content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenCurrent {
    pub resource_version: Version,
    pub content: Arc<Content>,
}

/// Per-credential memory.
#[derive(Default)]
pub struct ObjectState {
    /// The status last written, and when: the cache lags behind the controller's own writes,
    /// and comparing with it would write the same status again (and repeat its Events).
    pub written: Option<(ClusterCredentialStatus, Instant)>,
    /// Consecutive failed reconciles, for exponential backoff.
    pub failures: u32,
    /// Namespaces where a Secret of the wanted name belongs to someone else.
    pub contested: BTreeSet<String>,
    /// Namespace → its Secret of the name `verified_name`, seen current: one whose
    /// resourceVersion is unchanged needs no read to know its content.
    pub verified: HashMap<Box<str>, SeenCurrent>,
    /// The Secret name `verified` is about (a rename forgets them all).
    pub verified_name: String,
    /// (namespace, name) → ServiceAccounts read and left as this credential wants them:
    /// unchanged since, they need no read.
    pub accounts_verified: HashMap<(String, String), crate::service_account::InLine>,
    /// The namespaces it targeted in its last reconcile.
    pub targets: BTreeSet<String>,
    /// The metric series published for it, removed with it.
    pub labels: Option<ObjectLabels>,
    /// Its registry checks (`spec.verify`).
    pub verification: crate::verify::VerifyState,
    /// Held by a reconcile while it runs, and by the release of a credential that left the
    /// controller's `--selector`, so the release starts only once a reconcile in flight has
    /// made its last write.
    pub busy: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Longer than a watch event takes to arrive.
const FRESH: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct States {
    by_uid: Mutex<HashMap<String, ObjectState>>,
}

impl States {
    /// Runs `f` on the credential's state, creating it if needed.
    pub fn with<T>(&self, uid: &str, f: impl FnOnce(&mut ObjectState) -> T) -> T {
        let mut map = self.by_uid.lock().unwrap_or_else(PoisonError::into_inner);
        f(map.entry(uid.to_string()).or_default())
    }

    /// The status written for the credential within the last few seconds, if any.
    pub fn recent_status(&self, uid: &str) -> Option<ClusterCredentialStatus> {
        self.with(uid, |s| s.written.as_ref().filter(|(_, at)| at.elapsed() < FRESH).map(|(st, _)| st.clone()))
    }

    /// Forgets a deleted credential; returns what it had, so its metric series can go too.
    pub fn remove(&self, uid: &str) -> Option<ObjectState> {
        self.by_uid.lock().unwrap_or_else(PoisonError::into_inner).remove(uid)
    }

    /// Forgets every credential not in `live` (after a relist, when deletions during a watch
    /// gap were never seen as events).
    pub fn retain(&self, live: &BTreeSet<String>) -> Vec<ObjectState> {
        let mut map = self.by_uid.lock().unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<String> = map.keys().filter(|uid| !live.contains(*uid)).cloned().collect();
        gone.into_iter().filter_map(|uid| map.remove(&uid)).collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_uid.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 9: a recreated credential (new UID, same name) does not see the old one's status.
    #[test]
    fn state_is_per_uid_and_goes_with_the_object() {
        let states = States::default();
        states.with("old", |s| {
            s.failures = 7;
            s.written = Some((ClusterCredentialStatus::default(), Instant::now()));
        });
        assert!(states.recent_status("old").is_some());
        assert!(states.recent_status("new").is_none());
        assert_eq!(states.with("new", |s| s.failures), 0);
        assert_eq!(states.remove("old").map(|s| s.failures), Some(7));
        assert_eq!(states.with("old", |s| s.failures), 0, "a recreated credential starts afresh");
        let gone = states.retain(&BTreeSet::from(["new".to_string()]));
        assert_eq!(gone.len(), 1);
        assert_eq!(states.len(), 1);
    }

    /// resourceVersions are opaque: a number is kept as one only where it reads back the same.
    #[test]
    fn versions_compare_as_the_strings_they_came_from() {
        for rv in ["12345", "0", "007", "", "abc", "18446744073709551616"] {
            let version = Version::of(rv);
            assert!(version.is(rv), "{rv}");
            assert_eq!(version.to_string(), rv);
        }
        assert_eq!(Version::of("12345"), Version::Number(12345));
        assert!(!Version::of("12345").is("012345") && !Version::of("7").is("07") && !Version::of("07").is("7"));
        assert!(!Version::of("1").is("2"));
    }
}
