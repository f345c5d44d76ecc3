//! Pods on a real node (testenv's `Node`: containerd and a kubelet) pull private images with
//! the Secrets regcred writes: each test asserts the kubelet's own pull result in the Pod's
//! Events (`Pulled`, or `Failed` with the registry's refusal) and that the container ran.
//! Registries answer under the host names the sources are shaped for (ghcr.io, docker.io,
//! gcr.io, an ECR host, an ACR host) through containerd's registry hosts config, while the kubelet looks
//! the credential up under the image's own host. Where the machine cannot run a node these
//! tests fail, saying why, unless `REGCRED_SKIP_NODE=1`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use regcred_testenv::{AwsEmulator, AzureEmulator, GcpEmulator, Node, Registry, eventually};
use serde_json::{Value, json};

use crate::support::*;

/// Pulls, sandboxes and kubelet retries take longer than the controller's writes.
const NODE_TIMEOUT: Duration = Duration::from_secs(60);

/// The shared node, or None (the test returns) with `REGCRED_SKIP_NODE=1`.
fn node() -> Option<&'static Node> {
    env();
    Node::shared()
}

/// Creates a Pod on the node that runs `image` once (`imagePullPolicy: Always`, so every Pod
/// pulls and shows its own pull result), with these pull Secrets and ServiceAccount. Retried
/// while the namespace's ServiceAccount does not exist yet (admission refuses the Pod then).
async fn create_pod(client: &Client, ns: &str, name: &str, image: &str, secrets: &[&str], sa: Option<&str>) -> Pod {
    let mut spec = json!({
        "nodeName": regcred_testenv::NODE_NAME,
        "hostNetwork": true,
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}],
    });
    if !secrets.is_empty() {
        spec["imagePullSecrets"] = secrets.iter().map(|s| json!({"name": s})).collect();
    }
    if let Some(sa) = sa {
        spec["serviceAccountName"] = sa.into();
    }
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).expect("a Pod");
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    eventually(&format!("creating Pod {ns}/{name}"), TIMEOUT, || async {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(pod) => Some(pod),
            Err(kube::Error::Api(e)) if e.message.contains("serviceaccount") => None,
            Err(e) => panic!("creating Pod {ns}/{name}: {e}"),
        }
    })
    .await
}

/// Waits for the kubelet's `Pulled` Event for the Pod; returns its note.
async fn wait_pulled(client: &Client, ns: &str, pod: &str) -> String {
    wait_pod_event(client, ns, pod, "Normal", "Pulled", "Successfully pulled image").await
}

/// Waits for the kubelet's `Failed` Event of a pull for the Pod; returns its note.
async fn wait_pull_failed(client: &Client, ns: &str, pod: &str) -> String {
    wait_pod_event(client, ns, pod, "Warning", "Failed", "Failed to pull image").await
}

async fn wait_pod_event(client: &Client, ns: &str, pod: &str, type_: &str, reason: &str, prefix: &str) -> String {
    eventually(&format!("{type_} Event {reason} for Pod {ns}/{pod}"), NODE_TIMEOUT, || async {
        events_for(client, ns, "Pod", pod)
            .await
            .into_iter()
            .find(|(t, r, note)| t == type_ && r == reason && note.starts_with(prefix))
            .map(|e| e.2)
    })
    .await
}

/// Waits until the Pod's container ran to completion (exit 0, phase Succeeded).
async fn wait_ran(client: &Client, ns: &str, name: &str) -> Pod {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    eventually(&format!("Pod {ns}/{name} to run and succeed"), NODE_TIMEOUT, || async {
        let pod = pods.get(name).await.ok()?;
        (pod.status.as_ref()?.phase.as_deref() == Some("Succeeded")).then_some(pod)
    })
    .await
}

/// Waits until the Pod's container waits on its image: ErrImagePull or ImagePullBackOff.
async fn wait_image_pull_error(client: &Client, ns: &str, name: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    eventually(&format!("Pod {ns}/{name} waiting on its image"), NODE_TIMEOUT, || async {
        let pod = pods.get(name).await.ok()?;
        let status = pod.status?.container_statuses?.into_iter().next()?;
        let reason = status.state?.waiting?.reason?;
        ["ErrImagePull", "ImagePullBackOff"].contains(&reason.as_str()).then_some(reason)
    })
    .await
}

/// The Pod pulled `image` (the kubelet's `Pulled` Event names it), no pull of it failed,
/// and its container ran. One exception, the kubelet's own: when its Secret cache had not
/// synced within its one second (`FailedToRetrieveImagePullSecret`, seen on this machine
/// under load), it pulls without the Secret once, fails, and retries with it; a failed pull
/// is accepted only when the kubelet reported that, and the pull must still succeed.
async fn assert_pulls_and_runs(client: &Client, ns: &str, pod: &str, image: &str) {
    let pulled = wait_pulled(client, ns, pod).await;
    assert!(pulled.contains(&format!("\"{image}\"")), "{pulled}");
    wait_ran(client, ns, pod).await;
    let events = events_for(client, ns, "Pod", pod).await;
    let cache_missed = events.iter().any(|(_, reason, _)| reason == "FailedToRetrieveImagePullSecret");
    assert!(cache_missed || !events.iter().any(|(_, reason, _)| reason == "Failed"), "{events:?}");
}

/// An HTTPS registry with a CA of its own (which the node trusts for a host mapped to it) and
/// these users.
fn tls_registry(users: &[(&str, &str)]) -> Registry {
    Registry::start_with(users, regcred_testenv::RegistryOptions { tls: true, ..Default::default() }).unwrap()
}

/// [`tls_registry`] with one user, and the image `team/app:v1` in it.
/// A registry serving `team/app` to `puller`, and RegistryCredential `private` in `ns` whose
/// source (Secret `reg-pass`) holds a wrong password, its Secret written: a Pod's pull gets a
/// 401 until `reg-pass` holds `password`.
struct WrongPassword {
    registry: Registry,
    image: String,
    password: String,
}

