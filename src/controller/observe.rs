//! What a reconcile observes before it plans: the credential's own Secrets (metadata, read
//! only where their content is unknown), the token a live Secret holds, and the
//! ServiceAccounts that may need a change.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::Arc,
};

use futures::{StreamExt, stream};
use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Secret, ServiceAccount},
};
use kube::{Api, Resource, ResourceExt, runtime::reflector::ObjectRef};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;

use super::Context;
use crate::{
    Error, dockerconfig,
    owned::OwnedSecret,
    plan::LiveSecret,
    secret::{ReadSecret, config_hash, data_hash, is_controlled_by, owned_metadata_digest},
    service_account::holds_exactly,
    source::PreviousToken,
    state::Content,
};

/// This credential's Secrets, from the record the Secret watch keeps of each Secret's
/// controller owner (`owned`; no list, and no label decides anything). Those seen current at
/// their resourceVersion need no read; the current name in a target is read (a GET each,
/// `--concurrency` at a time, so memory is bounded whatever is in the namespace); the others
/// (old names, untargeted namespaces) only need their resourceVersion for the delete.
/// Also returns one of those read whose config has the digest `seed` (the one the last
/// status recorded), if any: the token regcred wrote, which a tenant's edit cannot fake (see
/// [`previous_token`]).
pub(super) async fn own_secrets(
    ctx: &Context,
    namespace: Option<&str>,
    uid: &str,
    targets: &[String],
    secret_name: &str,
    seed: Option<&str>,
) -> Result<(Vec<LiveSecret>, Option<ReadSecret>), Error> {
    let targets: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    let mut own = Vec::new();
    let mut unknown = Vec::new();
    // A namespaced credential's Secrets are in its namespace (an owner reference elsewhere
    // is not its own).
    let owned = ctx.owned.of(uid).into_iter().filter(|s| namespace.is_none_or(|ns| s.namespace == ns));
    // Looked up in place: the record of 10,000 Secrets is not copied.
    ctx.states.with(uid, |state| {
        for secret in owned {
            let seen = state.verified.get(secret.namespace.as_str()).filter(|seen| {
                secret.name == state.verified_name && seen.resource_version.is(&secret.resource_version)
            });
            match seen {
                Some(seen) => own.push(LiveSecret { content: Some(seen.content.clone()), ..listed(secret) }),
                None if secret.name == secret_name && targets.contains(secret.namespace.as_str()) => {
                    unknown.push((secret.namespace, secret.name))
                }
                None => own.push(listed(secret)),
            }
        }
    });
    let mut kept = Kept::new(uid, seed, None);
    for_each_read::<Secret>(ctx, unknown, |full| kept.add(full)).await?;
    own.extend(kept.live);
    own.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    Ok((own, kept.sample))
}

/// What a reconcile keeps of the Secrets it reads, one at a time as each arrives: the hash
/// of its data and the metadata matching needs (`secret::kept_for_matching`), never the
/// Secret itself, but for one sample whose config has the digest `seed`.
struct Kept<'a> {
    uid: &'a str,
    seed: Option<&'a str>,
    /// The name a sample must have, if any.
    sample_name: Option<&'a str>,
    live: Vec<LiveSecret>,
    sample: Option<ReadSecret>,
}

impl<'a> Kept<'a> {
    fn new(uid: &'a str, seed: Option<&'a str>, sample_name: Option<&'a str>) -> Self {
        Kept { uid, seed, sample_name, live: Vec::new(), sample: None }
    }

    fn add(&mut self, full: Secret) {
        // Read just now: it counts only if this credential still controls it.
        if !is_controlled_by(&full.metadata, self.uid) {
            return;
        }
        let hash = data_hash(&full);
        let named = self.sample_name.is_none_or(|name| full.metadata.name.as_deref() == Some(name));
        let meta = &full.metadata;
        let live = LiveSecret {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone(),
            content: Some(Arc::new(Content { data_hash: hash.clone(), meta_digest: owned_metadata_digest(meta) })),
        };
        if self.sample.is_none() && named && self.seed == Some(hash.as_str()) {
            self.sample = Some(ReadSecret::from(full));
        }
        self.live.push(live);
    }
}

