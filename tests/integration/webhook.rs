//! The Pod admission webhook against the real apiserver: the apiserver calls a test
//! controller's webhook over HTTPS on loopback, trusting the CA bundle the controller injected
//! into the chart's MutatingWebhookConfiguration (its selectors and safety settings as the
//! chart renders them; only the client config points at loopback, and an object selector
//! keeps other tests' Pods out). Each test runs its own controller, under the chart's identity
//! with the webhook on.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use regcred_testenv::{eventually, wait_for};
use serde_json::{Value, json};

use crate::support::*;

/// The label that routes a Pod to one test's webhook.
const TEST_LABEL: &str = "regcred.dev/test-webhook";

/// A controller with the webhook on, and its configuration installed.
pub struct Hook {
    pub name: String,
    pub controller: TestController,
    pub user: String,
}

/// The chart rendered as release `name` with the webhook on, as JSON documents.
fn rendering(name: &str) -> Vec<Value> {
    let text = chart_rendering(name, "webhook.enabled=true");
    text.split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<Value>(doc).ok())
        .filter(|doc| doc.get("kind").is_some())
        .collect()
}

impl Hook {
    /// Starts controller `name` (credentials labelled for it) with the webhook on 127.0.0.1,
    /// installs the chart's identity and configuration for it, and waits until the apiserver
    /// calls it (a dry-run Pod comes back with a probe credential's Secret).
    pub async fn start(name: &str, args: &[&str]) -> Hook {
        let cp = env().cp;
        let docs = rendering(name);
        let (configuration, rest): (Vec<Value>, Vec<Value>) =
            docs.into_iter().partition(|d| d["kind"] == "MutatingWebhookConfiguration");
        let path = cp.dir().join(format!("{name}-webhook-chart.yaml"));
        let text: Vec<String> = rest.iter().map(|d| serde_json::to_string(d).expect("json")).collect();
        std::fs::write(&path, text.join("\n---\n")).expect("writing the rendering");
        let kubeconfig = cp.install_controller_identity(&path, CONTROLLER_NAMESPACE, name).expect("installing it");
        let user = format!("system:serviceaccount:{CONTROLLER_NAMESPACE}:{name}");
        let secret = format!("{name}-webhook-tls");
        let mut all_args = vec![
            "--webhook-addr",
            "127.0.0.1:0",
            "--webhook-configuration",
            name,
            "--webhook-secret",
            &secret,
            "--webhook-namespace",
            CONTROLLER_NAMESPACE,
            "--webhook-hosts",
            "127.0.0.1",
        ];
        all_args.extend(args);
        let controller = spawn_labelled(name, &all_args, &[("KUBECONFIG", kubeconfig.display().to_string())]);
        let port = webhook_port(&controller_log_path(cp, name));
        let [mut configuration] = configuration.try_into().expect("one MutatingWebhookConfiguration");
        let hook = &mut configuration["webhooks"][0];
        assert!(hook["clientConfig"].get("caBundle").is_none(), "the chart leaves caBundle to the controller");
        hook["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}/mutate-pods")});
        let selector = hook["objectSelector"]["matchExpressions"].as_array_mut().expect("the chart's opt-out");
        selector.push(json!({"key": TEST_LABEL, "operator": "In", "values": [name]}));
        let configuration: MutatingWebhookConfiguration = serde_json::from_value(configuration).expect("valid");
        let configurations = Api::<MutatingWebhookConfiguration>::all(client().await);
        let _ = configurations.delete(name, &DeleteParams::default()).await;
        configurations.create(&PostParams::default(), &configuration).await.expect("creating the configuration");
        let hook = Hook { name: name.into(), controller, user };
        hook.wait_serving().await;
        hook
    }

    /// Waits until the apiserver calls the webhook with the injected CA: a dry-run Pod in a
    /// namespace of its own gets a probe credential's Secret.
    async fn wait_serving(&self) {
        let client = client().await;
        let ns = namespace(&client, "webhook-probe").await;
        self.credential(&client, &ns, "probe", "probe.example", json!({})).await;
        let pod = self.pod("probe", &["probe.example/app"], &[], &[]);
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        let dry_run = PostParams { dry_run: true, ..Default::default() };
        eventually("the apiserver calling the webhook", Duration::from_secs(60), || async {
            let pod = pods.create(&dry_run, &pod).await.ok()?;
            (pull_secrets(&pod) == ["probe"]).then_some(())
        })
        .await;
    }

    /// A basic-source RegistryCredential for `registry` in `ns`, for this test's controller,
    /// with `extra` merged into its spec.
    pub async fn credential(&self, client: &Client, ns: &str, name: &str, registry: &str, extra: Value) {
        let password = format!("{name}-pass");
        create_secret(client, ns, &password, &[("password", b"not-a-real-password")]).await;
        let mut spec = json!({"registry": registry,
            "source": {"basic": {"username": "u", "passwordSecretRef": {"name": password}}}});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        create_credential_for(client, ns, name, Some(&self.name), spec).await;
    }

    /// A Pod for this webhook with these images, labels and pull Secrets (no node: it stays
    /// Pending, which is all admission needs).
    pub fn pod(&self, name: &str, images: &[&str], labels: &[(&str, &str)], secrets: &[&str]) -> Pod {
        let mut all_labels = serde_json::Map::new();
        all_labels.insert(TEST_LABEL.into(), self.name.clone().into());
        for (k, v) in labels {
            all_labels.insert(k.to_string(), v.to_string().into());
        }
        let containers: Vec<Value> =
            images.iter().enumerate().map(|(i, image)| json!({"name": format!("c{i}"), "image": image})).collect();
        let mut spec = json!({"containers": containers, "automountServiceAccountToken": false});
        if !secrets.is_empty() {
            spec["imagePullSecrets"] = secrets.iter().map(|s| json!({"name": s})).collect();
        }
        serde_json::from_value(json!({"metadata": {"name": name, "labels": all_labels}, "spec": spec})).expect("a Pod")
    }
}

