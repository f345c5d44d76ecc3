//! regcred on a big cluster (issue 20, item 14): many namespaces, several
//! ClusterRegistryCredentials selecting all of them, against the real local control plane, each
//! timing next to a plain client's in the same run. Not a test: it prints a report.
//!
//!   cargo bench --bench scale                                       # 10,000 namespaces × 10
//!   cargo bench --bench scale -- --namespaces 100 --credentials 2   # a smoke run
//!
//! Flags (environment; default): `--namespaces` (REGCRED_BENCH_NAMESPACES; 10000),
//! `--credentials` (REGCRED_BENCH_CREDENTIALS; 10: ClusterRegistryCredentials, each writing its
//! own Secret into every namespace), `--concurrency` (REGCRED_BENCH_CONCURRENCY; 8: the
//! controller's and the plain client's), `--rest-secs` (60: the window at rest),
//! `--resync-interval` (15m: the controller's), `--lease-duration` (15s: the controllers'
//! `--leader-election-duration`).
//!
//! Every controller runs with `--leader-elect`, as the chart runs it.
//!
//! 1. baseline: a plain client creates the same N×C Secrets (same type and payload, other
//!    names) at the same concurrency, before regcred's sync;
//! 2. sync: the C credentials are created; time until all N×C Secrets hold the password, as a
//!    write rate against the baseline's (goal ≥ 0.90×); the controller's peak RSS (VmHWM, and
//!    VmRSS sampled every 100 ms) during it (goal < 100 MiB);
//! 3. at rest: the controller's writes and status patches in `--rest-secs` (goal 0);
//! 4. restart: SIGTERM and a new controller process; its peak RSS until it has reconciled every
//!    credential (goal < the chart's memory limit) and its writes and status patches (goal 0);
//! 5. one change of the source Secret: time until all N×C Secrets hold it, against the plain
//!    client making the same N×C changes with the verb regcred uses for a change, server-side
//!    apply (goal ≤ 1.2×), and (no goal) with merge patches, which the apiserver serves faster;
//! 6. leader failover: a standby replica; the leader is SIGKILLed; the standby's peak RSS until
//!    it has reconciled every credential (goal < the chart's memory limit) and its writes.
//!
//! Completion is seen by a label-selected watch of Secrets from a resourceVersion taken before
//! the writes (one event per write, no polling list of N×C Secrets), the same for regcred and
//! for the plain client. Request counts come from the audit log (the controller's user).

#[allow(dead_code)]
mod support;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use regcred::crd::ClusterRegistryCredential;
use regcred_testenv::{CONTROLLER_USER, ControlPlane};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use support::*;

const NEW_PASSWORD: &str = "bench-password-2";
/// What the plain client server-side applies after its merge patches.
const APPLIED_PASSWORD: &str = "bench-password-3";
const LABEL: (&str, &str) = ("bench", "scale");
const BASELINE_RUN: &str = "scale";
/// Goals (issue 20, item 14).
const SYNC_RATE_GOAL: f64 = 0.90;
const SYNC_PEAK_GOAL_KIB: u64 = 100 * 1024;
const CHANGE_GOAL: f64 = 1.2;

