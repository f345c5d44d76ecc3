//! Proving a credential against its registries before any pod needs it: the `Verified`
//! condition. [`handshake`] speaks the Distribution auth protocol; this module decides when
//! to check, keeps to the global rate and one check at a time per registry host, and sums up
//! a credential's registries into one result.

pub mod challenge;
pub mod handshake;
pub mod reach;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::jiff::Timestamp;
use reqwest::Client;
use sha2::{Digest, Sha256};

pub use handshake::Reason;

use crate::{crd::VerifySpec, dockerconfig::RegistryAuth};

/// How verification runs (flags `--verify-default`, `--verify-interval`, `--verify-qps`).
#[derive(Clone, Debug)]
pub struct VerifySettings {
    /// Verify credentials without `spec.verify` too.
    pub default_on: bool,
    /// Check again after this long (minus up to 10 % jitter) even if nothing changed.
    pub interval: Duration,
    /// Checks started per second, across all credentials.
    pub qps: f64,
    /// Registry host suffixes checks may reach (`--verify-allowed-hosts`); empty: any.
    pub allowed_hosts: Vec<String>,
    /// RegistryCredentials' checks may reach private addresses and speak plain HTTP
    /// (`--verify-private-networks`).
    pub private_networks: bool,
}

impl Default for VerifySettings {
    fn default() -> Self {
        Self {
            default_on: false,
            interval: Duration::from_secs(6 * 3600),
            qps: 5.0,
            allowed_hosts: Vec::new(),
            private_networks: false,
        }
    }
}

/// What to check for one credential, from `spec.verify`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    pub repository: Option<String>,
    pub reference: String,
    pub plain_http: bool,
    /// PEM certificates to trust besides the system roots.
    pub ca_bundle: Option<Vec<u8>>,
    /// The namespace of a RegistryCredential (a tenant's): its checks wait for one another,
    /// and reach only public addresses over HTTPS unless private networks are allowed.
    /// `None`: a ClusterRegistryCredential, or `regcred render --verify`.
    pub tenant: Option<String>,
}

impl Options {
    /// What `spec.verify` asks for (reference default `latest`), with the CA bundle's PEM as
    /// the caller read it.
    pub fn from_spec(spec: &VerifySpec, ca_bundle: Option<Vec<u8>>) -> Self {
        Self {
            repository: spec.repository.clone(),
            reference: spec.reference.clone().unwrap_or_else(|| "latest".into()),
            plain_http: spec.insecure,
            ca_bundle,
            tenant: None,
        }
    }
}

/// The result of one check of all of a credential's registries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    pub reason: Reason,
    pub message: String,
    pub at: Timestamp,
}

impl Verification {
    pub fn verified(&self) -> bool {
        self.reason == Reason::Verified
    }
}

/// Per credential (kept in its per-UID state): what was checked and when to check again.
#[derive(Clone, Debug, Default)]
pub struct VerifyState {
    /// The fingerprint (logins and options) of the last check started.
    pub checked: Option<String>,
    pub result: Option<Verification>,
    /// When the next periodic check is due.
    pub due: Option<Instant>,
    /// A check is running (at most one per credential).
    pub running: bool,
}

/// Whether a check should start now: none running, and the logins or options changed since
/// the last one, or it is due.
pub fn should_check(state: &VerifyState, fingerprint: &str, now: Instant) -> bool {
    !state.running && (state.checked.as_deref() != Some(fingerprint) || state.due.is_none_or(|due| now >= due))
}

/// The fingerprint of what a check depends on: the logins (by the rendered config's hash) and
/// `spec.verify` as written (a CA bundle's content is read when a check runs, so a changed
/// bundle counts at the next periodic check or spec change). Never stored or shown.
pub fn fingerprint(config_hash: &str, verify_spec: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(config_hash.as_bytes());
    digest.update([0]);
    digest.update(verify_spec.as_bytes());
    format!("{:x}", digest.finalize())
}

