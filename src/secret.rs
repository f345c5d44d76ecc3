//! The Secret regcred writes: what it should look like, and writing it without ever touching
//! a Secret that belongs to someone else.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::{
    Error,
    crd::{ClusterRegistryCredential, GROUP, RegistryCredential, SecretTemplate},
    dockerconfig::{DOCKER_CONFIG_KEY, DOCKER_CONFIG_TYPE},
};

/// The field manager of every write regcred makes.
pub const FIELD_MANAGER: &str = "regcred";
/// Label on every Secret regcred writes; the controller watches nothing else it writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "regcred";
/// Label with the uid of the ClusterRegistryCredential a Secret was written for, so one list
/// finds all of its Secrets.
pub const CREDENTIAL_UID_LABEL: &str = "regcred.dev/credential-uid";

/// The Secret that should exist. `owner` is `None` only for offline rendering.
pub fn desired_secret(
    name: &str,
    namespace: &str,
    template: &SecretTemplate,
    owner: Option<OwnerReference>,
    docker_config: Vec<u8>,
) -> Secret {
    let mut labels = template.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            annotations: (!template.annotations.is_empty()).then(|| template.annotations.clone()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some(DOCKER_CONFIG_TYPE.into()),
        data: Some(BTreeMap::from([(DOCKER_CONFIG_KEY.into(), ByteString(docker_config))])),
        ..Default::default()
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretChange {
    Created,
    Updated,
    Unchanged,
}

/// The credential a Secret is written for, with what decides between two credentials that
/// want the same Secret: the older one (then the smaller uid) keeps it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub owner: OwnerReference,
    pub created: Option<Timestamp>,
}

/// Makes the live Secret match `desired`, writing only when something differs.
///
/// `existing` is the live Secret when the caller already read it (a list), `None` to read it
/// here. A missing Secret is created with POST rather than apply: if someone else creates one
/// of the same name in the meantime the apiserver answers AlreadyExists instead of merging
/// into theirs. The POST carries only what regcred never drops (name, owner, its labels,
/// type, data); template labels and annotations follow in an apply, so they belong to the
/// apply's field set and a later apply can remove them again.
/// An existing Secret is only changed when its controller owner is the claiming credential,
/// or another regcred credential that is newer (see [`Claim`]); the write carries the
/// resourceVersion that was checked, so an owner change between the check and the write
/// makes the write fail instead of taking it over.
pub async fn ensure_secret(
    client: &Client,
    desired: &Secret,
    claim: &Claim,
    existing: Option<Option<Secret>>,
) -> Result<SecretChange, Error> {
    let name = desired.metadata.name.as_deref().ok_or(Error::MissingObjectField("metadata.name"))?;
    let namespace = desired.metadata.namespace.as_deref().ok_or(Error::MissingObjectField("metadata.namespace"))?;
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let existing = match existing {
        Some(known) => known,
        None => api.get_opt(name).await?,
    };
    let Some(existing) = existing else {
        let mut skeleton = desired.clone();
        skeleton.metadata.labels = Some(own_labels(desired));
        skeleton.metadata.annotations = None;
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        return match api.create(&params, &skeleton).await {
            Ok(created) => {
                if !is_up_to_date(&created, desired) {
                    apply(&api, name, desired, created.metadata.resource_version).await?;
                }
                Ok(SecretChange::Created)
            }
            // Someone was quicker (or the caller's list was stale): decide on what is there.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = api.get_opt(name).await?;
                Box::pin(ensure_secret(client, desired, claim, Some(existing))).await
            }
            Err(error) => Err(error.into()),
        };
    };
    if !is_controlled_by(&existing, &claim.owner.uid) {
        if !yields_to(client, &existing, claim).await? {
            return Err(Error::SecretConflict {
                namespace: existing.metadata.namespace.unwrap_or_default(),
                name: name.into(),
            });
        }
        let taken = take_over(&api, &existing, &claim.owner).await?;
        apply(&api, name, desired, taken.metadata.resource_version).await?;
        return Ok(SecretChange::Updated);
    }
    if is_up_to_date(&existing, desired) {
        return Ok(SecretChange::Unchanged);
    }
    apply(&api, name, desired, existing.metadata.resource_version).await?;
    Ok(SecretChange::Updated)
}

