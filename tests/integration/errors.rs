//! Bad references and bad values are reported in status and Events, named but never quoted,
//! and heal as soon as the input is fixed.

use serde_json::json;

use crate::support::*;

/// The Secret appears: the Secret watch brings the credential back at once, not its retry
/// (a controller of its own with a long backoff, five failures in: the next retry is 16 s away).
#[tokio::test]
async fn a_missing_secret_is_reported_and_picked_up_when_created() {
    env();
    let client = client().await;
    let name = format!("missing-{}", &unique()[..6]);
    let controller = spawn_labelled(&name, LONG_BACKOFF, &[]);
    let ns = namespace(&client, "missing").await;
    create_credential_for(
        &client,
        &ns,
        "cred",
        Some(&name),
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "later"}}}}),
    )
    .await;
    let cr = wait_ready(&client, &ns, "cred", "False", Some("SourceSecretNotFound")).await;
    assert_eq!(cr.status.unwrap().conditions[0].message, format!("Secret {ns}/later not found"));
    wait_event(&client, &ns, "RegistryCredential", "cred", "Warning", "SourceSecretNotFound").await;
    wait_failures(&controller, "RegistryCredential", "SourceSecretNotFound", 5.0).await;

    let password = secret_value("u", "later");
    let created = std::time::Instant::now();
    create_secret(&client, &ns, "later", &[("password", password.as_bytes())]).await;
    wait_secret_within(EVENT_WAIT, &client, &ns, "cred", "written", |s| logins(s)[0].2 == password).await;
    eprintln!("the missing Secret picked up {:?} after it was created", created.elapsed());
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
}

/// Also: fixing a value heals the credential by the Secret watch, not by a retry (a controller
/// of its own with a long backoff).
#[tokio::test]
async fn bad_values_are_named_never_quoted() {
    env();
    let client = client().await;
    let controller_name = format!("badvalues-{}", &unique()[..6]);
    let controller = spawn_labelled(&controller_name, LONG_BACKOFF, &[]);
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
        let spec = json!({"registry": "r.example.com", "source": source});
        create_credential_for(&client, &ns, name, Some(&controller_name), spec).await;
    }
    for (name, _, reason, fragment) in &cases {
        let cr = wait_ready(&client, &ns, name, "False", Some(reason)).await;
        let message = &cr.status.unwrap().conditions[0].message;
        assert!(message.contains(fragment) && message.contains("src"), "{name}: {message}");
        wait_event(&client, &ns, "RegistryCredential", name, "Warning", reason).await;
    }

    // Fixing the value heals the credential. "empty" and "latin1" fail alike, in step (created
    // together, retried 1 s, 2 s, 4 s … after): ten failures are five of each, so the next
    // retry of "empty" is 16 s away.
    wait_failures(&controller, "RegistryCredential", "InvalidSourceValue", 10.0).await;
    let fixed = secret_value("u", "fixed");
    let changed = std::time::Instant::now();
    set_secret_key(&client, &ns, "src", "empty", fixed.as_bytes()).await;
    wait_ready_within(EVENT_WAIT, &client, &ns, "empty", "True", Some("Synced")).await;
    eprintln!("the fixed value picked up {:?} after the change", changed.elapsed());
    assert_no_leaks(&client).await;
}
