//! The two credential kinds as the core sees them. This is the only kind-specific code: a
//! RegistryCredential is a fan-out to exactly its own namespace.

use std::fmt::Debug;

use futures::{StreamExt, stream::BoxStream};
use kube::{Api, Client, Resource, ResourceExt, runtime::watcher};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::{
    crd::{
        Attach, ClusterCredentialStatus, ClusterRegistryCredential, CredentialSource, NamespaceSelection, PodSelection,
        RegistryCredential, SecretTemplate, VerifySpec,
    },
    index::{Key, Trigger},
};

use super::scope::Namespaces;

/// Where a credential writes.
pub enum Scope<'a> {
    /// Its own namespace only.
    Namespace(&'a str),
    /// Every namespace the selection picks.
    Selection(&'a NamespaceSelection),
}

/// The spec fields both kinds share.
pub struct Parts<'a> {
    pub registry: Option<&'a str>,
    pub source: &'a CredentialSource,
    pub secret: &'a SecretTemplate,
    pub service_accounts: &'a [String],
    pub attach: Option<Attach>,
    pub pods: Option<&'a PodSelection>,
    pub scope: Scope<'a>,
    pub verify: Option<&'a VerifySpec>,
}

pub trait Credential:
    Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    const KIND: &'static str;

    fn parts(&self) -> Parts<'_>;

    /// The status in the shape the core computes (a namespaced status has no counts).
    fn status_view(&self) -> Option<ClusterCredentialStatus>;

    /// What of a computed status this kind stores (the namespaced kind has no counts).
    fn normalize(status: ClusterCredentialStatus) -> ClusterCredentialStatus;

    /// The status subresource patch for a computed status.
    fn status_patch(status: &ClusterCredentialStatus) -> Value;

    fn trigger(&self) -> Trigger;

    fn api(client: Client, namespace: Option<&str>) -> Api<Self>;

    /// The watch of this kind over the controller's namespaces.
    fn watch(
        client: &Client,
        scope: &Namespaces,
        config: watcher::Config,
    ) -> BoxStream<'static, Result<watcher::Event<Self>, watcher::Error>>;

    /// The ServiceAccounts to list the Secret in: none when the credential (or, where it says
    /// nothing, the controller's `default`) attaches it to Pods only.
    fn wanted_accounts(&self, default: Attach) -> &[String] {
        let parts = self.parts();
        match parts.attach.unwrap_or(default).service_accounts() {
            true => parts.service_accounts,
            false => &[],
        }
    }

    /// Name of the Secret this credential writes (in each target namespace).
    fn secret_name(&self) -> String {
        self.parts().secret.name.clone().unwrap_or_else(|| self.name_any())
    }

    /// The Secrets and ServiceAccounts whose events concern this credential.
    fn index_keys(&self) -> Vec<Key> {
        let parts = self.parts();
        let own = match parts.scope {
            Scope::Namespace(ns) => Some(ns),
            Scope::Selection(_) => None,
        };
        let resolve = |explicit: Option<&str>| explicit.or(own).map(String::from);
        let mut keys = vec![match own {
            Some(ns) => Key::Secret(ns.into(), self.secret_name()),
            None => Key::SecretName(self.secret_name()),
        }];
        for (namespace, name) in parts.source.secret_refs() {
            keys.extend(resolve(namespace).map(|ns| Key::Secret(ns, name.into())));
        }
        if let Some((namespace, name)) = parts.source.token_service_account() {
            keys.extend(resolve(namespace).map(|ns| Key::Account(ns, name.into())));
        }
        for account in parts.service_accounts {
            keys.push(match own {
                Some(ns) => Key::Account(ns.into(), account.clone()),
                None => Key::AccountName(account.clone()),
            });
        }
        keys
    }
}

impl Credential for RegistryCredential {
    const KIND: &'static str = "RegistryCredential";

