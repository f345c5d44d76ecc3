//! The defects that lived between the two controllers, each against the real apiserver (one
//! reconcile core now serves both kinds).

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use regcred::crd::{ClusterRegistryCredential, RegistryCredential};
use regcred_testenv::eventually;
use serde_json::json;

use crate::support::*;

const ECR_REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";

/// A Secret nobody at regcred wrote.
async fn foreign_secret(client: &kube::Client, ns: &str, name: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "type": "Opaque", "stringData": {"note": "someone else's"},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap();
}

/// Item 1: renaming a fan-out's Secret keeps the old one wherever the new name cannot be
/// written (a foreign Secret holds it), and replaces it everywhere else.
#[tokio::test]
async fn a_rename_keeps_the_old_secret_where_the_new_one_cannot_be_written() {
    env();
    let client = client().await;
    let source_ns = namespace(&client, "rn-src").await;
    let password = secret_value("u", "rename");
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let free = namespace(&client, "rn-free").await;
    let blocked = namespace(&client, "rn-blocked").await;
    foreign_secret(&client, &blocked, "new-pull").await;
    let name = format!("rn-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"names": [free, blocked]},
            "secret": {"name": "old-pull"},
        }),
    )
    .await;
    wait_cluster(&client, &name, "synced", |s| s.synced_namespaces == Some(2)).await;

    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let patch = json!({"spec": {"secret": {"name": "new-pull"}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let crc = wait_cluster(&client, &name, "the conflict reported", |s| {
        s.failures.iter().any(|f| f.namespace == blocked && f.reason == "SecretConflict")
    })
    .await;
    // A foreign Secret holds one namespace, not the credential (issue 20, item 5).
    let status = crc.status.unwrap().credential;
    let ready = status.condition("Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Synced"));
    let namespaces = status.condition("NamespacesSynced").unwrap();
    assert_eq!((namespaces.status.as_str(), namespaces.reason.as_str()), ("False", "SecretConflict"));
    wait_secret(&client, &free, "new-pull", "written", |s| logins(s)[0].2 == password).await;
    let old_in_free = Api::<Secret>::namespaced(client.clone(), &free);
    eventually("the old Secret replaced where the new one is written", TIMEOUT, || async {
        matches!(old_in_free.get_opt("old-pull").await, Ok(None)).then_some(())
    })
    .await;
    let kept = Api::<Secret>::namespaced(client.clone(), &blocked).get_opt("old-pull").await.unwrap();
    let kept = kept.expect("the namespace the new name failed in keeps its working pull Secret");
    assert_eq!(logins(&kept)[0].2, password);
}

/// Item 2: the labels regcred lists and trusts, and malformed keys, are refused at admission.
#[tokio::test]
async fn reserved_and_malformed_template_keys_are_refused() {
    env();
    let client = client().await;
    let ns = namespace(&client, "reserved").await;
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    for (field, key) in [
        ("labels", "regcred.dev/credential-uid"),
        ("labels", "app.kubernetes.io/managed-by"),
        ("annotations", "regcred.dev/anything"),
        ("labels", "not a key"),
    ] {
        let cr: RegistryCredential = serde_json::from_value(json!({
            "apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential",
            "metadata": {"name": "c", "namespace": ns},
            "spec": {"registry": "r.example.com",
                     "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}},
                     "secret": {field: {key: "x"}}},
        }))
        .unwrap();
        let refused = api.create(&PostParams::default(), &cr).await;
        assert!(
            matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422),
            "{field} {key:?} was accepted: {refused:?}"
        );
    }
}

