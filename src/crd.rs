//! The `regcred.dev/v1alpha1` API: what users write and what the controller reports.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every regcred resource.
pub const GROUP: &str = "regcred.dev";

/// A registry host as `docker login` takes it: `host[:port]`, no scheme, no path.
const REGISTRY_HOST_PATTERN: &str = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)(:[0-9]{1,5})?$";
/// RFC 1123 subdomain, the rule for Secret names.
/// RFC 1123 label, the rule for namespace names.
const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
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
    shortname = "rcred",
    category = "regcred",
    printcolumn(name = "Registry", type_ = "string", json_path = ".status.registries"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Verified", type_ = "string", json_path = ".status.conditions[?(@.type==\"Verified\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.registry) || !has(self.source.basic)").message("spec.registry is required for a basic source"))]
#[x_kube(validation = Rule::new("!has(self.registry) || !has(self.source.ecr)").message("spec.registry does not apply to an ecr source: set source.ecr.registry"))]
#[x_kube(validation = Rule::new("!has(self.registry) || !has(self.source.acr)").message("spec.registry does not apply to an acr source: set source.acr.registry"))]
#[x_kube(validation = Rule::new(NO_SOURCE_NAMESPACE).message("a RegistryCredential reads its own namespace: references in source take no namespace"))]
#[x_kube(validation = Rule::new(NO_VERIFY_NAMESPACE).message("a RegistryCredential reads its own namespace: verify.caBundle takes no namespace"))]
#[serde(rename_all = "camelCase")]
pub struct RegistryCredentialSpec {
    /// Registry host the credential is for, as `docker login` takes it: `host[:port]`,
    /// without scheme or path (e.g. `ghcr.io`, `registry.example.com:5000`). Docker Hub
    /// (`docker.io`, `index.docker.io`, `registry-1.docker.io`) is written under two keys:
    /// `https://index.docker.io/v1/`, the key docker and the kubelet use for `nginx`,
    /// `docker.io/…` and `index.docker.io/…` images, and `registry-1.docker.io`, for images
    /// named `registry-1.docker.io/…`. Defaults to `ghcr.io` for a ghcr source and `gcr.io`
    /// for a gcr source; required for basic.
    #[schemars(length(max = 259), regex(pattern = REGISTRY_HOST_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,

    /// Where the credential comes from. Exactly one of `basic`, `ghcr`, `gcr`, `ecr` or `acr`.
    pub source: CredentialSource,

    /// The Secret to write (in this namespace).
    #[serde(default)]
    pub secret: SecretTemplate,

    /// ServiceAccounts of this namespace that get the Secret in their `imagePullSecrets`, so
    /// their pods pull without naming it. Also applied to ServiceAccounts created later.
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,

    /// How Pods get the Secret: through the `serviceAccounts` above (`ServiceAccounts`), added
    /// to each Pod as it is created by the controller's admission webhook (`Pods`), or both
    /// (`Both`). Defaults to the controller's `--attach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Attach>,

    /// Which Pods the admission webhook gives the Secret to. Omitted: the Pods with an image
    /// (init, ephemeral or regular container) from one of the credential's registries, matched
    /// as the kubelet matches pull credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelection>,

    /// Prove the credential against its registry (the `Verified` condition); `{}` turns it
    /// on. Off unless set here or the controller runs with `--verify-default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
}

/// CEL: no reference in `verify.caBundle` names a namespace.
const NO_VERIFY_NAMESPACE: &str = "!has(self.verify) || !has(self.verify.caBundle) || ((!has(self.verify.caBundle.configMap) || !has(self.verify.caBundle.configMap.__namespace__)) && (!has(self.verify.caBundle.secret) || !has(self.verify.caBundle.secret.__namespace__)))";
/// CEL: every reference in `verify.caBundle` names a namespace.
const VERIFY_NAMESPACE_SET: &str = "!has(self.verify) || !has(self.verify.caBundle) || ((!has(self.verify.caBundle.configMap) || has(self.verify.caBundle.configMap.__namespace__)) && (!has(self.verify.caBundle.secret) || has(self.verify.caBundle.secret.__namespace__)))";

