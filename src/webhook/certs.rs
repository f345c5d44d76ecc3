//! The admission webhook's certificates: settings, the state read from the Secret, the **pure**
//! rotation plan and the generation of what the plan asks for.
//!
//! # The Secret (self-managed mode)
//!
//! One `kubernetes.io/tls` Secret, `settings.namespace`/`settings.secret`, written only by
//! `rotation::maintain` (field manager `regcred`):
//!
//! | key | content |
//! | --- | --- |
//! | `tls.crt` | the serving (leaf) certificate, PEM, one certificate, signed by one CA of the bundle |
//! | `tls.key` | its ECDSA P-256 key, PKCS#8 PEM |
//! | `ca.crt` | the bundle: every CA still trusted, PEM, oldest first; what the webhook configuration's `caBundle` holds |
//! | `ca.key` | the CAs' keys, PKCS#8 PEM, in the order of `ca.crt` (the n-th key is the n-th CA's) |
//!
//! No other metadata: every time is read from the certificates. A certificate's *issue time* is
//! its `notBefore` plus [`BACKDATE`] (certificates are dated back by that much, so a verifier
//! whose clock is behind the controller's still accepts them at once), and its life runs from
//! the issue time to `notAfter`. A CA's issue time is also the moment it joined the bundle: a new
//! CA is written into `ca.crt` by the write that creates it.
//!
//! Whatever cannot be read (not PEM, not a certificate, keys that do not match their
//! certificates, a different number of keys than CAs) makes [`CertState::from_data`] fail, and
//! the caller plans from nothing: a new CA and leaf. An unreadable leaf alone (`tls.crt`,
//! `tls.key`) keeps the CAs and only reissues the leaf.
//!
//! # Rotation (see [`plan`])
//!
//! * A new CA when there is none still valid, or when the newest has less than a third of its
//!   life left. It joins the bundle at once; the older CAs stay until they expire.
//! * The *preferred* CA, the one the leaf must be signed by, is the newest CA that has been in the
//!   bundle for at least [`overlap`]: clients (the apiserver) have had that long to trust it
//!   before a leaf signed by it is served, so old and new CAs overlap and no handshake fails.
//! * The leaf is (re)issued when missing, with less than a third of its life left, with SANs other
//!   than `settings.hosts`, or not signed by the preferred CA. Its `notAfter` never passes its
//!   CA's.
//!
//! Key material is never logged: the types holding keys implement `Debug` by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::STANDARD};
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject};
use secrecy::{ExposeSecret, SecretString};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Data keys of the Secret.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// How far back a certificate's `notBefore` is set from its issue time: clock skew between the
/// controller and the apiserver (or any client) that a fresh certificate tolerates.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// The longest [`overlap`].
pub const MAX_OVERLAP: Duration = Duration::from_secs(60);

/// Validities below this are raised to it, so a misconfiguration cannot make every plan due.
pub const MIN_VALIDITY: Duration = Duration::from_secs(6);

/// Who provides the serving certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertMode {
    /// regcred keeps its own CA and leaf in the Secret and injects the CA bundle.
    SelfManaged,
    /// cert-manager (or anyone) writes the Secret (`tls.crt`, `tls.key`, `ca.crt`); regcred only
    /// loads it.
    External,
}

/// Where the certificates live and how long they are valid.
#[derive(Clone, Debug)]
pub struct CertSettings {
    pub mode: CertMode,
    /// The controller namespace holding the Secret.
    pub namespace: String,
    /// The Secret's name, e.g. `regcred-webhook-tls`.
    pub secret: String,
    /// The MutatingWebhookConfiguration whose every `webhooks[].clientConfig.caBundle` gets the
    /// bundle (self-managed only).
    pub configuration: String,
    /// SANs of the serving certificate: DNS names or IP addresses.
    pub hosts: Vec<String>,
    pub leaf_validity: Duration,
    pub ca_validity: Duration,
}

/// How long a new CA is in the bundle before a leaf signed by it is served:
/// `min(ca_validity / 6, 60 s)`.
///
/// 60 s: the bundle reaches the apiserver through a watch of the Secret (any replica), one patch
/// of the webhook configuration and the apiserver's own watch of that configuration; each takes
/// well under a second when things work, and a minute leaves room for a replica restarting or a
/// watch reconnecting. Longer buys nothing, since the old CA stays trusted regardless.
/// `ca_validity / 6`: a CA is replaced with a third of its life left, so the leaf must move within
/// that third; half of it is the most the overlap may take, leaving the other half for the leaf
/// still on the old CA (short validities in tests: a 60 s CA overlaps 10 s).
pub fn overlap(settings: &CertSettings) -> Duration {
    (ca_validity(settings) / 6).min(MAX_OVERLAP)
}

