//! The generated Secret is a working auth file for a real registry and a real client.

use regcred_testenv::Registry;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn the_generated_secret_pulls_from_a_real_registry() {
    env();
    let client = client().await;
    let ns = namespace(&client, "pull").await;
    let password = secret_value("puller", "registry");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    let image = registry.push_test_image("team/app", "v1", "puller", &password).unwrap();

    create_secret(&client, &ns, "right", &[("password", password.as_bytes())]).await;
    let wrong = secret_value("puller", "wrong");
    create_secret(&client, &ns, "wrong", &[("password", wrong.as_bytes())]).await;
    for (name, source) in [("good", "right"), ("bad", "wrong")] {
        create_credential(
            &client,
            &ns,
            name,
            json!({"registry": registry.host(), "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": source}}}}),
        )
        .await;
    }
    let good = wait_secret(&client, &ns, "good", "written", |_| true).await;
    let bad = wait_secret(&client, &ns, "bad", "written", |_| true).await;
    let auth_file = |s: &k8s_openapi::api::core::v1::Secret| s.data.as_ref().unwrap()[".dockerconfigjson"].0.clone();

    registry.pull_with_auth_file(&image, &auth_file(&good)).expect("the right password pulls");
    let refused = registry.pull_with_auth_file(&image, &auth_file(&bad)).expect_err("a wrong password must be refused");
    assert!(format!("{refused:#}").contains("UNAUTHORIZED"), "{refused:#}");
}