/// CEL: no reference in `source` names a namespace.
const NO_SOURCE_NAMESPACE: &str = "(!has(self.source.basic) || !has(self.source.basic.passwordSecretRef.__namespace__)) && (!has(self.source.ghcr) || !has(self.source.ghcr.tokenSecretRef.__namespace__)) && (!has(self.source.gcr) || !has(self.source.gcr.jsonKeySecretRef) || !has(self.source.gcr.jsonKeySecretRef.__namespace__)) && (!has(self.source.gcr) || !has(self.source.gcr.workloadIdentity) || !has(self.source.gcr.workloadIdentity.serviceAccountRef.__namespace__)) && (!has(self.source.ecr) || !has(self.source.ecr.auth.secretRef) || !has(self.source.ecr.auth.secretRef.__namespace__)) && (!has(self.source.ecr) || !has(self.source.ecr.auth.serviceAccountRef) || !has(self.source.ecr.auth.serviceAccountRef.__namespace__)) && (!has(self.source.acr) || !has(self.source.acr.workloadIdentity) || !has(self.source.acr.workloadIdentity.serviceAccountRef.__namespace__)) && (!has(self.source.acr) || !has(self.source.acr.servicePrincipal) || !has(self.source.acr.servicePrincipal.clientSecretRef.__namespace__))";
/// CEL: every reference in `source` names a namespace.
const SOURCE_NAMESPACE_SET: &str = "(!has(self.source.basic) || has(self.source.basic.passwordSecretRef.__namespace__)) && (!has(self.source.ghcr) || has(self.source.ghcr.tokenSecretRef.__namespace__)) && (!has(self.source.gcr) || !has(self.source.gcr.jsonKeySecretRef) || has(self.source.gcr.jsonKeySecretRef.__namespace__)) && (!has(self.source.gcr) || !has(self.source.gcr.workloadIdentity) || has(self.source.gcr.workloadIdentity.serviceAccountRef.__namespace__)) && (!has(self.source.ecr) || !has(self.source.ecr.auth.secretRef) || has(self.source.ecr.auth.secretRef.__namespace__)) && (!has(self.source.ecr) || !has(self.source.ecr.auth.serviceAccountRef) || has(self.source.ecr.auth.serviceAccountRef.__namespace__)) && (!has(self.source.acr) || !has(self.source.acr.workloadIdentity) || has(self.source.acr.workloadIdentity.serviceAccountRef.__namespace__)) && (!has(self.source.acr) || !has(self.source.acr.servicePrincipal) || has(self.source.acr.servicePrincipal.clientSecretRef.__namespace__))";

/// Puts one pull Secret into every selected namespace, kept in sync with one source.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "regcred.dev",
    version = "v1alpha1",
    kind = "ClusterRegistryCredential",
    doc = "A cluster-wide registry credential: the controller keeps a kubernetes.io/dockerconfigjson Secret in every selected namespace in sync with it.",
    status = "ClusterCredentialStatus",
    shortname = "crcred",
    category = "regcred",
    printcolumn(name = "Registry", type_ = "string", json_path = ".status.registries"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName"),
    printcolumn(name = "Targets", type_ = "integer", json_path = ".status.targetNamespaces"),
    printcolumn(name = "Synced", type_ = "integer", json_path = ".status.syncedNamespaces"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failedNamespaces"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Verified", type_ = "string", json_path = ".status.conditions[?(@.type==\"Verified\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.registry) || !has(self.source.basic)").message("spec.registry is required for a basic source"))]
#[x_kube(validation = Rule::new("!has(self.registry) || !has(self.source.ecr)").message("spec.registry does not apply to an ecr source: set source.ecr.registry"))]
#[x_kube(validation = Rule::new("!has(self.registry) || !has(self.source.acr)").message("spec.registry does not apply to an acr source: set source.acr.registry"))]
#[x_kube(validation = Rule::new(SOURCE_NAMESPACE_SET).message("a ClusterRegistryCredential's references in source need a namespace"))]
#[x_kube(validation = Rule::new(VERIFY_NAMESPACE_SET).message("a ClusterRegistryCredential's verify.caBundle needs a namespace"))]
#[serde(rename_all = "camelCase")]
pub struct ClusterRegistryCredentialSpec {
    /// Registry host, as for RegistryCredential.
    #[schemars(length(max = 259), regex(pattern = REGISTRY_HOST_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,

    /// Where the credential comes from, as for RegistryCredential; every Secret or
    /// ServiceAccount reference names its namespace. `ecr.auth.ambient`, `gcr.ambient` and
    /// `acr.ambient` are always allowed.
    pub source: CredentialSource,

    /// Which namespaces get the Secret. Omitted: all namespaces.
    #[serde(default)]
    pub namespaces: NamespaceSelection,

