use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;

use crate::process::{Process, temp_dir};
use crate::{free_port, http_get, random_hex, testbin, wait_until};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The `service` a token registry names in its challenges, and the audience of its tokens.
const TOKEN_SERVICE: &str = "regcred-testenv";
const TOKEN_ISSUER: &str = "regcred-testenv-token-server";

/// How a [`Registry`] serves and authenticates. The default is plain HTTP with basic auth.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegistryOptions {
    /// HTTPS, with a certificate for `127.0.0.1` and `localhost` from a fresh test CA
    /// ([`Registry::ca_pem`]).
    pub tls: bool,
    /// Bearer tokens (the Distribution token handshake) from a token server
    /// ([`Registry::token_server_url`]) instead of basic auth. The token server checks the
    /// users and grants each only the repositories under its own name: `team` gets
    /// `team/app`, not `other/app`.
    pub token_auth: bool,
}

/// A token service outside testenv that a [`Registry`] sends its clients to and whose tokens
/// it trusts, e.g. [`crate::GcpEmulator::token_realm`].
#[derive(Clone, Debug)]
pub struct TokenRealm {
    /// The token endpoint, the `realm` of the registry's Bearer challenge.
    pub realm: String,
    /// The `service` of the challenge, which the tokens name as their audience.
    pub service: String,
    /// The `iss` of the tokens.
    pub issuer: String,
    /// A JWKS file with the public keys of the tokens, under the `kid`s they carry.
    pub jwks: PathBuf,
    /// The JWS `alg`s the registry accepts, e.g. `ES256`.
    pub signing_algorithms: Vec<String>,
    /// For a realm served over HTTPS: the PEM of the CA behind its certificate. A registry
    /// with such a realm serves HTTPS too, and its clients trust both CAs
    /// ([`Registry::ca_pem`]).
    pub ca_pem: Option<String>,
}

/// A CNCF distribution registry on `127.0.0.1:PORT` whose users are bcrypt htpasswd
/// entries, checked by the registry itself (basic auth) or by its token server; or whose
/// logins a token realm outside testenv checks ([`Registry::start_with_token_realm`]), or an
/// ECR front ([`Registry::start_ecr`]). Its
/// access log, one line per request, is in [`Registry::log_path`] (see
/// [`Registry::requests_since`]). Drop stops it.
pub struct Registry {
    // Field order is drop order: the processes stop before their files go.
    /// The ECR front ([`Registry::start_ecr`]), before the registry behind it.
    front: Option<Process>,
    proc: Option<Process>,
    token_server: Option<Process>,
    /// Where clients connect: the registry, or the front before it.
    port: u16,
    /// The registry's own port behind a front.
    upstream_port: Option<u16>,
    token_port: Option<u16>,
    ca_pem: Option<String>,
    dir: tempfile::TempDir,
}

/// One request in a registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent, query included (e.g. `/v2/team/app/manifests/v1`).
    pub path: String,
    pub status: u16,
}

impl Registry {
    /// A plain HTTP registry with basic auth (its htpasswd auth does not insist on TLS).
    pub fn start(users: &[(&str, &str)]) -> Result<Registry> {
        Registry::start_with(users, RegistryOptions::default())
    }

    /// A registry served as `options` say, with these users; it serves when this returns.
    pub fn start_with(users: &[(&str, &str)], options: RegistryOptions) -> Result<Registry> {
        Registry::start_inner(users, options, None)
    }

    /// A registry that only takes bearer tokens from `realm`; it has no users of its own, and
    /// serves when this returns. Over HTTPS when the realm is (its clients then trust the
    /// realm's CA and the registry's, [`Registry::ca_pem`]), else plain HTTP: clients refuse
    /// an HTTP realm for an HTTPS registry.
    pub fn start_with_token_realm(realm: &TokenRealm) -> Result<Registry> {
        let options = RegistryOptions { tls: realm.ca_pem.is_some(), ..Default::default() };
        Registry::start_inner(&[], options, Some(realm))
    }

