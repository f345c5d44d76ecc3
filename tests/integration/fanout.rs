//! ClusterRegistryCredential: one credential, a Secret in every selected namespace, following
//! namespaces as they come, go and change labels.

use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use regcred::crd::ClusterRegistryCredential;
use regcred_testenv::{Registry, eventually};
use serde_json::json;

use crate::support::*;

const PULL: &str = "regcred-pull";

/// Waits until the namespace's pull Secret holds exactly this password (None: is absent).
async fn wait_pull_secret(client: &kube::Client, ns: &str, password: Option<&str>) {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    eventually(
        &format!("{ns}/{PULL} holding {}", if password.is_some() { "the password" } else { "nothing" }),
        TIMEOUT,
        || async {
            let secret = api.get_opt(PULL).await.ok()?;
            let matches = match (&secret, password) {
                (None, None) => true,
                (Some(secret), Some(password)) => logins(secret).iter().map(|l| l.2.as_str()).eq([password]),
                _ => false,
            };
            matches.then_some(())
        },
    )
    .await
}

#[tokio::test]
async fn fans_out_to_selected_namespaces_and_follows_them() {
    env();
    let client = client().await;
    let team = format!("team-{}", &unique()[..6]);
    let source_ns = namespace(&client, "fan-src").await;
    let password = secret_value("robot", "fanout");
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let a1 = labelled_namespace(&client, "fan-a", &[("team", &team)]).await;
    let listed = namespace(&client, "fan-listed").await;
    let excluded = labelled_namespace(&client, "fan-x", &[("team", &team)]).await;
    let unrelated = namespace(&client, "fan-other").await;

    let name = format!("fan-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({
            "registry": "registry.example.com",
            "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}, "names": [listed], "exclude": [excluded]},
            "secret": {"name": PULL},
        }),
    )
    .await;
    wait_cluster(&client, &name, "both namespaces synced", |s| {
        s.target_namespaces == Some(2) && s.synced_namespaces == Some(2) && s.failed_namespaces == Some(0)
    })
    .await;
    for ns in [&a1, &listed] {
        wait_pull_secret(&client, ns, Some(&password)).await;
    }
    for ns in [&excluded, &unrelated, &source_ns] {
        assert!(Api::<Secret>::namespaced(client.clone(), ns).get_opt(PULL).await.unwrap().is_none(), "{ns} got one");
    }

    // A namespace created later gets it; one relabelled out loses it.
    let a2 = labelled_namespace(&client, "fan-a", &[("team", &team)]).await;
    wait_pull_secret(&client, &a2, Some(&password)).await;
    let relabel = json!({"metadata": {"labels": {"team": "elsewhere"}}});
    Api::<Namespace>::all(client.clone()).patch(&a1, &PatchParams::default(), &Patch::Merge(&relabel)).await.unwrap();
    wait_pull_secret(&client, &a1, None).await;
    wait_cluster(&client, &name, "2 targets after the relabel", |s| {
        s.target_namespaces == Some(2) && s.synced_namespaces == Some(2)
    })
    .await;

    // A source change reaches every namespace.
    let rotated = secret_value("robot", "fanout-rotated");
    set_secret_key(&client, &source_ns, "src", "password", rotated.as_bytes()).await;
    for ns in [&listed, &a2] {
        wait_pull_secret(&client, ns, Some(&rotated)).await;
    }

    // A terminating namespace is skipped without an error.
    Api::<Namespace>::all(client.clone()).delete(&a2, &DeleteParams::default()).await.unwrap();
    wait_cluster(&client, &name, "1 target, no failure", |s| {
        s.target_namespaces == Some(1) && s.failed_namespaces == Some(0)
    })
    .await;
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn deleting_the_cluster_credential_removes_its_secrets() {
    env();
    let client = client().await;
    let team = format!("team-{}", &unique()[..6]);
    let source_ns = namespace(&client, "fan-src").await;
    create_secret(&client, &source_ns, "src", &[("password", secret_value("u", "fan-del").as_bytes())]).await;
    let targets = [
        labelled_namespace(&client, "fan-del", &[("team", &team)]).await,
        labelled_namespace(&client, "fan-del", &[("team", &team)]).await,
    ];
    let name = format!("fan-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
        }),
    )
    .await;
    wait_cluster(&client, &name, "2 synced", |s| s.synced_namespaces == Some(2)).await;
    for ns in &targets {
        wait_secret(&client, ns, &name, "written", |_| true).await;
    }
    Api::<ClusterRegistryCredential>::all(client.clone()).delete(&name, &DeleteParams::default()).await.unwrap();
    for ns in &targets {
        let api = Api::<Secret>::namespaced(client.clone(), ns);
        eventually(&format!("{ns}/{name} removed"), TIMEOUT, || async {
            api.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn references_without_a_namespace_are_refused_for_cluster_credentials() {
    env();
    let client = client().await;
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let crc: ClusterRegistryCredential = serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "ClusterRegistryCredential",
        "metadata": {"name": format!("fan-{}", &unique()[..6])},
        "spec": {"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}},
    }))
    .unwrap();
    let refused = api.create(&Default::default(), &crc).await.expect_err("no namespace in a reference");
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 422 && s.message.contains("need a namespace")),
        "{refused}"
    );

    // And a namespaced credential may not name another namespace.
    let ns = namespace(&client, "fan-ref").await;
    let cr: regcred::crd::RegistryCredential = serde_json::from_value(json!({
        "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
        "metadata": {"name": "cross", "namespace": ns},
        "spec": {"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": "kube-system"}}}},
    }))
    .unwrap();
    let refused = Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &cr)
        .await
        .expect_err("a cross-namespace reference");
    assert!(
        matches!(&refused, kube::Error::Api(s) if s.code == 422 && s.message.contains("its own namespace")),
        "{refused}"
    );
}

