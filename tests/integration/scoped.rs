//! The namespace-scoped mode (`--namespaces`, chart value `watchNamespaces`): a controller
//! bound only to what the chart renders for two namespaces (Roles there, no cluster-wide
//! Secret, ServiceAccount or token rule) does every kind of write in them, reports what it may
//! not reach, and never touches, or can read, a third namespace.

use std::time::Duration;

use k8s_openapi::{
    ByteString,
    api::core::v1::{Secret, ServiceAccount},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use regcred::crd::RegistryCredential;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn a_namespace_scoped_controller_writes_its_namespaces_with_roles_alone() {
    let admin = client().await;
    let tag = unique()[..8].to_string();
    let selected = [("regcred.dev/test-scope", tag.as_str())];
    let a = labelled_namespace(&admin, "scoped-a", &selected).await;
    let b = labelled_namespace(&admin, "scoped-b", &selected).await;
    let outside = labelled_namespace(&admin, "scoped-out", &selected).await;
    let name = format!("scoped-{}", &tag[..6]);
    let (kubeconfig, user) = chart_identity(&name, &format!("watchNamespaces={{{a},{b}}}"));
    let offset = audit_offset();
    let _controller = spawn_labelled(
        &name,
        &["--namespaces", &format!("{a},{b}")],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    );

    // Namespace a: a static credential that patches a ServiceAccount (Secret create, status,
    // Event, finalizer, ServiceAccount patch).
    let password = secret_value("u", "scoped");
    create_secret(&admin, &a, "src", &[("password", password.as_bytes())]).await;
    let builder = ServiceAccount {
        metadata: kube::api::ObjectMeta { name: Some("builder".into()), ..Default::default() },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(admin.clone(), &a).create(&PostParams::default(), &builder).await.unwrap();
    let basic = json!({"registry": "r.example.com", "serviceAccounts": ["builder"],
                       "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&admin, &a, "web", Some(&name), basic).await;
    wait_ready(&admin, &a, "web", "True", Some("Synced")).await;
    let secret = wait_secret(&admin, &a, "web", "written", |_| true).await;
    assert_eq!(logins(&secret)[0].2, password);
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), &a);
    regcred_testenv::eventually("builder lists web", TIMEOUT, || async {
        let sa = accounts.get("builder").await.ok()?;
        sa.image_pull_secrets?.iter().any(|r| r.name == "web").then_some(())
    })
    .await;
    wait_event(&admin, &a, "RegistryCredential", "web", "Normal", "Created").await;

    // Drift is repaired (Secret apply), and a rename retires the old Secret (delete).
    let secrets_a = Api::<Secret>::namespaced(admin.clone(), &a);
    let tampered = json!({"data": {".dockerconfigjson": ByteString(b"{\"auths\":{}}".to_vec())}});
    secrets_a.patch("web", &PatchParams::default(), &Patch::Merge(&tampered)).await.unwrap();
    wait_secret(&admin, &a, "web", "repaired", |s| logins(s).first().is_some_and(|l| l.2 == password)).await;
    let creds_a = Api::<RegistryCredential>::namespaced(admin.clone(), &a);
    let rename = json!({"spec": {"secret": {"name": "web2"}}});
    creds_a.patch("web", &PatchParams::default(), &Patch::Merge(&rename)).await.unwrap();
    wait_ready(&admin, &a, "web", "True", Some("Synced")).await;
    regcred_testenv::eventually("web retired", TIMEOUT, || async {
        secrets_a.get_opt("web").await.ok()?.is_none().then_some(())
    })
    .await;

    // Namespace b: IRSA (a TokenRequest under the Role, admitted by the chart's policy).
    irsa_account(&admin, &env().aws, &b, "puller").await;
    let irsa = json!({"source": {"ecr": {"registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                                          "auth": {"serviceAccountRef": {"name": "puller"}}}}});
    create_credential_for(&admin, &b, "irsa", Some(&name), irsa).await;
    wait_ready(&admin, &b, "irsa", "True", Some("Synced")).await;

    // A cluster credential selecting all three reaches a and b, and names the third.
    let fan = format!("scoped-fan-{tag}");
    let spec = json!({"registry": "r.example.com",
        "namespaces": {"selector": {"matchLabels": {"regcred.dev/test-scope": tag}}},
        "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": a}}}});
    create_cluster_credential_for(&admin, &fan, Some(&name), spec).await;
    let crc = wait_cluster(&admin, &fan, "synced to a and b", |s| {
        s.target_namespaces == Some(2) && s.synced_namespaces == Some(2)
    })
    .await;
    let ready = crc.status.as_ref().and_then(|s| s.credential.condition("Ready")).expect("Ready").clone();
    assert_eq!(ready.status, "True");
    assert!(
        ready.message.contains(&format!(
            "1 selected namespaces are outside the controller's --namespaces and get no Secret: {outside}"
        )),
        "{}",
        ready.message
    );
    for ns in [&a, &b] {
        wait_secret(&admin, ns, &fan, "fanned out", |s| logins(s).first().is_some_and(|l| l.2 == password)).await;
    }
    // A cluster credential whose source lies outside says so (not a bare 403).
    let stray = format!("scoped-stray-{tag}");
    let spec = json!({"registry": "r.example.com",
        "namespaces": {"names": [a]},
        "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": outside}}}});
    create_cluster_credential_for(&admin, &stray, Some(&name), spec).await;
    wait_cluster(&admin, &stray, "NamespaceOutOfScope", |s| {
        s.credential.condition("Ready").is_some_and(|c| c.status == "False" && c.reason == "NamespaceOutOfScope")
    })
    .await;

    // Deleting the credential in a takes its entry off the ServiceAccount (finalizer).
    creds_a.delete("web", &Default::default()).await.unwrap();
    regcred_testenv::eventually("builder released", TIMEOUT, || async {
        let sa = accounts.get("builder").await.ok()?;
        (!sa.image_pull_secrets.unwrap_or_default().iter().any(|r| r.name == "web2")).then_some(())
    })
    .await;

    // A credential in the third namespace is never served; the fan-out left nothing there.
    create_secret(&admin, &outside, "src", &[("password", password.as_bytes())]).await;
    let basic = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&admin, &outside, "ignored", Some(&name), basic).await;

    // The one in namespace a proves the controller is alive after it was created; the one
    // outside still has no status, and nothing of the controller's reached that namespace.
    let probe = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&admin, &a, "probe", Some(&name), probe).await;
    wait_ready(&admin, &a, "probe", "True", Some("Synced")).await;
    let ignored = Api::<RegistryCredential>::namespaced(admin.clone(), &outside).get("ignored").await.unwrap();
    assert!(ignored.status.is_none(), "a credential outside was served: {:?}", ignored.status);
    let requests = requests_of_since(&user, offset);
    let stray: Vec<_> = requests.iter().filter(|(_, _, ns, _)| *ns == outside).collect();
    assert!(stray.is_empty(), "the controller made requests in {outside}: {stray:?}");
    let writes: Vec<_> =
        requests.iter().filter(|(verb, _, _, _)| is_write(verb)).map(|(v, r, _, _)| format!("{v} {r}")).collect();
    for kind in [
        "create secrets",
        "patch secrets",
        "delete secrets",
        "patch serviceaccounts",
        "create serviceaccounts",
        "patch registrycredentials",
        "patch clusterregistrycredentials",
        "create events",
    ] {
        assert!(writes.iter().any(|w| w == kind), "no {kind} among the controller's writes: {writes:?}");
    }
    assert!(Api::<Secret>::namespaced(admin.clone(), &outside).get_opt(&fan).await.unwrap().is_none());

    // The identity cannot read, list or mint anything there, nor Secrets cluster-wide.
    let own = client_for(&kubeconfig, None).await;
    let forbidden = |result: Result<(), kube::Error>, what: &str| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: not refused: {other:?}"),
    };
    let outside_secrets = Api::<Secret>::namespaced(own.clone(), &outside);
    forbidden(outside_secrets.get("src").await.map(drop), "get a Secret outside");
    forbidden(outside_secrets.list_metadata(&ListParams::default()).await.map(drop), "list Secrets outside");
    forbidden(
        Api::<Secret>::all(own.clone()).list_metadata(&ListParams::default()).await.map(drop),
        "list all Secrets",
    );
    let minted = request_token(&own, &outside, "default", &["sts.amazonaws.com"], 600).await;
    forbidden(minted.map(drop), "a token outside");
}