async fn wrong_password_credential(client: &Client, ns: &str) -> WrongPassword {
    let password = secret_value("puller", "right");
    let (registry, image) = registry_with_image("puller", &password, "team/app");
    let wrong = secret_value("puller", "wrong");
    create_secret(client, ns, "reg-pass", &[("password", wrong.as_bytes())]).await;
    create_credential(
        client,
        ns,
        "private",
        json!({"registry": registry.host(),
               "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "reg-pass"}}}}),
    )
    .await;
    wait_secret(client, ns, "private", "the wrong password", |s| logins(s)[0].2 == wrong).await;
    WrongPassword { registry, image, password }
}

fn registry_with_image(user: &str, password: &str, repo: &str) -> (Registry, String) {
    let registry = tls_registry(&[(user, password)]);
    let image = registry.push_program_image(repo, "v1", user, password, &["hello", repo]).unwrap();
    (registry, image)
}

#[tokio::test]
async fn basic_source_with_colon_and_non_ascii_password_pulls_on_the_node() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-basic").await;
    let password = secret_value("puller", "pä:ss wörd");
    let (registry, image) = registry_with_image("puller", &password, "team/app");
    // Pulled from its own address, over HTTPS with a CA the node trusts for it.
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    create_secret(&client, &ns, "reg-pass", &[("password", password.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "private",
        json!({"registry": registry.host(),
               "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "reg-pass"}}}}),
    )
    .await;
    wait_secret(&client, &ns, "private", "written", |_| true).await;

    create_pod(&client, &ns, "app", &image, &["private"], None).await;
    assert_pulls_and_runs(&client, &ns, "app", &image).await;
    // The container's own output, through the apiserver and the kubelet.
    let out = env().cp.kubectl(&["-n", &ns, "logs", "app"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello team/app", "{out:?}");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn ghcr_source_pulls_from_ghcr_io() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-ghcr").await;
    let token = secret_value("octocat", "ghp");
    let (registry, _) = registry_with_image("octocat", &token, "octocat/app");
    let _ghcr = node.map_registry("ghcr.io", &registry).unwrap();
    create_secret(&client, &ns, "ghcr-pat", &[("token", token.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "ghcr",
        json!({"source": {"ghcr": {"username": "octocat", "tokenSecretRef": {"name": "ghcr-pat"}}}}),
    )
    .await;
    wait_secret(&client, &ns, "ghcr", "written", |_| true).await;

    create_pod(&client, &ns, "app", "ghcr.io/octocat/app:v1", &["ghcr"], None).await;
    assert_pulls_and_runs(&client, &ns, "app", "ghcr.io/octocat/app:v1").await;
}

#[tokio::test]
async fn docker_hub_source_pulls_images_named_the_docker_hub_way() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-hub").await;
    let password = secret_value("me", "hub");
    let (registry, _) = registry_with_image("me", &password, "me/app");
    let _hub = node.map_registry("docker.io", &registry).unwrap();
    create_secret(&client, &ns, "hub-pass", &[("pw", password.as_bytes())]).await;
    create_credential(
        &client,
        &ns,
        "hub",
        json!({"registry": "docker.io",
               "source": {"basic": {"username": "me", "passwordSecretRef": {"name": "hub-pass", "key": "pw"}}}}),
    )
    .await;
    wait_secret(&client, &ns, "hub", "written", |_| true).await;

    // As users write it: no host at all, and the full docker.io name.
    for (pod, image) in [("short", "me/app:v1"), ("full", "docker.io/me/app:v1")] {
        create_pod(&client, &ns, pod, image, &["hub"], None).await;
        assert_pulls_and_runs(&client, &ns, pod, image).await;
    }
}

#[tokio::test]
async fn gcr_sources_pull_with_an_access_token_and_with_the_key_file_through_the_token_realm() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-gcr").await;
    // Artifact Registry's realm: `oauth2accesstoken` with a live token, or `_json_key` with a key
    // the emulator issued; the account pulls under its own project (and may push here, to
    // publish the image).
    let gcp = GcpEmulator::start().unwrap();
    let key = gcp.create_service_account_key("puller@regcred-test.iam.gserviceaccount.com").unwrap();
    record_secret(&key.json);
    record_secret(&key.private_key);
    gcp.grant(&key.client_email, "regcred-test/app", &["pull", "push"]).unwrap();
    // HTTPS, as its realm: the node trusts the registry's CA and the realm's for gcr.io only.
    let registry = Registry::start_with_token_realm(&gcp.token_realm()).unwrap();
    assert!(registry.url().starts_with("https://"), "{}", registry.url());
    registry.push_program_image("regcred-test/app", "v1", "_json_key", &key.json, &["hello", "gcr"]).unwrap();
    let _gcr = node.map_registry("gcr.io", &registry).unwrap();
    // A controller that asks this Google for tokens.
    let label = format!("node-gcr-{}", &unique()[..6]);
    let _controller = crate::gcr::spawn_google_controller(&gcp, &label, &[]);
    create_secret(&client, &ns, "gcp-sa", &[("key.json", key.json.as_bytes())]).await;
    for (name, login) in [("gcr", "AccessToken"), ("gcr-json", "JsonKey")] {
        let source = json!({"gcr": {"jsonKeySecretRef": {"name": "gcp-sa"}, "login": login}});
        create_credential_for(&client, &ns, name, Some(&label), json!({"registry": "gcr.io", "source": source})).await;
        let secret = wait_secret(&client, &ns, name, "written", |_| true).await;
        if login == "AccessToken" {
            let (_, user, token) = logins(&secret).remove(0);
            assert_eq!(user, "oauth2accesstoken");
            record_secret(&token);
        }
        gcp.reset().unwrap();
        let pod = format!("app-{name}");
        create_pod(&client, &ns, &pod, "gcr.io/regcred-test/app:v1", &[name], None).await;
        assert_pulls_and_runs(&client, &ns, &pod, "gcr.io/regcred-test/app:v1").await;
        // The realm saw the Secret's login, and granted the key's account.
        let calls = gcp.calls().unwrap();
        assert!(
            calls
                .iter()
                .any(|c| c["endpoint"] == "registry:token" && c["status"] == 200 && c["identity"] == key.client_email),
            "{name}: {calls:?}"
        );
    }
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn a_service_account_patched_by_regcred_gives_pods_the_secret() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-sa").await;
    let password = secret_value("puller", "sa");
    let (registry, image) = registry_with_image("puller", &password, "team/app");
    // Pulled from its own address, over HTTPS with a CA the node trusts for it.
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    create_secret(&client, &ns, "reg-pass", &[("password", password.as_bytes())]).await;
    let account = ServiceAccount {
        metadata: ObjectMeta { name: Some("runner".into()), ..Default::default() },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), &ns).create(&PostParams::default(), &account).await.unwrap();
    create_credential(
        &client,
        &ns,
        "private",
        json!({"registry": registry.host(), "serviceAccounts": ["runner"],
               "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "reg-pass"}}}}),
    )
    .await;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    eventually("regcred to add its Secret to ServiceAccount runner", TIMEOUT, || async {
        let sa = accounts.get("runner").await.ok()?;
        sa.image_pull_secrets?.iter().any(|r| r.name == "private").then_some(())
    })
    .await;

    // No imagePullSecrets in the Pod: admission copies the ServiceAccount's.
    let pod = create_pod(&client, &ns, "app", &image, &[], Some("runner")).await;
    let names: Vec<String> =
        pod.spec.unwrap().image_pull_secrets.unwrap_or_default().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["private"]);
    assert_pulls_and_runs(&client, &ns, "app", &image).await;
}

#[tokio::test]
async fn a_cluster_credential_fans_out_to_a_new_namespace_whose_pods_pull() {
    let Some(node) = node() else { return };
    let client = client().await;
    let team = format!("node-{}", &unique()[..6]);
    let source_ns = namespace(&client, "node-fan-src").await;
    let password = secret_value("robot", "node-fanout");
    let (registry, image) = registry_with_image("robot", &password, "team/app");
    // Pulled from its own address, over HTTPS with a CA the node trusts for it.
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    create_secret(&client, &source_ns, "src", &[("password", password.as_bytes())]).await;
    let name = format!("node-fan-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({
            "registry": registry.host(),
            "source": {"basic": {"username": "robot", "passwordSecretRef": {"name": "src", "namespace": source_ns}}},
            "namespaces": {"selector": {"matchLabels": {"team": team}}},
            "secret": {"name": "team-pull"},
        }),
    )
    .await;
    wait_cluster(&client, &name, "Ready", |s| s.credential.condition("Ready").is_some()).await;

    // A namespace that appears after the credential.
    let ns = labelled_namespace(&client, "node-fan", &[("team", &team)]).await;
    wait_secret(&client, &ns, "team-pull", "fanned out", |_| true).await;
    create_pod(&client, &ns, "app", &image, &["team-pull"], None).await;
    assert_pulls_and_runs(&client, &ns, "app", &image).await;
}

#[tokio::test]
async fn a_fixed_source_lets_the_same_pod_pull_on_the_kubelets_retry() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-fix").await;
    let WrongPassword { registry, image, password } = wrong_password_credential(&client, &ns).await;
    // Pulled from its own address, over HTTPS with a CA the node trusts for it.
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();

    let pod = create_pod(&client, &ns, "app", &image, &["private"], None).await;
    let uid = pod.metadata.uid.clone().unwrap();
    let failed = wait_pull_failed(&client, &ns, "app").await;
    assert!(failed.contains("401 Unauthorized"), "{failed}");
    wait_image_pull_error(&client, &ns, "app").await;

    // The source is fixed; regcred rewrites the Secret; the kubelet's next try pulls.
    set_secret_key(&client, &ns, "reg-pass", "password", password.as_bytes()).await;
    wait_secret(&client, &ns, "private", "the right password", |s| logins(s)[0].2 == password).await;
    let pulled = wait_pulled(&client, &ns, "app").await;
    assert!(pulled.contains(&format!("\"{image}\"")), "{pulled}");
    let ran = wait_ran(&client, &ns, "app").await;
    assert_eq!(ran.metadata.uid.as_deref(), Some(uid.as_str()), "the same Pod, not a new one");
    assert_no_leaks(&client).await;
}

/// `regcred doctor` on a Pod the kubelet failed to pull for: the kubelet's 401 in the Pod's
/// Events and `--verify`'s 401 name the cause; once the source is fixed as the doctor says,
/// the same Pod pulls and runs, and the doctor reports it fine.
#[tokio::test]
async fn the_doctor_explains_a_401_the_kubelet_saw_and_passes_once_the_pod_runs() {
    let Some(node) = node() else { return };
    let client = client().await;
    let ns = namespace(&client, "node-doctor").await;
    let WrongPassword { registry, image, password } = wrong_password_credential(&client, &ns).await;
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    let ca = env().cp.dir().join(format!("doctor-ca-{ns}.pem"));
    std::fs::write(&ca, registry.ca_pem().expect("a TLS registry")).unwrap();
    create_pod(&client, &ns, "app", &image, &["private"], None).await;
    wait_pull_failed(&client, &ns, "app").await;

    let ca = ca.to_string_lossy().into_owned();
    let args = ["pod", "app", "--verify", "--ca-file", ca.as_str()];
    let d = crate::doctor::doctor(&ns, &args).await;
    assert_eq!(d.status, 1, "{}", d.text);
    assert_eq!(d.cause(), "unauthorized", "{}", d.text);
    let events = d.image()["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().any(|e| e["cause"] == "unauthorized"), "the kubelet's 401: {}", d.text);
    assert!(d.fixes()[0].contains("RegistryCredential private"), "{}", d.text);

    set_secret_key(&client, &ns, "reg-pass", "password", password.as_bytes()).await;
    wait_secret(&client, &ns, "private", "the right password", |s| logins(s)[0].2 == password).await;
    wait_ran(&client, &ns, "app").await;
    let d = crate::doctor::doctor(&ns, &args).await;
    assert_eq!((d.status, d.cause()), (0, "ok"), "{}", d.text);
    assert!(d.text.contains("can pull now"), "{}", d.text);
}

/// `regcred doctor deployment` shows the kubelet's pull Events of the Deployment's Pods (the
/// Pods its selector picks), with the cause they name.
#[tokio::test]
async fn the_doctor_shows_the_pull_events_of_a_deployments_pods() {
    let Some(node) = node() else { return };
    env().cp.start_workload_controllers().unwrap();
    let client = client().await;
    let ns = namespace(&client, "node-doctor-deploy").await;
    let WrongPassword { registry, image, .. } = wrong_password_credential(&client, &ns).await;
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"nodeName": regcred_testenv::NODE_NAME, "hostNetwork": true,
                                       "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 0,
                                       "imagePullSecrets": [{"name": "private"}],
                                       "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}]}}},
    }))
    .unwrap();
    let deployments = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment).await.unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let labels = kube::api::ListParams::default().labels("app=web");
    let pod = eventually("the Deployment's Pod", NODE_TIMEOUT, || async {
        pods.list(&labels).await.ok()?.items.into_iter().next()?.metadata.name
    })
    .await;
    wait_pull_failed(&client, &ns, &pod).await;

    // The entry matches (exit status 0: the Secret covers the image); the Events say the pull
    // failed, and the verdict points to --verify.
    let d = crate::doctor::doctor(&ns, &["deployment", "web"]).await;
    assert_eq!(d.status, 0, "{}", d.text);
    let events = d.image()["events"].as_array().cloned().unwrap_or_default();
    assert!(events.iter().any(|e| e["cause"] == "unauthorized"), "the kubelet's 401 in: {}", d.text);
    // Without --verify, the entry matches: the Events are what says the pull failed.
    assert!(d.summary().contains("the kubelet's last pull Event says unauthorized"), "{}", d.text);

    deployments.delete("web", &Default::default()).await.unwrap();
    pods.delete_collection(&Default::default(), &labels).await.unwrap();
}