#[tokio::test]
async fn a_fanned_out_secret_pulls_from_a_real_registry() {
    env();
    let client = client().await;
    let password = secret_value("puller", "fan-registry");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    let image = registry.push_test_image("team/app", "v1", "puller", &password).unwrap();
    let source_ns = namespace(&client, "fan-src").await;
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let target = namespace(&client, "fan-pull").await;
    let name = format!("fan-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({
            "registry": registry.host(),
            "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"names": [target]},
        }),
    )
    .await;
    let secret = wait_secret(&client, &target, &name, "written", |_| true).await;
    let auth_file = secret.data.as_ref().unwrap()[".dockerconfigjson"].0.clone();
    registry.pull_with_auth_file(&image, &auth_file).expect("the fanned-out Secret pulls");
}

#[tokio::test]
async fn the_older_credential_keeps_a_contested_secret() {
    env();
    let client = client().await;
    let source_ns = namespace(&client, "fan-src").await;
    let old_password = secret_value("u", "older");
    let new_password = secret_value("u", "newer");
    create_secret(&client, &source_ns, "old", &[("password", old_password.as_bytes())]).await;
    create_secret(&client, &source_ns, "new", &[("password", new_password.as_bytes())]).await;
    let target = namespace(&client, "fan-contest").await;
    let spec = |source: &str, names: Vec<String>| {
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": source, "namespace": source_ns}}},
            "namespaces": {"names": names},
            "secret": {"name": PULL},
        })
    };
    // The older credential first targets nothing, so the newer one writes the Secret…
    let older = format!("fan-old-{}", &unique()[..6]);
    let created = create_cluster_credential(&client, &older, spec("old", vec!["fan-nothing-here".into()])).await;
    wait_cluster(&client, &older, "no targets", |s| s.target_namespaces == Some(0)).await;
    // creationTimestamp has whole seconds (a tie goes to the smaller uid): make "older" true.
    let second = created.metadata.creation_timestamp.unwrap().0.as_second();
    eventually("the next second", TIMEOUT, || async {
        (k8s_openapi::jiff::Timestamp::now().as_second() > second).then_some(())
    })
    .await;
    let newer = format!("fan-new-{}", &unique()[..6]);
    create_cluster_credential(&client, &newer, spec("new", vec![target.clone()])).await;
    wait_pull_secret(&client, &target, Some(&new_password)).await;

    // …then the older one targets the namespace too, and takes the Secret over.
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let patch = json!({"spec": {"namespaces": {"names": [target]}}});
    api.patch(&older, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_pull_secret(&client, &target, Some(&old_password)).await;
    wait_cluster(&client, &older, "synced", |s| s.synced_namespaces == Some(1)).await;
    let loser = wait_cluster(&client, &newer, "the conflict reported", |s| {
        s.failures.iter().any(|f| f.namespace == target && f.reason == "SecretConflict")
    })
    .await;
    assert_eq!(loser.status.unwrap().failed_namespaces, Some(1));

    // No flapping: reconciles of both (a touched annotation each) leave the Secret alone.
    let secrets = Api::<Secret>::namespaced(client.clone(), &target);
    let before = secrets.get(PULL).await.unwrap().metadata.resource_version;
    let offset = audit_offset();
    for name in [&older, &newer] {
        let touch = json!({"metadata": {"annotations": {"touched": unique()}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&touch)).await.unwrap();
    }
    // The newer one (the only one that could take the Secret back) reads the contested
    // Secret on each reconcile; other tests' credentials never read it.
    eventually("the newer credential reconciled again", TIMEOUT, || async {
        controller_requests_since(offset)
            .iter()
            .any(|(verb, resource, ns, name)| verb == "get" && resource == "secrets" && *ns == target && name == PULL)
            .then_some(())
    })
    .await;
    let writes: Vec<_> = controller_requests_since(offset)
        .into_iter()
        .filter(|(verb, resource, ns, _)| is_write(verb) && resource == "secrets" && *ns == target)
        .collect();
    assert!(writes.is_empty(), "the contested Secret was written again: {writes:?}");
    assert_eq!(secrets.get(PULL).await.unwrap().metadata.resource_version, before);
    let owners = secrets.get(PULL).await.unwrap().metadata.owner_references.unwrap();
    assert_eq!(owners.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), [older.as_str()]);
}

