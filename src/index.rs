//! Which credentials an event concerns, in O(1): Secret (namespace/name), ServiceAccount and
//! IRSA ServiceAccount keys map to credential UIDs. Entries are written when a credential is
//! seen and dropped when it is deleted (the watch's delete hook), so the index never holds a
//! credential that is gone.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{PoisonError, RwLock},
};

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::{core::PartialObjectMeta, runtime::reflector::ObjectRef};

use crate::{
    crd::{ClusterRegistryCredential, NamespaceSelection, RegistryCredential},
    owned::controlling_credential,
    plan::{NamespaceMatcher, namespace_concerns},
    service_account::recorded_uids,
};

/// A thing whose events concern a credential.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// A Secret in one namespace (sources; a namespaced credential's target).
    Secret(String, String),
    /// A Secret of this name in any namespace (a cluster credential's targets).
    SecretName(String),
    /// A ServiceAccount in one namespace (patched, or the IRSA identity).
    Account(String, String),
    /// A ServiceAccount of this name in any namespace (a cluster credential's).
    AccountName(String),
}

/// The credential to reconcile.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    Namespaced(ObjectRef<RegistryCredential>),
    Cluster(ObjectRef<ClusterRegistryCredential>),
}

struct Entry {
    trigger: Trigger,
    keys: Vec<Key>,
    /// Cluster credentials: what selects namespaces, and the targets of the last reconcile.
    selection: Option<NamespaceSelection>,
    targets: BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<Key, HashSet<String>>,
    entries: HashMap<String, Entry>,
    /// Credential uid → the ServiceAccounts whose annotation records an entry it added, and
    /// the reverse, so a credential finds its entries without listing ServiceAccounts.
    recorded_in: HashMap<String, HashSet<(String, String)>>,
    records: HashMap<(String, String), Vec<String>>,
}

#[derive(Default)]
pub struct Index {
    inner: RwLock<Inner>,
}

impl Index {
    /// Records (or replaces) what a credential's events are.
    pub fn upsert(&self, uid: &str, trigger: Trigger, keys: Vec<Key>, selection: Option<NamespaceSelection>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let targets = inner.entries.get(uid).map(|e| e.targets.clone()).unwrap_or_default();
        unlink(&mut inner, uid);
        for key in &keys {
            inner.by_key.entry(key.clone()).or_default().insert(uid.to_string());
        }
        inner.entries.insert(uid.to_string(), Entry { trigger, keys, selection, targets });
    }

