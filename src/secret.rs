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
use secrecy::{ExposeSecret, SecretSlice};

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
/// Label with the uid of the credential a Secret was written for, so one list finds all of its
/// Secrets.
pub const CREDENTIAL_UID_LABEL: &str = "regcred.dev/credential-uid";

/// The Secret that should exist, its `.dockerconfigjson` kept where `Debug` does not show it
/// until [`DesiredSecret::to_secret`] builds the object to send.
#[derive(Clone, Debug)]
pub struct DesiredSecret {
    pub metadata: ObjectMeta,
    docker_config: SecretSlice<u8>,
}

impl DesiredSecret {
    /// The Secret as sent (or printed by `regcred render`): its data is plain bytes again, so
    /// build it for the request and let it go with the request.
    pub fn to_secret(&self) -> Secret {
        let config = ByteString(self.docker_config.expose_secret().to_vec());
        Secret {
            metadata: self.metadata.clone(),
            type_: Some(DOCKER_CONFIG_TYPE.into()),
            data: Some(BTreeMap::from([(DOCKER_CONFIG_KEY.into(), config)])),
            ..Default::default()
        }
    }
}

/// The Secret that should exist. `owner` is `None` only for offline rendering; with an owner,
/// the Secret carries its uid as a label too, so one list finds all of its Secrets (the label
/// is only an index: regcred acts on a Secret only when the owner reference says it is its).
pub fn desired_secret(
    name: &str,
    namespace: &str,
    template: &SecretTemplate,
    owner: Option<OwnerReference>,
    docker_config: SecretSlice<u8>,
) -> DesiredSecret {
    let mut labels = template.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    if let Some(owner) = &owner {
        labels.insert(CREDENTIAL_UID_LABEL.into(), owner.uid.clone());
    }
    let annotations = template.annotations.clone();
    DesiredSecret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        docker_config,
    }
}

/// A live Secret as read: its metadata, type and pull config, the latter taken out of the
/// Secret at once, as it holds credentials (those regcred wrote, or someone else's).
#[derive(Debug)]
pub struct ReadSecret {
    pub metadata: ObjectMeta,
    type_: Option<String>,
    /// `immutable: true`: its data can never be written again.
    immutable: bool,
    docker_config: Option<SecretSlice<u8>>,
}

impl ReadSecret {
    pub fn docker_config(&self) -> Option<&SecretSlice<u8>> {
        self.docker_config.as_ref()
    }
}

impl From<Secret> for ReadSecret {
    fn from(secret: Secret) -> Self {
        let docker_config = secret.data.and_then(|mut data| data.remove(DOCKER_CONFIG_KEY)).map(|b| b.0.into());
        let immutable = secret.immutable == Some(true);
        ReadSecret { metadata: secret.metadata, type_: secret.type_, immutable, docker_config }
    }
}

/// A short digest of a pull config (`None`: the Secret has none), remembered per
/// resourceVersion so an unchanged Secret is recognised from its metadata alone.
pub fn config_hash(config: Option<&[u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    match config {
        Some(bytes) => hasher.update(bytes),
        None => hasher.update(b"\0absent"),
    }
    hasher.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// A short digest of what regcred sets in a Secret's metadata (labels, annotations, controller
/// owner), so a Secret seen current for it is known current while both stay the same.
pub fn metadata_digest(desired: &ObjectMeta) -> String {
    let controller = desired.owner_references.iter().flatten().find(|o| o.controller == Some(true)).map(|o| &o.uid);
    // No map and an empty one are the same metadata.
    let empty = BTreeMap::new();
    let labels = desired.labels.as_ref().unwrap_or(&empty);
    let annotations = desired.annotations.as_ref().unwrap_or(&empty);
    let shape = serde_json::json!([labels, annotations, controller]);
    config_hash(Some(shape.to_string().as_bytes()))
}

/// [`metadata_digest`] of what regcred's field manager owns on a live Secret
/// ([`kept_for_matching`]): the desired metadata's digest exactly when the live metadata
/// matches it ([`metadata_matches`], taking a key someone else set to the same value as not
/// regcred's: one apply makes it regcred's).
pub fn owned_metadata_digest(live: &ObjectMeta) -> String {
    metadata_digest(&kept_for_matching(live))
}

/// [`config_hash`] of a live Secret's `.dockerconfigjson`.
pub fn data_hash(secret: &Secret) -> String {
    config_hash(secret.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY)).map(|b| b.0.as_slice()))
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

/// What a write left behind: what changed, and the Secret's resourceVersion afterwards (so
/// the next reconcile recognises it as current from its metadata alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub change: SecretChange,
    pub resource_version: Option<String>,
}