/// A Secret known from the watch alone, its content unknown.
fn listed(secret: OwnedSecret) -> LiveSecret {
    LiveSecret {
        namespace: secret.namespace,
        name: secret.name,
        resource_version: Some(secret.resource_version),
        content: None,
    }
}

/// This credential's Secrets found by reading each name it may have written in each namespace
/// it targets or targeted last time (`--no-secret-watch`, where RBAC grants no list on
/// Secrets): a read per namespace and name instead of one list.
pub(super) async fn own_secrets_by_name(
    ctx: &Context,
    uid: &str,
    targets: &[String],
    names: &[&str],
    seed: Option<&str>,
) -> Result<(Vec<LiveSecret>, Option<ReadSecret>), Error> {
    let mut namespaces: BTreeSet<String> = targets.iter().cloned().collect();
    namespaces.extend(ctx.states.with(uid, |s| s.targets.clone()));
    let reads: Vec<(String, String)> =
        namespaces.iter().flat_map(|ns| names.iter().map(move |name| (ns.clone(), name.to_string()))).collect();
    let mut kept = Kept::new(uid, seed, names.first().copied());
    for_each_read::<Secret>(ctx, reads, |full| kept.add(full)).await?;
    let mut own = kept.live;
    own.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
    Ok((own, kept.sample))
}

/// The token a live Secret holds, when the last status says it is current for this spec:
/// Ready for this generation, its expiry and refresh time known, and the Secret's config
/// exactly the bytes whose digest the status recorded when regcred wrote them. Anyone who can
/// edit a target namespace's Secret can edit its data and annotations, but not the
/// credential's status: without the digest, their token would be reused for every namespace.
/// The sources reuse it only for the same identity and registries (see `source::ecr`).
pub(super) fn previous_token(
    secret: &ReadSecret,
    status: Option<&crate::crd::ClusterCredentialStatus>,
    generation: Option<i64>,
) -> Option<PreviousToken> {
    let status = &status?.credential;
    let ready = status.condition(crate::status::READY)?;
    if ready.status != "True" || ready.observed_generation != generation {
        return None;
    }
    let config = secret.docker_config()?.expose_secret();
    if status.token_digest.as_deref() != Some(config_hash(Some(config)).as_str()) {
        return None;
    }
    let identity = status.token_identity.clone()?;
    Some(PreviousToken {
        identity,
        auths: dockerconfig::parse(config).ok()?,
        expires_at: status.expires_at.as_ref()?.0,
        refresh_at: status.next_refresh_at.as_ref()?.0,
    })
}

/// The ServiceAccounts that may need a change, read in full and grouped by namespace: each
/// named one in a target namespace unless the metadata store shows it holding exactly this
/// credential's Secret at a resourceVersion already checked, and each one whose annotation
/// records an entry of this credential in a target or in a namespace it is `leaving` (where
/// this reconcile removes its Secret). The others are not read at all: anyone can write the
/// annotation, and elsewhere an entry is released only when the credential goes.
pub(super) async fn accounts_to_check(
    ctx: &Context,
    uid: &str,
    targets: &[String],
    leaving: &BTreeSet<&str>,
    wanted: &[String],
    secret_name: &str,
) -> Result<BTreeMap<String, Vec<ServiceAccount>>, Error> {
    let verified = ctx.states.with(uid, |s| s.accounts_verified.clone());
    let target_set: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    let concerned = |namespace: &str| leaving.contains(namespace) || target_set.contains(namespace);
    let recorded = ctx.index.accounts_recording(uid).into_iter().filter(|(namespace, _)| concerned(namespace));
    let mut candidates: BTreeSet<(String, String)> = recorded.collect();
    for namespace in targets {
        for name in wanted {
            candidates.insert((namespace.clone(), name.clone()));
        }
    }
    let targets = target_set;
    let reads: Vec<(String, String)> = candidates
        .into_iter()
        .filter(|(namespace, name)| {
            let Some(meta) = ctx.accounts.get(&ObjectRef::new(name).within(namespace)) else {
                return false; // no such ServiceAccount: nothing to add to or remove from
            };
            let wanted_here = targets.contains(namespace.as_str()) && wanted.contains(name);
            let empty = BTreeMap::new();
            let annotations = meta.metadata.annotations.as_ref().unwrap_or(&empty);
            let checked = verified
                .get(&(namespace.clone(), name.clone()))
                .is_some_and(|known| known.covers(meta.metadata.resource_version.as_ref()));
            !(wanted_here && checked && holds_exactly(annotations, secret_name, uid))
        })
        .collect();
    read_accounts(ctx, reads).await
}

