//! What the controller's core costs at scale (issue 11), against the real local control plane,
//! each figure next to a baseline from the same run. Not a test: it prints a report.
//!
//!   cargo bench --bench core                                      # 1,000 namespaces, 5 rounds
//!   cargo bench --bench core -- --namespaces 50 --rounds 2        # a smoke run
//!
//! Flags (default): `--namespaces` (1000: the fan-out and the burst), `--rounds` (5),
//! `--burst-credentials` (10), `--burst-concurrency` (100: namespace creates in flight),
//! `--ecr-credentials` (100), `--ecr-token-secs` (120: the emulator's token lifetime),
//! `--ecr-refresh-share` (0.5: the controller's), `--concurrency` (8: the controller's and every
//! baseline's), `--phases` (memory,burst,ecr), `--controller-env NAME=VALUE` (none; repeatable:
//! the controller's environment, e.g. `MALLOC_ARENA_MAX=1` to see what the allocator keeps).
//!
//! One controller process (the release build `cargo bench` makes) serves every phase.
//!
//! 1. memory across rounds: a ClusterRegistryCredential fans out to N namespaces, all N Secrets
//!    exist, it is deleted and the garbage collector removes them; VmRSS and VmHWM after each
//!    round, against the controller ready with no credentials;
//! 2. the same rounds time the fan-out against a plain client creating the same N Secrets at
//!    the same concurrency just before (median of the rounds each);
//! 3. burst: ClusterRegistryCredentials select `bench=burst`, then N such namespaces are created
//!    at once: the controller's requests per namespace (audit log) by verb, and the time until
//!    all Secrets exist against a plain client writing the same Secrets into another burst of N
//!    new namespaces;
//! 4. read amplification: RegistryCredentials with ECR access keys: the controller's Secret
//!    GETs per credential and per reconcile, over their first sync and over one token refresh.

#[allow(dead_code)]
mod support;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use futures::{StreamExt, TryStreamExt, channel::mpsc, stream};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, ObjectMeta, PostParams},
    core::PartialObjectMeta,
    runtime::watcher,
};
use regcred::crd::{ClusterRegistryCredential, RegistryCredential};
use regcred_testenv::{AwsEmulator, CONTROLLER_USER, ControlPlane};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use support::*;

const CONTROLLER_LOG: &str = "regcred-core-bench.log";
/// Selects the rounds' namespaces (the same label `regcred_fan_out`'s credential selects).
const ROUNDS_LABEL: (&str, &str) = ("bench", "fanout");
const BURST_LABEL: (&str, &str) = ("bench", "burst");
/// The baseline's burst: namespaces no credential selects.
const BURST_DIRECT_LABEL: (&str, &str) = ("bench", "burst-direct");
const DIRECT_PULL: &str = "direct-pull";
const ECR_NAMESPACE: &str = "ecr-reads";
const ECR_REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
/// One access key for every keys Secret: one identity, so one cached token for all.
const ECR_KEY_ID: &str = "AKIABENCHREADS000001";
const ECR_SECRET_KEY: &str = "bench-secret-key";
/// The memory goal.
const MEMORY_GOAL_KIB: u64 = 40 * 1024;

struct Args {
    namespaces: usize,
    rounds: usize,
    burst_credentials: usize,
    burst_concurrency: usize,
    ecr_credentials: usize,
    ecr_token_secs: u64,
    ecr_refresh_share: String,
    concurrency: usize,
    phases: Vec<String>,
    controller_env: Vec<(String, String)>,
}

impl Args {
    const PHASES: [&str; 3] = ["memory", "burst", "ecr"];

