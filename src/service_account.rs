//! ServiceAccount patching: regcred adds its Secret to `imagePullSecrets` of the named
//! ServiceAccounts (so pods pull without naming it) and later removes exactly the entries it
//! added, never one that someone else put there.
//!
//! `imagePullSecrets` is an atomic list for server-side apply, so an apply would replace
//! everyone's entries. Instead regcred sends the whole new list in a merge patch that carries
//! the resourceVersion it was computed from: if anyone changed the ServiceAccount meanwhile,
//! the apiserver answers 409 Conflict and regcred recomputes from a fresh read.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{LocalObjectReference, ServiceAccount};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use serde_json::json;

use crate::{Error, secret::FIELD_MANAGER};

/// Annotation listing (comma-separated) the `imagePullSecrets` entries regcred added, so it
/// removes those and only those.
pub const ADDED_ANNOTATION: &str = "regcred.dev/added-image-pull-secrets";

/// Attempts at a patch that keeps meeting concurrent changes.
const ATTEMPTS: usize = 5;

/// What one ServiceAccount should look like, as far as regcred is concerned.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    pull_secrets: Vec<LocalObjectReference>,
    added: BTreeSet<String>,
}

/// Makes `secret` present in (`wanted`) or absent from the ServiceAccount, returning whether
/// it wrote. Absent means only the entry regcred added is removed.
pub async fn set_pull_secret(
    api: &Api<ServiceAccount>,
    account: &ServiceAccount,
    secret: &str,
    wanted: bool,
) -> Result<bool, Error> {
    let mut current = account.clone();
    for _ in 0..ATTEMPTS {
        let Some(plan) = plan(&current, secret, wanted) else {
            return Ok(false);
        };
        let annotation = (!plan.added.is_empty()).then(|| plan.added.iter().cloned().collect::<Vec<_>>().join(","));
        let patch = json!({
            "metadata": {
                "resourceVersion": current.metadata.resource_version,
                "annotations": {ADDED_ANNOTATION: annotation},
            },
            "imagePullSecrets": plan.pull_secrets,
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        match api.patch(&current.name_any(), &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => match api.get_opt(&current.name_any()).await? {
                Some(fresh) => current = fresh,
                None => return Ok(false),
            },
            // Deleted meanwhile: nothing to add to or remove from.
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(false),
            Err(error) => return Err(error.into()),
        }
    }
    Err(Error::ServiceAccountContended { namespace: account.namespace().unwrap_or_default(), name: account.name_any() })
}

/// Finalizer on a credential that has (or had) `serviceAccounts`: its entries are removed
/// before the credential goes.
pub const FINALIZER: &str = "regcred.dev/service-accounts";

/// Brings one namespace's ServiceAccounts in line for one Secret: present in those named in
/// `wanted`, and removed (where regcred added it) from all others. Returns the writes made.
pub async fn sync_namespace(
    api: &Api<ServiceAccount>,
    accounts: &[ServiceAccount],
    secret: &str,
    wanted: &[String],
) -> Result<usize, Error> {
    let mut writes = 0;
    for account in accounts {
        let want = wanted.contains(&account.name_any());
        if want || added_by_regcred(account, secret) {
            writes += usize::from(set_pull_secret(api, account, secret, want).await?);
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

/// Whether regcred added `secret` to this ServiceAccount (and so may remove it).
pub fn added_by_regcred(account: &ServiceAccount, secret: &str) -> bool {
    added(account).contains(secret)
}

fn added(account: &ServiceAccount) -> BTreeSet<String> {
    account
        .annotations()
        .get(ADDED_ANNOTATION)
        .map(|v| v.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
        .unwrap_or_default()
}

/// The change that puts the ServiceAccount in the wanted state, or `None` if it is there.
/// Entries keep their order; an entry is appended at the end, and only regcred's is removed.
fn plan(account: &ServiceAccount, secret: &str, wanted: bool) -> Option<Plan> {
    let mut pull_secrets = account.image_pull_secrets.clone().unwrap_or_default();
    let mut added = added(account);
    let present = pull_secrets.iter().any(|r| r.name == secret);
    if wanted {
        if present {
            return None;
        }
        pull_secrets.push(LocalObjectReference { name: secret.into() });
        added.insert(secret.into());
    } else {
        if !added.remove(secret) {
            return None;
        }
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

    #[test]
    fn adding_appends_and_records() {
        let plan = plan(&account(&["theirs", "other"], None), "pull", true).unwrap();
        assert_eq!(names(&plan), ["theirs", "other", "pull"]);
        assert_eq!(plan.added, BTreeSet::from(["pull".to_string()]));
    }

    #[test]
    fn an_entry_someone_else_added_is_neither_added_again_nor_removed() {
        let theirs = account(&["pull"], None);
        assert_eq!(plan(&theirs, "pull", true), None);
        assert_eq!(plan(&theirs, "pull", false), None);
    }

    #[test]
    fn removing_takes_only_regcreds_entry() {
        let plan = plan(&account(&["a", "pull", "b", "c"], Some("other,pull")), "pull", false).unwrap();
        assert_eq!(names(&plan), ["a", "b", "c"]);
        assert_eq!(plan.added, BTreeSet::from(["other".to_string()]));
    }

    #[test]
    fn a_recorded_entry_that_is_already_there_is_not_duplicated() {
        assert_eq!(plan(&account(&["pull"], Some("pull")), "pull", true), None);
    }
}