/// The labels regcred sets on every Secret it writes (never the template's).
fn own_labels(desired: &Secret) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())]);
    if let Some(uid) = desired.metadata.labels.as_ref().and_then(|l| l.get(CREDENTIAL_UID_LABEL)) {
        labels.insert(CREDENTIAL_UID_LABEL.into(), uid.clone());
    }
    labels
}

/// Whether a Secret controlled by someone else goes to `claim`: only when regcred wrote it for
/// another regcred credential that is newer than the claimant, or that no longer exists.
async fn yields_to(client: &Client, existing: &Secret, claim: &Claim) -> Result<bool, Error> {
    let labels = existing.metadata.labels.as_ref();
    if labels.and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str) != Some(MANAGED_BY_VALUE) {
        return Ok(false);
    }
    let Some(holder) = existing.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true)) else {
        return Ok(false);
    };
    if !holder.api_version.starts_with(&format!("{GROUP}/")) {
        return Ok(false);
    }
    let meta = match holder.kind.as_str() {
        "RegistryCredential" => {
            let namespace = existing.metadata.namespace.as_deref().unwrap_or_default();
            Api::<RegistryCredential>::namespaced(client.clone(), namespace)
                .get_metadata_opt(&holder.name)
                .await?
                .map(|o| o.metadata)
        }
        "ClusterRegistryCredential" => Api::<ClusterRegistryCredential>::all(client.clone())
            .get_metadata_opt(&holder.name)
            .await?
            .map(|o| o.metadata),
        _ => return Ok(false),
    };
    let Some(meta) = meta.filter(|m| m.uid.as_deref() == Some(holder.uid.as_str())) else {
        // Its credential is gone (the garbage collector would delete it): regcred's to reuse.
        return Ok(true);
    };
    let holder_key = (meta.creation_timestamp.map(|t| t.0), holder.uid.as_str());
    Ok((claim.created, claim.owner.uid.as_str()) < holder_key)
}

/// Replaces the Secret's owner references with the claimant's, valid only against the
/// resourceVersion that was checked; returns the Secret as written.
async fn take_over(api: &Api<Secret>, existing: &Secret, owner: &OwnerReference) -> Result<Secret, Error> {
    let name = existing.metadata.name.as_deref().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": existing.metadata.resource_version,
        "ownerReferences": [owner],
    }});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    Ok(api.patch(name, &params, &Patch::Merge(&patch)).await?)
}

/// Server-side apply of `desired`, valid only against the given resourceVersion.
async fn apply(api: &Api<Secret>, name: &str, desired: &Secret, resource_version: Option<String>) -> Result<(), Error> {
    let mut patch = desired.clone();
    patch.metadata.resource_version = resource_version;
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Deletes a Secret this owner wrote earlier under another name, if it is still there and
/// still theirs (the precondition makes the delete fail rather than remove a replacement).
pub async fn delete_if_controlled(api: &Api<Secret>, name: &str, owner_uid: &str) -> Result<bool, Error> {
    let Some(existing) = api.get_opt(name).await? else {
        return Ok(false);
    };
    if !is_controlled_by(&existing, owner_uid) {
        return Ok(false);
    }
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: existing.metadata.uid,
            resource_version: existing.metadata.resource_version,
        }),
        ..Default::default()
    };
    api.delete(name, &params).await?;
    Ok(true)
}

/// Whether the Secret's controller owner reference points at `owner_uid`.
pub fn is_controlled_by(secret: &Secret, owner_uid: &str) -> bool {
    secret.metadata.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == owner_uid)
}

