//! ServiceAccount patching: regcred adds its Secret to `imagePullSecrets` of the named
//! ServiceAccounts (so pods pull without naming it) and later removes exactly the entries it
//! added, never one that someone else put there.
//!
//! `imagePullSecrets` is an atomic list for server-side apply, so an apply would replace
//! everyone's entries. Instead regcred sends the whole new list in a merge patch that carries
//! the resourceVersion it was computed from: if anyone changed the ServiceAccount meanwhile,
//! the apiserver answers 409 Conflict and regcred recomputes from a fresh read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, ServiceAccount};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

use crate::{Error, secret::FIELD_MANAGER};

/// Annotation listing (comma-separated) the `imagePullSecrets` entries regcred added, each as
/// `secret=credential-uid`, so it removes those and only those, and a credential finds its
/// entries without its Secrets (a bare `secret` is an entry from before uids were recorded).
pub const ADDED_ANNOTATION: &str = "regcred.dev/added-image-pull-secrets";

/// Attempts at a patch that keeps meeting concurrent changes.
const ATTEMPTS: usize = 5;

/// What one ServiceAccount should look like, as far as regcred is concerned.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    pull_secrets: Vec<LocalObjectReference>,
    added: Added,
}

/// The entries regcred added: Secret name → the uid of the credential that added it.
type Added = BTreeMap<String, Option<String>>;

/// A ServiceAccount as a pass left it: as the credential wants it at `resource_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InLine {
    pub resource_version: String,
    /// The resourceVersion regcred patched it from in that pass, if it did: a watch store that
    /// still shows this one has not yet seen regcred's own patch.
    pub patched_from: Option<String>,
}

impl InLine {
    /// Whether a ServiceAccount seen at `resource_version` needs no read: it is the version
    /// left in line, or the one regcred's own patch replaced.
    pub fn covers(&self, resource_version: Option<&String>) -> bool {
        resource_version.is_some_and(|rv| *rv == self.resource_version || Some(rv) == self.patched_from.as_ref())
    }

    fn read(account: &ServiceAccount) -> Option<InLine> {
        let resource_version = account.metadata.resource_version.clone()?;
        Some(InLine { resource_version, patched_from: None })
    }
}

