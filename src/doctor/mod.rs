//! `regcred doctor`: why a Pod cannot pull. For a Pod, a workload's Pod template or an image,
//! it reads (with the user's own permissions) the pull Secrets the kubelet would use, matches
//! each image against their entries by the kubelet's rules, looks at the credentials that manage
//! them and the kubelet's pull Events, optionally tries the login at the registry, and says what
//! to change. `observe` (reads) → `diagnose` (pure) → `render`.

pub mod cli;
pub mod diagnose;
pub mod error;
pub mod facts;
pub mod keyring;
pub mod observe;
pub mod probe;
pub mod render;
pub mod report;

pub use error::Error;
pub use observe::{Target, WorkloadKind};
pub use probe::ProbeOptions;
pub use report::Report;

/// What `regcred doctor` was asked.
#[derive(Debug, Clone)]
pub struct Request {
    pub namespace: String,
    pub target: Target,
    /// Try the matching login at the registry (`--verify`).
    pub verify: Option<ProbeOptions>,
}

/// Gathers, checks and diagnoses.
pub async fn run(client: &kube::Client, request: &Request) -> Result<Report, Error> {
    let mut facts = observe::observe(client, &request.namespace, &request.target).await?;
    let report = diagnose::diagnose(&facts);
    let Some(options) = &request.verify else { return Ok(report) };
    let http = crate::http::client(options.ca_bundle.as_deref(), "--ca-file").map_err(Error::HttpClient)?;
    probe::probe_all(&http, &mut facts, &report, options).await;
    Ok(diagnose::diagnose(&facts))
}