/// The port the controller logged for its webhook.
fn webhook_port(log: &PathBuf) -> u16 {
    wait_for("the webhook's address in the log", TIMEOUT, || {
        let text = std::fs::read_to_string(log).ok()?;
        let line = text.lines().rev().find(|l| l.contains("admission webhook listening"))?;
        let after = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
        after.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
    })
    .expect("the controller did not start its webhook")
}

/// The names in a Pod's `imagePullSecrets`, in order.
pub fn pull_secrets(pod: &Pod) -> Vec<String> {
    let listed = pod.spec.as_ref().and_then(|s| s.image_pull_secrets.as_ref());
    listed.into_iter().flatten().map(|r| r.name.clone()).collect()
}

async fn create(client: &Client, ns: &str, pod: &Pod) -> Pod {
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), pod).await.expect("creating the Pod")
}

#[tokio::test]
async fn pods_get_the_secrets_of_their_images_registries_and_no_other() {
    let hook = Hook::start("webhook-match", &[]).await;
    let client = client().await;
    let ns = namespace(&client, "webhook-match").await;
    for (name, registry) in [("a", "a.example:5000"), ("b", "b.example"), ("c", "c.example"), ("hub", "docker.io")] {
        hook.credential(&client, &ns, name, registry, json!({})).await;
    }
    let two = create(
        &client,
        &ns,
        &hook.pod(
            "two",
            &[
                "a.example:5000/team/app:1",
                "b.example/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ],
            &[],
            &[],
        ),
    )
    .await;
    assert_eq!(pull_secrets(&two), ["a", "b"], "both registries' Secrets, and no third");
    for (i, image) in
        ["nginx", "docker.io/library/nginx:1.27", "index.docker.io/library/nginx", "registry-1.docker.io/library/nginx"]
            .iter()
            .enumerate()
    {
        let pod = create(&client, &ns, &hook.pod(&format!("hub-{i}"), &[image], &[], &[])).await;
        assert_eq!(pull_secrets(&pod), ["hub"], "{image}");
    }
    let unmanaged = create(&client, &ns, &hook.pod("quay", &["quay.io/org/app"], &[], &[])).await;
    assert!(pull_secrets(&unmanaged).is_empty(), "an unmanaged registry gets nothing");
    let listed = create(&client, &ns, &hook.pod("listed", &["b.example/x", "c.example/y"], &[], &["own", "b"])).await;
    assert_eq!(pull_secrets(&listed), ["own", "b", "c"], "appended after what the Pod lists, never twice");
    let opted_out =
        create(&client, &ns, &hook.pod("opted-out", &["b.example/x"], &[("regcred.dev/inject", "false")], &[])).await;
    assert!(pull_secrets(&opted_out).is_empty(), "the opt-out label leaves the Pod alone");
    let patched = sample(&hook.controller.metrics(), "regcred_webhook_admissions_total{result=\"patched\"}");
    assert!(patched.is_some_and(|n| n >= 6.0), "{patched:?}");
}

#[tokio::test]
async fn a_pod_selector_and_the_attach_choice_decide_which_credentials_take_part() {
    let hook = Hook::start("webhook-choice", &[]).await;
    let client = client().await;
    let ns = namespace(&client, "webhook-choice").await;
    hook.credential(&client, &ns, "all", "all.example", json!({"pods": {"selector": {}}})).await;
    hook.credential(&client, &ns, "web", "web.example", json!({"pods": {"selector": {"matchLabels": {"app": "web"}}}}))
        .await;
    hook.credential(&client, &ns, "accounts", "x.example", json!({"attach": "ServiceAccounts"})).await;
    let pod = create(&client, &ns, &hook.pod("any", &["x.example/app"], &[], &[])).await;
    assert_eq!(pull_secrets(&pod), ["all"], "ServiceAccounts-only credentials stay out of Pods");
    let pod = create(&client, &ns, &hook.pod("web", &["quay.io/app"], &[("app", "web")], &[])).await;
    assert_eq!(pull_secrets(&pod), ["all", "web"]);
}

/// With `attach: Pods` a credential's `serviceAccounts` are not written: the audit log shows
/// no ServiceAccount request of the controller's at all, and Pods still get the Secret.
#[tokio::test]
async fn pods_only_writes_no_service_account() {
    let hook = Hook::start("webhook-pods-only", &["--attach", "pods"]).await;
    let client = client().await;
    let ns = namespace(&client, "webhook-pods-only").await;
    let offset = audit_offset();
    hook.credential(&client, &ns, "reg", "reg.example", json!({"serviceAccounts": ["default"]})).await;
    wait_ready(&client, &ns, "reg", "True", None).await;
    let pod = create(&client, &ns, &hook.pod("app", &["reg.example/app"], &[], &[])).await;
    assert_eq!(pull_secrets(&pod), ["reg"]);
    let writes: Vec<_> = requests_of_since(&hook.user, offset)
        .into_iter()
        .filter(|(verb, resource, _, _)| resource == "serviceaccounts" && is_write(verb))
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

/// A tenant's RegistryCredential hands nothing to another namespace's Pods, and a credential
/// naming the tenant's own Secret (a conflict: regcred does not manage it) hands it to no Pod.
#[tokio::test]
async fn a_tenant_cannot_hand_out_secrets_across_namespaces_or_ones_regcred_does_not_manage() {
    let hook = Hook::start("webhook-tenant", &[]).await;
    let admin = client().await;
    let ns = namespace(&admin, "webhook-tenant").await;
    let other = namespace(&admin, "webhook-victim").await;
    let tenant = tenant(&admin, &ns).await;
    create_secret(&tenant, &ns, "mine", &[("password", b"x")]).await;
    hook.credential(&tenant, &ns, "everyone", "e.example", json!({"pods": {"selector": {}}})).await;
    hook.credential(&tenant, &ns, "taken", "t.example", json!({"secret": {"name": "mine"}})).await;
    wait_ready(&admin, &ns, "taken", "False", Some("SecretConflict")).await;
    let there = create(&admin, &other, &hook.pod("app", &["e.example/app", "t.example/app"], &[], &[])).await;
    assert!(pull_secrets(&there).is_empty(), "another namespace's Pod: {:?}", pull_secrets(&there));
    let here = create(&admin, &ns, &hook.pod("app", &["t.example/app"], &[], &[])).await;
    assert_eq!(pull_secrets(&here), ["everyone"], "the tenant's own Secret is not handed out");
}

/// Pods in the controller's namespace are never changed (the configuration's namespace
/// selector), even where a credential targets it.
#[tokio::test]
async fn the_controllers_namespace_is_left_alone() {
    let hook = Hook::start("webhook-excluded", &[]).await;
    let client = client().await;
    let ns = namespace(&client, "webhook-included").await;
    let name = format!("webhook-excluded-{}", &unique()[..6]);
    create_secret(&client, CONTROLLER_NAMESPACE, &name, &[("password", b"x")]).await;
    create_cluster_credential_for(
        &client,
        &name,
        Some(&hook.name),
        json!({"registry": "ex.example", "namespaces": {"names": [CONTROLLER_NAMESPACE, ns]},
               "pods": {"selector": {}},
               "source": {"basic": {"username": "u", "passwordSecretRef": {"name": name, "namespace": CONTROLLER_NAMESPACE}}}}),
    )
    .await;
    let pod_name = format!("excluded-{}", &unique()[..6]);
    let here = create(&client, &ns, &hook.pod(&pod_name, &["ex.example/app"], &[], &[])).await;
    assert_eq!(pull_secrets(&here), vec![name]);
    // The controller's namespace enforces the restricted Pod Security level.
    let mut restricted = serde_json::to_value(hook.pod(&pod_name, &["ex.example/app"], &[], &[])).expect("json");
    restricted["spec"]["securityContext"] = json!({"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}});
    restricted["spec"]["containers"][0]["securityContext"] =
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    let restricted: Pod = serde_json::from_value(restricted).expect("a Pod");
    let excluded = create(&client, CONTROLLER_NAMESPACE, &restricted).await;
    assert!(pull_secrets(&excluded).is_empty(), "{:?}", pull_secrets(&excluded));
    Api::<Pod>::namespaced(client.clone(), CONTROLLER_NAMESPACE).delete(&pod_name, &DeleteParams::default()).await.ok();
}

/// A webhook that does not answer (frozen, then killed) costs Pods nothing but the wait: the
/// apiserver admits them unchanged (failurePolicy Ignore), after at most the timeout.
#[tokio::test]
async fn pods_are_admitted_unchanged_when_the_webhook_is_down() {
    let mut hook = Hook::start("webhook-down", &[]).await;
    let client = client().await;
    let ns = namespace(&client, "webhook-down").await;
    hook.credential(&client, &ns, "reg", "reg.example", json!({})).await;
    let served = create(&client, &ns, &hook.pod("served", &["reg.example/app"], &[], &[])).await;
    assert_eq!(pull_secrets(&served), ["reg"]);
    hook.controller.pause();
    let started = std::time::Instant::now();
    let frozen = create(&client, &ns, &hook.pod("frozen", &["reg.example/app"], &[], &[])).await;
    let waited = started.elapsed();
    hook.controller.resume();
    assert!(pull_secrets(&frozen).is_empty());
    // The apiserver gave up on the frozen webhook after the configuration's timeoutSeconds.
    assert!(waited >= Duration::from_secs(2), "admitted after {waited:?}: the webhook was not called");
    hook.controller.kill();
    let killed = create(&client, &ns, &hook.pod("killed", &["reg.example/app"], &[], &[])).await;
    assert!(pull_secrets(&killed).is_empty());
}

/// A credential switched from `Both` to `Pods` releases the ServiceAccount entry it wrote (and
/// its finalizer); Pods still get the Secret.
#[tokio::test]
async fn switching_to_pods_releases_the_service_account_entries() {
    let hook = Hook::start("webhook-switch", &[]).await;
    let client = client().await;
    let ns = namespace(&client, "webhook-switch").await;
    let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns);
    let entries = |account: &k8s_openapi::api::core::v1::ServiceAccount| -> Vec<String> {
        account.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect()
    };
    hook.credential(&client, &ns, "reg", "reg.example", json!({"serviceAccounts": ["default"]})).await;
    eventually("the ServiceAccount entry", TIMEOUT, || async {
        let account = accounts.get("default").await.ok()?;
        (entries(&account) == ["reg"]).then_some(())
    })
    .await;
    let credentials = Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), &ns);
    let patch = json!({"spec": {"attach": "Pods"}});
    credentials.patch("reg", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    eventually("the entry released", TIMEOUT, || async {
        let account = accounts.get("default").await.ok()?;
        entries(&account).is_empty().then_some(())
    })
    .await;
    let credential = eventually("the finalizer removed", TIMEOUT, || async {
        let credential = credentials.get("reg").await.ok()?;
        credential.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty()).then_some(credential)
    })
    .await;
    assert_eq!(credential.spec.attach, Some(regcred::crd::Attach::Pods));
    let pod = create(&client, &ns, &hook.pod("app", &["reg.example/app"], &[], &[])).await;
    assert_eq!(pull_secrets(&pod), ["reg"]);
}

/// The CA and the serving certificate rotated with short lifetimes (CA 30 s, leaf 15 s; the
/// overlap is a sixth of the CA's, 5 s) while Pods are created every 50 ms, under `failurePolicy: Fail` so that a call the apiserver
/// cannot make (a certificate it does not trust) refuses the Pod: every Pod is created, and
/// with the Secret, across a CA rotation (the bundle seen with two CAs, then one again).
#[tokio::test]
async fn certificates_rotate_with_no_failed_admission() {
    let hook = Hook::start("webhook-rotate", &["--webhook-ca-validity", "30s", "--webhook-cert-validity", "15s"]).await;
    let client = client().await;
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let fail = json!({"webhooks": [{"name": "pods.regcred.dev", "failurePolicy": "Fail"}]});
    configurations
        .patch(
            &hook.name,
            &kube::api::PatchParams::apply("webhook-test").force(),
            &kube::api::Patch::Apply(&json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": hook.name}, "webhooks": fail["webhooks"]})),
        )
        .await
        .expect("failurePolicy Fail");
    let ns = namespace(&client, "webhook-rotate").await;
    hook.credential(&client, &ns, "reg", "reg.example", json!({})).await;
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let tls = format!("{}-webhook-tls", hook.name);
    let bundle = |secret: &k8s_openapi::api::core::v1::Secret| -> String {
        let data = secret.data.as_ref().and_then(|d| d.get("ca.crt")).map(|b| b.0.clone()).unwrap_or_default();
        String::from_utf8_lossy(&data).into_owned()
    };
    let first = bundle(&secrets.get(&tls).await.expect("the webhook Secret"));
    let (mut bundles, mut pods, mut failures) = (vec![first], 0, Vec::new());
    let started = std::time::Instant::now();
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(36) {
        pace.tick().await;
        let pod = hook.pod(&format!("app-{pods}"), &["reg.example/app"], &[], &[]);
        match Api::<Pod>::namespaced(client.clone(), &ns).create(&PostParams::default(), &pod).await {
            Ok(pod) if pull_secrets(&pod) == ["reg"] => {}
            Ok(pod) => failures.push(format!("{:?}: {:?}", started.elapsed(), pull_secrets(&pod))),
            Err(error) => failures.push(format!("{:?}: {error}", started.elapsed())),
        }
        pods += 1;
        let now = bundle(&secrets.get(&tls).await.expect("the webhook Secret"));
        if bundles.last() != Some(&now) {
            bundles.push(now);
        }
    }
    let counts: Vec<usize> = bundles.iter().map(|b| b.matches("BEGIN CERTIFICATE").count()).collect();
    println!("{pods} Pods; CA bundles seen (certificates in each): {counts:?}");
    assert!(failures.is_empty(), "{} of {pods} admissions failed: {failures:?}", failures.len());
    assert!(counts.windows(2).any(|w| w == [2, 1]), "no CA rotation completed: {counts:?}");
}

/// A standby (the leader Lease held by another replica) serves the webhook from its own
/// caches: Pods get the Secret of a credential that no controller has written yet (the
/// standby writes nothing; the kubelet would find the Secret once the leader writes it).
#[tokio::test]
async fn a_standby_serves_the_webhook() {
    let client = client().await;
    let lease = format!("webhook-standby-{}", &unique()[..6]);
    let now = k8s_openapi::jiff::Timestamp::now();
    let held: k8s_openapi::api::coordination::v1::Lease = serde_json::from_value(json!({
        "metadata": {"name": lease, "namespace": CONTROLLER_NAMESPACE},
        "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600,
                 "acquireTime": now.to_string(), "renewTime": now.to_string()},
    }))
    .expect("a Lease");
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), CONTROLLER_NAMESPACE)
        .create(&PostParams::default(), &held)
        .await
        .expect("creating the Lease");
    let args =
        ["--leader-elect", "--leader-election-lease", &lease, "--leader-election-namespace", CONTROLLER_NAMESPACE];
    let hook = Hook::start("webhook-standby", &args).await;
    let ns = namespace(&client, "webhook-standby").await;
    hook.credential(&client, &ns, "reg", "reg.example", json!({})).await;
    let pod = eventually("the standby's caches to show the credential", TIMEOUT, || async {
        let pod = Api::<Pod>::namespaced(client.clone(), &ns)
            .create(
                &PostParams { dry_run: true, ..Default::default() },
                &hook.pod("app", &["reg.example/app"], &[], &[]),
            )
            .await
            .ok()?;
        (pull_secrets(&pod) == ["reg"]).then_some(pod)
    })
    .await;
    assert_eq!(pull_secrets(&pod), ["reg"]);
    assert_eq!(sample(&hook.controller.metrics(), "regcred_leader "), Some(0.0), "still a standby");
    let written = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns).get_opt("reg").await;
    assert!(written.expect("reading").is_none(), "a standby writes no pull Secret");
}
