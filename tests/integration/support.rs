//! Shared by every integration test: one control plane and one controller per test binary,
//! a namespace per test, polling helpers, and the record of every secret value the tests
//! used so the leak check can look for them.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::{
        core::v1::{Namespace, Secret, ServiceAccount},
        events::v1::Event,
    },
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, PostParams},
};
use regcred::crd::{ClusterCredentialStatus, ClusterRegistryCredential, RegistryCredential};
use regcred_testenv::{AwsEmulator, ControlPlane, Process, eventually};
use serde_json::Value;

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Env {
    pub cp: &'static ControlPlane,
    /// The AWS emulator the shared controller talks to (12-hour tokens).
    pub aws: AwsEmulator,
    pub controller: TestController,
}

/// A controller process and the port of its admin endpoint.
pub struct TestController {
    pub admin_port: u16,
    process: Process,
}

impl TestController {
    /// SIGKILL, as a crash or an evicted node would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM, as a rolling update would.
    pub fn terminate(&mut self) {
        self.process.terminate();
    }

    /// SIGSTOP: frozen, as a paused VM or a stalled node would be, until [`Self::resume`].
    pub fn pause(&mut self) {
        self.process.pause();
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.process.resume();
    }

    /// Resident and peak resident memory (VmRSS, VmHWM) in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        self.process.rss_kib()
    }

    /// Err (with the end of its log) if the process has exited: crashed, or killed.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.process.check_alive()
    }

    /// The admin endpoint's `/metrics` text (empty if it does not answer).
    pub fn metrics(&self) -> String {
        admin_get(self.admin_port, "/metrics").1
    }

    /// Starts `cmd` (with `--admin-addr 127.0.0.1:0`) as controller `name`, logging to `log`,
    /// and waits until it logged the port its admin endpoint listens on. A controller started
    /// again under its name appends to the same log: only what this process wrote counts.
    pub fn spawn(name: &str, cmd: Command, log: &std::path::Path) -> TestController {
        let before = std::fs::metadata(log).map_or(0, |m| m.len());
        let process = Process::spawn(&format!("regcred-{name}"), cmd, log).expect("starting regcred");
        TestController::from_process(process, log, before)
    }

    /// A started controller process (with `--admin-addr 127.0.0.1:0`), once it logged the
    /// port its admin endpoint listens on, in `log` past byte `from`.
    fn from_process(process: Process, log: &std::path::Path, from: u64) -> TestController {
        let admin_port = regcred_testenv::wait_for("the admin endpoint's address in the log", TIMEOUT, || {
            let text = std::fs::read(log).ok()?;
            let text = String::from_utf8_lossy(text.get(usize::try_from(from).ok()?..)?);
            let line = text.lines().find(|l| l.contains("admin endpoint listening"))?;
            let after = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
            after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
        })
        .expect("the controller did not start its admin endpoint");
        TestController { admin_port, process }
    }
}

/// GET on a controller's admin endpoint: (status code, body); (0, "") if it does not answer.
pub fn admin_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

/// The value of the first sample whose name and labels start with `prefix`.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// Arguments of a test controller whose retries come far apart. Retries wait 1 s, 2 s, 4 s …
/// (up to `--max-backoff`, 20 s for the others): once a credential has failed five times
/// ([`wait_failures`]) its next retry is 16 s away, so a change it shows within
/// [`EVENT_WAIT`] was brought by a watch event, not by a retry (nor by the 10-minute resync).
pub const LONG_BACKOFF: &[&str] = &["--max-backoff", "10m"];
/// How long a test waits for a change a watch event must bring; well below the 16 s retry
/// that [`LONG_BACKOFF`] and [`wait_failures`] leave.
pub const EVENT_WAIT: Duration = Duration::from_secs(8);

/// Waits until `controller` (a test's own: its counters are the test's alone) has counted at
/// least `n` failed reconciles of `kind` with `reason`.
pub async fn wait_failures(controller: &TestController, kind: &str, reason: &str, n: f64) {
    let series = format!("regcred_reconcile_failures_total{{kind=\"{kind}\",reason=\"{reason}\"}} ");
    eventually(&format!("{n} failures {reason}"), Duration::from_secs(60), || async {
        sample(&controller.metrics(), &series).filter(|count| *count >= n).map(drop)
    })
    .await;
}

