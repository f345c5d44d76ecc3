//! `regcred doctor` against the real apiserver, controller and registry: for each reason a Pod
//! cannot pull, the binary (run with a kubeconfig, as a user would) names that cause and a fix;
//! the fix is then applied as given and the same check passes with exit status 0.

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Pod, Secret, ServiceAccount},
    rbac::v1::RoleBinding,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{Registry, eventually};
use serde_json::{Value, json};

use crate::support::*;

/// One run of `regcred doctor`: its exit status, its `-o json` report, and the same check as
/// text (printed, so `--nocapture` shows the transcripts).
pub struct Doctor {
    pub status: i32,
    pub report: Value,
    pub text: String,
}

impl Doctor {
    pub fn image(&self) -> &Value {
        &self.report["images"][0]
    }
    pub fn cause(&self) -> &str {
        self.image()["verdict"]["cause"].as_str().unwrap_or_default()
    }
    pub fn fixes(&self) -> Vec<String> {
        let fixes = self.image()["verdict"]["fixes"].as_array().cloned().unwrap_or_default();
        fixes.iter().filter_map(|f| f.as_str().map(str::to_string)).collect()
    }
    pub fn summary(&self) -> &str {
        self.image()["verdict"]["summary"].as_str().unwrap_or_default()
    }
}

/// Runs `regcred doctor ARGS -n NS` as the user of `kubeconfig`, twice (JSON, then text).
async fn doctor_as(kubeconfig: &Path, ns: &str, args: &[&str]) -> Doctor {
    let run = |format: &'static str| {
        let (kubeconfig, ns) = (kubeconfig.to_path_buf(), ns.to_string());
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_regcred"))
                .arg("doctor")
                .args(&args)
                .args(["-n", &ns, "-o", format])
                .env("KUBECONFIG", kubeconfig)
                .env("HOME", env().cp.dir())
                .output()
                .expect("running regcred doctor")
        })
    };
    let json_out = run("json").await.unwrap();
    let text_out = run("text").await.unwrap();
    let stderr = String::from_utf8_lossy(&json_out.stderr);
    let report: Value = serde_json::from_slice(&json_out.stdout)
        .unwrap_or_else(|e| panic!("doctor {args:?}: not JSON ({e}); stderr: {stderr}"));
    let text = String::from_utf8_lossy(&text_out.stdout).into_owned();
    println!("$ regcred doctor {} -n {ns}\n{text}", args.join(" "));
    assert_eq!(json_out.status.code(), text_out.status.code(), "the same status for either output");
    Doctor { status: json_out.status.code().unwrap_or(-1), report, text }
}

/// `regcred doctor` as the cluster admin.
pub async fn doctor(ns: &str, args: &[&str]) -> Doctor {
    doctor_as(env().cp.kubeconfig_path(), ns, args).await
}

/// The ServiceAccount `app` in `ns`.
async fn service_account(client: &Client, ns: &str) {
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "app"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &account).await.unwrap();
}

/// A basic credential for `registry` with the password in Secret `pass`, Ready.
async fn basic_credential(client: &Client, ns: &str, name: &str, registry: &str, extra: Value) -> String {
    let password = secret_value("puller", "doctor");
    if Api::<Secret>::namespaced(client.clone(), ns).get_opt("pass").await.unwrap().is_none() {
        create_secret(client, ns, "pass", &[("password", password.as_bytes())]).await;
    }
    let mut spec = json!({"registry": registry,
                          "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "pass"}}}});
    for (key, value) in extra.as_object().into_iter().flatten() {
        spec[key] = value.clone();
    }
    create_credential(client, ns, name, spec).await;
    wait_ready(client, ns, name, "True", Some("Synced")).await;
    password
}

/// A Pod (it need not run: no node is asked for) with these pull Secrets, as ServiceAccount app.
async fn pod(client: &Client, ns: &str, name: &str, image: &str, secrets: &[&str]) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": image}],
                 "imagePullSecrets": secrets.iter().map(|s| json!({"name": s})).collect::<Vec<_>>()},
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await.unwrap();
}

/// Waits until ServiceAccount app lists `secret` in its imagePullSecrets.
async fn wait_listed(client: &Client, ns: &str, secret: &str) {
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    eventually(&format!("ServiceAccount {ns}/app lists {secret}"), TIMEOUT, || async {
        let sa = accounts.get("app").await.ok()?;
        sa.image_pull_secrets?.iter().any(|r| r.name == secret).then_some(())
    })
    .await;
}

fn assert_ok(d: &Doctor) {
    assert_eq!(d.status, 0, "{}", d.text);
    assert_eq!(d.cause(), "ok", "{}", d.text);
    assert_eq!(d.report["ok"], true, "{}", d.text);
}