    /// A registry that stands in for the ECR registry `host`
    /// (`<account>.dkr.ecr.<region>.amazonaws.com`), authenticating as ECR does with the
    /// passwords `aws` issues: `tests/aws/ecr_registry.py` (run by the emulators' Python) serves
    /// HTTPS on [`Registry::host`] with a certificate for `host`, `127.0.0.1` and `localhost`
    /// from a CA of its own ([`Registry::ca_pem`]), challenges
    /// `Basic realm="https://HOST/",service="ecr.amazonaws.com"`, lets in `AWS:<password>` with
    /// a live password of a principal of the host's account or of one of `trusted_accounts`
    /// (a repository policy naming them), and forwards what it lets in to a registry without
    /// auth of its own on another loopback port ([`Registry::requests_since`] lists what
    /// reached it). The emulator decides each request and records it as `registry:Login`
    /// ([`crate::AwsEmulator::calls`]). Serves when this returns.
    pub fn start_ecr(aws: &crate::AwsEmulator, host: &str, trusted_accounts: &[&str]) -> Result<Registry> {
        let dir = temp_dir("ecr-registry")?;
        let upstream_port = free_port();
        let mut reg = Registry {
            front: None,
            proc: None,
            token_server: None,
            port: free_port(),
            upstream_port: Some(upstream_port),
            token_port: None,
            ca_pem: None,
            dir,
        };
        // Relative URLs (upload locations): the registry does not know the front's address.
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n  addr: 127.0.0.1:{upstream_port}\n  \
             secret: {secret}\n  relativeurls: true\n",
            root = reg.path("data").display(),
            secret = random_hex(),
        );
        std::fs::write(reg.path("config.yml"), config)?;
        reg.write_tls_files(&["127.0.0.1", "localhost", host])?;
        reg.spawn()?;

