use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;

use crate::process::{Process, temp_dir};
use crate::{free_port, http_get, random_hex, testbin, wait_until};

/// A CNCF distribution registry on `127.0.0.1:PORT`, plain HTTP (its htpasswd
/// auth does not insist on TLS), with bcrypt htpasswd users. Drop stops it.
pub struct Registry {
    // Held for its Drop, which stops the registry.
    _proc: Process,
    port: u16,
    // Dropped after `_proc`: the registry stops before its storage goes.
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(users: &[(&str, &str)]) -> Result<Registry> {
        let dir = temp_dir("registry")?;
        let port = free_port();
        let mut htpasswd = String::new();
        for (user, pass) in users {
            // Lowest cost: these are test passwords, and each auth check pays it.
            htpasswd += &format!("{user}:{}\n", bcrypt::hash(pass, 4)?);
        }
        std::fs::write(dir.path().join("htpasswd"), htpasswd)?;
        let config = format!(
            "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
auth:
  htpasswd:
    realm: regcred-testenv
    path: {htpasswd}
",
            root = dir.path().join("data").display(),
            secret = random_hex(),
            htpasswd = dir.path().join("htpasswd").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;

        let mut cmd = Command::new(testbin("registry")?);
        cmd.arg("serve")
            .arg(&config_path)
            // distribution v3 exports OpenTelemetry traces by default.
            .env("OTEL_TRACES_EXPORTER", "none");
        let mut proc = Process::spawn("registry", cmd, &dir.path().join("registry.log"))?;
        // Any HTTP answer (401 without credentials) means it serves.
        wait_until("registry", Duration::from_secs(30), || proc.check_alive(), || http_get(port, "/v2/").map(drop))?;
        Ok(Registry { _proc: proc, port, dir })
    }

    /// `127.0.0.1:PORT`, the key of this registry in a `.dockerconfigjson`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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
        crane(work.path(), &auth, &["append", "-f", layer, "-t", &image])
            .with_context(|| format!("pushing {image}"))?;
        Ok(image)
    }

    /// Pulls `image` (manifest, config and layers) with `dockerconfigjson`
    /// as the only credentials; Err with crane's stderr if that fails.
    pub fn pull_with_auth_file(&self, image: &str, dockerconfigjson: &[u8]) -> Result<()> {
        let work = tempfile::tempdir()?;
        let out = work.path().join("image.tar");
        let out = out.to_str().context("non-UTF-8 temp path")?;
        crane(work.path(), dockerconfigjson, &["pull", image, out])
    }

    /// The registry's log file.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("registry.log")
    }
}

/// A `.dockerconfigjson` payload with one `auths` entry for `host`.
pub fn docker_config_json(host: &str, user: &str, pass: &str) -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    serde_json::json!({ "auths": { host: { "auth": auth } } }).to_string().into_bytes()
}

/// Runs crane with `config_json` as its whole docker config (so no ambient
/// credentials leak in), over plain HTTP.
fn crane(work: &Path, config_json: &[u8], args: &[&str]) -> Result<()> {
    let config_dir = work.join("docker");
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("config.json"), config_json)?;
    let out = Command::new(testbin("crane")?)
        .arg("--insecure")
        .args(args)
        .env("DOCKER_CONFIG", &config_dir)
        .output()
        .context("running crane")?;
    if !out.status.success() {
        bail!("crane {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
