use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::process::{Process, temp_dir};
use crate::{free_port, http_get, http_request, random_hex, wait_until};

/// ECR's own token lifetime: 12 hours.
const DEFAULT_TOKEN_LIFETIME: u64 = 12 * 60 * 60;

/// The account of the emulator's users and of the roles tests register by default.
pub const ACCOUNT: &str = "123456789012";
/// The audience STS requires of web identity tokens (IRSA's).
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// A local AWS (`tests/aws/emulator.py`, run by `$REGCRED_PYTHON`, the virtual environment
/// of `scripts/setup.sh` or `python3`, with
/// `tests/aws/requirements.txt` installed), strict where AWS is: every request's SigV4
/// signature is checked against the secret key (and session token) of its access key id, within
/// 5 minutes of its clock; STS AssumeRole checks the role's trust in the caller and its
/// ExternalId, AssumeRoleWithWebIdentity verifies the token against an OIDC provider's keys and
/// the role's trust in its `sub`; temporary credentials expire. Only keys registered with
/// [`Self::add_access_key`] (and the temporary ones it hands out) sign; only roles registered
/// with [`Self::add_role`] can be assumed. moto serves ECR with a realistic, rotating
/// GetAuthorizationToken; plus request counts, fault injection, a record of calls, IMDSv2 and
/// EKS Pod Identity stubs, and the login check of the registries that stand in for ECR
/// ([`crate::Registry::start_ecr`]: ECR's Basic challenge, the passwords GetAuthorizationToken
/// issued, live, of a principal the registry lets in). Credentials from IMDS have access key ids starting
/// `AKIAIMDS`, from Pod Identity `AKIAPODID`, from STS AssumeRole* `ASIA`. Drop stops it.
pub struct AwsEmulator {
    // Field order is drop order: the process stops before its dir goes.
    proc: Mutex<Option<Process>>,
    port: u16,
    imds_port: u16,
    pod_identity_port: u16,
    pod_identity_token: String,
    lifetime: AtomicU64,
    sts_lifetime: AtomicU64,
    /// What was registered (control path, JSON body), replayed after a restart: IAM's users,
    /// roles and providers outlive an outage.
    config: Mutex<Vec<(String, Value)>>,
    dir: tempfile::TempDir,
}

/// Whom a role trusts (its trust policy), for [`AwsEmulator::add_role`].
#[derive(Clone, Debug, Default)]
pub struct RoleTrust {
    /// Principal ARNs allowed to `sts:AssumeRole` it (users: [`AwsEmulator::add_access_key`]'s).
    pub principals: Vec<String>,
    /// The `sts:ExternalId` AssumeRole must present, if any.
    pub external_id: Option<String>,
    /// `sts:AssumeRoleWithWebIdentity` for tokens of this OIDC issuer whose `sub` is one of
    /// these (the `StringEquals` condition on `<issuer>:sub` of an IAM OIDC trust policy).
    pub web_identity: Vec<(String, Vec<String>)>,
}

impl RoleTrust {
    /// Trusts one Kubernetes ServiceAccount's tokens from `issuer` (IRSA's trust policy).
    pub fn service_account(issuer: &str, namespace: &str, name: &str) -> RoleTrust {
        let sub = format!("system:serviceaccount:{namespace}:{name}");
        RoleTrust { web_identity: vec![(issuer.to_string(), vec![sub])], ..Default::default() }
    }

    /// Trusts one principal for AssumeRole, with an ExternalId condition or none.
    pub fn principal(arn: &str, external_id: Option<&str>) -> RoleTrust {
        RoleTrust {
            principals: vec![arn.to_string()],
            external_id: external_id.map(str::to_string),
            ..Default::default()
        }
    }
}

impl AwsEmulator {
    /// Starts an emulator whose ECR tokens live 12 h, as real ones do.
    pub fn start() -> Result<AwsEmulator> {
        Self::start_with_lifetime(DEFAULT_TOKEN_LIFETIME)
    }