/// Item 2: a Secret that merely carries a cluster credential's uid label is never treated as
/// that credential's (the owner reference decides).
#[tokio::test]
async fn a_copied_uid_label_proves_nothing() {
    env();
    let client = client().await;
    let ns = namespace(&client, "uid-label").await;
    // A tenant namespace whose ServiceAccount holds a "pull" entry regcred recorded, and a
    // Secret "pull" there that merely carries a cluster credential's uid label.
    let source_ns = namespace(&client, "reserved-src").await;
    let password = secret_value("u", "reserved");
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let other = namespace(&client, "reserved-other").await;
    let account: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "builder", "namespace": other,
                     "annotations": {"regcred.dev/added-image-pull-secrets": "pull"}},
        "imagePullSecrets": [{"name": "pull"}],
    }))
    .unwrap();
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &other);
    accounts.create(&PostParams::default(), &account).await.unwrap();
    let name = format!("reserved-{}", &unique()[..6]);
    let spec = json!({
        "registry": "r.example.com",
        "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
        "namespaces": {"names": [ns]},
        "secret": {"name": "pull"},
        "serviceAccounts": ["builder"],
    });
    let crc = create_cluster_credential(&client, &name, spec).await;
    wait_cluster(&client, &name, "synced", |s| s.synced_namespaces == Some(1)).await;
    let uid = crc.metadata.uid.unwrap();
    let lookalike: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pull", "namespace": other, "labels": {"regcred.dev/credential-uid": uid}},
        "type": "Opaque", "stringData": {"note": "a tenant's"},
    }))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &other);
    let created = secrets.create(&PostParams::default(), &lookalike).await.unwrap();
    // Its namespace is not a target: a credential that trusted the label would take it for one
    // of its own left behind, strip the tenant's ServiceAccount entry and delete it.
    // Two reconciles one after the other (each reads the source once): when the second has
    // read it, the first has finished all of its writes.
    let offset = audit_offset();
    for round in 0..2 {
        let read_from = audit_offset();
        let touch = json!({"metadata": {"annotations": {"touched": format!("{round}")}}});
        Api::<ClusterRegistryCredential>::all(client.clone())
            .patch(&name, &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        eventually("the credential reconciled again", TIMEOUT, || async {
            controller_requests_since(read_from)
                .iter()
                .any(|(verb, res, n, secret)| verb == "get" && res == "secrets" && *n == source_ns && secret == "src")
                .then_some(())
        })
        .await;
    }
    let writes: Vec<_> = controller_requests_since(offset)
        .into_iter()
        .filter(|(verb, _, namespace, _)| is_write(verb) && *namespace == other)
        .collect();
    assert!(writes.is_empty(), "the tenant's namespace was written: {writes:?}");
    let after = secrets.get("pull").await.unwrap();
    assert_eq!(after.metadata.resource_version, created.metadata.resource_version, "the look-alike was touched");
    let entries = accounts.get("builder").await.unwrap().image_pull_secrets.unwrap_or_default();
    assert_eq!(entries.len(), 1, "the tenant's entry was removed");
}

/// Item 3: after a rename into a name someone else holds, an ECR credential is not Ready,
/// although its token fetch succeeded and the old Secret still holds a valid token.
#[tokio::test]
async fn ready_is_false_when_the_secret_cannot_be_written_after_a_good_fetch() {
    env();
    let client = client().await;
    let ns = namespace(&client, "ready-ecr").await;
    create_aws_keys(&client, &env().aws, &ns, "keys", "ready").await;
    create_credential(
        &client,
        &ns,
        "ecr",
        json!({"source": {"ecr": {"registry": ECR_REGISTRY, "auth": {"secretRef": {"name": "keys"}}}}}),
    )
    .await;
    wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await;
    foreign_secret(&client, &ns, "taken").await;
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    api.patch("ecr", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"secret": {"name": "taken"}}})))
        .await
        .unwrap();
    wait_ready(&client, &ns, "ecr", "False", Some("SecretConflict")).await;
    // The old Secret still serves pulls until the new one can be written.
    wait_secret(&client, &ns, "ecr", "kept", |_| true).await;
}

