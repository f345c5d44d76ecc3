//! The node runs Pods from private images: a hand-written pull Secret, an image under a
//! registry host mapped to a local registry, `kubectl logs` through the kubelet, and the
//! registry's refusal in the Pod's Events.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use regcred_testenv::{ControlPlane, Node, Registry, docker_config_json, eventually, wait_for};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn namespace_with_pull_secret(client: &Client, ns: &str, config: Vec<u8>) {
    let namespace =
        Namespace { metadata: ObjectMeta { name: Some(ns.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await.unwrap();
    let secret = Secret {
        metadata: ObjectMeta { name: Some("pull".into()), ..Default::default() },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(".dockerconfigjson".to_string(), ByteString(config))])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.unwrap();
    // Pods need the namespace's default ServiceAccount, which kube-controller-manager makes.
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    eventually("the default ServiceAccount", TIMEOUT, || async { sas.get_opt("default").await.ok().flatten() }).await;
}

async fn run(client: &Client, node: &Node, ns: &str, name: &str, image: &str) -> Api<Pod> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node.name(), "hostNetwork": true, "restartPolicy": "Never",
                 "automountServiceAccountToken": false, "imagePullSecrets": [{"name": "pull"}],
                 "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always"}]},
    }))
    .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods
}

fn events(cp: &ControlPlane, ns: &str, pod: &str) -> String {
    let out = cp.kubectl(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={pod}"),
        "-o",
        "json",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn pods_pull_private_images_and_show_the_registrys_refusal() {
    let Some(node) = Node::shared() else { return };
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let registry = Registry::start(&[("puller", "pa:ss wörd")]).unwrap();
    let image = registry
        .push_program_image("team/app", "v1", "puller", "pa:ss wörd", &["hello", "from", "the", "node"])
        .unwrap();

    namespace_with_pull_secret(&client, "node-direct", docker_config_json(&registry.host(), "puller", "pa:ss wörd"))
        .await;
    let pods = run(&client, node, "node-direct", "app", &image).await;
    eventually("the Pod to succeed", TIMEOUT, || async {
        let pod = pods.get("app").await.ok()?;
        (pod.status?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let logs = wait_for("kubectl logs", TIMEOUT, || {
        let out = cp.kubectl(&["-n", "node-direct", "logs", "app"]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .unwrap();
    assert_eq!(logs.trim(), "hello from the node");
    assert!(events(cp, "node-direct", "app").contains("Successfully pulled image"));

    // The same registry under ghcr.io, with a credential for ghcr.io only.
    let _mapped = node.map_registry("ghcr.io", &registry).unwrap();
    namespace_with_pull_secret(&client, "node-mapped", docker_config_json("ghcr.io", "puller", "pa:ss wörd")).await;
    let pods = run(&client, node, "node-mapped", "app", "ghcr.io/team/app:v1").await;
    eventually("the mapped Pod to succeed", TIMEOUT, || async {
        (pods.get("app").await.ok()?.status?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;

    // A wrong password: the registry's 401 in the Pod's Events.
    namespace_with_pull_secret(&client, "node-wrong", docker_config_json(&registry.host(), "puller", "wrong")).await;
    run(&client, node, "node-wrong", "app", &image).await;
    let failed = eventually("the failed pull", TIMEOUT, || async {
        let events = events(cp, "node-wrong", "app");
        events.contains("401 Unauthorized").then_some(events)
    })
    .await;
    assert!(failed.contains("Failed to pull image"), "{failed}");
}
