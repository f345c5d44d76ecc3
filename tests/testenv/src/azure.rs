use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::process::{Process, temp_dir};
use crate::proxy::ConnectProxy;
use crate::registry::{Registry, ServingTls};
use crate::{free_port, http_request, testbin, wait_until};

/// The user name of an ACR refresh token login.
pub const ACR_USER: &str = "00000000-0000-0000-0000-000000000000";

/// A local Microsoft Entra ID, Azure instance metadata service and Azure Container Registry
/// (`tests/azure/emulator.py`, run by the emulators' Python, with the packages of
/// `tests/gcp/requirements.txt`), strict where Azure is: the token endpoint checks client
/// secrets, and client assertions against the issuer's JWKS and the application's federated
/// identity credentials; IMDS wants `Metadata: true`; each registry's `/oauth2/exchange`
/// takes only live Entra tokens it issued of an identity with a role on that registry, its
/// token realm only live refresh tokens of that registry, and its `/v2/` only live access
/// tokens of the realm (anything else gets ACR's Bearer challenge), forwarding what it lets in
/// to a [`Registry`] on loopback. The registries serve HTTPS under their ACR host names
/// (`*.azurecr.io`, `.cn`, `.us`), reached through [`AzureEmulator::proxy_url`] (a
/// [`ConnectProxy`], for `HTTPS_PROXY`) with [`AzureEmulator::ca_file`] trusted
/// (`SSL_CERT_FILE`). Tokens are JWTs (Entra's carry `tid`, refresh tokens their `exp`).
/// Drop stops it.
pub struct AzureEmulator {
    proc: Mutex<Option<Process>>,
    port: u16,
    imds_port: u16,
    acr_port: u16,
    proxy: ConnectProxy,
    dir: tempfile::TempDir,
}