/// Label that routes a credential to a test's own controller instead of the shared one.
pub const CONTROLLER_LABEL: &str = "regcred.dev/test-controller";

/// The control plane with the CRDs installed and the shared controller running as its own
/// user (so the audit log tells its requests apart), for every credential without
/// [`CONTROLLER_LABEL`].
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let cp = ControlPlane::shared();
        cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds")).expect("installing crds/");
        let aws = AwsEmulator::start().expect("starting the AWS emulator");
        let process = spawn_controller(cp, "shared", &format!("!{CONTROLLER_LABEL}"), &aws.endpoint(), &[], &[]);
        Env { cp, aws, controller: process }
    })
}

/// The namespace of the packaged install (`deploy/regcred.yaml`); leader Leases live here.
pub const CONTROLLER_NAMESPACE: &str = "regcred-system";
/// The identity every controller under test runs as: the packaged ServiceAccount.
pub const CONTROLLER_USER: &str = "system:serviceaccount:regcred-system:regcred";

/// A kubeconfig with a token of the ServiceAccount from `deploy/regcred.yaml`, bound only to
/// the packaged RBAC (ClusterRole and leader-Lease Role), so every integration scenario is
/// also the proof that those rules suffice (no admin identity anywhere in the controller).
fn controller_kubeconfig(cp: &ControlPlane) -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/regcred.yaml");
        cp.install_controller_identity(&manifest, CONTROLLER_NAMESPACE, "regcred")
            .expect("installing the packaged RBAC and ServiceAccount")
    })
    .clone()
}

/// Starts a controller process for the credentials matching `selector`, logging to
/// `regcred-<name>.log` in the control plane's directory (the leak check reads them all).
/// The test registries listen on loopback, so RegistryCredentials' checks may reach private
/// addresses (`--verify-private-networks`); [`spawn_strict_controller`] holds them to the
/// default.
pub fn spawn_controller(
    cp: &ControlPlane,
    name: &str,
    selector: &str,
    aws_endpoint: &str,
    args: &[&str],
    envs: &[(&str, String)],
) -> TestController {
    let args: Vec<&str> = std::iter::once("--verify-private-networks").chain(args.iter().copied()).collect();
    spawn_strict_controller(cp, name, selector, aws_endpoint, &args, envs)
}

/// [`spawn_controller`] without `--verify-private-networks`: as installed by default.
pub fn spawn_strict_controller(
    cp: &ControlPlane,
    name: &str,
    selector: &str,
    aws_endpoint: &str,
    args: &[&str],
    envs: &[(&str, String)],
) -> TestController {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcred"));
    cmd.args(["run", "--resync-interval", "10m", "--max-backoff", "20s", "--selector", selector])
        // Port 0: the controller binds a free port and logs it (no race for a "free" port).
        .args(["--admin-addr", "127.0.0.1:0"])
        .args(["--aws-endpoint-url", aws_endpoint])
        // The ambient credential chain's own STS client reads the endpoint from the environment.
        .env("AWS_ENDPOINT_URL", aws_endpoint)
        .args(args)
        .env("KUBECONFIG", controller_kubeconfig(cp))
        // As verbose as a user debugging it would run it: the leak check reads this.
        .env("RUST_LOG", "debug,hyper=info,tower=info,rustls=info,aws_smithy_runtime=info,aws_config=info")
        // Nothing ambient unless a test gives it: no IMDS probing, no credentials of ours.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("HOME", cp.dir());
    for (key, value) in envs {
        cmd.env(key, value);
    }
    TestController::spawn(name, cmd, &controller_log_path(cp, name))
}

/// A client with the controllers' own identity (the packaged ServiceAccount's token).
pub async fn controller_client() -> Client {
    client_for(&controller_kubeconfig(env().cp), None).await
}

/// A client from `kubeconfig`, authenticating with `token` instead of its own when given.
pub async fn client_for(kubeconfig: &std::path::Path, token: Option<&str>) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading the kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("loading it");
    if let Some(token) = token {
        config.auth_info.token = Some(token.to_string().into());
    }
    Client::try_from(config).expect("building a client")
}

