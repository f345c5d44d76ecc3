use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::process::{Process, temp_dir};
use crate::registry::TokenRealm;
use crate::{free_port, http_request, wait_until};

/// The OAuth scope every token here must carry (IAM Credentials and Artifact Registry
/// insist on it).
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const REGISTRY_SERVICE: &str = "regcred-testenv-gcp";
const REGISTRY_ISSUER: &str = "regcred-testenv-gcp-realm";

/// A local Google (`tests/gcp/emulator.py`, run by `$REGCRED_PYTHON`, the virtual environment
/// of `scripts/setup.sh` or `python3`, with
/// `tests/gcp/requirements.txt` installed), strict where Google is: the OAuth token
/// endpoint of service-account keys, STS for Workload Identity Federation, IAM
/// Credentials' generateAccessToken, the metadata server, and Artifact Registry's token
/// realm for a distribution registry ([`crate::Registry::start_with_token_realm`] with
/// [`GcpEmulator::token_realm`]). Access tokens start `ya29.c.`, federated ones `ya29.d.`.
/// It keeps its configuration in memory; Drop stops it.
pub struct GcpEmulator {
    // Field order is drop order: the process stops before its dir goes.
    proc: Mutex<Option<Process>>,
    port: u16,
    metadata_port: u16,
    /// The endpoints of `port` over HTTPS, with a certificate for `localhost` and `127.0.0.1`
    /// from a CA of the emulator's own (`ca_pem`).
    tls_port: u16,
    ca_pem: String,
    dir: tempfile::TempDir,
}

/// A service-account key as Google hands it out (`gcloud iam service-accounts keys create`),
/// its `token_uri` pointing at the emulator.
#[derive(Clone, Debug)]
pub struct ServiceAccountKey {
    /// The key file, as it goes into a Secret.
    pub json: String,
    pub client_email: String,
    pub private_key_id: String,
    /// PKCS#8 PEM.
    pub private_key: String,
    pub token_uri: String,
}

impl ServiceAccountKey {
    /// `claims` as an RS256 JWT signed with this key, its id as `kid`, as Google's client
    /// libraries sign them.
    pub fn sign(&self, claims: &Value) -> Result<String> {
        use rcgen::SigningKey;
        let key = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&self.private_key, &rcgen::PKCS_RSA_SHA256)?;
        let header = json!({ "alg": "RS256", "typ": "JWT", "kid": self.private_key_id });
        let input =
            format!("{}.{}", base64_url(header.to_string().as_bytes()), base64_url(claims.to_string().as_bytes()));
        let signature = key.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", base64_url(&signature)))
    }

    /// The claims of a valid JWT bearer grant for this key, issued now and valid for an hour:
    /// `iss` and `sub` the account, `aud` the `token_uri`, `scope` cloud-platform.
    pub fn assertion_claims(&self) -> Value {
        let now = unix_now();
        json!({
            "iss": self.client_email,
            "sub": self.client_email,
            "aud": self.token_uri,
            "scope": CLOUD_PLATFORM,
            "iat": now,
            "exp": now + 3600,
        })
    }
}

/// Which subjects a [`WorkloadIdentityProvider`] admits (Google's attribute condition is a
/// CEL expression; these are the two shapes regcred's docs use).
#[derive(Clone, Debug, Default)]
pub enum AttributeCondition {
    /// Every verified token.
    #[default]
    Any,
    /// `assertion.sub in [...]`.
    SubjectIn(Vec<String>),
    /// `assertion.sub.startsWith(...)`, e.g. `system:serviceaccount:tenant-a:`.
    SubjectPrefix(String),
}

/// An OIDC provider of a workload identity pool: `google.subject = assertion.sub`, keys
/// given inline as a JWKS (as `--jwk-json-path` does for an issuer Google cannot reach).
#[derive(Clone, Debug)]
pub struct WorkloadIdentityProvider {
    pub project_number: String,
    pub pool: String,
    pub provider: String,
    pub issuer: String,
    pub jwks: Value,
    /// Empty: the provider's resource name, with `//` or `https://` before it, as Google.
    pub allowed_audiences: Vec<String>,
    pub condition: AttributeCondition,
}