/// Issue 20, item 5: a tenant's own Secret with the fan-out's name holds one namespace, not
/// the credential. That namespace is reported (`NamespacesSynced=False`, reason
/// `SecretConflict`, in `status.failures`), `Ready` stays True, every other namespace is
/// synced, and the tenant's Secret is never written. Once the tenant deletes it, regcred's
/// Secret takes its place.
#[tokio::test]
async fn a_tenants_own_secret_is_reported_without_holding_ready_hostage() {
    env();
    let admin = client().await;
    let team = format!("hostage-{}", &unique()[..6]);
    let source_ns = namespace(&admin, "hostage-src").await;
    let password = secret_value("robot", "hostage");
    create_secret(&admin, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let free = [
        labelled_namespace(&admin, "hostage-free", &[("team", &team)]).await,
        labelled_namespace(&admin, "hostage-free", &[("team", &team)]).await,
    ];
    let held = labelled_namespace(&admin, "hostage-held", &[("team", &team)]).await;
    // The tenant's own pull Secret, made with its `edit` role, under the fan-out's name.
    let tenant = tenant(&admin, &held).await;
    let theirs = secret_value("tenant", "own-pull");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("tenant:{theirs}"));
    let config = json!({"auths": {"registry.example.com": {"username": "tenant", "password": theirs, "auth": auth}}});
    let own: Secret = serde_json::from_value(json!({
        "metadata": {"name": PULL},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()},
    }))
    .unwrap();
    let tenant_secrets = Api::<Secret>::namespaced(tenant.clone(), &held);
    let own = tenant_secrets.create(&Default::default(), &own).await.expect("an editor may create Secrets");

    let name = format!("hostage-{}", &unique()[..6]);
    create_cluster_credential(
        &admin,
        &name,
        json!({
            "registry": "registry.example.com",
            "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
            "secret": {"name": PULL},
        }),
    )
    .await;
    let condition = |s: &regcred::crd::ClusterCredentialStatus, type_: &str| s.credential.condition(type_).cloned();
    let crc = wait_cluster(&admin, &name, "Ready, the held namespace reported as a conflict", |s| {
        s.target_namespaces == Some(3)
            && s.synced_namespaces == Some(2)
            && s.failed_namespaces == Some(1)
            && condition(s, "Ready").is_some_and(|c| c.status == "True" && c.reason == "Synced")
            && condition(s, "NamespacesSynced").is_some_and(|c| c.status == "False" && c.reason == "SecretConflict")
    })
    .await;
    let status = crc.status.unwrap();
    let failures: Vec<_> = status.failures.iter().map(|f| (f.namespace.as_str(), f.reason.as_str())).collect();
    assert_eq!(failures, [(held.as_str(), "SecretConflict")]);
    let message = condition(&status, "NamespacesSynced").unwrap().message;
    assert!(message.contains("1 of 3"), "{message}");
    for ns in &free {
        wait_pull_secret(&admin, ns, Some(&password)).await;
    }
    wait_event(&admin, "default", "ClusterRegistryCredential", &name, "Warning", "SecretConflict").await;
    let now = tenant_secrets.get(PULL).await.unwrap();
    assert_eq!(now.metadata.resource_version, own.metadata.resource_version, "the tenant's Secret was written");
    assert!(now.metadata.owner_references.is_none(), "the tenant's Secret was taken");

    // The tenant gives the name up: regcred's Secret takes its place.
    tenant_secrets.delete(PULL, &DeleteParams::default()).await.unwrap();
    wait_pull_secret(&admin, &held, Some(&password)).await;
    wait_cluster(&admin, &name, "every namespace synced", |s| {
        s.synced_namespaces == Some(3)
            && s.failures.is_empty()
            && condition(s, "NamespacesSynced").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_no_leaks(&admin).await;
}

/// Issue 20, item 5: `kubectl delete --cascade=orphan` of a ClusterRegistryCredential, then the
/// same credential applied again (a GitOps re-sync), and of a RegistryCredential whose
/// namespace the new one selects (a migration to the cluster kind). The garbage collector
/// strips the deleted credentials' owner references from their Secrets; the new credential (a
/// new uid) adopts them (the same Secret objects, now controlled by it) instead of reporting a
/// SecretConflict in every namespace.
#[tokio::test]
async fn an_orphaned_fan_out_is_adopted_by_the_re_created_credential() {
    env();
    let client = client().await;
    let team = format!("orphan-{}", &unique()[..6]);
    let source_ns = namespace(&client, "orphan-src").await;
    let password = secret_value("robot", "orphan");
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(labelled_namespace(&client, "orphan", &[("team", &team)]).await);
    }
    let name = format!("orphan-{}", &unique()[..6]);
    let spec = json!({
        "registry": "registry.example.com",
        "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
        "namespaces": {"selector": {"matchLabels": {"team": team}}},
        "secret": {"name": PULL},
    });
    // One more target, which the re-created credential will no longer select.
    let leaving = labelled_namespace(&client, "orphan-leaving", &[("team", &team)]).await;
    let first = create_cluster_credential(&client, &name, spec.clone()).await;
    wait_cluster(&client, &name, "4 synced", |s| s.synced_namespaces == Some(4)).await;
    // A namespace with a RegistryCredential of its own, to be migrated to the cluster kind.
    let migrated = namespace(&client, "orphan-migrated").await;
    create_secret(&client, &migrated, "src", &[("password", password.as_bytes())]).await;
    create_credential(
        &client,
        &migrated,
        "own",
        json!({"registry": "registry.example.com", "secret": {"name": PULL},
               "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src"}}}}),
    )
    .await;
    wait_ready(&client, &migrated, "own", "True", Some("Synced")).await;

    let orphan =
        || DeleteParams { propagation_policy: Some(kube::api::PropagationPolicy::Orphan), ..Default::default() };
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    api.delete(&name, &orphan()).await.unwrap();
    let namespaced = Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), &migrated);
    namespaced.delete("own", &orphan()).await.unwrap();
    targets.push(migrated.clone());
    let mut orphans = Vec::new();
    for ns in &targets {
        let secrets = Api::<Secret>::namespaced(client.clone(), ns);
        orphans.push(
            eventually(&format!("{ns}/{PULL} orphaned"), TIMEOUT, || async {
                let secret = secrets.get_opt(PULL).await.ok()??;
                secret.metadata.owner_references.as_ref().is_none_or(Vec::is_empty).then_some(secret)
            })
            .await,
        );
    }
    eventually("both credentials gone", TIMEOUT, || async {
        (api.get_opt(&name).await.ok()?.is_none() && namespaced.get_opt("own").await.ok()?.is_none()).then_some(())
    })
    .await;

    let secrets = Api::<Secret>::namespaced(client.clone(), &leaving);
    let left = eventually("the leaving namespace's Secret orphaned", TIMEOUT, || async {
        let secret = secrets.get_opt(PULL).await.ok()??;
        secret.metadata.owner_references.as_ref().is_none_or(Vec::is_empty).then_some(secret)
    })
    .await;

    // Applied again, now also selecting the migrated namespace, and excluding the leaving one.
    let relabel = json!({"metadata": {"labels": {"team": team}}});
    Api::<Namespace>::all(client.clone())
        .patch(&migrated, &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    let mut spec = spec;
    spec["namespaces"]["exclude"] = json!([leaving]);
    let second = create_cluster_credential(&client, &name, spec).await;
    let new_uid = second.metadata.uid.clone().unwrap();
    assert_ne!(first.metadata.uid, second.metadata.uid);
    let crc = wait_cluster(&client, &name, "4 synced, Ready", |s| {
        s.synced_namespaces == Some(4)
            && s.failed_namespaces == Some(0)
            && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
            && s.credential.condition("NamespacesSynced").is_some_and(|c| c.status == "True")
    })
    .await;
    assert!(crc.status.unwrap().failures.is_empty(), "a conflict was reported");
    for orphan in &orphans {
        let ns = orphan.metadata.namespace.as_deref().unwrap();
        let now = Api::<Secret>::namespaced(client.clone(), ns).get(PULL).await.unwrap();
        assert_eq!(now.metadata.uid, orphan.metadata.uid, "{ns}: not adopted but replaced");
        let owners = now.metadata.owner_references.clone().unwrap_or_default();
        assert!(owners.iter().any(|o| o.controller == Some(true) && o.uid == new_uid), "{ns}: not adopted: {owners:?}");
        assert_eq!(now.metadata.labels.as_ref().unwrap()["regcred.dev/credential-uid"], new_uid, "{ns}");
        assert_eq!(logins(&now)[0].2, password);
    }
    let kept = secrets.get(PULL).await.unwrap();
    assert_eq!(
        kept.metadata.resource_version, left.metadata.resource_version,
        "an orphan outside the targets was written"
    );
    let events = events_for(&client, "default", "ClusterRegistryCredential", &name).await;
    assert!(!events.iter().any(|e| e.1 == "SecretConflict"), "{events:?}");
    assert_no_leaks(&client).await;
}

