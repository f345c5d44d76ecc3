//! An ECR token rotation across many namespaces, unpaced and paced (issue 20, item 14: "an ECR
//! rotation of 10,000 Secrets is paced (configurable client QPS, jitter) so it does not starve
//! other apiserver clients; measure its write rate"), against the real local control plane and
//! the strict AWS emulator. Not a test: it prints a report.
//!
//!   cargo bench --bench rotation                                   # 1,000 namespaces, 50 writes/s
//!   cargo bench --bench rotation -- --namespaces 100 --qps 20      # a smoke run
//!
//! Flags (environment; default): `--namespaces` (REGCRED_BENCH_NAMESPACES; 1000), `--qps`
//! (REGCRED_BENCH_QPS; 50: the paced controller's `--write-qps`), `--burst` (50: its
//! `--write-burst`, the chart's default), `--concurrency` (REGCRED_BENCH_CONCURRENCY; 8: the
//! controllers'), `--refresh-after` (seconds from a token's issue to its refresh; 60 + N/40),
//! `--probe-secs` (10: the other client's window at rest before each rotation).
//!
//! One ClusterRegistryCredential with an ECR source (static access keys registered at the
//! emulator, in a Secret of the platform namespace) selects the N namespaces. The emulator's
//! tokens live `refresh-after` plus a margin (3 × N/Q, at least 120 s), and the controllers run
//! with the `--ecr-refresh-share` that makes the refresh fall due `refresh-after` seconds after
//! issue (less the controller's own jitter, up to 5 % of the lifetime), so the old token stays
//! valid through the paced rotation, as a real 12 h token does through one of 10,000 Secrets.
//!
//! 1. unpaced (the baseline): a release-build controller without `--write-qps` syncs the N
//!    namespaces, rests until the refresh, and rotates the token in all N Secrets; then it stops;
//! 2. paced: a new controller with `--write-qps Q --write-burst B` takes over (it reuses the
//!    live token, whose digest the status recorded: no writes), and rotates the next token.
//!
//! For each rotation, from the apiserver's audit log (the controller's user, creates and patches
//! of Secrets, `requestReceivedTimestamp`): the writes, their span, writes/s overall and the
//! most in any 1-s window (goals, paced: at most Q + B in any second, overall within 10 % of Q
//! when N ≥ 10·B);
//! and the latency (p50, p99, max) of another client, a different user under RBAC, that GETs
//! and merge-patches one ConfigMap in a loop (a 50 ms pause between rounds) during the rotation,
//! against the same client at rest just before it. After each rotation, one list checks that all
//! N Secrets hold the token the emulator issued last, and the emulator's counts that it took one
//! GetAuthorizationToken.

#[allow(dead_code)]
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Secret},
        rbac::v1::{Role, RoleBinding},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use regcred::crd::ClusterRegistryCredential;
use regcred_testenv::{AwsEmulator, CONTROLLER_USER, ControlPlane};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use support::*;

const CREDENTIAL: &str = "rotation";
const LABEL: (&str, &str) = ("bench", "rotation");
const ECR_REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
const KEYS_SECRET: &str = "aws-keys";
const KEY_ID: &str = "AKIAROTATIONBENCH001";
/// The other client: a user of its own, allowed to get and patch one ConfigMap.
const OTHER_USER: &str = "regcred-bench-other-client";
const OTHER_CONFIGMAP: &str = "other-client";
const PROBE_PAUSE: Duration = Duration::from_millis(50);
/// Goal (issue 20, item 14, as set for this bench): the paced rotation's overall rate within
/// this share of `--write-qps`.
const RATE_TOLERANCE: f64 = 0.10;

