//! Why `regcred doctor` could not look at all (what it could not read with the user's
//! permissions along the way is part of the report instead).

/// A failure to gather the subject itself. Names objects, never Secret contents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} not found in namespace {namespace}")]
    NotFound { what: String, namespace: String },
    #[error("reading {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no containers")]
    NoContainers(String),
    #[error(transparent)]
    BadImage(#[from] super::keyring::BadImage),
    #[error("--verify: {0}")]
    HttpClient(String),
}