/// Seconds since the epoch, as the emulator records times.
fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// When the ECR password `password` expires, from the emulator's record of the call that
/// issued it.
fn expiry_of(aws: &AwsEmulator, password: &str) -> f64 {
    use base64::Engine;
    let calls = aws.calls().unwrap();
    let call = calls
        .iter()
        .filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200)
        .find(|c| {
            let token = c["authorizationData"][0]["authorizationToken"].as_str().unwrap_or_default();
            let decoded = base64::engine::general_purpose::STANDARD.decode(token).unwrap_or_default();
            decoded == format!("AWS:{password}").as_bytes()
        })
        .expect("the emulator issued the Secret's password");
    call["expiresAt"].as_f64().unwrap()
}

/// The ECR registry's decisions since `since`: (status, expiresAt of the password presented),
/// one per request the kubelet sent it.
fn registry_logins(aws: &AwsEmulator, since: f64) -> Vec<(u64, Option<f64>)> {
    aws.calls()
        .unwrap()
        .into_iter()
        .filter(|c| c["action"] == "registry:Login" && c["time"].as_f64().unwrap() >= since)
        .map(|c: Value| (c["status"].as_u64().unwrap(), c["expiresAt"].as_f64()))
        .collect()
}

#[tokio::test]
async fn ecr_tokens_pull_on_the_node_rotate_and_a_stale_one_is_refused() {
    let Some(node) = node() else { return };
    let client = client().await;
    // 30-second tokens (refreshed about 22 s after issue), and an ECR registry under a host of
    // an account of this test's own that lets the keys' account pull (a repository policy):
    // HTTPS, ECR's Basic challenge, exactly the live passwords this emulator issued.
    let aws = AwsEmulator::start_with_lifetime(30).unwrap();
    let account = format!("{:012}", u64::from_str_radix(&unique()[..10], 16).unwrap() % 1_000_000_000_000);
    let host = format!("{account}.dkr.ecr.eu-west-1.amazonaws.com");
    let registry = Registry::start_ecr(&aws, &host, &[regcred_testenv::AWS_ACCOUNT]).unwrap();
    let _ecr = node.map_registry(&host, &registry).unwrap();
    let name = format!("node-ecr-{}", &unique()[..6]);
    let mut controller =
        spawn_controller(env().cp, &name, &format!("{CONTROLLER_LABEL}={name}"), &aws.endpoint(), &[], &[]);
    let ns = namespace(&client, "node-ecr").await;
    create_aws_keys(&client, &aws, &ns, "aws-keys", "node-ecr").await;
    create_credential_for(
        &client,
        &ns,
        "ecr",
        Some(&name),
        json!({"source": {"ecr": {"registry": host, "auth": {"secretRef": {"name": "aws-keys"}}}}}),
    )
    .await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let first = logins(&wait_secret(&client, &ns, "ecr", "written", |_| true).await)[0].2.clone();
    record_secret(&first);
    registry.push_program_image("team/app", "v1", "AWS", &first, &["hello", "ecr"]).unwrap();
    let image = format!("{host}/team/app:v1");

    // 1. A Pod pulls with the token regcred wrote.
    let since = now();
    create_pod(&client, &ns, "first", &image, &["ecr"], None).await;
    assert_pulls_and_runs(&client, &ns, "first", &image).await;
    let first_expiry = expiry_of(&aws, &first);
    let decided = registry_logins(&aws, since);
    assert!(decided.contains(&(200, Some(first_expiry))), "the registry let the first token in: {decided:?}");
    // The kubelet answered ECR's challenge: its first request came without the login.
    assert!(decided.contains(&(401, None)), "no challenge: {decided:?}");

    // 2. regcred rotates the token before it expires; a new Pod pulls with the new one.
    let rotated = eventually("regcred to write a new token", NODE_TIMEOUT, || async {
        let secret = secrets.get("ecr").await.ok()?;
        let password = logins(&secret)[0].2.clone();
        (password != first).then_some(password)
    })
    .await;
    record_secret(&rotated);
    let rotated_expiry = expiry_of(&aws, &rotated);
    assert!(rotated_expiry > first_expiry);
    let since = now();
    create_pod(&client, &ns, "rotated", &image, &["ecr"], None).await;
    assert_pulls_and_runs(&client, &ns, "rotated", &image).await;
    let granted = registry_logins(&aws, since);
    assert!(granted.iter().any(|(status, expiry)| *status == 200 && *expiry >= Some(rotated_expiry)), "{granted:?}");

    // 3. The controller stops; once the Secret's token expired, a new Pod is refused as ECR
    // refuses an expired token: 403 (DENIED, "Your authorization token has expired").
    controller.kill();
    let stale = logins(&secrets.get("ecr").await.unwrap())[0].2.clone();
    record_secret(&stale);
    let expiry = expiry_of(&aws, &stale);
    eventually("the Secret's token to expire", NODE_TIMEOUT, || async { (now() > expiry + 1.0).then_some(()) }).await;
    assert_eq!(logins(&secrets.get("ecr").await.unwrap())[0].2, stale, "nobody refreshed the Secret");
    let since = now();
    create_pod(&client, &ns, "stale", &image, &["ecr"], None).await;
    let failed = wait_pull_failed(&client, &ns, "stale").await;
    assert!(failed.contains("403 Forbidden"), "{failed}");
    wait_image_pull_error(&client, &ns, "stale").await;
    let refused = registry_logins(&aws, since);
    assert!(refused.contains(&(403, Some(expiry))), "the registry refused the expired token: {refused:?}");
    assert!(!refused.iter().any(|(status, _)| *status == 200), "{refused:?}");
}

