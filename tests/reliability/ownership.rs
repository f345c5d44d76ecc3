//! Secrets regcred does not own are never overwritten or deleted, whatever the sequence:
//! a rename onto a foreign Secret, a namespace leaving a fan-out, a look-alike label.

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::eventually;
use serde_json::json;

use crate::{SERIAL, support::*};

/// A Secret someone else made, optionally wearing regcred's label.
async fn foreign(client: &Client, ns: &str, name: &str, regcred_label: bool) -> Secret {
    let mut secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
        data: Some([("theirs".to_string(), k8s_openapi::ByteString(b"keep me".to_vec()))].into()),
        ..Default::default()
    };
    if regcred_label {
        secret.metadata.labels = Some([("app.kubernetes.io/managed-by".to_string(), "regcred".to_string())].into());
    }
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap()
}

async fn assert_untouched(client: &Client, before: &Secret) {
    let ns = before.metadata.namespace.as_deref().unwrap();
    let name = before.metadata.name.as_deref().unwrap();
    let now = Api::<Secret>::namespaced(client.clone(), ns).get_opt(name).await.unwrap();
    let now = now.unwrap_or_else(|| panic!("foreign Secret {ns}/{name} was deleted"));
    assert_eq!(now.metadata.resource_version, before.metadata.resource_version, "{ns}/{name} was written");
}

#[tokio::test]
async fn foreign_secrets_survive_renames_unselection_and_look_alike_labels() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let ns = namespace(&client, "own").await;
    create_secret(&client, &ns, "src", &[("password", secret_value("u", "own").as_bytes())]).await;

    // A look-alike: regcred's label but no owner reference to a regcred credential.
    let look_alike = foreign(&client, &ns, "pull", true).await;
    let spec = |secret: &str| json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}, "secret": {"name": secret}});
    create_credential(&client, &ns, "cred", spec("pull")).await;
    wait_ready(&client, &ns, "cred", "False", Some("SecretConflict")).await;
    assert_untouched(&client, &look_alike).await;

    // Renamed to a free name, then onto another foreign Secret: the old managed Secret goes,
    // the foreign one stays as it was.
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    api.patch("cred", &PatchParams::default(), &Patch::Merge(&json!({"spec": spec("mine")}))).await.unwrap();
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    let taken = foreign(&client, &ns, "taken", false).await;
    api.patch("cred", &PatchParams::default(), &Patch::Merge(&json!({"spec": spec("taken")}))).await.unwrap();
    wait_ready(&client, &ns, "cred", "False", Some("SecretConflict")).await;
    assert_untouched(&client, &taken).await;
    assert_untouched(&client, &look_alike).await;

    // Deleting the credential deletes nothing of theirs.
    api.delete("cred", &DeleteParams::default()).await.unwrap();
    eventually("the credential gone", TIMEOUT, || async { api.get_opt("cred").await.ok()?.is_none().then_some(()) })
        .await;
    assert_untouched(&client, &taken).await;
    assert_untouched(&client, &look_alike).await;

    // A namespace leaving a fan-out keeps a foreign Secret of the fan-out's name.
    let team = format!("own-{}", &unique()[..6]);
    let target = labelled_namespace(&client, "own-fan", &[("team", &team)]).await;
    let blocked = foreign(&client, &target, "regcred-pull", false).await;
    let name = format!("own-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": ns}}},
               "namespaces": {"selector": {"matchLabels": {"team": team}}}, "secret": {"name": "regcred-pull"}}),
    )
    .await;
    wait_cluster(&client, &name, "the conflict reported", |s| {
        s.failures.iter().any(|f| f.namespace == target && f.reason == "SecretConflict")
    })
    .await;
    let relabel = json!({"metadata": {"labels": {"team": "gone"}}});
    Api::<Namespace>::all(client.clone())
        .patch(&target, &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .unwrap();
    wait_cluster(&client, &name, "no targets", |s| s.target_namespaces == Some(0)).await;
    assert_untouched(&client, &blocked).await;
}