    /// The Secret to write in each selected namespace. The name defaults to the credential's.
    #[serde(default)]
    pub secret: SecretTemplate,

    /// ServiceAccounts (by name, in every selected namespace) that get the Secret in their
    /// `imagePullSecrets`, including ServiceAccounts created later.
    #[schemars(length(max = 64), inner(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,

    /// How Pods get the Secret: through the `serviceAccounts` above (`ServiceAccounts`), added
    /// to each Pod as it is created by the controller's admission webhook (`Pods`), or both
    /// (`Both`). Defaults to the controller's `--attach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Attach>,

    /// Which Pods the admission webhook gives the Secret to. Omitted: the Pods with an image
    /// (init, ephemeral or regular container) from one of the credential's registries, matched
    /// as the kubelet matches pull credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelection>,

    /// Prove the credential against its registry, as for RegistryCredential: once per
    /// registry, not per namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
}

/// How to prove a credential against its registry: the Distribution auth handshake docker and
/// containerd perform (`GET /v2/`, then the `Basic` or `Bearer` challenge with the login),
/// after every change of the Secret's content and every `--verify-interval`. It never changes
/// `Ready` and never holds back the Secret.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.reference) || has(self.repository)").message("verify.reference needs verify.repository"))]
pub struct VerifySpec {
    /// Also prove pull access to this repository (e.g. `team/app`): its token scope
    /// `repository:team/app:pull` and a manifest `HEAD` of `reference`.
    #[schemars(length(min = 1, max = 255), regex(pattern = REPOSITORY_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Tag or digest of the manifest in `repository` to check; default `latest`.
    #[schemars(length(min = 1, max = 128), regex(pattern = REFERENCE_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// CA certificates (PEM) to trust for this registry besides the system's: a key of a
    /// ConfigMap or a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundle>,
    /// Plain HTTP, for registries without TLS (test registries). HTTPS otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
}

/// Where a CA bundle is: exactly one of `configMap` or `secret` (key default `ca.crt`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.configMap) != has(self.secret)").message("caBundle needs exactly one of configMap or secret"))]
pub struct CaBundle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretKeyRef>,
}

/// A key in a ConfigMap: in the credential's own namespace, or the given one for a
/// ClusterRegistryCredential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// Name of the ConfigMap.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the ConfigMap. Only for ClusterRegistryCredential, where it is required.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key within the ConfigMap's data; default `ca.crt`.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A repository name as the Distribution spec allows it (lowercase path components).
const REPOSITORY_PATTERN: &str = r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$";
/// A tag, or a digest.
const REFERENCE_PATTERN: &str =
    r"^([A-Za-z0-9_][A-Za-z0-9._-]{0,127}|[a-z0-9]+([+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,})$";

/// How a credential's Secret reaches Pods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Attach {
    /// Listed in the `imagePullSecrets` of the credential's `serviceAccounts`.
    ServiceAccounts,
    /// Added to each new Pod that needs it by the admission webhook; no ServiceAccount is
    /// written.
    Pods,
    /// Both.
    Both,
}

impl Attach {
    pub fn service_accounts(self) -> bool {
        matches!(self, Attach::ServiceAccounts | Attach::Both)
    }

    pub fn pods(self) -> bool {
        matches!(self, Attach::Pods | Attach::Both)
    }
}

/// Which Pods the admission webhook gives a credential's Secret to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelection {
    /// Pods whose labels match, whatever their images; `{}` selects every Pod. Omitted: the
    /// Pods with an image from one of the credential's registries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Which namespaces a ClusterRegistryCredential writes to: those matching `selector` or
/// listed in `names`, minus `exclude`. Neither `selector` nor `names`: every namespace.
/// Terminating namespaces are skipped.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelection {
    /// Label selector on namespaces; `{}` selects all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Namespaces selected by name, in addition to the selector.
    #[schemars(length(max = 1000), inner(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Namespaces never written to, even when selected.
    #[schemars(length(max = 1000), inner(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

/// What the controller last did with a ClusterRegistryCredential.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterCredentialStatus {
    /// The same fields as a RegistryCredential's status; `Ready` is True when every target
    /// namespace holds the current Secret.
    #[serde(flatten)]
    pub credential: CredentialStatus,
    /// Namespaces selected now (terminating ones excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespaces: Option<u32>,
    /// Target namespaces whose Secret is current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_namespaces: Option<u32>,
    /// Target namespaces where the Secret could not be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_namespaces: Option<u32>,
    /// The first failing namespaces (at most 20, by name) and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<NamespaceFailure>,
}

