//! Hostile or sloppy input: refused at admission where the schema can say so, reported in
//! status where only the controller can tell; never a panic, and other credentials go on.

use kube::{Api, api::PostParams};
use serde_json::json;

use crate::{SERIAL, support::*};

#[tokio::test]
async fn shapes_the_schema_can_judge_are_refused_at_admission() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let ns = namespace(&client, "bad-shape").await;
    let basic = json!({"username": "u", "passwordSecretRef": {"name": "s"}});
    let basic_in =
        |namespace: &str| json!({"username": "u", "passwordSecretRef": {"name": "s", "namespace": namespace}});
    let cases = [
        ("RegistryCredential", json!({"registry": "r.io"}), "source"),
        (
            "RegistryCredential",
            json!({"registry": format!("{}.io", "a".repeat(300)), "source": {"basic": basic}}),
            "registry",
        ),
        ("RegistryCredential", json!({"registry": "r.io\n", "source": {"basic": basic}}), "registry"),
        (
            "RegistryCredential",
            json!({"registry": "r.io", "source": {"basic": basic}, "serviceAccounts": vec!["sa"; 65]}),
            "serviceAccounts",
        ),
        (
            "RegistryCredential",
            json!({"registry": "r.io", "source": {"basic": basic_in("kube-system")}}),
            "own namespace",
        ),
        (
            "RegistryCredential",
            json!({"registry": "r.io", "source": {"ecr": {"region": "eu-west-1", "registry": "x", "auth": {"ambient": {}}}}}),
            "exactly one of registry or region",
        ),
        (
            "RegistryCredential",
            json!({"source": {"ecr": {"region": "eu-west-1", "auth": {"secretRef": {"name": "k"}, "ambient": {}}}}}),
            "auth",
        ),
        (
            "RegistryCredential",
            json!({"registry": "r.io", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "s", "key": "a b"}}}}),
            "key",
        ),
        ("ClusterRegistryCredential", json!({"registry": "r.io", "source": {"basic": basic}}), "need a namespace"),
        (
            "ClusterRegistryCredential",
            json!({"registry": "r.io", "source": {"basic": basic_in("p")}, "namespaces": {"names": ["Not_A_Name"]}}),
            "names",
        ),
        (
            "ClusterRegistryCredential",
            json!({"registry": "r.io", "source": {"basic": basic_in("p")}, "namespaces": {"exclude": vec!["x"; 1001]}}),
            "exclude",
        ),
    ];
    for (kind, spec, field) in cases {
        let namespace = (kind == "RegistryCredential").then_some(ns.as_str());
        match create_raw(&client, namespace, kind, &format!("bad-{}", &unique()[..8]), spec.clone()).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{kind} {spec}: {}", status.message);
                assert!(status.message.contains(field), "{kind} {spec}: {}", status.message);
            }
            other => panic!("{kind} {spec}: expected 422, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn values_only_the_controller_can_judge_are_reported_and_others_go_on() {
    let _serial = SERIAL.lock().await;
    let client = client().await;
    let ns = namespace(&client, "bad-value").await;
    // A 1 MiB password does not fit in a Secret at all (the apiserver refuses the source
    // Secret); 800 KiB does, but its .dockerconfigjson (the password plus its base64 in
    // `auth`) would not: the apiserver refuses that write, and the controller reports it.
    let too_big = format!("{}{}", secret_value("u", "too-big"), "p".repeat(1024 * 1024));
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta { name: Some("too-big".into()), ..Default::default() },
        data: Some([("password".to_string(), k8s_openapi::ByteString(too_big.into_bytes()))].into()),
        ..Default::default()
    };
    let refused = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect_err("a Secret over 1 MiB");
    assert!(matches!(&refused, kube::Error::Api(s) if s.code == 422), "{refused}");
    let huge = format!("{}{}", secret_value("u", "huge"), "p".repeat(800 * 1024));
    record_secret(&huge[..64]);
    create_secret(&client, &ns, "huge", &[("password", huge.as_bytes())]).await;
    create_secret(&client, &ns, "binary", &[("password", &[0xff, 0xfe, 0x00, 0x80])]).await;
    create_secret(&client, &ns, "not-json", &[("key.json", b"{\"private_key\": \"MIIsecret")]).await;
    let basic = |name: &str| json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": name}}}});
    let reported = [
        ("huge", basic("huge"), "KubernetesApiError"),
        ("binary", basic("binary"), "InvalidSourceValue"),
        ("not-json", json!({"source": {"gcr": {"jsonKeySecretRef": {"name": "not-json"}}}}), "InvalidGcrKey"),
        ("missing", basic("missing"), "SourceSecretNotFound"),
    ];
    // Credentials named apart from the Secrets they read (each writes a Secret of its name).
    for (name, spec, _) in &reported {
        create_credential(&client, &ns, &format!("c-{name}"), spec.clone()).await;
    }
    for (name, _, reason) in &reported {
        wait_ready(&client, &ns, &format!("c-{name}"), "False", Some(reason)).await;
    }
    let cr = wait_ready(&client, &ns, "c-not-json", "False", Some("InvalidGcrKey")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(!message.contains("MIIsecret"), "{message}");

    // A selector the schema lets through but no label selector can mean.
    let source = namespace(&client, "bad-src").await;
    create_secret(&client, &source, "src", &[("password", secret_value("u", "bad-sel").as_bytes())]).await;
    let name = format!("bad-sel-{}", &unique()[..6]);
    create_cluster_credential(
        &client,
        &name,
        json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "src", "namespace": source}}},
               "namespaces": {"selector": {"matchExpressions": [{"key": "team", "operator": "Near", "values": ["a"]}]}}}),
    )
    .await;
    wait_cluster(&client, &name, "InvalidNamespaceSelector", |s| {
        s.credential.condition("Ready").is_some_and(|c| c.reason == "InvalidNamespaceSelector")
    })
    .await;

    // The controller is alive and serves a good credential next to all of them.
    let good = secret_value("u", "good");
    create_secret(&client, &ns, "good", &[("password", good.as_bytes())]).await;
    create_credential(&client, &ns, "c-good", basic("good")).await;
    wait_ready(&client, &ns, "c-good", "True", Some("Synced")).await;
    for (name, log) in controller_logs() {
        assert!(!log.contains("panicked"), "{name} shows a panic");
    }
    assert_no_leaks(&client).await;
}
