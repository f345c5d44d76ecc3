//! A Secret regcred does not own is never touched.

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams};
use serde_json::json;

use crate::support::*;

/// Once the foreign Secret goes, the Secret watch brings the credential back at once, not its
/// retry (a controller of its own with a long backoff, five failures in).
#[tokio::test]
async fn a_foreign_secret_is_left_alone_and_reported() {
    env();
    let client = client().await;
    let controller_name = format!("conflict-{}", &unique()[..6]);
    let controller = spawn_labelled(&controller_name, LONG_BACKOFF, &[]);
    let ns = namespace(&client, "conflict").await;
    let theirs = secret_value("x", "theirs");
    create_secret(&client, &ns, "pull", &[("other", theirs.as_bytes())]).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let before = secrets.get("pull").await.unwrap();
    let ours = secret_value("u", "ours");
    create_secret(&client, &ns, "src", &[("password", ours.as_bytes())]).await;
    create_credential_for(
        &client,
        &ns,
        "cred",
        Some(&controller_name),
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}},
               "secret": {"name": "pull"}}),
    )
    .await;

    let cr = wait_ready(&client, &ns, "cred", "False", Some("SecretConflict")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("pull") && message.contains("not managed"), "{message}");
    wait_event(&client, &ns, "RegistryCredential", "cred", "Warning", "SecretConflict").await;
    let after = secrets.get("pull").await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version, "the foreign Secret was written");
    assert_eq!(after.data, before.data);

    // Once the owner removes theirs, regcred writes its own at once (the Secret watch
    // notices the deletion; the next retry is 16 s away).
    wait_failures(&controller, "RegistryCredential", "SecretConflict", 5.0).await;
    let deleted = std::time::Instant::now();
    secrets.delete("pull", &DeleteParams::default()).await.unwrap();
    let written = wait_secret_within(EVENT_WAIT, &client, &ns, "pull", "regcred's own", |s| {
        s.metadata.owner_references.is_some()
    })
    .await;
    eprintln!("the conflict resolved {:?} after the foreign Secret was deleted", deleted.elapsed());
    assert_eq!(logins(&written)[0].2, ours);
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    assert_no_leaks(&client).await;
}

/// Issue 20, item 5: what a tenant can do with regcred's marks (its labels are writable by
/// anyone who may edit Secrets in the namespace). A ClusterRegistryCredential adopts an
/// ownerless Secret wearing them (what `kubectl delete --cascade=orphan` leaves), so a tenant
/// who puts them on its own Secret hands that Secret over: its pull config is replaced by the
/// credential's in the same write that sets the owner, and nothing of it is used (keys regcred
/// does not write stay, as on any Secret regcred writes). Without the marks, or when the Secret
/// could not take the credential's content (immutable), it is never taken: that namespace is a
/// conflict, the tenant's Secret is not written, and `Ready` stays True.
#[tokio::test]
async fn regcred_marks_on_a_tenants_secret_hand_it_over_with_its_pull_config_replaced() {
    env();
    let admin = client().await;
    let team = format!("marks-{}", &unique()[..6]);
    let source_ns = namespace(&admin, "marks-src").await;
    let password = secret_value("robot", "marks");
    create_secret(&admin, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let free = labelled_namespace(&admin, "marks-free", &[("team", &team)]).await;
    let [plain, marked, immutable] = [
        labelled_namespace(&admin, "marks-plain", &[("team", &team)]).await,
        labelled_namespace(&admin, "marks-marked", &[("team", &team)]).await,
        labelled_namespace(&admin, "marks-immutable", &[("team", &team)]).await,
    ];
    let theirs = secret_value("tenant", "marks-theirs");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("tenant:{theirs}"));
    let config = json!({"auths": {"registry.example.com": {"username": "tenant", "password": theirs, "auth": auth}}});
    let marks = json!({"app.kubernetes.io/managed-by": "regcred", "regcred.dev/credential-uid": unique()});
    let mut made = Vec::new();
    for (ns, labels, immutable) in
        [(&plain, json!({}), false), (&marked, marks.clone(), false), (&immutable, marks, true)]
    {
        let tenant = tenant(&admin, ns).await;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "pull", "labels": labels},
            "type": "kubernetes.io/dockerconfigjson",
            "immutable": immutable,
            "stringData": {".dockerconfigjson": config.to_string(), "note": "the tenant's"},
        }))
        .unwrap();
        let api = Api::<Secret>::namespaced(tenant, ns);
        made.push(api.create(&Default::default(), &secret).await.expect("an editor may create Secrets"));
    }

    let name = format!("marks-{}", &unique()[..6]);
    let crc = create_cluster_credential(
        &admin,
        &name,
        json!({
            "registry": "registry.example.com",
            "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
            "secret": {"name": "pull"},
        }),
    )
    .await;
    let uid = crc.metadata.uid.unwrap();
    let crc = wait_cluster(&admin, &name, "the marked Secret adopted, two conflicts, Ready", |s| {
        s.target_namespaces == Some(4)
            && s.synced_namespaces == Some(2)
            && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
            && s.credential.condition("NamespacesSynced").is_some_and(|c| c.reason == "SecretConflict")
    })
    .await;
    let mut failures: Vec<_> = crc.status.unwrap().failures.into_iter().map(|f| (f.namespace, f.reason)).collect();
    failures.sort();
    let mut expected =
        vec![(plain.clone(), "SecretConflict".to_string()), (immutable.clone(), "SecretConflict".into())];
    expected.sort();
    assert_eq!(failures, expected);

    let secrets = |ns: &str| Api::<Secret>::namespaced(admin.clone(), ns);
    for before in [&made[0], &made[2]] {
        let ns = before.metadata.namespace.as_deref().unwrap();
        let now = secrets(ns).get("pull").await.unwrap();
        assert_eq!(
            now.metadata.resource_version, before.metadata.resource_version,
            "{ns}: the tenant's Secret was written"
        );
    }
    let adopted = secrets(&marked).get("pull").await.unwrap();
    assert_eq!(adopted.metadata.uid, made[1].metadata.uid);
    assert_eq!(logins(&adopted), [("registry.example.com".to_string(), "robot".to_string(), password.clone())]);
    let owners = adopted.metadata.owner_references.clone().unwrap_or_default();
    assert!(owners.len() == 1 && owners[0].uid == uid && owners[0].controller == Some(true), "{owners:?}");
    assert_eq!(adopted.metadata.labels.as_ref().unwrap()["regcred.dev/credential-uid"], uid);
    assert_eq!(adopted.data.as_ref().unwrap()["note"].0, b"the tenant's", "a key regcred does not write");
    wait_secret(&admin, &free, "pull", "written", |s| logins(s)[0].2 == password).await;
    assert_no_leaks(&admin).await;
}