/// Makes `secret` present in (`wanted`) or absent from the ServiceAccount for the credential
/// `uid`. Absent means only the entry this credential added is removed. Returns the patch it
/// made, if any: the resourceVersion it left and the one it patched.
pub async fn set_pull_secret(
    api: &Api<ServiceAccount>,
    account: &ServiceAccount,
    secret: &str,
    wanted: bool,
    uid: &str,
) -> Result<Option<InLine>, Error> {
    let mut current = account.clone();
    for _ in 0..ATTEMPTS {
        let Some(plan) = plan(&current, secret, wanted, uid) else {
            return Ok(None);
        };
        let annotation = (!plan.added.is_empty()).then(|| format_added(&plan.added));
        let patch = json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "annotations": {ADDED_ANNOTATION: annotation},
            },
            "imagePullSecrets": plan.pull_secrets,
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match api.patch(&current.name_any(), &params, &Patch::Merge(&patch)).await {
            Ok(patched) => {
                let patched_from = current.metadata.resource_version;
                return Ok(InLine::read(&patched).map(|left| InLine { patched_from, ..left }));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => match api.get_opt(&current.name_any()).await? {
                Some(fresh) => current = fresh,
                None => return Ok(None),
            },
            // Deleted meanwhile: nothing to add to or remove from.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(None),
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::ServiceAccountContended { namespace: account.namespace().unwrap_or_default(), name: account.name_any() })
}

/// Finalizer on a credential that has (or had) `serviceAccounts`: its entries are removed
/// before the credential goes.
pub const FINALIZER: &str = "regcred.dev/service-accounts";

/// Brings one namespace's ServiceAccounts in line for one Secret of the credential `uid`:
/// present in those named in `wanted`, and removed (where this credential added it) from all
/// others. Returns each ServiceAccount as it left it, by name.
pub async fn sync_namespace(
    api: &Api<ServiceAccount>,
    accounts: &[ServiceAccount],
    secret: &str,
    wanted: &[String],
    uid: &str,
) -> Result<BTreeMap<String, InLine>, Error> {
    let mut left = BTreeMap::new();
    for account in accounts {
        let want = wanted.contains(&account.name_any());
        let patched = match want || added_by(account, secret, uid) {
            true => set_pull_secret(api, account, secret, want, uid).await?,
            false => None,
        };
        if let Some(in_line) = patched.or_else(|| InLine::read(account)) {
            left.insert(account.name_any(), in_line);
        }
    }
    Ok(left)
}

/// Removes every entry the credential `uid` added to these ServiceAccounts (read from their
/// annotation, so it works whether or not the credential's Secrets still exist).
pub async fn release(api: &Api<ServiceAccount>, accounts: &[ServiceAccount], uid: &str) -> Result<usize, Error> {
    let mut writes = 0;
    for account in accounts {
        for secret in secrets_added_by(account.annotations(), uid) {
            writes += usize::from(set_pull_secret(api, account, &secret, false, uid).await?.is_some());
        }
    }
    Ok(writes)
}

/// Adds or removes [`FINALIZER`], keeping every other finalizer (a merge patch of the whole
/// list, valid only against the resourceVersion it was computed from; retried on conflict).
pub async fn set_finalizer<K>(api: &Api<K>, object: &K, present: bool) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.name_any();
    let mut current = object.meta().clone();
    for _ in 0..ATTEMPTS {
        let mut finalizers = current.finalizers.clone().unwrap_or_default();
        if finalizers.iter().any(|f| f == FINALIZER) == present {
            return Ok(());
        }
        if present {
            finalizers.push(FINALIZER.into());
        } else {
            finalizers.retain(|f| f != FINALIZER);
        }
        let patch = json!({"metadata": {"resourceVersion": current.resource_version, "finalizers": finalizers}});
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match api.patch(&name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => match api.get_opt(&name).await? {
                Some(fresh) => current = fresh.meta().clone(),
                None => return Ok(()),
            },
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::ObjectContended { name })
}

/// Whether the object carries [`FINALIZER`].
pub fn has_finalizer(meta: &kube::api::ObjectMeta) -> bool {
    meta.finalizers.iter().flatten().any(|f| f == FINALIZER)
}

/// Whether the credential `uid` added `secret` to this ServiceAccount (and so may remove it).
/// An entry recorded without a uid (before uids were recorded) counts for any credential.
pub fn added_by(account: &ServiceAccount, secret: &str, uid: &str) -> bool {
    added(account.annotations()).get(secret).is_some_and(|by| by.as_deref().is_none_or(|by| by == uid))
}

/// The Secrets the credential `uid` added to a ServiceAccount, from its annotations.
pub fn secrets_added_by(annotations: &BTreeMap<String, String>, uid: &str) -> Vec<String> {
    added(annotations).into_iter().filter(|(_, by)| by.as_deref() == Some(uid)).map(|(s, _)| s).collect()
}

/// Whether a ServiceAccount's annotations say it holds exactly `secret` for the credential
/// `uid` and nothing else of it (no entry under another name, no unrecorded owner).
pub fn holds_exactly(annotations: &BTreeMap<String, String>, secret: &str, uid: &str) -> bool {
    let added = added(annotations);
    added.get(secret).is_some_and(|by| by.as_deref() == Some(uid))
        && added.iter().all(|(name, by)| name == secret || by.as_deref() != Some(uid))
}

/// The credential uids recorded in a ServiceAccount's annotation (for the index).
pub fn recorded_uids(annotations: &BTreeMap<String, String>) -> Vec<String> {
    added(annotations).into_values().flatten().collect()
}

fn added(annotations: &BTreeMap<String, String>) -> Added {
    let Some(value) = annotations.get(ADDED_ANNOTATION) else {
        return Added::new();
    };
    value
        .split(',')
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once('=') {
            Some((secret, uid)) => (secret.to_string(), Some(uid.to_string())),
            None => (entry.to_string(), None),
        })
        .collect()
}

fn format_added(added: &Added) -> String {
    let entries: Vec<String> = added
        .iter()
        .map(|(secret, uid)| match uid {
            Some(uid) => format!("{secret}={uid}"),
            None => secret.clone(),
        })
        .collect();
    entries.join(",")
}

