//! A real, local test environment for regcred: etcd + kube-apiserver +
//! kube-controller-manager ([`ControlPlane`]) and a CNCF distribution registry
//! ([`Registry`]: htpasswd users, basic or token auth, HTTP or HTTPS; or an ECR registry whose
//! logins the AWS emulator decides), and a node ([`Node`]:
//! containerd and a kubelet) that runs Pods. The binaries come from
//! `tests/testbin/build.sh` (see [`testbin_dir`]). Linux only.

mod aws;
mod azure;
mod control_plane;
mod gcp;
mod node;
mod process;
mod prometheus;
mod proxy;
mod registry;

use std::future::Future;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use aws::{ACCOUNT as AWS_ACCOUNT, AwsEmulator, RoleTrust, STS_AUDIENCE};
pub use azure::{ACR_USER, AzureEmulator};
pub use control_plane::{ControlPlane, ISSUER, token_request};
pub use gcp::{AttributeCondition, GcpEmulator, ServiceAccountKey, WorkloadIdentityProvider};
pub use node::{HostMapping, NODE_NAME, NODE_TAINT, Node, PAUSE_IMAGE, POD_GATEWAY};

/// The user the controller under test authenticates as (see
/// [`ControlPlane::controller_kubeconfig_path`]).
pub const CONTROLLER_USER: &str = "regcred-controller";
pub use process::Process;
pub use prometheus::Prometheus;
pub use proxy::{ConnectProxy, TcpProxy};
pub use registry::{Registry, RegistryOptions, Request, TokenRealm, docker_config_json};

/// Directory holding the test binaries: `$REGCRED_TESTBIN` if set, else the
/// last stdout line of `tests/testbin/build.sh` (which builds them once and
/// caches them). Computed once per process.
pub fn testbin_dir() -> Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_testbin().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn find_testbin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("REGCRED_TESTBIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testbin/build.sh");
    // stderr is inherited so that a long cold build shows its progress.
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed: {}", script.display(), out.status);
    }
    let stdout = String::from_utf8(out.stdout)?;
    let dir = stdout.lines().last().context("build.sh printed nothing")?;
    Ok(PathBuf::from(dir.trim()))
}

/// Path of one binary in [`testbin_dir`].
pub fn testbin(name: &str) -> Result<PathBuf> {
    let path = testbin_dir()?.join(name);
    anyhow::ensure!(path.is_file(), "{} is missing", path.display());
    Ok(path)
}

/// The Python that runs the emulators (`tests/aws/emulator.py`, `tests/gcp/emulator.py`):
/// `$REGCRED_PYTHON` if set (`scripts/test.sh` sets it from `scripts/setup.sh`), else the
/// virtual environment `scripts/setup.sh` made for this tree and the `python3` on PATH
/// (`scripts/python-venv.sh --find`), else that `python3` itself. Computed once per process.
pub(crate) fn python() -> &'static Python {
    static PYTHON: OnceLock<Python> = OnceLock::new();
    PYTHON.get_or_init(find_python)
}

/// See [`python`].
pub(crate) struct Python {
    pub(crate) path: PathBuf,
    /// Where [`Self::path`] came from, for error messages.
    pub(crate) source: &'static str,
}

impl Python {
    /// The context of an emulator that did not start: which Python ran it, and what to do
    /// when its imports failed (the emulator's log, in the error, says so).
    pub(crate) fn hint(&self, requirements: &str) -> String {
        format!(
            "the emulator ran with {} ({}); if its imports failed, run scripts/setup.sh (it makes a \
             virtual environment with {requirements}) or set REGCRED_PYTHON to a python that has them",
            self.path.display(),
            self.source,
        )
    }
}

fn find_python() -> Python {
    if let Some(path) = std::env::var_os("REGCRED_PYTHON").filter(|p| !p.is_empty()) {
        return Python { path: path.into(), source: "$REGCRED_PYTHON" };
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/python-venv.sh");
    let found = Command::new("bash").arg(&script).arg("--find").stderr(std::process::Stdio::null()).output();
    if let Ok(out) = found
        && out.status.success()
        && let Some(line) = String::from_utf8_lossy(&out.stdout).lines().last()
    {
        return Python { path: line.trim().into(), source: "the virtual environment of scripts/setup.sh" };
    }
    Python {
        path: "python3".into(),
        source: "python3 from PATH: REGCRED_PYTHON is unset and scripts/setup.sh has made no virtual environment for it",
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("binding 127.0.0.1:0").port()
}

/// Runs a future to completion on a private runtime in a scoped thread, so
/// the blocking API works both from plain and from `#[tokio::test]` code
/// (where a nested `block_on` would panic).
pub(crate) fn block_on<F>(f: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("building a tokio runtime")
                .block_on(f)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Calls `attempt` until it succeeds or `timeout` passes. An error from
/// `fatal` (e.g. "the process died") ends the wait at once.
pub(crate) fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut fatal: impl FnMut() -> Result<()>,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        fatal().with_context(|| format!("while waiting for {what}"))?;
        let err = match attempt() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err.context(format!("timed out after {timeout:?} waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` (every 100 ms) until it yields `Some`; Err naming `what` after
/// `timeout`. The blocking twin of [`eventually`].
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A minimal HTTP/1.0 GET over plain TCP, for health checks of local
/// processes: returns the status code and the body.
pub(crate) fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_get_with_headers(port, path, "")
}

/// [`http_get`] with basic auth, e.g. to see a plain HTTP [`Registry`] or its token server
/// accept or refuse a password: the status code and the body.
pub fn http_get_basic_auth(port: u16, path: &str, user: &str, pass: &str) -> Result<(u16, String)> {
    use base64::Engine;
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    http_get_with_headers(port, path, &format!("Authorization: Basic {credentials}\r\n"))
}

fn http_get_with_headers(port: u16, path: &str, headers: &str) -> Result<(u16, String)> {
    http_request(port, "GET", path, headers, b"")
}

/// A minimal HTTP/1.0 request to `127.0.0.1:port` over plain TCP; `headers` are whole lines,
/// each ending in `\r\n`. Returns the status code and the body.
pub fn http_request(port: u16, method: &str, path: &str, headers: &str, body: &[u8]) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{headers}")?;
    if !body.is_empty() || method != "GET" {
        write!(s, "Content-Length: {}\r\n", body.len())?;
    }
    s.write_all(b"\r\n")?;
    s.write_all(body)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed HTTP response")?;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_string()))
}

/// 16 random bytes as hex, for tokens and secrets.
pub(crate) fn random_hex() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `f` (every 100 ms) until it yields `Some`; panics naming `what`
/// after `timeout`. For tests that wait on controllers.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