impl AzureEmulator {
    /// Starts an emulator whose Entra tokens live an hour and refresh tokens three, as
    /// Azure's do; retried with fresh ports when one was taken before it bound it.
    pub fn start() -> Result<AzureEmulator> {
        let mut attempt = 1;
        loop {
            match Self::start_once() {
                Ok(azure) => return Ok(azure),
                Err(error) if attempt < 3 => {
                    eprintln!("testenv: Azure emulator start {attempt} failed, retrying: {error:#}");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn start_once() -> Result<AzureEmulator> {
        let dir = temp_dir("azure")?;
        let (port, imds_port, acr_port) = (free_port(), free_port(), free_port());
        let names = ["*.azurecr.io", "*.azurecr.cn", "*.azurecr.us", "localhost", "127.0.0.1"];
        let tls = ServingTls::new("regcred-testenv-azure-ca", &names)?;
        std::fs::write(dir.path().join("tls.crt"), &tls.cert_pem)?;
        std::fs::write(dir.path().join("tls.key"), &tls.key_pem)?;
        std::fs::write(dir.path().join("ca.crt"), &tls.ca_pem)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../azure/emulator.py");
        let mut cmd = Command::new(&crate::python().path);
        cmd.arg(&script)
            .args(["--port", &port.to_string()])
            .args(["--imds-port", &imds_port.to_string()])
            .args(["--acr-port", &acr_port.to_string()])
            .arg("--tls-cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("tls.key"))
            .arg("--state-dir")
            .arg(dir.path())
            .env("PYTHONUNBUFFERED", "1");
        let mut proc = Process::spawn("azure emulator", cmd, &dir.path().join("emulator.log"))?;
        let ready = dir.path().join("ready");
        wait_until(
            "the Azure emulator",
            Duration::from_secs(60),
            || proc.check_alive(),
            || Ok(std::fs::metadata(&ready)?),
        )
        .with_context(|| crate::python().hint("tests/gcp/requirements.txt"))?;
        let proxy = ConnectProxy::start()?;
        Ok(AzureEmulator { proc: Mutex::new(Some(proc)), port, imds_port, acr_port, proxy, dir })
    }

    /// The Entra authority, `http://127.0.0.1:PORT` (Azure's `https://login.microsoftonline.com`):
    /// its token endpoint is `<authority>/<tenant>/oauth2/v2.0/token`.
    pub fn authority(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The instance metadata service, `http://127.0.0.1:PORT` (Azure's `http://169.254.169.254`).
    pub fn imds_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.imds_port)
    }

    /// The proxy through which the registries' host names reach the emulator, for
    /// `HTTPS_PROXY` (with loopback in `NO_PROXY`).
    pub fn proxy_url(&self) -> String {
        self.proxy.url()
    }

    /// The `host:443` targets tunnelled so far.
    pub fn tunnels(&self) -> Vec<String> {
        self.proxy.tunnels()
    }

    /// The CA behind the registries' certificate (PEM file), for `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The CA's PEM.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.ca_file())?)
    }

    /// Serves the registry `host` (e.g. `regcredtest.azurecr.io`) in front of `upstream`, which
    /// the emulator logs in to as `user`/`password` (a basic auth [`Registry`] no one else
    /// reaches by that name).
    pub fn add_registry(&self, host: &str, upstream: &Registry, user: &str, password: &str) -> Result<()> {
        let body = json!({ "host": host, "upstream": format!("http://{}", upstream.host()), "auth": format!("{user}:{password}") });
        self.control("registries", body)?;
        self.proxy.route(&format!("{host}:443"), self.acr_port);
        Ok(())
    }

    /// As [`Self::add_registry`], for a node that cannot resolve `host`: the node maps `host`
    /// to [`Self::registry_url`] (containerd's `hosts.toml`, trusting [`Self::ca_pem`]), whose
    /// requests come by address and go to this registry, and the challenge names the realm at
    /// `https://localhost:PORT/oauth2/token` (the same realm, reached by a name the node
    /// resolves) instead of `https://<host>/oauth2/token`. One such registry per emulator.
    pub fn add_registry_for_node(&self, host: &str, upstream: &Registry, user: &str, password: &str) -> Result<()> {
        let body = json!({ "host": host, "upstream": format!("http://{}", upstream.host()),
                           "auth": format!("{user}:{password}"), "loopback": true,
                           "realm": format!("https://localhost:{}/oauth2/token", self.acr_port) });
        self.control("registries", body)?;
        self.proxy.route(&format!("{host}:443"), self.acr_port);
        Ok(())
    }

    /// `https://127.0.0.1:PORT`, where the registries are served (by `Host`, or by address for
    /// the one of [`Self::add_registry_for_node`]).
    pub fn registry_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.acr_port)
    }

    /// Registers an application (service principal) `client_id` in `tenant` (a GUID; also
    /// reachable by `domains`), with an optional client secret.
    pub fn add_app(&self, tenant: &str, client_id: &str, secret: Option<&str>) -> Result<()> {
        self.control("apps", json!({ "tenant": tenant, "client_id": client_id, "secret": secret })).map(drop)
    }

    /// Adds a federated identity credential to the application `client_id`: ServiceAccount
    /// tokens of `issuer` with this `subject` (`system:serviceaccount:NS:NAME`) and the audience
    /// `api://AzureADTokenExchange`.
    pub fn add_federated_credential(&self, tenant: &str, client_id: &str, issuer: &str, subject: &str) -> Result<()> {
        let body = json!({ "tenant": tenant, "client_id": client_id,
                           "federated": [{ "issuer": issuer, "subject": subject }] });
        self.control("apps", body).map(drop)
    }

    /// Trusts `issuer`'s keys (a JWKS) for federated identity credentials.
    pub fn add_issuer(&self, issuer: &str, jwks: &Value) -> Result<()> {
        self.control("issuers", json!({ "issuer": issuer, "jwks": jwks })).map(drop)
    }

    /// Attaches a managed identity `client_id` of `tenant` to the machine (IMDS hands out its
    /// tokens): the system-assigned one when `system`, else user-assigned with `resource_id`.
    pub fn add_managed_identity(
        &self,
        tenant: &str,
        client_id: &str,
        resource_id: Option<&str>,
        system: bool,
    ) -> Result<()> {
        let body = json!({ "tenant": tenant, "client_id": client_id, "managed": true,
                           "resource_id": resource_id, "system": system });
        self.control("apps", body).map(drop)
    }

    /// Assigns `role` (`AcrPull`, `AcrPush`) on `registry` to the identity `client_id`.
    pub fn assign_role(&self, client_id: &str, registry: &str, role: &str) -> Result<()> {
        self.control("role-assignments", json!({ "client_id": client_id, "registry": registry, "role": role }))
            .map(drop)
    }

    /// Entra tokens (`entra` seconds) and refresh tokens (`refresh` seconds) issued from now on.
    pub fn set_token_lifetimes(&self, entra: u64, refresh: u64) -> Result<()> {
        self.control("token-lifetime", json!({ "entra": entra, "refresh": refresh })).map(drop)
    }

    /// Makes `endpoint` (`entra:token`, `imds:token`, `acr:exchange`, `acr:token`) answer HTTP
    /// `status`; `None` makes it serve again.
    pub fn fail(&self, endpoint: &str, status: Option<u16>) -> Result<()> {
        self.control("fail", json!({ "endpoint": endpoint, "status": status })).map(drop)
    }

    /// Revokes a token this emulator issued.
    pub fn revoke(&self, token: &str) -> Result<()> {
        self.control("revoke", json!({ "token": token })).map(drop)
    }

    /// The calls so far, oldest first: `endpoint`, `identity` (a client id, once known),
    /// `status`, `error`, `time`.
    pub fn calls(&self) -> Result<Vec<Value>> {
        Ok(serde_json::from_value(self.get("/_emulator/calls")?)?)
    }

    /// Calls so far by endpoint (refused and failed ones too).
    pub fn counts(&self) -> Result<BTreeMap<String, u64>> {
        Ok(serde_json::from_value(self.get("/_emulator/counts")?)?)
    }

    /// Every token issued so far, by token: `kind` (`entra`, `refresh`, `access`),
    /// `identity`, `tenant`, `registry`, `expires` (epoch seconds), `revoked`.
    pub fn tokens(&self) -> Result<BTreeMap<String, Value>> {
        Ok(serde_json::from_value(self.get("/_emulator/tokens")?)?)
    }

    /// Kills the emulator, like an unreachable Azure. Its configuration is gone with it.
    pub fn stop(&self) {
        if let Some(mut p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
    }

    /// The emulator's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("emulator.log")
    }

    /// Pulls `image` (`<registry>/<repo>:<tag>`) with crane, `dockerconfigjson` its only
    /// credentials, through the proxy, trusting only the emulator's CA; Err with crane's
    /// stderr if that fails.
    pub fn pull(&self, image: &str, dockerconfigjson: &[u8]) -> Result<()> {
        let work = tempfile::tempdir()?;
        let config_dir = work.path().join("docker");
        std::fs::create_dir_all(&config_dir)?;
        std::fs::write(config_dir.join("config.json"), dockerconfigjson)?;
        let out = work.path().join("image.tar");
        let output = Command::new(testbin("crane")?)
            .env("DOCKER_CONFIG", &config_dir)
            .env("HTTPS_PROXY", self.proxy_url())
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("SSL_CERT_FILE", self.ca_file())
            .env_remove("SSL_CERT_DIR")
            .env_remove("HTTP_PROXY")
            .env_remove("ALL_PROXY")
            .args(["pull", image])
            .arg(&out)
            .output()
            .context("running crane")?;
        if !output.status.success() {
            bail!("crane pull {image} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(())
    }

    fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = http_request(self.port, "GET", path, "", b"")
            .with_context(|| format!("GET {path} on the Azure emulator"))?;
        if status != 200 {
            bail!("GET {path} on the Azure emulator: HTTP {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    fn control(&self, what: &str, body: Value) -> Result<Value> {
        let path = format!("/_emulator/{what}");
        let headers = "Content-Type: application/json\r\n";
        let (status, resp) = http_request(self.port, "POST", &path, headers, body.to_string().as_bytes())
            .with_context(|| format!("POST {path} on the Azure emulator"))?;
        if status != 200 {
            bail!("POST {path} on the Azure emulator: HTTP {status}: {resp}");
        }
        Ok(serde_json::from_str(&resp)?)
    }
}