impl WorkloadIdentityProvider {
    /// A provider trusting `issuer`'s `jwks`, default audiences, no condition.
    pub fn new(project_number: &str, pool: &str, provider: &str, issuer: &str, jwks: Value) -> Self {
        WorkloadIdentityProvider {
            project_number: project_number.into(),
            pool: pool.into(),
            provider: provider.into(),
            issuer: issuer.into(),
            jwks,
            allowed_audiences: Vec::new(),
            condition: AttributeCondition::Any,
        }
    }

    /// `projects/N/locations/global/workloadIdentityPools/P/providers/X`.
    pub fn name(&self) -> String {
        format!("{}/providers/{}", self.pool_name(), self.provider)
    }

    /// `//iam.googleapis.com/` + [`Self::name`]: STS's `audience`, and the default audience of
    /// the Kubernetes tokens it accepts.
    pub fn audience(&self) -> String {
        format!("//iam.googleapis.com/{}", self.name())
    }

    /// The IAM member of one federated subject, e.g. `system:serviceaccount:ns:name`.
    pub fn principal(&self, subject: &str) -> String {
        format!("principal://iam.googleapis.com/{}/subject/{subject}", self.pool_name())
    }

    /// The IAM member of every identity in the pool.
    pub fn principal_set(&self) -> String {
        format!("principalSet://iam.googleapis.com/{}/*", self.pool_name())
    }

    fn pool_name(&self) -> String {
        format!("projects/{}/locations/global/workloadIdentityPools/{}", self.project_number, self.pool)
    }
}

impl GcpEmulator {
    /// Starts an emulator whose tokens live an hour, as Google's do. A port picked as free can
    /// be taken before the emulator binds it, so a failed start is retried with fresh ports.
    pub fn start() -> Result<GcpEmulator> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Ok(gcp) => return Ok(gcp),
                Err(error) if attempt < 3 => {
                    eprintln!("testenv: Google emulator start {attempt} failed, retrying: {error:#}");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn start_once() -> Result<GcpEmulator> {
        let dir = temp_dir("gcp")?;
        let (port, metadata_port, tls_port) = (free_port(), free_port(), free_port());
        let tls = crate::registry::ServingTls::new("regcred-testenv-gcp-ca", &["localhost", "127.0.0.1"])?;
        std::fs::write(dir.path().join("tls.crt"), &tls.cert_pem)?;
        std::fs::write(dir.path().join("tls.key"), &tls.key_pem)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gcp/emulator.py");
        let mut cmd = Command::new(&crate::python().path);
        cmd.arg(&script)
            .args(["--port", &port.to_string()])
            .args(["--metadata-port", &metadata_port.to_string()])
            .args(["--tls-port", &tls_port.to_string()])
            .arg("--tls-cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("tls.key"))
            .args(["--registry-service", REGISTRY_SERVICE, "--registry-issuer", REGISTRY_ISSUER])
            .arg("--state-dir")
            .arg(dir.path())
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Process::spawn("gcp emulator", cmd, &dir.path().join("emulator.log"))?;
        let ready = dir.path().join("ready");
        wait_until(
            "the Google emulator",
            Duration::from_secs(60),
            || proc.check_alive(),
            || Ok(std::fs::metadata(&ready)?),
        )
        .with_context(|| crate::python().hint("tests/gcp/requirements.txt"))?;
        Ok(GcpEmulator { proc: Mutex::new(Some(proc)), port, metadata_port, tls_port, ca_pem: tls.ca_pem, dir })
    }

    /// `http://127.0.0.1:PORT`, where every endpoint but the metadata server's is.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port of [`Self::url`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The OAuth token endpoint, the `token_uri` of the keys (Google's
    /// `https://oauth2.googleapis.com/token`).
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.url())
    }