        let ready = reg.path("front-ready");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../aws/ecr_registry.py");
        let mut cmd = Command::new(&crate::python().path);
        cmd.arg(&script)
            .args(["--port", &reg.port.to_string(), "--host", host])
            .args(["--upstream", &format!("http://127.0.0.1:{upstream_port}"), "--emulator", &aws.endpoint()])
            .arg("--cert")
            .arg(reg.path("tls.crt"))
            .arg("--key")
            .arg(reg.path("tls.key"))
            .arg("--ready")
            .arg(&ready)
            .env("PYTHONUNBUFFERED", "1");
        for account in trusted_accounts {
            cmd.args(["--trust", account]);
        }
        let mut front = Process::spawn("ecr registry", cmd, &reg.path("front.log"))?;
        wait_until("the ECR registry front", READY_TIMEOUT, || front.check_alive(), || Ok(std::fs::metadata(&ready)?))
            .with_context(|| crate::python().hint("tests/aws/requirements.txt"))?;
        reg.front = Some(front);
        Ok(reg)
    }

    fn start_inner(users: &[(&str, &str)], options: RegistryOptions, realm: Option<&TokenRealm>) -> Result<Registry> {
        let dir = temp_dir("registry")?;
        let mut reg = Registry {
            front: None,
            proc: None,
            token_server: None,
            port: free_port(),
            upstream_port: None,
            token_port: None,
            ca_pem: None,
            dir,
        };
        reg.set_users(users)?;
        let mut http = format!("  addr: 127.0.0.1:{}\n  secret: {}\n", reg.port, random_hex());
        if options.tls {
            reg.write_tls_files(&["127.0.0.1", "localhost"])?;
            if let Some(realm_ca) = realm.and_then(|r| r.ca_pem.as_deref()) {
                reg.trust_also(realm_ca)?;
            }
            http += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                reg.path("tls.crt").display(),
                reg.path("tls.key").display()
            );
        }
        let auth = if let Some(realm) = realm {
            token_auth_config(realm)
        } else if options.token_auth {
            let public_key = reg.start_token_server(options.tls)?;
            token_auth_config(&reg.token_server_realm(public_key)?)
        } else {
            format!("  htpasswd:\n    realm: regcred-testenv\n    path: {}\n", reg.path("htpasswd").display())
        };
        // The access log goes to stdout, so into registry.log with the (warn and up) logs.
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\nhttp:\n{http}auth:\n{auth}",
            root = reg.path("data").display(),
        );
        std::fs::write(reg.path("config.yml"), config)?;
        reg.spawn()?;
        Ok(reg)
    }

    /// `127.0.0.1:PORT`, the key of this registry in a `.dockerconfigjson`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The loopback port of [`Registry::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://HOST` or `https://HOST`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.host())
    }

    /// The PEM of the CA behind the serving certificate, for TLS registries; with an HTTPS
    /// token realm, followed by the realm's CA (a bundle: clients need both).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The token endpoint (the `realm` of the registry's Bearer challenge), for token
    /// auth registries: `http(s)://localhost:PORT/token/`, the token server listening on
    /// 127.0.0.1. It answers 401 to a wrong password.
    pub fn token_server_url(&self) -> Option<String> {
        // Not 127.0.0.1: against SSRF, crane (go-containerregistry) refuses a realm at a
        // loopback or private IP literal unless it is the registry's own host:port.
        self.token_port.map(|port| format!("{}://localhost:{port}/token/", self.scheme()))
    }

    /// Replaces the users. Whoever checks them (the registry or its token server) rereads
    /// the htpasswd file when its modification time changes, so this takes effect at the
    /// next request, without a restart.
    pub fn set_users(&self, users: &[(&str, &str)]) -> Result<()> {
        let mut htpasswd = String::new();
        for (user, pass) in users {
            // Lowest cost: these are test passwords, and each auth check pays it.
            htpasswd += &format!("{user}:{}\n", bcrypt::hash(pass, 4)?);
        }
        let path = self.path("htpasswd");
        // A rewrite within the filesystem's timestamp granularity would keep the old
        // modification time, and the old users with it: make sure it moves.
        let previous = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let mtime = match previous {
            Some(t) => SystemTime::now().max(t + Duration::from_millis(1)),
            None => SystemTime::now(),
        };
        // Renamed into place, so that a reader never sees half a file.
        let tmp = self.path("htpasswd.tmp");
        std::fs::write(&tmp, htpasswd)?;
        std::fs::File::options().write(true).open(&tmp)?.set_modified(mtime)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Stops the registry (not its token server), so that connections are refused until
    /// [`Registry::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.stop();
        }
    }

    /// Starts the stopped registry again on the same port, with the same storage and
    /// users, and waits until it serves.
    pub fn start_again(&mut self) -> Result<()> {
        ensure!(self.proc.is_none(), "the registry is running");
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(testbin("registry")?);
        cmd.arg("serve")
            .arg(self.path("config.yml"))
            // distribution v3 exports OpenTelemetry traces by default.
            .env("OTEL_TRACES_EXPORTER", "none");
        let mut proc = Process::spawn("registry", cmd, &self.log_path())?;
        // Any HTTP answer means it serves: 401 without credentials, and over TLS the 400
        // Go's server gives a plain HTTP request.
        let port = self.upstream_port.unwrap_or(self.port);
        wait_until("registry", READY_TIMEOUT, || proc.check_alive(), || http_get(port, "/v2/").map(drop))?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Builds a one-layer image (a single small file) and pushes it as
    /// `HOST/repo:tag` with the given credentials; returns that reference.
    pub fn push_test_image(&self, repo: &str, tag: &str, user: &str, pass: &str) -> Result<String> {
        let image = format!("{}/{repo}:{tag}", self.host());
        let work = tempfile::tempdir()?;
        let layer = work.path().join("layer.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&layer)?);
        let content = format!("regcred test image {image}\n");
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, "regcred-test.txt", content.as_bytes())?;
        tar.into_inner()?;

        let auth = docker_config_json(&self.host(), user, pass);
        let layer = layer.to_str().context("non-UTF-8 temp path")?;
        self.crane(work.path(), &auth, &["append", "-f", layer, "-t", &image])
            .with_context(|| format!("pushing {image}"))?;
        Ok(image)
    }

    /// Builds an image that runs `testimage` (the static program from `tests/testbin/testimage`,
    /// alone in one layer as `/testimage`) with `args`, e.g. `["hello", "there"]` (prints
    /// `hello there` and exits 0) or `["pause"]`, and pushes it as `HOST/repo:tag` with the
    /// given credentials (`crane append`, then `crane mutate --entrypoint …
    /// --set-platform=linux/amd64`, as a node needs a platform to run it); returns that
    /// reference. Every such image has the same layer; tags differ by their config.
    pub fn push_program_image(&self, repo: &str, tag: &str, user: &str, pass: &str, args: &[&str]) -> Result<String> {
        let image = format!("{}/{repo}:{tag}", self.host());
        let work = tempfile::tempdir()?;
        let layer = work.path().join("layer.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&layer)?);
        let program = std::fs::read(testbin("testimage")?)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(program.len() as u64);
        header.set_mode(0o755);
        header.set_mtime(0);
        tar.append_data(&mut header, "testimage", program.as_slice())?;
        tar.into_inner()?;

        let auth = docker_config_json(&self.host(), user, pass);
        let layer = layer.to_str().context("non-UTF-8 temp path")?;
        self.crane(work.path(), &auth, &["append", "-f", layer, "-t", &image])
            .with_context(|| format!("pushing {image}"))?;
        let entrypoint = std::iter::once("/testimage").chain(args.iter().copied()).collect::<Vec<_>>().join(",");
        self.crane(
            work.path(),
            &auth,
            &["mutate", &image, "--entrypoint", &entrypoint, "--set-platform", "linux/amd64", "-t", &image],
        )
        .with_context(|| format!("setting the entrypoint of {image}"))?;
        Ok(image)
    }

    /// The controller's image as the Dockerfile's runtime stage makes it, from local parts:
    /// one layer with the static `binary` (scripts/build-static.sh) at
    /// `/usr/local/bin/regcred`, the machine's CA bundle at
    /// `/etc/ssl/certs/ca-certificates.crt`, `/etc/passwd` and `/etc/group` naming `nonroot`
    /// (65532) as distroless does, and `/tmp`; user 65532:65532, entrypoint
    /// `/usr/local/bin/regcred`, command `run`, port 8080. Pushed as `HOST/repo:tag` with the
    /// given credentials; returns that reference.
    pub fn push_controller_image(
        &self,
        binary: &Path,
        repo: &str,
        tag: &str,
        user: &str,
        pass: &str,
    ) -> Result<String> {
        let image = format!("{}/{repo}:{tag}", self.host());
        let work = tempfile::tempdir()?;
        let layer = work.path().join("layer.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&layer)?);
        let mut dir = |path: &str, mode: u32| -> Result<()> {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            header.set_mode(mode);
            header.set_mtime(0);
            tar.append_data(&mut header, path, std::io::empty())?;
            Ok(())
        };
        for (path, mode) in [("etc/", 0o755), ("etc/ssl/", 0o755), ("etc/ssl/certs/", 0o755), ("tmp/", 0o1777)] {
            dir(path, mode)?;
        }
        for (path, mode) in [("home/", 0o755), ("home/nonroot/", 0o700), ("usr/", 0o755), ("usr/local/", 0o755)] {
            dir(path, mode)?;
        }
        dir("usr/local/bin/", 0o755)?;
        let ca_bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").context("the machine's CA bundle")?;
        let files: [(&str, Vec<u8>, u32); 4] = [
            (
                "etc/passwd",
                b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
                    .to_vec(),
                0o644,
            ),
            ("etc/group", b"root:x:0:\nnonroot:x:65532:\n".to_vec(), 0o644),
            ("etc/ssl/certs/ca-certificates.crt", ca_bundle, 0o644),
            (
                "usr/local/bin/regcred",
                std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?,
                0o755,
            ),
        ];
        for (path, data, mode) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_mtime(0);
            tar.append_data(&mut header, path, data.as_slice())?;
        }
        tar.into_inner()?;

        let auth = docker_config_json(&self.host(), user, pass);
        let layer = layer.to_str().context("non-UTF-8 temp path")?;
        self.crane(work.path(), &auth, &["append", "-f", layer, "-t", &image])
            .with_context(|| format!("pushing {image}"))?;
        self.crane(
            work.path(),
            &auth,
            &[
                "mutate",
                &image,
                "--entrypoint=/usr/local/bin/regcred",
                "--cmd=run",
                "--user=65532:65532",
                "--exposed-ports=8080",
                "--set-platform=linux/amd64",
                "-t",
                &image,
            ],
        )
        .with_context(|| format!("configuring {image}"))?;
        Ok(image)
    }

    /// Pulls `image` with the given credentials into a tarball at `path` (`crane pull`'s
    /// default format, which `docker load` and `ctr images import` read).
    pub fn save_image(&self, image: &str, user: &str, pass: &str, path: &Path) -> Result<()> {
        let work = tempfile::tempdir()?;
        let path = path.to_str().context("non-UTF-8 path")?;
        self.crane(work.path(), &docker_config_json(&self.host(), user, pass), &["pull", image, path])
    }

    /// Pulls `image` (manifest, config and layers) with `dockerconfigjson`
    /// as the only credentials; Err with crane's stderr if that fails.
    pub fn pull_with_auth_file(&self, image: &str, dockerconfigjson: &[u8]) -> Result<()> {
        let work = tempfile::tempdir()?;
        let out = work.path().join("image.tar");
        let out = out.to_str().context("non-UTF-8 temp path")?;
        self.crane(work.path(), dockerconfigjson, &["pull", image, out])
    }

    /// The registry's log file: its access log and its warnings, across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.path("registry.log")
    }

    /// The log's length now: the offset from which [`Registry::requests_since`] reads what
    /// happens next.
    pub fn log_offset(&self) -> Result<u64> {
        Ok(std::fs::metadata(self.log_path())?.len())
    }

    /// The requests the registry logged after `offset`, in order. A line is written as its
    /// response ends, so a client may see a response a moment before its line: poll for
    /// the requests a test expects.
    pub fn requests_since(&self, offset: u64) -> Result<Vec<Request>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = std::fs::File::open(self.log_path())?;
        file.seek(SeekFrom::Start(offset))?;
        let mut log = String::new();
        file.read_to_string(&mut log)?;
        // A line still being written has no newline yet.
        let complete = log.rsplit_once('\n').map_or("", |(lines, _)| lines);
        Ok(complete.lines().filter_map(parse_access_log_line).collect())
    }

    fn scheme(&self) -> &'static str {
        if self.ca_pem.is_some() { "https" } else { "http" }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh CA and a serving certificate for `names`, plus the CA as the only trusted root
    /// for crane (`ca.crt`).
    fn write_tls_files(&mut self, names: &[&str]) -> Result<()> {
        let tls = ServingTls::new("regcred-testenv-registry-ca", names)?;
        std::fs::write(self.path("tls.crt"), &tls.cert_pem)?;
        std::fs::write(self.path("tls.key"), &tls.key_pem)?;
        std::fs::write(self.path("ca.crt"), &tls.ca_pem)?;
        self.ca_pem = Some(tls.ca_pem);
        Ok(())
    }

    /// Adds `ca_pem` to the CAs this registry's clients trust (crane's `ca.crt`,
    /// [`Registry::ca_pem`]).
    fn trust_also(&mut self, ca_pem: &str) -> Result<()> {
        let bundle = format!("{}{ca_pem}", self.ca_pem.as_deref().context("not a TLS registry")?);
        std::fs::write(self.path("ca.crt"), &bundle)?;
        self.ca_pem = Some(bundle);
        Ok(())
    }

    /// Starts the token server with a fresh P-256 signing key and the users' htpasswd;
    /// returns the public half of the key as a JWK, with the id libtrust computes for it
    /// (the `kid` its tokens carry).
    fn start_token_server(&mut self, tls: bool) -> Result<serde_json::Value> {
        let key = rcgen::KeyPair::generate()?;
        // libtrust reads EC keys as SEC1 PEM or as a JWK, not rcgen's PKCS#8: a JWK it is.
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let (x, y) = p256_public_coordinates(key.public_key_raw())?;
        let mut jwk = serde_json::json!({ "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y) });
        let mut private = jwk.clone();
        private["d"] = b64(p256_private_scalar(&key.serialize_der())?).into();
        // libtrust picks the format by the file name.
        std::fs::write(self.path("token-key.json"), private.to_string())?;

        let port = free_port();
        let mut cmd = Command::new(testbin("token-server")?);
        cmd.arg(format!("-addr=127.0.0.1:{port}"))
            .arg(format!("-issuer={TOKEN_ISSUER}"))
            .arg("-realm=regcred-testenv-token-server")
            .arg(format!("-passwd={}", self.path("htpasswd").display()))
            .arg(format!("-key={}", self.path("token-key.json").display()))
            // Logs the key id, and why a scope was not granted.
            .arg("-debug");
        if tls {
            cmd.arg(format!("-tlscert={}", self.path("tls.crt").display()))
                .arg(format!("-tlskey={}", self.path("tls.key").display()));
        }
        let log = self.path("token-server.log");
        let mut proc = Process::spawn("token-server", cmd, &log)?;
        wait_until("token server", READY_TIMEOUT, || proc.check_alive(), || http_get(port, "/token/").map(drop))?;
        self.token_server = Some(proc);
        self.token_port = Some(port);

        // It logs the id before it listens, so the line is there now.
        let text = std::fs::read_to_string(&log)?;
        let kid = text
            .split("Loaded private key with id ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| c == '"' || c.is_whitespace()).next())
            .filter(|kid| !kid.is_empty())
            .with_context(|| format!("no key id in {}", log.display()))?;
        jwk["kid"] = kid.into();
        Ok(jwk)
    }

    /// The token server as the realm: the registry trusts exactly its key, under the `kid`
    /// the tokens name it by (they carry no certificate chain).
    fn token_server_realm(&self, public_key: serde_json::Value) -> Result<TokenRealm> {
        let jwks = serde_json::json!({ "keys": [public_key] });
        std::fs::write(self.path("token-jwks.json"), jwks.to_string())?;
        Ok(TokenRealm {
            realm: self.token_server_url().context("no token server")?,
            service: TOKEN_SERVICE.into(),
            issuer: TOKEN_ISSUER.into(),
            jwks: self.path("token-jwks.json"),
            signing_algorithms: vec!["ES256".into()],
            // Its certificate is the registry's own.
            ca_pem: None,
        })
    }

    /// Runs crane with `config_json` as its whole docker config (so no ambient credentials
    /// leak in): over plain HTTP, or over TLS trusting only this registry's CA.
    fn crane(&self, work: &Path, config_json: &[u8], args: &[&str]) -> Result<()> {
        let config_dir = work.join("docker");
        std::fs::create_dir_all(&config_dir)?;
        std::fs::write(config_dir.join("config.json"), config_json)?;
        let mut cmd = Command::new(testbin("crane")?);
        cmd.env("DOCKER_CONFIG", &config_dir).env_remove("SSL_CERT_DIR");
        if self.ca_pem.is_some() {
            // Not --insecure: that would also skip certificate verification.
            cmd.env("SSL_CERT_FILE", self.path("ca.crt"));
        } else {
            cmd.arg("--insecure");
        }
        let out = cmd.args(args).output().context("running crane")?;
        if !out.status.success() {
            bail!("crane {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// A fresh CA and a serving certificate it signed, all PEM.
pub(crate) struct ServingTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ServingTls {
    /// A CA named `ca_name` and a server certificate for `names` (DNS names or IP literals).
    pub(crate) fn new(ca_name: &str, names: &[&str]) -> Result<ServingTls> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let mut serving = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        serving.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("server"));
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let serving = serving.signed_by(&key, &ca)?;
        Ok(ServingTls { ca_pem: ca.pem(), cert_pem: serving.pem(), key_pem: key.serialize_pem() })
    }
}

/// The `auth:` section for token auth from `realm`.
fn token_auth_config(realm: &TokenRealm) -> String {
    format!(
        "  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    jwks: {}\n    signingalgorithms: [{}]\n",
        realm.realm,
        realm.service,
        realm.issuer,
        realm.jwks.display(),
        realm.signing_algorithms.join(", "),
    )
}

/// A `.dockerconfigjson` payload with one `auths` entry for `host`.
pub fn docker_config_json(host: &str, user: &str, pass: &str) -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    serde_json::json!({ "auths": { host: { "auth": auth } } }).to_string().into_bytes()
}

/// A line of the Combined Log Format the registry's access log uses,
/// `HOST - USER [TIME] "METHOD TARGET PROTO" STATUS SIZE "REFERER" "AGENT"`; None for
/// other lines (the registry's own log messages).
fn parse_access_log_line(line: &str) -> Option<Request> {
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut request = request.split(' ');
    let (method, path, proto) = (request.next()?, request.next()?, request.next()?);
    if !proto.starts_with("HTTP/") {
        return None;
    }
    let status = rest.split(' ').next()?.parse().ok()?;
    Some(Request { method: method.into(), path: path.into(), status })
}

/// X and Y of an uncompressed P-256 point (`04 || X || Y`).
fn p256_public_coordinates(point: &[u8]) -> Result<(&[u8], &[u8])> {
    ensure!(point.len() == 65 && point[0] == 4, "not an uncompressed P-256 point");
    Ok(point[1..].split_at(32))
}

/// The private scalar of a P-256 key in PKCS#8 DER: a PrivateKeyInfo (RFC 5208) whose
/// privateKey is an ECPrivateKey (RFC 5915).
fn p256_private_scalar(pkcs8: &[u8]) -> Result<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OCTET_STRING: u8 = 0x04;
    // One DER element of the expected tag: its contents and what follows it.
    fn element(der: &[u8], tag: u8) -> Result<(&[u8], &[u8])> {
        let [t, len, rest @ ..] = der else { bail!("truncated DER") };
        ensure!(*t == tag, "DER tag {t:#04x} where {tag:#04x} was expected");
        let (len, rest) = match *len {
            short @ 0..=0x7f => (short as usize, rest),
            0x81 => (*rest.first().context("truncated DER")? as usize, &rest[1..]),
            other => bail!("unexpected DER length byte {other:#04x}"),
        };
        ensure!(rest.len() >= len, "truncated DER");
        Ok(rest.split_at(len))
    }
    let (info, _) = element(pkcs8, SEQUENCE)?;
    let (_version, info) = element(info, INTEGER)?;
    let (_algorithm, info) = element(info, SEQUENCE)?;
    let (private_key, _) = element(info, OCTET_STRING)?;
    let (ec, _) = element(private_key, SEQUENCE)?;
    let (_version, ec) = element(ec, INTEGER)?;
    let (scalar, _) = element(ec, OCTET_STRING)?;
    ensure!(scalar.len() == 32, "a P-256 private key has 32 bytes, not {}", scalar.len());
    Ok(scalar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines() {
        let line = r#"127.0.0.1 - - [29/Nov/2025:18:30:00 +0000] "GET /v2/team/app/manifests/v1?x=1 HTTP/1.1" 200 528 "" "crane/v0.22.1""#;
        assert_eq!(
            parse_access_log_line(line),
            Some(Request { method: "GET".into(), path: "/v2/team/app/manifests/v1?x=1".into(), status: 200 })
        );
        assert_eq!(parse_access_log_line(r#"time="2025-11-29T18:30:00Z" level=warning msg="x""#), None);
    }
}