    fn parse() -> anyhow::Result<Args> {
        let mut args = Args {
            namespaces: 1000,
            rounds: 5,
            burst_credentials: 10,
            burst_concurrency: 100,
            ecr_credentials: 100,
            ecr_token_secs: 120,
            ecr_refresh_share: "0.5".into(),
            concurrency: 8,
            phases: Self::PHASES.map(String::from).to_vec(),
            controller_env: Vec::new(),
        };
        for (flag, value) in flag_pairs()? {
            let number = || parse_flag::<usize>(&flag, &value);
            match flag.as_str() {
                "--namespaces" => args.namespaces = number()?,
                "--rounds" => args.rounds = number()?,
                "--burst-credentials" => args.burst_credentials = number()?,
                "--burst-concurrency" => args.burst_concurrency = number()?,
                "--ecr-credentials" => args.ecr_credentials = number()?,
                "--ecr-token-secs" => args.ecr_token_secs = number()? as u64,
                "--ecr-refresh-share" => args.ecr_refresh_share = value,
                "--concurrency" => args.concurrency = number()?,
                "--phases" => args.phases = value.split(',').map(String::from).collect(),
                "--controller-env" => {
                    let (name, value) = value.split_once('=').context("--controller-env wants NAME=VALUE")?;
                    args.controller_env.push((name.into(), value.into()));
                }
                _ => bail!(
                    "unknown flag {flag}; known: --namespaces, --rounds, --burst-credentials, --burst-concurrency, \
                     --ecr-credentials, --ecr-token-secs, --ecr-refresh-share, --concurrency, --phases, \
                     --controller-env"
                ),
            }
        }
        for phase in &args.phases {
            ensure!(Self::PHASES.contains(&phase.as_str()), "unknown phase {phase}; known: {:?}", Self::PHASES);
        }
        ensure!(
            [args.namespaces, args.rounds, args.burst_credentials, args.burst_concurrency, args.ecr_credentials]
                .iter()
                .chain([&args.concurrency])
                .all(|&n| n > 0),
            "sizes and concurrencies must be positive"
        );
        Ok(args)
    }

    fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let aws = match args.runs("ecr") {
        true => {
            let aws = AwsEmulator::start_with_lifetime(args.ecr_token_secs)?;
            // The emulator checks signatures: the keys of keys_secret are an IAM user's.
            aws.add_access_key("bench", ECR_KEY_ID, ECR_SECRET_KEY)?;
            Some(aws)
        }
        false => None,
    };
    let result = run(&cp, aws.as_ref(), &args).await;
    // The control plane's dir goes when `cp` drops: keep the controller's log for a look afterwards.
    let kept = std::env::temp_dir().join("regcred-bench-core-controller.log");
    if std::fs::copy(cp.dir().join(CONTROLLER_LOG), &kept).is_ok() {
        eprintln!("controller log kept in {}", kept.display());
    }
    result
}

async fn run(cp: &ControlPlane, aws: Option<&AwsEmulator>, args: &Args) -> anyhow::Result<()> {
    let client = cp.client().await;
    println!(
        "regcred core bench: {} namespaces, {} rounds, {} burst credentials ({} namespace creates in flight), {} ECR \
         credentials (tokens live {} s, --ecr-refresh-share {}), concurrency {} (controller and baselines), \
         controller environment {:?}",
        args.namespaces,
        args.rounds,
        args.burst_credentials,
        args.burst_concurrency,
        args.ecr_credentials,
        args.ecr_token_secs,
        args.ecr_refresh_share,
        args.concurrency,
        args.controller_env
    );
    println!("{}", machine());

    let mut flags = vec!["--concurrency".to_string(), args.concurrency.to_string()];
    flags.extend(["--ecr-refresh-share".into(), args.ecr_refresh_share.clone()]);
    if let Some(aws) = aws {
        flags.extend(["--aws-endpoint-url".into(), aws.endpoint()]);
    }
    let env: Vec<(&str, &str)> = args.controller_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut controller = Controller::start(cp, CONTROLLER_LOG, &flags, &env)?;
    let ready_in = controller.wait_ready().await?;
    wait_quiet(cp).await?;
    let empty = Memory::of(&controller);
    println!(
        "controller ready (/readyz 200) {:.1} s after spawn; with no credentials: {empty}",
        ready_in.as_secs_f64()
    );

    create_namespaces(&client, &[SOURCE_NAMESPACE.to_string()], None, 1).await?;
    Api::<Secret>::namespaced(client.clone(), SOURCE_NAMESPACE)
        .create(&PostParams::default(), &opaque(SOURCE_SECRET, "password", PASSWORD.as_bytes()))
        .await?;

    let mut summary = Vec::new();
    if args.runs("memory") {
        summary.extend(rounds(cp, &client, &mut controller, args, empty).await?);
    }
    if args.runs("burst") {
        summary.extend(burst(cp, &client, &mut controller, args).await?);
    }
    if let Some(aws) = aws {
        summary.extend(read_amplification(cp, &client, &controller, aws, args).await?);
    }
    println!("\nsummary ({})", machine());
    for line in summary {
        println!("  {line}");
    }
    controller.process.check_alive()?;
    Ok(())
}