struct Args {
    namespaces: usize,
    qps: f64,
    burst: u32,
    concurrency: usize,
    refresh_after: Option<u64>,
    probe_secs: u64,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let env = |name: &str| std::env::var(name).ok();
        let mut args = Args {
            namespaces: env("REGCRED_BENCH_NAMESPACES")
                .map_or(Ok(1000), |v| parse_flag("REGCRED_BENCH_NAMESPACES", &v))?,
            qps: env("REGCRED_BENCH_QPS").map_or(Ok(50.0), |v| parse_flag("REGCRED_BENCH_QPS", &v))?,
            burst: 50,
            concurrency: env("REGCRED_BENCH_CONCURRENCY")
                .map_or(Ok(8), |v| parse_flag("REGCRED_BENCH_CONCURRENCY", &v))?,
            refresh_after: None,
            probe_secs: 10,
        };
        for (flag, value) in flag_pairs()? {
            match flag.as_str() {
                "--namespaces" => args.namespaces = parse_flag(&flag, &value)?,
                "--qps" => args.qps = parse_flag(&flag, &value)?,
                "--burst" => args.burst = parse_flag(&flag, &value)?,
                "--concurrency" => args.concurrency = parse_flag(&flag, &value)?,
                "--refresh-after" => args.refresh_after = Some(parse_flag(&flag, &value)?),
                "--probe-secs" => args.probe_secs = parse_flag(&flag, &value)?,
                _ => bail!(
                    "unknown flag {flag}; known: --namespaces, --qps, --burst, --concurrency, --refresh-after, \
                     --probe-secs"
                ),
            }
        }
        ensure!(
            args.namespaces > 0 && args.qps > 0.0 && args.burst > 0 && args.concurrency > 0,
            "--namespaces, --qps, --burst and --concurrency must be positive"
        );
        Ok(args)
    }

    /// Seconds from a token's issue to its refresh: long enough for the unpaced initial sync
    /// and the window at rest.
    fn refresh_after(&self) -> u64 {
        self.refresh_after.unwrap_or(60 + self.namespaces as u64 / 40)
    }

    /// Seconds a token stays valid after its refresh falls due: room for the paced rotation.
    fn margin(&self) -> u64 {
        ((3.0 * self.namespaces as f64 / self.qps).ceil() as u64).max(120)
    }

    fn lifetime(&self) -> u64 {
        self.refresh_after() + self.margin()
    }

    /// `--ecr-refresh-share`: the share of the lifetime left at the refresh.
    fn refresh_share(&self) -> f64 {
        self.margin() as f64 / self.lifetime() as f64
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let aws = AwsEmulator::start_with_lifetime(args.lifetime())?;
    let result = run(&cp, &aws, &args).await;
    // The control plane's dir goes when `cp` drops: keep the controllers' logs.
    for phase in ["unpaced", "paced"] {
        let kept = std::env::temp_dir().join(format!("regcred-bench-{}", log_name(phase)));
        if std::fs::copy(cp.dir().join(log_name(phase)), &kept).is_ok() {
            eprintln!("the {phase} controller's log kept in {}", kept.display());
        }
    }
    result
}