/// Issue 20, item 9: a served namespace that was deleted (its Roles with it) costs only that
/// namespace. A controller started with it in `--namespaces` lists the others, becomes ready
/// and serves them; before, its merged watch never finished its first listing.
#[tokio::test]
async fn a_deleted_served_namespace_costs_only_that_namespace() {
    use k8s_openapi::api::core::v1::Namespace;

    let admin = client().await;
    let tag = unique()[..8].to_string();
    let a = namespace(&admin, "scoped-live").await;
    let gone = namespace(&admin, "scoped-gone").await;
    let name = format!("scoped-gone-{}", &tag[..6]);
    let (kubeconfig, _) = chart_identity(&name, &format!("watchNamespaces={{{a},{gone}}}"));
    let namespaces = Api::<Namespace>::all(admin.clone());
    namespaces.delete(&gone, &Default::default()).await.unwrap();
    regcred_testenv::eventually("the namespace is gone", Duration::from_secs(60), || async {
        namespaces.get_opt(&gone).await.ok()?.is_none().then_some(())
    })
    .await;
    let _controller = spawn_labelled(
        &name,
        &["--namespaces", &format!("{a},{gone}")],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    );
    let password = secret_value("u", "scoped-gone");
    create_secret(&admin, &a, "src", &[("password", password.as_bytes())]).await;
    let basic = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&admin, &a, "web", Some(&name), basic).await;
    wait_ready(&admin, &a, "web", "True", Some("Synced")).await;
    assert_eq!(logins(&wait_secret(&admin, &a, "web", "written", |_| true).await)[0].2, password);
    // A cluster credential reads nothing in the gone namespace (no list there to be refused).
    let fan_out = json!({"registry": "r.example.com", "namespaces": {"names": [a]},
                         "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": a}}}});
    create_cluster_credential_for(&admin, &name, Some(&name), fan_out).await;
    wait_cluster(&admin, &name, "Ready", |s| {
        s.credential.condition("Ready").is_some_and(|c| c.status == "True") && s.synced_namespaces == Some(1)
    })
    .await;
    wait_secret(&admin, &a, &name, "written", |_| true).await;
}