/// Whether applying `desired` would change anything regcred owns in `existing`.
fn is_up_to_date(existing: &Secret, desired: &Secret) -> bool {
    let ours = owned_metadata_keys(existing.metadata.managed_fields.as_deref().unwrap_or_default());
    existing.type_ == desired.type_
        && existing.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY))
            == desired.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY))
        && map_matches(&existing.metadata.labels, &desired.metadata.labels, &ours.labels)
        && map_matches(&existing.metadata.annotations, &desired.metadata.annotations, &ours.annotations)
}

/// `desired` is present in `live`, and nothing regcred set earlier is left over.
fn map_matches(
    live: &Option<BTreeMap<String, String>>,
    desired: &Option<BTreeMap<String, String>>,
    previously_ours: &[String],
) -> bool {
    let empty = BTreeMap::new();
    let live = live.as_ref().unwrap_or(&empty);
    let desired = desired.as_ref().unwrap_or(&empty);
    desired.iter().all(|(k, v)| live.get(k) == Some(v))
        && previously_ours.iter().all(|k| desired.contains_key(k) || !live.contains_key(k))
}

#[derive(Default)]
struct OwnedKeys {
    labels: Vec<String>,
    annotations: Vec<String>,
}

/// Label and annotation keys that regcred's field manager owns, read from managedFields.
fn owned_metadata_keys(entries: &[ManagedFieldsEntry]) -> OwnedKeys {
    let mut keys = OwnedKeys::default();
    for entry in entries.iter().filter(|e| e.manager.as_deref() == Some(FIELD_MANAGER)) {
        let Some(metadata) = entry.fields_v1.as_ref().and_then(|f| f.0.get("f:metadata")) else {
            continue;
        };
        for (field, out) in [("f:labels", &mut keys.labels), ("f:annotations", &mut keys.annotations)] {
            if let Some(map) = metadata.get(field).and_then(|v| v.as_object()) {
                out.extend(map.keys().filter_map(|k| k.strip_prefix("f:")).map(String::from));
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;

    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference { controller: Some(true), uid: "uid-1".into(), ..Default::default() }
    }

    fn desired(labels: &[(&str, &str)]) -> Secret {
        let template = SecretTemplate {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        desired_secret("pull", "ns", &template, Some(owner()), b"{}".to_vec())
    }

    #[test]
    fn same_content_is_up_to_date_even_with_foreign_labels() {
        let mut live = desired(&[("team", "a")]);
        live.metadata.labels.as_mut().unwrap().insert("added-by-someone".into(), "x".into());
        assert!(is_up_to_date(&live, &desired(&[("team", "a")])));
    }

    #[test]
    fn changed_data_or_label_needs_a_write() {
        let live = desired(&[("team", "a")]);
        let mut other = desired(&[("team", "a")]);
        other.data = Some(BTreeMap::from([(DOCKER_CONFIG_KEY.into(), ByteString(b"{\"x\":1}".to_vec()))]));
        assert!(!is_up_to_date(&live, &other));
        assert!(!is_up_to_date(&live, &desired(&[("team", "b")])));
    }

    #[test]
    fn a_label_regcred_set_and_no_longer_wants_needs_a_write() {
        let mut live = desired(&[("team", "a")]);
        live.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            fields_v1: Some(FieldsV1(
                serde_json::json!({"f:metadata": {"f:labels": {"f:team": {}, "f:app.kubernetes.io/managed-by": {}}}}),
            )),
            ..Default::default()
        }]);
        assert!(!is_up_to_date(&live, &desired(&[])));
        assert!(is_up_to_date(&live, &desired(&[("team", "a")])));
    }

    #[test]
    fn ownership_needs_the_controller_flag_and_uid() {
        let mut s = desired(&[]);
        assert!(is_controlled_by(&s, "uid-1"));
        assert!(!is_controlled_by(&s, "uid-2"));
        s.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert!(!is_controlled_by(&s, "uid-1"));
    }
}