/// 1 and 2: rounds of fan-out and garbage collection with one controller; memory after each,
/// and the fan-out's time against a plain client's.
async fn rounds(
    cp: &ControlPlane,
    client: &Client,
    controller: &mut Controller,
    args: &Args,
    empty: Memory,
) -> anyhow::Result<Vec<String>> {
    let (n, concurrency) = (args.namespaces, args.concurrency);
    println!(
        "\n1. memory across {} rounds of fan-out to {n} namespaces, deletion and garbage collection (2. the fan-out \
         time against a plain client, from the same rounds)",
        args.rounds
    );
    let names: Vec<String> = (0..n).map(|i| format!("fan-{i:05}")).collect();
    create_namespaces(client, &names, Some(ROUNDS_LABEL), 2 * concurrency).await?;
    // kube-controller-manager fills every new namespace: let it finish first.
    wait_quiet(cp).await?;
    println!("  after creating the {n} namespaces (the controller keeps their metadata): {}", Memory::of(controller));
    // The baseline is a plain client: it sends the bytes as they are.
    let payload = regcred::dockerconfig::render(&[auth(PASSWORD)]).expose_secret().to_vec();
    let (mut direct_times, mut regcred_times) = (Vec::new(), Vec::new());
    // After each round; and every reading, fanned out or not, for the highest.
    let (mut after_rounds, mut readings) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let run = format!("round-{round}");
        let direct = direct_create(client, &names, DIRECT_PULL, &run, &payload, concurrency).await?;
        delete_in_each(client, &names, DIRECT_PULL, concurrency).await?;
        wait_gone(client, &format!("{DIRECT_LABEL}={run}"), DIRECT_PULL, Instant::now()).await?;
        wait_quiet(cp).await?;

        let (audit_start, reconciles_start) = (cp.audit_log_len()?, controller.reconciles()?);
        let fan = regcred_fan_out(client, controller, n).await?;
        let audit_end = settle(cp, audit_start).await?;
        let writes = controller_writes(cp, audit_start, audit_end)?;
        let reconciles = controller.reconciles()? - reconciles_start;
        let fanned = Memory::of(controller);
        let started = Instant::now();
        Api::<ClusterRegistryCredential>::all(client.clone()).delete(CREDENTIAL, &DeleteParams::default()).await?;
        let collected = wait_gone(client, MANAGED_BY_REGCRED, PULL, started).await?;
        wait_quiet(cp).await?;
        let after = Memory::of(controller);
        println!(
            "  round {round}: plain client {:.2} s, regcred {:.2} s ({:.2}×; status synced after {:.2} s), {reconciles} \
             reconciles, controller writes {} {}",
            direct.all_seen.as_secs_f64(),
            fan.all_seen.as_secs_f64(),
            ratio(fan.all_seen, direct.all_seen),
            fan.status_synced.as_secs_f64(),
            total(&writes),
            show(&writes)
        );
        println!(
            "    fanned out: {fanned}; deleted, its {n} Secrets collected in {:.1} s: {after}",
            collected.as_secs_f64()
        );
        direct_times.push(direct.all_seen);
        regcred_times.push(fan.all_seen);
        after_rounds.push(after);
        readings.extend([fanned, after]);
    }

    let first = after_rounds[0].rss;
    let drift = after_rounds[1..].iter().map(|m| (m.rss as f64 / first as f64 - 1.0) * 100.0);
    let worst = drift.fold(0.0f64, |worst, d| if d.abs() > worst.abs() { d } else { worst });
    let peak = readings.iter().map(|m| m.hwm).max().unwrap_or_default();
    let highest = readings.iter().map(|m| m.rss).max().unwrap_or_default();
    let series: Vec<String> = after_rounds.iter().map(|m| mib(m.rss)).collect();
    let later = after_rounds[1..].iter().map(|m| m.rss);
    let (low, high) = (later.clone().min().unwrap_or_default(), later.max().unwrap_or_default());
    let spread = (high as f64 / low.max(1) as f64 - 1.0) * 100.0;
    let enough = |ok: bool| if after_rounds.len() > 1 { met(ok) } else { "needs 2 rounds" };
    let (direct_median, regcred_median) = (median(&mut direct_times), median(&mut regcred_times));
    let rounds = args.rounds;
    let fan_ratio = ratio(regcred_median, direct_median);
    Ok(vec![
        format!(
            "memory: RSS after each round {} MiB (ready and empty {} MiB); goal flat within 10 % after the first \
             round: rounds 2..{rounds} against round 1 {worst:+.1} % at most ({}), rounds 2..{rounds} among themselves \
             {spread:.1} % ({}); highest RSS read {} MiB, peak (VmHWM) {} MiB (goal under 40 MiB: RSS {}, peak {})",
            series.join(", "),
            mib(empty.rss),
            enough(worst.abs() <= 10.0),
            enough(spread <= 10.0),
            mib(highest),
            mib(peak),
            met(highest < MEMORY_GOAL_KIB),
            met(peak < MEMORY_GOAL_KIB)
        ),
        format!(
            "single fan-out to {n} namespaces, median of {} rounds (timings are wall-clock on a shared machine): \
             regcred {:.2} s, plain client {:.2} s, ratio {fan_ratio:.2}× (target ≤ 1.10×: {})",
            args.rounds,
            regcred_median.as_secs_f64(),
            direct_median.as_secs_f64(),
            met(fan_ratio <= 1.1)
        ),
    ])
}

