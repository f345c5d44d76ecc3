//! Measures a ClusterRegistryCredential fanning one pull Secret out to many namespaces, against
//! the real local control plane, each figure next to a baseline from the same run. Not a test:
//! it prints a report.
//!
//!   cargo bench --bench fanout                     # 1000 namespaces, 10-minute idle window
//!   cargo bench --bench fanout -- --namespaces 200 --idle-secs 30 --unrelated 100
//!
//! Flags (default): `--namespaces` (1000), `--idle-secs` (600), `--unrelated` (2000),
//! `--unrelated-kib` (500), `--concurrency` (8: the controller's `--concurrency` and the
//! baseline's), `--resync-interval` (5m: the controller's, shorter than its 15m default so that
//! the idle window holds resyncs that must find nothing to write).
//!
//! 1. fan-out: time until all N Secrets exist, against a plain client creating the same N
//!    Secrets at the same concurrency, once before and once after regcred's fan-out;
//! 2. writes while idle after the fan-out: the audit log (the controller's user) and
//!    `apiserver_request_total` (every user);
//! 3. controller RSS after the fan-out and after many large unrelated Secrets, against its RSS
//!    when it was ready with no credentials;
//! 4. a change of the source Secret: time until all N Secrets hold it, against a plain client
//!    patching N Secrets at the same concurrency.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use regcred::crd::ClusterRegistryCredential;
use regcred_testenv::{CONTROLLER_USER, ControlPlane, Process};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

const CREDENTIAL: &str = "fan";
const REGISTRY: &str = "registry.example.com";
const USERNAME: &str = "u";
const SOURCE_NAMESPACE: &str = "bench-source";
const SOURCE_SECRET: &str = "src";
const PULL: &str = "regcred-pull";
/// Selects every Secret regcred wrote (and nothing the baseline wrote).
const MANAGED_BY_REGCRED: &str = "app.kubernetes.io/managed-by=regcred";
/// Label on the baseline's Secrets; its value names the run.
const DIRECT_LABEL: &str = "regcred-bench/direct";
const PASSWORD: &str = "bench-password-1";
const NEW_PASSWORD: &str = "bench-password-2";
/// Namespaces that hold the unrelated Secrets (not labelled bench=fanout).
const UNRELATED_NAMESPACES: usize = 20;
const CONTROLLER_LOG: &str = "regcred-fanout-bench.log";
const POLL: Duration = Duration::from_millis(100);
/// Longest any one phase may take before the bench gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Write verbs as apiserver_request_total names them: server-side apply is `APPLY`, not `PATCH`.
const WRITE_VERBS: [&str; 6] = ["POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION"];
/// Resources regcred writes; other writes in apiserver_request_total belong to someone else.
const REGCRED_RESOURCES: [&str; 4] = ["secrets", "events", "clusterregistrycredentials", "serviceaccounts"];

struct Args {
    namespaces: usize,
    idle_secs: u64,
    unrelated: usize,
    unrelated_kib: usize,
    concurrency: usize,
    resync_interval: String,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            namespaces: 1000,
            idle_secs: 600,
            unrelated: 2000,
            unrelated_kib: 500,
            concurrency: 8,
            resync_interval: "5m".into(),
        };
        let mut argv = std::env::args().skip(1);
        while let Some(flag) = argv.next() {
            // `cargo bench` passes --bench to every bench binary.
            if flag == "--bench" {
                continue;
            }
            let value = argv.next().with_context(|| format!("{flag} needs a value"))?;
            let number = || value.parse::<usize>().with_context(|| format!("{flag} {value}: not a number"));
            match flag.as_str() {
                "--namespaces" => args.namespaces = number()?,
                "--idle-secs" => args.idle_secs = number()? as u64,
                "--unrelated" => args.unrelated = number()?,
                "--unrelated-kib" => args.unrelated_kib = number()?,
                "--concurrency" => args.concurrency = number()?,
                "--resync-interval" => args.resync_interval = value,
                _ => bail!(
                    "unknown flag {flag}; known: --namespaces, --idle-secs, --unrelated, --unrelated-kib, \
                     --concurrency, --resync-interval"
                ),
            }
        }
        ensure!(args.namespaces > 0 && args.concurrency > 0, "--namespaces and --concurrency must be positive");
        Ok(args)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let result = run(&cp, &args).await;
    // The control plane's dir goes when `cp` drops: keep the controller's log for a look afterwards.
    let kept = std::env::temp_dir().join("regcred-bench-fanout-controller.log");
    if std::fs::copy(cp.dir().join(CONTROLLER_LOG), &kept).is_ok() {
        eprintln!("controller log kept in {}", kept.display());
    }
    result
}