/// A controller `name` of the test's own for the credentials labelled for it, with the shared
/// control plane and AWS emulator and the packaged identity (see [`spawn_controller`]).
pub fn spawn_labelled(name: &str, args: &[&str], envs: &[(&str, String)]) -> TestController {
    let selector = format!("{CONTROLLER_LABEL}={name}");
    spawn_controller(env().cp, name, &selector, &env().aws.endpoint(), args, envs)
}

/// Where controllers log, and the prefix of this test process's log files: the run's
/// leak-scan directory when `REGCRED_LEAK_DIR` is set (scripts/test.sh scans it after the whole
/// run), else the control plane's directory.
fn log_dir_and_prefix(cp: &ControlPlane) -> (PathBuf, String) {
    match std::env::var_os("REGCRED_LEAK_DIR") {
        Some(dir) => (PathBuf::from(dir), format!("regcred-{}-", std::process::id())),
        None => (cp.dir().to_path_buf(), "regcred-".into()),
    }
}

/// The log file of the controller named `name`.
pub fn controller_log_path(cp: &ControlPlane, name: &str) -> PathBuf {
    let (dir, prefix) = log_dir_and_prefix(cp);
    dir.join(format!("{prefix}{name}.log"))
}

/// Every controller log of this test process, as (file name, text).
pub fn controller_logs() -> Vec<(String, String)> {
    let (dir, prefix) = log_dir_and_prefix(env().cp);
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name.starts_with(&prefix) && name.ends_with(".log"))
                .then(|| (name, std::fs::read_to_string(entry.path()).unwrap_or_default()))
        })
        .collect()
}

/// An admin client for this test's runtime.
pub async fn client() -> Client {
    env().cp.client().await
}

/// A fresh namespace named after the test.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{}", &unique()[..8]);
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("creating namespace");
    name
}

/// A value to use as a password or token. It is recorded, so the leak check looks for it
/// (and for the base64 `auth` form under `username`) in everything the controller emits.
pub fn secret_value(username: &str, tag: &str) -> String {
    let value = format!("{tag}-{}", unique());
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{value}"));
    remember(&[&value, &auth]);
    let mut used = used_secrets().lock().unwrap_or_else(|e| e.into_inner());
    used.push(value.clone());
    used.push(auth);
    value
}

/// Records a whole value (a key, a token) for the leak check.
pub fn record_secret(value: &str) {
    remember(&[value]);
    used_secrets().lock().unwrap_or_else(|e| e.into_inner()).push(value.to_string());
}

/// Also writes the values to the run's leak-scan directory (see [`controller_log_path`]).
fn remember(values: &[&str]) {
    if let Some(dir) = std::env::var_os("REGCRED_LEAK_DIR") {
        use std::io::Write;
        let path = PathBuf::from(dir).join(format!("used-secrets-{}.txt", std::process::id()));
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            for value in values {
                let _ = writeln!(file, "{value}");
            }
        }
    }
}

pub fn used_secrets() -> &'static Mutex<Vec<String>> {
    static USED: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    USED.get_or_init(Mutex::default)
}

pub fn unique() -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes)).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates an Opaque Secret with the given data.
pub async fn create_secret(client: &Client, ns: &str, name: &str, data: &[(&str, &[u8])]) {
    let secret = Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating Secret");
}

/// Sets one key of an existing Secret (a merge patch, as `kubectl patch` would).
pub async fn set_secret_key(client: &Client, ns: &str, name: &str, key: &str, value: &[u8]) {
    let patch = serde_json::json!({"data": {key: base64::engine::general_purpose::STANDARD.encode(value)}});
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
        .await
        .expect("patching Secret");
}

/// Creates a RegistryCredential from a JSON spec, for the shared controller.
pub async fn create_credential(client: &Client, ns: &str, name: &str, spec: Value) -> RegistryCredential {
    create_credential_for(client, ns, name, None, spec).await
}

