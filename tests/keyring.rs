//! The keys regcred writes, checked with the kubelet's own credential lookup:
//! `keyring-lookup` (tests/testbin/keyring) runs k8s.io/kubernetes's
//! `pkg/credentialprovider` on a `.dockerconfigjson` the way the kubelet does before a pull.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use regcred::dockerconfig::DOCKER_CONFIG_KEY;
use regcred_testenv::testbin;
use serde::Deserialize;
use serde_json::json;

/// One answer of `keyring-lookup`.
#[derive(Debug, Deserialize)]
struct Lookup {
    image: String,
    repository: String,
    found: bool,
    usernames: Vec<String>,
}

/// The `.dockerconfigjson` of the Secret a basic credential for `registry` renders to.
async fn rendered_config(registry: &str, username: &str) -> Vec<u8> {
    let manifests = vec![
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pass"}, "stringData": {"password": "s3cret"}}),
        json!({"apiVersion": "regcred.dev/v1alpha1", "kind": "RegistryCredential", "metadata": {"name": "pull"},
               "spec": {"registry": registry,
                        "source": {"basic": {"username": username, "passwordSecretRef": {"name": "pass"}}}}}),
    ];
    let manifests = regcred::render::read_manifests(manifests, &["team".into()]).expect("manifests");
    let rendered = regcred::render::render(&manifests).await.expect("render").secrets;
    let data = rendered[0].to_secret().data.expect("a rendered Secret has data");
    data[DOCKER_CONFIG_KEY].0.clone()
}

/// Asks the kubelet's keyring which credentials each image gets from `config`.
fn lookup(config: &[u8], images: &[&str]) -> Vec<Lookup> {
    let mut child = Command::new(testbin("keyring-lookup").expect("keyring-lookup binary"))
        .arg("-")
        .args(images)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting keyring-lookup");
    child.stdin.take().expect("stdin").write_all(config).expect("writing the config");
    let out = child.wait_with_output().expect("running keyring-lookup");
    assert!(out.status.success(), "keyring-lookup: {}", String::from_utf8_lossy(&out.stderr));
    let answers: Vec<Lookup> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(answers.len(), images.len());
    answers
}

const DOCKER_HUB_IMAGES: [&str; 6] = [
    "nginx",
    "library/nginx",
    "docker.io/org/app",
    "index.docker.io/org/app",
    "registry-1.docker.io/org/app",
    "registry-1.docker.io/library/nginx:1.27",
];

/// Whichever spelling of Docker Hub a credential names, the kubelet finds it for every
/// spelling of a Docker Hub image, and for no other registry's.
#[tokio::test]
async fn every_docker_hub_spelling_finds_the_credential() {
    for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
        let config = rendered_config(registry, "hub-user").await;
        let mut images = DOCKER_HUB_IMAGES.to_vec();
        images.push("ghcr.io/org/app");
        let answers = lookup(&config, &images);
        let missed: Vec<_> = answers[..DOCKER_HUB_IMAGES.len()]
            .iter()
            .filter(|a| a.usernames != ["hub-user"])
            .map(|a| format!("{} (as {}): {:?}", a.image, a.repository, a.usernames))
            .collect();
        assert!(missed.is_empty(), "registry {registry}: images pulled without the credential: {missed:?}");
        let other = &answers[DOCKER_HUB_IMAGES.len()];
        assert!(!other.found, "registry {registry}: {other:?}");
    }
}

/// Other registries keep one key, matching their own images only.
#[tokio::test]
async fn another_registry_is_not_docker_hub() {
    let config = rendered_config("registry.example.com:5000", "ci").await;
    let answers = lookup(&config, &["registry.example.com:5000/org/app", "registry.example.com/org/app", "nginx"]);
    assert_eq!(answers[0].usernames, ["ci"], "{:?}", answers[0]);
    assert!(!answers[1].found, "{:?}", answers[1]);
    assert!(!answers[2].found, "{:?}", answers[2]);
}
