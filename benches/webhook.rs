//! The Pod admission webhook's latency at a steady rate of Pod creations (issue 23), against
//! the real local control plane. Not a test: it prints a report.
//!
//!   cargo bench --bench webhook                          # 100 Pods/s for 30 s, each way
//!   cargo bench --bench webhook -- --rate 20 --seconds 5 # a smoke run
//!
//! A release-build controller serves the webhook on loopback with its self-managed certificate
//! (it injects the CA into the configuration, as in a cluster). One namespace has three
//! RegistryCredentials (basic; `a.example`, `b.example`, Docker Hub); every Pod has two
//! containers, one from `a.example` and one `nginx`, so each review adds two Secrets.
//!
//! 1. webhook on: the configuration (the chart's safety settings, the client config on
//!    loopback, only the bench namespace) is created, and once the apiserver calls it (a dry-run
//!    Pod comes back patched) Pods are created at `--rate` per second for `--seconds` seconds,
//!    each create sent at its tick whatever the others' progress;
//! 2. webhook off: the configuration is deleted, and once a dry-run Pod comes back unpatched the
//!    same Pods (new names) are created the same way.
//!
//! Reported for each phase: the apiserver's `apiserver_request_duration_seconds` of Pod POSTs
//! (p50, p99, by the histogram's buckets, interpolated as Prometheus' `histogram_quantile`
//! does), the client's own latency of each create (exact p50, p99, max), and for phase 1 the
//! apiserver's `apiserver_admission_webhook_admission_duration_seconds` of the webhook (p50, p99;
//! its buckets start at 5 ms and 25 ms, so they are coarse) and how many Pods were patched.
//! Ratios are on/off of the same run.

#[allow(dead_code)]
mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::ControlPlane;
use serde_json::json;
use support::*;

const NAMESPACE: &str = "bench-webhook";
const CONFIGURATION: &str = "regcred-bench";
const WEBHOOK: &str = "pods.regcred.dev";

struct Args {
    rate: u32,
    seconds: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { rate: 100, seconds: 30 };
    for (flag, value) in flag_pairs()? {
        match flag.as_str() {
            "--rate" => args.rate = parse_flag(&flag, &value)?,
            "--seconds" => args.seconds = parse_flag(&flag, &value)?,
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let cp = ControlPlane::start()?;
    cp.install_crds(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds"))?;
    let client = cp.client().await;
    setup(&client).await?;
    let port = regcred_testenv::free_port();
    let flags: Vec<String> = [
        "--webhook-addr",
        &format!("127.0.0.1:{port}"),
        "--webhook-configuration",
        CONFIGURATION,
        "--webhook-secret",
        "regcred-bench-webhook-tls",
        "--webhook-namespace",
        "default",
        "--webhook-hosts",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut controller = Controller::start(&cp, "regcred-webhook-bench.log", &flags, &[])?;
    controller.wait_ready().await?;
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    configurations.create(&PostParams::default(), &configuration(port)?).await?;
    wait_patched(&client, true).await.with_context(|| controller.diagnosis())?;
    println!("webhook on: {} Pods/s for {} s", args.rate, args.seconds);
    let on = phase(&cp, &client, &args, "on").await?;
    configurations.delete(CONFIGURATION, &DeleteParams::default()).await?;
    wait_patched(&client, false).await?;
    println!("webhook off: {} Pods/s for {} s", args.rate, args.seconds);
    let off = phase(&cp, &client, &args, "off").await?;
    controller.process.check_alive()?;
    report(&on, &off);
    Ok(())
}

async fn setup(client: &Client) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    secrets.create(&PostParams::default(), &opaque("pass", "password", b"bench-password")).await?;
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), NAMESPACE);
    for (name, registry) in [("a", "a.example"), ("b", "b.example"), ("hub", "docker.io")] {
        let credential: RegistryCredential = serde_json::from_value(json!({
            "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"registry": registry, "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "pass"}}}},
        }))?;
        credentials.create(&PostParams::default(), &credential).await?;
    }
    // The default ServiceAccount the Pods are admitted with.
    regcred_testenv::eventually("the default ServiceAccount", Duration::from_secs(60), || async {
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), NAMESPACE)
            .get("default")
            .await
            .ok()
    })
    .await;
    Ok(())
}

/// The chart's webhook settings, the client config on loopback, only the bench namespace.
fn configuration(port: u16) -> anyhow::Result<MutatingWebhookConfiguration> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": CONFIGURATION},
        "webhooks": [{
            "name": WEBHOOK, "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate-pods")},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            "matchPolicy": "Equivalent", "failurePolicy": "Ignore", "timeoutSeconds": 2,
            "reinvocationPolicy": "IfNeeded", "sideEffects": "None",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
        }],
    }))?)
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"automountServiceAccountToken": false,
                 "containers": [{"name": "app", "image": "a.example/team/app:1"}, {"name": "web", "image": "nginx"}]},
    }))
    .expect("a Pod")
}

fn pull_secrets(pod: &Pod) -> usize {
    pod.spec.as_ref().and_then(|s| s.image_pull_secrets.as_ref()).map_or(0, Vec::len)
}

