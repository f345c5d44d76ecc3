//! What the benches share: the controller under test, the plain-client baseline and
//! regcred's fan-out timed by the same poll, waits for a quiet control plane, and counts from
//! the audit log and apiserver_request_total. Each bench uses a part of it.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use regcred::crd::ClusterRegistryCredential;
use regcred_testenv::{CONTROLLER_USER, ControlPlane, Process};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

pub const CREDENTIAL: &str = "fan";
pub const REGISTRY: &str = "registry.example.com";
pub const USERNAME: &str = "u";
pub const SOURCE_NAMESPACE: &str = "bench-source";
pub const SOURCE_SECRET: &str = "src";
pub const PULL: &str = "regcred-pull";
/// Selects every Secret regcred wrote (and nothing the baseline wrote).
pub const MANAGED_BY_REGCRED: &str = "app.kubernetes.io/managed-by=regcred";
/// Label on the baseline's Secrets; its value names the run.
pub const DIRECT_LABEL: &str = "regcred-bench/direct";
pub const PASSWORD: &str = "bench-password-1";

pub const POLL: Duration = Duration::from_millis(100);
/// Longest any one phase may take before the bench gives up.
pub const PHASE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Write verbs as apiserver_request_total names them: server-side apply is `APPLY`, not `PATCH`.
pub const WRITE_VERBS: [&str; 6] = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];

/// The bench's `--flag value` pairs, in order (`cargo bench` passes `--bench` to every bench
/// binary: skipped).
pub fn flag_pairs() -> anyhow::Result<Vec<(String, String)>> {
    let (mut pairs, mut argv) = (Vec::new(), std::env::args().skip(1));
    while let Some(flag) = argv.next() {
        if flag == "--bench" {
            continue;
        }
        let value = argv.next().with_context(|| format!("{flag} needs a value"))?;
        pairs.push((flag, value));
    }
    Ok(pairs)
}

/// A flag's value as a number.
pub fn parse_flag<T: std::str::FromStr>(flag: &str, value: &str) -> anyhow::Result<T> {
    value.parse().map_err(|_| anyhow::anyhow!("{flag} {value}: not a number"))
}

/// The controller under test and its admin endpoint.
pub struct Controller {
    pub process: Process,
    pub admin_port: u16,
}

impl Controller {
    /// Spawns `regcred run` (the binary cargo built with the bench, so a release build under
    /// `cargo bench`) as the controller's own user, with `flags` after `run`, `env` added to its
    /// environment and its output in `<control plane dir>/<log>`.
    pub fn start(cp: &ControlPlane, log: &str, flags: &[String], env: &[(&str, &str)]) -> anyhow::Result<Controller> {
        let admin_port = regcred_testenv::free_port();
        // REGCRED_BENCH_CONTROLLER runs another build (an older release, for a before/after).
        let binary =
            std::env::var_os("REGCRED_BENCH_CONTROLLER").unwrap_or_else(|| env!("CARGO_BIN_EXE_regcred").into());
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .args(flags)
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .env("KUBECONFIG", cp.controller_kubeconfig_path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied());
        let process = Process::spawn("regcred", cmd, &cp.dir().join(log))?;
        Ok(Controller { process, admin_port })
    }

    /// Polls /readyz until 200 (the credential caches have synced); returns how long it took.
    pub async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            self.process.check_alive()?;
            if matches!(self.admin_get("/readyz"), Ok((200, _))) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < Duration::from_secs(60), "controller not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `regcred_reconciles_total` of ClusterRegistryCredentials (counted as each one ends).
    pub fn reconciles(&self) -> anyhow::Result<u64> {
        self.reconciles_of("ClusterRegistryCredential")
    }