fn ca_validity(settings: &CertSettings) -> Duration {
    settings.ca_validity.max(MIN_VALIDITY)
}

fn leaf_validity(settings: &CertSettings) -> Duration {
    settings.leaf_validity.max(MIN_VALIDITY)
}

/// A host as a certificate holds it: an IP address in its canonical text, a DNS name in lower
/// case without a trailing dot.
pub fn normalize_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.trim_end_matches('.').to_ascii_lowercase(),
    }
}

fn wanted_hosts(settings: &CertSettings) -> BTreeSet<String> {
    settings.hosts.iter().map(|h| normalize_host(h)).collect()
}

/// Why the Secret's certificates cannot be used. Names keys, never values.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("the Secret has no {0}")]
    Missing(&'static str),
    #[error("{0} is not PEM of the expected kind")]
    Pem(&'static str),
    #[error("certificate {index} of {key} cannot be read: {reason}")]
    Certificate { key: &'static str, index: usize, reason: String },
    #[error("{key} holds {keys} keys for {certificates} certificates")]
    KeyCount { key: &'static str, keys: usize, certificates: usize },
    #[error("key {index} of {key} does not match its certificate")]
    KeyMismatch { key: &'static str, index: usize },
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the plan names a CA the state does not have")]
    NoSigner,
}

/// One CA of the bundle, with its key.
#[derive(Clone)]
pub struct CaCert {
    der: Vec<u8>,
    key: SecretString,
    pub issued: SystemTime,
    pub not_after: SystemTime,
}

impl CaCert {
    /// The certificate, DER.
    pub fn der(&self) -> &[u8] {
        &self.der
    }
}

impl fmt::Debug for CaCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaCert")
            .field("issued", &self.issued)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The serving certificate.
#[derive(Clone)]
pub struct Leaf {
    der: Vec<u8>,
    key: SecretString,
    pub issued: SystemTime,
    pub not_after: SystemTime,
    /// Its SANs, normalized ([`normalize_host`]).
    pub hosts: BTreeSet<String>,
    /// The index in [`CertState::cas`] of the CA that signed it, if any did.
    pub issuer: Option<usize>,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("issued", &self.issued)
            .field("not_after", &self.not_after)
            .field("hosts", &self.hosts)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// What the Secret holds, read back.
#[derive(Clone, Debug, Default)]
pub struct CertState {
    /// Oldest first, as in `ca.crt`.
    pub cas: Vec<CaCert>,
    pub leaf: Option<Leaf>,
}

struct Parsed {
    issued: SystemTime,
    not_after: SystemTime,
}

fn parse_times(cert: &X509Certificate<'_>) -> Option<Parsed> {
    let at = |secs: i64| u64::try_from(secs).ok().map(|s| UNIX_EPOCH + Duration::from_secs(s));
    let not_before = at(cert.validity().not_before.timestamp())?;
    let not_after = at(cert.validity().not_after.timestamp())?;
    Some(Parsed { issued: not_before.checked_add(BACKDATE)?, not_after })
}

fn key_matches(key_pem: &str, cert: &X509Certificate<'_>) -> bool {
    KeyPair::from_pem(key_pem).is_ok_and(|key| key.subject_public_key_info() == cert.public_key().raw)
}

fn pem_certificates(key: &'static str, pem: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.as_ref().to_vec()).map_err(|_| CertError::Pem(key)))
        .collect()
}

/// Each key as its own PKCS#8 PEM document.
fn pem_keys(key: &'static str, pem: &[u8]) -> Result<Vec<SecretString>, CertError> {
    PrivatePkcs8KeyDer::pem_slice_iter(pem)
        .map(|k| {
            k.map(|k| SecretString::from(pem_encode("PRIVATE KEY", k.secret_pkcs8_der())))
                .map_err(|_| CertError::Pem(key))
        })
        .collect()
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl CertState {
    /// Reads the Secret's data. Fails when the CAs cannot be used (the caller then plans from
    /// nothing); an unusable leaf is only left out.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Result<CertState, CertError> {
        let ca_crt = data.get(CA_CRT).ok_or(CertError::Missing(CA_CRT))?;
        let ca_key = data.get(CA_KEY).ok_or(CertError::Missing(CA_KEY))?;
        let ders = pem_certificates(CA_CRT, &ca_crt.0)?;
        let keys = pem_keys(CA_KEY, &ca_key.0)?;
        if ders.len() != keys.len() {
            return Err(CertError::KeyCount { key: CA_KEY, keys: keys.len(), certificates: ders.len() });
        }
        let mut cas = Vec::with_capacity(ders.len());
        for (index, (der, key)) in ders.into_iter().zip(keys).enumerate() {
            let unreadable = |reason: &str| CertError::Certificate { key: CA_CRT, index, reason: reason.to_string() };
            let (_, cert) = X509Certificate::from_der(&der).map_err(|_| unreadable("not X.509"))?;
            if !cert.is_ca() {
                return Err(unreadable("not a CA"));
            }
            let times = parse_times(&cert).ok_or_else(|| unreadable("validity out of range"))?;
            if !key_matches(key.expose_secret(), &cert) {
                return Err(CertError::KeyMismatch { key: CA_KEY, index });
            }
            drop(cert);
            cas.push(CaCert { der, key, issued: times.issued, not_after: times.not_after });
        }
        let leaf = Self::leaf(data, &cas);
        Ok(CertState { cas, leaf })
    }

    fn leaf(data: &BTreeMap<String, ByteString>, cas: &[CaCert]) -> Option<Leaf> {
        let der = pem_certificates(TLS_CRT, &data.get(TLS_CRT)?.0).ok()?.into_iter().next()?;
        let key = pem_keys(TLS_KEY, &data.get(TLS_KEY)?.0).ok()?.into_iter().next()?;
        let (_, cert) = X509Certificate::from_der(&der).ok()?;
        if !key_matches(key.expose_secret(), &cert) {
            return None;
        }
        let times = parse_times(&cert)?;
        let mut hosts = BTreeSet::new();
        if let Some(san) = cert.subject_alternative_name().ok()? {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => hosts.insert(normalize_host(dns)),
                    GeneralName::IPAddress(bytes) => match <[u8; 4]>::try_from(*bytes) {
                        Ok(v4) => hosts.insert(IpAddr::from(v4).to_string()),
                        Err(_) => hosts.insert(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                    },
                    _ => false,
                };
            }
        }
        let issuer = cas.iter().position(|ca| {
            X509Certificate::from_der(&ca.der).is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        });
        drop(cert);
        Some(Leaf { der, key, issued: times.issued, not_after: times.not_after, hosts, issuer })
    }
}

/// Who signs the leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The CA at this index of [`CertState::cas`].
    Existing(usize),
    /// The CA this plan creates.
    New,
}

/// Why the leaf is (re)issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafReason {
    Missing,
    /// Less than a third of its life left.
    Renewal,
    /// Its SANs are not `settings.hosts`.
    Hosts,
    /// It is not signed by the preferred CA.
    Issuer,
}

/// What to change in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPlan {
    /// Indices of the state's CAs that stay in the bundle (the others have expired), in order.
    pub keep: Vec<usize>,
    /// Whether a new CA is created (and appended to the bundle).
    pub new_ca: bool,
    /// A new leaf, by whom and why.
    pub leaf: Option<(Signer, LeafReason)>,
    /// When to plan again if nothing changes before (after `now`; with changes, plan again after
    /// writing them).
    pub next_check: SystemTime,
    dropped: usize,
}

impl CertPlan {
    /// Nothing to write.
    pub fn is_nothing(&self) -> bool {
        !self.new_ca && self.leaf.is_none() && self.dropped == 0
    }

    /// How many expired CAs leave the bundle.
    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

/// `not_after - life / 3`: from then on less than a third of the life is left.
fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or(Duration::ZERO);
    not_after.checked_sub(life / 3).unwrap_or(not_after)
}

/// `t` rounded up to a whole second, as certificates hold times: an issue time never earlier
/// than the write that publishes it, so the overlap is never cut short.
fn whole_seconds(t: SystemTime) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    UNIX_EPOCH + Duration::from_secs(since.as_secs() + u64::from(since.subsec_nanos() > 0))
}