/// Why one namespace did not get its Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceFailure {
    pub namespace: String,
    /// The same reason a RegistryCredential's Ready condition would give.
    pub reason: String,
    pub message: String,
}

/// Where a credential comes from. Exactly one member is set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(clippy::large_enum_variant)] // built once per reconcile; boxing buys nothing
pub enum CredentialSource {
    /// A username and a password (or token) read from a Secret in this namespace.
    Basic(BasicSource),
    /// GitHub Container Registry: a GitHub username and a personal access token.
    Ghcr(GhcrSource),
    /// Google Container Registry / Artifact Registry: a short-lived OAuth access token (from
    /// a service-account key, Workload Identity Federation or the controller's own Google
    /// identity), refreshed well before it expires; or a key sent as `_json_key`.
    Gcr(GcrSource),
    /// AWS Elastic Container Registry: a 12-hour token from GetAuthorizationToken, refreshed
    /// well before it expires.
    Ecr(EcrSource),
    /// Azure Container Registry: an ACR refresh token (about 3 hours, as its `exp` says),
    /// exchanged for a Microsoft Entra token of workload identity, a service principal or the
    /// controller's managed identity, refreshed well before it expires.
    Acr(AcrSource),
}

impl CredentialSource {
    /// Short name of the source kind, as shown in status and `kubectl get`.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSource::Basic(_) => "basic",
            CredentialSource::Ghcr(_) => "ghcr",
            CredentialSource::Gcr(_) => "gcr",
            CredentialSource::Ecr(_) => "ecr",
            CredentialSource::Acr(_) => "acr",
        }
    }

    /// Every Secret this source reads, as (namespace, name); the namespace is `None` where the
    /// reference names none (it resolves in the credential's own namespace).
    pub fn secret_refs(&self) -> Vec<(Option<&str>, &str)> {
        fn of(r: &SecretKeyRef) -> (Option<&str>, &str) {
            (r.namespace.as_deref(), r.name.as_str())
        }
        match self {
            CredentialSource::Basic(b) => vec![of(&b.password_secret_ref)],
            CredentialSource::Ghcr(g) => vec![of(&g.token_secret_ref)],
            CredentialSource::Gcr(g) => g.json_key_secret_ref.iter().map(of).collect(),
            CredentialSource::Ecr(e) => match &e.auth {
                EcrAuth::SecretRef(keys) => vec![(keys.namespace.as_deref(), keys.name.as_str())],
                _ => Vec::new(),
            },
            CredentialSource::Acr(a) => a.service_principal.iter().map(|sp| of(&sp.client_secret_ref)).collect(),
        }
    }

    /// The Kubernetes ServiceAccount whose tokens the source exchanges (ECR's IRSA, Google's
    /// Workload Identity Federation, Azure workload identity), as (namespace, name).
    pub fn token_service_account(&self) -> Option<(Option<&str>, &str)> {
        match self {
            CredentialSource::Ecr(EcrSource { auth: EcrAuth::ServiceAccountRef(sa), .. }) => {
                Some((sa.namespace.as_deref(), sa.name.as_str()))
            }
            CredentialSource::Gcr(GcrSource { workload_identity: Some(wi), .. }) => {
                Some((wi.service_account_ref.namespace.as_deref(), wi.service_account_ref.name.as_str()))
            }
            CredentialSource::Acr(AcrSource { workload_identity: Some(wi), .. }) => {
                Some((wi.service_account_ref.namespace.as_deref(), wi.service_account_ref.name.as_str()))
            }
            _ => None,
        }
    }

    /// Whether the source hands out tokens that expire (and are refreshed): `Degraded`, the
    /// expiry in status, and rotation apply to it.
    pub fn expires(&self) -> bool {
        match self {
            CredentialSource::Ecr(_) | CredentialSource::Acr(_) => true,
            CredentialSource::Gcr(gcr) => gcr.login != Some(KeyLogin::JsonKey),
            CredentialSource::Basic(_) | CredentialSource::Ghcr(_) => false,
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

/// Where a GCR or Artifact Registry (`*-docker.pkg.dev`) login comes from: exactly one of
/// `jsonKeySecretRef`, `workloadIdentity` or `ambient`. The Secret holds the user
/// `oauth2accesstoken` and an access token of about an hour, refreshed well before it expires;
/// only `login: JsonKey` writes the key itself.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.jsonKeySecretRef) ? 1 : 0) + (has(self.workloadIdentity) ? 1 : 0) + (has(self.ambient) ? 1 : 0) == 1").message("set exactly one of jsonKeySecretRef, workloadIdentity or ambient"))]
#[x_kube(validation = Rule::new("!has(self.login) || has(self.jsonKeySecretRef)").message("login applies to jsonKeySecretRef only"))]
#[x_kube(validation = Rule::new("!has(self.impersonate) || !has(self.login) || self.login != 'JsonKey'").message("a JsonKey login sends the key itself and cannot impersonate"))]
pub struct GcrSource {
    /// Secret key holding a service-account key file (JSON, as downloaded from Google
    /// Cloud; it must contain `client_email` and `private_key`). The key signs a JWT that its
    /// `token_uri` exchanges for an access token; it never leaves the source Secret unless
    /// `login` is `JsonKey`. Default key `key.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_key_secret_ref: Option<SecretKeyRef>,
    /// What a key logs in with: `AccessToken` (default), or `JsonKey` to write the key
    /// itself as the password of `_json_key` (a credential that never expires, in every
    /// Secret: only where access tokens cannot be used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<KeyLogin>,
    /// Workload Identity Federation for a Kubernetes ServiceAccount (the Google twin of
    /// IRSA): its token, for the provider's audience, exchanged at Google STS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
    /// The controller's own Google identity (GKE Workload Identity, or the node's service
    /// account) from the metadata server. Namespaced credentials may use it only when the
    /// controller runs with `--allow-ambient-gcp-identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ambient: Option<AmbientAuth>,
    /// A Google service account to impersonate with that identity (IAM Credentials
    /// `generateAccessToken`): the token written is that account's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonate: Option<Impersonate>,
}

/// What a service-account key logs in with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum KeyLogin {
    /// `oauth2accesstoken` and an access token the key obtains (about an hour).
    AccessToken,
    /// `_json_key` and the key file itself.
    JsonKey,
}

/// A Workload Identity Federation provider that trusts this cluster's ServiceAccount tokens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// The ServiceAccount whose token is exchanged: of the credential's own namespace, or the
    /// given one for a ClusterRegistryCredential. Its principal is
    /// `principal://iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/subject/system:serviceaccount:NS:NAME`.
    pub service_account_ref: AccountRef,
    /// The provider, as STS's audience:
    /// `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X`.
    /// The ServiceAccount token is requested for this audience too (the provider's default).
    #[schemars(length(max = 300), regex(pattern = WIF_AUDIENCE_PATTERN))]
    pub audience: String,
}

