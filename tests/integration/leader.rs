//! Leader election: of two replicas exactly one reconciles; when it dies the other takes over.

use std::time::{Duration, Instant};

use kube::Api;
use regcred_testenv::eventually;
use serde_json::json;

use crate::support::*;

/// Two replicas competing for one Lease of `lease` duration, one credential for them, and the
/// index of the replica that leads.
async fn two_replicas(lease: &str) -> (kube::Client, String, [TestController; 2], usize) {
    let cp = env().cp;
    let client = client().await;
    let name = format!("leader-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let args = [
        "--leader-elect",
        "--leader-election-lease",
        &name,
        "--leader-election-namespace",
        CONTROLLER_NAMESPACE,
        "--leader-election-duration",
        lease,
    ];
    let replicas = [
        spawn_controller(
            cp,
            &format!("{name}-a"),
            &selector,
            &env().aws.endpoint(),
            &args,
            &[("POD_NAME", "replica-a".into())],
        ),
        spawn_controller(
            cp,
            &format!("{name}-b"),
            &selector,
            &env().aws.endpoint(),
            &args,
            &[("POD_NAME", "replica-b".into())],
        ),
    ];
    let ns = namespace(&client, "leader").await;
    let first = secret_value("u", "leader");
    create_secret(&client, &ns, "src", &[("password", first.as_bytes())]).await;
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &ns, "cred", Some(&name), spec).await;
    wait_secret(&client, &ns, "cred", "written", |s| logins(s)[0].2 == first).await;

    // Exactly one leader; the standby has not reconciled anything.
    let leader = eventually("one leader", TIMEOUT, || async {
        let leading: Vec<_> = replicas.iter().map(|r| sample(&r.metrics(), "regcred_leader ")).collect();
        match leading.as_slice() {
            [Some(a), Some(b)] if a + b == 1.0 => Some(if *a == 1.0 { 0 } else { 1 }),
            _ => None,
        }
    })
    .await;
    (client, ns, replicas, leader)
}

/// Changes the source password and waits until the Secret carries it; returns how long that took.
async fn change_and_wait(client: &kube::Client, ns: &str, tag: &str) -> Duration {
    let started = Instant::now();
    let password = secret_value("u", tag);
    set_secret_key(client, ns, "src", "password", password.as_bytes()).await;
    wait_secret(client, ns, "cred", "updated by the new leader", |s| logins(s)[0].2 == password).await;
    started.elapsed()
}

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over_when_it_dies() {
    let (client, ns, mut replicas, leader) = two_replicas("4s").await;
    let standby = 1 - leader;
    let standby_reconciles = sample(&replicas[standby].metrics(), "regcred_reconciles_total").unwrap_or(0.0);
    assert_eq!(standby_reconciles, 0.0, "the standby reconciled");
    // Both are ready: a standby that stayed unready would stall rolling updates and drains.
    for replica in &replicas {
        assert_eq!(admin_get(replica.admin_port, "/readyz").0, 200, "a replica is not ready");
    }

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    replicas[leader].kill();
    let takeover = change_and_wait(&client, &ns, "leader2").await;
    eprintln!("leader takeover after SIGKILL: {takeover:?} (lease duration 4 s)");
    assert!(takeover < Duration::from_secs(4 + 6), "takeover took {takeover:?}");
    assert_eq!(sample(&replicas[standby].metrics(), "regcred_leader "), Some(1.0));
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn a_leader_stopped_with_sigterm_releases_the_lease_and_the_standby_takes_it_at_once() {
    // A long Lease: a standby that waited for it to expire would take seconds.
    let (client, ns, mut replicas, leader) = two_replicas("15s").await;
    let lease_name = replicas_lease(&client, CONTROLLER_NAMESPACE, &ns).await;
    let leader_identity = format!("replica-{}", ["a", "b"][leader]);
    replicas[leader].terminate();
    // The Lease is given up (holder cleared), not left to expire…
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    eventually("the Lease released", TIMEOUT, || async {
        let lease = leases.get(&lease_name).await.ok()?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        (holder.as_deref() != Some(leader_identity.as_str())).then_some(())
    })
    .await;
    // …and the standby, which has been waiting for a while, takes it at once: it watches the
    // Lease, rather than sleeping until the old holder's term would have ended (at least the
    // 5-second renewal margin of a 15-second Lease).
    let takeover = change_and_wait(&client, &ns, "sigterm").await;
    eprintln!("leader takeover after SIGTERM: {takeover:?} (lease duration 15 s)");
    assert!(takeover < Duration::from_secs(3), "takeover took {takeover:?}");
    assert_eq!(sample(&replicas[1 - leader].metrics(), "regcred_leader "), Some(1.0));
}

/// Name of the Lease the test's replicas compete for (the one named after their label).
async fn replicas_lease(client: &kube::Client, lease_ns: &str, credential_ns: &str) -> String {
    let creds = Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), credential_ns);
    let cred = creds.get("cred").await.unwrap();
    let name = cred.metadata.labels.unwrap()[CONTROLLER_LABEL].clone();
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), lease_ns);
    assert!(leases.get_opt(&name).await.unwrap().is_some(), "no Lease {lease_ns}/{name}");
    name
}