#[tokio::test]
async fn a_template_without_pull_secrets_gets_the_line_it_needs() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-none").await;
    service_account(&client, &ns).await;
    basic_credential(&client, &ns, "ghcr", "ghcr.io", json!({})).await;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"serviceAccountName": "app",
                                       "initContainers": [{"name": "init", "image": "busybox:1.36"}],
                                       "containers": [{"name": "app", "image": "ghcr.io/org/app:v1"}]}}},
    }))
    .unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment).await.unwrap();

    let d = doctor(&ns, &["deployment", "web"]).await;
    assert_eq!(d.status, 1, "{}", d.text);
    let images = d.report["images"].as_array().unwrap();
    assert_eq!(images[0]["role"], "init", "init containers first");
    assert_eq!(images[0]["repository"], "docker.io/library/busybox");
    let ghcr = &images[1];
    assert_eq!(ghcr["verdict"]["cause"], "no-pull-secrets", "{}", d.text);
    let fix = ghcr["verdict"]["fixes"][0].as_str().unwrap();
    assert!(fix.contains("imagePullSecrets: [{name: ghcr}]"), "{fix}");

    // The fix, as given: the line in the template.
    let patch = json!({"spec": {"template": {"spec": {"imagePullSecrets": [{"name": "ghcr"}]}}}});
    deployments.patch("web", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let d = doctor(&ns, &["deployment", "web"]).await;
    let ghcr = &d.report["images"][1];
    assert_eq!(ghcr["verdict"]["cause"], "ok", "{}", d.text);
    assert_eq!(ghcr["matches"], json!([{"secret": "ghcr", "server": "ghcr.io"}]));
    assert_eq!(ghcr["secrets"][0]["credential"]["ready"]["status"], "True", "{}", d.text);
    // busybox from Docker Hub is still uncovered (a public image; the doctor cannot know).
    assert_eq!(d.status, 1, "{}", d.text);
}

#[tokio::test]
async fn a_missing_secret_is_named_and_creating_it_fixes_the_same_pod() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-missing").await;
    service_account(&client, &ns).await;
    basic_credential(&client, &ns, "ghcr", "ghcr.io", json!({})).await;
    pod(&client, &ns, "web", "ghcr.io/org/app:v1", &["ghcr-secret"]).await;

    let d = doctor(&ns, &["pod", "web"]).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "secret-missing", "{}", d.text);
    assert_eq!(d.image()["secrets"][0]["state"], "missing");
    let fixes = d.fixes();
    assert!(fixes[0].contains("{name: ghcr}"), "{fixes:?}");
    assert!(fixes[1].contains("spec.secret.name: ghcr-secret"), "{fixes:?}");

    // A Pod's imagePullSecrets cannot change: the second fix is the one for this Pod.
    basic_credential(&client, &ns, "ghcr-for-web", "ghcr.io", json!({"secret": {"name": "ghcr-secret"}})).await;
    assert_ok(&doctor(&ns, &["pod", "web"]).await);
}

#[tokio::test]
async fn an_entry_under_ghcr_io_443_is_the_wrong_spelling_for_ghcr_io() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-port").await;
    service_account(&client, &ns).await;
    basic_credential(&client, &ns, "ghcr", "ghcr.io:443", json!({"serviceAccounts": ["app"]})).await;
    wait_listed(&client, &ns, "ghcr").await;

    let args = ["image", "ghcr.io/org/app:v1", "--service-account", "app"];
    let d = doctor(&ns, &args).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "wrong-spelling", "{}", d.text);
    assert_eq!(d.image()["secrets"][0]["from"], "serviceAccount");
    assert_eq!(d.fixes()[0], "set spec.registry: ghcr.io on RegistryCredential ghcr");

    let patch = json!({"spec": {"registry": "ghcr.io"}});
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    credentials.patch("ghcr", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_secret(&client, &ns, "ghcr", "the ghcr.io entry", |s| logins(s)[0].0 == "ghcr.io").await;
    assert_ok(&doctor(&ns, &args).await);
}

#[tokio::test]
async fn an_image_from_a_registry_no_credential_covers_gets_a_credential_to_create() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-other").await;
    service_account(&client, &ns).await;
    basic_credential(&client, &ns, "ghcr", "ghcr.io", json!({"serviceAccounts": ["app"]})).await;
    wait_listed(&client, &ns, "ghcr").await;

    let args = ["image", "quay.io/org/app:v1", "--service-account", "app"];
    let d = doctor(&ns, &args).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "no-entry-for-registry", "{}", d.text);
    let fix = &d.fixes()[0];
    assert!(fix.contains("spec.registry: quay.io") && fix.contains("spec.serviceAccounts: [app]"), "{fix}");

    basic_credential(&client, &ns, "quay", "quay.io", json!({"serviceAccounts": ["app"]})).await;
    wait_listed(&client, &ns, "quay").await;
    assert_ok(&doctor(&ns, &args).await);
}