/// Item 4: a deleted credential's metric series go with it.
#[tokio::test]
async fn deletion_drops_the_credentials_metric_series() {
    let port = env().controller.admin_port;
    let client = client().await;
    let ns = namespace(&client, "forget").await;
    create_aws_keys(&client, &env().aws, &ns, "keys", "forget").await;
    let spec = json!({"source": {"ecr": {"registry": ECR_REGISTRY, "auth": {"secretRef": {"name": "keys"}}}}});
    create_credential(&client, &ns, "ecr", spec).await;
    wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await;
    let object = format!("{{kind=\"RegistryCredential\",namespace=\"{ns}\",name=\"ecr\"}}");
    let (expiry, ready) =
        (format!("regcred_token_expiry_timestamp_seconds{object}"), format!("regcred_credential_ready{object}"));
    eventually("the credential's series published", TIMEOUT, || async {
        sample(&admin_get(port, "/metrics").1, &expiry).map(|_| ())
    })
    .await;

    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    api.delete("ecr", &DeleteParams::default()).await.unwrap();
    eventually("the deleted credential's series gone", TIMEOUT, || async {
        let metrics = admin_get(port, "/metrics").1;
        (sample(&metrics, &expiry).is_none() && sample(&metrics, &ready).is_none()).then_some(())
    })
    .await;
}

/// Item 9: a credential deleted and recreated at once under the same name (`kubectl replace
/// --force`) gets a status of its own, not the old object's remembered one.
#[tokio::test]
async fn a_credential_recreated_at_once_gets_its_own_status() {
    env();
    let client = client().await;
    let ns = namespace(&client, "recreate").await;
    let password = secret_value("u", "recreate");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential(&client, &ns, "cred", spec.clone()).await;
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    api.delete("cred", &DeleteParams::default()).await.unwrap();
    eventually("deleted", TIMEOUT, || async { matches!(api.get_opt("cred").await, Ok(None)).then_some(()) }).await;
    let recreated = create_credential(&client, &ns, "cred", spec).await;
    let cr = wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    assert_eq!(cr.metadata.uid, recreated.metadata.uid);
}

/// Item 14: a password file's trailing newline is removed, as `docker login --password-stdin`
/// does, and the Ready message says so without the value.
#[tokio::test]
async fn a_trailing_newline_is_removed_and_reported() {
    env();
    let client = client().await;
    let ns = namespace(&client, "newline").await;
    let password = secret_value("u", "newline");
    create_secret(&client, &ns, "src", &[("password", format!("{password}\n").as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "cred",
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}}),
    )
    .await;
    let cr = wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    let secret = wait_secret(&client, &ns, "cred", "written", |_| true).await;
    assert_eq!(logins(&secret)[0].2, password, "the newline went to the registry");
    let ready = cr.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains("ended in a line break"), "{}", ready.message);
    assert!(!ready.message.contains(&password));
}