/// Attempts at a write that keeps meeting concurrent changes before it is reported.
const ATTEMPTS: usize = 4;

/// Makes the live Secret match `desired`, writing only when something differs.
///
/// `existing` is the live Secret when the caller already knows it: `Some(None)` when it knows
/// there is none (a create is tried at once), `None` to read it here. A missing Secret is
/// created with POST rather than apply: if someone else creates one of the same name in the
/// meantime the apiserver answers AlreadyExists instead of merging into theirs. The POST
/// carries only what regcred never drops (name, owner, its labels, type, data); template
/// labels and annotations follow in an apply, so they belong to the apply's field set and a
/// later apply can remove them again.
/// An existing Secret is only changed when its controller owner is the claiming credential,
/// or another regcred credential that is newer (see [`Claim`]); the write carries the
/// resourceVersion that was checked, so a change between the check and the write makes the
/// write fail; regcred then reads again and decides afresh (a concurrent edit is not a failure).
pub async fn ensure_secret(
    client: &Client,
    desired: &DesiredSecret,
    claim: &Claim,
    mut existing: Option<Option<Secret>>,
) -> Result<Outcome, Error> {
    let name = desired.metadata.name.as_deref().ok_or(Error::MissingObjectField("metadata.name"))?;
    let namespace = desired.metadata.namespace.as_deref().ok_or(Error::MissingObjectField("metadata.namespace"))?;
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let mut last_conflict = None;
    for _ in 0..ATTEMPTS {
        let known = match existing.take() {
            Some(known) => known.map(ReadSecret::from),
            None => api.get_opt(name).await?.map(ReadSecret::from),
        };
        match write_once(client, &api, name, desired, claim, known).await {
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => last_conflict = Some(status),
            other => return other,
        }
    }
    Err(last_conflict
        .map_or(Error::MissingObjectField("metadata.resourceVersion"), |status| Error::Kube(kube::Error::Api(status))))
}

/// One decision and write against a known state; a 409 means the state moved on.
async fn write_once(
    client: &Client,
    api: &Api<Secret>,
    name: &str,
    desired: &DesiredSecret,
    claim: &Claim,
    existing: Option<ReadSecret>,
) -> Result<Outcome, Error> {
    let Some(existing) = existing else {
        let mut skeleton = desired.to_secret();
        skeleton.metadata.labels = Some(own_labels(desired));
        skeleton.metadata.annotations = None;
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let created = ReadSecret::from(api.create(&params, &skeleton).await?);
        let resource_version = match is_up_to_date(&created, desired) {
            true => created.metadata.resource_version,
            false => apply(api, name, desired, created.metadata.resource_version).await?,
        };
        return Ok(Outcome { change: SecretChange::Created, resource_version });
    };
    if !is_controlled_by(&existing.metadata, &claim.owner.uid) {
        let resource_version = match taking(client, &existing, claim).await? {
            Taking::Never => {
                return Err(Error::SecretConflict {
                    namespace: existing.metadata.namespace.unwrap_or_default(),
                    name: name.into(),
                });
            }
            Taking::TakeOver => {
                let taken = take_over(api, &existing.metadata, &claim.owner).await?;
                apply(api, name, desired, taken).await?
            }
            // One write, valid only against what was checked: the owner reference, the data,
            // regcred's labels and annotations. It fails whole or not at all.
            Taking::Adopt => apply(api, name, desired, existing.metadata.resource_version.clone()).await?,
        };
        return Ok(Outcome { change: SecretChange::Updated, resource_version });
    }
    if is_up_to_date(&existing, desired) {
        return Ok(Outcome { change: SecretChange::Unchanged, resource_version: existing.metadata.resource_version });
    }
    let resource_version = apply(api, name, desired, existing.metadata.resource_version).await?;
    Ok(Outcome { change: SecretChange::Updated, resource_version })
}

/// The labels regcred sets on every Secret it writes (never the template's).
fn own_labels(desired: &DesiredSecret) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())]);
    if let Some(uid) = desired.metadata.labels.as_ref().and_then(|l| l.get(CREDENTIAL_UID_LABEL)) {
        labels.insert(CREDENTIAL_UID_LABEL.into(), uid.clone());
    }
    labels
}