/// 3: namespaces created in a burst under credentials that select them.
async fn burst(
    cp: &ControlPlane,
    client: &Client,
    controller: &mut Controller,
    args: &Args,
) -> anyhow::Result<Vec<String>> {
    let (n, k) = (args.namespaces, args.burst_credentials);
    println!(
        "\n3. burst: {k} ClusterRegistryCredentials select bench=burst, then {n} such namespaces are created, {} \
         creates in flight",
        args.burst_concurrency
    );
    let credentials = Api::<ClusterRegistryCredential>::all(client.clone());
    let secret_names: Vec<String> = (0..k).map(|i| format!("burst-pull-{i:02}")).collect();
    for (i, secret) in secret_names.iter().enumerate() {
        let credential = cluster_credential(&format!("burst-{i:02}"), BURST_LABEL, secret)?;
        credentials.create(&PostParams::default(), &credential).await?;
    }
    wait_ready_empty(&credentials, k).await.map_err(|e| e.context(controller.diagnosis()))?;
    wait_quiet(cp).await?;

    // The plain client first, into namespaces no credential selects.
    let audit_start = cp.audit_log_len()?;
    let direct_names: Vec<String> = (0..n).map(|i| format!("bdirect-{i:05}")).collect();
    // Not the credentials' Secret names: a Secret of such a name anywhere triggers them (the
    // index keys a cluster credential's Secret by name alone), which would load the baseline.
    let direct_secret_names: Vec<String> = (0..k).map(|i| format!("direct-pull-{i:02}")).collect();
    let direct = direct_burst(client, &direct_names, &direct_secret_names, args).await?;
    wait_quiet(cp).await?;
    let during_direct = controller_requests(cp, audit_start, cp.audit_log_len()?)?;
    println!(
        "  plain client: {n} namespaces created in {:.2} s; all {} Secrets ({k} in each, created as soon as its \
         namespace existed, {} at once) seen by a watch after {:.2} s",
        direct.namespaces_created.as_secs_f64(),
        n * k,
        args.concurrency,
        direct.all_seen.as_secs_f64()
    );
    println!(
        "    controller requests meanwhile (namespaces it does not select): {} {}",
        total(&during_direct),
        show(&during_direct)
    );

    let names: Vec<String> = (0..n).map(|i| format!("burst-{i:05}")).collect();
    let wanted: HashSet<&str> = secret_names.iter().map(String::as_str).collect();
    let (audit_start, reconciles_start) = (cp.audit_log_len()?, controller.reconciles()?);
    let started = Instant::now();
    let create = async {
        create_namespaces(client, &names, Some(BURST_LABEL), args.burst_concurrency).await?;
        anyhow::Ok(started.elapsed())
    };
    let regcred_written = |meta: &ObjectMeta| {
        meta.namespace.as_deref().is_some_and(|ns| ns.starts_with("burst-"))
            && meta.name.as_deref().is_some_and(|name| wanted.contains(name))
    };
    let all = watch_count(client, MANAGED_BY_REGCRED, regcred_written, n * k, started);
    let (created, all_seen) = tokio::try_join!(create, all).map_err(|e| e.context(controller.diagnosis()))?;
    let audit_end = settle(cp, audit_start).await?;
    let requests = controller_requests(cp, audit_start, audit_end)?;
    let reconciles = controller.reconciles()? - reconciles_start;
    let mut by_verb: BTreeMap<String, u64> = BTreeMap::new();
    for (key, count) in &requests {
        *by_verb.entry(key.split(' ').next().unwrap_or_default().to_string()).or_default() += count;
    }
    let per_namespace = |count: u64| count as f64 / n as f64;
    let verbs: Vec<String> = by_verb.iter().map(|(verb, c)| format!("{verb} {:.2}", per_namespace(*c))).collect();
    let burst_ratio = ratio(all_seen, direct.all_seen);
    println!(
        "  regcred: {n} namespaces created in {:.2} s; all {} Secrets seen by the watch after {:.2} s ({burst_ratio:.2}× \
         the plain client)",
        created.as_secs_f64(),
        n * k,
        all_seen.as_secs_f64()
    );
    println!(
        "  controller requests from the first namespace create until it made no write for 5 s: {} in {reconciles} \
         reconciles, {:.2} per namespace created ({})",
        total(&requests),
        per_namespace(total(&requests)),
        verbs.join(", ")
    );
    println!("    by verb and resource: {}", show(&requests));

    // Secrets that merely share a credential's Secret name, in namespaces it does not select.
    let lookalike = &secret_names[0];
    let (audit_start, reconciles_start) = (cp.audit_log_len()?, controller.reconciles()?);
    stream::iter(&direct_names)
        .map(|ns| {
            let api = Api::<Secret>::namespaced(client.clone(), ns);
            async move { api.create(&PostParams::default(), &opaque(lookalike, "unrelated", b"x")).await }
        })
        .buffer_unordered(args.concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let lookalike_reconciles =
        until_stable("the reconcile count", || controller.reconciles()).await? - reconciles_start;
    let lookalike_requests = controller_requests(cp, audit_start, cp.audit_log_len()?)?;
    println!(
        "  {n} Opaque Secrets named {lookalike} (the Secret name of credential burst-00) created in the plain \
         client's namespaces, which no credential selects: {lookalike_reconciles} reconciles, controller requests {} \
         {} (target 0)",
        total(&lookalike_requests),
        show(&lookalike_requests)
    );
    Ok(vec![
        format!(
            "burst of {n} namespaces under {k} credentials: {:.2} controller requests per namespace created ({}; the \
             {k} Secret creates a namespace needs are {k}.00 of them), {reconciles} reconciles",
            per_namespace(total(&requests)),
            verbs.join(", ")
        ),
        format!(
            "burst: all {} Secrets {:.2} s after the first namespace create, plain client {:.2} s at concurrency {}: \
             {burst_ratio:.2}× (wall-clock, shared machine)",
            n * k,
            all_seen.as_secs_f64(),
            direct.all_seen.as_secs_f64(),
            args.concurrency
        ),
        format!(
            "{n} Secrets that only share a credential's Secret name, in namespaces it does not select: \
             {lookalike_reconciles} reconciles, {} controller requests (target 0: {})",
            total(&lookalike_requests),
            met(lookalike_reconciles == 0 && total(&lookalike_requests) == 0)
        ),
    ])
}

/// Polls until `k` ClusterRegistryCredentials report Ready with no target yet.
async fn wait_ready_empty(credentials: &Api<ClusterRegistryCredential>, k: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let listed = credentials.list(&ListParams::default()).await?.items;
        let ready = listed
            .iter()
            .filter(|c| c.metadata.name.as_deref().is_some_and(|n| n.starts_with("burst-")))
            .map(|c| c.status.as_ref())
            .filter(|s| {
                s.is_some_and(|s| {
                    s.target_namespaces == Some(0)
                        && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
                })
            })
            .count();
        if ready == k {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(60), "{ready} of {k} burst credentials Ready after 60 s");
        tokio::time::sleep(POLL).await;
    }
}