/// Item 5: `--no-secret-watch` works for both kinds under the RBAC it promises (no list or
/// watch on Secrets): Secrets are written, a renamed one replaced, and a cluster credential
/// with ServiceAccounts can be deleted (its entries are released, its finalizer goes).
#[tokio::test]
async fn no_secret_watch_works_without_list_or_watch_on_secrets() {
    let client = client().await;
    // The packaged ClusterRole, less list and watch on Secrets, for a ServiceAccount of its own.
    let name = format!("nowatch-{}", &unique()[..6]);
    let (_controller, _) =
        spawn_own_controller(&name, Some(&["get", "create", "patch", "delete"]), &["--no-secret-watch"]);

    let source_ns = namespace(&client, "nowatch-src").await;
    let password = secret_value("u", "nowatch");
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let target = namespace(&client, "nowatch").await;
    let account: ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "builder", "namespace": target},
    }))
    .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), &target).create(&PostParams::default(), &account).await.unwrap();
    let cluster = format!("{name}-c");
    create_cluster_credential_for(
        &client,
        &cluster,
        Some(&name),
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"names": [target]},
            "secret": {"name": "pull"},
            "serviceAccounts": ["builder"],
        }),
    )
    .await;
    wait_cluster(&client, &cluster, "synced", |s| s.synced_namespaces == Some(1)).await;
    wait_secret(&client, &target, "pull", "written", |s| logins(s)[0].2 == password).await;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &target);
    let entries =
        |a: &ServiceAccount| -> Vec<String> { a.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect() };
    eventually("the ServiceAccount patched", TIMEOUT, || async {
        (entries(&accounts.get("builder").await.ok()?) == ["pull"]).then_some(())
    })
    .await;

    // The namespaced kind, renamed: the old Secret goes once the new one is there.
    create_secret(&client, &target, "src", &[("password", password.as_bytes())]).await;
    let spec = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &target, "cred", Some(&name), spec).await;
    wait_secret(&client, &target, "cred", "written", |_| true).await;
    Api::<RegistryCredential>::namespaced(client.clone(), &target)
        .patch("cred", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"secret": {"name": "cred-renamed"}}})))
        .await
        .unwrap();
    wait_secret(&client, &target, "cred-renamed", "written", |_| true).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &target);
    eventually("the old name deleted", TIMEOUT, || async {
        matches!(secrets.get_opt("cred").await, Ok(None)).then_some(())
    })
    .await;

    // Deleting the cluster credential releases the entry and clears the finalizer.
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    api.delete(&cluster, &DeleteParams::default()).await.unwrap();
    eventually("the credential gone", TIMEOUT, || async {
        matches!(api.get_opt(&cluster).await, Ok(None)).then_some(())
    })
    .await;
    eventually("the entry released", TIMEOUT, || async {
        entries(&accounts.get("builder").await.ok()?).is_empty().then_some(())
    })
    .await;
}