/// Waits until a dry-run Pod comes back with (or without) the webhook's Secrets.
async fn wait_patched(client: &Client, patched: bool) -> anyhow::Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let started = Instant::now();
    loop {
        if let Ok(pod) = pods.create(&dry_run, &pod("probe")).await
            && (pull_secrets(&pod) == 2) == patched
        {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the webhook never became {}",
            if patched { "active" } else { "inactive" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Phase {
    client_latencies: Vec<Duration>,
    patched: usize,
    failed: usize,
    request: Quantiles,
    webhook: Quantiles,
}

#[derive(Default)]
struct Quantiles {
    p50: f64,
    p99: f64,
    count: f64,
}

async fn phase(cp: &ControlPlane, client: &Client, args: &Args, name: &str) -> anyhow::Result<Phase> {
    let before = cp.apiserver_metrics()?;
    let pods = Arc::new(Api::<Pod>::namespaced(client.clone(), NAMESPACE));
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / args.rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for i in 0..args.rate * args.seconds {
        ticker.tick().await;
        let pods = pods.clone();
        let pod = pod(&format!("{name}-{i}"));
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = pods.create(&PostParams::default(), &pod).await;
            (started.elapsed(), result.map(|p| pull_secrets(&p)))
        }));
    }
    let mut out = Phase {
        client_latencies: Vec::new(),
        patched: 0,
        failed: 0,
        request: Quantiles::default(),
        webhook: Quantiles::default(),
    };
    for task in tasks {
        let (took, result) = task.await?;
        out.client_latencies.push(took);
        match result {
            Ok(2) => out.patched += 1,
            Ok(_) => {}
            Err(_) => out.failed += 1,
        }
    }
    let after = cp.apiserver_metrics()?;
    let is_pod_post = |labels: &BTreeMap<String, String>| {
        labels.get("verb").map(String::as_str) == Some("POST")
            && labels.get("resource").map(String::as_str) == Some("pods")
            && labels.get("subresource").is_none_or(|s| s.is_empty())
            && labels.get("dry_run").is_none_or(|s| s.is_empty())
    };
    out.request = quantiles(&before, &after, "apiserver_request_duration_seconds_bucket", is_pod_post);
    out.webhook = quantiles(&before, &after, "apiserver_admission_webhook_admission_duration_seconds_bucket", |l| {
        l.get("name").map(String::as_str) == Some(WEBHOOK) && l.get("operation").map(String::as_str) == Some("CREATE")
    });
    out.client_latencies.sort();
    Ok(out)
}

/// A histogram's buckets (summed over the series `keep` selects), `after` less `before`.
fn buckets(
    before: &str,
    after: &str,
    metric: &str,
    keep: impl Fn(&BTreeMap<String, String>) -> bool,
) -> Vec<(f64, f64)> {
    let read = |text: &str| {
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(metric).and_then(|r| r.strip_prefix('{')) else { continue };
            let Some((labels, value)) = rest.rsplit_once("} ") else { continue };
            let labels: BTreeMap<String, String> = labels
                .split("\",")
                .filter_map(|pair| pair.split_once("=\""))
                .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                .collect();
            if keep(&labels) {
                let le = labels.get("le").cloned().unwrap_or_default();
                *sums.entry(le).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        sums
    };
    let (before, after) = (read(before), read(after));
    let mut out: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            (bound, n - before.get(le).copied().unwrap_or(0.0))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

fn quantiles(before: &str, after: &str, metric: &str, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> Quantiles {
    let buckets = buckets(before, after, metric, keep);
    let count = buckets.last().map_or(0.0, |b| b.1);
    Quantiles { p50: histogram_quantile(0.5, &buckets), p99: histogram_quantile(0.99, &buckets), count }
}

/// Prometheus' `histogram_quantile`: linear within the bucket the rank falls in.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else { return f64::NAN };
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return lower.0;
            }
            let share = if cumulative > lower.1 { (rank - lower.1) / (cumulative - lower.1) } else { 0.0 };
            return lower.0 + (bound - lower.0) * share;
        }
        lower = (bound, cumulative);
    }
    lower.0
}

fn at(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1)) - 1;
    sorted.get(i).copied().unwrap_or_default()
}

fn ms(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1000.0)
}

fn report(on: &Phase, off: &Phase) {
    let d = |x: Duration| ms(x.as_secs_f64());
    println!("\n| | webhook on | webhook off | on/off |\n| --- | --- | --- | --- |");
    for (what, q) in [("p50", 0.5), ("p99", 0.99)] {
        let (a, b) = (at(&on.client_latencies, q), at(&off.client_latencies, q));
        println!("| Pod create, client, {what} | {} | {} | {:.2}× |", d(a), d(b), a.as_secs_f64() / b.as_secs_f64());
    }
    let max = |p: &Phase| p.client_latencies.last().copied().unwrap_or_default();
    println!("| Pod create, client, max | {} | {} | |", d(max(on)), d(max(off)));
    for (what, a, b) in [("p50", on.request.p50, off.request.p50), ("p99", on.request.p99, off.request.p99)] {
        println!("| apiserver POST pods, {what} | {} | {} | {:.2}× |", ms(a), ms(b), a / b);
    }
    println!("| apiserver POST pods, count | {} | {} | |", on.request.count, off.request.count);
    println!("| webhook admission duration, p50 | {} | (not called) | |", ms(on.webhook.p50));
    println!("| webhook admission duration, p99 | {} | (not called) | |", ms(on.webhook.p99));
    println!("| webhook calls counted by the apiserver | {} | | |", on.webhook.count);
    println!(
        "| Pods created with both Secrets | {} of {} | {} | |",
        on.patched,
        on.client_latencies.len(),
        off.patched
    );
    println!("| Pod creates refused | {} | {} | |", on.failed, off.failed);
}