/// The registry host a `.dockerconfigjson` server key is reached at, as docker resolves it:
/// Docker Hub's `https://index.docker.io/v1/` is served by `registry-1.docker.io`.
pub fn host_of(server_key: &str) -> String {
    let host = server_key.split_once("://").map_or(server_key, |(_, rest)| rest);
    let host = host.split('/').next().unwrap_or(host);
    match host {
        "index.docker.io" | "docker.io" => "registry-1.docker.io".into(),
        host => host.into(),
    }
}

/// HTTP clients kept, one per distinct CA bundle (the system roots' included). Bundles are
/// tenants' ConfigMaps and Secrets, so how many there are is theirs to choose: past this many,
/// the least recently used client goes (built again, a few milliseconds, when its bundle is
/// next checked). A cluster has a handful of private CAs, not 16.
const MAX_CLIENTS: usize = 16;

/// What a kept client is for: the CA bundle's digest (`None`: the system roots alone), and
/// whether it resolves only public addresses (tenants' checks).
type ClientKey = (Option<String>, bool);

/// Shared by every check: HTTP clients per CA bundle, the rate, and one check per host.
pub struct Verifier {
    settings: VerifySettings,
    /// By the CA bundle's digest (`None`: the system roots alone), with the use count when it
    /// was last used; at most [`MAX_CLIENTS`].
    clients: Mutex<HashMap<ClientKey, (Client, u64)>>,
    /// Client look-ups so far: the clock by which the least recently used client is found.
    uses: std::sync::atomic::AtomicU64,
    /// A lock per registry host that a check holds or waits for; dropped with the last of
    /// them ([`Turn`]), so hosts, which tenants name, do not pile up.
    hosts: Turns,
    /// Likewise per tenant namespace: one tenant's checks wait for one another, not for the
    /// whole rate, so a tenant with many credentials cannot starve the others.
    tenants: Turns,
    next_start: tokio::sync::Mutex<tokio::time::Instant>,
}

/// A lock per key (a registry host, a tenant namespace) that checks hold or wait for, kept
/// only while one does.
#[derive(Default)]
struct Turns(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Turns {
    /// Waits until no other check holds `key`'s turn.
    async fn take(&self, key: &str) -> Turn<'_> {
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            locks.entry(key.to_string()).or_default().clone()
        };
        let mut turn = Turn { turns: self, guard: None };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// A check's turn at a key: while it is held, no other check of that key runs. Ending it
/// forgets the key's lock when no other check holds or waits for it.
struct Turn<'a> {
    turns: &'a Turns,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Every lock nobody holds or awaits: this one, and any a cancelled check left.
        let mut locks = self.turns.0.lock().unwrap_or_else(PoisonError::into_inner);
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}

