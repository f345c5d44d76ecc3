//! Steady state: reconciles that find nothing to change write nothing.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{Registry, eventually};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn reconciles_without_changes_make_no_writes() {
    env();
    let client = client().await;
    let ns = namespace(&client, "quiet").await;
    let password = secret_value("u", "quiet");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "cred",
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}}),
    )
    .await;
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    wait_event(&client, &ns, "RegistryCredential", "cred", "Normal", "Created").await;

    // Three triggers that must each cause a reconcile and no write: an annotation on the
    // credential, a label on the source Secret, a label on the managed Secret. Each is made
    // after the previous one was reconciled (the controller merges triggers that queue up).
    let start = audit_offset();
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let touch = json!({"metadata": {"annotations": {"touched": "yes"}}});
    for step in ["credential", "source Secret", "managed Secret"] {
        let offset = audit_offset();
        match step {
            "credential" => credentials.patch("cred", &PatchParams::default(), &Patch::Merge(&touch)).await.map(drop),
            "source Secret" => secrets.patch("src", &PatchParams::default(), &Patch::Merge(&touch)).await.map(drop),
            _ => secrets.patch("cred", &PatchParams::default(), &Patch::Merge(&touch)).await.map(drop),
        }
        .unwrap();
        // A reconcile reads its source before deciding.
        eventually(&format!("a reconcile after touching the {step}"), TIMEOUT, || async {
            let reads = controller_requests_since(offset);
            let source_read = |(verb, res, n, name): &(String, String, String, String)| {
                verb == "get" && res == "secrets" && *n == ns && name == "src"
            };
            reads.iter().any(source_read).then_some(())
        })
        .await;
    }
    let writes: Vec<_> =
        controller_requests_since(start).into_iter().filter(|(verb, _, n, _)| is_write(verb) && *n == ns).collect();
    assert!(writes.is_empty(), "the controller wrote in steady state: {writes:?}");
}

/// GetAuthorizationToken calls the emulator answered.
fn token_calls(aws: &regcred_testenv::AwsEmulator) -> usize {
    aws.calls().unwrap().iter().filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200).count()
}

