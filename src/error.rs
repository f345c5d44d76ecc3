//! The library's errors. Each maps to a status condition reason, and none carries a secret
//! value: messages name Secrets and keys, never their contents.

/// Everything that can stop a credential from being synced.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {namespace}/{name} not found")]
    SourceSecretNotFound { namespace: String, name: String },

    #[error("Secret {namespace}/{name} has no key {key:?}")]
    SourceKeyMissing { namespace: String, name: String, key: String },

    #[error("key {key:?} of Secret {namespace}/{name} is empty")]
    SourceValueEmpty { namespace: String, name: String, key: String },

    #[error("key {key:?} of Secret {namespace}/{name} is not valid UTF-8")]
    SourceValueNotUtf8 { namespace: String, name: String, key: String },

    #[error("key {key:?} of Secret {namespace}/{name} is not a Google service-account key: {problem}")]
    InvalidGcrKey { namespace: String, name: String, key: String, problem: String },

    #[error("invalid username: {0}")]
    InvalidUsername(String),

    #[error("invalid registry {host:?}: {problem}")]
    InvalidRegistry { host: String, problem: String },

    #[error("Secret {namespace}/{name} exists and is not managed by this credential; regcred leaves it untouched")]
    SecretConflict { namespace: String, name: String },

    #[error("the object has no {0}")]
    MissingObjectField(&'static str),

    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// The `reason` of the Ready condition and of the Warning Event for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SourceSecretNotFound { .. } => "SourceSecretNotFound",
            Error::SourceKeyMissing { .. } => "SourceKeyMissing",
            Error::SourceValueEmpty { .. } | Error::SourceValueNotUtf8 { .. } => "InvalidSourceValue",
            Error::InvalidGcrKey { .. } => "InvalidGcrKey",
            Error::InvalidUsername(_) => "InvalidUsername",
            Error::InvalidRegistry { .. } => "InvalidRegistry",
            Error::SecretConflict { .. } => "SecretConflict",
            Error::MissingObjectField(_) => "InvalidObject",
            Error::Kube(_) => "KubernetesApiError",
        }
    }
}