#[tokio::test]
async fn a_credential_not_ready_is_the_cause_until_its_source_is_back() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-ready").await;
    service_account(&client, &ns).await;
    let password = basic_credential(&client, &ns, "ghcr", "ghcr.io", json!({})).await;
    pod(&client, &ns, "web", "ghcr.io/org/app:v1", &["ghcr"]).await;
    assert_ok(&doctor(&ns, &["pod", "web"]).await);

    Api::<Secret>::namespaced(client.clone(), &ns).delete("pass", &DeleteParams::default()).await.unwrap();
    wait_ready(&client, &ns, "ghcr", "False", Some("SourceSecretNotFound")).await;
    let d = doctor(&ns, &["pod", "web"]).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "credential-not-ready", "{}", d.text);
    let fixes = d.fixes();
    assert!(fixes[0].contains(&format!("Secret {ns}/pass not found")), "{fixes:?}");
    assert_eq!(fixes[1], format!("kubectl describe registrycredential ghcr -n {ns}"));

    create_secret(&client, &ns, "pass", &[("password", password.as_bytes())]).await;
    wait_ready(&client, &ns, "ghcr", "True", Some("Synced")).await;
    assert_ok(&doctor(&ns, &["pod", "web"]).await);
}

#[tokio::test]
async fn a_secret_its_credential_never_wrote_is_that_credentials_failure() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-unwritten").await;
    service_account(&client, &ns).await;
    let spec = json!({"registry": "ghcr.io",
                      "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "pass"}}}});
    create_credential(&client, &ns, "ghcr", spec).await;
    wait_ready(&client, &ns, "ghcr", "False", Some("SourceSecretNotFound")).await;
    pod(&client, &ns, "web", "ghcr.io/org/app:v1", &["ghcr"]).await;

    let d = doctor(&ns, &["pod", "web"]).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "credential-not-ready", "{}", d.text);
    assert!(d.summary().contains("RegistryCredential ghcr, which writes it, has not"), "{}", d.text);
    assert!(d.fixes()[0].contains(&format!("Secret {ns}/pass not found")), "{}", d.text);

    let password = secret_value("puller", "doctor");
    create_secret(&client, &ns, "pass", &[("password", password.as_bytes())]).await;
    wait_ready(&client, &ns, "ghcr", "True", Some("Synced")).await;
    assert_ok(&doctor(&ns, &["pod", "web"]).await);
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_401_by_verify_and_the_right_one_can_pull() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-401").await;
    service_account(&client, &ns).await;
    let password = secret_value("puller", "doctor-registry");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    let image = registry.push_test_image("team/app", "v1", "puller", &password).unwrap();
    // The Secret's password is not the registry's; the registry speaks plain HTTP
    // (spec.verify.insecure, which --verify follows).
    let extra = json!({"serviceAccounts": ["app"], "verify": {"insecure": true}});
    let wrong = basic_credential(&client, &ns, "private", &registry.host(), extra).await;
    wait_listed(&client, &ns, "private").await;

    let args = ["image", image.as_str(), "--service-account", "app", "--verify"];
    let d = doctor(&ns, &args).await;
    assert_shows_no_value(&d, &wrong);
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "unauthorized", "{}", d.text);
    assert_eq!(d.image()["check"]["reason"], "Unauthorized", "{}", d.text);
    assert!(d.summary().contains("401"), "{}", d.text);

    set_secret_key(&client, &ns, "pass", "password", password.as_bytes()).await;
    wait_secret(&client, &ns, "private", "the registry's password", |s| logins(s)[0].2 == password).await;
    let d = doctor(&ns, &args).await;
    assert_ok(&d);
    assert_eq!(d.image()["check"]["reason"], "Verified", "{}", d.text);
    assert!(d.text.contains("can pull now"), "{}", d.text);
    assert_shows_no_value(&d, &password);
}

/// Neither output shows `value`, as text or in base64 (the `auth` field's form).
fn assert_shows_no_value(d: &Doctor, value: &str) {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("puller:{value}"));
    for text in [d.report.to_string(), d.text.clone()] {
        assert!(!text.contains(value) && !text.contains(&auth), "a password is shown: {text}");
    }
}