struct Args {
    namespaces: usize,
    credentials: usize,
    concurrency: usize,
    rest_secs: u64,
    resync_interval: String,
    lease_duration: String,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let env = |name: &str, default: usize| -> anyhow::Result<usize> {
            std::env::var(name).map_or(Ok(default), |v| parse_flag(name, &v))
        };
        let mut args = Args {
            namespaces: env("REGCRED_BENCH_NAMESPACES", 10_000)?,
            credentials: env("REGCRED_BENCH_CREDENTIALS", 10)?,
            concurrency: env("REGCRED_BENCH_CONCURRENCY", 8)?,
            rest_secs: 60,
            resync_interval: "15m".into(),
            lease_duration: "15s".into(),
        };
        for (flag, value) in flag_pairs()? {
            let number = || parse_flag::<usize>(&flag, &value);
            match flag.as_str() {
                "--namespaces" => args.namespaces = number()?,
                "--credentials" => args.credentials = number()?,
                "--concurrency" => args.concurrency = number()?,
                "--rest-secs" => args.rest_secs = number()? as u64,
                "--resync-interval" => args.resync_interval = value,
                "--lease-duration" => args.lease_duration = value,
                _ => bail!(
                    "unknown flag {flag}; known: --namespaces, --credentials, --concurrency, --rest-secs, \
                     --resync-interval, --lease-duration"
                ),
            }
        }
        ensure!(
            args.namespaces > 0 && args.credentials > 0 && args.concurrency > 0,
            "--namespaces, --credentials and --concurrency must be positive"
        );
        Ok(args)
    }

    fn secrets(&self) -> usize {
        self.namespaces * self.credentials
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let result = run(&cp, &args).await;
    // The control plane's dir goes when `cp` drops: keep the controllers' logs.
    for replica in ["a", "b", "c"] {
        let kept = std::env::temp_dir().join(format!("regcred-bench-scale-{replica}.log"));
        if std::fs::copy(cp.dir().join(log_name(replica)), &kept).is_ok() {
            eprintln!("controller {replica}'s log kept in {}", kept.display());
        }
    }
    result
}