    /// `regcred_reconciles_total` of one kind.
    pub fn reconciles_of(&self, kind: &str) -> anyhow::Result<u64> {
        let (code, metrics) = self.admin_get("/metrics")?;
        ensure!(code == 200, "controller /metrics: HTTP {code}");
        let label = format!(r#"kind="{kind}""#);
        Ok(metrics
            .lines()
            .filter(|l| l.starts_with("regcred_reconciles_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum::<f64>() as u64)
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn rss(&self) -> (u64, u64) {
        self.process.rss_kib()
    }

    /// What to look at when the controller did not do what was expected.
    pub fn diagnosis(&self) -> String {
        self.process.log_tail()
    }

    /// A minimal HTTP/1.0 GET of the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.admin_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\n\r\n", self.admin_port)?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("malformed response")?;
        Ok((code, response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_string()))
    }
}

/// When a run of N Secret writes was done: all requests answered, and all N seen by the poll.
pub struct DirectRun {
    pub requests_done: Duration,
    pub all_seen: Duration,
}

/// regcred's fan-out: all N Secrets seen by the poll, and status reporting N synced.
pub struct FanOutRun {
    pub all_seen: Duration,
    pub status_synced: Duration,
}

/// The baseline: the same N Secrets regcred writes (same type, same payload) created with a
/// plain client at the controller's concurrency, timed by the same poll as regcred's.
pub async fn direct_create(
    client: &Client,
    namespaces: &[String],
    name: &str,
    run: &str,
    payload: &[u8],
    concurrency: usize,
) -> anyhow::Result<DirectRun> {
    let write = |api: Api<Secret>| {
        let mut secret = pull_secret(name, payload);
        secret.metadata.labels = Some(BTreeMap::from([(DIRECT_LABEL.into(), run.into())]));
        async move { api.create(&PostParams::default(), &secret).await }
    };
    direct_writes(client, namespaces, name, run, PASSWORD, concurrency, write).await
}

/// A plain client's write in each namespace, `concurrency` at once, timed by the poll that
/// waits until Secret `name` labelled `DIRECT_LABEL=run` holds `password` in all of them.
pub async fn direct_writes<F, W>(
    client: &Client,
    namespaces: &[String],
    name: &str,
    run: &str,
    password: &str,
    concurrency: usize,
    write: W,
) -> anyhow::Result<DirectRun>
where
    W: Fn(Api<Secret>) -> F,
    F: std::future::Future<Output = kube::Result<Secret>>,
{
    let started = Instant::now();
    let writes = async {
        stream::iter(namespaces)
            .map(|namespace| write(Api::<Secret>::namespaced(client.clone(), namespace)))
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        anyhow::Ok(started.elapsed())
    };
    let selector = format!("{DIRECT_LABEL}={run}");
    let (requests_done, all_seen) =
        tokio::try_join!(writes, wait_holding(client, &selector, name, password, namespaces.len(), started))?;
    Ok(DirectRun { requests_done, all_seen })
}

/// Creates the ClusterRegistryCredential and polls until all N Secrets exist and, separately,
/// until its status reports N namespaces synced.
pub async fn regcred_fan_out(client: &Client, controller: &mut Controller, n: usize) -> anyhow::Result<FanOutRun> {
    let credentials = Api::<ClusterRegistryCredential>::all(client.clone());
    let credential = cluster_credential(CREDENTIAL, ("bench", "fanout"), PULL)?;
    let started = Instant::now();
    credentials.create(&PostParams::default(), &credential).await?;
    let status_synced = async {
        loop {
            let status = credentials.get(CREDENTIAL).await?.status;
            if status.as_ref().and_then(|s| s.synced_namespaces) == Some(n as u32) {
                return anyhow::Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < PHASE_TIMEOUT,
                "status never reported {n} synced: {}",
                summary(status.as_ref())
            );
            tokio::time::sleep(POLL).await;
        }
    };
    let all_seen = wait_holding(client, MANAGED_BY_REGCRED, PULL, PASSWORD, n, started);
    let result = tokio::try_join!(all_seen, status_synced);
    let (all_seen, status_synced) = match result {
        Ok(times) => times,
        Err(error) => {
            let status = credentials.get(CREDENTIAL).await.ok().and_then(|c| c.status);
            let alive = controller.process.check_alive().err().map(|e| format!("{e:#}")).unwrap_or_default();
            return Err(error
                .context(format!("status: {}", summary(status.as_ref())))
                .context(alive)
                .context(controller.diagnosis()));
        }
    };
    Ok(FanOutRun { all_seen, status_synced })
}

/// A ClusterRegistryCredential with the bench's basic source, writing Secret `secret` into the
/// namespaces labelled `label`.
pub fn cluster_credential(name: &str, label: (&str, &str), secret: &str) -> anyhow::Result<ClusterRegistryCredential> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "ClusterRegistryCredential",
        "metadata": {"name": name},
        "spec": {
            "registry": REGISTRY,
            "source": {"basic": {"username": USERNAME, "passwordSecretRef":
                {"name": SOURCE_SECRET, "namespace": SOURCE_NAMESPACE, "key": "password"}}},
            "namespaces": {"selector": {"matchLabels": {label.0: label.1}}},
            "secret": {"name": secret},
        },
    }))?)
}