/// A workload identity pool provider's resource name with the `//iam.googleapis.com/` prefix.
pub const WIF_AUDIENCE_PATTERN: &str = r"^//iam\.googleapis\.com/projects/[0-9]+/locations/global/workloadIdentityPools/[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}$";

/// A Kubernetes ServiceAccount: of the credential's own namespace, or the given one for a
/// ClusterRegistryCredential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountRef {
    /// Name of the ServiceAccount.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the ServiceAccount. Only for ClusterRegistryCredential, where it is
    /// required; a RegistryCredential always uses its own namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A Google service account to impersonate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Impersonate {
    /// Its email, e.g. `puller@my-project.iam.gserviceaccount.com`. The identity needs
    /// `roles/iam.workloadIdentityUser` (federated) or `roles/iam.serviceAccountTokenCreator`
    /// (a service account) on it.
    #[schemars(length(min = 3, max = 254), regex(pattern = r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+$"))]
    pub service_account: String,
}

/// An Azure Container Registry and the Microsoft Entra identity whose token regcred exchanges
/// at the registry's `/oauth2/exchange` for an ACR refresh token: exactly one of
/// `workloadIdentity`, `servicePrincipal` or `ambient`. The Secret holds the user
/// `00000000-0000-0000-0000-000000000000` (which tells ACR the password is a refresh token) and
/// that token, refreshed well before the `exp` it carries.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.workloadIdentity) ? 1 : 0) + (has(self.servicePrincipal) ? 1 : 0) + (has(self.ambient) ? 1 : 0) == 1").message("set exactly one of workloadIdentity, servicePrincipal or ambient"))]
pub struct AcrSource {
    /// The registry host, `<name>.azurecr.io` (sovereign clouds: `.azurecr.cn`, `.azurecr.us`).
    /// The controller sends Azure tokens only to hosts under its `--acr-registry-suffixes`
    /// (default those three); another host is refused (`RegistryHostNotAllowed`).
    #[schemars(length(min = 1, max = 253), regex(pattern = ACR_HOST_PATTERN))]
    pub registry: String,
    /// Azure workload identity for a Kubernetes ServiceAccount: its token (audience
    /// `api://AzureADTokenExchange`) is the client assertion of an Entra application or
    /// user-assigned managed identity whose federated identity credential trusts this
    /// cluster's issuer and the subject `system:serviceaccount:<namespace>:<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<AcrWorkloadIdentity>,
    /// A service principal (an Entra application) and its client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_principal: Option<AzureServicePrincipal>,
    /// The controller's own managed identity, from the instance metadata service (IMDS).
    /// Namespaced credentials may use it only when the controller runs with
    /// `--allow-ambient-azure-identity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ambient: Option<AzureAmbient>,
    /// The Entra token's scope: `ContainerRegistry` (default,
    /// `https://containerregistry.azure.net/.default`, as the kubelet's ACR provider asks) or
    /// `ResourceManager` (the Azure Resource Manager scope of the authority's cloud, as
    /// msi-acrpull asks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<AcrTokenScope>,
    /// The Microsoft Entra authority, e.g. `https://login.microsoftonline.com` (default for
    /// `.azurecr.io`), `https://login.chinacloudapi.cn` (default for `.azurecr.cn`),
    /// `https://login.microsoftonline.us` (default for `.azurecr.us`); other authorities (an
    /// air-gapped cloud) only when the controller runs with `--azure-authority-host` naming
    /// them. Not used by `ambient`.
    #[schemars(length(min = 8, max = 253), regex(pattern = AUTHORITY_HOST_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_host: Option<String>,
}