async fn run(cp: &ControlPlane, args: &Args) -> anyhow::Result<()> {
    let client = cp.client().await;
    let (n, c, total) = (args.namespaces, args.credentials, args.secrets());
    let limit = chart_memory_limit_kib()?;
    println!(
        "regcred scale bench: {n} namespaces × {c} ClusterRegistryCredentials = {total} Secrets, concurrency {} \
         (controller and plain client), controller --leader-elect --leader-election-duration {} \
         --resync-interval {}; chart memory limit {}",
        args.concurrency,
        args.lease_duration,
        args.resync_interval,
        kib(limit)
    );
    println!("{}", machine());
    let mut lines = Vec::new();

    let mut a = start_replica(cp, args, "a")?;
    let ready_in = a.wait_ready().await?;
    wait_leader(&mut a).await?;
    let empty = a.rss();
    println!(
        "controller a ready {:.1} s after spawn and leading; RSS {} (peak {}) with no credentials",
        ready_in.as_secs_f64(),
        kib(empty.0),
        kib(empty.1)
    );

    create_namespaces(&client, &[SOURCE_NAMESPACE.to_string()], None, 1).await?;
    let source = Api::<Secret>::namespaced(client.clone(), SOURCE_NAMESPACE);
    source.create(&PostParams::default(), &opaque(SOURCE_SECRET, "password", PASSWORD.as_bytes())).await?;
    let namespaces: Vec<String> = (0..n).map(|i| format!("scale-{i:05}")).collect();
    let started = Instant::now();
    create_namespaces(&client, &namespaces, Some(LABEL), 2 * args.concurrency).await?;
    println!("created {n} namespaces labelled bench=scale in {:.1} s", started.elapsed().as_secs_f64());
    // kube-controller-manager fills every new namespace: let it finish first.
    wait_quiet_but_leases(cp).await?;
    println!("  controller a with them (it keeps their metadata): RSS {}", kib(a.rss().0));

    // 1. Baseline.
    println!("\n1. plain client: {total} Secret creates ({c} per namespace) at concurrency {}", args.concurrency);
    let payload = regcred::dockerconfig::render(&[auth(PASSWORD)]).expose_secret().to_vec();
    let direct_selector = format!("{DIRECT_LABEL}={BASELINE_RUN}");
    let baseline = {
        let payload = &payload;
        plain_writes(&client, &namespaces, c, args.concurrency, &direct_selector, PASSWORD, |api, name| async move {
            let mut secret = pull_secret(&name, payload);
            secret.metadata.labels = Some(BTreeMap::from([(DIRECT_LABEL.into(), BASELINE_RUN.into())]));
            api.create(&PostParams::default(), &secret).await
        })
        .await?
    };
    println!(
        "  last create answered after {:.2} s, all {total} seen by the watch after {:.2} s: {:.0} writes/s",
        baseline.requests_done.as_secs_f64(),
        baseline.all_seen.as_secs_f64(),
        total as f64 / baseline.all_seen.as_secs_f64()
    );
    wait_quiet_but_leases(cp).await?;

    // 2. Sync.
    println!("\n2. regcred's initial sync: {c} ClusterRegistryCredentials selecting the {n} namespaces");
    let credentials = Api::<ClusterRegistryCredential>::all(client.clone());
    let mut audit = AuditWindow::start(cp)?;
    let reconciles_start = a.reconciles()?;
    let sampler = Sampler::start(a.process.pid());
    let from = resource_version(&client, MANAGED_BY_REGCRED).await?;
    let started = Instant::now();
    for i in 0..c {
        let credential = cluster_credential(&credential_name(i), LABEL, &regcred_secret(i))?;
        credentials.create(&PostParams::default(), &credential).await?;
    }
    let seen = watch_holding(&client, MANAGED_BY_REGCRED, PASSWORD, total, &from, started);
    let synced = statuses_synced(&credentials, c, n, started);
    let (sync_time, status_time) = match tokio::try_join!(seen, synced) {
        Ok(times) => times,
        Err(error) => return Err(error.context(a.diagnosis())),
    };
    settle_controller(cp, &mut audit, &a).await?;
    let (sync_hwm, sync_sampled) = (a.rss().1, sampler.max());
    drop(sampler);
    let sync_ratio = ratio(baseline.all_seen, sync_time);
    println!(
        "  all {total} Secrets seen by the watch after {:.2} s ({:.0} writes/s); every status reports {n} synced \
         after {:.2} s",
        sync_time.as_secs_f64(),
        total as f64 / sync_time.as_secs_f64(),
        status_time.as_secs_f64()
    );
    println!(
        "  write rate against the plain client's: {sync_ratio:.2}× (goal ≥ {SYNC_RATE_GOAL:.2}×); {} reconciles",
        a.reconciles()? - reconciles_start
    );
    println!(
        "  controller a: peak RSS (VmHWM) {}, highest sampled VmRSS {}, RSS now {}",
        kib(sync_hwm),
        kib(sync_sampled),
        kib(a.rss().0)
    );
    audit.print("  controller's requests during the sync");
    let status = credentials.get(&credential_name(0)).await?.status;
    println!("  status of {}: {}", credential_name(0), summary(status.as_ref()));
    lines.push(format!(
        "initial sync of {total} Secrets: {:.2} s against the plain client's {:.2} s = {sync_ratio:.2}× its write \
         rate (goal ≥ {SYNC_RATE_GOAL:.2}×: {})",
        sync_time.as_secs_f64(),
        baseline.all_seen.as_secs_f64(),
        met(sync_ratio >= SYNC_RATE_GOAL)
    ));
    lines.push(format!(
        "peak RSS during the sync: {} MiB VmHWM, {} MiB highest sampled VmRSS (goal < 100 MiB: {})",
        mib(sync_hwm),
        mib(sync_sampled),
        met(sync_hwm < SYNC_PEAK_GOAL_KIB)
    ));
    lines.push(format!(
        "controller writes during the sync: {} for {total} Secrets ({} without leases)",
        total_of(&audit.writes()),
        total_of(&audit.writes_but_leases())
    ));
    wait_quiet_but_leases(cp).await?;

    // 3. At rest.
    println!("\n3. at rest for {} s", args.rest_secs);
    let mut audit = AuditWindow::start(cp)?;
    let reconciles_start = a.reconciles()?;
    tokio::time::sleep(Duration::from_secs(args.rest_secs)).await;
    audit.advance(cp)?;
    let rest = audit.writes_but_leases();
    println!(
        "  controller writes (leases aside): {} {}, status patches {}; {} reconciles; lease writes {}; RSS {}",
        total_of(&rest),
        show(&rest),
        audit.status_patches(),
        a.reconciles()? - reconciles_start,
        audit.lease_writes(),
        kib(a.rss().0)
    );
    lines.push(format!(
        "at rest for {} s: {} writes, {} status patches (goal 0: {})",
        args.rest_secs,
        total_of(&rest),
        audit.status_patches(),
        met(total_of(&rest) == 0)
    ));

    // 4. Restart.
    println!("\n4. restart: SIGTERM to controller a, then a new process b");
    let stopping = Instant::now();
    a.process.terminate();
    while a.process.check_alive().is_ok() {
        ensure!(stopping.elapsed() < Duration::from_secs(60), "controller a still running 60 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  a exited {:.2} s after SIGTERM", stopping.elapsed().as_secs_f64());
    let mut audit = AuditWindow::start(cp)?;
    let started = Instant::now();
    let mut b = start_replica(cp, args, "b")?;
    let sampler = Sampler::start(b.process.pid());
    wait_leader(&mut b).await?;
    let leading = started.elapsed();
    wait_reconciled(&mut b, c).await?;
    let reconciled = started.elapsed();
    settle_controller(cp, &mut audit, &b).await?;
    let (restart_hwm, restart_sampled) = (b.rss().1, sampler.max());
    drop(sampler);
    let after_restart = audit.writes_but_leases();
    println!(
        "  b leading {:.2} s after spawn, every credential reconciled after {:.2} s; peak RSS (VmHWM) {}, highest \
         sampled VmRSS {}, RSS now {}",
        leading.as_secs_f64(),
        reconciled.as_secs_f64(),
        kib(restart_hwm),
        kib(restart_sampled),
        kib(b.rss().0)
    );
    println!(
        "  controller writes (leases aside): {} {}, status patches {}",
        total_of(&after_restart),
        show(&after_restart),
        audit.status_patches()
    );
    audit.print("  controller's requests through the restart");
    lines.push(format!(
        "peak RSS through the restart: {} MiB VmHWM, {} MiB sampled, all {c} credentials reconciled {:.1} s after \
         spawn (goal < the chart's {} MiB: {})",
        mib(restart_hwm),
        mib(restart_sampled),
        reconciled.as_secs_f64(),
        mib(limit),
        met(restart_hwm < limit)
    ));
    lines.push(format!(
        "after the restart: {} writes, {} status patches (goal 0: {})",
        total_of(&after_restart),
        audit.status_patches(),
        met(total_of(&after_restart) == 0)
    ));
    wait_quiet_but_leases(cp).await?;

    // 5. Source change.
    println!("\n5. one change of the source Secret after the restart");
    let mut audit = AuditWindow::start(cp)?;
    let reconciles_start = b.reconciles()?;
    let sampler = Sampler::start(b.process.pid());
    let from = resource_version(&client, MANAGED_BY_REGCRED).await?;
    let started = Instant::now();
    let new_password = json!({"data": {"password": base64::engine::general_purpose::STANDARD.encode(NEW_PASSWORD)}});
    source.patch(SOURCE_SECRET, &PatchParams::default(), &Patch::Merge(&new_password)).await?;
    let change_time = watch_holding(&client, MANAGED_BY_REGCRED, NEW_PASSWORD, total, &from, started)
        .await
        .map_err(|e| e.context(b.diagnosis()))?;
    settle_controller(cp, &mut audit, &b).await?;
    let change_sampled = sampler.max();
    drop(sampler);
    println!(
        "  regcred: all {total} Secrets hold the new password {:.2} s after the source patch ({} reconciles); \
         highest sampled VmRSS {}",
        change_time.as_secs_f64(),
        b.reconciles()? - reconciles_start,
        kib(change_sampled)
    );
    audit.print("  controller's requests during the change");
    wait_quiet_but_leases(cp).await?;
    let new_payload = regcred::dockerconfig::render(&[auth(NEW_PASSWORD)]).expose_secret().to_vec();
    let patch = json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(&new_payload)}});
    let direct_change = {
        let patch = &patch;
        plain_writes(
            &client,
            &namespaces,
            c,
            args.concurrency,
            &direct_selector,
            NEW_PASSWORD,
            |api, name| async move { api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await },
        )
        .await?
    };
    let merge_ratio = ratio(change_time, direct_change.all_seen);
    println!(
        "  plain client: {total} merge patches, last answered after {:.2} s, all seen after {:.2} s; regcred/plain \
         {merge_ratio:.2}×",
        direct_change.requests_done.as_secs_f64(),
        direct_change.all_seen.as_secs_f64()
    );
    wait_quiet_but_leases(cp).await?;
    // regcred writes a change with server-side apply (its creates are POSTs): the same N×C
    // writes by the plain client with that verb are the goal's baseline.
    let applied_payload = regcred::dockerconfig::render(&[auth(APPLIED_PASSWORD)]).expose_secret().to_vec();
    let direct_apply = {
        let payload = &applied_payload;
        plain_writes(
            &client,
            &namespaces,
            c,
            args.concurrency,
            &direct_selector,
            APPLIED_PASSWORD,
            |api, name| async move {
                let mut secret = pull_secret(&name, payload);
                secret.metadata.labels = Some(BTreeMap::from([(DIRECT_LABEL.into(), BASELINE_RUN.into())]));
                api.patch(&name, &PatchParams::apply("regcred-bench").force(), &Patch::Apply(&secret)).await
            },
        )
        .await?
    };
    let change_ratio = ratio(change_time, direct_apply.all_seen);
    println!(
        "  plain client: {total} server-side applies, last answered after {:.2} s, all seen after {:.2} s \
         ({:.2}× its merge patches); regcred/plain {change_ratio:.2}× (goal ≤ {CHANGE_GOAL:.1}×)",
        direct_apply.requests_done.as_secs_f64(),
        direct_apply.all_seen.as_secs_f64(),
        ratio(direct_apply.all_seen, direct_change.all_seen)
    );
    lines.push(format!(
        "one source change after the restart: all {total} Secrets in {:.2} s against the plain client's {:.2} s for \
         the same server-side applies = {change_ratio:.2}× (goal ≤ {CHANGE_GOAL:.1}×: {}); against its merge patches \
         ({:.2} s, {:.2}× faster than its applies) {merge_ratio:.2}×",
        change_time.as_secs_f64(),
        direct_apply.all_seen.as_secs_f64(),
        met(change_ratio <= CHANGE_GOAL),
        direct_change.all_seen.as_secs_f64(),
        ratio(direct_apply.all_seen, direct_change.all_seen),
    ));
    wait_quiet_but_leases(cp).await?;

    // 6. Leader failover.
    println!("\n6. leader failover: a standby c, then SIGKILL to the leader b");
    let mut standby = start_replica(cp, args, "c")?;
    standby.wait_ready().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(is_leader(&b)? && !is_leader(&standby)?, "b should lead and c stand by");
    println!("  standby c ready, not leading; its RSS {}", kib(standby.rss().0));
    let mut audit = AuditWindow::start(cp)?;
    let sampler = Sampler::start(standby.process.pid());
    let started = Instant::now();
    b.process.kill();
    wait_leader(&mut standby).await?;
    let leading = started.elapsed();
    wait_reconciled(&mut standby, c).await?;
    let reconciled = started.elapsed();
    settle_controller(cp, &mut audit, &standby).await?;
    let (failover_hwm, failover_sampled) = (standby.rss().1, sampler.max());
    drop(sampler);
    let after_failover = audit.writes_but_leases();
    println!(
        "  c leading {:.2} s after the SIGKILL (lease duration {}), every credential reconciled after {:.2} s; peak \
         RSS (VmHWM) {}, highest sampled VmRSS {}",
        leading.as_secs_f64(),
        args.lease_duration,
        reconciled.as_secs_f64(),
        kib(failover_hwm),
        kib(failover_sampled)
    );
    println!(
        "  controller writes (leases aside): {} {}, status patches {}",
        total_of(&after_failover),
        show(&after_failover),
        audit.status_patches()
    );
    audit.print("  controller's requests through the failover");
    lines.push(format!(
        "peak RSS through the leader failover: {} MiB VmHWM, {} MiB sampled (goal < the chart's {} MiB: {}); {} \
         writes, {} status patches after it (goal 0: {})",
        mib(failover_hwm),
        mib(failover_sampled),
        mib(limit),
        met(failover_hwm < limit),
        total_of(&after_failover),
        audit.status_patches(),
        met(total_of(&after_failover) == 0)
    ));

    println!("\nsummary ({n} namespaces × {c} credentials; {})", machine());
    for line in lines {
        println!("  {line}");
    }
    standby.process.check_alive()?;
    Ok(())
}