/// Creates a RegistryCredential from a JSON spec, for the controller named `controller`
/// (see [`spawn_controller`]) or the shared one.
pub async fn create_credential_for(
    client: &Client,
    ns: &str,
    name: &str,
    controller: Option<&str>,
    spec: Value,
) -> RegistryCredential {
    let mut labels = serde_json::Map::new();
    if let Some(controller) = controller {
        labels.insert(CONTROLLER_LABEL.into(), controller.into());
    }
    let cr: RegistryCredential = serde_json::from_value(serde_json::json!({
        "apiVersion": "regcred.dev/v1alpha1",
        "kind": "RegistryCredential",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": spec,
    }))
    .expect("valid RegistryCredential");
    Api::<RegistryCredential>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cr)
        .await
        .expect("creating RegistryCredential")
}

/// Creates a ClusterRegistryCredential from a JSON spec, for the shared controller.
pub async fn create_cluster_credential(client: &Client, name: &str, spec: Value) -> ClusterRegistryCredential {
    create_cluster_credential_for(client, name, None, spec).await
}

/// Creates a ClusterRegistryCredential for the controller named `controller` (see
/// [`spawn_controller`]) or the shared one.
pub async fn create_cluster_credential_for(
    client: &Client,
    name: &str,
    controller: Option<&str>,
    spec: Value,
) -> ClusterRegistryCredential {
    let labels: BTreeMap<&str, &str> = controller.map(|c| (CONTROLLER_LABEL, c)).into_iter().collect();
    let crc: ClusterRegistryCredential = serde_json::from_value(serde_json::json!({
        "apiVersion": "regcred.dev/v1alpha1",
        "kind": "ClusterRegistryCredential",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))
    .expect("valid ClusterRegistryCredential");
    Api::<ClusterRegistryCredential>::all(client.clone())
        .create(&PostParams::default(), &crc)
        .await
        .expect("creating ClusterRegistryCredential")
}

/// Waits until the cluster credential's status for its current generation satisfies `check`.
pub async fn wait_cluster<F>(client: &Client, name: &str, what: &str, check: F) -> ClusterRegistryCredential
where
    F: Fn(&ClusterCredentialStatus) -> bool,
{
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    eventually(&format!("ClusterRegistryCredential {name}: {what}"), TIMEOUT, || async {
        let crc = api.get(name).await.ok()?;
        let status = crc.status.as_ref()?;
        (status.credential.observed_generation == crc.metadata.generation && check(status)).then_some(crc)
    })
    .await
}

/// A fresh namespace with labels.
pub async fn labelled_namespace(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    let name = format!("{prefix}-{}", &unique()[..8]);
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let ns = Namespace {
        metadata: ObjectMeta { name: Some(name.clone()), labels: Some(labels), ..Default::default() },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("creating namespace");
    name
}

/// Waits until the credential's Ready condition has `status` (and `reason`, if given) for
/// its current generation; returns the credential.
pub async fn wait_ready(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: Option<&str>,
) -> RegistryCredential {
    wait_ready_within(TIMEOUT, client, ns, name, status, reason).await
}

/// [`wait_ready`], waiting at most `limit`.
pub async fn wait_ready_within(
    limit: Duration,
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: Option<&str>,
) -> RegistryCredential {
    let api = Api::<RegistryCredential>::namespaced(client.clone(), ns);
    eventually(&format!("{ns}/{name} Ready={status} {reason:?}"), limit, || async {
        let cr = api.get(name).await.ok()?;
        let st = cr.status.as_ref()?;
        let ready = st.condition("Ready")?;
        let current =
            st.observed_generation == cr.metadata.generation && ready.observed_generation == cr.metadata.generation;
        (current && ready.status == status && reason.is_none_or(|r| ready.reason == r)).then_some(cr)
    })
    .await
}

/// Waits until `check` accepts the Secret (None while it is missing).
pub async fn wait_secret<F>(client: &Client, ns: &str, name: &str, what: &str, check: F) -> Secret
where
    F: Fn(&Secret) -> bool,
{
    wait_secret_within(TIMEOUT, client, ns, name, what, check).await
}

/// [`wait_secret`], waiting at most `limit`.
pub async fn wait_secret_within<F>(
    limit: Duration,
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: F,
) -> Secret
where
    F: Fn(&Secret) -> bool,
{
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    eventually(&format!("Secret {ns}/{name}: {what}"), limit, || async {
        api.get_opt(name).await.ok().flatten().filter(|s| check(s))
    })
    .await
}

/// The logins in a Secret's `.dockerconfigjson`, as (server, username, password).
pub fn logins(secret: &Secret) -> Vec<(String, String, String)> {
    use secrecy::ExposeSecret;
    let bytes = &secret.data.as_ref().expect("data")[".dockerconfigjson"].0;
    regcred::dockerconfig::parse(bytes)
        .expect("valid docker config")
        .into_iter()
        .map(|a| (a.server, a.username, a.password.expose_secret().to_string()))
        .collect()
}

/// Events about one object, as (type, reason, note).
pub async fn events_for(client: &Client, ns: &str, kind: &str, name: &str) -> Vec<(String, String, String)> {
    let events =
        Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await.expect("listing Events");
    events
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Waits for an Event with this type and reason about the object.
pub async fn wait_event(client: &Client, ns: &str, kind: &str, name: &str, type_: &str, reason: &str) -> String {
    eventually(&format!("{type_} Event {reason} for {kind} {ns}/{name}"), TIMEOUT, || async {
        events_for(client, ns, kind, name).await.into_iter().find(|(t, r, _)| t == type_ && r == reason).map(|e| e.2)
    })
    .await
}

/// Fails if any recorded secret value appears in any controller's log, in any Event, or in
/// any credential's status, or the shared controller's metrics.
pub async fn assert_no_leaks(client: &Client) {
    let mut haystacks = controller_logs();
    assert!(!haystacks.is_empty(), "no controller log to check");
    let events = Api::<Event>::all(client.clone()).list(&ListParams::default()).await.expect("listing Events");
    haystacks.push(("Events".into(), serde_json::to_string(&events.items).unwrap()));
    let creds = Api::<RegistryCredential>::all(client.clone()).list(&ListParams::default()).await.expect("listing");
    let statuses: Vec<_> = creds.items.iter().map(|c| &c.status).collect();
    haystacks.push(("statuses".into(), serde_json::to_string(&statuses).unwrap()));
    let cluster = Api::<ClusterRegistryCredential>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    let statuses: Vec<_> = cluster.items.iter().map(|c| &c.status).collect();
    haystacks.push(("cluster statuses".into(), serde_json::to_string(&statuses).unwrap()));
    haystacks.push(("metrics".into(), env().controller.metrics()));
    let used = used_secrets().lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!used.is_empty(), "the leak check has nothing to look for");
    for (place, text) in &haystacks {
        for value in &used {
            assert!(!text.contains(value.as_str()), "a secret value appears in the {place}");
        }
    }
}

/// Where the audit log is now; requests after this point are read with [`controller_requests_since`].
pub fn audit_offset() -> u64 {
    env().cp.audit_log_len().expect("audit log")
}

/// The controller's requests in the audit log after `offset`, as (verb, resource, namespace, name).
pub fn controller_requests_since(offset: u64) -> Vec<(String, String, String, String)> {
    requests_of_since(CONTROLLER_USER, offset)
}

/// A ServiceAccount `name` of its own in the controller's namespace, bound to the packaged
/// ClusterRole (with `secret_verbs` on Secrets instead, when given) and the leader-election
/// Role, for a controller whose requests the audit log must tell apart (or that must run with
/// less). Returns its kubeconfig and its user name.
pub fn own_identity(name: &str, secret_verbs: Option<&[&str]>) -> (PathBuf, String) {
    let cp = env().cp;
    let deploy = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/regcred.yaml"))
        .expect("deploy/regcred.yaml");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&deploy).expect("deploy/regcred.yaml is YAML");
    let mut role = docs
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "regcred")
        .expect("the packaged ClusterRole");
    role["metadata"] = serde_json::json!({"name": name});
    for rule in role["rules"].as_array_mut().expect("rules") {
        let on_secrets = rule["resources"].as_array().is_some_and(|r| r.iter().any(|r| r == "secrets"));
        if let (true, Some(verbs)) = (on_secrets, secret_verbs) {
            rule["verbs"] = serde_json::json!(verbs);
        }
    }
    let manifest = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        role,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": CONTROLLER_NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": CONTROLLER_NAMESPACE}]},
        // The packaged leader-election Role, for replicas that compete for a Lease.
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": name, "namespace": CONTROLLER_NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "regcred-leader"},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": CONTROLLER_NAMESPACE}]},
    ]});
    let path = cp.dir().join(format!("{name}.json"));
    std::fs::write(&path, manifest.to_string()).expect("writing the manifest");
    let kubeconfig = cp.install_controller_identity(&path, CONTROLLER_NAMESPACE, name).expect("installing it");
    (kubeconfig, format!("system:serviceaccount:{CONTROLLER_NAMESPACE}:{name}"))
}