/// A registry host name without scheme, port or path, in lowercase.
const ACR_HOST_PATTERN: &str = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$";
/// An authority: scheme and host[:port], nothing after but an optional `/`.
const AUTHORITY_HOST_PATTERN: &str = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$";
/// An Entra application (client) id.
const GUID_PATTERN: &str = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
/// An Entra tenant: its id (a GUID) or one of its domains (`contoso.onmicrosoft.com`).
const TENANT_PATTERN: &str = r"^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+)$";

/// Which Entra scope the token exchanged at ACR is asked for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AcrTokenScope {
    /// `https://containerregistry.azure.net/.default`.
    ContainerRegistry,
    /// Azure Resource Manager: `https://management.azure.com/.default` (the authority's
    /// cloud's own in the sovereign clouds).
    ResourceManager,
}

/// Azure workload identity for a ServiceAccount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcrWorkloadIdentity {
    /// The ServiceAccount whose token is the client assertion: of the credential's own
    /// namespace, or the given one for a ClusterRegistryCredential.
    pub service_account_ref: AccountRef,
    /// The application (client) id; default: the ServiceAccount's
    /// `azure.workload.identity/client-id` annotation.
    #[schemars(regex(pattern = GUID_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The tenant (id or domain); default: the ServiceAccount's
    /// `azure.workload.identity/tenant-id` annotation.
    #[schemars(length(max = 253), regex(pattern = TENANT_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
}

/// A service principal with a client secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureServicePrincipal {
    /// The tenant (id or domain).
    #[schemars(length(max = 253), regex(pattern = TENANT_PATTERN))]
    pub tenant_id: String,
    /// The application (client) id.
    #[schemars(regex(pattern = GUID_PATTERN))]
    pub client_id: String,
    /// Secret key holding the client secret. `key` defaults to `clientSecret`.
    pub client_secret_ref: SecretKeyRef,
}

/// The controller's managed identity: the system-assigned one, or the user-assigned one named
/// by `clientId` or `resourceId` (at most one).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.clientId) || !has(self.resourceId)").message("set at most one of clientId or resourceId"))]
pub struct AzureAmbient {
    /// Client id of a user-assigned managed identity.
    #[schemars(regex(pattern = GUID_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Resource id of a user-assigned managed identity,
    /// `/subscriptions/…/resourceGroups/…/providers/Microsoft.ManagedIdentity/userAssignedIdentities/…`.
    #[schemars(
        length(max = 512),
        regex(
            pattern = r"^/subscriptions/[^/?#&=]+/resource[Gg]roups/[^/?#&=]+/providers/Microsoft\.ManagedIdentity/userAssignedIdentities/[^/?#&=]+$"
        )
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
}