/// The static binary the image is built from (scripts/build-static.sh, as CI builds it):
/// `$REGCRED_STATIC_BIN` (scripts/test.sh sets it), else built now into a target directory of
/// its own (the running `cargo test` holds the lock of its own), which takes minutes once.
fn static_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("REGCRED_STATIC_BIN") {
        return path.into();
    }
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
            let out = std::process::Command::new("bash")
                .arg(root.join("scripts/build-static.sh"))
                .env("CARGO_TARGET_DIR", std::path::Path::new(&target).join("static-for-tests"))
                // What .ci/run builds: the same code, without optimisation.
                .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
                .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
                .current_dir(root)
                .stderr(std::process::Stdio::inherit())
                .output()
                .expect("running scripts/build-static.sh");
            assert!(out.status.success(), "scripts/build-static.sh failed");
            String::from_utf8(out.stdout).unwrap().lines().last().expect("the binary's path").into()
        })
        .clone()
}

#[tokio::test]
async fn the_controller_image_runs_on_the_node_as_the_chart_runs_it() {
    let Some(node) = node() else { return };
    let binary = static_binary();
    let client = client().await;
    let ns = namespace(&client, "node-image").await;
    let password = secret_value("ci", "image");
    let registry = tls_registry(&[("ci", &password)]);
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    let image = registry.push_controller_image(&binary, "regcred/regcred", "test", "ci", &password).unwrap();
    let pull = Secret {
        metadata: ObjectMeta { name: Some("pull".into()), ..Default::default() },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(
                ".dockerconfigjson".to_string(),
                k8s_openapi::ByteString(regcred_testenv::docker_config_json(&registry.host(), "ci", &password)),
            )]
            .into(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &pull).await.unwrap();

    // The chart's security settings (charts/regcred/templates/deployment.yaml), its image's
    // entrypoint, and `--version` instead of `run` (no apiserver is reachable from a Pod here).
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "regcred"},
        "spec": {
            "nodeName": regcred_testenv::NODE_NAME, "hostNetwork": true, "restartPolicy": "Never",
            "automountServiceAccountToken": false, "imagePullSecrets": [{"name": "pull"}],
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "regcred", "image": image, "imagePullPolicy": "Always", "args": ["--version"],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "runAsNonRoot": true, "runAsUser": 65532,
                                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
            }],
        },
    }))
    .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    eventually("creating the Pod", TIMEOUT, || async {
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => Some(()),
            Err(kube::Error::Api(e)) if e.message.contains("serviceaccount") => None,
            Err(e) => panic!("creating the Pod: {e}"),
        }
    })
    .await;
    assert_pulls_and_runs(&client, &ns, "regcred", &image).await;
    let out = env().cp.kubectl(&["-n", &ns, "logs", "regcred"]);
    let version = format!("regcred {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), version, "{out:?}");
}