impl Verifier {
    pub fn new(settings: VerifySettings) -> Self {
        Self {
            settings,
            clients: Mutex::default(),
            uses: Default::default(),
            hosts: Turns::default(),
            tenants: Turns::default(),
            next_start: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    pub fn settings(&self) -> &VerifySettings {
        &self.settings
    }

    /// When to check again after a check that ended now: the interval minus up to 10 % of
    /// jitter, so credentials created together spread out.
    pub fn next_due(&self, now: Instant) -> Instant {
        now + self.settings.interval.mul_f64(1.0 - 0.1 * crate::source::token_cache::random_unit())
    }

    /// Checks every registry of the logins (once per host), within the rate and one at a
    /// time per host, and sums them up: verified when all are.
    pub async fn verify(&self, logins: &[RegistryAuth], options: &Options) -> Verification {
        match self.check_each(logins, options).await {
            Ok(findings) => summarize(&findings),
            Err(problem) => {
                Verification { reason: Reason::CaBundleUnavailable, message: problem, at: Timestamp::now() }
            }
        }
    }

    /// Each registry host's finding, in the logins' order; `Err` when the CA bundle is
    /// unusable (nothing was asked of any registry).
    pub async fn check_each(
        &self,
        logins: &[RegistryAuth],
        options: &Options,
    ) -> Result<Vec<(String, handshake::Finding)>, String> {
        let reach = reach::Reach {
            allowed_hosts: self.settings.allowed_hosts.clone(),
            public_only: options.tenant.is_some() && !self.settings.private_networks,
        };
        let client = self.client(options.ca_bundle.as_deref(), reach.public_only)?;
        let _tenant_turn = match &options.tenant {
            Some(namespace) => Some(self.tenants.take(namespace).await),
            None => None,
        };
        let mut seen = BTreeSet::new();
        let mut findings = Vec::new();
        for login in logins {
            let host = host_of(&login.server);
            if !seen.insert(host.clone()) {
                continue;
            }
            self.wait_turn().await;
            let _one_at_a_time = self.hosts.take(&host).await;
            let target = handshake::Target {
                host: &host,
                username: &login.username,
                password: &login.password,
                repository: options.repository.as_deref(),
                reference: &options.reference,
                plain_http: options.plain_http,
                reach: &reach,
            };
            findings.push((host.clone(), handshake::check(&client, &target).await));
        }
        Ok(findings)
    }

    /// Waits for the next start the global rate allows.
    async fn wait_turn(&self) {
        let spacing = Duration::from_secs_f64(1.0 / self.settings.qps.max(0.001));
        let start = {
            let mut next = self.next_start.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + spacing;
            start
        };
        tokio::time::sleep_until(start).await;
    }

    /// A client trusting the system roots plus `ca_bundle`; one per distinct bundle, for the
    /// [`MAX_CLIENTS`] bundles used last.
    fn client(&self, ca_bundle: Option<&[u8]>, public_only: bool) -> Result<Client, String> {
        let key = (ca_bundle.map(|pem| format!("{:x}", Sha256::digest(pem))), public_only);
        let now = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((client, used)) = clients.get_mut(&key) {
            *used = now;
            return Ok(client.clone());
        }
        let client = build_client(ca_bundle, public_only)?;
        if clients.len() >= MAX_CLIENTS
            && let Some(oldest) = clients.iter().min_by_key(|(_, (_, used))| *used).map(|(key, _)| key.clone())
        {
            clients.remove(&oldest);
        }
        clients.insert(key, (client.clone(), now));
        Ok(client)
    }
}

fn build_client(ca_bundle: Option<&[u8]>, public_only: bool) -> Result<Client, String> {
    let resolver = reach::resolver(public_only).map(|r| r as Arc<dyn reqwest::dns::Resolve>);
    crate::http::client_resolving(ca_bundle, "spec.verify.caBundle", resolver)
}

/// One result for a credential's registries: verified when all are, else the first failure's
/// reason, with every registry's finding in the message.
pub fn summarize(findings: &[(String, handshake::Finding)]) -> Verification {
    let reason = match findings.is_empty() {
        true => Reason::UnexpectedResponse,
        false => findings.iter().map(|(_, f)| f.reason).find(|r| *r != Reason::Verified).unwrap_or(Reason::Verified),
    };
    let message = match findings.is_empty() {
        true => "the credential names no registry".to_string(),
        false => findings.iter().map(|(host, f)| format!("{host}: {}", f.message)).collect::<Vec<_>>().join("; "),
    };
    Verification { reason, message, at: Timestamp::now() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handshake::Finding;

    #[test]
    fn a_check_starts_when_the_logins_change_or_it_is_due_and_never_twice() {
        let now = Instant::now();
        let fresh = VerifyState::default();
        assert!(should_check(&fresh, "a", now), "never checked");
        let checked =
            VerifyState { checked: Some("a".into()), due: Some(now + Duration::from_secs(60)), ..Default::default() };
        assert!(!should_check(&checked, "a", now), "checked, not due");
        assert!(should_check(&checked, "b", now), "the logins or options changed");
        assert!(should_check(&checked, "a", now + Duration::from_secs(60)), "due");
        let running = VerifyState { running: true, ..checked };
        assert!(!should_check(&running, "b", now + Duration::from_secs(120)), "one check at a time");
    }

    #[test]
    fn the_fingerprint_covers_logins_and_options() {
        let base = fingerprint("h1", r#"{"repository":"team/app"}"#);
        assert_eq!(base, fingerprint("h1", r#"{"repository":"team/app"}"#));
        assert_ne!(base, fingerprint("h2", r#"{"repository":"team/app"}"#), "other logins");
        assert_ne!(base, fingerprint("h1", r#"{"repository":"team/web"}"#), "other options");
        assert_ne!(fingerprint("ab", "c"), fingerprint("a", "bc"), "the parts are delimited");
    }

    #[test]
    fn server_keys_map_to_the_hosts_docker_contacts() {
        assert_eq!(host_of("https://index.docker.io/v1/"), "registry-1.docker.io");
        assert_eq!(host_of("registry-1.docker.io"), "registry-1.docker.io");
        assert_eq!(host_of("ghcr.io"), "ghcr.io");
        assert_eq!(host_of("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(host_of("https://registry.example.com:8443/v2/"), "registry.example.com:8443");
    }

    #[test]
    fn the_first_failure_decides_and_every_registry_is_named() {
        let ok = |m: &str| Finding { reason: Reason::Verified, message: m.into() };
        let denied = Finding { reason: Reason::Unauthorized, message: "refused".into() };
        let all = summarize(&[("a".into(), ok("fine")), ("b".into(), ok("fine too"))]);
        assert_eq!((all.reason, all.message.as_str()), (Reason::Verified, "a: fine; b: fine too"));
        let one = summarize(&[("a".into(), ok("fine")), ("b".into(), denied)]);
        assert_eq!((one.reason, one.message.as_str()), (Reason::Unauthorized, "a: fine; b: refused"));
        assert!(!summarize(&[]).verified());
    }

    /// Connections open now, and the most open at once, across the registries sharing it.
    #[derive(Clone, Default)]
    struct Open(Arc<(std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize)>);

    impl Open {
        fn peak(&self) -> usize {
            self.0.1.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// A registry that answers `GET /v2/` with 200 after 100 ms, counting its connections in
    /// `open`.
    async fn slow_registry(open: Open) -> String {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else { return };
                let open = open.clone();
                tokio::spawn(async move {
                    let now = open.0.0.fetch_add(1, Ordering::SeqCst) + 1;
                    open.0.1.fetch_max(now, Ordering::SeqCst);
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ =
                        socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                    open.0.0.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        host
    }

    fn login(host: &str) -> RegistryAuth {
        RegistryAuth { server: host.into(), username: "u".into(), password: "p".into() }
    }

    #[tokio::test]
    async fn one_check_at_a_time_per_host_and_hosts_in_parallel() {
        let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
        let options = Options { reference: "latest".into(), plain_http: true, ..Default::default() };
        let same = Open::default();
        let host = slow_registry(same.clone()).await;
        let (a, b) = ([login(&host)], [login(&host)]);
        let (first, second) = tokio::join!(verifier.verify(&a, &options), verifier.verify(&b, &options));
        assert!(first.verified() && second.verified(), "{first:?} {second:?}");
        assert_eq!(same.peak(), 1, "two checks of one host overlapped");

        let both = Open::default();
        let (one, two) = (slow_registry(both.clone()).await, slow_registry(both.clone()).await);
        let (x, y) = ([login(&one)], [login(&two)]);
        let (first, second) = tokio::join!(verifier.verify(&x, &options), verifier.verify(&y, &options));
        assert!(first.verified() && second.verified());
        assert_eq!(both.peak(), 2, "checks of two hosts did not overlap");
    }

    /// Issue 20, item 6: one tenant's checks wait for one another (two hosts, which alone
    /// would overlap), and its turn goes with them; another tenant's check is not held up.
    #[tokio::test]
    async fn checks_of_one_tenant_take_turns() {
        let settings = VerifySettings { qps: 1000.0, private_networks: true, ..Default::default() };
        let verifier = Verifier::new(settings);
        let tenant = |ns: &str| Options {
            reference: "latest".into(),
            plain_http: true,
            tenant: Some(ns.into()),
            ..Default::default()
        };
        let same = Open::default();
        let (one, two) = (slow_registry(same.clone()).await, slow_registry(same.clone()).await);
        let (x, y) = ([login(&one)], [login(&two)]);
        let (a, b) = (tenant("team-a"), tenant("team-a"));
        let (first, second) = tokio::join!(verifier.verify(&x, &a), verifier.verify(&y, &b));
        assert!(first.verified() && second.verified());
        assert_eq!(same.peak(), 1, "one tenant's checks overlapped");
        assert_eq!(verifier.tenants.len(), 0, "a tenant's turn outlived its checks");
        let others = Open::default();
        let (three, four) = (slow_registry(others.clone()).await, slow_registry(others.clone()).await);
        let (z, w) = ([login(&three)], [login(&four)]);
        let (c, d) = (tenant("team-a"), tenant("team-b"));
        let (third, fourth) = tokio::join!(verifier.verify(&z, &c), verifier.verify(&w, &d));
        assert!(third.verified() && fourth.verified());
        assert_eq!(others.peak(), 2, "another tenant's check waited");
    }

    /// Without `--verify-private-networks`, a tenant's check of a loopback registry is
    /// refused before anything is sent; a cluster credential's is made.
    #[tokio::test]
    async fn a_tenants_check_of_a_private_address_sends_nothing() {
        let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
        let watched = Open::default();
        let registry = slow_registry(watched.clone()).await;
        let tenant = Options { reference: "latest".into(), tenant: Some("team".into()), ..Default::default() };
        let refused = verifier.verify(&[login(&registry)], &tenant).await;
        assert_eq!(refused.reason, Reason::NotAllowed, "{}", refused.message);
        assert_eq!(watched.peak(), 0, "the tenant's check reached the registry");
        let platform = Options { reference: "latest".into(), plain_http: true, ..Default::default() };
        assert!(verifier.verify(&[login(&registry)], &platform).await.verified());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_spaces_check_starts() {
        let verifier = Verifier::new(VerifySettings { qps: 2.0, ..Default::default() });
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            verifier.wait_turn().await;
        }
        // The first at once, then one every 0.5 s.
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    /// Checks of 200 registry hosts (each refuses the connection: nothing listens on port 9
    /// of 127.0.0.x) leave no per-host lock behind: the map holds only checks in flight.
    #[tokio::test]
    async fn host_locks_go_when_their_checks_end() {
        let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
        let options = Options { reference: "latest".into(), plain_http: true, ..Default::default() };
        let logins: Vec<RegistryAuth> = (1..=200).map(|i| login(&format!("127.0.0.{i}:9"))).collect();
        let findings = verifier.check_each(&logins, &options).await.unwrap();
        assert_eq!(findings.len(), 200);
        let left = verifier.hosts.len();
        assert_eq!(left, 0, "{left} host locks left after every check ended");
    }

    /// A CA certificate of the system's, as PEM.
    fn system_ca_pem() -> String {
        use base64::Engine;
        let roots = rustls_native_certs::load_native_certs().certs;
        let der = roots.first().expect("the system has CA certificates");
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = text.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
    }

    /// Every distinct CA bundle gets a client, but only the last `MAX_CLIENTS` used are kept:
    /// 40 bundles (a tenant can write any number) leave at most that many, and the one in use
    /// all along is among them.
    #[tokio::test]
    async fn clients_per_ca_bundle_are_bounded() {
        let verifier = Verifier::new(VerifySettings { qps: 1000.0, ..Default::default() });
        let pem = system_ca_pem();
        async fn check(verifier: &Verifier, bundle: &str) {
            let ca_bundle = Some(bundle.as_bytes().to_vec());
            let options = Options { reference: "latest".into(), plain_http: true, ca_bundle, ..Default::default() };
            verifier.check_each(&[login("127.0.0.1:9")], &options).await.unwrap();
        }
        let favourite = format!("favourite\n{pem}");
        for i in 0..40 {
            check(&verifier, &format!("bundle {i}\n{pem}")).await;
            check(&verifier, &favourite).await;
        }
        let clients = verifier.clients.lock().unwrap();
        assert!(clients.len() <= MAX_CLIENTS, "{} clients kept", clients.len());
        let key = (Some(format!("{:x}", Sha256::digest(favourite.as_bytes()))), false);
        assert!(clients.contains_key(&key), "the bundle used all along was dropped");
    }
}