/// The plain client's burst.
struct DirectBurst {
    namespaces_created: Duration,
    all_seen: Duration,
}

/// The baseline for a burst: the namespaces created as regcred's are, and a plain client that
/// creates the same Secrets in each as soon as it exists, `--concurrency` creates in flight;
/// timed by the same watch.
async fn direct_burst(
    client: &Client,
    namespaces: &[String],
    secret_names: &[String],
    args: &Args,
) -> anyhow::Result<DirectBurst> {
    // The baseline is a plain client: it sends the bytes as they are.
    let payload = regcred::dockerconfig::render(&[auth(PASSWORD)]).expose_secret().to_vec();
    let started = Instant::now();
    let (created_tx, created_rx) = mpsc::unbounded::<String>();
    let namespaces_api = Api::<Namespace>::all(client.clone());
    let create_namespaces = async move {
        stream::iter(namespaces)
            .map(|name| {
                let (api, created) = (&namespaces_api, &created_tx);
                async move {
                    api.create(&PostParams::default(), &namespace(name, Some(BURST_DIRECT_LABEL))).await?;
                    created.unbounded_send(name.clone())?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(args.burst_concurrency)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        // `created_tx` drops here, which ends the Secret writes once they are through.
        anyhow::Ok(started.elapsed())
    };
    let create_secrets = created_rx
        .flat_map(|ns| stream::iter(secret_names.iter().map(move |name| (ns.clone(), name))))
        .map(|(ns, name)| {
            let mut secret = pull_secret(name, &payload);
            secret.metadata.labels = Some(BTreeMap::from([(DIRECT_LABEL.into(), "burst".into())]));
            let api = Api::<Secret>::namespaced(client.clone(), &ns);
            async move { api.create(&PostParams::default(), &secret).await }
        })
        .buffer_unordered(args.concurrency)
        .try_for_each(|_| async { Ok(()) });
    let total = namespaces.len() * secret_names.len();
    let selector = format!("{DIRECT_LABEL}=burst");
    let all = watch_count(client, &selector, |_| true, total, started);
    let (namespaces_created, (), all_seen) =
        tokio::try_join!(create_namespaces, async { anyhow::Ok(create_secrets.await?) }, all)?;
    Ok(DirectBurst { namespaces_created, all_seen })
}

/// Watches Secrets (metadata) labelled `selector` until `n` of those `wanted` accepts exist;
/// returns the time since `started`. A watch, not a poll: listing 10,000 Secrets every 100 ms
/// would load the apiserver more than the work it times.
async fn watch_count(
    client: &Client,
    selector: &str,
    wanted: impl Fn(&ObjectMeta) -> bool,
    n: usize,
    started: Instant,
) -> anyhow::Result<Duration> {
    let api = Api::<PartialObjectMeta<Secret>>::all(client.clone());
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default().labels(selector)));
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let key = |meta: &ObjectMeta| (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
    let deadline = tokio::time::Instant::from_std(started + PHASE_TIMEOUT);
    loop {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => event,
            Ok(None) => bail!("the watch of Secrets {selector} ended"),
            Err(_) => bail!("after {PHASE_TIMEOUT:?}, {} of {n} Secrets ({selector}) exist", seen.len()),
        };
        match event {
            // A relist: what it lists replaces what was seen.
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) if wanted(&s.metadata) => {
                seen.insert(key(&s.metadata));
            }
            Ok(watcher::Event::Delete(s)) => {
                seen.remove(&key(&s.metadata));
            }
            // The watcher retries on its own.
            Ok(_) | Err(_) => {}
        }
        if seen.len() >= n {
            return Ok(started.elapsed());
        }
    }
}