/// Item 8: an older RegistryCredential that takes over a Secret a ClusterRegistryCredential
/// created writes it once, then leaves it alone (no apply and no `Updated` Event per pass).
#[tokio::test]
async fn a_takeover_across_kinds_settles_after_one_write() {
    env();
    let client = client().await;
    let ns = namespace(&client, "takeover").await;
    let password = secret_value("u", "takeover-ns");
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    // The namespaced credential is the older one; it writes another name first.
    let older = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}},
                       "secret": {"name": "first"}});
    let created = create_credential(&client, &ns, "older", older).await;
    wait_ready(&client, &ns, "older", "True", Some("Synced")).await;
    let second = created.metadata.creation_timestamp.unwrap().0.as_second();
    eventually("the next second", TIMEOUT, || async {
        (k8s_openapi::jiff::Timestamp::now().as_second() > second).then_some(())
    })
    .await;
    let source_ns = namespace(&client, "takeover-src").await;
    let cluster_password = secret_value("u", "takeover-cluster");
    create_secret(&client, &source_ns, "src", &[("password", cluster_password.as_bytes())]).await;
    let cluster = format!("takeover-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &cluster,
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"names": [ns]},
            "secret": {"name": "pull"},
        }),
    )
    .await;
    wait_secret(&client, &ns, "pull", "written by the cluster credential", |s| logins(s)[0].2 == cluster_password)
        .await;

    // The older one now wants the same name: it takes the Secret over.
    Api::<RegistryCredential>::namespaced(client.clone(), &ns)
        .patch("older", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"secret": {"name": "pull"}}})))
        .await
        .unwrap();
    let taken = wait_secret(&client, &ns, "pull", "taken over", |s| logins(s)[0].2 == password).await;
    wait_ready(&client, &ns, "older", "True", Some("Synced")).await;
    let uid_label = taken.metadata.labels.unwrap()["regcred.dev/credential-uid"].clone();
    assert_eq!(Some(uid_label), created.metadata.uid, "the uid label names the new holder");

    // The cluster credential has seen that it lost the namespace…
    wait_cluster(&client, &cluster, "the conflict reported", |s| {
        s.failures.iter().any(|f| f.namespace == ns && f.reason == "SecretConflict")
    })
    .await;
    // …and reconciles of both now write nothing (nor try to).
    let offset = audit_offset();
    for round in 0..2 {
        let read_from = audit_offset();
        let touch = json!({"metadata": {"annotations": {"touched": format!("{round}")}}});
        Api::<RegistryCredential>::namespaced(client.clone(), &ns)
            .patch("older", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        Api::<ClusterRegistryCredential>::all(client.clone())
            .patch(&cluster, &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        eventually("both reconciled", TIMEOUT, || async {
            let reads = controller_requests_since(read_from);
            let read =
                |n: &str| reads.iter().any(|(v, r, ns2, s)| v == "get" && r == "secrets" && ns2 == n && s == "src");
            (read(&ns) && read(&source_ns)).then_some(())
        })
        .await;
    }
    let writes: Vec<_> = controller_requests_since(offset)
        .into_iter()
        .filter(|(verb, resource, n, _)| is_write(verb) && resource == "secrets" && *n == ns)
        .collect();
    assert!(writes.is_empty(), "the taken-over Secret keeps being written: {writes:?}");
}

/// Item 12: in steady state a fan-out with ServiceAccounts reads none of them: the metadata
/// store tells that each still holds the Secret at the resourceVersion last checked.
#[tokio::test]
async fn steady_state_reads_no_service_account() {
    let client = client().await;
    let controller = format!("sa-quiet-{}", &unique()[..6]);
    let spawned_from = audit_offset();
    let (_controller, user) = spawn_own_controller(&controller, None, &[]);
    // Its ServiceAccount watch has made its first list (readiness waits for the credential
    // caches only): what is counted below is the reconciles' reading, not the watch's start.
    eventually("the ServiceAccount watch listed", TIMEOUT, || async {
        let requests = requests_of_since(&user, spawned_from);
        requests.iter().any(|(verb, res, _, _)| verb == "watch" && res == "serviceaccounts").then_some(())
    })
    .await;
    let source_ns = namespace(&client, "sa-quiet-src").await;
    create_secret(&client, &source_ns, "src", &[("password", secret_value("u", "sa-quiet").as_bytes())]).await;
    let team = format!("team-{}", &unique()[..6]);
    let targets = [
        labelled_namespace(&client, "sa-quiet", &[("team", &team)]).await,
        labelled_namespace(&client, "sa-quiet", &[("team", &team)]).await,
    ];
    let name = format!("{controller}-c");
    let created_from = audit_offset();
    create_cluster_credential_for(
        &client,
        &name,
        Some(&controller),
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
            "secret": {"name": "pull"},
            "serviceAccounts": ["default"],
        }),
    )
    .await;
    for ns in &targets {
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
        eventually("the default ServiceAccount patched", TIMEOUT, || async {
            let account = accounts.get_opt("default").await.ok()??;
            account.image_pull_secrets?.iter().any(|r| r.name == "pull").then_some(())
        })
        .await;
    }
    for round in 0..3 {
        let read_from = audit_offset();
        let touch = json!({"metadata": {"annotations": {"touched": format!("{round}")}}});
        Api::<ClusterRegistryCredential>::all(client.clone())
            .patch(&name, &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        eventually("the credential reconciled", TIMEOUT, || async {
            requests_of_since(&user, read_from)
                .iter()
                .any(|(verb, res, n, secret)| verb == "get" && res == "secrets" && *n == source_ns && secret == "src")
                .then_some(())
        })
        .await;
    }
    // This controller has an identity of its own: every request counted here is its own. Each
    // ServiceAccount is read once, before regcred patches it; what regcred's own patch made
    // of it (the reconciles its watch event and the touches trigger) needs no read.
    let reads: Vec<_> = requests_of_since(&user, created_from)
        .into_iter()
        .filter(|(verb, res, _, _)| res == "serviceaccounts" && (verb == "get" || verb == "list"))
        .collect();
    let expected: Vec<_> = targets.iter().map(|ns| ("get".to_string(), ns.clone())).collect();
    let mut seen: Vec<_> = reads.iter().map(|(verb, _, ns, _)| (verb.clone(), ns.clone())).collect();
    seen.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(seen, expected, "ServiceAccounts read more than once before being patched: {reads:?}");
}