/// How a Secret the claimant does not control may become its own.
#[derive(Debug, PartialEq, Eq)]
enum Taking {
    /// It is not regcred's to take: a conflict.
    Never,
    /// Its controller is another regcred credential that is newer, or gone: replace the owner
    /// references, then apply.
    TakeOver,
    /// It has no owner at all but regcred's marks (what `kubectl delete --cascade=orphan` of a
    /// credential leaves): one apply that also sets the owner reference.
    Adopt,
}

/// Whether (and how) a Secret controlled by someone else goes to `claim`. Only a Secret that
/// wears regcred's marks (its managed-by label; every mark is writable by whoever may edit
/// Secrets in the namespace, so they prove nothing and decide nothing beyond it) and that can
/// take what regcred writes without keeping anything that matters (type
/// `kubernetes.io/dockerconfigjson`, not immutable: taking it replaces its pull config, its
/// owner, and regcred's labels and annotations). Of those: one controlled by another regcred
/// credential that is newer than the claimant or no longer exists (read by kind, name and uid),
/// and one with no owner at all that carries the credential-uid label. A Secret without
/// regcred's marks, of another type, immutable, or controlled (or co-owned, when it has no
/// controller) by anything else is never taken.
async fn taking(client: &Client, existing: &ReadSecret, claim: &Claim) -> Result<Taking, Error> {
    let meta = &existing.metadata;
    let labels = meta.labels.as_ref();
    let marked = labels.and_then(|l| l.get(MANAGED_BY_LABEL)).map(String::as_str) == Some(MANAGED_BY_VALUE);
    if !marked || existing.type_.as_deref() != Some(DOCKER_CONFIG_TYPE) || existing.immutable {
        return Ok(Taking::Never);
    }
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let Some(holder) = owners.iter().find(|o| o.controller == Some(true)) else {
        let orphan = owners.is_empty() && labels.is_some_and(|l| l.contains_key(CREDENTIAL_UID_LABEL));
        return Ok(if orphan { Taking::Adopt } else { Taking::Never });
    };
    Ok(match yields_to(client, meta, holder, claim).await? {
        true => Taking::TakeOver,
        false => Taking::Never,
    })
}