/// A GET of `path` on a Pod's admin port (8080) from this machine, over the node's bridge:
/// the body, if it answered 200.
fn pod_admin_get(ip: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new(ip.parse().ok()?, 8080);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// The release's Pods that are Ready: (name, IP).
async fn ready_pods(client: &Client, ns: &str, release: &str) -> Vec<(String, String)> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let list = pods
        .list(&kube::api::ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| Some((p.metadata.name?, p.status?.pod_ip?)))
        .collect()
}

/// Waits until exactly `n` Pods of the release are Ready, none other exists, and exactly one
/// of them leads (its `regcred_leader` metric is 1 and the Lease names it); returns (leader,
/// the Ready Pods).
async fn wait_settled(client: &Client, ns: &str, release: &str, n: usize) -> (String, Vec<(String, String)>) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let leases = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), ns);
    eventually(&format!("{n} Ready replicas of {release}, one leading"), Duration::from_secs(120), || async {
        let ready = ready_pods(client, ns, release).await;
        let all = pods
            .list(&kube::api::ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
            .await
            .ok()?;
        if ready.len() != n || all.items.len() != n {
            return None;
        }
        let leaders: Vec<&String> = ready
            .iter()
            .filter(|(_, ip)| pod_admin_get(ip, "/metrics").is_some_and(|m| m.lines().any(|l| l == "regcred_leader 1")))
            .map(|(name, _)| name)
            .collect();
        let holder = leases.get(release).await.ok()?.spec?.holder_identity?;
        (leaders.len() == 1 && *leaders[0] == holder).then(|| (holder, ready.clone()))
    })
    .await
}