    /// STS's token exchange (Google's `https://sts.googleapis.com/v1/token`).
    pub fn sts_url(&self) -> String {
        format!("{}/v1/token", self.url())
    }

    /// IAM Credentials' generateAccessToken for `email` (Google's
    /// `https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken`).
    pub fn generate_access_token_url(&self, email: &str) -> String {
        format!("{}{}", self.url(), generate_access_token_path(email))
    }

    /// `127.0.0.1:PORT` of the metadata server, for `GCE_METADATA_HOST`.
    pub fn metadata_host(&self) -> String {
        format!("127.0.0.1:{}", self.metadata_port)
    }

    /// The port of [`Self::metadata_host`].
    pub fn metadata_port(&self) -> u16 {
        self.metadata_port
    }

    /// Artifact Registry's token realm, for [`crate::Registry::start_with_token_realm`]:
    /// ES256 tokens whose key is in a JWKS file the emulator wrote at start, served over
    /// HTTPS (as Google's), with a certificate from the emulator's own CA (in the realm's
    /// `ca_pem`), so the registry serves HTTPS too.
    pub fn token_realm(&self) -> TokenRealm {
        TokenRealm {
            // Not 127.0.0.1: against SSRF, crane refuses a realm at a loopback IP literal
            // other than the registry's own host.
            realm: format!("https://localhost:{}/v2/token", self.tls_port),
            service: REGISTRY_SERVICE.into(),
            issuer: REGISTRY_ISSUER.into(),
            jwks: self.dir.path().join("registry-jwks.json"),
            signing_algorithms: vec!["ES256".into()],
            ca_pem: Some(self.ca_pem.clone()),
        }
    }

    /// Creates a service account (if new) with a fresh RSA 2048 key, generated by the
    /// emulator as Google generates them; the account's project is the first label of the
    /// email's domain (`sa@PROJECT.iam.gserviceaccount.com`).
    pub fn create_service_account_key(&self, email: &str) -> Result<ServiceAccountKey> {
        let key = self.control("service-accounts", json!({ "email": email }))?;
        let field = |name: &str| key[name].as_str().map(str::to_owned).with_context(|| format!("no {name} in {key}"));
        Ok(ServiceAccountKey {
            client_email: field("client_email")?,
            private_key_id: field("private_key_id")?,
            private_key: field("private_key")?,
            token_uri: field("token_uri")?,
            json: key.to_string(),
        })
    }

    /// Deletes a key: JWTs it signs are refused from now on (tokens already issued live on).
    pub fn delete_service_account_key(&self, key: &ServiceAccountKey) -> Result<()> {
        self.control("delete-key", json!({ "email": key.client_email, "key_id": key.private_key_id })).map(drop)
    }

    /// Adds (or replaces) a Workload Identity Federation provider.
    pub fn add_provider(&self, provider: &WorkloadIdentityProvider) -> Result<()> {
        let condition = match &provider.condition {
            AttributeCondition::Any => json!({}),
            AttributeCondition::SubjectIn(subjects) => json!({ "sub_equals": subjects }),
            AttributeCondition::SubjectPrefix(prefix) => json!({ "sub_prefix": [prefix] }),
        };
        let body = json!({
            "name": provider.name(),
            "issuer": provider.issuer,
            "jwks": provider.jwks,
            "allowed_audiences": provider.allowed_audiences,
            "condition": condition,
        });
        self.control("providers", body).map(drop)
    }

    /// Grants `member` `role` on the service account `email`. Impersonation needs
    /// `roles/iam.workloadIdentityUser` for a `principal://` or `principalSet://` member,
    /// `roles/iam.serviceAccountTokenCreator` for a `serviceAccount:EMAIL` one.
    pub fn bind(&self, email: &str, role: &str, member: &str) -> Result<()> {
        self.control("bindings", json!({ "service_account": email, "role": role, "member": member })).map(drop)
    }

