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

    #[error("{operation} failed: {code}: {message}")]
    Aws { operation: &'static str, code: String, message: String },

    #[error("{operation} answered unusably: {problem}")]
    InvalidAwsAnswer { operation: &'static str, problem: String },

    #[error("{operation} failed: {code}: {message}")]
    Gcp { operation: &'static str, code: String, message: String },

    #[error("{operation} answered unusably: {problem}")]
    InvalidGcpAnswer { operation: &'static str, problem: String },

    #[error(
        "the key in Secret {namespace}/{name} names the token endpoint {uri:?}, which is not Google's (the controller asks others only when started with --gcp-token-uri)"
    )]
    TokenUriNotAllowed { namespace: String, name: String, uri: String },

    #[error(
        "namespaced credentials may not use the controller's Google identity (the controller runs without --allow-ambient-gcp-identity)"
    )]
    AmbientGcpIdentityNotAllowed,

    #[error("gcr sources with access tokens need Google; they cannot be rendered offline (login: JsonKey can)")]
    GcpUnavailable,

    #[error(
        "namespaced credentials may not use the controller's AWS identity (the controller runs without --allow-ambient-aws-identity)"
    )]
    AmbientIdentityNotAllowed,

    #[error(
        "this regcred install may not request ServiceAccount tokens (chart value irsa.enabled=false, flag --disable-irsa), which IRSA and Workload Identity Federation need: use a key Secret, or ask the cluster admin to enable them"
    )]
    IrsaDisabled,

    #[error(
        "namespace {namespace:?} is outside the namespaces this controller serves (--namespaces); add it there or name a Secret in one of them"
    )]
    NamespaceOutOfScope { namespace: String },

    #[error("the controller has no AWS identity of its own")]
    AmbientIdentityMissing,

    #[error("ServiceAccount {namespace}/{name} not found")]
    ServiceAccountNotFound { namespace: String, name: String },

    #[error(
        "ServiceAccount {namespace}/{name} has no eks.amazonaws.com/role-arn annotation and the source sets no roleArn"
    )]
    NoRoleArn { namespace: String, name: String },

    #[error("a RegistryCredential may only refer to its own namespace, not {namespace:?}")]
    CrossNamespaceReference { namespace: String },

    #[error("references in a ClusterRegistryCredential's source need a namespace")]
    SourceNamespaceRequired,

    #[error("spec.secret sets {key:?}, a key regcred reserves for itself")]
    ReservedKey { key: String },

    #[error("{name} changed under every attempt to update its finalizers")]
    ObjectContended { name: String },

    #[error("invalid namespace selector: {0}")]
    InvalidNamespaceSelector(String),

    #[error("{failed} of {targets} namespaces did not get the Secret (see status.failures)")]
    NamespacesFailed { failed: usize, targets: usize },

    #[error(
        "every target holds the Secret, but it could not be removed from {namespaces} namespaces no longer selected (see status.failures)"
    )]
    CleanupFailed { namespaces: usize },

    #[error("ServiceAccount {namespace}/{name} changed under every attempt to patch it")]
    ServiceAccountContended { namespace: String, name: String },

    #[error("ecr sources need AWS; they cannot be rendered offline")]
    EcrUnavailable,

    #[error("{operation} failed: {code}: {message}")]
    Azure { operation: &'static str, code: String, message: String },

    #[error("{operation} answered unusably: {problem}")]
    InvalidAzureAnswer { operation: &'static str, problem: String },

    #[error(
        "registry {host:?} is not under the registry suffixes Azure tokens may be sent to ({allowed}; the controller's --acr-registry-suffixes)"
    )]
    RegistryHostNotAllowed { host: String, allowed: String },

    #[error(
        "the authority {authority:?} is not a Microsoft Entra authority regcred sends tokens to (the public and sovereign clouds', and others only when the controller runs with --azure-authority-host)"
    )]
    AuthorityHostNotAllowed { authority: String },

    #[error(
        "namespaced credentials may not use the controller's Azure managed identity (the controller runs without --allow-ambient-azure-identity)"
    )]
    AmbientAzureIdentityNotAllowed,

    #[error(
        "ServiceAccount {namespace}/{name} names no {what}: set it in source.acr.workloadIdentity or annotate the ServiceAccount with {annotation}"
    )]
    AzureIdentityIncomplete { namespace: String, name: String, what: &'static str, annotation: &'static str },

    #[error("ServiceAccount {namespace}/{name}'s annotation {annotation} is not a valid {what}")]
    InvalidAzureAnnotation { namespace: String, name: String, annotation: &'static str, what: &'static str },

    #[error("acr sources need Azure; they cannot be rendered offline")]
    AzureUnavailable,

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
            Error::Aws { .. } => "AwsRequestFailed",
            Error::InvalidAwsAnswer { .. } => "InvalidAwsAnswer",
            Error::Gcp { .. } => "GcpRequestFailed",
            Error::InvalidGcpAnswer { .. } => "InvalidGcpAnswer",
            Error::TokenUriNotAllowed { .. } => "TokenUriNotAllowed",
            Error::AmbientGcpIdentityNotAllowed => "AmbientIdentityNotAllowed",
            Error::GcpUnavailable => "GcpUnavailable",
            Error::AmbientIdentityNotAllowed => "AmbientIdentityNotAllowed",
            Error::AmbientIdentityMissing => "AmbientIdentityMissing",
            Error::IrsaDisabled => "IrsaDisabled",
            Error::NamespaceOutOfScope { .. } => "NamespaceOutOfScope",
            Error::ServiceAccountNotFound { .. } => "ServiceAccountNotFound",
            Error::NoRoleArn { .. } => "NoRoleArn",
            Error::EcrUnavailable => "EcrUnavailable",
            Error::Azure { .. } => "AzureRequestFailed",
            Error::InvalidAzureAnswer { .. } => "InvalidAzureAnswer",
            Error::RegistryHostNotAllowed { .. } => "RegistryHostNotAllowed",
            Error::AuthorityHostNotAllowed { .. } => "AuthorityHostNotAllowed",
            Error::AmbientAzureIdentityNotAllowed => "AmbientIdentityNotAllowed",
            Error::AzureIdentityIncomplete { .. } => "AzureIdentityIncomplete",
            Error::InvalidAzureAnnotation { .. } => "InvalidAzureAnnotation",
            Error::AzureUnavailable => "AzureUnavailable",
            Error::CrossNamespaceReference { .. } => "CrossNamespaceReference",
            Error::SourceNamespaceRequired => "SourceNamespaceRequired",
            Error::ServiceAccountContended { .. } | Error::ObjectContended { .. } => "ConcurrentUpdates",
            Error::InvalidNamespaceSelector(_) => "InvalidNamespaceSelector",
            Error::ReservedKey { .. } => "ReservedKey",
            Error::NamespacesFailed { .. } => "NamespacesFailed",
            Error::CleanupFailed { .. } => "CleanupFailed",
            Error::Kube(_) => "KubernetesApiError",
        }
    }
}
