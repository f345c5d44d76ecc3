//! A Secret regcred does not own is never touched.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::DeleteParams};
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn a_foreign_secret_is_left_alone_and_reported() {
    env();
    let client = client().await;
    let ns = namespace(&client, "conflict").await;
    let theirs = secret_value("x", "theirs");
    create_secret(&client, &ns, "pull", &[("other", theirs.as_bytes())]).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let before = secrets.get("pull").await.unwrap();
    let ours = secret_value("u", "ours");
    create_secret(&client, &ns, "src", &[("password", ours.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "cred",
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
    // notices the deletion; no backoff wait).
    secrets.delete("pull", &DeleteParams::default()).await.unwrap();
    let written = wait_secret(&client, &ns, "pull", "regcred's own", |s| s.metadata.owner_references.is_some()).await;
    assert_eq!(logins(&written)[0].2, ours);
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    assert_no_leaks(&client).await;
}