async fn run(cp: &ControlPlane, aws: &AwsEmulator, args: &Args) -> anyhow::Result<()> {
    let client = cp.client().await;
    let n = args.namespaces;
    println!(
        "regcred rotation bench: one ECR ClusterRegistryCredential selecting {n} namespaces, concurrency {}; \
         paced: --write-qps {} --write-burst {}; emulator tokens live {} s, --ecr-refresh-share {:.3} (refresh \
         {} s after issue, less up to {:.0} s of jitter)",
        args.concurrency,
        args.qps,
        args.burst,
        args.lifetime(),
        args.refresh_share(),
        args.refresh_after(),
        0.05 * args.lifetime() as f64
    );
    println!("{}", machine());

    // The platform namespace: the access keys, and the other client's ConfigMap and RBAC.
    create_namespaces(&client, &[SOURCE_NAMESPACE.to_string()], None, 1).await?;
    let secret_key = "rotation-bench-secret-access-key";
    aws.add_access_key("rotation-bench", KEY_ID, secret_key)?;
    let mut keys = opaque(KEYS_SECRET, "accessKeyId", KEY_ID.as_bytes());
    keys.data.as_mut().unwrap().insert("secretAccessKey".into(), k8s_openapi::ByteString(secret_key.into()));
    Api::<Secret>::namespaced(client.clone(), SOURCE_NAMESPACE).create(&PostParams::default(), &keys).await?;
    let other = other_client(cp, &client).await?;
    let namespaces: Vec<String> = (0..n).map(|i| format!("rotation-{i:05}")).collect();
    let started = Instant::now();
    create_namespaces(&client, &namespaces, Some(LABEL), 2 * args.concurrency).await?;
    println!("created {n} namespaces labelled bench=rotation in {:.1} s", started.elapsed().as_secs_f64());
    wait_quiet_counting(cp, |key| !key.contains("leases")).await?;

    println!("\n1. unpaced (baseline): a controller without --write-qps");
    let unpaced = phase(cp, aws, &client, &other, args, "unpaced", &[]).await?;
    unpaced.print();
    wait_quiet_counting(cp, |key| !key.contains("leases")).await?;

    println!("\n2. paced: a new controller with --write-qps {} --write-burst {}", args.qps, args.burst);
    let pacing = ["--write-qps".to_string(), args.qps.to_string(), "--write-burst".into(), args.burst.to_string()];
    let paced = phase(cp, aws, &client, &other, args, "paced", &pacing).await?;
    paced.print();

    let (q, b) = (args.qps, f64::from(args.burst));
    let (rate, max) = (paced.rate(), paced.max_per_second());
    println!("\nsummary ({n} namespaces; {})", machine());
    println!(
        "  unpaced rotation: {} Secret writes in {:.2} s, {:.1} writes/s overall, at most {} in any 1 s",
        unpaced.writes.len(),
        unpaced.span(),
        unpaced.rate(),
        unpaced.max_per_second()
    );
    println!(
        "  paced rotation (--write-qps {q} --write-burst {b}): {} Secret writes in {:.2} s, {rate:.1} writes/s \
         overall = {:.2}× Q (goal within {:.0} % of Q: {}; a burst of B then Q a second gives Q·N/(N−B) = {:.1}), \
         at most {max} in any 1 s (goal ≤ Q + B = {}: {})",
        paced.writes.len(),
        paced.span(),
        rate / q,
        RATE_TOLERANCE * 100.0,
        // With N not well above B the burst is most of the rotation: no rate to hold to Q.
        if n as f64 >= 10.0 * b { met((rate / q - 1.0).abs() <= RATE_TOLERANCE) } else { "n/a, N < 10·B" },
        q * n as f64 / (n as f64 - b).max(1.0),
        q + b,
        met(max as f64 <= q + b)
    );
    println!(
        "  paced against unpaced: {:.2}× the time, {:.2}× the overall rate, {:.2}× the busiest second",
        paced.span() / unpaced.span(),
        rate / unpaced.rate(),
        max as f64 / unpaced.max_per_second() as f64
    );
    for (what, pick) in [("GET", 0), ("PATCH", 1)] {
        let line = |r: &Rotation| {
            let (idle, busy) = (Latencies::of(&r.idle, pick), Latencies::of(&r.during, pick));
            format!(
                "p50 {} p99 {} ms ({:.2}×, {:.2}× at rest)",
                ms(busy.p50),
                ms(busy.p99),
                busy.p50.as_secs_f64() / idle.p50.as_secs_f64(),
                busy.p99.as_secs_f64() / idle.p99.as_secs_f64()
            )
        };
        println!("  other client's {what} during the rotation: unpaced {}; paced {}", line(&unpaced), line(&paced));
    }
    Ok(())
}