/// The rotation decision, **pure**: from the state read back from the Secret (`None`: absent or
/// unreadable) to what must change, at `now`. See the module doc for the rules.
pub fn plan(now: SystemTime, state: Option<&CertState>, settings: &CertSettings) -> CertPlan {
    let empty = CertState::default();
    let state = state.unwrap_or(&empty);
    let overlap = overlap(settings);
    let keep: Vec<usize> = (0..state.cas.len()).filter(|&i| now < state.cas[i].not_after).collect();
    let dropped = state.cas.len() - keep.len();
    // Candidates to sign: (signer, issued, not_after), ordered by issue time (the bundle is
    // oldest first, but sorted anyway).
    let mut candidates: Vec<(Signer, SystemTime, SystemTime)> =
        keep.iter().map(|&i| (Signer::Existing(i), state.cas[i].issued, state.cas[i].not_after)).collect();
    candidates.sort_by_key(|&(_, issued, _)| issued);
    let new_ca = match candidates.last() {
        None => true,
        Some(&(_, issued, not_after)) => now >= renew_at(issued, not_after),
    };
    let created = (Signer::New, whole_seconds(now), whole_seconds(now) + ca_validity(settings));
    if new_ca {
        candidates.push(created);
    }
    // The preferred CA: the newest settled one, unless it expires before the newest candidate
    // settles (after a long pause: there is no overlap to wait for then); else the newest.
    let newest = candidates.last().copied().unwrap_or(created);
    let settled = candidates.iter().rev().find(|&&(_, issued, _)| issued + overlap <= now);
    let preferred = match settled {
        Some(&ca) if ca.2 > newest.1 + overlap => ca,
        _ => newest,
    };
    let (signer, _, ca_not_after) = preferred;
    let wanted = wanted_hosts(settings);
    let issue_until = (whole_seconds(now) + leaf_validity(settings)).min(ca_not_after);
    let leaf = match &state.leaf {
        None => Some(LeafReason::Missing),
        Some(leaf) if leaf.issuer.map(Signer::Existing) != Some(signer) => Some(LeafReason::Issuer),
        Some(leaf) if leaf.hosts != wanted => Some(LeafReason::Hosts),
        // A renewal only when the new leaf lives longer: one already ending with its CA moves to
        // the next CA instead.
        Some(leaf) if now >= renew_at(leaf.issued, leaf.not_after) && issue_until > leaf.not_after => {
            Some(LeafReason::Renewal)
        }
        Some(_) => None,
    }
    .map(|reason| (signer, reason));
    // The next moment something may be due: any CA's renewal, settling or expiry, the leaf's
    // renewal or expiry; only instants after now (a renewal that gains nothing is not awaited).
    let mut instants = Vec::new();
    for &(_, issued, not_after) in &candidates {
        instants.extend([renew_at(issued, not_after), not_after]);
        // A CA newer than the preferred one: when it settles, the leaf moves.
        if issued > preferred.1 {
            instants.push(issued + overlap);
        }
    }
    if let Some(leaf) = &state.leaf {
        instants.extend([renew_at(leaf.issued, leaf.not_after), leaf.not_after]);
    }
    let next_check = instants.into_iter().filter(|&t| t > now).min().unwrap_or(now + Duration::from_secs(3600));
    CertPlan { keep, new_ca, leaf, next_check, dropped }
}

