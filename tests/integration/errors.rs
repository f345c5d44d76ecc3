//! Bad references and bad values are reported in status and Events, named but never quoted,
//! and heal as soon as the input is fixed.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn a_missing_secret_is_reported_and_picked_up_when_created() {
    env();
    let client = client().await;
    let ns = namespace(&client, "missing").await;
    create_credential(
        &client,
        &ns,
        "cred",
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "later"}}}}),
    )
    .await;
    let cr = wait_ready(&client, &ns, "cred", "False", Some("SourceSecretNotFound")).await;
    assert_eq!(cr.status.unwrap().conditions[0].message, format!("Secret {ns}/later not found"));
    wait_event(&client, &ns, "RegistryCredential", "cred", "Warning", "SourceSecretNotFound").await;

    let password = secret_value("u", "later");
    create_secret(&client, &ns, "later", &[("password", password.as_bytes())]).await;
    wait_secret(&client, &ns, "cred", "written", |s| logins(s)[0].2 == password).await;
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
}

#[tokio::test]
async fn bad_values_are_named_never_quoted() {
    env();
    let client = client().await;
    let ns = namespace(&client, "badvalues").await;
    let not_a_key = secret_value("_json_key", "MIInotjson");
    create_secret(
        &client,
        &ns,
        "src",
        &[("empty", b""), ("latin1", b"caf\xe9"), ("key.json", not_a_key.as_bytes()), ("password", b"fine")],
    )
    .await;
    let cases = [
        (
            "missing-key",
            json!({"basic": {"username": "u", "passwordSecretRef": {"name": "src", "key": "nope"}}}),
            "SourceKeyMissing",
            "\"nope\"",
        ),
        (
            "empty",
            json!({"basic": {"username": "u", "passwordSecretRef": {"name": "src", "key": "empty"}}}),
            "InvalidSourceValue",
            "is empty",
        ),
        (
            "latin1",
            json!({"basic": {"username": "u", "passwordSecretRef": {"name": "src", "key": "latin1"}}}),
            "InvalidSourceValue",
            "UTF-8",
        ),
        ("gcr", json!({"gcr": {"jsonKeySecretRef": {"name": "src"}}}), "InvalidGcrKey", "not valid JSON"),
    ];
    for (name, source, _, _) in &cases {
        create_credential(&client, &ns, name, json!({"registry": "r.example.com", "source": source})).await;
    }
    for (name, _, reason, fragment) in &cases {
        let cr = wait_ready(&client, &ns, name, "False", Some(reason)).await;
        let message = &cr.status.unwrap().conditions[0].message;
        assert!(message.contains(fragment) && message.contains("src"), "{name}: {message}");
        wait_event(&client, &ns, "RegistryCredential", name, "Warning", reason).await;
    }

    // Fixing the value heals the credential.
    let fixed = secret_value("u", "fixed");
    set_secret_key(&client, &ns, "src", "empty", fixed.as_bytes()).await;
    wait_ready(&client, &ns, "empty", "True", Some("Synced")).await;
    assert_no_leaks(&client).await;
}
