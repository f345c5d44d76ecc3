//! Drift is repaired, deletion cascades, renames clean up, template labels are kept exact.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::eventually;
use serde_json::json;

use crate::support::*;

async fn setup(prefix: &str) -> (kube::Client, String, String) {
    env();
    let client = client().await;
    let ns = namespace(&client, prefix).await;
    let password = secret_value("u", prefix);
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "cred",
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}},
               "secret": {"labels": {"team": "a"}}}),
    )
    .await;
    wait_secret(&client, &ns, "cred", "written", |s| logins(s)[0].2 == password).await;
    (client, ns, password)
}

#[tokio::test]
async fn an_edited_secret_is_restored() {
    let (client, ns, password) = setup("drift-edit").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let tampered = json!({"data": {".dockerconfigjson": base64(b"{\"auths\":{}}")}});
    secrets.patch("cred", &PatchParams::default(), &Patch::Merge(&tampered)).await.unwrap();
    wait_secret(&client, &ns, "cred", "restored", |s| logins(s).first().is_some_and(|l| l.2 == password)).await;
}

#[tokio::test]
async fn a_deleted_secret_is_recreated() {
    let (client, ns, password) = setup("drift-delete").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let old_uid = secrets.get("cred").await.unwrap().metadata.uid;
    secrets.delete("cred", &DeleteParams::default()).await.unwrap();
    let recreated = wait_secret(&client, &ns, "cred", "recreated", |s| s.metadata.uid != old_uid).await;
    assert_eq!(logins(&recreated)[0].2, password);
}

#[tokio::test]
async fn deleting_the_credential_garbage_collects_the_secret() {
    let (client, ns, _) = setup("cascade").await;
    Api::<RegistryCredential>::namespaced(client.clone(), &ns).delete("cred", &DeleteParams::default()).await.unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    eventually("Secret garbage-collected", TIMEOUT, || async {
        matches!(secrets.get_opt("cred").await, Ok(None)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn renaming_the_secret_removes_the_old_one() {
    let (client, ns, password) = setup("rename").await;
    let creds = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"secret": {"name": "renamed"}}});
    creds.patch("cred", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let renamed = wait_secret(&client, &ns, "renamed", "written", |_| true).await;
    assert_eq!(logins(&renamed)[0].2, password);
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    eventually("old Secret deleted", TIMEOUT, || async {
        matches!(secrets.get_opt("cred").await, Ok(None)).then_some(())
    })
    .await;
    let cr = wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    assert_eq!(cr.status.unwrap().secret_name.as_deref(), Some("renamed"));
}

#[tokio::test]
async fn template_labels_follow_the_spec_and_foreign_labels_stay() {
    let (client, ns, _) = setup("labels").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let foreign = json!({"metadata": {"labels": {"added-by": "someone"}}});
    secrets.patch("cred", &PatchParams::default(), &Patch::Merge(&foreign)).await.unwrap();
    let creds = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"secret": {"labels": {"team": null, "tier": "gold"}}}});
    creds.patch("cred", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let s = wait_secret(&client, &ns, "cred", "labels follow the template", |s| {
        let l = s.metadata.labels.clone().unwrap_or_default();
        l.get("tier").map(String::as_str) == Some("gold") && !l.contains_key("team")
    })
    .await;
    assert_eq!(s.metadata.labels.unwrap()["added-by"], "someone");
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
