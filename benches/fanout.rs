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

#[allow(dead_code)]
mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use regcred::crd::ClusterRegistryCredential;
use regcred_testenv::{CONTROLLER_USER, ControlPlane};
use secrecy::ExposeSecret;
use serde_json::json;
use support::*;

const NEW_PASSWORD: &str = "bench-password-2";
/// Namespaces that hold the unrelated Secrets (not labelled bench=fanout).
const UNRELATED_NAMESPACES: usize = 20;
const CONTROLLER_LOG: &str = "regcred-fanout-bench.log";
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
        for (flag, value) in flag_pairs()? {
            let number = || parse_flag::<usize>(&flag, &value);
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
    let flags = [
        "--concurrency".to_string(),
        args.concurrency.to_string(),
        "--resync-interval".into(),
        args.resync_interval.clone(),
    ];
    let mut controller = Controller::start(cp, CONTROLLER_LOG, &flags, &[])?;
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
    // The baseline is a plain client: it sends the bytes as they are.
    let payload = regcred::dockerconfig::render(&[auth(PASSWORD)]).expose_secret().to_vec();
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
    let new_payload = regcred::dockerconfig::render(&[auth(NEW_PASSWORD)]).expose_secret().to_vec();
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
    let write = |api: Api<Secret>| {
        let patch = &patch;
        async move { api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await }
    };
    direct_writes(client, namespaces, name, run, NEW_PASSWORD, concurrency, write).await
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