    /// Whether the credential is known (seen and not deleted).
    pub fn contains(&self, uid: &str) -> bool {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).entries.contains_key(uid)
    }

    /// Forgets a deleted credential.
    pub fn remove(&self, uid: &str) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        unlink(&mut inner, uid);
        inner.entries.remove(uid);
    }

    /// Remembers the namespaces a cluster credential targeted in its last reconcile, so that
    /// only Namespace events that change membership concern it.
    pub fn set_targets(&self, uid: &str, targets: &[String]) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = inner.entries.get_mut(uid) {
            entry.targets = targets.iter().cloned().collect();
        }
    }

    /// Credentials a Secret event concerns: those that read it or write a Secret of its name
    /// in a namespace they target, and the one its controller owner reference names (a label
    /// anyone can copy decides nothing).
    pub fn secret_event(&self, secret: &PartialObjectMeta<Secret>) -> Vec<Trigger> {
        let (Some(namespace), Some(name)) = (&secret.metadata.namespace, &secret.metadata.name) else {
            return Vec::new();
        };
        let owner = controlling_credential(&secret.metadata).map(str::to_string);
        // A Secret of a cluster credential's name matters only in a namespace it targets
        // (elsewhere, one of its own names it as controller owner).
        let targeting = self.targeting(&Key::SecretName(name.clone()), namespace);
        self.lookup([Key::Secret(namespace.clone(), name.clone())], owner.into_iter().chain(targeting))
    }

    /// Credentials a ServiceAccount event concerns: those that patch or use it (a cluster
    /// credential only in a namespace it targets), and those its annotation says added entries
    /// in a namespace they target (elsewhere an entry is only released, when the credential's
    /// Secret leaves that namespace or the credential goes: anyone can write the annotation).
    pub fn account_event(&self, account: &PartialObjectMeta<ServiceAccount>) -> Vec<Trigger> {
        let (Some(namespace), Some(name)) = (&account.metadata.namespace, &account.metadata.name) else {
            return Vec::new();
        };
        let recorded = account.metadata.annotations.as_ref().map(recorded_uids).unwrap_or_default();
        let recorded = self.target(recorded, namespace);
        let targeting = self.targeting(&Key::AccountName(name.clone()), namespace);
        self.lookup([Key::Account(namespace.clone(), name.clone())], recorded.into_iter().chain(targeting))
    }

    /// Those of the credentials `uids` that target `namespace`.
    fn target(&self, uids: Vec<String>, namespace: &str) -> Vec<String> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        uids.into_iter().filter(|uid| inner.entries.get(uid).is_some_and(|e| e.targets.contains(namespace))).collect()
    }

    /// The cluster credentials with `key` (a Secret or ServiceAccount name) that target
    /// `namespace`.
    fn targeting(&self, key: &Key, namespace: &str) -> Vec<String> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let with_key = inner.by_key.get(key).into_iter().flatten();
        with_key.filter(|uid| inner.entries.get(*uid).is_some_and(|e| e.targets.contains(namespace))).cloned().collect()
    }

    /// Keeps the record of which credentials added entries to a ServiceAccount (from its
    /// annotation) in step with a ServiceAccount event; `deleted` drops it.
    pub fn account_seen(&self, account: &PartialObjectMeta<ServiceAccount>, deleted: bool) {
        let (Some(namespace), Some(name)) = (&account.metadata.namespace, &account.metadata.name) else {
            return;
        };
        let key = (namespace.clone(), name.clone());
        let uids = match deleted {
            true => Vec::new(),
            false => account.metadata.annotations.as_ref().map(recorded_uids).unwrap_or_default(),
        };
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for uid in inner.records.remove(&key).unwrap_or_default() {
            if let Some(accounts) = inner.recorded_in.get_mut(&uid) {
                accounts.remove(&key);
                if accounts.is_empty() {
                    inner.recorded_in.remove(&uid);
                }
            }
        }
        for uid in &uids {
            inner.recorded_in.entry(uid.clone()).or_default().insert(key.clone());
        }
        if !uids.is_empty() {
            inner.records.insert(key, uids);
        }
    }

    /// The ServiceAccounts (namespace, name) whose annotation records an entry `uid` added.
    pub fn accounts_recording(&self, uid: &str) -> Vec<(String, String)> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut found: Vec<_> = inner.recorded_in.get(uid).into_iter().flatten().cloned().collect();
        found.sort();
        found
    }

    /// Cluster credentials for which this namespace started or stopped being a target.
    pub fn namespace_event(&self, namespace: &PartialObjectMeta<Namespace>) -> Vec<Trigger> {
        let name = namespace.metadata.name.as_deref().unwrap_or_default();
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        inner
            .entries
            .values()
            .filter(|entry| {
                let Some(selection) = &entry.selection else { return false };
                // An invalid selector is reported by the reconcile; no event can fix it.
                NamespaceMatcher::new(selection)
                    .is_ok_and(|m| namespace_concerns(&m, namespace, entry.targets.contains(name)))
            })
            .map(|entry| entry.trigger.clone())
            .collect()
    }

    fn lookup(&self, keys: impl IntoIterator<Item = Key>, uids: impl IntoIterator<Item = String>) -> Vec<Trigger> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut found: BTreeSet<&str> = BTreeSet::new();
        for key in keys {
            found.extend(inner.by_key.get(&key).into_iter().flatten().map(String::as_str));
        }
        let uids: Vec<String> = uids.into_iter().collect();
        found.extend(uids.iter().map(String::as_str));
        found.into_iter().filter_map(|uid| inner.entries.get(uid)).map(|e| e.trigger.clone()).collect()
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).by_key.len()
    }
}