fn credential_name(i: usize) -> String {
    format!("scale-{i:02}")
}

fn regcred_secret(i: usize) -> String {
    format!("{PULL}-{i:02}")
}

fn log_name(replica: &str) -> String {
    format!("regcred-scale-{replica}.log")
}

/// A controller replica competing for the leader Lease, as the chart runs it.
fn start_replica(cp: &ControlPlane, args: &Args, replica: &str) -> anyhow::Result<Controller> {
    let flags = [
        "--concurrency".to_string(),
        args.concurrency.to_string(),
        "--resync-interval".into(),
        args.resync_interval.clone(),
        "--leader-elect".into(),
        "--leader-election-duration".into(),
        args.lease_duration.clone(),
    ];
    Controller::start(cp, &log_name(replica), &flags, &[("POD_NAME", &format!("scale-{replica}"))])
}

/// Whether the replica holds the Lease (`regcred_leader` is 1).
fn is_leader(controller: &Controller) -> anyhow::Result<bool> {
    let (code, metrics) = controller.admin_get("/metrics")?;
    ensure!(code == 200, "controller /metrics: HTTP {code}");
    Ok(metrics.lines().find_map(|l| l.strip_prefix("regcred_leader ")).and_then(|v| v.trim().parse::<f64>().ok())
        == Some(1.0))
}