async fn run(cp: &ControlPlane, args: &Args) -> anyhow::Result<()> {
    let client = cp.client().await;
    let n = args.namespaces;
    println!(
        "regcred fan-out bench: {n} namespaces, concurrency {} (controller and baseline), idle window {} s, \
         {} unrelated Secrets of {} KiB, controller --resync-interval {}",
        args.concurrency, args.idle_secs, args.unrelated, args.unrelated_kib, args.resync_interval
    );

    // The controller starts first, on an empty cluster: its RSS baseline is "ready, no
    // credentials", and both baseline runs below see the same background (an idle controller
    // watching Secrets and Namespaces) as regcred's own run.
    let mut controller = Controller::start(cp, args)?;
    let ready_in = controller.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // let its first lists settle
    let rss_empty = controller.rss();
    println!(
        "controller ready (/readyz 200) {:.1} s after spawn; RSS {} (peak {}) with no credentials",
        ready_in.as_secs_f64(),
        kib(rss_empty.0),
        kib(rss_empty.1)
    );

    create_namespaces(&client, &[SOURCE_NAMESPACE.to_string()], None, 1).await?;
    let source = Api::<Secret>::namespaced(client.clone(), SOURCE_NAMESPACE);
    source.create(&PostParams::default(), &opaque(SOURCE_SECRET, "password", PASSWORD.as_bytes())).await?;
    let fan_namespaces: Vec<String> = (0..n).map(|i| format!("fan-{i:05}")).collect();
    let started = Instant::now();
    create_namespaces(&client, &fan_namespaces, Some(("bench", "fanout")), 2 * args.concurrency).await?;
    println!("created {n} namespaces labelled bench=fanout in {:.1} s", started.elapsed().as_secs_f64());
    // kube-controller-manager puts a ServiceAccount and a ConfigMap into every new namespace:
    // let it finish so it does not compete with the timed runs.
    wait_quiet(cp).await?;

    // 1. Fan-out.
    println!("\n1. fan-out to {n} namespaces");
    let payload = regcred::dockerconfig::render(&[auth(PASSWORD)]);
    let before = direct_create(&client, &fan_namespaces, "direct-pull", "before", &payload, args.concurrency).await?;
    println!(
        "  direct baseline (before): last create answered after {:.2} s, all {n} seen by the poll after {:.2} s",
        before.requests_done.as_secs_f64(),
        before.all_seen.as_secs_f64()
    );
    wait_quiet(cp).await?;

    let (audit_start, reconciles_start) = (cp.audit_log_len()?, controller.reconciles()?);
    let fan = regcred_fan_out(&client, &mut controller, n).await?;
    let audit_end = settle(cp, audit_start).await?;
    let fan_writes = controller_writes(cp, audit_start, audit_end)?;
    let fan_reconciles = controller.reconciles()? - reconciles_start;
    let rss_fanned = controller.rss();
    println!(
        "  regcred: all {n} Secrets seen by the poll after {:.2} s; status.syncedNamespaces == {n} after {:.2} s",
        fan.all_seen.as_secs_f64(),
        fan.status_synced.as_secs_f64()
    );
    wait_quiet(cp).await?;

    let after =
        direct_create(&client, &fan_namespaces, "direct-pull-after", "after", &payload, args.concurrency).await?;
    println!(
        "  direct baseline (after):  last create answered after {:.2} s, all {n} seen by the poll after {:.2} s",
        after.requests_done.as_secs_f64(),
        after.all_seen.as_secs_f64()
    );
    let direct_mean = (before.all_seen + after.all_seen) / 2;
    let fan_ratio = ratio(fan.all_seen, direct_mean);
    println!(
        "  ratio regcred/direct (both timed by the same 100 ms poll): {fan_ratio:.2}× against the mean of the two \
         baseline runs ({:.2}× against before, {:.2}× against after); target ≤ 1.30×",
        ratio(fan.all_seen, before.all_seen),
        ratio(fan.all_seen, after.all_seen)
    );
    println!(
        "  controller writes during the fan-out ({fan_reconciles} reconciles): {} {}",
        total(&fan_writes),
        show(&fan_writes)
    );
    let status = Api::<ClusterRegistryCredential>::all(client.clone()).get(CREDENTIAL).await?.status;
    println!("  status: {}", summary(status.as_ref()));
    wait_quiet(cp).await?;

    // 2. Idle writes. apiserver_request_total has no user label, so the bench makes no request
    // that writes (nor any other request) during the window; what it counts besides the
    // controller is kube-apiserver's and kube-controller-manager's own housekeeping.
    println!("\n2. writes while idle for {} s after the fan-out", args.idle_secs);
    let (audit_start, metrics_start, reconciles_start) =
        (cp.audit_log_len()?, apiserver_writes(cp)?, controller.reconciles()?);
    // RSS (from /proc, no request to the apiserver) every tenth of the window: whether the
    // no-op resyncs in it make memory grow, and whether it levels off.
    let (idle_start, step) = (Instant::now(), Duration::from_secs((args.idle_secs / 10).max(1)));
    let mut samples = vec![format!("0 s {} MiB", mib(controller.rss().0))];
    while idle_start.elapsed() < Duration::from_secs(args.idle_secs) {
        let left = Duration::from_secs(args.idle_secs).saturating_sub(idle_start.elapsed());
        tokio::time::sleep(step.min(left)).await;
        let reconciled = controller.reconciles()? - reconciles_start;
        samples.push(format!(
            "{} s {} MiB ({reconciled} reconciles)",
            idle_start.elapsed().as_secs(),
            mib(controller.rss().0)
        ));
    }
    let (audit_end, metrics_end) = (cp.audit_log_len()?, apiserver_writes(cp)?);
    let idle_reconciles = controller.reconciles()? - reconciles_start;
    let idle_controller = controller_writes(cp, audit_start, audit_end)?;
    let idle_everyone = audit_writes(cp, audit_start, audit_end, None)?;
    let idle_metrics: BTreeMap<String, u64> = metrics_end
        .iter()
        .map(|(key, end)| (key.clone(), end - metrics_start.get(key).copied().unwrap_or(0)))
        .filter(|(_, delta)| *delta > 0)
        .collect();
    let idle_metrics_regcred: u64 = idle_metrics
        .iter()
        .filter(|(key, _)| REGCRED_RESOURCES.iter().any(|r| key.split(' ').nth(1).is_some_and(|k| k.contains(r))))
        .map(|(_, delta)| delta)
        .sum();
    println!(
        "  audit log, user {CONTROLLER_USER}: {} writes {}; target 0 (the controller ran {idle_reconciles} \
         reconciles meanwhile)",
        total(&idle_controller),
        show(&idle_controller)
    );
    println!(
        "  apiserver_request_total (every user; verbs {}): {} writes, {idle_metrics_regcred} of them on resources \
         regcred writes ({}); target 0 on those",
        WRITE_VERBS.join("/"),
        idle_metrics.values().sum::<u64>(),
        REGCRED_RESOURCES.join(", ")
    );
    println!("    by verb and resource: {}", show(&idle_metrics));
    println!("    the same window in the audit log, every user: {}", show(&idle_everyone));
    let rss_idle = controller.rss();
    println!("  controller RSS during the window: {}", samples.join(", "));

    // 3. RSS, and what large unrelated Secrets do to it.
    println!("\n3. controller memory");
    println!("  ready with no credentials: RSS {}, peak {} (the baseline)", kib(rss_empty.0), kib(rss_empty.1));
    println!(
        "  after the fan-out to {n} namespaces: RSS {} ({:.2}×), peak {} ({:.2}×); after the idle window: RSS {}, peak {}",
        kib(rss_fanned.0),
        ratio_kib(rss_fanned.0, rss_empty.0),
        kib(rss_fanned.1),
        ratio_kib(rss_fanned.1, rss_empty.0),
        kib(rss_idle.0),
        kib(rss_idle.1)
    );
    let unrelated = create_unrelated(cp, &client, args).await?;
    println!(
        "  created {} unrelated Opaque Secrets of {} KiB in {UNRELATED_NAMESPACES} unlabelled namespaces in {:.1} s; \
         etcd database now {:.0} MiB (quota 2 GiB), data dir with the WAL {:.0} MiB",
        args.unrelated,
        args.unrelated_kib,
        unrelated.as_secs_f64(),
        dir_size(&cp.dir().join("etcd/member/snap/db")) as f64 / 1048576.0,
        dir_size(&cp.dir().join("etcd")) as f64 / 1048576.0
    );
    wait_quiet(cp).await?;
    // Their watch events reached the controller by now; one reconcile more has it list and
    // read whatever it reads per reconcile in a cluster that holds them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (audit_start, touched) = (cp.audit_log_len()?, touch_and_reconcile(&client, &controller).await?);
    let audit_end = settle(cp, audit_start).await?;
    let touch_writes = controller_writes(cp, audit_start, audit_end)?;
    let rss_unrelated = controller.rss();
    println!(
        "  after them and a reconcile (triggered by an annotation, done {:.2} s later; controller writes {} {}): \
         RSS {} ({:.2}×), peak {} ({:.2}×); target < 50 MiB and no growth from the unrelated Secrets \
         ({:+} KiB RSS, {:+} KiB peak, against after the idle window)",
        touched.as_secs_f64(),
        total(&touch_writes),
        show(&touch_writes),
        kib(rss_unrelated.0),
        ratio_kib(rss_unrelated.0, rss_empty.0),
        kib(rss_unrelated.1),
        ratio_kib(rss_unrelated.1, rss_empty.0),
        rss_unrelated.0 as i64 - rss_idle.0 as i64,
        rss_unrelated.1 as i64 - rss_idle.1 as i64,
    );
    wait_quiet(cp).await?;

    // 4. Source change.
    println!("\n4. source Secret change");
    let (audit_start, reconciles_start) = (cp.audit_log_len()?, controller.reconciles()?);
    let started = Instant::now();
    let new_password = json!({"data": {"password": base64::engine::general_purpose::STANDARD.encode(NEW_PASSWORD)}});
    source.patch(SOURCE_SECRET, &PatchParams::default(), &Patch::Merge(&new_password)).await?;
    let propagated = wait_holding(&client, MANAGED_BY_REGCRED, PULL, NEW_PASSWORD, n, started)
        .await
        .map_err(|e| e.context(controller.diagnosis()))?;
    let audit_end = settle(cp, audit_start).await?;
    let change_writes = controller_writes(cp, audit_start, audit_end)?;
    let change_reconciles = controller.reconciles()? - reconciles_start;
    wait_quiet(cp).await?;
    let new_payload = regcred::dockerconfig::render(&[auth(NEW_PASSWORD)]);
    let direct_update =
        direct_patch(&client, &fan_namespaces, "direct-pull", "before", &new_payload, args.concurrency).await?;
    println!(
        "  regcred: all {n} Secrets hold the new password {:.2} s after the source patch",
        propagated.as_secs_f64()
    );
    println!(
        "  direct baseline: {n} merge patches at concurrency {}: last answered after {:.2} s, all seen after {:.2} s",
        args.concurrency,
        direct_update.requests_done.as_secs_f64(),
        direct_update.all_seen.as_secs_f64()
    );
    println!(
        "  ratio against the direct patches {:.2}×; against regcred's initial fan-out ({:.2} s) {:.2}×; against \
         the direct creates (mean {:.2} s) {:.2}×",
        ratio(propagated, direct_update.all_seen),
        fan.all_seen.as_secs_f64(),
        ratio(propagated, fan.all_seen),
        direct_mean.as_secs_f64(),
        ratio(propagated, direct_mean)
    );
    println!(
        "  controller writes during the change ({change_reconciles} reconciles): {} {}",
        total(&change_writes),
        show(&change_writes)
    );
    let status = Api::<ClusterRegistryCredential>::all(client.clone()).get(CREDENTIAL).await?.status;
    println!("  status: {}", summary(status.as_ref()));

    let rss_end = controller.rss();
    println!("\nsummary");
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!("  fan-out regcred/direct: {fan_ratio:.2}× (target ≤ 1.30×: {})", met(fan_ratio <= 1.3));
    println!(
        "  idle writes in {} s: audit {} (controller), apiserver_request_total {} on regcred's resources, {} in all \
         (target 0: {})",
        args.idle_secs,
        total(&idle_controller),
        idle_metrics_regcred,
        idle_metrics.values().sum::<u64>(),
        met(total(&idle_controller) == 0 && idle_metrics_regcred == 0)
    );
    println!(
        "  controller peak RSS {} over the whole run ({:.2}× ready-and-empty), RSS {} at the end (target < 50 MiB: \
         {}); growth from the unrelated Secrets {:+} KiB RSS, {:+} KiB peak (target none)",
        kib(rss_end.1),
        ratio_kib(rss_end.1, rss_empty.0),
        kib(rss_end.0),
        met(rss_end.1 < 50 * 1024),
        rss_unrelated.0 as i64 - rss_idle.0 as i64,
        rss_unrelated.1 as i64 - rss_idle.1 as i64
    );
    println!(
        "  source change propagated in {:.2} s ({:.2}× the direct patches, {:.2}× the initial fan-out)",
        propagated.as_secs_f64(),
        ratio(propagated, direct_update.all_seen),
        ratio(propagated, fan.all_seen)
    );
    controller.process.check_alive()?;
    Ok(())
}