/// A controller `name` for the credentials labelled for it, under an identity of its own (see
/// [`own_identity`]), with `args` after the usual ones. Returns it and its user name.
pub fn spawn_own_controller(name: &str, secret_verbs: Option<&[&str]>, args: &[&str]) -> (TestController, String) {
    let (kubeconfig, user) = own_identity(name, secret_verbs);
    (spawn_labelled(name, args, &[("KUBECONFIG", kubeconfig.display().to_string())]), user)
}

/// The requests of `user` in the audit log after `offset`, as (verb, resource, namespace, name).
pub fn requests_of_since(user: &str, offset: u64) -> Vec<(String, String, String, String)> {
    let text = env().cp.read_audit_log(offset, None).expect("audit log");
    let field = |v: &Value, path: &[&str]| {
        path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_str).unwrap_or_default().to_string()
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| field(e, &["user", "username"]) == user)
        .map(|e| {
            (
                field(&e, &["verb"]),
                field(&e, &["objectRef", "resource"]),
                field(&e, &["objectRef", "namespace"]),
                field(&e, &["objectRef", "name"]),
            )
        })
        .collect()
}

/// The status patches (`<resource>/status`) `user` sent after `offset`, as (resource,
/// namespace, name).
pub fn status_patches_of_since(user: &str, offset: u64) -> Vec<(String, String, String)> {
    let text = env().cp.read_audit_log(offset, None).expect("audit log");
    let field = |v: &Value, path: &[&str]| {
        path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_str).unwrap_or_default().to_string()
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| field(e, &["user", "username"]) == user && is_write(&field(e, &["verb"])))
        .filter(|e| field(e, &["objectRef", "subresource"]) == "status")
        .map(|e| {
            (
                field(&e, &["objectRef", "resource"]),
                field(&e, &["objectRef", "namespace"]),
                field(&e, &["objectRef", "name"]),
            )
        })
        .collect()
}