/// Which ECR registries, and which AWS identity asks for their token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.registry) != has(self.region)").message("set exactly one of registry or region"))]
#[x_kube(validation = Rule::new("!has(self.registryIds) || has(self.region)").message("registryIds goes with region"))]
pub struct EcrSource {
    /// ECR registry host, `<account>.dkr.ecr.<region>.amazonaws.com` (also `.amazonaws.com.cn`,
    /// `dkr.ecr-fips`, the dual-stack `<account>.dkr-ecr.<region>.on.aws`, and the other AWS
    /// partitions' domains); account and region are read from it.
    #[schemars(length(max = 253), regex(pattern = crate::source::ecr::host::ecr_host_pattern()))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
    /// AWS region, instead of `registry`; with `registryIds` for several accounts.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// AWS account ids whose registries go into the one Secret (one `auths` entry each).
    /// Empty: the account of the identity.
    #[schemars(length(max = 20), inner(regex(pattern = r"^[0-9]{12}$")))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_ids: Vec<String>,
    /// The AWS identity that calls GetAuthorizationToken. Exactly one member.
    pub auth: EcrAuth,
    /// A role to assume with that identity first, e.g. for a registry in another account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assume_role: Option<AssumeRole>,
}

/// The AWS identity of an ECR source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EcrAuth {
    /// Access keys in a Secret of this namespace.
    SecretRef(AwsKeysRef),
    /// IRSA for this tenant: the controller requests a token for this ServiceAccount (of
    /// this namespace, audience `sts.amazonaws.com`) and exchanges it with
    /// AssumeRoleWithWebIdentity for the role in its `eks.amazonaws.com/role-arn`
    /// annotation (or `roleArn`). Only roles that trust this ServiceAccount work.
    ServiceAccountRef(ServiceAccountRef),
    /// The controller's own AWS identity (environment, web identity, EKS Pod Identity, ECS,
    /// EC2 instance profile). Namespaced credentials may use it only when the controller
    /// runs with `--allow-ambient-aws-identity`.
    Ambient(AmbientAuth),
}

/// A Secret with AWS access keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsKeysRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the Secret. Only for ClusterRegistryCredential, where it is required; a
    /// RegistryCredential always reads its own namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key of the access key id. Default `accessKeyId`.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_key: Option<String>,
    /// Key of the secret access key. Default `secretAccessKey`.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_key: Option<String>,
    /// Key of an optional session token. Default `sessionToken`.
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token_key: Option<String>,
}

/// A ServiceAccount whose IAM role (IRSA) to use: of the credential's own namespace, or the
/// given one for a ClusterRegistryCredential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// Name of the ServiceAccount.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the ServiceAccount. Only for ClusterRegistryCredential, where it is required; a
    /// RegistryCredential always reads its own namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Role to assume; defaults to the ServiceAccount's `eks.amazonaws.com/role-arn` annotation.
    #[schemars(length(min = 20, max = 2048), regex(pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
}

/// Use the controller's own AWS identity. No fields.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AmbientAuth {}

/// A role assumed on top of the ECR source's identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssumeRole {
    /// ARN of the role.
    #[schemars(length(min = 20, max = 2048), regex(pattern = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+$"))]
    pub role_arn: String,
    /// External id the role's trust policy requires, if any.
    #[schemars(length(min = 2, max = 1224))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// Session name (default `regcred`), shown in CloudTrail.
    #[schemars(length(min = 2, max = 64), regex(pattern = r"^[\w+=,.@-]+$"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
}