/// Issue 20, item 14: `--write-qps` paces the controller's writes. With 4 a second and a burst
/// of 1, the 12 Secrets of a fan-out (and its status patch and Event) reach the apiserver at
/// least a quarter of a second apart on average, as its audit log timestamps them; a Lease
/// renewal is never paced.
#[tokio::test]
async fn write_qps_spreads_a_fan_outs_writes() {
    let client = client().await;
    let name = format!("paced-{}", &unique()[..6]);
    let (_controller, user) = spawn_own_controller(&name, None, &["--write-qps", "4", "--write-burst", "1"]);
    let source_ns = namespace(&client, "paced-src").await;
    create_secret(&client, &source_ns, "src", &[("password", secret_value("u", "paced").as_bytes())]).await;
    let mut targets = Vec::new();
    for _ in 0..12 {
        targets.push(labelled_namespace(&client, "paced", &[("paced", &name)]).await);
    }
    let offset = audit_offset();
    create_cluster_credential_for(
        &client,
        &format!("{name}-c"),
        Some(&name),
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"paced": name}}},
            "secret": {"name": "pull"},
        }),
    )
    .await;
    for ns in &targets {
        eventually("the Secret written", TIMEOUT, || async {
            Api::<Secret>::namespaced(client.clone(), ns).get_opt("pull").await.ok()?.map(|_| ())
        })
        .await;
    }
    let log = env().cp.read_audit_log(offset, None).unwrap();
    let writes: Vec<k8s_openapi::jiff::Timestamp> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| e["user"]["username"] == user.as_str() && e["stage"] == "ResponseComplete")
        .filter(|e| ["create", "patch", "update", "delete"].contains(&e["verb"].as_str().unwrap_or_default()))
        .filter(|e| e["objectRef"]["resource"] != "leases")
        .filter_map(|e| e["requestReceivedTimestamp"].as_str()?.parse().ok())
        .collect();
    assert!(writes.len() >= 12, "the Secrets' creates at least: {}", writes.len());
    let (first, last) = (writes.iter().min().unwrap(), writes.iter().max().unwrap());
    let span = last.duration_since(*first).as_secs_f64();
    // n writes at 4 a second after a burst of 1 need (n - 1) / 4 s; 20 ms for the audit
    // log's timestamps, which are taken when each request arrives.
    let needed = (writes.len() - 1) as f64 / 4.0 - 0.02;
    assert!(span >= needed, "{} writes in {span:.2} s; paced, they need {needed:.2} s", writes.len());
}