    /// Lets `identity` (a service account's email, or a federated principal) do `actions`
    /// (`pull`, `push`) on the repositories under `repository_prefix`. Without grants a
    /// service account may pull under its own project (`PROJECT/...`), nothing else.
    pub fn grant(&self, identity: &str, repository_prefix: &str, actions: &[&str]) -> Result<()> {
        let body = json!({ "identity": identity, "repository_prefix": repository_prefix, "actions": actions });
        self.control("grants", body).map(drop)
    }

    /// The service account whose tokens the metadata server hands out.
    pub fn set_metadata_identity(&self, email: &str) -> Result<()> {
        self.control("metadata-identity", json!({ "email": email })).map(drop)
    }

    /// Revokes an access or federated token this emulator issued.
    pub fn revoke(&self, token: &str) -> Result<()> {
        self.control("revoke", json!({ "token": token })).map(drop)
    }

    /// Tokens issued from now on live `secs` (generateAccessToken: at most that).
    pub fn set_token_lifetime(&self, secs: u64) -> Result<()> {
        self.control("token-lifetime", json!({ "seconds": secs })).map(drop)
    }

    /// Makes `endpoint` (as in [`Self::counts`]) answer HTTP `status` (e.g. 503) with
    /// Google's `UNAVAILABLE` error; `None` makes it serve again.
    pub fn fail(&self, endpoint: &str, status: Option<u16>) -> Result<()> {
        self.control("fail", json!({ "endpoint": endpoint, "status": status })).map(drop)
    }

    /// The calls so far, oldest first: `endpoint`, `identity` (the account or principal
    /// the call was for, once known; null if refused before), `status`, `error` (Google's
    /// error, or null), `time` (epoch seconds).
    pub fn calls(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_value(self.get("/_emulator/calls")?)?)
    }

    /// Calls so far by endpoint: `oauth:token`, `sts:token`,
    /// `iamcredentials:generateAccessToken`, `registry:token`, `metadata:token`,
    /// `metadata:email`, `metadata:project-id`. Refused and failed calls count too.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        Ok(serde_json::from_value(self.get("/_emulator/counts")?)?)
    }

    /// Every token issued so far, by token: `kind` (`access` or `federated`), `identity`,
    /// `scopes`, `expires` (epoch seconds), `revoked`.
    pub fn tokens(&self) -> Result<BTreeMap<String, Value>> {
        Ok(serde_json::from_value(self.get("/_emulator/tokens")?)?)
    }

    /// Clears [`Self::calls`] and [`Self::counts`], not the configuration or tokens.
    pub fn reset(&self) -> Result<()> {
        self.control("reset", json!({})).map(drop)
    }

    /// Kills the emulator, like an unreachable Google. Its configuration is gone with it.
    pub fn stop(&self) {
        if let Some(mut p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
    }

    /// The emulator's log (requests and any Python traceback).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("emulator.log")
    }

    fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = http_request(self.port, "GET", path, "", b"")
            .with_context(|| format!("GET {path} on the Google emulator"))?;
        if status != 200 {
            bail!("GET {path} on the Google emulator: HTTP {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    fn control(&self, what: &str, body: Value) -> Result<Value> {
        let path = format!("/_emulator/{what}");
        let headers = "Content-Type: application/json\r\n";
        let (status, resp) = http_request(self.port, "POST", &path, headers, body.to_string().as_bytes())
            .with_context(|| format!("POST {path} on the Google emulator"))?;
        if status != 200 {
            bail!("POST {path} on the Google emulator: HTTP {status}: {resp}");
        }
        Ok(serde_json::from_str(&resp)?)
    }
}

/// The path of generateAccessToken for `email`.
fn generate_access_token_path(email: &str) -> String {
    format!("/v1/projects/-/serviceAccounts/{email}:generateAccessToken")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock before 1970").as_secs()
}

fn base64_url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
