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

/// `regcred doctor`'s port of the keyring (`regcred::doctor::keyring`) normalises every image
/// as the kubelet does and sends the same entries, in the same order, for each.
#[test]
fn the_doctors_lookup_is_the_kubelets() {
    use regcred::doctor::keyring;
    let servers = [
        "ghcr.io",
        "ghcr.io:443",
        "https://index.docker.io/v1/",
        "docker.io",
        "quay.io/org",
        "quay.io",
        "*.example.com",
        "http://reg.local:5000/v2/",
        "registry-1.docker.io",
        "localhost:5000",
        "Registry.Example.org",
        "ghcr.io:abc",
    ];
    let images = [
        "nginx",
        "library/nginx:1.27",
        "docker.io/org/app",
        "index.docker.io/org/app",
        "registry-1.docker.io/org/app",
        "ghcr.io/org/app:v1",
        "ghcr.io:443/org/app",
        "quay.io/org/app",
        "quay.io/organisation/app",
        "quay.io/other/app",
        "a.example.com/x",
        "a.b.example.com/x",
        "example.com/x",
        "reg.local:5000/app",
        "reg.local/app",
        "localhost:5000/app",
        "localhost/app",
        "Registry.Example.org/app",
        "registry.example.org/app",
        "gcr.io/p/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ];
    let auths: serde_json::Map<String, serde_json::Value> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), json!({"username": format!("u{i}"), "password": "p"})))
        .collect();
    let config = serde_json::to_vec(&json!({ "auths": auths })).unwrap();
    let entries: Vec<keyring::Entry> = servers.iter().map(|server| keyring::Entry { secret: "s", server }).collect();
    for answer in lookup(&config, &images) {
        let image = keyring::parse_image(&answer.image).expect("an image the kubelet parses");
        assert_eq!(image.repository(), answer.repository, "{}", answer.image);
        let ours: Vec<String> = keyring::lookup(&entries, &answer.repository)
            .iter()
            .map(|e| format!("u{}", servers.iter().position(|s| s == &e.server).unwrap()))
            .collect();
        assert_eq!(ours, answer.usernames, "{} ({})", answer.image, answer.repository);
    }
}