/// The Secret's data as the plan makes it. Key material: `Debug` shows none.
#[derive(Clone)]
pub struct CertFiles {
    pub tls_crt: String,
    pub tls_key: SecretString,
    pub ca_crt: String,
    pub ca_key: SecretString,
}

impl fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertFiles").finish_non_exhaustive()
    }
}

impl CertFiles {
    /// The Secret's `data`.
    pub fn into_data(self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (TLS_CRT.to_string(), ByteString(self.tls_crt.into_bytes())),
            (TLS_KEY.to_string(), ByteString(self.tls_key.expose_secret().as_bytes().to_vec())),
            (CA_CRT.to_string(), ByteString(self.ca_crt.into_bytes())),
            (CA_KEY.to_string(), ByteString(self.ca_key.expose_secret().as_bytes().to_vec())),
        ])
    }
}

fn rcgen_time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn new_ca(issued: SystemTime, settings: &CertSettings) -> Result<CaCert, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    let secs = issued.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    name.push(DnType::CommonName, format!("regcred webhook CA {secs}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let not_after = issued + ca_validity(settings);
    params.not_before = rcgen_time(issued.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH));
    params.not_after = rcgen_time(not_after);
    let cert = params.self_signed(&key)?;
    Ok(CaCert { der: cert.der().to_vec(), key: SecretString::from(key.serialize_pem()), issued, not_after })
}

