//! Faults: the apiserver and etcd restarting under the controller, the controller killed in
//! the middle of a fan-out, and the periodic resync as the bound on a missed event.

use std::{collections::BTreeMap, time::Instant};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use regcred::crd::{ClusterRegistryCredential, RegistryCredential};
use regcred_testenv::eventually;
use serde_json::{Value, json};

use crate::{SERIAL, support::*};

/// Successful (2xx) writes by the controllers to each Secret since `offset` in the audit log.
fn successful_secret_writes_since(offset: u64) -> BTreeMap<(String, String), usize> {
    let text = env().cp.read_audit_log(offset, None).expect("audit log");
    let mut writes = BTreeMap::new();
    for event in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let ok = event["responseStatus"]["code"].as_u64().is_some_and(|c| (200..300).contains(&c));
        if event["user"]["username"] == CONTROLLER_USER
            && event["objectRef"]["resource"] == "secrets"
            && is_write(event["verb"].as_str().unwrap_or_default())
            && ok
        {
            let key = (
                event["objectRef"]["namespace"].as_str().unwrap_or_default().to_string(),
                event["objectRef"]["name"].as_str().unwrap_or_default().to_string(),
            );
            *writes.entry(key).or_insert(0) += 1;
        }
    }
    writes
}

async fn wait_password(client: &Client, ns: &str, name: &str, password: &str) {
    wait_secret(client, ns, name, "the new password", |s| logins(s).iter().any(|l| l.2 == password)).await;
}