/// The change that puts the ServiceAccount in the wanted state, or `None` if it is there.
/// Entries keep their order; an entry is appended at the end, and only regcred's is removed.
fn plan(account: &ServiceAccount, secret: &str, wanted: bool, uid: &str) -> Option<Plan> {
    let mut pull_secrets = account.image_pull_secrets.clone().unwrap_or_default();
    let mut added = added(account.annotations());
    let present = pull_secrets.iter().any(|r| r.name == secret);
    if wanted {
        match (present, added.get(secret)) {
            // Recorded for this credential already.
            (true, Some(Some(by))) if by == uid => return None,
            // Present without a record (the annotation was deleted or edited), ours from before
            // uids were recorded, or from a credential that held the Secret before: the entry
            // names the Secret this credential controls here (it is called only where that
            // Secret is written), so it is this credential's. Record its uid, so the entry is
            // released with it instead of stranded.
            (true, _) => {}
            (false, _) => pull_secrets.push(LocalObjectReference { name: secret.into() }),
        }
        added.insert(secret.into(), Some(uid.into()));
    } else {
        if !added_by(account, secret, uid) {
            return None;
        }
        added.remove(secret);
        // The last occurrence: regcred appended it, so any earlier one is someone else's.
        if let Some(index) = pull_secrets.iter().rposition(|r| r.name == secret) {
            pull_secrets.remove(index);
        }
    }
    Some(Plan { pull_secrets, added })
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn a_store_behind_regcreds_own_patch_needs_no_read() {
        let patched = InLine { resource_version: "12".into(), patched_from: Some("10".into()) };
        let rv = |v: &str| Some(v.to_string());
        assert!(patched.covers(rv("12").as_ref()), "the version regcred left");
        assert!(patched.covers(rv("10").as_ref()), "the store has not seen regcred's patch yet");
        assert!(!patched.covers(rv("13").as_ref()), "changed since: read it");
        assert!(!patched.covers(None));
        let read = InLine { resource_version: "10".into(), patched_from: None };
        assert!(read.covers(rv("10").as_ref()) && !read.covers(rv("12").as_ref()));
    }

    fn account(entries: &[&str], added: Option<&str>) -> ServiceAccount {
        ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                annotations: added.map(|a| [(ADDED_ANNOTATION.to_string(), a.to_string())].into()),
                ..Default::default()
            },
            image_pull_secrets: Some(entries.iter().map(|e| LocalObjectReference { name: e.to_string() }).collect()),
            ..Default::default()
        }
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.pull_secrets.iter().map(|r| r.name.as_str()).collect()
    }

    fn recorded(entries: &[(&str, Option<&str>)]) -> Added {
        entries.iter().map(|(s, u)| (s.to_string(), u.map(String::from))).collect()
    }

    #[test]
    fn adding_appends_and_records_the_credential_uid() {
        let plan = plan(&account(&["theirs", "other"], None), "pull", true, "u1").unwrap();
        assert_eq!(names(&plan), ["theirs", "other", "pull"]);
        assert_eq!(plan.added, recorded(&[("pull", Some("u1"))]));
        assert_eq!(format_added(&plan.added), "pull=u1");
    }

    #[test]
    fn entries_of_other_names_are_never_touched() {
        let theirs = account(&["a", "b"], None);
        assert_eq!(names(&plan(&theirs, "pull", true, "u1").unwrap()), ["a", "b", "pull"]);
        assert_eq!(plan(&theirs, "pull", false, "u1"), None);
    }

    /// Issue 20, item 11g: an unrecorded entry named like the credential's Secret, where it is
    /// wanted, is recorded for the credential (not added twice), so a deleted annotation
    /// cannot strand it; where it is not wanted, an unrecorded entry is left alone.
    #[test]
    fn an_unrecorded_entry_of_the_secrets_name_is_recorded_where_wanted() {
        let unrecorded = account(&["theirs", "pull"], None);
        let adopted = plan(&unrecorded, "pull", true, "u1").unwrap();
        assert_eq!(names(&adopted), ["theirs", "pull"]);
        assert_eq!(adopted.added, recorded(&[("pull", Some("u1"))]));
        assert_eq!(plan(&unrecorded, "pull", false, "u1"), None, "not wanted, not recorded: not ours to remove");
        // Another credential's record is kept apart from this one's.
        let edited = account(&["pull", "other"], Some("other=u2"));
        let adopted = plan(&edited, "pull", true, "u1").unwrap();
        assert_eq!(adopted.added, recorded(&[("other", Some("u2")), ("pull", Some("u1"))]));
    }

    #[test]
    fn removing_takes_only_this_credentials_entry() {
        let plan = plan(&account(&["a", "pull", "b", "c"], Some("other=u2,pull=u1")), "pull", false, "u1").unwrap();
        assert_eq!(names(&plan), ["a", "b", "c"]);
        assert_eq!(plan.added, recorded(&[("other", Some("u2"))]));
    }

    #[test]
    fn another_credentials_entry_is_not_removed() {
        assert_eq!(plan(&account(&["pull"], Some("pull=u2")), "pull", false, "u1"), None);
    }

    #[test]
    fn a_recorded_entry_that_is_already_there_is_not_duplicated() {
        assert_eq!(plan(&account(&["pull"], Some("pull=u1")), "pull", true, "u1"), None);
    }

    /// Entries recorded before uids were: removable by name, and upgraded when re-added.
    #[test]
    fn legacy_entries_without_a_uid_are_upgraded_and_removable() {
        let legacy = account(&["pull"], Some("pull"));
        let upgraded = plan(&legacy, "pull", true, "u1").unwrap();
        assert_eq!(names(&upgraded), ["pull"]);
        assert_eq!(upgraded.added, recorded(&[("pull", Some("u1"))]));
        assert!(plan(&legacy, "pull", false, "u1").is_some());
    }

    /// Item 7: the release is driven by the annotation, not by the credential's Secrets.
    #[test]
    fn the_annotation_tells_which_entries_a_credential_added() {
        let account = account(&["a", "b", "c"], Some("a=u1,b=u2,c=u1"));
        assert_eq!(secrets_added_by(account.annotations(), "u1"), ["a", "c"]);
        assert!(!holds_exactly(account.annotations(), "a", "u1"), "c is recorded for u1 too");
        assert!(holds_exactly(account.annotations(), "b", "u2"));
        assert!(!holds_exactly(account.annotations(), "a", "u2"));
        assert_eq!(recorded_uids(account.annotations()), ["u1", "u2", "u1"]);
    }
}