/// A Role that lets [`OTHER_USER`] get and patch its ConfigMap, the ConfigMap, and a client
/// impersonating that user: another apiserver client than the controller (not in
/// `system:masters`).
async fn other_client(cp: &ControlPlane, admin: &Client) -> anyhow::Result<Client> {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": OTHER_USER, "namespace": SOURCE_NAMESPACE},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [OTHER_CONFIGMAP],
                   "verbs": ["get", "patch"]}],
    }))?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": OTHER_USER, "namespace": SOURCE_NAMESPACE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OTHER_USER},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OTHER_USER}],
    }))?;
    let configmap: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": OTHER_CONFIGMAP, "namespace": SOURCE_NAMESPACE}, "data": {"round": "0"},
    }))?;
    let pp = PostParams::default();
    Api::<Role>::namespaced(admin.clone(), SOURCE_NAMESPACE).create(&pp, &role).await?;
    Api::<RoleBinding>::namespaced(admin.clone(), SOURCE_NAMESPACE).create(&pp, &binding).await?;
    Api::<ConfigMap>::namespaced(admin.clone(), SOURCE_NAMESPACE).create(&pp, &configmap).await?;
    let other = Client::try_from(cp.kube_config_as(OTHER_USER, &[]))?;
    // RBAC's cache may take a moment to see the binding.
    let api = Api::<ConfigMap>::namespaced(other.clone(), SOURCE_NAMESPACE);
    let started = Instant::now();
    while let Err(error) = api.get(OTHER_CONFIGMAP).await {
        ensure!(started.elapsed() < Duration::from_secs(30), "the other client cannot read its ConfigMap: {error}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(other)
}

fn log_name(phase: &str) -> String {
    format!("regcred-rotation-{phase}.log")
}

/// What one rotation measured.
struct Rotation {
    label: &'static str,
    /// When the apiserver received each of the controller's Secret writes (2xx), in order.
    writes: Vec<Timestamp>,
    /// The controller's requests in the rotation's window, by verb, resource and status code.
    requests: BTreeMap<String, u64>,
    refresh_at: Timestamp,
    /// The other client's rounds at rest before the rotation, and during it.
    idle: Vec<Probe>,
    during: Vec<Probe>,
    token_calls: u64,
    startup: String,
}

impl Rotation {
    fn span(&self) -> f64 {
        match (self.writes.first(), self.writes.last()) {
            (Some(first), Some(last)) => last.duration_since(*first).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn rate(&self) -> f64 {
        self.writes.len() as f64 / self.span().max(1e-3)
    }

    /// The most writes received in any 1-s window.
    fn max_per_second(&self) -> usize {
        let (mut max, mut start) = (0, 0);
        for end in 0..self.writes.len() {
            while self.writes[end].duration_since(self.writes[start]).as_secs_f64() >= 1.0 {
                start += 1;
            }
            max = max.max(end + 1 - start);
        }
        max
    }

    /// Writes received in each second after the first one.
    fn per_second(&self) -> Vec<usize> {
        let Some(first) = self.writes.first() else { return Vec::new() };
        let mut seconds = vec![0; self.span() as usize + 1];
        for write in &self.writes {
            seconds[write.duration_since(*first).as_secs_f64() as usize] += 1;
        }
        seconds
    }

    fn print(&self) {
        let first = self.writes.first().map_or(0.0, |f| f.duration_since(self.refresh_at).as_secs_f64());
        println!(
            "  rotation ({}): first Secret write {first:.2} s after the refresh fell due ({}), {} Secret writes in \
             {:.2} s: {:.1} writes/s, at most {} in any 1 s; {} GetAuthorizationToken",
            self.label,
            self.refresh_at,
            self.writes.len(),
            self.span(),
            self.rate(),
            self.max_per_second(),
            self.token_calls
        );
        println!("  writes in each second from the first: {:?}", self.per_second());
        println!("  controller's requests in the window (audit log, verb resource code): {:?}", self.requests);
        for (what, pick) in [("GET", 0), ("PATCH", 1)] {
            let (idle, busy) = (Latencies::of(&self.idle, pick), Latencies::of(&self.during, pick));
            println!(
                "  other client's {what}: at rest {} rounds, p50 {} p99 {} max {} ms; during the rotation {} rounds, \
                 p50 {} p99 {} max {} ms",
                idle.count,
                ms(idle.p50),
                ms(idle.p99),
                ms(idle.max),
                busy.count,
                ms(busy.p50),
                ms(busy.p99),
                ms(busy.max)
            );
        }
        println!("  {}", self.startup);
    }
}

/// One round of the other client: when it began, and how long its GET and its PATCH took.
#[derive(Clone, Copy)]
struct Probe {
    at: Timestamp,
    get: Duration,
    patch: Duration,
}

struct Latencies {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latencies {
    /// Nearest-rank percentiles of the GETs (`pick` 0) or the PATCHes (1).
    fn of(probes: &[Probe], pick: usize) -> Latencies {
        let mut times: Vec<Duration> = probes.iter().map(|p| if pick == 0 { p.get } else { p.patch }).collect();
        times.sort();
        let rank = |p: f64| {
            times.get(((p * times.len() as f64).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default()
        };
        Latencies {
            count: times.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: times.last().copied().unwrap_or_default(),
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The other client's loop (GET, merge patch, 50 ms pause) until `stop` is set.
fn start_probe(other: &Client, stop: Arc<Mutex<bool>>) -> tokio::task::JoinHandle<anyhow::Result<Vec<Probe>>> {
    let api = Api::<ConfigMap>::namespaced(other.clone(), SOURCE_NAMESPACE);
    tokio::spawn(async move {
        let mut probes = Vec::new();
        while !*stop.lock().unwrap() {
            let at = Timestamp::now();
            let started = Instant::now();
            api.get(OTHER_CONFIGMAP).await?;
            let get = started.elapsed();
            let started = Instant::now();
            let patch = json!({"data": {"round": probes.len().to_string()}});
            api.patch(OTHER_CONFIGMAP, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            probes.push(Probe { at, get, patch: started.elapsed() });
            tokio::time::sleep(PROBE_PAUSE).await;
        }
        Ok(probes)
    })
}

/// Runs the other client for `length`.
async fn probe_for(other: &Client, length: Duration) -> anyhow::Result<Vec<Probe>> {
    let stop = Arc::new(Mutex::new(false));
    let task = start_probe(other, stop.clone());
    tokio::time::sleep(length).await;
    *stop.lock().unwrap() = true;
    task.await?
}

/// One controller from start to stop: the credential's sync (the first phase creates it),
/// a window at rest, then the token refresh and its rotation of all N Secrets.
async fn phase(
    cp: &ControlPlane,
    aws: &AwsEmulator,
    client: &Client,
    other: &Client,
    args: &Args,
    label: &'static str,
    extra: &[String],
) -> anyhow::Result<Rotation> {
    let n = args.namespaces;
    let credentials = Api::<ClusterRegistryCredential>::all(client.clone());
    let mut flags = vec![
        "--concurrency".to_string(),
        args.concurrency.to_string(),
        "--resync-interval".into(),
        "1h".into(),
        "--ecr-refresh-share".into(),
        format!("{:.4}", args.refresh_share()),
        "--aws-endpoint-url".into(),
        aws.endpoint(),
    ];
    flags.extend(extra.iter().cloned());
    let endpoint = aws.endpoint();
    let start_offset = cp.audit_log_len()?;
    let start_calls = token_calls(aws)?;
    let mut controller = Controller::start(cp, &log_name(label), &flags, &[("AWS_ENDPOINT_URL", &endpoint)])?;
    let ready_in = controller.wait_ready().await?;
    // The controller's writes, GetAuthorizationToken calls and reconciles from its start on.
    let counts = |end: u64, controller: &Controller| -> anyhow::Result<String> {
        Ok(format!(
            "controller writes {}, {} GetAuthorizationToken, {} reconciles",
            show(&controller_writes(cp, start_offset, end)?),
            token_calls(aws)? - start_calls,
            controller.reconciles()?
        ))
    };
    let startup = if credentials.get_opt(CREDENTIAL).await?.is_none() {
        let started = Instant::now();
        credentials.create(&PostParams::default(), &ecr_credential()?).await?;
        loop {
            let status = credentials.get(CREDENTIAL).await?.status;
            if status.as_ref().and_then(|s| s.synced_namespaces) == Some(n as u32) {
                break;
            }
            ensure!(
                started.elapsed() < PHASE_TIMEOUT,
                "status never reported {n} synced: {}; {}",
                summary(status.as_ref()),
                controller.diagnosis()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let synced = started.elapsed();
        let end = settle(cp, start_offset).await?;
        format!(
            "the credential's initial sync: {n} synced {:.2} s after its creation (controller ready {:.1} s after \
             spawn); {}",
            synced.as_secs_f64(),
            ready_in.as_secs_f64(),
            counts(end, &controller)?
        )
    } else {
        // The credential exists: the new controller reconciles it once and should write nothing.
        let started = Instant::now();
        while controller.reconciles()? < 1 {
            ensure!(started.elapsed() < Duration::from_secs(60), "no reconcile in 60 s; {}", controller.diagnosis());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let end = settle(cp, start_offset).await?;
        format!(
            "taking over (ready {:.1} s after spawn): {} (none of either: the live token is reused)",
            ready_in.as_secs_f64(),
            counts(end, &controller)?
        )
    };
    let status = credentials.get(CREDENTIAL).await?.status.context("no status")?;
    let refresh_at = status.credential.next_refresh_at.as_ref().context("no nextRefreshAt in the status")?.0;
    let before = one_password(client).await?;
    let until_refresh = |now: Timestamp| refresh_at.duration_since(now).as_secs_f64();
    ensure!(
        until_refresh(Timestamp::now()) > 5.0,
        "the refresh falls due at {refresh_at}, {:.1} s from now: raise --refresh-after",
        until_refresh(Timestamp::now())
    );

    // At rest: the other client alone, until 3 s before the refresh.
    let rest = args.probe_secs.min((until_refresh(Timestamp::now()) - 3.0).max(0.0) as u64);
    let idle = probe_for(other, Duration::from_secs(rest)).await?;
    let wait = until_refresh(Timestamp::now()) - 2.0;
    if wait > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }

    // The rotation: the other client runs while the audit log is read every second, until the
    // controller has written N Secrets and then nothing for 5 s.
    let token_calls_before = token_calls(aws)?;
    let offset = cp.audit_log_len()?;
    let stop = Arc::new(Mutex::new(false));
    let probe = start_probe(other, stop.clone());
    let deadline = Instant::now() + Duration::from_secs(120) + Duration::from_secs_f64(3.0 * n as f64 / args.qps);
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        controller.process.check_alive()?;
        let writes = secret_writes(cp, offset, cp.audit_log_len()?)?.0.len();
        if writes != seen {
            (seen, since) = (writes, Instant::now());
        } else if writes >= n && since.elapsed() >= Duration::from_secs(5) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{writes} of {n} Secrets rewritten by the deadline; {}",
            controller.diagnosis()
        );
    }
    *stop.lock().unwrap() = true;
    let probes = probe.await??;
    let (writes, requests) = secret_writes(cp, offset, cp.audit_log_len()?)?;
    let token_calls = token_calls(aws)? - token_calls_before;
    controller.process.terminate();
    let stopping = Instant::now();
    while controller.process.check_alive().is_ok() {
        ensure!(stopping.elapsed() < Duration::from_secs(60), "the {label} controller still runs 60 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every Secret holds the emulator's last token, and none the one before.
    let issued = last_issued_password(aws)?;
    let passwords = passwords(client).await?;
    ensure!(
        passwords.len() == n && passwords.values().all(|p| *p == issued) && issued != before,
        "after the {label} rotation, {} of {n} Secrets hold the last token issued ({} distinct passwords; the one \
         before the rotation in {})",
        passwords.values().filter(|p| **p == issued).count(),
        passwords.values().collect::<BTreeSet<_>>().len(),
        passwords.values().filter(|p| **p == before).count()
    );
    let (first, last) = (writes.first().copied(), writes.last().copied());
    let window = |p: &&Probe| first.is_some_and(|f| p.at >= f) && last.is_some_and(|l| p.at <= l);
    let during = probes.iter().filter(window).copied().collect();
    Ok(Rotation { label, writes, requests, refresh_at, idle, during, token_calls, startup })
}

/// The ClusterRegistryCredential: ECR with the access keys in the platform namespace.
fn ecr_credential() -> anyhow::Result<ClusterRegistryCredential> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "ClusterRegistryCredential",
        "metadata": {"name": CREDENTIAL},
        "spec": {
            "source": {"ecr": {"registry": ECR_REGISTRY,
                               "auth": {"secretRef": {"name": KEYS_SECRET, "namespace": SOURCE_NAMESPACE}}}},
            "namespaces": {"selector": {"matchLabels": {LABEL.0: LABEL.1}}},
            "secret": {"name": PULL},
        },
    }))?)
}

/// The controller's Secret writes between two audit log offsets: when the apiserver received
/// each one that succeeded, in order; and all its requests there by verb, resource and code.
fn secret_writes(cp: &ControlPlane, from: u64, to: u64) -> anyhow::Result<(Vec<Timestamp>, BTreeMap<String, u64>)> {
    let text = cp.read_audit_log(from, Some(to))?;
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    let (mut writes, mut requests) = (Vec::new(), BTreeMap::new());
    for event in text[..whole].lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        if event["user"]["username"] != CONTROLLER_USER || event["stage"] != "ResponseComplete" {
            continue;
        }
        let code = event["responseStatus"]["code"].as_u64().unwrap_or_default();
        *requests.entry(format!("{} {code}", request_key(&event))).or_default() += 1;
        let write = matches!(event["verb"].as_str(), Some("create" | "patch" | "update"));
        if write && event["objectRef"]["resource"] == "secrets" && (200..300).contains(&code) {
            let at = event["requestReceivedTimestamp"].as_str().context("an audit event without its time")?;
            writes.push(at.parse::<Timestamp>()?);
        }
    }
    writes.sort();
    Ok((writes, requests))
}

fn token_calls(aws: &AwsEmulator) -> anyhow::Result<u64> {
    Ok(aws.counts()?.get("ecr:GetAuthorizationToken").copied().unwrap_or(0))
}

/// The password of the last token GetAuthorizationToken issued.
fn last_issued_password(aws: &AwsEmulator) -> anyhow::Result<String> {
    let calls = aws.calls()?;
    let call = calls
        .iter()
        .rev()
        .find(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200)
        .context("no token issued")?;
    let token = call["authorizationData"][0]["authorizationToken"].as_str().context("no token in the call")?;
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(token)?)?;
    Ok(decoded.strip_prefix("AWS:").context("not AWS:<password>")?.to_string())
}

/// The password in each of regcred's Secrets, by namespace (one list).
async fn passwords(client: &Client) -> anyhow::Result<BTreeMap<String, String>> {
    let secrets = Api::<Secret>::all(client.clone()).list(&ListParams::default().labels(MANAGED_BY_REGCRED)).await?;
    let mut passwords = BTreeMap::new();
    for secret in secrets.items {
        let config = secret.data.as_ref().and_then(|d| d.get(".dockerconfigjson")).context("no .dockerconfigjson")?;
        let auths = regcred::dockerconfig::parse(&config.0)?;
        let password = auths.first().context("no login")?.password.expose_secret().to_string();
        passwords.insert(secret.metadata.namespace.unwrap_or_default(), password);
    }
    Ok(passwords)
}

async fn one_password(client: &Client) -> anyhow::Result<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), "rotation-00000").get(PULL).await?;
    let config = secret.data.as_ref().and_then(|d| d.get(".dockerconfigjson")).context("no .dockerconfigjson")?;
    let auths = regcred::dockerconfig::parse(&config.0)?;
    Ok(auths.first().context("no login")?.password.expose_secret().to_string())
}