async fn wait_leader(controller: &mut Controller) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        controller.process.check_alive()?;
        if matches!(is_leader(controller), Ok(true)) {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(120), "not leading in 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Until the controller has ended at least `c` reconciles of ClusterRegistryCredentials.
async fn wait_reconciled(controller: &mut Controller, c: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        controller.process.check_alive()?;
        if controller.reconciles().unwrap_or(0) >= c as u64 {
            return Ok(());
        }
        ensure!(
            started.elapsed() < PHASE_TIMEOUT,
            "fewer than {c} reconciles in {PHASE_TIMEOUT:?}; {}",
            controller.diagnosis()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the controller has made no write and ended no reconcile for 5 s.
async fn settle_controller(cp: &ControlPlane, audit: &mut AuditWindow, controller: &Controller) -> anyhow::Result<()> {
    let audit = std::sync::Mutex::new(audit);
    until_stable("the controller's writes and reconciles", || {
        let mut audit = audit.lock().unwrap();
        audit.advance(cp)?;
        Ok(total_of(&audit.writes_but_leases()) * 1_000_000 + controller.reconciles()?)
    })
    .await?;
    Ok(())
}

/// `wait_quiet`, with lease renewals (the controller's and the control plane's) aside.
async fn wait_quiet_but_leases(cp: &ControlPlane) -> anyhow::Result<()> {
    wait_quiet_counting(cp, |key| !key.contains("leases")).await
}

/// A plain client's write of Secret `direct-pull-XX` (XX in 0..c) in every namespace,
/// `concurrency` at once, timed by a watch until all of them hold `password`.
async fn plain_writes<F, W>(
    client: &Client,
    namespaces: &[String],
    c: usize,
    concurrency: usize,
    selector: &str,
    password: &str,
    write: W,
) -> anyhow::Result<DirectRun>
where
    W: Fn(Api<Secret>, String) -> F,
    F: std::future::Future<Output = kube::Result<Secret>>,
{
    let from = resource_version(client, selector).await?;
    let started = Instant::now();
    let writes = async {
        stream::iter(namespaces.iter().flat_map(|ns| (0..c).map(move |i| (ns, i))))
            .map(|(namespace, i)| {
                write(Api::<Secret>::namespaced(client.clone(), namespace), format!("direct-pull-{i:02}"))
            })
            .buffer_unordered(concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        anyhow::Ok(started.elapsed())
    };
    let seen = watch_holding(client, selector, password, namespaces.len() * c, &from, started);
    let (requests_done, all_seen) = tokio::try_join!(writes, seen)?;
    Ok(DirectRun { requests_done, all_seen })
}

/// The current resourceVersion (a one-item list of Secrets by `selector`, read from etcd).
async fn resource_version(client: &Client, selector: &str) -> anyhow::Result<String> {
    let list =
        Api::<Secret>::all(client.clone()).list_metadata(&ListParams::default().labels(selector).limit(1)).await?;
    list.metadata.resource_version.context("a list without resourceVersion")
}

/// Watches Secrets by `selector` from resourceVersion `from` until `n` of them hold `password`;
/// returns the time since `started`.
async fn watch_holding(
    client: &Client,
    selector: &str,
    password: &str,
    n: usize,
    from: &str,
    started: Instant,
) -> anyhow::Result<Duration> {
    let api = Api::<Secret>::all(client.clone());
    let (mut version, mut holding) = (from.to_string(), HashSet::new());
    loop {
        let params = WatchParams::default().labels(selector).timeout(280);
        let mut events = api.watch(&params, &version).await?.boxed();
        while let Some(event) = events.try_next().await? {
            let (secret, deleted) = match event {
                WatchEvent::Added(s) | WatchEvent::Modified(s) => (s, false),
                WatchEvent::Deleted(s) => (s, true),
                WatchEvent::Bookmark(b) => {
                    version = b.metadata.resource_version;
                    continue;
                }
                WatchEvent::Error(status) => bail!("watch of Secrets ({selector}): {status:?}"),
            };
            version = secret.metadata.resource_version.clone().unwrap_or(version);
            let key = (secret.metadata.namespace.clone(), secret.metadata.name.clone());
            if !deleted && holds(&secret, password) {
                holding.insert(key);
            } else {
                holding.remove(&key);
            }
            if holding.len() == n {
                return Ok(started.elapsed());
            }
        }
        ensure!(
            started.elapsed() < PHASE_TIMEOUT,
            "after {PHASE_TIMEOUT:?}, {} of {n} Secrets ({selector}) hold the expected password",
            holding.len()
        );
    }
}

/// Polls (every second) until every credential's status reports `n` namespaces synced.
async fn statuses_synced(
    credentials: &Api<ClusterRegistryCredential>,
    c: usize,
    n: usize,
    started: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let list = credentials.list(&ListParams::default()).await?.items;
        let synced =
            list.iter().filter(|cr| cr.status.as_ref().and_then(|s| s.synced_namespaces) == Some(n as u32)).count();
        if synced == c {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < PHASE_TIMEOUT,
            "after {PHASE_TIMEOUT:?}, {synced} of {c} credentials report {n} synced; first: {}",
            summary(list.first().and_then(|cr| cr.status.as_ref()))
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The controller's requests in the audit log from an offset on, by verb and resource, read
/// incrementally (the log holds hundreds of MB at 100,000 Secrets).
struct AuditWindow {
    offset: u64,
    requests: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct AuditEvent {
    verb: String,
    user: AuditUser,
    #[serde(rename = "objectRef")]
    object_ref: Option<AuditObject>,
}

#[derive(Deserialize)]
struct AuditUser {
    username: String,
}

#[derive(Deserialize)]
struct AuditObject {
    resource: Option<String>,
    subresource: Option<String>,
}

impl AuditWindow {
    fn start(cp: &ControlPlane) -> anyhow::Result<AuditWindow> {
        Ok(AuditWindow { offset: cp.audit_log_len()?, requests: BTreeMap::new() })
    }

    /// Counts the whole events written since the last call.
    fn advance(&mut self, cp: &ControlPlane) -> anyhow::Result<()> {
        let len = cp.audit_log_len()?;
        if len <= self.offset {
            return Ok(());
        }
        let text = cp.read_audit_log(self.offset, Some(len))?;
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        for line in text[..whole].lines() {
            let Ok(event) = serde_json::from_str::<AuditEvent>(line) else { continue };
            if event.user.username != CONTROLLER_USER {
                continue;
            }
            let (resource, sub) = event.object_ref.map_or((None, None), |o| (o.resource, o.subresource));
            let sub = sub.map(|s| format!("/{s}")).unwrap_or_default();
            *self.requests.entry(format!("{} {}{sub}", event.verb, resource.unwrap_or_default())).or_default() += 1;
        }
        self.offset += whole as u64;
        Ok(())
    }

    fn writes(&self) -> BTreeMap<String, u64> {
        self.requests
            .iter()
            .filter(|(k, _)| {
                matches!(k.split(' ').next(), Some("create" | "update" | "patch" | "delete" | "deletecollection"))
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    fn writes_but_leases(&self) -> BTreeMap<String, u64> {
        self.writes().into_iter().filter(|(k, _)| !k.ends_with(" leases")).collect()
    }

    fn lease_writes(&self) -> u64 {
        self.writes().iter().filter(|(k, _)| k.ends_with(" leases")).map(|(_, v)| v).sum()
    }

    fn status_patches(&self) -> u64 {
        self.requests
            .iter()
            .filter(|(k, _)| k.ends_with("/status") && !k.starts_with("get ") && !k.starts_with("list "))
            .map(|(_, v)| v)
            .sum()
    }

    fn print(&self, what: &str) {
        println!("{what} (audit log, every verb): {}", show(&self.requests));
    }
}

fn total_of(counts: &BTreeMap<String, u64>) -> u64 {
    counts.values().sum()
}

/// The highest VmRSS of a process, read from /proc every 100 ms until dropped.
struct Sampler {
    max: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let max = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let max = max.clone();
            async move {
                loop {
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let rss = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    max.fetch_max(rss, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Sampler { max, task }
    }

    fn max(&self) -> u64 {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `resources.limits.memory` in charts/regcred/values.yaml, in KiB.
fn chart_memory_limit_kib() -> anyhow::Result<u64> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/regcred/values.yaml");
    let values = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let limits = values.split_once("\n  limits:").context("no resources.limits in the chart's values")?.1;
    let memory = limits
        .lines()
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .find_map(|l| l.trim().strip_prefix("memory:"))
        .context("no resources.limits.memory in the chart's values")?
        .trim();
    let (number, unit) = memory.split_at(memory.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(memory.len()));
    let number: u64 = number.parse().with_context(|| format!("memory limit {memory}"))?;
    Ok(match unit {
        "Ki" => number,
        "Mi" => number * 1024,
        "Gi" => number * 1024 * 1024,
        _ => bail!("memory limit {memory}: unit not understood"),
    })
}