/// Polls (every 100 ms, one cluster-wide list by label) until `n` Secrets called `name` hold
/// `password` in their .dockerconfigjson; returns the time since `started`.
pub async fn wait_holding(
    client: &Client,
    selector: &str,
    name: &str,
    password: &str,
    n: usize,
    started: Instant,
) -> anyhow::Result<Duration> {
    let api = Api::<Secret>::all(client.clone());
    let params = kube::api::ListParams::default().labels(selector);
    loop {
        let secrets = api.list(&params).await?.items;
        let seen = secrets.iter().filter(|s| s.metadata.name.as_deref() == Some(name) && holds(s, password)).count();
        if seen == n {
            return Ok(started.elapsed());
        }
        if started.elapsed() > PHASE_TIMEOUT {
            bail!("after {PHASE_TIMEOUT:?}, {seen} of {n} Secrets {name} ({selector}) hold the expected password");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a pull Secret's .dockerconfigjson holds `password` for the bench's registry.
pub fn holds(secret: &Secret, password: &str) -> bool {
    let Some(config) = secret.data.as_ref().and_then(|d| d.get(".dockerconfigjson")) else {
        return false;
    };
    regcred::dockerconfig::parse(&config.0)
        .is_ok_and(|auths| auths.iter().any(|a| a.server == REGISTRY && a.password.expose_secret() == password))
}

/// Creates the namespaces, `concurrency` requests at once.
pub async fn create_namespaces(
    client: &Client,
    names: &[String],
    label: Option<(&str, &str)>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    stream::iter(names)
        .map(|name| {
            let (api, namespace) = (&api, namespace(name, label));
            async move { api.create(&PostParams::default(), &namespace).await }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}

/// A Namespace, labelled `label` if given.
pub fn namespace(name: &str, label: Option<(&str, &str)>) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: label.map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())])),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn auth(password: &str) -> regcred::dockerconfig::RegistryAuth {
    regcred::dockerconfig::RegistryAuth {
        server: REGISTRY.into(),
        username: USERNAME.into(),
        password: password.to_string().into(),
    }
}

pub fn pull_secret(name: &str, payload: &[u8]) -> Secret {
    let mut secret = opaque(name, ".dockerconfigjson", payload);
    secret.type_ = Some("kubernetes.io/dockerconfigjson".into());
    secret
}

pub fn opaque(name: &str, key: &str, value: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some(BTreeMap::from([(key.to_string(), ByteString(value.to_vec()))])),
        ..Default::default()
    }
}

/// Waits until the control plane is quiet: at most 2 writes (kube-apiserver's own lease
/// renewals) in 3 s, by apiserver_request_total. Used between phases so that one phase's
/// aftermath (kube-controller-manager filling new namespaces, the garbage collector, a
/// controller's trailing reconcile) does not land in the next one's figures.
pub async fn wait_quiet(cp: &ControlPlane) -> anyhow::Result<()> {
    wait_quiet_counting(cp, |_| true).await
}

/// [`wait_quiet`], counting only the writes whose `verb resource` key passes `counted`.
pub async fn wait_quiet_counting(cp: &ControlPlane, counted: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let writes = || -> anyhow::Result<u64> {
        Ok(apiserver_writes(cp)?.iter().filter(|(k, _)| counted(k.as_str())).map(|(_, v)| v).sum())
    };
    let started = Instant::now();
    let mut last = writes()?;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = writes()?;
        if now - last <= 2 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(300) {
            eprintln!("warning: the control plane still writes {} times in 3 s after 300 s; going on", now - last);
            return Ok(());
        }
        last = now;
    }
}

/// Waits until the controller has made no write for 5 s (its own Secret writes queue one more
/// reconcile, which must find nothing to do); returns the audit log offset at that point.
pub async fn settle(cp: &ControlPlane, from: u64) -> anyhow::Result<u64> {
    until_stable("the controller's writes", || Ok(total(&controller_writes(cp, from, cp.audit_log_len()?)?))).await?;
    cp.audit_log_len()
}

/// Polls `count` every second until it has not moved for 5 s; returns its last value.
pub async fn until_stable(what: &str, count: impl Fn() -> anyhow::Result<u64>) -> anyhow::Result<u64> {
    let started = Instant::now();
    let (mut last, mut since) = (count()?, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = count()?;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(5) {
            return Ok(now);
        }
        ensure!(started.elapsed() < PHASE_TIMEOUT, "{what} kept changing for {PHASE_TIMEOUT:?}");
    }
}