/// Item 7: ServiceAccount entries are released from their annotation, so a foreground
/// deletion (the garbage collector removes the Secrets first) still leaves no entry behind.
#[tokio::test]
async fn foreground_deletion_releases_service_account_entries() {
    let client = client().await;
    let controller = format!("fg-{}", &unique()[..6]);
    let spawn = || spawn_labelled(&controller, &[], &[]);
    let mut running = spawn();
    let source_ns = namespace(&client, "fg-src").await;
    create_secret(&client, &source_ns, "src", &[("password", secret_value("u", "foreground").as_bytes())]).await;
    let target = namespace(&client, "fg").await;
    let name = format!("{controller}-c");
    create_cluster_credential_for(
        &client,
        &name,
        Some(&controller),
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"names": [target]},
            "secret": {"name": "pull"},
            "serviceAccounts": ["default"],
        }),
    )
    .await;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &target);
    let entries = || async {
        let account = accounts.get_opt("default").await.ok()??;
        Some(account.image_pull_secrets.unwrap_or_default().into_iter().map(|r| r.name).collect::<Vec<_>>())
    };
    eventually("the entry added", TIMEOUT, || async { (entries().await? == ["pull"]).then_some(()) }).await;

    // Deleted while no controller runs: the garbage collector removes the Secret first, so
    // nothing but the ServiceAccount's annotation tells where the entries are.
    running.kill();
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    api.delete(&name, &DeleteParams::foreground()).await.unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &target);
    eventually("the Secret deleted first", TIMEOUT, || async {
        matches!(secrets.get_opt("pull").await, Ok(None)).then_some(())
    })
    .await;
    let _running = spawn();
    eventually("the credential gone", TIMEOUT, || async { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) })
        .await;
    eventually("the entry released", TIMEOUT, || async { entries().await?.is_empty().then_some(()) }).await;
}

/// Item 11: a cleanup that fails (here: the controller may not delete Secrets) is one more
/// failure in status; it does not discard what the rest of the fan-out did.
#[tokio::test]
async fn a_failed_cleanup_keeps_the_rest_of_the_fan_out() {
    let client = client().await;
    let name = format!("nodelete-{}", &unique()[..6]);
    let (_controller, _) = spawn_own_controller(&name, Some(&["get", "list", "watch", "create", "patch"]), &[]);
    let source_ns = namespace(&client, "nodelete-src").await;
    create_secret(&client, &source_ns, "src", &[("password", secret_value("u", "nodelete").as_bytes())]).await;
    let [a, b, c] = [
        namespace(&client, "nodelete-a").await,
        namespace(&client, "nodelete-b").await,
        namespace(&client, "nodelete-c").await,
    ];
    let cluster = format!("{name}-c");
    let spec = |names: [&String; 2]| {
        json!({
            "registry": "r.example.com",
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"names": names},
            "secret": {"name": "pull"},
        })
    };
    create_cluster_credential_for(&client, &cluster, Some(&name), spec([&a, &b])).await;
    wait_cluster(&client, &cluster, "synced", |s| s.synced_namespaces == Some(2)).await;

    // b stops being selected (its Secret cannot be deleted), c starts.
    let patch = json!({"spec": spec([&a, &c])});
    Api::<ClusterRegistryCredential>::all(client.clone())
        .patch(&cluster, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let crc = wait_cluster(&client, &cluster, "the failed removal reported", |s| {
        s.failures.iter().any(|f| f.namespace == b && f.reason == "KubernetesApiError")
    })
    .await;
    let status = crc.status.unwrap();
    assert_eq!((status.target_namespaces, status.synced_namespaces), (Some(2), Some(2)), "{status:?}");
    wait_secret(&client, &c, "pull", "written in the new target", |_| true).await;
    let ready = status.credential.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "CleanupFailed"), "a Secret is left behind");
}
