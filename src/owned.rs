//! The Secrets each credential controls, kept from the Secret metadata watch: for every Secret
//! whose controller owner reference is a regcred credential, its namespace, name and
//! resourceVersion, by that credential's uid. A reconcile finds its Secrets here instead of
//! listing them: no list per reconcile, and nothing found by a label (which anyone who can
//! read one of its Secrets can copy onto their own). Each entry is a few short strings,
//! whatever the Secret's size, and goes when the Secret does (or a relist no longer has it).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, PoisonError, RwLock},
};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{core::PartialObjectMeta, runtime::watcher};

use crate::state::Version;

/// The API group of the credential kinds, as owner references spell it.
const GROUP_PREFIX: &str = "regcred.dev/";

/// A Secret a credential controls, as the watch last showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedSecret {
    pub namespace: String,
    pub name: String,
    pub resource_version: String,
}

/// `namespace/name` (a namespace has no `/`): one allocation, shared by both maps.
type Key = Arc<str>;

/// Who controls a Secret, and its resourceVersion.
struct Owner {
    /// Shared by every Secret of the credential.
    uid: Arc<str>,
    version: Version,
}

/// A 100,000-Secret cluster keeps 100,000 of these: one allocation (the key) each, the
/// owner's uid shared, the resourceVersion inline.
#[derive(Default)]
struct Inner {
    owner_of: HashMap<Key, Owner>,
    /// Credential uid → the keys of the Secrets it controls.
    by_owner: HashMap<Arc<str>, HashSet<Key>>,
    /// During a relist: the Secrets it has shown so far.
    relisted: Option<HashSet<Key>>,
}

#[derive(Default)]
pub struct OwnedSecrets {
    inner: RwLock<Inner>,
}

/// The uid of the regcred credential a Secret's controller owner reference names, if any.
pub fn controlling_credential(meta: &ObjectMeta) -> Option<&str> {
    let owner = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true))?;
    let kind = matches!(owner.kind.as_str(), "RegistryCredential" | "ClusterRegistryCredential");
    (kind && owner.api_version.starts_with(GROUP_PREFIX)).then_some(owner.uid.as_str())
}

impl OwnedSecrets {
    /// Keeps the record in step with one event of the Secret metadata watch.
    pub fn observe(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Init => inner.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(secret) => {
                if let Some(key) = inner.apply(&secret.metadata)
                    && let Some(relisted) = inner.relisted.as_mut()
                {
                    relisted.insert(key);
                }
            }
            watcher::Event::Apply(secret) => {
                inner.apply(&secret.metadata);
            }
            watcher::Event::Delete(secret) => {
                if let Some(key) = key_of(&secret.metadata) {
                    inner.forget(&key);
                }
            }
            // Secrets gone during a watch gap were never seen as deletions.
            watcher::Event::InitDone => {
                let relisted = inner.relisted.take().unwrap_or_default();
                let gone: Vec<Key> = inner.owner_of.keys().filter(|k| !relisted.contains(*k)).cloned().collect();
                for key in gone {
                    inner.forget(&key);
                }
            }
        }
    }

    /// The Secrets `uid` controls, sorted by namespace and name.
    pub fn of(&self, uid: &str) -> Vec<OwnedSecret> {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut found: Vec<OwnedSecret> = inner
            .by_owner
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|key| {
                let (namespace, name) = key.split_once('/')?;
                let owner = inner.owner_of.get(key)?;
                let resource_version = owner.version.to_string();
                Some(OwnedSecret { namespace: namespace.into(), name: name.into(), resource_version })
            })
            .collect();
        found.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        found
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.read().unwrap_or_else(PoisonError::into_inner).owner_of.len()
    }
}