/// Writes by the controller between two audit log offsets, by verb and resource.
pub fn controller_writes(cp: &ControlPlane, from: u64, to: u64) -> anyhow::Result<BTreeMap<String, u64>> {
    audit_writes(cp, from, to, Some(CONTROLLER_USER))
}

/// Writes between two audit log offsets by `user`, by verb and resource; every user's (keyed
/// by user too) if `user` is None.
pub fn audit_writes(
    cp: &ControlPlane,
    from: u64,
    to: u64,
    user: Option<&str>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut writes = BTreeMap::new();
    for event in audit_events(cp, from, to)? {
        let verb = event["verb"].as_str().unwrap_or_default();
        let who = event["user"]["username"].as_str().unwrap_or_default();
        if !matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
            || user.is_some_and(|u| u != who)
        {
            continue;
        }
        let key = match user {
            Some(_) => request_key(&event),
            None => format!("{who}: {}", request_key(&event)),
        };
        *writes.entry(key).or_default() += 1;
    }
    Ok(writes)
}

/// The audit events (one per request) between two audit log offsets.
pub fn audit_events(cp: &ControlPlane, from: u64, to: u64) -> anyhow::Result<Vec<Value>> {
    let text = cp.read_audit_log(from, Some(to))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect())
}

/// An audit event's verb and resource, e.g. `patch secrets`, `patch clusterregistrycredentials/status`.
pub fn request_key(event: &Value) -> String {
    let verb = event["verb"].as_str().unwrap_or_default();
    let resource = event["objectRef"]["resource"].as_str().unwrap_or_default();
    let sub = event["objectRef"]["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
    format!("{verb} {resource}{sub}")
}

/// apiserver_request_total summed by write verb and resource, e.g. `APPLY secrets`,
/// `PUT coordination.k8s.io/leases`. Every user's: the metric has no user label.
pub fn apiserver_writes(cp: &ControlPlane) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = cp.apiserver_metrics()?;
    let mut writes = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else { continue };
        let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
        let labels: BTreeMap<&str, &str> = labels
            .split("\",")
            .filter_map(|pair| pair.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        let verb = labels.get("verb").copied().unwrap_or_default();
        if !WRITE_VERBS.contains(&verb) {
            continue;
        }
        let group = labels.get("group").filter(|g| !g.is_empty()).map(|g| format!("{g}/")).unwrap_or_default();
        let resource = labels.get("resource").copied().unwrap_or_default();
        let sub = labels.get("subresource").filter(|s| !s.is_empty()).map(|s| format!("/{s}")).unwrap_or_default();
        *writes.entry(format!("{verb} {group}{resource}{sub}")).or_default() += value.parse::<f64>()? as u64;
    }
    Ok(writes)
}

pub fn summary(status: Option<&regcred::crd::ClusterCredentialStatus>) -> String {
    let Some(status) = status else { return "none yet".into() };
    let ready = status
        .credential
        .condition("Ready")
        .map(|c| format!("Ready={} {}: {}", c.status, c.reason, c.message))
        .unwrap_or_else(|| "no Ready condition".into());
    let failures: Vec<String> = status.failures.iter().map(|f| format!("{} {}", f.namespace, f.reason)).collect();
    format!(
        "targets {:?}, synced {:?}, failed {:?}{}; {ready}",
        status.target_namespaces,
        status.synced_namespaces,
        status.failed_namespaces,
        if failures.is_empty() { String::new() } else { format!(" (first: {})", failures.join(", ")) }
    )
}

/// "met" or "MISSED", for a goal.
pub fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

pub fn total(writes: &BTreeMap<String, u64>) -> u64 {
    writes.values().sum()
}

pub fn show(writes: &BTreeMap<String, u64>) -> String {
    if writes.is_empty() {
        return "{}".into();
    }
    format!("{writes:?}")
}

pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

pub fn ratio_kib(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

pub fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub fn kib(value: u64) -> String {
    format!("{value} KiB ({:.1} MiB)", value as f64 / 1024.0)
}

/// CPUs and load average now: the timings share the machine with the control plane and with
/// whatever else runs; memory and request counts do not depend on it.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cpus} CPUs, load average {} (1/5/15 min)", load.join(" "))
}