/// The controller under test and its admin endpoint.
struct Controller {
    process: Process,
    admin_port: u16,
}

impl Controller {
    fn start(cp: &ControlPlane, args: &Args) -> anyhow::Result<Controller> {
        let admin_port = regcred_testenv::free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regcred"));
        cmd.args(["run", "--concurrency", &args.concurrency.to_string()])
            .args(["--resync-interval", &args.resync_interval])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .env("KUBECONFIG", cp.controller_kubeconfig_path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info");
        let process = Process::spawn("regcred", cmd, &cp.dir().join(CONTROLLER_LOG))?;
        Ok(Controller { process, admin_port })
    }

    /// Polls /readyz until 200 (the credential caches have synced); returns how long it took.
    async fn wait_ready(&mut self) -> anyhow::Result<Duration> {
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
    fn reconciles(&self) -> anyhow::Result<u64> {
        let (code, metrics) = self.admin_get("/metrics")?;
        ensure!(code == 200, "controller /metrics: HTTP {code}");
        Ok(metrics
            .lines()
            .filter(|l| l.starts_with("regcred_reconciles_total{") && l.contains(r#"kind="ClusterRegistryCredential""#))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum::<f64>() as u64)
    }

    /// (VmRSS, VmHWM) in KiB.
    fn rss(&self) -> (u64, u64) {
        self.process.rss_kib()
    }

    /// What to look at when the controller did not do what was expected.
    fn diagnosis(&self) -> String {
        self.process.log_tail()
    }

    /// A minimal HTTP/1.0 GET of the admin endpoint: (status, body).
    fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
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
struct DirectRun {
    requests_done: Duration,
    all_seen: Duration,
}

/// regcred's fan-out: all N Secrets seen by the poll, and status reporting N synced.
struct FanOutRun {
    all_seen: Duration,
    status_synced: Duration,
}

/// The baseline: the same N Secrets regcred writes (same type, same payload) created with a
/// plain client at the controller's concurrency, timed by the same poll as regcred's.
async fn direct_create(
    client: &Client,
    namespaces: &[String],
    name: &str,
    run: &str,
    payload: &[u8],
    concurrency: usize,
) -> anyhow::Result<DirectRun> {
    let started = Instant::now();
    let creates = async {
        stream::iter(namespaces)
            .map(|namespace| {
                let mut secret = pull_secret(name, payload);
                secret.metadata.labels = Some(BTreeMap::from([(DIRECT_LABEL.into(), run.into())]));
                let api = Api::<Secret>::namespaced(client.clone(), namespace);
                async move { api.create(&PostParams::default(), &secret).await }
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        anyhow::Ok(started.elapsed())
    };
    let selector = format!("{DIRECT_LABEL}={run}");
    let (requests_done, all_seen) =
        tokio::try_join!(creates, wait_holding(client, &selector, name, PASSWORD, namespaces.len(), started))?;
    Ok(DirectRun { requests_done, all_seen })
}

/// The baseline for a change: the new payload merge-patched into the baseline's N Secrets.
async fn direct_patch(
    client: &Client,
    namespaces: &[String],
    name: &str,
    run: &str,
    payload: &[u8],
    concurrency: usize,
) -> anyhow::Result<DirectRun> {
    let patch = json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(payload)}});
    let started = Instant::now();
    let patches = async {
        stream::iter(namespaces)
            .map(|namespace| {
                let (api, patch) = (Api::<Secret>::namespaced(client.clone(), namespace), &patch);
                async move { api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await }
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        anyhow::Ok(started.elapsed())
    };
    let selector = format!("{DIRECT_LABEL}={run}");
    let (requests_done, all_seen) =
        tokio::try_join!(patches, wait_holding(client, &selector, name, NEW_PASSWORD, namespaces.len(), started))?;
    Ok(DirectRun { requests_done, all_seen })
}

/// Creates the ClusterRegistryCredential and polls until all N Secrets exist and, separately,
/// until its status reports N namespaces synced.
async fn regcred_fan_out(client: &Client, controller: &mut Controller, n: usize) -> anyhow::Result<FanOutRun> {
    let credentials = Api::<ClusterRegistryCredential>::all(client.clone());
    let credential: ClusterRegistryCredential = serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "ClusterRegistryCredential",
        "metadata": {"name": CREDENTIAL},
        "spec": {
            "registry": REGISTRY,
            "source": {"basic": {"username": USERNAME, "passwordSecretRef":
                {"name": SOURCE_SECRET, "namespace": SOURCE_NAMESPACE, "key": "password"}}},
            "namespaces": {"selector": {"matchLabels": {"bench": "fanout"}}},
            "secret": {"name": PULL},
        },
    }))?;
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

/// Polls (every 100 ms, one cluster-wide list by label) until `n` Secrets called `name` hold
/// `password` in their .dockerconfigjson; returns the time since `started`.
async fn wait_holding(
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
fn holds(secret: &Secret, password: &str) -> bool {
    let Some(config) = secret.data.as_ref().and_then(|d| d.get(".dockerconfigjson")) else {
        return false;
    };
    regcred::dockerconfig::parse(&config.0)
        .is_ok_and(|auths| auths.iter().any(|a| a.server == REGISTRY && a.password.expose_secret() == password))
}

/// Sets an annotation on the credential (a change that is no spec change) and waits until the
/// reconcile it triggers has ended; returns how long that took.
async fn touch_and_reconcile(client: &Client, controller: &Controller) -> anyhow::Result<Duration> {
    let before = controller.reconciles()?;
    let started = Instant::now();
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis().to_string();
    let patch = json!({"metadata": {"annotations": {"regcred-bench/touched": at}}});
    Api::<ClusterRegistryCredential>::all(client.clone())
        .patch(CREDENTIAL, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    while controller.reconciles()? == before {
        ensure!(started.elapsed() < Duration::from_secs(60), "no reconcile within 60 s of the annotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

/// `--unrelated` Opaque Secrets of `--unrelated-kib` KiB each, spread over namespaces the
/// credential does not select; returns how long creating them took.
async fn create_unrelated(cp: &ControlPlane, client: &Client, args: &Args) -> anyhow::Result<Duration> {
    let namespaces: Vec<String> = (0..UNRELATED_NAMESPACES).map(|i| format!("unrelated-{i:02}")).collect();
    create_namespaces(client, &namespaces, None, args.concurrency).await?;
    let started = Instant::now();
    stream::iter(0..args.unrelated)
        .map(|i| {
            let api = Api::<Secret>::namespaced(client.clone(), &namespaces[i % namespaces.len()]);
            // Made in the stream, so only the requests in flight are held in memory.
            let secret = opaque(&format!("blob-{i:05}"), "blob", &noise(i as u64, args.unrelated_kib * 1024));
            async move { api.create(&PostParams::default(), &secret).await }
        })
        .buffer_unordered(args.concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await
        .with_context(|| {
            format!("creating the unrelated Secrets (etcd data dir: {} bytes)", dir_size(&cp.dir().join("etcd")))
        })?;
    Ok(started.elapsed())
}

/// Pseudo-random bytes (xorshift64*), different for every seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

async fn create_namespaces(
    client: &Client,
    names: &[String],
    label: Option<(&str, &str)>,
    concurrency: usize,
) -> anyhow::Result<()> {
    let api = Api::<Namespace>::all(client.clone());
    stream::iter(names)
        .map(|name| {
            let namespace = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: label.map(|(k, v)| BTreeMap::from([(k.to_string(), v.to_string())])),
                    ..Default::default()
                },
                ..Default::default()
            };
            let api = &api;
            async move { api.create(&PostParams::default(), &namespace).await }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}

fn auth(password: &str) -> regcred::dockerconfig::RegistryAuth {
    regcred::dockerconfig::RegistryAuth {
        server: REGISTRY.into(),
        username: USERNAME.into(),
        password: password.to_string().into(),
    }
}

fn pull_secret(name: &str, payload: &[u8]) -> Secret {
    let mut secret = opaque(name, ".dockerconfigjson", payload);
    secret.type_ = Some("kubernetes.io/dockerconfigjson".into());
    secret
}

fn opaque(name: &str, key: &str, value: &[u8]) -> Secret {
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
async fn wait_quiet(cp: &ControlPlane) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last: u64 = apiserver_writes(cp)?.values().sum();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now: u64 = apiserver_writes(cp)?.values().sum();
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
async fn settle(cp: &ControlPlane, from: u64) -> anyhow::Result<u64> {
    let started = Instant::now();
    let (mut last, mut since) = (total(&controller_writes(cp, from, cp.audit_log_len()?)?), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = total(&controller_writes(cp, from, cp.audit_log_len()?)?);
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(5) {
            return cp.audit_log_len();
        }
        ensure!(started.elapsed() < PHASE_TIMEOUT, "the controller kept writing for {PHASE_TIMEOUT:?}");
    }
}

/// Writes by the controller between two audit log offsets, by verb and resource.
fn controller_writes(cp: &ControlPlane, from: u64, to: u64) -> anyhow::Result<BTreeMap<String, u64>> {
    audit_writes(cp, from, to, Some(CONTROLLER_USER))
}

/// Writes between two audit log offsets by `user`, by verb and resource; every user's (keyed
/// by user too) if `user` is None.
fn audit_writes(cp: &ControlPlane, from: u64, to: u64, user: Option<&str>) -> anyhow::Result<BTreeMap<String, u64>> {
    let text = cp.read_audit_log(from, Some(to))?;
    let mut writes = BTreeMap::new();
    for event in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let verb = event["verb"].as_str().unwrap_or_default();
        let who = event["user"]["username"].as_str().unwrap_or_default();
        if !matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
            || user.is_some_and(|u| u != who)
        {
            continue;
        }
        let resource = event["objectRef"]["resource"].as_str().unwrap_or_default();
        let sub = event["objectRef"]["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
        let key = match user {
            Some(_) => format!("{verb} {resource}{sub}"),
            None => format!("{who}: {verb} {resource}{sub}"),
        };
        *writes.entry(key).or_default() += 1;
    }
    Ok(writes)
}

/// apiserver_request_total summed by write verb and resource, e.g. `APPLY secrets`,
/// `PUT coordination.k8s.io/leases`. Every user's: the metric has no user label.
fn apiserver_writes(cp: &ControlPlane) -> anyhow::Result<BTreeMap<String, u64>> {
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

/// Bytes in the files under `dir` (or in the file `dir`).
fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return std::fs::metadata(dir).map_or(0, |m| m.len()) };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn summary(status: Option<&regcred::crd::ClusterCredentialStatus>) -> String {
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

fn total(writes: &BTreeMap<String, u64>) -> u64 {
    writes.values().sum()
}

fn show(writes: &BTreeMap<String, u64>) -> String {
    if writes.is_empty() {
        return "{}".into();
    }
    format!("{writes:?}")
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn ratio_kib(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn kib(value: u64) -> String {
    format!("{value} KiB ({:.1} MiB)", value as f64 / 1024.0)
}