/// Brings every credential's next retry out to the resync (10 minutes on test controllers):
/// a spec change (a template label, which the credential watch brings) reconciled
/// successfully, seen as `Ready=True` for the new generation. The controller keeps one
/// scheduled run per credential and a trigger replaces a later one, so that successful
/// reconcile also took the place of any retry a failure during the restart had left pending
/// (a reconcile in flight when the process died, a request refused while it came back).
async fn settle(client: &Client, ns: &str, names: &[String], fan: &str, round: &str) {
    let patch = json!({"spec": {"secret": {"labels": {"round": round}}}});
    for name in names {
        Api::<RegistryCredential>::namespaced(client.clone(), ns)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("labelling the credential's Secret");
    }
    Api::<ClusterRegistryCredential>::all(client.clone())
        .patch(fan, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("labelling the fan-out's Secrets");
    for name in names {
        wait_ready(client, ns, name, "True", Some("Synced")).await;
    }
    wait_cluster(client, fan, "Ready for the new generation", |s| {
        s.synced_namespaces == Some(2) && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
    })
    .await;
}

/// On a controller of its own with a long backoff ([`LONG_BACKOFF`]) and the 10-minute
/// resync, so that the last claim, that the watches resumed, can only be met by a watch
/// event: once [`settle`] has run, nothing else would reconcile these credentials for
/// 10 minutes, and the later change must show within [`EVENT_WAIT`].
#[tokio::test]
async fn apiserver_and_etcd_restarts_neither_stall_nor_duplicate_writes() {
    let _serial = SERIAL.lock().await;
    let cp = env().cp;
    let client = client().await;
    let controller = format!("restart-{}", &unique()[..6]);
    let _controller = spawn_labelled(&controller, LONG_BACKOFF, &[]);
    let ns = namespace(&client, "restart").await;
    let targets = [namespace(&client, "restart-fan").await, namespace(&client, "restart-fan").await];
    create_secret(&client, &ns, "src", &[("password", secret_value("u", "restart").as_bytes())]).await;
    let names: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let spec = json!({"registry": format!("r{i}.example.com"), "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
        create_credential_for(&client, &ns, name, Some(&controller), spec).await;
    }
    let fan = format!("restart-{}", &unique()[..6]);
    create_cluster_credential_for(
        &client,
        &fan,
        Some(&controller),
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": ns}}},
               "namespaces": {"names": targets}}),
    )
    .await;
    wait_cluster(&client, &fan, "synced", |s| s.synced_namespaces == Some(2)).await;
    let mut managed: Vec<(String, String)> = names.iter().map(|name| (ns.clone(), name.clone())).collect();
    managed.extend(targets.iter().map(|t| (t.clone(), fan.clone())));

    for (round, fault) in
        ["kube-apiserver killed and restarted mid-reconcile", "etcd killed and restarted"].iter().enumerate()
    {
        let password = secret_value("u", "restart");
        let offset = audit_offset();
        set_secret_key(&client, &ns, "src", "password", password.as_bytes()).await;
        // The change's reconciles are in flight (or their events not yet delivered) when the
        // process dies.
        let started = Instant::now();
        match fault.starts_with("kube-apiserver") {
            true => cp.restart_apiserver().expect("restarting kube-apiserver"),
            false => cp.restart_etcd().expect("restarting etcd"),
        }
        let client = crate::support::client().await;
        // A restarted apiserver refuses requests for a few seconds more while its RBAC caches
        // fill; retries back off meanwhile, so allow longer than other waits.
        for (namespace, name) in &managed {
            let api = Api::<Secret>::namespaced(client.clone(), namespace);
            eventually(&format!("{namespace}/{name} on the new password"), 2 * TIMEOUT, || async {
                let secret = api.get_opt(name).await.ok()??;
                logins(&secret).iter().any(|l| l.2 == password).then_some(())
            })
            .await;
        }
        eprintln!("{fault}: all {} Secrets converged {:?} after the change", managed.len(), started.elapsed());
        // Nothing lost (above) and nothing written twice: one successful write per Secret.
        let writes = successful_secret_writes_since(offset);
        for secret in &managed {
            assert_eq!(writes.get(secret), Some(&1), "{fault}: writes to {secret:?}: {writes:?}");
        }
        // The watches resumed: a later change is seen at once, not at a retry (none is due
        // for 10 minutes once settled) nor at the resync (10 minutes).
        settle(&client, &ns, &names, &fan, &round.to_string()).await;
        let after = secret_value("u", "after-restart");
        let changed = Instant::now();
        set_secret_key(&client, &ns, "src", "password", after.as_bytes()).await;
        for (namespace, name) in &managed {
            wait_secret_within(EVENT_WAIT, &client, namespace, name, "the later password, by the Secret watch", |s| {
                logins(s).iter().any(|l| l.2 == after)
            })
            .await;
        }
        eprintln!("{fault}: the later change reached all {} Secrets {:?} after it", managed.len(), changed.elapsed());
    }
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn a_controller_killed_mid_fan_out_converges_without_orphans() {
    const NAMESPACES: usize = 200;
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let team = format!("kill-{}", &unique()[..6]);
    let source = namespace(&client, "kill-src").await;
    create_secret(&client, &source, "src", &[("password", secret_value("u", "kill").as_bytes())]).await;
    let mut targets = Vec::new();
    for _ in 0..NAMESPACES {
        targets.push(labelled_namespace(&client, "kill", &[("team", &team)]).await);
    }
    // Their `default` ServiceAccounts exist before the fan-out starts.
    for ns in &targets {
        let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
        eventually(&format!("{ns}/default"), TIMEOUT, || async { api.get_opt("default").await.ok().flatten() }).await;
    }
    let name = format!("kill-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    create_cluster_credential_for(
        &client,
        &name,
        Some(&name),
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source}}},
               "namespaces": {"selector": {"matchLabels": {"team": team}}}, "serviceAccounts": ["default"],
               "secret": {"name": "pull"}}),
    )
    .await;
    let written = || async {
        let secrets = Api::<Secret>::all(client.clone());
        let list = secrets.list(&ListParams::default().fields("metadata.name=pull")).await.unwrap();
        list.items.iter().filter(|s| targets.contains(&s.metadata.namespace.clone().unwrap_or_default())).count()
    };
    let aws = env().aws.endpoint();
    let mut first = spawn_controller(env().cp, &format!("{name}-1"), &selector, &aws, &["--concurrency", "1"], &[]);
    let progress = eventually("a part of the fan-out written", TIMEOUT, || async {
        let n = written().await;
        (n >= 1).then_some(n)
    })
    .await;
    first.kill();
    let at_kill = written().await;
    eprintln!("killed with {progress}..{at_kill} of {NAMESPACES} Secrets written");
    assert!(at_kill < NAMESPACES, "the fan-out finished before the kill; the test proves nothing");

    let _second = spawn_controller(env().cp, &format!("{name}-2"), &selector, &aws, &[], &[]);
    wait_cluster(&client, &name, "every namespace synced", |s| s.synced_namespaces == Some(NAMESPACES as u32)).await;
    let accounts = Api::<ServiceAccount>::all(client.clone());
    let with_entry = || async {
        let list = accounts.list(&ListParams::default().fields("metadata.name=default")).await.unwrap();
        list.items
            .iter()
            .filter(|a| targets.contains(&a.metadata.namespace.clone().unwrap_or_default()))
            .filter(|a| a.image_pull_secrets.iter().flatten().any(|r| r.name == "pull"))
            .count()
    };
    eventually("every default ServiceAccount lists the Secret", TIMEOUT, || async {
        (with_entry().await == NAMESPACES).then_some(())
    })
    .await;
    assert_eq!(written().await, NAMESPACES);

    // Deleting it leaves nothing behind: no Secret, no ServiceAccount entry, no finalizer.
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    eventually("the credential gone", TIMEOUT, || async { api.get_opt(&name).await.ok()?.is_none().then_some(()) })
        .await;
    eventually("no entry left", TIMEOUT, || async { (with_entry().await == 0).then_some(()) }).await;
    eventually("no Secret left", TIMEOUT, || async { (written().await == 0).then_some(()) }).await;
}

#[tokio::test]
async fn the_periodic_resync_repairs_what_no_event_reported() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let ns = namespace(&client, "resync").await;
    let password = secret_value("u", "resync");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    // Without its Secret watch the controller hears of no Secret change at all: only the
    // resync (here 3 s) can repair drift, which is the bound the flag documents.
    let _controller = spawn_controller(
        env().cp,
        "resync",
        &format!("{CONTROLLER_LABEL}=resync"),
        &env().aws.endpoint(),
        &["--no-secret-watch", "--resync-interval", "3s"],
        &[],
    );
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &ns, "cred", Some("resync"), spec).await;
    wait_password(&client, &ns, "cred", &password).await;

    set_secret_key(&client, &ns, "cred", ".dockerconfigjson", b"{\"auths\":{}}").await;
    let drifted = Instant::now();
    wait_password(&client, &ns, "cred", &password).await;
    let repaired_after = drifted.elapsed();
    eprintln!("drift repaired by the resync after {repaired_after:?}");
    assert!(repaired_after.as_secs() < 3 + 10, "not repaired within the resync bound: {repaired_after:?}");

    let rotated = secret_value("u", "resync-rotated");
    set_secret_key(&client, &ns, "src", "password", rotated.as_bytes()).await;
    wait_password(&client, &ns, "cred", &rotated).await;
}