/// A Secret of AWS access keys (`accessKeyId`, `secretAccessKey`) with a key id unique to the
/// caller, so emulator calls can be attributed to it, registered with `aws` as the key of IAM
/// user [`aws_user`] (the key id); returns the key id.
pub async fn create_aws_keys(client: &Client, aws: &AwsEmulator, ns: &str, name: &str, tag: &str) -> String {
    let key_id = format!("AKIA{}", &unique()[..16].to_uppercase());
    let secret_key = secret_value("aws", tag);
    aws.add_access_key(&key_id, &key_id, &secret_key).expect("registering the access key");
    create_secret(client, ns, name, &[("accessKeyId", key_id.as_bytes()), ("secretAccessKey", secret_key.as_bytes())])
        .await;
    key_id
}

/// The ARN of the IAM user whose key [`create_aws_keys`] made.
pub fn aws_user(key_id: &str) -> String {
    format!("arn:aws:iam::{}:user/{key_id}", regcred_testenv::AWS_ACCOUNT)
}

/// Registers the test apiserver's ServiceAccount issuer with `aws` as an IAM OIDC provider
/// (its JWKS inline), so STS verifies the ServiceAccount tokens it signs.
pub fn trust_cluster_issuer(aws: &AwsEmulator) {
    let jwks = env().cp.service_account_jwks().expect("the apiserver's JWKS");
    aws.add_oidc_provider(regcred_testenv::ISSUER, &jwks).expect("registering the OIDC provider");
}

pub fn is_write(verb: &str) -> bool {
    matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
}

/// A client of the test apiserver that authenticates with `token` (and nothing else).
pub async fn client_with_token(token: &str) -> Client {
    client_for(&controller_kubeconfig(env().cp), Some(token)).await
}