impl Inner {
    /// Records a Secret's owner (or that it has none); returns its key if it has one.
    fn apply(&mut self, meta: &ObjectMeta) -> Option<Key> {
        let key = key_of(meta)?;
        let version = Version::of(meta.resource_version.as_deref().unwrap_or_default());
        let Some(uid) = controlling_credential(meta) else {
            self.forget(&key);
            return None;
        };
        // Its owner reference may have changed (a takeover): recorded under the new one only.
        match self.owner_of.get_key_value(key.as_ref()) {
            Some((known, owner)) if *owner.uid == *uid => {
                let known = known.clone();
                if let Some(owner) = self.owner_of.get_mut(&known) {
                    owner.version = version;
                }
                return Some(known);
            }
            Some(_) => self.forget(&key),
            None => {}
        }
        let uid: Arc<str> = match self.by_owner.get_key_value(uid) {
            Some((shared, _)) => shared.clone(),
            None => Arc::from(uid),
        };
        self.by_owner.entry(uid.clone()).or_default().insert(key.clone());
        self.owner_of.insert(key.clone(), Owner { uid, version });
        Some(key)
    }

    fn forget(&mut self, key: &str) {
        let Some(owner) = self.owner_of.remove(key) else { return };
        if let Some(secrets) = self.by_owner.get_mut(&owner.uid) {
            secrets.remove(key);
            if secrets.is_empty() {
                self.by_owner.remove(&owner.uid);
            }
        }
    }
}

fn key_of(meta: &ObjectMeta) -> Option<Key> {
    Some(Arc::from(format!("{}/{}", meta.namespace.as_deref()?, meta.name.as_deref()?)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn secret(ns: &str, name: &str, rv: &str, owner: Option<(&str, &str)>) -> PartialObjectMeta<Secret> {
        let owner_references = owner.map(|(api_version, uid)| {
            vec![OwnerReference {
                api_version: api_version.into(),
                kind: "ClusterRegistryCredential".into(),
                name: "c".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        PartialObjectMeta {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                owner_references,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    const OWNER: (&str, &str) = ("regcred.dev/v1alpha1", "u1");

    #[test]
    fn secrets_are_found_by_their_controller_owner_not_by_a_label() {
        let owned = OwnedSecrets::default();
        owned.observe(&watcher::Event::Apply(secret("a", "pull", "1", Some(OWNER))));
        owned.observe(&watcher::Event::Apply(secret("b", "pull", "2", Some(OWNER))));
        owned.observe(&watcher::Event::Apply(secret("b", "other", "3", Some(("apps/v1", "u1")))));
        owned.observe(&watcher::Event::Apply(secret("c", "plain", "4", None)));
        let found: Vec<_> = owned.of("u1").into_iter().map(|s| (s.namespace, s.resource_version)).collect();
        assert_eq!(found, [("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]);
        owned.observe(&watcher::Event::Apply(secret("a", "pull", "5", Some(OWNER))));
        assert_eq!(owned.of("u1")[0].resource_version, "5", "the latest resourceVersion");
    }

    #[test]
    fn entries_go_with_the_secret_its_owner_reference_or_a_relist() {
        let owned = OwnedSecrets::default();
        owned.observe(&watcher::Event::Apply(secret("a", "pull", "1", Some(OWNER))));
        owned.observe(&watcher::Event::Apply(secret("b", "pull", "2", Some(OWNER))));
        owned.observe(&watcher::Event::Apply(secret("c", "pull", "3", Some(OWNER))));
        owned.observe(&watcher::Event::Delete(secret("a", "pull", "1", Some(OWNER))));
        owned.observe(&watcher::Event::Apply(secret("b", "pull", "4", Some(("regcred.dev/v1alpha1", "u2")))));
        assert_eq!(owned.of("u1").len(), 1);
        assert_eq!(owned.of("u2").len(), 1, "taken over by u2");
        // A relist that no longer shows c: its deletion happened during a watch gap.
        owned.observe(&watcher::Event::Init);
        owned.observe(&watcher::Event::InitApply(secret("b", "pull", "4", Some(("regcred.dev/v1alpha1", "u2")))));
        owned.observe(&watcher::Event::InitDone);
        assert!(owned.of("u1").is_empty());
        owned.observe(&watcher::Event::Apply(secret("b", "pull", "5", None)));
        assert_eq!(owned.len(), 0, "nothing kept once no credential controls it");
    }
}