/// 4: Secret reads by RegistryCredentials with ECR access keys, over their first sync and over
/// one token refresh.
async fn read_amplification(
    cp: &ControlPlane,
    client: &Client,
    controller: &Controller,
    aws: &AwsEmulator,
    args: &Args,
) -> anyhow::Result<Vec<String>> {
    let k = args.ecr_credentials;
    println!(
        "\n4. read amplification: {k} RegistryCredentials with ECR access keys, each its own keys Secret (the same \
         key, so one token for all); tokens live {} s, the controller refreshes with {} of the lifetime left",
        args.ecr_token_secs, args.ecr_refresh_share
    );
    create_namespaces(client, &[ECR_NAMESPACE.to_string()], None, 1).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), ECR_NAMESPACE);
    for i in 0..k {
        secrets.create(&PostParams::default(), &keys_secret(&format!("keys-{i:03}"))).await?;
    }
    wait_quiet(cp).await?;
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), ECR_NAMESPACE);

    let window = Window::open(cp, controller, aws)?;
    let started = Instant::now();
    for i in 0..k {
        credentials.create(&PostParams::default(), &ecr_credential(i)?).await?;
    }
    let first = wait_tokens(&secrets, k, None).await.map_err(|e| e.context(controller.diagnosis()))?;
    let synced_in = started.elapsed();
    let sync = window.close(cp, controller, aws, k).await?;
    println!(
        "  first sync: all {k} Secrets hold a token {:.1} s after the first create; {sync}",
        synced_in.as_secs_f64()
    );

    let window = Window::open(cp, controller, aws)?;
    let started = Instant::now();
    wait_tokens(&secrets, k, Some(&first)).await.map_err(|e| e.context(controller.diagnosis()))?;
    let refreshed_in = started.elapsed();
    let refresh = window.close(cp, controller, aws, k).await?;
    println!("  one refresh: all {k} Secrets hold a new token {:.1} s later; {refresh}", refreshed_in.as_secs_f64());
    let goal = |reads: &Reads| met(reads.keys_per_reconcile() <= 1.0 && reads.targets_per_reconcile() <= 1.0);
    Ok(vec![
        format!(
            "ECR first sync of {k} credentials: per credential {:.2} keys Secret GETs and {:.2} target Secret GETs in \
             {:.2} reconciles; per reconcile {:.2} and {:.2} (goal at most 1 each: {})",
            sync.per_credential(sync.keys),
            sync.per_credential(sync.targets),
            sync.per_credential(sync.reconciles),
            sync.keys_per_reconcile(),
            sync.targets_per_reconcile(),
            goal(&sync)
        ),
        format!(
            "ECR one token refresh: per credential {:.2} keys Secret GETs and {:.2} target Secret GETs in {:.2} \
             reconciles; per reconcile {:.2} and {:.2} (goal at most 1 each: {}); {} GetAuthorizationToken",
            refresh.per_credential(refresh.keys),
            refresh.per_credential(refresh.targets),
            refresh.per_credential(refresh.reconciles),
            refresh.keys_per_reconcile(),
            refresh.targets_per_reconcile(),
            goal(&refresh),
            refresh.token_calls
        ),
    ])
}