/// A TokenRequest for `ns/account` with these audiences and lifetime, as `client`; the token.
pub async fn request_token(
    client: &Client,
    ns: &str,
    account: &str,
    audiences: &[&str],
    seconds: i64,
) -> Result<String, kube::Error> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let request = regcred_testenv::token_request(audiences, seconds);
    let response = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(account, &PostParams::default(), &request)
        .await?;
    Ok(response.status.map(|s| s.token).unwrap_or_default())
}

/// `helm template` of the chart as release `name` (its fullname too) in the controller's
/// namespace, with `--set values`.
pub fn chart_rendering(name: &str, values: &str) -> String {
    let helm = regcred_testenv::testbin("helm").expect("helm");
    let set = format!("fullnameOverride={name},{values}");
    let out = Command::new(helm)
        .args(["template", name, "charts/regcred", "--namespace", CONTROLLER_NAMESPACE, "--set", &set])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The chart rendered as release `name` in the controller's namespace with `--set values`,
/// installed (its ServiceAccount, RBAC and ValidatingAdmissionPolicy; the Deployment stays
/// inert without kubelets), for a controller that runs with exactly what the chart grants
/// in that configuration. Returns its kubeconfig and its user name.
pub fn chart_identity(name: &str, values: &str) -> (PathBuf, String) {
    let cp = env().cp;
    let path = cp.dir().join(format!("{name}-chart.yaml"));
    std::fs::write(&path, chart_rendering(name, values)).expect("writing the rendering");
    let kubeconfig = cp.install_controller_identity(&path, CONTROLLER_NAMESPACE, name).expect("installing it");
    (kubeconfig, format!("system:serviceaccount:{CONTROLLER_NAMESPACE}:{name}"))
}

/// A ServiceAccount `name` in `ns` with the IRSA role annotation, naming a role of its own
/// (`<ns>.<name>`) that `aws` has, trusting this ServiceAccount's tokens (as IRSA's trust
/// policies do, with a condition on `sub`); returns the role's ARN.
pub async fn irsa_account(client: &Client, aws: &AwsEmulator, ns: &str, name: &str) -> String {
    let role = format!("arn:aws:iam::{}:role/{ns}.{name}", regcred_testenv::AWS_ACCOUNT);
    trust_cluster_issuer(aws);
    let trust = regcred_testenv::RoleTrust::service_account(regcred_testenv::ISSUER, ns, name);
    aws.add_role(&role, &trust).expect("registering the role");
    annotated_account(client, ns, name, &role).await;
    role
}

/// A ServiceAccount `name` in `ns` annotated with IRSA role `role` (whatever that role trusts).
pub async fn annotated_account(client: &Client, ns: &str, name: &str, role: &str) {
    let sa = k8s_openapi::api::core::v1::ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some([("eks.amazonaws.com/role-arn".to_string(), role.to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("creating the ServiceAccount");
}

/// Creates a credential of `kind` from raw JSON, past the typed client (so admission judges
/// shapes the Rust types cannot even hold); `ns` for a RegistryCredential.
pub async fn create_raw(
    client: &Client,
    ns: Option<&str>,
    kind: &str,
    name: &str,
    spec: Value,
) -> Result<(), kube::Error> {
    let resource = match kind {
        "RegistryCredential" => kube::api::ApiResource::erase::<RegistryCredential>(&()),
        _ => kube::api::ApiResource::erase::<ClusterRegistryCredential>(&()),
    };
    let api = match ns {
        Some(ns) => Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), ns, &resource),
        None => Api::<kube::api::DynamicObject>::all_with(client.clone(), &resource),
    };
    let obj: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec,
    }))
    .expect("a DynamicObject");
    api.create(&PostParams::default(), &obj).await.map(drop)
}

/// A namespace editor of `ns` (the built-in `edit` ClusterRole, which the chart's aggregated
/// role extends to RegistryCredentials): a ServiceAccount there, and a client with its token.
pub async fn tenant(admin: &Client, ns: &str) -> Client {
    let account = ServiceAccount {
        metadata: ObjectMeta { name: Some("tenant".into()), ..Default::default() },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), ns).create(&PostParams::default(), &account).await.unwrap();
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "tenant-edit", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}],
    }))
    .unwrap();
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let token = request_token(admin, ns, "tenant", &[], 3600).await.expect("a token for the tenant");
    record_secret(&token);
    client_with_token(&token).await
}
