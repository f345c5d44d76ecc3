//! The Secret regcred writes: what it should look like, and writing it without ever touching
//! a Secret that belongs to someone else.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference},
};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::{
    Error,
    crd::SecretTemplate,
    dockerconfig::{DOCKER_CONFIG_KEY, DOCKER_CONFIG_TYPE},
};

/// The field manager of every write regcred makes.
pub const FIELD_MANAGER: &str = "regcred";
/// Label on every Secret regcred writes; the controller watches nothing else it writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "regcred";

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

/// Makes the live Secret match `desired`, writing only when something differs.
///
/// A missing Secret is created with POST rather than apply: if someone else creates one of
/// the same name in the meantime the apiserver answers AlreadyExists instead of merging
/// into theirs. The POST carries only what regcred never drops (name, owner, its label,
/// type, data); template labels and annotations follow in an apply, so they belong to the
/// apply's field set and a later apply can remove them again.
/// An existing Secret is only changed when its controller owner is the desired owner, and
/// the apply carries the resourceVersion that was checked, so an owner change between the
/// check and the write makes the write fail instead of taking it over.
pub async fn ensure_secret(api: &Api<Secret>, desired: &Secret) -> Result<SecretChange, Error> {
    let name = desired.metadata.name.as_deref().ok_or(Error::MissingObjectField("metadata.name"))?;
    let owner_uid = desired
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.first())
        .map(|o| o.uid.as_str())
        .ok_or(Error::MissingObjectField("metadata.ownerReferences"))?;
    let Some(existing) = api.get_opt(name).await? else {
        let mut skeleton = desired.clone();
        skeleton.metadata.labels = Some(BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())]));
        skeleton.metadata.annotations = None;
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let created = api.create(&params, &skeleton).await?;
        if !is_up_to_date(&created, desired) {
            apply(api, name, desired, created.metadata.resource_version).await?;
        }
        return Ok(SecretChange::Created);
    };
    if !is_controlled_by(&existing, owner_uid) {
        return Err(Error::SecretConflict {
            namespace: existing.metadata.namespace.unwrap_or_default(),
            name: name.into(),
        });
    }
    if is_up_to_date(&existing, desired) {
        return Ok(SecretChange::Unchanged);
    }
    apply(api, name, desired, existing.metadata.resource_version).await?;
    Ok(SecretChange::Updated)
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
