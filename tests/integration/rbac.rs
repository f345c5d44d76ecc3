//! The controllers in these tests run as the packaged ServiceAccount with only the packaged
//! RBAC; this checks that this really is their identity, so every other scenario passing is
//! the proof that the chart's rules suffice.

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use kube::{Api, api::PostParams};

use crate::support::*;

#[tokio::test]
async fn the_controller_holds_only_the_packaged_permissions() {
    env();
    let controller = controller_client().await;
    let can = |verb: &'static str, group: &'static str, resource: &'static str| {
        let controller = controller.clone();
        async move {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        namespace: Some("default".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let review = Api::<SelfSubjectAccessReview>::all(controller)
                .create(&PostParams::default(), &review)
                .await
                .expect("SelfSubjectAccessReview");
            review.status.is_some_and(|s| s.allowed)
        }
    };
    // What the scenarios need…
    assert!(can("patch", "", "secrets").await);
    assert!(can("watch", "regcred.dev", "registrycredentials").await);
    // …and nothing a cluster admin has.
    for (verb, group, resource) in [
        ("update", "", "secrets"),
        ("list", "", "configmaps"),
        ("watch", "", "configmaps"),
        ("create", "", "pods"),
        ("delete", "", "namespaces"),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
        ("delete", "regcred.dev", "registrycredentials"),
        ("impersonate", "", "users"),
    ] {
        assert!(!can(verb, group, resource).await, "the controller may {verb} {group}/{resource}");
    }
    // And the controller's requests are made under that identity.
    let offset = audit_offset();
    let ns = namespace(&client().await, "rbac").await;
    let client = client().await;
    create_secret(&client, &ns, "src", &[("password", secret_value("u", "rbac").as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "cred",
        serde_json::json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}}),
    )
    .await;
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    let writes: Vec<_> =
        controller_requests_since(offset).into_iter().filter(|(v, _, n, _)| is_write(v) && *n == ns).collect();
    assert!(
        writes.iter().any(|(_, resource, _, _)| resource == "secrets"),
        "no Secret write as {CONTROLLER_USER}: {writes:?}"
    );
}