fn new_leaf(issued: SystemTime, ca: &CaCert, settings: &CertSettings) -> Result<Leaf, CertError> {
    let ca_key = KeyPair::from_pem(ca.key.expose_secret())?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.der.as_slice()), &ca_key)?;
    let key = KeyPair::generate()?;
    let hosts = wanted_hosts(settings);
    let mut params = CertificateParams::new(hosts.iter().cloned().collect::<Vec<_>>())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, hosts.iter().next().cloned().unwrap_or_else(|| "regcred-webhook".into()));
    params.distinguished_name = name;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_after = (issued + leaf_validity(settings)).min(ca.not_after);
    params.not_before = rcgen_time(issued.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH));
    params.not_after = rcgen_time(not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Leaf {
        der: cert.der().to_vec(),
        key: SecretString::from(key.serialize_pem()),
        issued,
        not_after,
        hosts,
        issuer: None,
    })
}

/// Carries out `plan` on `state` at `now`: generates the new CA and leaf it asks for and returns
/// the whole Secret data. Not pure (fresh keys), no I/O.
pub fn execute(
    now: SystemTime,
    state: Option<&CertState>,
    plan: &CertPlan,
    settings: &CertSettings,
) -> Result<CertFiles, CertError> {
    let issued = whole_seconds(now);
    let empty = CertState::default();
    let state = state.unwrap_or(&empty);
    let mut cas: Vec<CaCert> = Vec::new();
    for &i in &plan.keep {
        cas.push(state.cas.get(i).ok_or(CertError::NoSigner)?.clone());
    }
    let created = if plan.new_ca { Some(new_ca(issued, settings)?) } else { None };
    let leaf = match plan.leaf {
        Some((Signer::Existing(i), _)) => new_leaf(issued, state.cas.get(i).ok_or(CertError::NoSigner)?, settings)?,
        Some((Signer::New, _)) => new_leaf(issued, created.as_ref().ok_or(CertError::NoSigner)?, settings)?,
        None => state.leaf.clone().ok_or(CertError::NoSigner)?,
    };
    cas.extend(created);
    let mut ca_crt = String::new();
    let mut ca_key = String::new();
    for ca in &cas {
        ca_crt.push_str(&pem_encode("CERTIFICATE", &ca.der));
        ca_key.push_str(ca.key.expose_secret());
    }
    Ok(CertFiles {
        tls_crt: pem_encode("CERTIFICATE", &leaf.der),
        tls_key: leaf.key,
        ca_crt,
        ca_key: SecretString::from(ca_key),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::RootCertStore;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    use super::*;
    use crate::test_support::assert_hidden;

    const DAY: Duration = Duration::from_secs(86_400);

    fn settings() -> CertSettings {
        CertSettings {
            mode: CertMode::SelfManaged,
            namespace: "regcred-system".into(),
            secret: "regcred-webhook-tls".into(),
            configuration: "regcred-webhook".into(),
            hosts: vec!["127.0.0.1".into(), "regcred-webhook.regcred-system.svc".into()],
            leaf_validity: 30 * DAY,
            ca_validity: 360 * DAY,
        }
    }

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// Carries out the plan and reads the result back, as the next plan sees it.
    fn written(now: SystemTime, state: Option<&CertState>, plan: &CertPlan, settings: &CertSettings) -> CertState {
        let files = execute(now, state, plan, settings).expect("generated");
        CertState::from_data(&files.into_data()).expect("read back")
    }

    fn fresh(settings: &CertSettings) -> CertState {
        let plan = plan(t0(), None, settings);
        written(t0(), None, &plan, settings)
    }

    #[test]
    fn fresh_start_creates_a_ca_and_a_leaf_signed_by_it() {
        let s = settings();
        let p = plan(t0(), None, &s);
        assert!(p.new_ca);
        assert_eq!(p.leaf, Some((Signer::New, LeafReason::Missing)));
        assert!(p.keep.is_empty());
        let state = written(t0(), None, &p, &s);
        assert_eq!(state.cas.len(), 1);
        let leaf = state.leaf.as_ref().expect("leaf");
        assert_eq!(leaf.issuer, Some(0));
        assert_eq!(leaf.issued, t0());
        assert_eq!(leaf.not_after, t0() + 30 * DAY);
        assert_eq!(state.cas[0].not_after, t0() + 360 * DAY);
        let hosts: Vec<&str> = leaf.hosts.iter().map(String::as_str).collect();
        assert_eq!(hosts, ["127.0.0.1", "regcred-webhook.regcred-system.svc"]);
    }

    #[test]
    fn nothing_due_writes_nothing_and_says_when_to_look_again() {
        let s = settings();
        let state = fresh(&s);
        for later in [Duration::ZERO, Duration::from_secs(1), DAY, 20 * DAY - Duration::from_secs(1)] {
            let p = plan(t0() + later, Some(&state), &s);
            assert!(p.is_nothing(), "at +{later:?}: {p:?}");
            // The leaf's renewal (2/3 of 30 days) comes first.
            assert_eq!(p.next_check, t0() + 20 * DAY);
        }
    }

    #[test]
    fn leaf_is_renewed_at_two_thirds_of_its_life_by_the_same_ca() {
        let s = settings();
        let state = fresh(&s);
        let at = t0() + 20 * DAY;
        let p = plan(at, Some(&state), &s);
        assert_eq!(
            p,
            CertPlan {
                keep: vec![0],
                new_ca: false,
                leaf: Some((Signer::Existing(0), LeafReason::Renewal)),
                next_check: p.next_check,
                dropped: 0
            }
        );
        let renewed = written(at, Some(&state), &p, &s);
        assert_eq!(renewed.cas.len(), 1);
        assert_eq!(renewed.cas[0].der, state.cas[0].der, "the CA is kept");
        let leaf = renewed.leaf.as_ref().expect("leaf");
        assert_eq!((leaf.issuer, leaf.issued, leaf.not_after), (Some(0), at, at + 30 * DAY));
        assert!(plan(at, Some(&renewed), &s).is_nothing());
    }

    #[test]
    fn ca_renewal_overlaps_the_old_ca_before_the_leaf_moves_then_the_old_one_expires() {
        let s = settings();
        let overlap = overlap(&s);
        assert_eq!(overlap, Duration::from_secs(60));
        let mut state = fresh(&s);
        // Keep the leaf renewed until the CA is due, as maintain would.
        let ca_due = t0() + 240 * DAY;
        let mut now = t0();
        loop {
            let p = plan(now, Some(&state), &s);
            if p.new_ca {
                break;
            }
            if !p.is_nothing() {
                assert_eq!(p.leaf, Some((Signer::Existing(0), LeafReason::Renewal)));
                state = written(now, Some(&state), &p, &s);
                continue;
            }
            now = p.next_check;
        }
        assert_eq!(now, ca_due, "a new CA with a third of the old one's life left");
        let p = plan(now, Some(&state), &s);
        assert!(p.new_ca);
        assert_eq!(p.keep, vec![0]);
        state = written(now, Some(&state), &p, &s);
        assert_eq!(state.cas.len(), 2, "the bundle holds both CAs");
        assert_eq!(state.leaf.as_ref().and_then(|l| l.issuer), Some(0), "the leaf stays on the old CA");
        // Until the overlap has passed, nothing changes; the plan wakes up when it has.
        let p = plan(now + overlap - Duration::from_secs(1), Some(&state), &s);
        assert!(p.is_nothing(), "{p:?}");
        assert_eq!(p.next_check, now + overlap);
        // Then the leaf moves to the new CA.
        let moved_at = now + overlap;
        let p = plan(moved_at, Some(&state), &s);
        assert_eq!(p.leaf, Some((Signer::Existing(1), LeafReason::Issuer)));
        assert!(!p.new_ca);
        state = written(moved_at, Some(&state), &p, &s);
        assert_eq!(state.leaf.as_ref().and_then(|l| l.issuer), Some(1));
        assert_eq!(state.cas.len(), 2);
        // The old CA stays in the bundle until it expires (the leaf renewed on the new one
        // meanwhile), then leaves it.
        let old_end = state.cas[0].not_after;
        assert_eq!(old_end, t0() + 360 * DAY);
        let mut now = moved_at;
        let mut renewals = 0;
        loop {
            let p = plan(now, Some(&state), &s);
            if p.is_nothing() {
                now = p.next_check;
                if now >= old_end {
                    break;
                }
                continue;
            }
            assert_eq!((p.new_ca, p.dropped(), p.leaf), (false, 0, Some((Signer::Existing(1), LeafReason::Renewal))));
            state = written(now, Some(&state), &p, &s);
            renewals += 1;
        }
        assert_eq!(renewals, 5, "every 20 days from day 240 to day 360");
        assert_eq!(now, old_end);
        let p = plan(old_end, Some(&state), &s);
        assert_eq!((p.keep.clone(), p.dropped(), p.new_ca, p.leaf), (vec![1], 1, false, None));
        let new_der = state.cas[1].der.clone();
        state = written(old_end, Some(&state), &p, &s);
        assert_eq!(state.cas.len(), 1);
        assert_eq!(state.cas[0].der, new_der);
        assert_eq!(state.leaf.as_ref().and_then(|l| l.issuer), Some(0), "still signed by the remaining CA");
        assert!(plan(old_end, Some(&state), &s).is_nothing());
    }

    #[test]
    fn issue_times_round_up_so_the_overlap_is_never_cut_short() {
        let s = settings();
        let state = fresh(&s);
        let at = t0() + 240 * DAY + Duration::from_millis(300);
        let p = plan(at, Some(&state), &s);
        assert!(p.new_ca);
        let state = written(at, Some(&state), &p, &s);
        assert_eq!(state.cas[1].issued, t0() + 240 * DAY + Duration::from_secs(1));
        // A full overlap after the write, not after the second it was made in.
        assert!(plan(at + overlap(&s) - Duration::from_millis(1), Some(&state), &s).is_nothing());
        let p = plan(state.cas[1].issued + overlap(&s), Some(&state), &s);
        assert_eq!(p.leaf, Some((Signer::Existing(1), LeafReason::Issuer)));
    }

    #[test]
    fn an_old_ca_about_to_expire_is_not_waited_for() {
        // After a long pause the only CA expires before a new one could settle: the new one is
        // used at once (there is nothing to overlap with).
        let s = settings();
        let state = fresh(&s);
        let at = t0() + 360 * DAY - Duration::from_secs(10);
        let p = plan(at, Some(&state), &s);
        assert!(p.new_ca);
        assert_eq!(p.leaf, Some((Signer::New, LeafReason::Issuer)));
        // Expired altogether: a fresh start that drops it.
        let p = plan(t0() + 400 * DAY, Some(&state), &s);
        assert_eq!((p.new_ca, p.dropped(), p.leaf), (true, 1, Some((Signer::New, LeafReason::Issuer))));
    }

    #[test]
    fn a_leaf_never_outlives_its_ca_and_is_not_renewed_for_nothing() {
        let s = CertSettings { leaf_validity: 30 * DAY, ca_validity: 9 * DAY, ..settings() };
        let state = fresh(&s);
        let leaf = state.leaf.as_ref().expect("leaf");
        assert_eq!(leaf.not_after, state.cas[0].not_after);
        // Past the leaf's renewal point a renewal would end at the same instant: the CA's
        // renewal (same point) moves it instead.
        let p = plan(t0() + 6 * DAY, Some(&state), &s);
        assert!(p.new_ca);
        assert_eq!(p.leaf, None, "the leaf stays until the new CA has settled");
        let state = written(t0() + 6 * DAY, Some(&state), &p, &s);
        let p = plan(t0() + 6 * DAY + Duration::from_secs(30), Some(&state), &s);
        assert!(p.is_nothing(), "{p:?}");
        assert_eq!(p.next_check, t0() + 6 * DAY + Duration::from_secs(60));
    }

    #[test]
    fn other_hosts_get_a_new_leaf() {
        let s = settings();
        let state = fresh(&s);
        let moved = CertSettings { hosts: vec!["regcred-webhook.other.svc".into(), "::1".into()], ..settings() };
        let p = plan(t0() + DAY, Some(&state), &moved);
        assert_eq!(p.leaf, Some((Signer::Existing(0), LeafReason::Hosts)));
        assert!(!p.new_ca);
        let state = written(t0() + DAY, Some(&state), &p, &moved);
        let hosts: Vec<&str> = state.leaf.as_ref().expect("leaf").hosts.iter().map(String::as_str).collect();
        assert_eq!(hosts, ["::1", "regcred-webhook.other.svc"]);
        // Spelling does not matter.
        let respelled =
            CertSettings { hosts: vec!["Regcred-Webhook.Other.svc.".into(), "0:0::1".into()], ..settings() };
        assert!(plan(t0() + DAY, Some(&state), &respelled).is_nothing());
    }

    #[test]
    fn garbage_is_regenerated() {
        let s = settings();
        let good = execute(t0(), None, &plan(t0(), None, &s), &s).expect("generated").into_data();
        let other = execute(t0(), None, &plan(t0(), None, &s), &s).expect("generated").into_data();
        let with = |key: &str, value: &[u8]| {
            let mut data = good.clone();
            data.insert(key.into(), ByteString(value.to_vec()));
            data
        };
        let broken = [
            with(CA_CRT, b"garbage"),
            with(CA_KEY, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            with(CA_KEY, other[CA_KEY].0.as_slice()),
            with(CA_CRT, [good[CA_CRT].0.as_slice(), other[CA_CRT].0.as_slice()].concat().as_slice()),
            with(CA_CRT, good[TLS_CRT].0.as_slice()),
            BTreeMap::new(),
        ];
        for data in &broken {
            assert!(CertState::from_data(data).is_err(), "{:?}", data.keys());
        }
        // What the caller then plans: everything anew.
        let p = plan(t0(), None, &s);
        assert_eq!((p.new_ca, p.leaf), (true, Some((Signer::New, LeafReason::Missing))));
        // A broken leaf alone keeps the CA.
        for data in [
            with(TLS_CRT, b"garbage"),
            with(TLS_KEY, other[TLS_KEY].0.as_slice()),
            with(TLS_CRT, other[TLS_CRT].0.as_slice()),
        ] {
            let state = CertState::from_data(&data).expect("the CA is fine");
            let p = plan(t0(), Some(&state), &s);
            assert!(!p.new_ca);
            assert!(matches!(p.leaf, Some((Signer::Existing(0), LeafReason::Missing | LeafReason::Issuer))), "{p:?}");
        }
    }

    #[test]
    fn restarts_at_rest_plan_nothing() {
        let s = settings();
        let data = execute(t0(), None, &plan(t0(), None, &s), &s).expect("generated").into_data();
        for _ in 0..3 {
            let state = CertState::from_data(&data).expect("read");
            assert!(plan(t0() + Duration::from_secs(5), Some(&state), &s).is_nothing());
        }
    }

    fn verifier(bundle: &[u8]) -> Arc<WebPkiServerVerifier> {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(bundle) {
            roots.add(ca.expect("PEM")).expect("a CA");
        }
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(rustls::crypto::ring::default_provider()))
            .build()
            .expect("verifier")
    }

    fn verifies(files: &CertFiles, host: &str) -> bool {
        let leaf = CertificateDer::from_pem_slice(files.tls_crt.as_bytes()).expect("leaf");
        let name = ServerName::try_from(host.to_string()).expect("name");
        verifier(files.ca_crt.as_bytes()).verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).is_ok()
    }

    #[test]
    fn the_leaf_verifies_against_the_bundle_for_every_san() {
        let now = SystemTime::now();
        let s = settings();
        let files = execute(now, None, &plan(now, None, &s), &s).expect("generated");
        for host in &s.hosts {
            assert!(verifies(&files, host), "{host}");
        }
        assert!(!verifies(&files, "127.0.0.2"));
        assert!(!verifies(&files, "other.regcred-system.svc"));
        // During a CA rotation: a bundle of two, the leaf on the new CA still verifies.
        let state = CertState::from_data(&files.into_data()).expect("read");
        let p = plan(now, Some(&state), &CertSettings { ca_validity: Duration::from_secs(7 * 86_400), ..settings() });
        let rotated = execute(
            now,
            Some(&state),
            &CertPlan { new_ca: true, leaf: Some((Signer::New, LeafReason::Issuer)), ..p },
            &s,
        )
        .expect("generated");
        assert_eq!(CertificateDer::pem_slice_iter(rotated.ca_crt.as_bytes()).count(), 2);
        for host in &s.hosts {
            assert!(verifies(&rotated, host), "{host}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let s = settings();
        let files = execute(t0(), None, &plan(t0(), None, &s), &s).expect("generated");
        let shown = format!("{files:?}");
        let tls_key = files.tls_key.expose_secret().to_string();
        let ca_key = files.ca_key.expose_secret().to_string();
        let state = CertState::from_data(&files.into_data()).expect("read");
        let shown = format!("{shown} {state:?}");
        for key in [&tls_key, &ca_key] {
            assert_hidden(&shown, key);
            for line in key.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!shown.contains(line));
            }
        }
        assert!(!shown.contains("PRIVATE KEY"));
    }
}