/// Item 6 of the one-core issue: a restarted controller and a new leader make no Secret or
/// status write and no AWS call while the tokens in the live Secrets are not due, for both
/// kinds and for ECR.
#[tokio::test]
async fn restarts_and_leader_changes_make_no_writes_and_no_aws_calls() {
    let cp = env().cp;
    let client = client().await;
    let aws = regcred_testenv::AwsEmulator::start().unwrap();
    let name = format!("quiet-restart-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let leader_args = |id: &str| {
        [
            "--leader-elect".to_string(),
            "--leader-election-lease".into(),
            name.clone(),
            "--leader-election-namespace".into(),
            CONTROLLER_NAMESPACE.into(),
            "--leader-election-duration".into(),
            "3s".into(),
            "--instance".into(),
            id.into(),
        ]
    };
    // An identity of its own: every request of that user in the audit log is these replicas'.
    let (kubeconfig, user) = own_identity(&name, None);
    let spawn = |id: &str| {
        let args = leader_args(id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = [("KUBECONFIG", kubeconfig.display().to_string())];
        spawn_controller(cp, &format!("{name}-{id}"), &selector, &aws.endpoint(), &args, &env)
    };
    let mut first = spawn("a");

    // Both kinds, ECR: a RegistryCredential, and a ClusterRegistryCredential into two namespaces.
    let ns = namespace(&client, "quiet-ecr").await;
    create_aws_keys(&client, &aws, &ns, "keys", "quiet").await;
    let registry = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
    let source = json!({"ecr": {"registry": registry, "auth": {"secretRef": {"name": "keys"}}}});
    create_credential_for(&client, &ns, "ecr", Some(&name), json!({"source": source})).await;
    let targets = [namespace(&client, "quiet-t1").await, namespace(&client, "quiet-t2").await];
    let cluster_source =
        json!({"ecr": {"registry": registry, "auth": {"secretRef": {"name": "keys", "namespace": ns}}}});
    let cluster = format!("{name}-c");
    create_cluster_credential_for(
        &client,
        &cluster,
        Some(&name),
        json!({"source": cluster_source, "namespaces": {"names": targets}, "secret": {"name": "ecr-pull"}}),
    )
    .await;
    wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await;
    wait_cluster(&client, &cluster, "synced", |s| s.synced_namespaces == Some(2)).await;
    for target in &targets {
        wait_secret(&client, target, "ecr-pull", "written", |_| true).await;
    }
    // The token the Secrets hold (recorded for the leak check).
    for call in aws.calls().unwrap().iter().filter(|c| c["action"] == "ecr:GetAuthorizationToken") {
        if let Some(token) = call["authorizationData"][0]["authorizationToken"].as_str() {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD.decode(token).unwrap();
            record_secret(String::from_utf8_lossy(&decoded).trim_start_matches("AWS:"));
        }
    }

    // Whatever the first controller still writes after the first sync (status echoes) ends
    // before it stops; count from then on.
    let quiet_since = |offset: u64| {
        requests_of_since(&user, offset)
            .into_iter()
            .filter(|(verb, resource, _, _)| {
                is_write(verb)
                    && ["secrets", "registrycredentials", "clusterregistrycredentials", "serviceaccounts"]
                        .contains(&resource.as_str())
            })
            .collect::<Vec<_>>()
    };
    let reads_source_since = |offset: u64| {
        requests_of_since(&user, offset)
            .into_iter()
            .filter(|(verb, res, n, secret)| verb == "get" && res == "secrets" && *n == ns && secret == "keys")
            .count()
    };

    for (change, next) in [("restart", "b"), ("leader change", "c")] {
        let calls = token_calls(&aws);
        let offset = audit_offset();
        let second = match change {
            // SIGKILL of the only replica, then a new one: a crash and its restart.
            "restart" => {
                first.kill();
                spawn(next)
            }
            // The leader dies with a standby running: it takes over at Lease expiry.
            _ => {
                let standby = spawn(next);
                first.kill();
                standby
            }
        };
        // The new process has reconciled both credentials once each source read is seen twice
        // (one per credential).
        eventually(&format!("both credentials reconciled after the {change}"), TIMEOUT, || async {
            (reads_source_since(offset) >= 2).then_some(())
        })
        .await;
        // A touch makes one more reconcile of each; when it has read the source again, the
        // first reconciles have finished every write they were going to make.
        let touch = json!({"metadata": {"annotations": {"touched": change}}});
        Api::<RegistryCredential>::namespaced(client.clone(), &ns)
            .patch("ecr", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        Api::<regcred::crd::ClusterRegistryCredential>::all(client.clone())
            .patch(&cluster, &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        eventually(&format!("a second reconcile after the {change}"), TIMEOUT, || async {
            (reads_source_since(offset) >= 4).then_some(())
        })
        .await;
        let writes = quiet_since(offset);
        // The touches themselves are the test's writes, made as admin, not the controller's.
        assert!(writes.is_empty(), "after the {change} the controller wrote: {writes:?}");
        assert_eq!(token_calls(&aws), calls, "after the {change} the controller asked AWS for a token");
        first = second;
    }
}

/// Reconciles of RegistryCredentials a controller has run, from its `/metrics`.
fn reconciles(controller: &TestController) -> f64 {
    sample(&controller.metrics(), "regcred_reconciles_total{kind=\"RegistryCredential\"}").unwrap_or(0.0)
}

/// Waits until the controller has run `more` reconciles after `from`; returns the count then.
async fn reconciled(controller: &TestController, from: f64, more: f64) -> f64 {
    eventually(&format!("{more} more reconciles after {from}"), TIMEOUT, || async {
        let now = reconciles(controller);
        (now >= from + more).then_some(now)
    })
    .await
}

/// Issue 20, item 10: a token source (ECR: `expiresAt`, `nextRefreshAt`) and a verified
/// credential (`verifiedAt`) reconciled again and again without a change send no status
/// patch. The API keeps whole seconds of a time; a status that kept the sub-second part it
/// was built with differed from the one read back, and every reconcile patched it again.
#[tokio::test]
async fn token_sources_and_verified_credentials_patch_no_status_at_rest() {
    env();
    let client = client().await;
    let name = format!("quiet-rest-{}", &unique()[..6]);
    // A resync every second: each is a reconcile that finds nothing to change.
    let (controller, user) = spawn_own_controller(&name, None, &["--resync-interval", "1s"]);
    let ns = namespace(&client, "quiet-rest").await;
    create_aws_keys(&client, &env().aws, &ns, "keys", "rest").await;
    let ecr = json!({"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                             "auth": {"secretRef": {"name": "keys"}}}});
    create_credential_for(&client, &ns, "ecr", Some(&name), json!({"source": ecr})).await;
    let password = secret_value("puller", "rest");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    let verified = json!({"registry": registry.host(), "verify": {"insecure": true},
                          "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &ns, "verified", Some(&name), verified).await;

    let status = wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await.status.unwrap();
    assert!(status.expires_at.is_some() && status.next_refresh_at.is_some(), "{status:?}");
    wait_ready(&client, &ns, "verified", "True", Some("Synced")).await;
    crate::verify::wait_verified(&client, &ns, "verified", "True", "Verified").await;
    // Two resyncs of each: the writes of the first sync and the check are behind us.
    let settled = reconciled(&controller, reconciles(&controller), 4.0).await;

    let offset = audit_offset();
    // Ten resyncs of each, over about ten seconds: longer than the controller remembers its
    // own last write (after which it compares with the status the API serves).
    reconciled(&controller, settled, 20.0).await;
    let patches = status_patches_of_since(&user, offset);
    assert!(patches.is_empty(), "{} status patches at rest: {patches:?}", patches.len());
    let writes: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(verb, resource, _, _)| is_write(verb) && resource != "events")
        .collect();
    assert!(writes.is_empty(), "the controller wrote at rest: {writes:?}");
    assert_no_leaks(&client).await;
}