fn unlink(inner: &mut Inner, uid: &str) {
    let Some(entry) = inner.entries.get(uid) else { return };
    for key in entry.keys.clone() {
        if let Some(uids) = inner.by_key.get_mut(&key) {
            uids.remove(uid);
            if uids.is_empty() {
                inner.by_key.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::api::ObjectMeta;

    use super::*;

    /// A Secret whose controller owner reference names the credential `owner`, or that only
    /// carries the uid label of `labelled` (anyone can copy a label).
    fn secret_of(
        namespace: &str,
        name: &str,
        owner: Option<&str>,
        labelled: Option<&str>,
    ) -> PartialObjectMeta<Secret> {
        let owner_references = owner.map(|uid| {
            vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "regcred.dev/v1alpha1".into(),
                kind: "RegistryCredential".into(),
                name: "a".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        let label = crate::secret::CREDENTIAL_UID_LABEL.to_string();
        PartialObjectMeta {
            metadata: ObjectMeta {
                namespace: Some(namespace.into()),
                name: Some(name.into()),
                labels: labelled.map(|u| BTreeMap::from([(label, u.to_string())])),
                owner_references,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn secret(namespace: &str, name: &str, owner: Option<&str>) -> PartialObjectMeta<Secret> {
        secret_of(namespace, name, owner, None)
    }

    fn namespaced(name: &str) -> Trigger {
        Trigger::Namespaced(ObjectRef::new(name).within("team"))
    }

    #[test]
    fn secret_events_reach_readers_and_writers_only() {
        let index = Index::default();
        let keys = vec![Key::Secret("team".into(), "pull".into()), Key::Secret("team".into(), "src".into())];
        index.upsert("u1", namespaced("a"), keys, None);
        index.upsert("u2", Trigger::Cluster(ObjectRef::new("c")), vec![Key::SecretName("pull".into())], None);
        assert_eq!(index.secret_event(&secret("team", "src", None)), [namespaced("a")]);
        assert_eq!(index.secret_event(&secret("team", "pull", None)), [namespaced("a")], "not a target of c yet");
        index.set_targets("u2", &["team".into(), "other".into()]);
        assert_eq!(index.secret_event(&secret("team", "pull", None)).len(), 2);
        assert_eq!(index.secret_event(&secret("other", "pull", None)), [Trigger::Cluster(ObjectRef::new("c"))]);
        assert!(index.secret_event(&secret("elsewhere", "pull", None)).is_empty(), "a namespace c does not target");
        assert!(index.secret_event(&secret("other", "unrelated", None)).is_empty());
        assert_eq!(index.secret_event(&secret("other", "x", Some("u1"))), [namespaced("a")]);
        assert!(index.secret_event(&secret("other", "x", Some("unknown"))).is_empty());
        // Issue 20, item 4: a copied uid label reaches nothing.
        assert!(index.secret_event(&secret_of("other", "x", None, Some("u1"))).is_empty());
    }

    /// Deletion drops every key of the credential: no stale triggers, no growth.
    #[test]
    fn a_removed_credential_leaves_nothing_behind() {
        let index = Index::default();
        index.upsert("u1", namespaced("a"), vec![Key::Secret("team".into(), "pull".into())], None);
        index.upsert("u1", namespaced("a"), vec![Key::Secret("team".into(), "renamed".into())], None);
        assert_eq!(index.keys(), 1, "an update replaces the old keys");
        index.remove("u1");
        assert_eq!(index.keys(), 0);
        assert!(index.secret_event(&secret("team", "renamed", Some("u1"))).is_empty());
    }

    /// Item 13: the IRSA ServiceAccount's events reach the credential that uses it.
    #[test]
    fn account_events_reach_patchers_irsa_users_and_recorded_credentials() {
        let index = Index::default();
        index.upsert("u1", namespaced("irsa"), vec![Key::Account("team".into(), "puller".into())], None);
        index.upsert("u2", Trigger::Cluster(ObjectRef::new("c")), vec![Key::AccountName("default".into())], None);
        let account = |ns: &str, name: &str, recorded: Option<&str>| PartialObjectMeta::<ServiceAccount> {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                annotations: recorded
                    .map(|r| BTreeMap::from([(crate::service_account::ADDED_ANNOTATION.to_string(), r.to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(index.account_event(&account("team", "puller", None)), [namespaced("irsa")]);
        // Issue 20, item 4: a cluster credential's ServiceAccount name only where it targets.
        assert!(index.account_event(&account("any", "default", None)).is_empty(), "not a target of c");
        index.set_targets("u2", &["any".into()]);
        assert_eq!(index.account_event(&account("any", "default", None)), [Trigger::Cluster(ObjectRef::new("c"))]);
        assert!(index.account_event(&account("team", "other", None)).is_empty());
        // An entry's record only where the credential targets: anyone can write it.
        assert!(index.account_event(&account("x", "other", Some("pull=u1"))).is_empty(), "x is not u1's target");
        index.set_targets("u1", &["team".into()]);
        assert_eq!(index.account_event(&account("team", "other", Some("pull=u1"))), [namespaced("irsa")]);
    }

    #[test]
    fn recorded_entries_follow_the_annotation_and_deletion() {
        let index = Index::default();
        let account = |recorded: &str| PartialObjectMeta::<ServiceAccount> {
            metadata: ObjectMeta {
                namespace: Some("team".into()),
                name: Some("default".into()),
                annotations: Some(BTreeMap::from([(
                    crate::service_account::ADDED_ANNOTATION.to_string(),
                    recorded.to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        index.account_seen(&account("pull=u1,other=u2"), false);
        assert_eq!(index.accounts_recording("u1"), [("team".to_string(), "default".to_string())]);
        index.account_seen(&account("other=u2"), false);
        assert!(index.accounts_recording("u1").is_empty());
        index.account_seen(&account("other=u2"), true);
        assert!(index.accounts_recording("u2").is_empty());
        assert!(index.inner.read().unwrap().records.is_empty());
    }

    /// Item 12: a Namespace event reaches only the cluster credentials whose targets it changes.
    #[test]
    fn namespace_events_reach_only_credentials_whose_targets_change() {
        let index = Index::default();
        let selection = NamespaceSelection { names: vec!["a".into()], ..Default::default() };
        index.upsert("u1", Trigger::Cluster(ObjectRef::new("c1")), vec![], Some(selection));
        index.upsert("u2", Trigger::Cluster(ObjectRef::new("c2")), vec![], Some(NamespaceSelection::default()));
        let ns = |name: &str| PartialObjectMeta::<Namespace> {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            ..Default::default()
        };
        assert_eq!(index.namespace_event(&ns("b")), [Trigger::Cluster(ObjectRef::new("c2"))]);
        index.set_targets("u2", &["b".into()]);
        assert!(index.namespace_event(&ns("b")).is_empty(), "already a target");
        assert_eq!(index.namespace_event(&ns("a")).len(), 2);
    }
}
