use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::process::{Process, temp_dir};
use crate::{free_port, http_get, random_hex, wait_until};

/// ECR's own token lifetime: 12 hours.
const DEFAULT_TOKEN_LIFETIME: u64 = 12 * 60 * 60;

/// A local AWS (`tests/aws/emulator.py`, run by `$REGCRED_PYTHON`, the virtual environment
/// of `scripts/setup.sh` or `python3`, with
/// `tests/aws/requirements.txt` installed): moto for ECR/STS/IAM with a
/// realistic, rotating ECR GetAuthorizationToken, request counts, fault
/// injection and a record of calls; plus IMDSv2 and EKS Pod Identity stubs, and the token
/// realm of a registry standing in for ECR ([`AwsEmulator::token_realm`]).
/// Credentials from IMDS have access key ids starting `AKIAIMDS`, from Pod
/// Identity `AKIAPODID`, from STS AssumeRole* `ASIA`. Drop stops it.
pub struct AwsEmulator {
    // Field order is drop order: the process stops before its dir goes.
    proc: Mutex<Option<Process>>,
    port: u16,
    imds_port: u16,
    pod_identity_port: u16,
    pod_identity_token: String,
    lifetime: AtomicU64,
    dir: tempfile::TempDir,
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
        // Any JWT-shaped string will do: STS here does not verify it.
        let jwt = ["{\"alg\":\"RS256\"}", "{\"sub\":\"system:serviceaccount:regcred:regcred\"}", "sig"]
            .map(|part| base64_url(part.as_bytes()))
            .join(".");
        std::fs::write(dir.path().join("web-identity-token"), jwt)?;
        let aws = AwsEmulator {
            proc: Mutex::new(None),
            port: free_port(),
            imds_port: free_port(),
            pod_identity_port: free_port(),
            pod_identity_token,
            lifetime: AtomicU64::new(secs),
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
        Ok(())
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL` (all services) or an
    /// SDK client's `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The token realm of a registry that stands in for ECR, for
    /// [`crate::Registry::start_with_token_realm`]: `GET /registry/token` on the emulator
    /// grants pull and push on any repository to Basic `AWS:<password>` where the password is
    /// one GetAuthorizationToken issued and that has not expired (tokens of a run before a
    /// [`Self::restart`] are unknown after it), and never for longer than that password lives;
    /// anything else gets 401. Its requests appear in [`Self::calls`] as `registry:Token`,
    /// with the `expiresAt` of the password presented (null if unknown).
    pub fn token_realm(&self) -> crate::TokenRealm {
        crate::TokenRealm {
            // Not 127.0.0.1: against SSRF, crane refuses a realm at a loopback IP literal
            // other than the registry's own host.
            realm: format!("http://localhost:{}/registry/token", self.port),
            service: "regcred-testenv-ecr".into(),
            issuer: "regcred-testenv-ecr-realm".into(),
            jwks: self.dir.path().join("registry-jwks.json"),
            signing_algorithms: vec!["ES256".into()],
        }
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

    /// A file holding a JWT-shaped token, for `AWS_WEB_IDENTITY_TOKEN_FILE`.
    pub fn web_identity_token_file(&self) -> PathBuf {
        self.dir.path().join("web-identity-token")
    }

    /// Requests so far by `service:Action`, e.g. `ecr:GetAuthorizationToken`,
    /// `sts:AssumeRoleWithWebIdentity`, and for the stubs `imds:Token`,
    /// `imds:RoleName`, `imds:Credentials`, `imds:Region`,
    /// `pod-identity:Credentials`. Injected failures count too.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        Ok(serde_json::from_str(&self.get("/_emulator/counts")?)?)
    }

    /// The AWS API requests so far, oldest first: `action`, `access_key_id`
    /// (that signed it; null if unsigned), `time` (epoch seconds), `status`,
    /// `error` (injected error code or null), and for GetAuthorizationToken
    /// `expiresAt` (epoch seconds) and the `authorizationData` returned.
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
    /// serves again. It starts afresh: no counts, calls, faults or moto
    /// state; the token lifetime is the last one set.
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

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