/// Whether a Secret whose controller is `holder` goes to `claim`: only when `holder` is a
/// regcred credential that is newer than the claimant, or that no longer exists.
async fn yields_to(
    client: &Client,
    existing: &ObjectMeta,
    holder: &OwnerReference,
    claim: &Claim,
) -> Result<bool, Error> {
    if !holder.api_version.starts_with(&format!("{GROUP}/")) {
        return Ok(false);
    }
    let meta = match holder.kind.as_str() {
        "RegistryCredential" => {
            let namespace = existing.namespace.as_deref().unwrap_or_default();
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
/// resourceVersion that was checked; returns the resourceVersion it wrote.
async fn take_over(api: &Api<Secret>, existing: &ObjectMeta, owner: &OwnerReference) -> Result<Option<String>, Error> {
    let name = existing.name.as_deref().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {
        "resourceVersion": existing.resource_version,
        "ownerReferences": [owner],
    }});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    Ok(api.patch(name, &params, &Patch::Merge(&patch)).await?.metadata.resource_version)
}

/// Server-side apply of `desired`, valid only against the given resourceVersion; returns the
/// resourceVersion it wrote.
pub async fn apply(
    api: &Api<Secret>,
    name: &str,
    desired: &DesiredSecret,
    resource_version: Option<String>,
) -> Result<Option<String>, Error> {
    let mut patch = desired.to_secret();
    patch.metadata.resource_version = resource_version;
    let written = api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(written.metadata.resource_version)
}

/// Deletes a Secret this owner wrote, if it is still there and still theirs: the
/// preconditions make the delete fail rather than remove a replacement.
pub async fn delete_if_controlled(api: &Api<Secret>, name: &str, owner_uid: &str) -> Result<bool, Error> {
    // Only the metadata decides; the data is not kept.
    let Some(existing) = api.get_opt(name).await?.map(|secret| secret.metadata) else {
        return Ok(false);
    };
    if !is_controlled_by(&existing, owner_uid) {
        return Ok(false);
    }
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: existing.uid,
            resource_version: existing.resource_version,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// Deletes a Secret of this owner seen at `resource_version` in a list; if it changed since,
/// reads it and deletes it only if it is still theirs.
pub async fn delete_seen(
    api: &Api<Secret>,
    name: &str,
    resource_version: Option<&str>,
    owner_uid: &str,
) -> Result<bool, Error> {
    let Some(resource_version) = resource_version else {
        return delete_if_controlled(api, name, owner_uid).await;
    };
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions { uid: None, resource_version: Some(resource_version.into()) }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(kube::Error::Api(status)) if status.code == 409 => delete_if_controlled(api, name, owner_uid).await,
        Err(error) => Err(error.into()),
    }
}

/// Whether the object's controller owner reference points at `owner_uid`.
pub fn is_controlled_by(meta: &ObjectMeta, owner_uid: &str) -> bool {
    meta.owner_references.iter().flatten().any(|o| o.controller == Some(true) && o.uid == owner_uid)
}

/// Whether applying `desired` would change anything regcred owns in `existing`.
fn is_up_to_date(existing: &ReadSecret, desired: &DesiredSecret) -> bool {
    existing.type_.as_deref() == Some(DOCKER_CONFIG_TYPE)
        && existing.docker_config.as_ref().map(ExposeSecret::expose_secret)
            == Some(desired.docker_config.expose_secret())
        && metadata_matches(&existing.metadata, &desired.metadata)
}

/// Whether the live Secret's labels, annotations and controller owner are what regcred
/// would apply (foreign labels and annotations are left alone; ones regcred set earlier and
/// no longer wants are not).
pub fn metadata_matches(live: &ObjectMeta, desired: &ObjectMeta) -> bool {
    let ours = owned_metadata_keys(live.managed_fields.as_deref().unwrap_or_default());
    let controller = |m: &ObjectMeta| {
        m.owner_references.iter().flatten().find(|o| o.controller == Some(true)).map(|o| o.uid.clone())
    };
    controller(live) == controller(desired)
        && map_matches(&live.labels, &desired.labels, &ours.labels)
        && map_matches(&live.annotations, &desired.annotations, &ours.annotations)
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

/// What regcred owns of a live Secret's metadata: its controller, and the labels and
/// annotations regcred's field manager owns (values cut to one byte past the longest a
/// template may set, so an inflated one still differs).
pub fn kept_for_matching(live: &ObjectMeta) -> ObjectMeta {
    let ours = owned_metadata_keys(live.managed_fields.as_deref().unwrap_or_default());
    let keep = |map: &Option<BTreeMap<String, String>>, keys: &[String]| {
        let kept: BTreeMap<String, String> =
            map.iter().flatten().filter(|(k, _)| keys.contains(k)).map(|(k, v)| (k.clone(), cut_value(v))).collect();
        (!kept.is_empty()).then_some(kept)
    };
    let controller = live.owner_references.iter().flatten().filter(|o| o.controller == Some(true)).take(1);
    ObjectMeta {
        owner_references: Some(controller.cloned().collect()),
        labels: keep(&live.labels, &ours.labels),
        annotations: keep(&live.annotations, &ours.annotations),
        ..Default::default()
    }
}

/// A value longer than any a template may set is cut to one byte (at most one character)
/// past that: it still differs from every desired value.
fn cut_value(value: &str) -> String {
    let limit = crate::crd::MAX_ANNOTATION_VALUE_BYTES + 1;
    let end = (limit..=value.len()).find(|&i| value.is_char_boundary(i)).unwrap_or(value.len());
    value[..end].to_string()
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

    fn desired(labels: &[(&str, &str)]) -> DesiredSecret {
        let template = SecretTemplate {
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        desired_secret("pull", "ns", &template, Some(owner()), b"{}".to_vec().into())
    }

    /// The pull config, on its way to the request and as read back, shows no password in
    /// `Debug`; the Secret sent carries it unchanged.
    #[test]
    fn a_desired_or_read_secret_shows_no_credential() {
        use crate::dockerconfig::RegistryAuth;
        let auths = [RegistryAuth { server: "r.io".into(), username: "bob".into(), password: "hunter2-pw".into() }];
        let config = crate::dockerconfig::render(&auths);
        let desired = desired_secret("pull", "ns", &SecretTemplate::default(), Some(owner()), config.clone());
        let live = ReadSecret::from(desired.to_secret());
        for shown in [format!("{config:?}"), format!("{desired:?}"), format!("{live:?}")] {
            crate::test_support::assert_hidden(&shown, "hunter2-pw");
            crate::test_support::assert_hidden(&shown, "bob:hunter2-pw");
        }
        let sent = desired.to_secret();
        assert_eq!(sent.type_.as_deref(), Some(DOCKER_CONFIG_TYPE));
        assert_eq!(sent.data.as_ref().map(|d| d[DOCKER_CONFIG_KEY].0.as_slice()), Some(config.expose_secret()));
        assert!(is_up_to_date(&live, &desired));
    }

    #[test]
    fn same_content_is_up_to_date_even_with_foreign_labels() {
        let mut live = ReadSecret::from(desired(&[("team", "a")]).to_secret());
        live.metadata.labels.as_mut().unwrap().insert("added-by-someone".into(), "x".into());
        assert!(is_up_to_date(&live, &desired(&[("team", "a")])));
    }

    #[test]
    fn changed_data_or_label_needs_a_write() {
        let live = ReadSecret::from(desired(&[("team", "a")]).to_secret());
        let mut other = desired(&[("team", "a")]);
        other.docker_config = b"{\"x\":1}".to_vec().into();
        assert!(!is_up_to_date(&live, &other));
        assert!(!is_up_to_date(&live, &desired(&[("team", "b")])));
    }

    #[test]
    fn a_label_regcred_set_and_no_longer_wants_needs_a_write() {
        let mut live = ReadSecret::from(desired(&[("team", "a")]).to_secret());
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

    /// Issue 20 (restart memory): a reconcile keeps of a read Secret only the digest of what
    /// regcred owns on it, which is the desired metadata's exactly when the whole metadata
    /// matches; what others put on it is not kept.
    #[test]
    fn the_owned_metadata_digest_decides_as_the_whole_metadata() {
        let mut live = desired(&[("team", "a")]).to_secret().metadata;
        // As regcred's apply left it: its field manager owns every key it set.
        let owned = |map: &Option<BTreeMap<String, String>>| {
            serde_json::Value::Object(
                map.iter().flatten().map(|(k, _)| (format!("f:{k}"), serde_json::json!({}))).collect(),
            )
        };
        let mut labels = owned(&live.labels);
        labels.as_object_mut().unwrap().insert("f:old".into(), serde_json::json!({}));
        let fields = serde_json::json!({"f:metadata": {"f:labels": labels, "f:annotations": owned(&live.annotations)}});
        live.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }]);
        live.annotations.get_or_insert_default().insert("tenant-blob".into(), "b".repeat(200_000));
        live.labels.get_or_insert_default().insert("tenant".into(), "x".into());
        let kept = kept_for_matching(&live);
        assert!(serde_json::to_vec(&kept).unwrap().len() < 1_000, "the tenant's annotation is not kept");
        let left_over = |live: &ObjectMeta| {
            let mut live = live.clone();
            live.labels.get_or_insert_default().insert("old".into(), "left-over".into());
            live
        };
        for live in [live.clone(), left_over(&live)] {
            for want in [desired(&[("team", "a")]), desired(&[("team", "a"), ("old", "left-over")]), desired(&[])] {
                let digest_says = owned_metadata_digest(&live) == metadata_digest(&want.metadata);
                assert_eq!(
                    digest_says,
                    metadata_matches(&live, &want.metadata),
                    "{:?} against {:?}",
                    live.labels,
                    want.metadata.labels
                );
            }
        }
        // An inflated value of regcred's own key is cut, and still differs from any a
        // template may set.
        live.labels.get_or_insert_default().insert("team".into(), "é".repeat(100_000));
        let team = kept_for_matching(&live).labels.unwrap()["team"].len();
        assert!((3073..=3074).contains(&team), "{team}");
        assert_ne!(owned_metadata_digest(&live), metadata_digest(&desired(&[("team", "a")]).metadata));
    }

    /// An apiserver that answers a fixed script of (method, status, body) and records the
    /// requests it was sent: for races that the real apiserver cannot be made to lose on cue.
    fn scripted(
        script: Vec<(&'static str, u16, serde_json::Value)>,
    ) -> (Client, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::sync::{Arc, Mutex};
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (script, log) = (script.clone(), log.clone());
            async move {
                let (method, status, body) = script.lock().unwrap().pop_front().expect("a request beyond the script");
                assert_eq!(request.method().as_str(), method, "{}", request.uri());
                log.lock().unwrap().push(format!("{} {}", request.method(), request.uri().path()));
                let response = http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        (Client::new(service, "default"), seen)
    }

    fn conflict() -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
                           "code": 409, "message": "the object has been modified"})
    }

    /// Item 10 of the one-core issue: a 409 on the resourceVersion-guarded apply (someone
    /// changed the Secret in between) is read again and decided afresh, not reported.
    #[tokio::test]
    async fn a_conflicting_apply_is_read_again_not_reported() {
        let stale = desired(&[("team", "old")]).to_secret();
        let wanted = desired(&[("team", "new")]);
        let mut fresh = wanted.to_secret();
        fresh.metadata.resource_version = Some("2".into());
        let (client, seen) =
            scripted(vec![("PATCH", 409, conflict()), ("GET", 200, serde_json::to_value(&fresh).unwrap())]);
        let claim = Claim { owner: owner(), created: None };
        let outcome = ensure_secret(&client, &wanted, &claim, Some(Some(stale))).await.unwrap();
        assert_eq!(outcome, Outcome { change: SecretChange::Unchanged, resource_version: Some("2".into()) });
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    /// Only a conflict that persists through every attempt is an error.
    #[tokio::test]
    async fn a_conflict_that_persists_is_reported() {
        let stale = desired(&[("team", "old")]).to_secret();
        let mut script = Vec::new();
        for _ in 0..ATTEMPTS {
            script.push(("PATCH", 409, conflict()));
            script.push(("GET", 200, serde_json::to_value(&stale).unwrap()));
        }
        script.pop();
        let (client, _) = scripted(script);
        let claim = Claim { owner: owner(), created: None };
        let error = ensure_secret(&client, &desired(&[("team", "new")]), &claim, Some(Some(stale))).await.unwrap_err();
        assert!(matches!(error, Error::Kube(kube::Error::Api(ref s)) if s.code == 409), "{error}");
    }

    /// Issue 20, item 5: an ownerless Secret is adopted only with regcred's marks (its
    /// managed-by and credential-uid labels), when it can take what regcred writes (type
    /// dockerconfigjson, not immutable) and nobody else has a claim on it. None of these
    /// decisions asks the apiserver.
    #[tokio::test]
    async fn only_an_ownerless_secret_with_regcred_marks_is_adopted() {
        let (client, seen) = scripted(Vec::new());
        let claim = Claim { owner: owner(), created: None };
        let orphan = || {
            let mut secret = desired(&[]).to_secret();
            secret.metadata.owner_references = None;
            secret.metadata.labels.as_mut().unwrap().insert(CREDENTIAL_UID_LABEL.into(), "gone-uid".into());
            secret
        };
        let decide = |secret: Secret| {
            let client = client.clone();
            let claim = claim.clone();
            async move { taking(&client, &ReadSecret::from(secret), &claim).await.unwrap() }
        };
        assert_eq!(decide(orphan()).await, Taking::Adopt);
        let mut unmarked = orphan();
        unmarked.metadata.labels.as_mut().unwrap().remove(MANAGED_BY_LABEL);
        assert_eq!(decide(unmarked).await, Taking::Never, "without the managed-by label");
        let mut no_uid = orphan();
        no_uid.metadata.labels.as_mut().unwrap().remove(CREDENTIAL_UID_LABEL);
        assert_eq!(decide(no_uid).await, Taking::Never, "without the credential-uid label");
        let mut opaque = orphan();
        opaque.type_ = Some("Opaque".into());
        assert_eq!(decide(opaque).await, Taking::Never, "another type, which can never become regcred's");
        let mut immutable = orphan();
        immutable.immutable = Some(true);
        assert_eq!(decide(immutable).await, Taking::Never, "immutable: its data can never be written");
        let mut co_owned = orphan();
        co_owned.metadata.owner_references =
            Some(vec![OwnerReference { controller: Some(false), uid: "other".into(), ..Default::default() }]);
        assert_eq!(decide(co_owned).await, Taking::Never, "someone else has a claim on it");
        let mut foreign = orphan();
        foreign.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            controller: Some(true),
            uid: "other".into(),
            ..Default::default()
        }]);
        assert_eq!(decide(foreign).await, Taking::Never, "controlled by something else");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn ownership_needs_the_controller_flag_and_uid() {
        let mut s = desired(&[]);
        assert!(is_controlled_by(&s.metadata, "uid-1"));
        assert!(!is_controlled_by(&s.metadata, "uid-2"));
        s.metadata.owner_references.as_mut().unwrap()[0].controller = Some(false);
        assert!(!is_controlled_by(&s.metadata, "uid-1"));
    }
}