    /// Starts an emulator whose ECR tokens expire `secs` after they are issued. A port picked
    /// as free can be taken before the emulator binds it (by anything else starting at the
    /// same time), so a failed start is retried with fresh ports.
    pub fn start_with_lifetime(secs: u64) -> Result<AwsEmulator> {
        let mut attempt = 1;
        loop {
            match Self::start_once(secs) {
                Ok(aws) => return Ok(aws),
                Err(error) if attempt < 3 => {
                    eprintln!("testenv: AWS emulator start {attempt} failed, retrying: {error:#}");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn start_once(secs: u64) -> Result<AwsEmulator> {
        let dir = temp_dir("aws")?;
        let pod_identity_token = format!("pod-identity-{}", random_hex());
        std::fs::write(dir.path().join("pod-identity-token"), &pod_identity_token)?;
        let aws = AwsEmulator {
            proc: Mutex::new(None),
            port: free_port(),
            imds_port: free_port(),
            pod_identity_port: free_port(),
            pod_identity_token,
            lifetime: AtomicU64::new(secs),
            sts_lifetime: AtomicU64::new(3600),
            config: Mutex::new(Vec::new()),
            dir,
        };
        aws.spawn()?;
        Ok(aws)
    }

    fn spawn(&self) -> Result<()> {
        let ready = self.dir.path().join("ready");
        let _ = std::fs::remove_file(&ready);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../aws/emulator.py");
        let mut cmd = Command::new(&crate::python().path);
        cmd.arg(&script)
            .args(["--port", &self.port.to_string()])
            .args(["--imds-port", &self.imds_port.to_string()])
            .args(["--pod-identity-port", &self.pod_identity_port.to_string()])
            .args(["--token-lifetime", &self.lifetime.load(Ordering::SeqCst).to_string()])
            .args(["--sts-lifetime", &self.sts_lifetime.load(Ordering::SeqCst).to_string()])
            .args(["--pod-identity-token", &self.pod_identity_token])
            .arg("--state-dir")
            .arg(self.dir.path())
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Process::spawn("aws emulator", cmd, &self.dir.path().join("emulator.log"))?;
        wait_until(
            "the AWS emulator",
            Duration::from_secs(60),
            || proc.check_alive(),
            || Ok(std::fs::metadata(&ready)?),
        )
        .with_context(|| crate::python().hint("tests/aws/requirements.txt"))?;
        *self.proc.lock().unwrap() = Some(proc);
        let config = self.config.lock().unwrap().clone();
        for (path, body) in &config {
            self.post_json(path, body)?;
        }
        Ok(())
    }

    /// Registers an access key of IAM user `user` (of [`ACCOUNT`]), as IAM's CreateAccessKey:
    /// requests signed with `secret_access_key` are its. Returns the user's ARN.
    pub fn add_access_key(&self, user: &str, access_key_id: &str, secret_access_key: &str) -> Result<String> {
        let body = json!({"user": user, "access_key_id": access_key_id, "secret_access_key": secret_access_key});
        self.configure("/_emulator/access-keys", body)?;
        Ok(format!("arn:aws:iam::{ACCOUNT}:user/{user}"))
    }

    /// Creates (or replaces) the role `arn` with this trust policy.
    pub fn add_role(&self, arn: &str, trust: &RoleTrust) -> Result<()> {
        let web_identity: Vec<Value> = trust
            .web_identity
            .iter()
            .map(|(issuer, subjects)| json!({"issuer": issuer, "subjects": subjects}))
            .collect();
        let body = json!({"arn": arn, "principals": trust.principals, "external_id": trust.external_id,
                          "web_identity": web_identity});
        self.configure("/_emulator/roles", body)
    }

    /// Registers (or replaces) an IAM OpenID Connect provider: tokens of `issuer` verify against
    /// `jwks` (given inline, e.g. [`crate::ControlPlane::service_account_jwks`]); their
    /// audience must be `sts.amazonaws.com`.
    pub fn add_oidc_provider(&self, issuer: &str, jwks: &Value) -> Result<()> {
        self.configure("/_emulator/oidc-providers", json!({"issuer": issuer, "jwks": jwks}))
    }

    /// STS credentials issued from now on live at most `secs` (and are refused after).
    pub fn set_sts_lifetime(&self, secs: u64) -> Result<()> {
        self.post(&format!("/_emulator/sts-lifetime?seconds={secs}"))?;
        self.sts_lifetime.store(secs, Ordering::SeqCst);
        Ok(())
    }

    fn configure(&self, path: &str, body: Value) -> Result<()> {
        self.post_json(path, &body)?;
        self.config.lock().unwrap().push((path.to_string(), body));
        Ok(())
    }

    fn post_json(&self, path: &str, body: &Value) -> Result<()> {
        let headers = "Content-Type: application/json\r\n";
        let (status, answer) = http_request(self.port, "POST", path, headers, body.to_string().as_bytes())
            .with_context(|| format!("POST {path} on the AWS emulator"))?;
        if status != 200 {
            bail!("POST {path} on the AWS emulator: HTTP {status}: {answer}");
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL` (all services) or an
    /// SDK client's `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// For `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn imds_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.imds_port)
    }

    /// For `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn pod_identity_uri(&self) -> String {
        format!("http://127.0.0.1:{}/v1/credentials", self.pod_identity_port)
    }

    /// What the Pod Identity stub expects as the Authorization header
    /// (`AWS_CONTAINER_AUTHORIZATION_TOKEN`).
    pub fn pod_identity_token(&self) -> String {
        self.pod_identity_token.clone()
    }

    /// A file holding [`Self::pod_identity_token`], for
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` (what EKS sets).
    pub fn pod_identity_token_file(&self) -> PathBuf {
        self.dir.path().join("pod-identity-token")
    }

    /// Writes `token` (a ServiceAccount token with the STS audience, e.g.
    /// [`crate::ControlPlane::service_account_token`]) to a file for
    /// `AWS_WEB_IDENTITY_TOKEN_FILE`, and returns its path.
    pub fn web_identity_token_file(&self, token: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("web-identity-token-{}", random_hex()));
        std::fs::write(&path, token)?;
        Ok(path)
    }

    /// Requests so far by `service:Action`, e.g. `ecr:GetAuthorizationToken`,
    /// `sts:AssumeRoleWithWebIdentity`, and for the stubs `imds:Token`,
    /// `imds:RoleName`, `imds:Credentials`, `imds:Region`,
    /// `pod-identity:Credentials`. Injected failures count too.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        Ok(serde_json::from_str(&self.get("/_emulator/counts")?)?)
    }

    /// The AWS API requests so far, oldest first: `action`, `access_key_id`
    /// (that signed it, also when refused; null if unsigned), `caller` (its principal's ARN once
    /// the signature checked out), `time` (epoch seconds), `status`, `error` (the AWS error code,
    /// injected or not, or null) and `message`; for STS AssumeRole* `role_arn`, `session_name`,
    /// `external_id` and (web identity) `sub`, the verified token's subject; for
    /// GetAuthorizationToken `expiresAt` (epoch seconds) and the `authorizationData` returned.
    /// Each request to a [`crate::Registry::start_ecr`] registry is a `registry:Login` call:
    /// `registry` (its account), `method`, `path`, `status` (200: let in; 401, 403: what the
    /// client got), `error` (why not), and of a password the emulator issued its `caller` and
    /// `expiresAt`.
    pub fn calls(&self) -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.get("/_emulator/calls")?)?)
    }

    /// Clears [`Self::counts`] and [`Self::calls`] (not faults, not the lifetime).
    pub fn reset(&self) -> Result<()> {
        self.post("/_emulator/reset")
    }

    /// ECR tokens issued from now on expire `secs` after issue.
    pub fn set_token_lifetime(&self, secs: u64) -> Result<()> {
        self.post(&format!("/_emulator/token-lifetime?seconds={secs}"))?;
        self.lifetime.store(secs, Ordering::SeqCst);
        Ok(())
    }

    /// Sets AWS's clock `secs` ahead of this machine's (negative: behind): its `Date`
    /// headers, and the expiries of the ECR tokens it issues from now on.
    pub fn set_clock_offset(&self, secs: i64) -> Result<()> {
        self.post(&format!("/_emulator/clock-offset?seconds={secs}"))
    }

    /// Makes every `action` (`service:Action`, as in [`Self::counts`]) fail
    /// with HTTP 400 and AWS error `code` (e.g. `AccessDeniedException`);
    /// `None` makes it succeed again.
    pub fn fail(&self, action: &str, code: Option<&str>) -> Result<()> {
        self.fail_with_status(action, code, 400)
    }

    /// [`Self::fail`] with another HTTP status, e.g. 500 or 503, which SDKs retry.
    pub fn fail_with_status(&self, action: &str, code: Option<&str>, status: u16) -> Result<()> {
        let (action, code) = (query_escape(action), query_escape(code.unwrap_or("")));
        self.post(&format!("/_emulator/fail?action={action}&code={code}&status={status}"))
    }

    /// Kills the emulator (all three ports refuse connections), like an
    /// unreachable AWS.
    pub fn stop(&self) {
        if let Some(mut p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
    }

    /// Stops and starts the emulator on the same ports and returns once it
    /// serves again. It starts afresh: no counts, calls, faults, temporary credentials or moto
    /// state; the lifetimes are the last ones set, and the access keys, roles and OIDC providers
    /// registered are registered again.
    pub fn restart(&self) -> Result<()> {
        self.stop();
        self.spawn()
    }

    /// The emulator's log (moto's request log and any Python traceback).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("emulator.log")
    }

    fn get(&self, path: &str) -> Result<String> {
        let (status, body) = http_get(self.port, path).with_context(|| format!("GET {path} on the AWS emulator"))?;
        if status != 200 {
            bail!("GET {path} on the AWS emulator: HTTP {status}: {body}");
        }
        Ok(body)
    }

    fn post(&self, path: &str) -> Result<()> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))
            .with_context(|| format!("POST {path} on the AWS emulator"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "POST {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n", self.port)?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if resp.split_whitespace().nth(1) != Some("200") {
            bail!("POST {path} on the AWS emulator: {resp}");
        }
        Ok(())
    }
}

/// Percent-encodes all but unreserved characters (and `:`, fine in a query).
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