/// Issue 20, item 5: a tenant who fills their namespace's Secret quota (the platform's
/// ResourceQuota; their `edit` role creates Secrets up to it) makes regcred's write there fail
/// (403, exceeded quota). That is their namespace's failure, not the credential's: `Ready`
/// stays True for every other namespace's sake, `NamespacesSynced` and `status.failures` name
/// the namespace with a Warning Event, and the write is retried until the tenant frees the
/// quota.
#[tokio::test]
async fn a_tenant_who_fills_their_secret_quota_holds_no_ready_hostage() {
    env();
    let admin = client().await;
    let team = format!("quota-{}", &unique()[..6]);
    let source_ns = namespace(&admin, "quota-src").await;
    let password = secret_value("robot", "quota");
    create_secret(&admin, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let free = labelled_namespace(&admin, "quota-free", &[("team", &team)]).await;
    let held = labelled_namespace(&admin, "quota-held", &[("team", &team)]).await;
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "secrets"},
        "spec": {"hard": {"count/secrets": "1"}},
    }))
    .unwrap();
    let quotas = Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(admin.clone(), &held);
    quotas.create(&Default::default(), &quota).await.unwrap();
    // This control plane runs no resourcequota controller: the admin writes the usage it would
    // compute (quota admission itself counts each create into it).
    let usage = |used: &str| json!({"status": {"hard": {"count/secrets": "1"}, "used": {"count/secrets": used}}});
    quotas.patch_status("secrets", &PatchParams::default(), &Patch::Merge(usage("0"))).await.unwrap();
    let tenant = tenant(&admin, &held).await;
    let tenant_secrets = Api::<Secret>::namespaced(tenant, &held);
    let filler: Secret =
        serde_json::from_value(json!({"metadata": {"name": "filler"}, "stringData": {"k": "v"}})).unwrap();
    tenant_secrets.create(&Default::default(), &filler).await.expect("an editor may create Secrets up to the quota");

    let name = format!("quota-{}", &unique()[..6]);
    create_cluster_credential(
        &admin,
        &name,
        json!({
            "registry": "registry.example.com",
            "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
            "secret": {"name": PULL},
        }),
    )
    .await;
    let condition = |s: &regcred::crd::ClusterCredentialStatus, type_: &str| s.credential.condition(type_).cloned();
    let crc = wait_cluster(&admin, &name, "Ready, the held namespace reported as failing", |s| {
        s.target_namespaces == Some(2)
            && s.synced_namespaces == Some(1)
            && condition(s, "Ready").is_some_and(|c| c.status == "True" && c.reason == "Synced")
            && condition(s, "NamespacesSynced").is_some_and(|c| c.status == "False" && c.reason == "NamespacesFailed")
    })
    .await;
    let failures: Vec<_> = crc.status.unwrap().failures.into_iter().map(|f| (f.namespace, f.reason)).collect();
    assert_eq!(failures, [(held.clone(), "KubernetesApiError".to_string())]);
    wait_pull_secret(&admin, &free, Some(&password)).await;
    wait_event(&admin, "default", "ClusterRegistryCredential", &name, "Warning", "NamespacesFailed").await;

    // The tenant frees the quota: the retry writes the Secret there.
    tenant_secrets.delete("filler", &Default::default()).await.unwrap();
    quotas.patch_status("secrets", &PatchParams::default(), &Patch::Merge(usage("0"))).await.unwrap();
    wait_pull_secret(&admin, &held, Some(&password)).await;
    wait_cluster(&admin, &name, "every namespace synced", |s| {
        s.synced_namespaces == Some(2) && condition(s, "NamespacesSynced").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_no_leaks(&admin).await;
}
