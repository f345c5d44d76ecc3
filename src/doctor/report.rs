//! What `regcred doctor` answers: per image, the Secrets the pull sends, the entry that matches,
//! the managing credential, the kubelet's Events and a verdict with the fix. Serialised as is
//! for `-o json`; it holds no Secret value.

use serde::Serialize;

use super::facts::Condition;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub namespace: String,
    pub subject: String,
    pub service_account: String,
    /// Every image has a pull Secret entry that matches it (and, with `--verify`, pulls).
    pub ok: bool,
    pub images: Vec<ImageReport>,
    /// What could not be read with the user's permissions, and other remarks.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    pub image: String,
    pub container: String,
    /// `init`, `ephemeral` or `container`.
    pub role: String,
    /// The registry as the image names it, after docker's normalisation (`docker.io`).
    pub registry: String,
    /// The repository the kubelet looks credentials up with (`docker.io/library/nginx`).
    pub repository: String,
    pub secrets: Vec<SecretReport>,
    /// The entries the kubelet sends, in the order it tries them: `secret` / `server`.
    pub matches: Vec<Match>,
    pub events: Vec<EventReport>,
    /// `--verify`'s answer for the first matching entry.
    pub check: Option<Check>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Match {
    pub secret: String,
    pub server: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretReport {
    pub name: String,
    /// `pod` (its own imagePullSecrets) or `serviceAccount` (what its ServiceAccount adds).
    pub from: String,
    /// `present`, `missing`, `forbidden` or `unreadable`.
    pub state: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Its `auths` server keys; for a Secret the user may not read, its credential's
    /// `status.registries`.
    pub entries: Vec<EntryReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryReport {
    pub server: String,
    pub matches: bool,
    /// Where it came from when not from the Secret itself (`credential status`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialReport {
    pub kind: String,
    pub name: String,
    pub ready: Option<Condition>,
    pub verified: Option<Condition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventReport {
    pub reason: String,
    pub message: String,
    pub count: i32,
    /// What the message says went wrong: `unauthorized`, `forbidden`, `not-found`, `tls`, ….
    pub cause: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub secret: String,
    pub server: String,
    /// `Verified` ("can pull now") or the registry's reason.
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    pub ok: bool,
    pub cause: Cause,
    /// One sentence: what is wrong (or right).
    pub summary: String,
    /// The exact changes that fix it, most direct first.
    pub fixes: Vec<String>,
}

/// Why an image cannot be pulled with the credentials it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// A pull Secret entry matches the image (and, with `--verify`, the registry accepts it).
    Ok,
    BadImage,
    NoPullSecrets,
    SecretMissing,
    SecretForbidden,
    WrongSecretType,
    InvalidSecret,
    WrongSpelling,
    NoEntryForRegistry,
    CredentialNotReady,
    Unauthorized,
    Forbidden,
    NotFound,
    RegistryError,
}
