//! Steady state: reconciles that find nothing to change write nothing.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::eventually;
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
        // A reconcile lists the credential's own Secrets (metadata) before deciding.
        eventually(&format!("a reconcile after touching the {step}"), TIMEOUT, || async {
            let reads = controller_requests_since(offset);
            reads.iter().any(|(verb, res, n, _)| verb == "list" && res == "secrets" && *n == ns).then_some(())
        })
        .await;
    }
    let writes: Vec<_> =
        controller_requests_since(start).into_iter().filter(|(verb, _, n, _)| is_write(verb) && *n == ns).collect();
    assert!(writes.is_empty(), "the controller wrote in steady state: {writes:?}");
}
