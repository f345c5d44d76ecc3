//! The `regcred.dev/v1alpha1` API: what users write and what the controller reports.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every regcred resource.
pub const GROUP: &str = "regcred.dev";

/// A registry host as `docker login` takes it: `host[:port]`, no scheme, no path.
const REGISTRY_HOST_PATTERN: &str = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)(:[0-9]{1,5})?$";
/// RFC 1123 subdomain, the rule for Secret names.
const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// The rule for keys in a Secret's `data`.
const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// The auth field is base64("user:password") split at the first colon, so a username
/// cannot hold one.
const USERNAME_PATTERN: &str = r"^[^:\x00-\x1f]+$";

/// Keeps one `kubernetes.io/dockerconfigjson` Secret in this namespace correct for one registry.
// Each printcolumn(...) repeats `type_ = "string"`, which the lint mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "regcred.dev",
    version = "v1alpha1",
    kind = "RegistryCredential",
    namespaced,
    doc = "A registry credential: the controller keeps a kubernetes.io/dockerconfigjson Secret of the same namespace in sync with it.",
    status = "CredentialStatus",
    shortname = "regcred",
    category = "regcred",
    printcolumn(name = "Registry", type_ = "string", json_path = ".status.registries[*]"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.registry) || !has(self.source.basic)").message("spec.registry is required for a basic source"))]
#[serde(rename_all = "camelCase")]
pub struct RegistryCredentialSpec {
    /// Registry host the credential is for, as `docker login` takes it: `host[:port]`,
    /// without scheme or path (e.g. `ghcr.io`, `registry.example.com:5000`). Docker Hub
    /// (`docker.io`, `index.docker.io`, `registry-1.docker.io`) is written under
    /// `https://index.docker.io/v1/`, the key docker and the kubelet use. Defaults to
    /// `ghcr.io` for a ghcr source and `gcr.io` for a gcr source; required for basic.
    #[schemars(length(max = 259), regex(pattern = REGISTRY_HOST_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,

    /// Where the credential comes from. Exactly one of `basic`, `ghcr` or `gcr`.
    pub source: CredentialSource,

    /// The Secret to write (in this namespace).
    #[serde(default)]
    pub secret: SecretTemplate,
}

/// Where a credential comes from. Exactly one member is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CredentialSource {
    /// A username and a password (or token) read from a Secret in this namespace.
    Basic(BasicSource),
    /// GitHub Container Registry: a GitHub username and a personal access token.
    Ghcr(GhcrSource),
    /// Google Container Registry / Artifact Registry: a service-account JSON key, sent
    /// as the password of the user `_json_key`.
    Gcr(GcrSource),
}

impl CredentialSource {
    /// Short name of the source kind, as shown in status and `kubectl get`.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSource::Basic(_) => "basic",
            CredentialSource::Ghcr(_) => "ghcr",
            CredentialSource::Gcr(_) => "gcr",
        }
    }

    /// Every Secret this source reads, so a change to one of them triggers a reconcile.
    pub fn secret_refs(&self) -> Vec<&SecretKeyRef> {
        match self {
            CredentialSource::Basic(b) => vec![&b.password_secret_ref],
            CredentialSource::Ghcr(g) => vec![&g.token_secret_ref],
            CredentialSource::Gcr(g) => vec![&g.json_key_secret_ref],
        }
    }
}

/// Static username and password.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BasicSource {
    /// Username for the registry (not secret).
    #[schemars(length(min = 1, max = 1024), regex(pattern = USERNAME_PATTERN))]
    pub username: String,
    /// Secret key holding the password or access token. `key` defaults to `password`.
    pub password_secret_ref: SecretKeyRef,
}

/// GitHub Container Registry personal access token.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GhcrSource {
    /// GitHub username that owns the token.
    #[schemars(length(min = 1, max = 1024), regex(pattern = USERNAME_PATTERN))]
    pub username: String,
    /// Secret key holding the personal access token (scope `read:packages`).
    pub token_secret_ref: SecretKeyRef,
}

/// Google service-account key for GCR or Artifact Registry (`*-docker.pkg.dev`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcrSource {
    /// Secret key holding the service-account key file (JSON, as downloaded from Google
    /// Cloud; it must contain `client_email` and `private_key`).
    pub json_key_secret_ref: SecretKeyRef,
}

/// A key in a Secret in the credential's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the Secret's data. Each source has its own default
    /// (`password`, `token`, `key.json`).
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl SecretKeyRef {
    /// The key to read, or `default` when none was given.
    pub fn key_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.key.as_deref().unwrap_or(default)
    }
}

/// What the written Secret looks like.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Name of the Secret. Defaults to the credential's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Extra labels for the Secret. regcred's own labels always win.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations for the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the controller last did with a credential.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` says whether the Secret holds the current credential.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the Secret the controller writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The server keys written into `.dockerconfigjson`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<String>,
    /// Kind of the source (`basic`, `ghcr`, `gcr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl CredentialStatus {
    /// The condition of the given type, if reported.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// The CustomResourceDefinitions regcred serves, as installed from `crds/`.
pub fn crds() -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> {
    use kube::CustomResourceExt;
    vec![RegistryCredential::crd()]
}

/// File name of a CRD under `crds/`: `<plural>.<group>.yaml`.
pub fn crd_file_name(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML written to `crds/` for a CRD.
pub fn crd_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_saphyr::SerializeError> {
    Ok(format!("# Generated by `regcred crdgen`; do not edit.\n{}", serde_saphyr::to_string(crd)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `crds/` is what users install; it must be exactly what the types generate.
    #[test]
    fn crds_directory_matches_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        for crd in crds() {
            let path = dir.join(crd_file_name(&crd));
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == crd_yaml(&crd).unwrap(),
                "{} is out of date: run `cargo run -- crdgen --dir crds`",
                path.display()
            );
        }
    }
}
