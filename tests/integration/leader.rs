//! Leader election: of two replicas exactly one reconciles; when it dies the other takes over.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use regcred_testenv::eventually;
use serde_json::json;

use crate::{sources::base64_encode, support::*};

#[tokio::test]
async fn one_replica_leads_and_a_standby_takes_over_when_it_dies() {
    let cp = env().cp;
    let client = client().await;
    let name = format!("leader-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let args = ["--leader-elect", "--leader-election-lease", &name, "--leader-election-duration", "4s"];
    let mut replicas = [
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
    let standby = 1 - leader;
    let standby_reconciles = sample(&replicas[standby].metrics(), "regcred_reconciles_total").unwrap_or(0.0);
    assert_eq!(standby_reconciles, 0.0, "the standby reconciled");

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    replicas[leader].kill();
    let killed = Instant::now();
    let second = secret_value("u", "leader2");
    let patch = json!({"data": {"password": base64_encode(second.as_bytes())}});
    Api::<Secret>::namespaced(client.clone(), &ns)
        .patch("src", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_secret(&client, &ns, "cred", "updated by the new leader", |s| logins(s)[0].2 == second).await;
    let takeover = killed.elapsed();
    eprintln!("leader takeover after SIGKILL: {takeover:?} (lease duration 4 s)");
    assert!(takeover < Duration::from_secs(4 + 6), "takeover took {takeover:?}");
    assert_eq!(sample(&replicas[standby].metrics(), "regcred_leader "), Some(1.0));
    assert_no_leaks(&client).await;
}
