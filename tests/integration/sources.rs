//! Each static source produces the right Secret, and a source change propagates.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn basic_source_writes_a_docker_login_secret() {
    env();
    let client = client().await;
    let ns = namespace(&client, "basic").await;
    let password = secret_value("bob", "basic");
    create_secret(&client, &ns, "reg-pass", &[("password", password.as_bytes())]).await;
    let cr = create_credential(
        &client,
        &ns,
        "private",
        json!({"registry": "registry.example.com:5000",
               "source": {"basic": {"username": "bob", "passwordSecretRef": {"name": "reg-pass"}}},
               "secret": {"name": "private-pull", "labels": {"team": "a"}}}),
    )
    .await;

    let secret = wait_secret(&client, &ns, "private-pull", "exists", |_| true).await;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    assert_eq!(logins(&secret), vec![("registry.example.com:5000".into(), "bob".into(), password.clone())]);
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "regcred");
    assert_eq!(labels["team"], "a");
    let owner = &secret.metadata.owner_references.as_ref().expect("owner reference")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("RegistryCredential", cr.metadata.uid.as_deref().unwrap(), Some(true))
    );

    let cr = wait_ready(&client, &ns, "private", "True", Some("Synced")).await;
    let status = cr.status.unwrap();
    assert_eq!(status.secret_name.as_deref(), Some("private-pull"));
    assert_eq!(status.registries, vec!["registry.example.com:5000"]);
    assert_eq!(status.source.as_deref(), Some("basic"));
    let note = wait_event(&client, &ns, "RegistryCredential", "private", "Normal", "Created").await;
    assert!(note.contains("private-pull"), "{note}");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn docker_hub_is_written_under_the_index_key_and_the_registry_host() {
    env();
    let client = client().await;
    let ns = namespace(&client, "hub").await;
    let password = secret_value("me", "hub");
    create_secret(&client, &ns, "hub-pass", &[("pw", password.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "hub",
        json!({"registry": "registry-1.docker.io",
               "source": {"basic": {"username": "me", "passwordSecretRef": {"name": "hub-pass", "key": "pw"}}}}),
    )
    .await;
    let secret = wait_secret(&client, &ns, "hub", "exists", |_| true).await;
    let hub = |server: &str| (server.to_string(), "me".to_string(), password.clone());
    assert_eq!(logins(&secret), vec![hub("https://index.docker.io/v1/"), hub("registry-1.docker.io")]);
    let cr = wait_ready(&client, &ns, "hub", "True", Some("Synced")).await;
    assert_eq!(cr.status.unwrap().registries, vec!["https://index.docker.io/v1/", "registry-1.docker.io"]);
}

#[tokio::test]
async fn ghcr_source_defaults_to_ghcr_io() {
    env();
    let client = client().await;
    let ns = namespace(&client, "ghcr").await;
    let token = secret_value("octocat", "ghp");
    create_secret(&client, &ns, "ghcr-pat", &[("token", token.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "ghcr",
        json!({"source": {"ghcr": {"username": "octocat", "tokenSecretRef": {"name": "ghcr-pat"}}}}),
    )
    .await;
    let secret = wait_secret(&client, &ns, "ghcr", "exists", |_| true).await;
    assert_eq!(logins(&secret), vec![("ghcr.io".into(), "octocat".into(), token)]);
    let cr = wait_ready(&client, &ns, "ghcr", "True", Some("Synced")).await;
    assert_eq!(cr.status.unwrap().source.as_deref(), Some("ghcr"));
}

#[tokio::test]
async fn gcr_source_sends_the_key_file_verbatim() {
    env();
    let client = client().await;
    let ns = namespace(&client, "gcr").await;
    let private_key = secret_value("_json_key", "MIIEv");
    let key = format!(
        "{{\n  \"type\": \"service_account\",\n  \"project_id\": \"p\",\n  \"client_email\": \"puller@p.iam.gserviceaccount.com\",\n  \"private_key\": \"-----BEGIN PRIVATE KEY-----\\n{private_key}\\n-----END PRIVATE KEY-----\\n\"\n}}\n"
    );
    record_secret(&key);
    create_secret(&client, &ns, "gcp-sa", &[("key.json", key.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "gar",
        json!({"registry": "europe-docker.pkg.dev", "source": {"gcr": {"jsonKeySecretRef": {"name": "gcp-sa"}, "login": "JsonKey"}}}),
    )
    .await;
    let secret = wait_secret(&client, &ns, "gar", "exists", |_| true).await;
    assert_eq!(logins(&secret), vec![("europe-docker.pkg.dev".into(), "_json_key".into(), key)]);
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn a_changed_source_secret_updates_the_pull_secret() {
    env();
    let client = client().await;
    let ns = namespace(&client, "rotate").await;
    let first = secret_value("ci", "first");
    create_secret(&client, &ns, "reg-pass", &[("password", first.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "ci",
        json!({"registry": "r.example.com", "source": {"basic": {"username": "ci", "passwordSecretRef": {"name": "reg-pass"}}}}),
    )
    .await;
    wait_secret(&client, &ns, "ci", "first password", |s| logins(s)[0].2 == first).await;

    let second = secret_value("ci", "second");
    set_secret_key(&client, &ns, "reg-pass", "password", second.as_bytes()).await;
    wait_secret(&client, &ns, "ci", "second password", |s| logins(s)[0].2 == second).await;
    wait_event(&client, &ns, "RegistryCredential", "ci", "Normal", "Updated").await;
    assert_no_leaks(&client).await;
}