/// Where a counted stretch of the ECR phase began.
struct Window {
    audit: u64,
    reconciles: u64,
    token_calls: u64,
}

impl Window {
    fn open(cp: &ControlPlane, controller: &Controller, aws: &AwsEmulator) -> anyhow::Result<Window> {
        Ok(Window {
            audit: cp.audit_log_len()?,
            reconciles: controller.reconciles_of("RegistryCredential")?,
            token_calls: token_calls(aws)?,
        })
    }

    /// Waits until the controller made no write for 5 s, then counts from the audit log.
    async fn close(
        self,
        cp: &ControlPlane,
        controller: &Controller,
        aws: &AwsEmulator,
        credentials: usize,
    ) -> anyhow::Result<Reads> {
        let end = settle(cp, self.audit).await?;
        let mut reads = Reads {
            credentials: credentials as u64,
            reconciles: controller.reconciles_of("RegistryCredential")? - self.reconciles,
            token_calls: token_calls(aws)? - self.token_calls,
            keys: 0,
            targets: 0,
            requests: BTreeMap::new(),
        };
        for event in audit_events(cp, self.audit, end)? {
            if !is_controller_request(&event) || event["objectRef"]["namespace"] != ECR_NAMESPACE {
                continue;
            }
            *reads.requests.entry(request_key(&event)).or_default() += 1;
            if event["verb"] == "get" && event["objectRef"]["resource"] == "secrets" {
                match event["objectRef"]["name"].as_str().unwrap_or_default().starts_with("keys-") {
                    true => reads.keys += 1,
                    false => reads.targets += 1,
                }
            }
        }
        Ok(reads)
    }
}

/// Counts over one stretch of the ECR phase.
struct Reads {
    credentials: u64,
    reconciles: u64,
    token_calls: u64,
    /// GETs of the keys Secrets.
    keys: u64,
    /// GETs of the Secrets the credentials write.
    targets: u64,
    /// Every controller request in the namespace, by verb and resource.
    requests: BTreeMap<String, u64>,
}

impl Reads {
    fn per_credential(&self, count: u64) -> f64 {
        count as f64 / self.credentials as f64
    }

    fn keys_per_reconcile(&self) -> f64 {
        self.keys as f64 / self.reconciles.max(1) as f64
    }

    fn targets_per_reconcile(&self) -> f64 {
        self.targets as f64 / self.reconciles.max(1) as f64
    }
}

impl fmt::Display for Reads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} reconciles, {} GetAuthorizationToken; Secret GETs: keys {} ({:.2} per reconcile), targets {} ({:.2} per \
             reconcile); every controller request in the namespace: {}",
            self.reconciles,
            self.token_calls,
            self.keys,
            self.keys_per_reconcile(),
            self.targets,
            self.targets_per_reconcile(),
            show(&self.requests)
        )
    }
}

/// A Secret with AWS access keys (the same for every one; never printed).
fn keys_secret(name: &str) -> Secret {
    let mut secret = opaque(name, "accessKeyId", ECR_KEY_ID.as_bytes());
    secret
        .data
        .get_or_insert_default()
        .insert("secretAccessKey".into(), ByteString(ECR_SECRET_KEY.as_bytes().to_vec()));
    secret
}

/// RegistryCredential `c-NNN`, an ECR source with keys from `keys-NNN`; its Secret is `c-NNN`.
fn ecr_credential(i: usize) -> anyhow::Result<RegistryCredential> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "metadata": {"name": format!("c-{i:03}")},
        "spec": {"source": {"ecr": {"registry": ECR_REGISTRY, "auth": {"secretRef": {"name": format!("keys-{i:03}")}}}}},
    }))?)
}