    fn parts(&self) -> Parts<'_> {
        Parts {
            registry: self.spec.registry.as_deref(),
            source: &self.spec.source,
            secret: &self.spec.secret,
            service_accounts: &self.spec.service_accounts,
            attach: self.spec.attach,
            pods: self.spec.pods.as_ref(),
            verify: self.spec.verify.as_ref(),
            scope: Scope::Namespace(self.metadata.namespace.as_deref().unwrap_or_default()),
        }
    }

    fn status_view(&self) -> Option<ClusterCredentialStatus> {
        self.status.clone().map(|credential| ClusterCredentialStatus { credential, ..Default::default() })
    }

    fn normalize(status: ClusterCredentialStatus) -> ClusterCredentialStatus {
        ClusterCredentialStatus { credential: status.credential, ..Default::default() }
    }

    fn status_patch(status: &ClusterCredentialStatus) -> Value {
        json!({"apiVersion": Self::api_version(&()), "kind": Self::kind(&()), "status": status.credential})
    }

    fn trigger(&self) -> Trigger {
        Trigger::Namespaced(self.into())
    }

    fn api(client: Client, namespace: Option<&str>) -> Api<Self> {
        Api::namespaced(client, namespace.unwrap_or_default())
    }

    fn watch(
        client: &Client,
        scope: &Namespaces,
        config: watcher::Config,
    ) -> BoxStream<'static, Result<watcher::Event<Self>, watcher::Error>> {
        super::scope::watch(client, scope, config, super::scope::without_managed_fields)
    }
}

impl Credential for ClusterRegistryCredential {
    const KIND: &'static str = "ClusterRegistryCredential";

    fn parts(&self) -> Parts<'_> {
        Parts {
            registry: self.spec.registry.as_deref(),
            source: &self.spec.source,
            secret: &self.spec.secret,
            service_accounts: &self.spec.service_accounts,
            attach: self.spec.attach,
            pods: self.spec.pods.as_ref(),
            verify: self.spec.verify.as_ref(),
            scope: Scope::Selection(&self.spec.namespaces),
        }
    }

    fn status_view(&self) -> Option<ClusterCredentialStatus> {
        self.status.clone()
    }

    fn normalize(status: ClusterCredentialStatus) -> ClusterCredentialStatus {
        status
    }

    fn status_patch(status: &ClusterCredentialStatus) -> Value {
        json!({"apiVersion": Self::api_version(&()), "kind": Self::kind(&()), "status": status})
    }

    fn trigger(&self) -> Trigger {
        Trigger::Cluster(self.into())
    }

    fn api(client: Client, _: Option<&str>) -> Api<Self> {
        Api::all(client)
    }

    /// Cluster-scoped: one watch, whatever the namespaces served (targets are limited to them).
    fn watch(
        client: &Client,
        _: &Namespaces,
        config: watcher::Config,
    ) -> BoxStream<'static, Result<watcher::Event<Self>, watcher::Error>> {
        kube::runtime::watcher(Api::all(client.clone()), config).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_resolve_in_the_credentials_own_namespace() {
        let cr: RegistryCredential = serde_json::from_value(json!({
            "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "cred", "namespace": "team"},
            "spec": {"source": {"ecr": {"region": "eu-west-1", "auth": {"serviceAccountRef": {"name": "puller"}}}},
                     "serviceAccounts": ["default"]},
        }))
        .unwrap();
        assert_eq!(
            cr.index_keys(),
            [
                Key::Secret("team".into(), "cred".into()),
                Key::Account("team".into(), "puller".into()),
                Key::Account("team".into(), "default".into()),
            ]
        );
        let crc: ClusterRegistryCredential = serde_json::from_value(json!({
            "apiVersion": "regcred.dev/v1alpha1", "kind": "ClusterRegistryCredential",
            "metadata": {"name": "c"},
            "spec": {"registry": "r.io", "secret": {"name": "pull"}, "serviceAccounts": ["default"],
                     "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": "platform"}}}},
        }))
        .unwrap();
        assert_eq!(
            crc.index_keys(),
            [
                Key::SecretName("pull".into()),
                Key::Secret("platform".into(), "src".into()),
                Key::AccountName("default".into()),
            ]
        );
    }
}