/// A key in a Secret: in the credential's own namespace, or the given one for a
/// ClusterRegistryCredential.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Namespace of the Secret. Only for ClusterRegistryCredential, where it is required; a
    /// RegistryCredential always reads its own namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
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
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(NO_RESERVED_KEYS).message("labels and annotations under regcred.dev/ and app.kubernetes.io/managed-by are regcred's own"))]
#[x_kube(validation = Rule::new(QUALIFIED_KEYS).message("label and annotation keys must be qualified names ([prefix/]name, as Kubernetes requires)"))]
#[x_kube(validation = Rule::new(LABEL_VALUES).message("label values must be at most 63 characters: alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"))]
#[x_kube(validation = Rule::new(annotation_values()).field_path(".annotations").message(format!("annotation values must be at most {MAX_ANNOTATION_VALUE_BYTES} bytes").as_str()))]
pub struct SecretTemplate {
    /// Name of the Secret. Defaults to the credential's name.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Extra labels for the Secret. Keys under `regcred.dev/` and
    /// `app.kubernetes.io/managed-by` are regcred's own and refused.
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": 63}))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations for the Secret, with the same reserved keys as labels. At most 64,
    /// each value at most 3072 bytes (UTF-8): with keys of at most 317 characters they total
    /// under 212 KiB, within the 256 KiB Kubernetes allows for a Secret's annotations.
    #[schemars(extend("maxProperties" = 64, "additionalProperties" = {"type": "string", "maxLength": MAX_ANNOTATION_VALUE_BYTES}))]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// CEL: no template key is one of regcred's own.
const NO_RESERVED_KEYS: &str = "(!has(self.labels) || self.labels.all(k, !k.startsWith('regcred.dev/') && k != 'app.kubernetes.io/managed-by')) && (!has(self.annotations) || self.annotations.all(k, !k.startsWith('regcred.dev/') && k != 'app.kubernetes.io/managed-by'))";
/// CEL: keys are qualified names: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters.
const QUALIFIED_KEYS: &str = "(!has(self.labels) || self.labels.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))) && (!has(self.annotations) || self.annotations.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$')))";
/// The longest value of a template annotation, in bytes of UTF-8 (the schema's `maxLength`
/// counts characters, so a CEL rule counts the bytes).
pub const MAX_ANNOTATION_VALUE_BYTES: usize = 3072;

/// CEL: no annotation value is longer than [`MAX_ANNOTATION_VALUE_BYTES`] bytes.
fn annotation_values() -> String {
    format!(
        "!has(self.annotations) || self.annotations.all(k, size(bytes(self.annotations[k])) <= {MAX_ANNOTATION_VALUE_BYTES})"
    )
}

/// CEL: label values as Kubernetes requires them.
const LABEL_VALUES: &str = "!has(self.labels) || self.labels.all(k, self.labels[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$'))";

/// What the controller last did with a credential.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` says whether the Secret holds the current credential.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the Secret the controller writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The server keys written into `.dockerconfigjson`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<String>,
    /// Kind of the source (`basic`, `ghcr`, `gcr`, `ecr`, `acr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// When the token in the Secret expires (ECR, gcr access tokens, ACR refresh tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the controller will fetch the next token (ECR, gcr access tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_at: Option<Time>,
    /// The SHA-256 digest (first 128 bits, hex) of the `.dockerconfigjson` the controller
    /// last wrote with a token (ECR, gcr access tokens). After a restart or a leader change,
    /// a live Secret's token is reused only when its bytes have this digest: a Secret edited
    /// in a target namespace is repaired, never taken as the token. Not the token itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_digest: Option<String>,
    /// The fingerprint (SHA-256, first 128 bits, hex) of the identity the token in the Secret
    /// was issued to (ECR, gcr access tokens): after a restart a token is reused only for the
    /// same identity. Kept here, not on the Secret, where a target namespace's editor cannot
    /// change it. Not the identity itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_identity: Option<String>,
    /// When the registry last answered the check behind the `Verified` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
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
    // By name, as `crds/` lists them.
    vec![ClusterRegistryCredential::crd(), RegistryCredential::crd()]
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

    /// Item 15: conditions are a map keyed by type (server-side apply merges them by type),
    /// and the short names differ from the shared category.
    #[test]
    fn the_v1_shape_holds() {
        for crd in crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
            assert_eq!(conditions["x-kubernetes-list-type"], "map", "{}", crd.spec.names.kind);
            assert_eq!(conditions["x-kubernetes-list-map-keys"], serde_json::json!(["type"]));
            let names = &crd.spec.names;
            assert_eq!(names.categories.as_deref(), Some(&["regcred".to_string()][..]));
            assert!(!names.short_names.iter().flatten().any(|s| s == "regcred"), "{names:?}");
        }
    }

    /// Issue 20, item 11d: the Registry column prints the whole list of server keys (a printer
    /// column shows only the first result of its JSONPath, so `registries[*]` showed one).
    #[test]
    fn the_registry_column_is_the_whole_list() {
        for crd in crds() {
            let columns = crd.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
            let registry = columns.iter().find(|c| c.name == "Registry").expect("a Registry column");
            assert_eq!(registry.json_path, ".status.registries", "{}", crd.spec.names.kind);
        }
    }

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
