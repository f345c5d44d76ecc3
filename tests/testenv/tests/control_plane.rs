//! The shared control plane behaves like a real cluster in the ways regcred
//! relies on.

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, LocalObjectReference, Namespace, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, DynamicObject, ObjectMeta, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use regcred_testenv::{ControlPlane, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// A fresh namespace whose `default` ServiceAccount exists.
async fn namespace(client: &Client, name: &str) {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), name);
    eventually("default ServiceAccount", WAIT, || async { sas.get_opt("default").await.unwrap() }).await;
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.into()), ..Default::default() }
}

#[tokio::test]
async fn reports_kubernetes_version() {
    let cp = ControlPlane::shared();
    let info = cp.client().await.apiserver_version().await.unwrap();
    assert_eq!(info.git_version, "v1.34.4");
    assert_eq!((info.major.as_str(), info.minor.as_str()), ("1", "34"));

    let out = cp.kubectl(&["version", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["clientVersion"]["gitVersion"], "v1.34.4");
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.34.4");
}

#[tokio::test]
async fn new_namespace_gets_default_service_account() {
    let client = ControlPlane::shared().client().await;
    namespace(&client, "testenv-ns").await;
}

#[tokio::test]
async fn token_request_works() {
    let client = ControlPlane::shared().client().await;
    namespace(&client, "testenv-token").await;
    let sas = Api::<ServiceAccount>::namespaced(client, "testenv-token");
    sas.create(&PostParams::default(), &ServiceAccount { metadata: meta("app"), ..Default::default() }).await.unwrap();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["sts.amazonaws.com".into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let resp = sas.create_token_request("app", &PostParams::default(), &req).await.unwrap();
    let token = resp.status.unwrap().token;
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["aud"], serde_json::json!(["sts.amazonaws.com"]));
    assert_eq!(claims["sub"], "system:serviceaccount:testenv-token:app");
}

#[tokio::test]
async fn admission_injects_image_pull_secrets_from_service_account() {
    let client = ControlPlane::shared().client().await;
    namespace(&client, "testenv-pull").await;
    let sa = ServiceAccount {
        metadata: meta("puller"),
        image_pull_secrets: Some(vec![LocalObjectReference { name: "regcred-pull".into() }]),
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), "testenv-pull")
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let pod = Pod {
        metadata: meta("p"),
        spec: Some(PodSpec {
            service_account_name: Some("puller".into()),
            containers: vec![Container {
                name: "c".into(),
                image: Some("127.0.0.1:1/none:latest".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = Api::<Pod>::namespaced(client, "testenv-pull").create(&PostParams::default(), &pod).await.unwrap();
    let secrets = created.spec.unwrap().image_pull_secrets.unwrap_or_default();
    let names: Vec<_> = secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["regcred-pull"]);
}

#[tokio::test]
async fn orphaned_dependents_are_garbage_collected() {
    let client = ControlPlane::shared().client().await;
    let cms = Api::<ConfigMap>::namespaced(client, "default");
    let owner = cms
        .create(&PostParams::default(), &ConfigMap { metadata: meta("gc-owner"), ..Default::default() })
        .await
        .unwrap();
    let mut dependent = meta("gc-dependent");
    dependent.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "gc-owner".into(),
        uid: owner.metadata.uid.unwrap(),
        ..Default::default()
    }]);
    cms.create(&PostParams::default(), &ConfigMap { metadata: dependent, ..Default::default() }).await.unwrap();
    cms.delete("gc-owner", &DeleteParams::default()).await.unwrap();
    eventually("gc-dependent to be garbage-collected", WAIT, || async {
        cms.get_opt("gc-dependent").await.unwrap().is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn metrics_count_requests() {
    let metrics = ControlPlane::shared().apiserver_metrics().unwrap();
    assert!(metrics.contains("apiserver_request_total{"));
}

#[tokio::test]
async fn install_crds_serves_the_new_kind() {
    let cp = ControlPlane::shared();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("widgets.yaml"),
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testenv.regcred.dev
spec:
  group: testenv.regcred.dev
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec: {type: object, x-kubernetes-preserve-unknown-fields: true}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: installed-alongside, namespace: default}
"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("ignored.txt"), "not yaml").unwrap();
    cp.install_crds(dir.path()).unwrap();

    let gvk = GroupVersionKind::gvk("testenv.regcred.dev", "v1", "Widget");
    let api: Api<DynamicObject> = Api::namespaced_with(cp.client().await, "default", &ApiResource::from_gvk(&gvk));
    let mut w = DynamicObject::new("w1", &ApiResource::from_gvk(&gvk));
    w.data = serde_json::json!({"spec": {"size": 3}});
    api.create(&PostParams::default(), &w).await.unwrap();
}