/// Polls (every 200 ms) until `n` Secrets regcred wrote in the namespace hold a token, each
/// another than it held in `not` if given; returns the token of each, by Secret name.
async fn wait_tokens(
    secrets: &Api<Secret>,
    n: usize,
    not: Option<&BTreeMap<String, String>>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let started = Instant::now();
    let params = ListParams::default().labels(MANAGED_BY_REGCRED);
    loop {
        let mut tokens = BTreeMap::new();
        for secret in secrets.list(&params).await?.items {
            let config = secret.data.as_ref().and_then(|d| d.get(regcred::dockerconfig::DOCKER_CONFIG_KEY));
            let login = config.and_then(|c| regcred::dockerconfig::parse(&c.0).ok());
            if let (Some(name), Some(first)) = (secret.metadata.name, login.as_ref().and_then(|l| l.first())) {
                tokens.insert(name, first.password.expose_secret().to_string());
            }
        }
        let fresh = tokens.iter().filter(|(name, token)| not.is_none_or(|old| old.get(*name) != Some(*token))).count();
        if fresh == n {
            return Ok(tokens);
        }
        ensure!(
            started.elapsed() < PHASE_TIMEOUT,
            "after {PHASE_TIMEOUT:?}, {fresh} of {n} Secrets hold a {} token",
            if not.is_some() { "new" } else { "" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// ECR GetAuthorizationToken calls the emulator answered so far.
fn token_calls(aws: &AwsEmulator) -> anyhow::Result<u64> {
    Ok(aws.counts()?.get("ecr:GetAuthorizationToken").copied().unwrap_or(0))
}

/// The controller's requests between two audit log offsets, by verb and resource.
fn controller_requests(cp: &ControlPlane, from: u64, to: u64) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut requests = BTreeMap::new();
    for event in audit_events(cp, from, to)?.iter().filter(|e| is_controller_request(e)) {
        *requests.entry(request_key(event)).or_default() += 1;
    }
    Ok(requests)
}

/// A request by the controller, counted once: a watch has an audit event when its response
/// starts and another when it ends; only the last one counts.
fn is_controller_request(event: &Value) -> bool {
    event["user"]["username"] == CONTROLLER_USER && event["stage"] == "ResponseComplete"
}

/// Deletes Secret `name` in each namespace, `concurrency` requests at once.
async fn delete_in_each(client: &Client, namespaces: &[String], name: &str, concurrency: usize) -> anyhow::Result<()> {
    stream::iter(namespaces)
        .map(|namespace| {
            let api = Api::<Secret>::namespaced(client.clone(), namespace);
            async move { api.delete(name, &DeleteParams::default()).await }
        })
        .buffer_unordered(concurrency)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(())
}

/// Polls (every 100 ms, one metadata list by label) until no Secret called `name` is left;
/// returns the time since `started`.
async fn wait_gone(client: &Client, selector: &str, name: &str, started: Instant) -> anyhow::Result<Duration> {
    let api = Api::<Secret>::all(client.clone());
    let params = ListParams::default().labels(selector);
    loop {
        let left =
            api.list_metadata(&params).await?.items.iter().filter(|s| s.metadata.name.as_deref() == Some(name)).count();
        if left == 0 {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < PHASE_TIMEOUT,
            "after {PHASE_TIMEOUT:?}, {left} Secrets {name} ({selector}) are left"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The controller's memory from /proc: VmRSS (anonymous and file-backed parts) and VmHWM, KiB.
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
}

impl Memory {
    fn of(controller: &Controller) -> Memory {
        let kib = controller.process.status_kib(&["VmRSS:", "VmHWM:", "RssAnon:", "RssFile:"]);
        Memory { rss: kib[0], hwm: kib[1], anon: kib[2], file: kib[3] }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RSS {} MiB (anonymous {}, file {}), peak {} MiB",
            mib(self.rss),
            mib(self.anon),
            mib(self.file),
            mib(self.hwm)
        )
    }
}

/// The median (the upper one of an even count).
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// CPUs and load average now: the timings share the machine with the control plane and with
/// whatever else runs; memory and request counts do not depend on it.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpus} CPUs, load average {} (1/5/15 min), shared with the control plane and any other work: timings are \
         wall-clock on that machine, memory and request counts are not affected by it",
        load.join(" ")
    )
}