/// Reads ServiceAccounts by name, grouped by namespace; one that is gone is skipped.
pub(super) async fn read_accounts(
    ctx: &Context,
    reads: Vec<(String, String)>,
) -> Result<BTreeMap<String, Vec<ServiceAccount>>, Error> {
    let mut by_namespace: BTreeMap<String, Vec<ServiceAccount>> = BTreeMap::new();
    for_each_read::<ServiceAccount>(ctx, reads, |account| {
        by_namespace.entry(account.namespace().unwrap_or_default()).or_default().push(account);
    })
    .await?;
    Ok(by_namespace)
}

/// Reads objects by (namespace, name), `--concurrency` at a time, and hands each to `take`
/// as it arrives (so at most `--concurrency` are held in full); those that are gone are left
/// out. The first failed read ends it.
async fn for_each_read<K>(
    ctx: &Context,
    reads: impl IntoIterator<Item = (String, String)>,
    mut take: impl FnMut(K),
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let mut found =
        stream::iter(reads)
            .map(|(namespace, name)| async move {
                Api::<K>::namespaced(ctx.client.clone(), &namespace).get_opt(&name).await
            })
            .buffer_unordered(usize::from(ctx.config.concurrency.max(1)));
    while let Some(object) = found.next().await {
        if let Some(object) = object? {
            take(object);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        ByteString,
        apimachinery::pkg::apis::meta::v1::Time,
        jiff::{SignedDuration, Timestamp},
    };

    use super::*;
    use crate::crd::{ClusterCredentialStatus, CredentialStatus};

    const GENUINE: &[u8] =
        br#"{"auths":{"r.example.com":{"username":"AWS","password":"issued","auth":"QVdTOmlzc3VlZA=="}}}"#;
    const FORGED: &[u8] =
        br#"{"auths":{"r.example.com":{"username":"AWS","password":"forged","auth":"QVdTOmZvcmdlZA=="}}}"#;

    fn secret(config: &[u8]) -> ReadSecret {
        ReadSecret::from(Secret {
            data: Some([(".dockerconfigjson".to_string(), ByteString(config.to_vec()))].into()),
            ..Default::default()
        })
    }

    fn status(digest: Option<&[u8]>) -> ClusterCredentialStatus {
        let in_hours = |h: i64| Time(Timestamp::now() + SignedDuration::from_hours(h));
        let ready = crate::status::condition(None, crate::status::READY, true, "Synced", String::new(), Some(1));
        ClusterCredentialStatus {
            credential: CredentialStatus {
                conditions: vec![ready],
                expires_at: Some(in_hours(12)),
                next_refresh_at: Some(in_hours(9)),
                token_digest: digest.map(|d| config_hash(Some(d))),
                token_identity: Some("identity".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_the_bytes_the_status_recorded_are_reused() {
        let reused = previous_token(&secret(GENUINE), Some(&status(Some(GENUINE))), Some(1)).expect("reused");
        assert_eq!(reused.auths[0].password.expose_secret(), "issued");
        assert_eq!(reused.identity, "identity", "the identity the status recorded");
        assert!(previous_token(&secret(FORGED), Some(&status(Some(GENUINE))), Some(1)).is_none(), "edited bytes");
        assert!(previous_token(&secret(GENUINE), Some(&status(None)), Some(1)).is_none(), "no digest recorded");
        assert!(previous_token(&secret(GENUINE), Some(&status(Some(GENUINE))), Some(2)).is_none(), "other generation");
        // A status written before `tokenIdentity` was recorded (an upgrade): no reuse.
        let mut without_identity = status(Some(GENUINE));
        without_identity.credential.token_identity = None;
        assert!(previous_token(&secret(GENUINE), Some(&without_identity), Some(1)).is_none(), "no identity recorded");
    }
}
