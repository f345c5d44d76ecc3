//! What `observe` gathers from the apiserver (and `probe` from the registry) for one Pod, Pod
//! template or image: plain data, so that `diagnose` is a pure function of it. Nothing here
//! holds a Secret's values except [`Login::password`], which is a `SecretString` and is never
//! serialised.

use std::collections::BTreeMap;

use secrecy::SecretString;

/// Everything known about one subject.
#[derive(Debug, Default)]
pub struct Facts {
    pub namespace: String,
    /// `pod/web-1`, `deployment/web`, `image/ghcr.io/org/app`.
    pub subject: String,
    /// Whether the pull Secrets are a Pod's (admission already added its ServiceAccount's) or
    /// a template's (its ServiceAccount's are added when each Pod is created).
    pub is_pod: bool,
    /// The Pod's or template's own `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
    pub service_account: Account,
    pub images: Vec<ImageUse>,
    /// By name, every Secret named by the Pod or its ServiceAccount.
    pub secrets: BTreeMap<String, SecretFacts>,
    /// The credentials of the namespace (and cluster credentials), as far as the user may list
    /// them: what could cover an image, or manages a Secret.
    pub credentials: Listing<Vec<CredentialFacts>>,
    /// `--verify`'s answers, by (image, Secret, server).
    pub probes: BTreeMap<(String, String, String), Probe>,
}

impl Facts {
    /// The Secrets a pull of this subject sends, with where each comes from: a Pod's own list
    /// (admission already added its ServiceAccount's when it was created), or for a template or
    /// image without a list of its own, the ServiceAccount's (admission adds them only to a Pod
    /// that names none).
    pub fn secrets_sent(&self) -> Vec<(String, &'static str)> {
        if self.is_pod || !self.pull_secrets.is_empty() {
            return self.pull_secrets.iter().map(|s| (s.clone(), "pod")).collect();
        }
        let account = self.service_account.pull_secrets.iter().flatten();
        account.map(|s| (s.clone(), "serviceAccount")).collect()
    }
}

/// The ServiceAccount the Pod runs as.
#[derive(Debug, Default, Clone)]
pub struct Account {
    pub name: String,
    /// Its `imagePullSecrets`; `None` when it does not exist or could not be read.
    pub pull_secrets: Option<Vec<String>>,
    /// Why it could not be read, when it could not.
    pub problem: Option<String>,
}

/// Where one image is used, and what the kubelet said about pulling it.
#[derive(Debug, Clone)]
pub struct ImageUse {
    pub image: String,
    /// `init`, `ephemeral` or `container`.
    pub role: &'static str,
    pub container: String,
    /// The kubelet's pull Events for it, newest first.
    pub events: Vec<PullEvent>,
}

/// One kubelet Event about a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullEvent {
    pub reason: String,
    pub message: String,
    pub count: i32,
}

/// A list the user may or may not be allowed to read.
#[derive(Debug, Clone)]
pub enum Listing<T> {
    Read(T),
    /// The apiserver refused (403), or the kind is not installed: the message says which.
    Unavailable(String),
}

impl<T: Default> Default for Listing<T> {
    fn default() -> Self {
        Listing::Read(T::default())
    }
}

/// One pull Secret, as far as it could be read.
#[derive(Debug, Clone)]
pub enum SecretFacts {
    Found(FoundSecret),
    Missing,
    /// No permission to read it (403): only the credential's status can tell what it holds.
    Forbidden,
    /// Another error: its message.
    Unreadable(String),
}

#[derive(Debug, Clone)]
pub struct FoundSecret {
    pub type_: String,
    /// Its `.dockerconfigjson` (or `.dockercfg`) logins; `Err`: why the document is unusable.
    pub logins: Result<Vec<Login>, String>,
    /// The credential its controller owner reference names: (kind, name).
    pub managed_by: Option<(String, String)>,
}

/// One `auths` entry: the server key and the login, never shown.
#[derive(Debug, Clone)]
pub struct Login {
    pub server: String,
    pub username: String,
    pub password: SecretString,
}

/// A RegistryCredential or ClusterRegistryCredential and its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialFacts {
    /// `RegistryCredential` or `ClusterRegistryCredential`.
    pub kind: String,
    pub name: String,
    /// The registry host the spec names (`spec.registry`), if any.
    pub registry: Option<String>,
    pub secret_name: Option<String>,
    /// The Secret its spec says it writes (`spec.secret.name`, else its name), whether or not
    /// it has yet.
    pub writes: String,
    /// `status.registries`: the server keys its Secret holds.
    pub registries: Vec<String>,
    pub ready: Option<Condition>,
    pub verified: Option<Condition>,
    pub expires_at: Option<String>,
    /// `spec.verify.insecure`: its registry speaks plain HTTP.
    pub plain_http: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// A registry's answer to `--verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `Verified`, `Unauthorized`, `Forbidden`, … (the Verified condition's reasons).
    pub reason: String,
    pub message: String,
}