#[tokio::test]
async fn without_permission_to_read_secrets_the_credentials_status_answers() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-view").await;
    service_account(&client, &ns).await;
    basic_credential(&client, &ns, "ghcr", "ghcr.io", json!({"serviceAccounts": ["app"]})).await;
    wait_listed(&client, &ns, "ghcr").await;
    let viewer = viewer_kubeconfig(&client, &ns).await;

    let offset = audit_offset();
    let d = doctor_as(&viewer, &ns, &["image", "ghcr.io/org/app:v1", "--service-account", "app"]).await;
    assert_ok(&d);
    // Only the user's own identity, and only reads (the Secret's get refused, 403).
    let requests = requests_of_since(&format!("system:serviceaccount:{ns}:viewer"), offset);
    assert!(requests.iter().any(
        |(verb, resource, _, name)| (verb.as_str(), resource.as_str(), name.as_str()) == ("get", "secrets", "ghcr")
    ));
    assert!(!requests.iter().any(|(verb, ..)| is_write(verb)), "{requests:?}");
    let secret = &d.image()["secrets"][0];
    assert_eq!(secret["state"], "forbidden", "{}", d.text);
    assert_eq!(secret["entries"][0]["source"], "credential status", "{}", d.text);
    assert!(d.text.contains("no permission to read Secret ghcr"), "{}", d.text);
}

/// A kubeconfig for ServiceAccount `viewer` of `ns`, bound to the built-in `view` role (which
/// reads no Secrets; the chart aggregates reading RegistryCredentials into it).
async fn viewer_kubeconfig(client: &Client, ns: &str) -> PathBuf {
    let account: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "viewer"}})).unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &account).await.unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "viewer-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns).create(&PostParams::default(), &binding).await.unwrap();
    let ns = ns.to_string();
    tokio::task::spawn_blocking(move || env().cp.service_account_kubeconfig(&ns, "viewer").unwrap()).await.unwrap()
}

#[tokio::test]
async fn a_repository_the_token_server_does_not_grant_is_forbidden() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-403").await;
    service_account(&client, &ns).await;
    let (team, other) = (secret_value("team", "doctor-token"), secret_value("other", "doctor-token"));
    let options = regcred_testenv::RegistryOptions { token_auth: true, ..Default::default() };
    let registry = Registry::start_with(&[("team", &team), ("other", &other)], options).unwrap();
    registry.push_test_image("team/app", "v1", "team", &team).unwrap();
    let image = registry.push_test_image("other/app", "v1", "other", &other).unwrap();
    create_secret(&client, &ns, "pass", &[("password", team.as_bytes())]).await;
    let spec = json!({"registry": registry.host(), "serviceAccounts": ["app"],
                      "source": {"basic": {"username": "team", "passwordSecretRef": {"name": "pass"}}}});
    create_credential(&client, &ns, "private", spec).await;
    wait_listed(&client, &ns, "private").await;

    // Plain HTTP by the flag (the credential has no spec.verify).
    let args = ["image", image.as_str(), "--service-account", "app", "--verify", "--plain-http"];
    let d = doctor(&ns, &args).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "forbidden", "{}", d.text);
    assert!(d.summary().contains("no pull access to this repository"), "{}", d.text);
    assert!(d.fixes()[0].starts_with("grant the login of RegistryCredential private pull on other/app"), "{}", d.text);

    // The fix: a login the token server grants other/app.
    set_secret_key(&client, &ns, "pass", "password", other.as_bytes()).await;
    let patch = json!({"spec": {"source": {"basic": {"username": "other"}}}});
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    credentials.patch("private", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    wait_secret(&client, &ns, "private", "other's login", |s| logins(s)[0].2 == other).await;
    let d = doctor(&ns, &args).await;
    assert_ok(&d);
    assert!(d.text.contains("can pull now"), "{}", d.text);
}

/// The doctor reads every page of a list: with 500 other credentials ahead of it (by name),
/// the credential that writes the missing Secret is on the second page of 500, and is still
/// named as the cause. (None of them carries the test controller's label: none is reconciled.)
#[tokio::test]
async fn the_credential_on_a_second_page_is_still_found() {
    env();
    let client = client().await;
    let ns = namespace(&client, "doctor-pages").await;
    service_account(&client, &ns).await;
    let credentials = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let credential = |name: String, secret: &str| -> RegistryCredential {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"registry": "quay.io", "secret": {"name": secret},
                     "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "pass"}}}},
        }))
        .unwrap()
    };
    for i in 0..500 {
        let decoy = credential(format!("a-{i:03}"), &format!("other-{i:03}"));
        credentials.create(&PostParams::default(), &decoy).await.unwrap();
    }
    credentials.create(&PostParams::default(), &credential("z-writer".into(), "ghcr-pull")).await.unwrap();
    pod(&client, &ns, "web", "quay.io/org/app:v1", &["ghcr-pull"]).await;

    let d = doctor(&ns, &["pod", "web"]).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert!(d.summary().contains("RegistryCredential z-writer, which writes it"), "{}", d.text);
}