/// Applies a source change every second while `during` runs (and 3 s after), each a new
/// password `TAG-N`; returns the longest time from a change until the pull Secret held it or a
/// later one, and how many changes were made.
async fn longest_gap<F: std::future::Future<Output = ()>>(
    client: &Client,
    ns: &str,
    tag: &str,
    during: F,
) -> (Duration, usize) {
    let prefix = format!("{tag}-");
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::<std::time::Instant>::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let changer = {
        let (client, ns, sent, done, prefix) =
            (client.clone(), ns.to_string(), sent.clone(), done.clone(), prefix.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let at = std::time::Instant::now();
                set_secret_key(&client, &ns, "src", "password", format!("{prefix}{i}").as_bytes()).await;
                sent.lock().unwrap().push(at);
                i += 1;
                tokio::time::sleep_until(tokio::time::Instant::from_std(at + Duration::from_secs(1))).await;
            }
        })
    };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, std::time::Instant)>::new()));
    let watcher = {
        let (secrets, seen, done, prefix) = (secrets.clone(), seen.clone(), done.clone(), prefix.clone());
        tokio::spawn(async move {
            let deadline_after_done = Duration::from_secs(30);
            let mut finished_at = None;
            loop {
                let password = secrets.get("pull").await.ok().map(|secret| logins(&secret)[0].2.clone());
                if let Some(i) = password.and_then(|p| p.strip_prefix(&prefix).and_then(|i| i.parse::<usize>().ok())) {
                    let mut seen = seen.lock().unwrap();
                    if seen.last().is_none_or(|(last, _)| *last != i) {
                        seen.push((i, std::time::Instant::now()));
                    }
                }
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    let at = *finished_at.get_or_insert_with(std::time::Instant::now);
                    if at.elapsed() > deadline_after_done {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    during.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    changer.await.unwrap();
    // The last change must be seen too.
    let last = sent.lock().unwrap().len() - 1;
    eventually("the last source change in the pull Secret", Duration::from_secs(30), || async {
        seen.lock().unwrap().iter().any(|(i, _)| *i >= last).then_some(())
    })
    .await;
    watcher.abort();
    let sent = sent.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    let longest = sent
        .iter()
        .enumerate()
        .map(|(i, at)| {
            let first = seen.iter().filter(|(j, _)| *j >= i).map(|(_, t)| *t).min().expect("every change was seen");
            first.saturating_duration_since(*at)
        })
        .max()
        .unwrap();
    (longest, sent.len())
}

#[tokio::test]
async fn the_chart_runs_two_replicas_on_the_node_that_roll_and_hand_over() {
    let Some(node) = node() else { return };
    assert!(
        node.has_pod_network(),
        "the chart's Pods need Pod networking: install the CNI plugins (apt-get install containernetworking-plugins; \
         scripts/setup.sh does as root)"
    );
    let cp = env().cp;
    cp.start_workload_controllers().unwrap();
    node.start_scheduler(cp).unwrap();
    let binary = static_binary();
    let client = client().await;
    let ns = namespace(&client, "node-chart").await;
    let release = format!("regcred-{}", &unique()[..6]);
    let password = secret_value("ci", "chart-image");
    let registry = tls_registry(&[("ci", &password)]);
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    let repo = format!("{}/regcred/regcred", registry.host());
    for tag in ["v1", "v2"] {
        registry.push_controller_image(&binary, "regcred/regcred", tag, "ci", &password).unwrap();
    }
    let pull = Secret {
        metadata: ObjectMeta { name: Some("regcred-image".into()), ..Default::default() },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(
                ".dockerconfigjson".to_string(),
                k8s_openapi::ByteString(regcred_testenv::docker_config_json(&registry.host(), "ci", &password)),
            )]
            .into(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &pull).await.unwrap();

    // Pods reach the apiserver at the node's bridge address (forwarded to the apiserver): no
    // kube-proxy here serves the `kubernetes` Service. Helm's post-renderer sets the address.
    let post_renderer = cp.dir().join(format!("{release}-post-render.sh"));
    std::fs::write(
        &post_renderer,
        format!(
            "#!/bin/sh\nexec awk '/^ *- name: POD_NAME$/ {{ match($0, /^ */); i = substr($0, 1, RLENGTH); \
             print i \"- name: KUBERNETES_SERVICE_HOST\"; print i \"  value: \\\"{}\\\"\"; \
             print i \"- name: KUBERNETES_SERVICE_PORT\"; print i \"  value: \\\"{}\\\"\" }} {{ print }}'\n",
            regcred_testenv::POD_GATEWAY,
            cp.api_port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&post_renderer, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let helm = |verb: &str, tag: &str| {
        let set = format!(
            "image.repository={repo},image.tag={tag},imagePullSecrets[0].name=regcred-image,watchNamespaces[0]={ns},\
             leaderElection.lease={release},logFormat=text,logLevel=info,\
             tolerations[0].key={},tolerations[0].operator=Exists,tolerations[0].effect=NoSchedule",
            regcred_testenv::NODE_TAINT
        );
        let out = std::process::Command::new(regcred_testenv::testbin("helm").unwrap())
            .args([verb, &release, "charts/regcred", "--namespace", &ns, "--set", &set])
            // Only this test's credentials: with watchNamespaces, ClusterRegistryCredentials are
            // still watched cluster-wide, and other tests' must stay their controllers' alone.
            .args(["--set-json", &format!("selector=\"{CONTROLLER_LABEL}={release}\"")])
            .arg("--kubeconfig")
            .arg(cp.kubeconfig_path())
            .arg("--post-renderer")
            .arg(&post_renderer)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(out.status.success(), "helm {verb}: {}", String::from_utf8_lossy(&out.stderr));
    };

    // Another controller's ClusterRegistryCredential, there before the install: the chart's
    // controller (watchNamespaces, so ClusterRegistryCredentials cluster-wide) must leave it
    // alone with its selector. Without one it took over the shared controller's credentials
    // and removed their finalizers.
    let foreign = format!("foreign-{}", &unique()[..6]);
    let foreign_source = json!({"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": ns}}});
    create_cluster_credential_for(
        &client,
        &foreign,
        Some(&format!("nobody-{release}")),
        json!({"registry": "r.example.com", "namespaces": {"names": [ns]}, "source": foreign_source}),
    )
    .await;
    let audit_from = audit_offset();

    // 1. Two replicas Ready, exactly one leading.
    helm("install", "v1");
    let (leader, first) = wait_settled(&client, &ns, &release, 2).await;
    eprintln!("chart: {release} Ready on the node: {first:?}, leader {leader}");

    // 2. Credentials reconcile in-cluster, as the chart's ServiceAccount. The label keeps the
    // test's shared controller away from them.
    let user = format!("system:serviceaccount:{ns}:{release}");
    let offset = audit_offset();
    create_secret(&client, &ns, "src", &[("password", b"gap-start")]).await;
    create_credential_for(
        &client,
        &ns,
        "chart",
        Some(&release),
        json!({"registry": "r.example.com", "secret": {"name": "pull"},
               "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src"}}}}),
    )
    .await;
    wait_secret(&client, &ns, "pull", "written in-cluster", |s| logins(s)[0].2 == "gap-start").await;
    let writes = requests_of_since(&user, offset);
    assert!(
        writes.iter().any(|(verb, resource, _, name)| verb == "create" && resource == "secrets" && name == "pull"),
        "{writes:?}"
    );

    // 3. An upgrade that changes the image tag rolls both replicas, a source change every second.
    let (gap, changes) = longest_gap(&client, &ns, "upgrade", async {
        helm("upgrade", "v2");
        let (_, after) = wait_settled(&client, &ns, &release, 2).await;
        assert!(after.iter().all(|(name, _)| !first.iter().any(|(old, _)| old == name)), "both replicas replaced");
    })
    .await;
    eprintln!("chart: helm upgrade (image tag): longest reconciliation gap {gap:?} over {changes} source changes");

    // 4. Deleting the leader's Pod hands over to the other replica.
    let (leader, _) = wait_settled(&client, &ns, &release, 2).await;
    let (handover_gap, changes) = longest_gap(&client, &ns, "handover", async {
        Api::<Pod>::namespaced(client.clone(), &ns).delete(&leader, &Default::default()).await.unwrap();
        let (new_leader, _) = wait_settled(&client, &ns, &release, 2).await;
        assert_ne!(new_leader, leader);
    })
    .await;
    eprintln!("chart: leader Pod deleted: longest reconciliation gap {handover_gap:?} over {changes} source changes");
    // A standby watches the Lease and takes it as soon as it is released: before it did, a roll
    // left 7.8-11.1 s without reconciliation (a standby slept out the old term of 15 s).
    assert!(gap < Duration::from_secs(5) && handover_gap < Duration::from_secs(5), "{gap:?} {handover_gap:?}");

    // Through all of it, the chart's controller wrote no credential but its own.
    let foreign_writes: Vec<_> = requests_of_since(&user, audit_from)
        .into_iter()
        .filter(|(verb, resource, _, name)| {
            is_write(verb) && resource.ends_with("registrycredentials") && name.as_str() != "chart"
        })
        .collect();
    assert!(foreign_writes.is_empty(), "the chart's controller wrote other credentials: {foreign_writes:?}");
    let untouched = Api::<regcred::crd::ClusterRegistryCredential>::all(client.clone()).get(&foreign).await.unwrap();
    assert!(untouched.status.is_none() && untouched.metadata.finalizers.is_none(), "{untouched:?}");
    Api::<regcred::crd::ClusterRegistryCredential>::all(client.clone())
        .delete(&foreign, &Default::default())
        .await
        .unwrap();
}

/// ACR: a Pod pulls an `<name>.azurecr.io` image with the refresh token regcred wrote (a service
/// principal's): the kubelet answers ACR's Bearer challenge at the realm with the Secret's
/// `00000000-0000-0000-0000-000000000000` login, and the registry lets in only the access token
/// the realm gave for that refresh token. The node cannot resolve the ACR host, so its
/// registry's challenge names the same realm at `localhost` (see
/// `AzureEmulator::add_registry_for_node`).
#[tokio::test]
async fn acr_refresh_tokens_pull_on_the_node() {
    let Some(node) = node() else { return };
    let client = client().await;
    let azure = AzureEmulator::start().unwrap();
    let host = format!("regcrednode{}.azurecr.io", &unique()[..6]);
    let password = format!("upstream-{}", unique());
    record_secret(&password);
    let upstream = Registry::start(&[("acr-upstream", &password)]).unwrap();
    upstream.push_program_image("team/app", "v1", "acr-upstream", &password, &["hello", "acr"]).unwrap();
    azure.add_registry_for_node(&host, &upstream, "acr-upstream", &password).unwrap();
    let ca = azure.ca_pem().unwrap();
    let _acr = node.map_host(&host, &azure.registry_url(), Some(&ca)).unwrap();
    let name = format!("node-acr-{}", &unique()[..6]);
    let _controller = crate::acr::spawn_azure_controller(&azure, &name, &name, &[], &[]);
    let ns = namespace(&client, "node-acr").await;
    let (id, identity) = crate::acr::service_principal_on(&client, &azure, &ns, &host).await;
    let spec = json!({"source": {"acr": {"registry": host, "authorityHost": azure.authority(),
                                         "servicePrincipal": identity["servicePrincipal"]}}});
    create_credential_for(&client, &ns, "acr", Some(&name), spec).await;
    let secret = wait_secret(&client, &ns, "acr", "written", |_| true).await;
    let login = logins(&secret).remove(0);
    assert_eq!((login.0.as_str(), login.1.as_str()), (host.as_str(), regcred_testenv::ACR_USER));
    for token in azure.tokens().unwrap().keys() {
        record_secret(token);
    }

    let image = format!("{host}/team/app:v1");
    create_pod(&client, &ns, "first", &image, &["acr"], None).await;
    assert_pulls_and_runs(&client, &ns, "first", &image).await;
    // The kubelet went through the realm with the Secret's refresh token, and the registry
    // let in the access token it got.
    assert!(crate::acr::successful_calls(&azure, "acr:token", &id) >= 1, "{:?}", azure.calls().unwrap());
    assert!(crate::acr::successful_calls(&azure, "registry:v2", &id) >= 1, "{:?}", azure.calls().unwrap());
    for token in azure.tokens().unwrap().keys() {
        record_secret(token);
    }
    assert_no_leaks(&client).await;
}

/// Issue 23's race: a namespace is created and at once 50 Pods in it, in a tight loop. With
/// the webhook every Pod is admitted with the fan-out's Secret (not written yet for the first
/// ones: the kubelet reads `imagePullSecrets` again at each retry) and runs on the node. The
/// same loop against a credential that attaches through the namespace's `default`
/// ServiceAccount only, in the same run, gives the count that path manages (printed; those
/// Pods are not scheduled).
#[tokio::test]
async fn fifty_pods_in_a_new_namespace_all_get_the_secret_and_run() {
    let Some(node) = node() else { return };
    let hook = crate::webhook::Hook::start("webhook-race", &[]).await;
    let client = client().await;
    let source = namespace(&client, "race-source").await;
    let password = secret_value("puller", "race");
    let (registry, image) = registry_with_image("puller", &password, "team/race");
    let _trusted = node.map_registry(&registry.host(), &registry).unwrap();
    create_secret(&client, &source, "reg-pass", &[("password", password.as_bytes())]).await;
    let id = unique()[..8].to_string();
    for (name, attach, accounts) in [("pods", "Pods", json!([])), ("accounts", "ServiceAccounts", json!(["default"]))] {
        create_cluster_credential_for(
            &client,
            &format!("race-{name}-{id}"),
            Some(&hook.name),
            json!({"registry": registry.host(), "attach": attach, "serviceAccounts": accounts,
                   "secret": {"name": "pull"},
                   "namespaces": {"selector": {"matchLabels": {"race": format!("{name}-{id}")}}},
                   "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "reg-pass", "namespace": source}}}}),
        )
        .await;
    }
    let on_node = |pod: Pod| {
        let mut pod = pod;
        let spec = pod.spec.as_mut().expect("a spec");
        spec.node_name = Some(regcred_testenv::NODE_NAME.into());
        spec.host_network = Some(true);
        spec.restart_policy = Some("Never".into());
        spec.termination_grace_period_seconds = Some(0);
        spec.containers[0].image_pull_policy = Some("Always".into());
        pod
    };
    let race = |label: String, node: bool| {
        let (client, hook, image) = (client.clone(), &hook, image.clone());
        async move {
            let ns = labelled_namespace(&client, "race", &[("race", &label)]).await;
            let pods = Api::<Pod>::namespaced(client.clone(), &ns);
            let mut created = Vec::new();
            for i in 0..50 {
                let pod = hook.pod(&format!("app-{i}"), &[&image], &[], &[]);
                let pod = if node { on_node(pod) } else { pod };
                // Admission refuses Pods until the namespace's default ServiceAccount exists.
                let pod = eventually("creating a Pod", TIMEOUT, || async {
                    match pods.create(&PostParams::default(), &pod).await {
                        Ok(pod) => Some(pod),
                        Err(kube::Error::Api(e)) if e.message.contains("serviceaccount") => None,
                        Err(e) => panic!("creating a Pod in {ns}: {e}"),
                    }
                })
                .await;
                created.push(pod);
            }
            let with_secret = created.iter().filter(|p| crate::webhook::pull_secrets(p) == ["pull"]).count();
            (ns, with_secret)
        }
    };
    let (webhook_ns, by_webhook) = race(format!("pods-{id}"), true).await;
    let (accounts_ns, by_accounts) = race(format!("accounts-{id}"), false).await;
    println!("Pods admitted with the Secret: webhook {by_webhook}/50, ServiceAccount path {by_accounts}/50");
    assert_eq!(by_webhook, 50, "every Pod gets the Secret at admission");
    for i in 0..50 {
        wait_ran(&client, &webhook_ns, &format!("app-{i}")).await;
    }
    for ns in [webhook_ns, accounts_ns] {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .delete(&ns, &Default::default())
            .await
            .expect("deleting the namespace");
    }
}
