//! Load: 200 ClusterRegistryCredentials, each fanned out to the same 50 namespaces (10,000
//! Secrets), while their sources change continuously. Ignored by default (minutes long):
//!
//!   REGCRED_LOAD_SECS=180 cargo test --test reliability -- --ignored --nocapture load
//!
//! Checks that every Secret ends with its source's last password, that no reconcile fails
//! (README: "0 failed") and reports the controller's memory at the start and the end.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::ListParams};
use serde_json::json;

use crate::{SERIAL, support::*};

const CREDENTIALS: usize = 200;
const NAMESPACES: usize = 50;

#[tokio::test]
#[ignore = "minutes long; run for the reliability report"]
async fn load_200_credentials_times_50_namespaces_with_changing_sources() {
    let _serial = SERIAL.lock().await;
    let seconds: u64 = std::env::var("REGCRED_LOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(180);
    let client = client().await;
    let team = format!("load-{}", &unique()[..6]);
    let source = namespace(&client, "load-src").await;
    for _ in 0..NAMESPACES {
        labelled_namespace(&client, "load", &[("team", &team)]).await;
    }
    let mut latest: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..CREDENTIALS {
        let password = format!("load-{i}-0-{}", unique());
        create_secret(&client, &source, &format!("src-{i}"), &[("password", password.as_bytes())]).await;
        latest.insert(format!("{team}-{i}"), password);
    }
    let controller = spawn_labelled(&team, &[], &[]);
    let idle_rss = controller.rss_kib();
    let started = Instant::now();
    for i in 0..CREDENTIALS {
        create_cluster_credential_for(
            &client,
            &format!("{team}-{i}"),
            Some(&team),
            json!({"registry": "r.example.com",
                   "source": {"basic": {"username": "u", "passwordSecretRef": {"name": format!("src-{i}"), "namespace": source}}},
                   "namespaces": {"selector": {"matchLabels": {"team": team}}}}),
        )
        .await;
    }
    let secrets = Api::<Secret>::all(client.clone());
    let all_current = |latest: BTreeMap<String, String>| {
        let secrets = secrets.clone();
        async move {
            let list =
                secrets.list(&ListParams::default().labels("app.kubernetes.io/managed-by=regcred")).await.ok()?;
            let mut current = 0;
            for secret in &list.items {
                let name = secret.metadata.name.clone().unwrap_or_default();
                if let Some(password) = latest.get(&name)
                    && logins(secret).first().is_some_and(|l| &l.2 == password)
                {
                    current += 1;
                }
            }
            (current == CREDENTIALS * NAMESPACES).then_some(())
        }
    };
    let long = Duration::from_secs(600);
    regcred_testenv::eventually("all 10,000 Secrets written", long, || all_current(latest.clone())).await;
    let synced_after = started.elapsed();
    let synced_rss = controller.rss_kib();

    // Sources change continuously: one source Secret every 100 ms, round robin from a random start.
    let changes_until = Instant::now() + Duration::from_secs(seconds);
    let mut changes = 0usize;
    let mut i = unique().len() % CREDENTIALS;
    while Instant::now() < changes_until {
        let password = format!("load-{i}-{changes}-{}", unique());
        set_secret_key(&client, &source, &format!("src-{i}"), "password", password.as_bytes()).await;
        latest.insert(format!("{team}-{i}"), password);
        changes += 1;
        i = (i + 7) % CREDENTIALS;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = Instant::now();
    regcred_testenv::eventually("every Secret on its source's last password", long, || all_current(latest.clone()))
        .await;
    let converged_after = stopped.elapsed();
    let end_rss = controller.rss_kib();

    let metrics = controller.metrics();
    let total = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |sum, v| sum + v)
    };
    let reconciles = total("regcred_reconciles_total");
    let failures = total("regcred_reconcile_failures_total");
    eprintln!(
        "load: {CREDENTIALS} ClusterRegistryCredentials × {NAMESPACES} namespaces = {} Secrets; initial sync {synced_after:?}; \
         {changes} source changes in {seconds} s; converged {converged_after:?} after the last change; \
         reconciles {reconciles}, failed {failures}; RSS KiB idle {} / after sync {} / end {} (peak {})",
        CREDENTIALS * NAMESPACES,
        idle_rss.0,
        synced_rss.0,
        end_rss.0,
        end_rss.1
    );
    // README reports 0 failed reconciles under this load: no conflict, no timeout, no error.
    assert_eq!(failures, 0.0, "{failures} of {reconciles} reconciles failed:\n{metrics}");
    assert!(end_rss.0 < synced_rss.0 * 3 / 2, "memory grew under load: {synced_rss:?} → {end_rss:?}");
}
