//! `--verify`: the registry handshake (`verify::handshake`, as the Verified condition runs it)
//! with the entry the kubelet would send first, against the image's own repository and
//! reference (a manifest `HEAD`), so the answer is "can pull now" or the registry's reason.

use reqwest::Client;

use super::{
    facts::{Facts, Login, Probe, SecretFacts},
    keyring,
    report::Report,
};
use crate::verify::{handshake, reach::Reach};

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    /// Speak plain HTTP to every registry (else only where the managing credential's
    /// `spec.verify.insecure` says so).
    pub plain_http: bool,
    /// PEM CA certificates to trust besides the system's (`--ca-file`).
    pub ca_bundle: Option<Vec<u8>>,
}

/// Runs the handshake for the first matching entry of each image in `report`, and records the
/// answers in `facts.probes`.
pub async fn probe_all(client: &Client, facts: &mut Facts, report: &Report, options: &ProbeOptions) {
    for image in &report.images {
        let Some(first) = image.matches.first() else { continue };
        let key = (image.image.clone(), first.secret.clone(), first.server.clone());
        if facts.probes.contains_key(&key) {
            continue;
        }
        let probe = probe_one(client, facts, &image.image, &first.secret, &first.server, options).await;
        facts.probes.insert(key, probe);
    }
}

async fn probe_one(
    client: &Client,
    facts: &Facts,
    image: &str,
    secret: &str,
    server: &str,
    options: &ProbeOptions,
) -> Probe {
    let Some(login) = login_of(facts, secret, server) else {
        return Probe {
            reason: "NotChecked".into(),
            message: format!("Secret {secret} cannot be read with your permissions, so its login cannot be tried"),
        };
    };
    let Ok(image) = keyring::parse_image(image) else {
        return Probe { reason: "NotChecked".into(), message: "not a valid image reference".into() };
    };
    let plain_http = options.plain_http || managed_plain_http(facts, secret);
    let reach = Reach::default();
    let target = handshake::Target {
        host: image.pull_host(),
        username: &login.username,
        password: &login.password,
        repository: Some(&image.path),
        reference: &image.reference,
        plain_http,
        reach: &reach,
    };
    let finding = handshake::check(client, &target).await;
    Probe { reason: finding.reason.as_str().to_string(), message: finding.message }
}

fn login_of<'a>(facts: &'a Facts, secret: &str, server: &str) -> Option<&'a Login> {
    match facts.secrets.get(secret)? {
        SecretFacts::Found(found) => found.logins.as_ref().ok()?.iter().find(|l| l.server == server),
        _ => None,
    }
}

/// Whether the Secret's credential says its registry speaks plain HTTP.
fn managed_plain_http(facts: &Facts, secret: &str) -> bool {
    let Some(SecretFacts::Found(found)) = facts.secrets.get(secret) else { return false };
    let Some((kind, name)) = &found.managed_by else { return false };
    match &facts.credentials {
        super::facts::Listing::Read(list) => list.iter().any(|c| &c.kind == kind && &c.name == name && c.plain_http),
        super::facts::Listing::Unavailable(_) => false,
    }
}
