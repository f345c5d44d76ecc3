//! `Verified`: every credential proven against a real registry (CNCF distribution) with the
//! Distribution auth handshake, and the reason that tells the user what to do when it fails.

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::Registry;
use serde_json::{Value, json};

use crate::support::*;

/// Waits until the credential's `Verified` condition has `status` and `reason`; returns its
/// message. On timeout the panic shows the condition last seen.
pub async fn wait_verified(client: &Client, ns: &str, name: &str, status: &str, reason: &str) -> String {
    let api = Api::<RegistryCredential>::namespaced(client.clone(), ns);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut last = None;
    loop {
        if let Ok(cr) = api.get(name).await {
            last = cr.status.as_ref().and_then(|s| s.condition("Verified")).cloned();
            if let Some(verified) = &last
                && verified.status == status
                && verified.reason == reason
            {
                return verified.message.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ns}/{name}: no Verified={status} {reason} in {TIMEOUT:?}; last: {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn basic(host: &str, secret: &str, verify: Value) -> Value {
    json!({"registry": host, "verify": verify,
           "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": secret}}}})
}

#[tokio::test]
async fn a_right_password_is_verified_and_a_wrong_one_is_unauthorized() {
    // A controller of its own: the check counters below count this test's checks only.
    let label = format!("verify-{}", &unique()[..6]);
    let controller = spawn_labelled(&label, &[], &[]);
    let client = client().await;
    let ns = namespace(&client, "verify").await;
    let password = secret_value("puller", "verify");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    create_secret(&client, &ns, "good-src", &[("password", password.as_bytes())]).await;
    let wrong = secret_value("puller", "wrong");
    create_secret(&client, &ns, "bad-src", &[("password", wrong.as_bytes())]).await;
    create_credential_for(
        &client,
        &ns,
        "good",
        Some(&label),
        basic(&registry.host(), "good-src", json!({"insecure": true})),
    )
    .await;
    create_credential_for(
        &client,
        &ns,
        "bad",
        Some(&label),
        basic(&registry.host(), "bad-src", json!({"insecure": true})),
    )
    .await;

    let message = wait_verified(&client, &ns, "good", "True", "Verified").await;
    assert!(message.contains("accepted the login"), "{message}");
    let message = wait_verified(&client, &ns, "bad", "False", "Unauthorized").await;
    assert!(message.contains("401"), "{message}");
    // Verified never touches Ready: the Secret is written either way.
    wait_ready(&client, &ns, "bad", "True", Some("Synced")).await;
    let warning = wait_event(&client, &ns, "RegistryCredential", "bad", "Warning", "Unauthorized").await;
    assert!(warning.contains("registry check failed"), "{warning}");
    let cr = Api::<RegistryCredential>::namespaced(client.clone(), &ns).get("good").await.unwrap();
    assert!(cr.status.and_then(|s| s.verified_at).is_some(), "verifiedAt is reported");
    // Checks are counted by result.
    let metrics = controller.metrics();
    for result in ["Verified", "Unauthorized"] {
        let count = sample(&metrics, &format!("regcred_verifications_total{{result=\"{result}\"}}"));
        assert!(count.is_some_and(|n| n >= 1.0), "no {result} check counted:\n{metrics}");
    }

    // Something that is not a registry (the AWS emulator's web server) at that host.
    let not_a_registry = env().aws.endpoint().trim_start_matches("http://").to_string();
    create_credential_for(
        &client,
        &ns,
        "elsewhere",
        Some(&label),
        basic(&not_a_registry, "good-src", json!({"insecure": true})),
    )
    .await;
    let message = wait_verified(&client, &ns, "elsewhere", "False", "UnexpectedResponse").await;
    // The strict AWS emulator refuses an unsigned request.
    assert!(message.ends_with("GET /v2/: 403 Forbidden"), "{message}");

    // Fixing the source re-verifies at once (a change of the Secret's content).
    set_secret_key(&client, &ns, "bad-src", "password", password.as_bytes()).await;
    wait_verified(&client, &ns, "bad", "True", "Verified").await;
    // Without spec.verify the condition goes.
    let off = json!({"spec": {"verify": null}});
    Api::<RegistryCredential>::namespaced(client.clone(), &ns)
        .patch("good", &PatchParams::default(), &Patch::Merge(&off))
        .await
        .unwrap();
    regcred_testenv::eventually("Verified removed", TIMEOUT, || async {
        let cr = Api::<RegistryCredential>::namespaced(client.clone(), &ns).get("good").await.ok()?;
        let status = cr.status?;
        (status.condition("Verified").is_none() && status.verified_at.is_none()).then_some(())
    })
    .await;
    assert_no_leaks(&client).await;
}

/// The standard proxy variables apply to registry checks: through a proxy that is down the
/// registry is `Unreachable`; with the registry in `NO_PROXY` the same check passes.
#[tokio::test]
async fn checks_go_through_the_environments_proxy() {
    let client = client().await;
    let ns = namespace(&client, "verify-proxy").await;
    let password = secret_value("puller", "proxy");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    // Nothing listens on the proxy's port (a port just taken and released).
    let dead_proxy = format!("http://127.0.0.1:{}", regcred_testenv::free_port());
    let mut controllers = Vec::new();
    for (tag, no_proxy) in [("proxied", ""), ("bypassed", "127.0.0.1")] {
        let name = format!("{tag}-{}", &unique()[..6]);
        let vars = [("HTTP_PROXY", dead_proxy.clone()), ("NO_PROXY", no_proxy.to_string())];
        let controller = spawn_labelled(&name, &[], &vars);
        create_credential_for(
            &client,
            &ns,
            tag,
            Some(&name),
            basic(&registry.host(), "src", json!({"insecure": true})),
        )
        .await;
        controllers.push(controller);
    }
    let message = wait_verified(&client, &ns, "proxied", "False", "Unreachable").await;
    assert!(message.contains("could not be reached"), "{message}");
    wait_verified(&client, &ns, "bypassed", "True", "Verified").await;
}

/// A controller of the test's own with a short `--verify-interval`, for the periodic checks.
fn periodic_controller(tag: &str) -> (TestController, String) {
    let name = format!("{tag}-{}", &unique()[..6]);
    let controller = spawn_labelled(&name, &["--verify-interval", "2s"], &[]);
    (controller, name)
}

/// A revoked password turns `Unauthorized` at the next periodic check, a stopped registry
/// `Unreachable`, and a restarted one `Verified` again, all without a controller restart.
#[tokio::test]
async fn revocation_and_outages_show_at_the_next_check_and_recovery_needs_no_restart() {
    let client = client().await;
    let (_controller, name) = periodic_controller("verify-periodic");
    let ns = namespace(&client, "verify-periodic").await;
    let password = secret_value("puller", "periodic");
    let mut registry = Registry::start(&[("puller", &password)]).unwrap();
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_credential_for(&client, &ns, "cred", Some(&name), basic(&registry.host(), "src", json!({"insecure": true})))
        .await;
    wait_verified(&client, &ns, "cred", "True", "Verified").await;

    // Revoked at the registry: nothing changed in the cluster.
    registry.set_users(&[("someone-else", "x")]).unwrap();
    let message = wait_verified(&client, &ns, "cred", "False", "Unauthorized").await;
    assert!(message.contains("401"), "{message}");
    registry.set_users(&[("puller", &password)]).unwrap();
    wait_verified(&client, &ns, "cred", "True", "Verified").await;

    registry.stop();
    let message = wait_verified(&client, &ns, "cred", "False", "Unreachable").await;
    assert!(message.contains("the registry could not be reached: Connection refused"), "{message}");
    wait_event(&client, &ns, "RegistryCredential", "cred", "Warning", "Unreachable").await;
    // Ready is untouched by an unreachable registry.
    wait_ready(&client, &ns, "cred", "True", Some("Synced")).await;
    registry.start_again().unwrap();
    wait_verified(&client, &ns, "cred", "True", "Verified").await;
}

/// Token auth (a real token server): the login gets a token, and with `repository` the token's
/// scope decides: `team` may pull `team/app`, not `other/app`.
#[tokio::test]
async fn token_auth_scopes_decide_verified_or_forbidden() {
    env();
    let client = client().await;
    let ns = namespace(&client, "verify-token").await;
    let (team, other) = (secret_value("team", "token"), secret_value("other", "token"));
    let options = regcred_testenv::RegistryOptions { token_auth: true, ..Default::default() };
    let registry = Registry::start_with(&[("team", &team), ("other", &other)], options).unwrap();
    registry.push_test_image("team/app", "latest", "team", &team).unwrap();
    registry.push_test_image("other/app", "latest", "other", &other).unwrap();
    create_secret(&client, &ns, "team", &[("password", team.as_bytes())]).await;
    let token = |repository: Option<&str>| {
        let mut verify = json!({"insecure": true});
        if let Some(repository) = repository {
            verify["repository"] = json!(repository);
        }
        json!({"registry": registry.host(), "verify": verify,
               "source": {"basic": {"username": "team", "passwordSecretRef": {"name": "team"}}}})
    };
    create_credential(&client, &ns, "login", token(None)).await;
    create_credential(&client, &ns, "own", token(Some("team/app"))).await;
    create_credential(&client, &ns, "foreign", token(Some("other/app"))).await;
    let message = wait_verified(&client, &ns, "login", "True", "Verified").await;
    assert!(message.contains("accepted the login"), "{message}");
    let message = wait_verified(&client, &ns, "own", "True", "Verified").await;
    assert!(message.contains("HEAD /v2/team/app/manifests/latest: 200"), "{message}");
    let message = wait_verified(&client, &ns, "foreign", "False", "Forbidden").await;
    assert!(message.contains("no pull on other/app"), "{message}");

    // A wrong password gets no token from the realm.
    let wrong = secret_value("team", "wrong-token");
    create_secret(&client, &ns, "wrong", &[("password", wrong.as_bytes())]).await;
    let spec = json!({"registry": registry.host(), "verify": {"insecure": true},
                      "source": {"basic": {"username": "team", "passwordSecretRef": {"name": "wrong"}}}});
    create_credential(&client, &ns, "wrong-login", spec).await;
    let message = wait_verified(&client, &ns, "wrong-login", "False", "Unauthorized").await;
    assert!(message.contains("token endpoint"), "{message}");
    assert_no_leaks(&client).await;
}

/// A registry with a certificate from a private CA: `TLSError` without `caBundle`, verified
/// with it (from a ConfigMap or a Secret).
#[tokio::test]
async fn a_private_ca_needs_its_ca_bundle() {
    env();
    let client = client().await;
    let ns = namespace(&client, "verify-tls").await;
    let password = secret_value("puller", "tls");
    let options = regcred_testenv::RegistryOptions { tls: true, ..Default::default() };
    let registry = Registry::start_with(&[("puller", &password)], options).unwrap();
    let ca = registry.ca_pem().expect("a TLS registry has a CA").to_string();
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    create_secret(&client, &ns, "ca-secret", &[("ca.crt", ca.as_bytes())]).await;
    let map: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "ca", "namespace": ns}, "data": {"bundle.pem": ca}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), &ns)
        .create(&Default::default(), &map)
        .await
        .unwrap();
    create_credential(&client, &ns, "untrusted", basic(&registry.host(), "src", json!({}))).await;
    let from_map = json!({"caBundle": {"configMap": {"name": "ca", "key": "bundle.pem"}}});
    create_credential(&client, &ns, "from-map", basic(&registry.host(), "src", from_map)).await;
    let from_secret = json!({"caBundle": {"secret": {"name": "ca-secret"}}});
    create_credential(&client, &ns, "from-secret", basic(&registry.host(), "src", from_secret)).await;
    let missing = json!({"caBundle": {"configMap": {"name": "nowhere"}}});
    create_credential(&client, &ns, "missing-ca", basic(&registry.host(), "src", missing)).await;

    let message = wait_verified(&client, &ns, "untrusted", "False", "TLSError").await;
    assert!(message.contains("UnknownIssuer"), "{message}");
    wait_verified(&client, &ns, "from-map", "True", "Verified").await;
    wait_verified(&client, &ns, "from-secret", "True", "Verified").await;
    let message = wait_verified(&client, &ns, "missing-ca", "False", "CABundleUnavailable").await;
    assert!(message.contains(&format!("ConfigMap {ns}/nowhere not found")), "{message}");
}

/// A ClusterRegistryCredential fanned out to 200 namespaces is checked once per registry per
/// trigger, never per namespace: the registry sees one handshake on creation and one after a
/// source change.
#[tokio::test]
async fn a_fan_out_is_checked_once_per_registry_not_per_namespace() {
    env();
    let client = client().await;
    let tag = unique()[..8].to_string();
    let source_ns = namespace(&client, "verify-fan-src").await;
    let first = secret_value("puller", "fan");
    let second = secret_value("puller", "fan2");
    let registry = Registry::start(&[("puller", &first)]).unwrap();
    create_secret(&client, &source_ns, "src", &[("password", first.as_bytes())]).await;
    let label = [("regcred.dev/test-verify-fan", tag.as_str())];
    for _ in 0..200 {
        labelled_namespace(&client, "verify-fan", &label).await;
    }
    let offset = registry.log_offset().unwrap();
    let name = format!("verify-fan-{tag}");
    let spec = json!({"registry": registry.host(), "verify": {"insecure": true},
        "namespaces": {"selector": {"matchLabels": {"regcred.dev/test-verify-fan": tag}}},
        "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "src", "namespace": source_ns}}}});
    create_cluster_credential(&client, &name, spec).await;
    let verified = |status: &str, reason: &str| {
        let (status, reason) = (status.to_string(), reason.to_string());
        move |s: &regcred::crd::ClusterCredentialStatus| {
            s.synced_namespaces == Some(200)
                && s.credential.condition("Verified").is_some_and(|c| c.status == status && c.reason == reason)
        }
    };
    wait_cluster(&client, &name, "200 namespaces, verified", verified("True", "Verified")).await;
    let handshake = |requests: Vec<regcred_testenv::Request>| -> Vec<(String, String, u16)> {
        requests.into_iter().map(|r| (r.method, r.path, r.status)).collect()
    };
    let one_check = vec![("GET".to_string(), "/v2/".to_string(), 401), ("GET".into(), "/v2/".into(), 200)];
    let seen = regcred_testenv::wait_for("the check's requests in the access log", TIMEOUT, || {
        let requests = handshake(registry.requests_since(offset).ok()?);
        (requests.len() >= one_check.len()).then_some(requests)
    })
    .unwrap();
    assert_eq!(seen, one_check, "one handshake for 200 namespaces");

    // A source change: one more check (now refused: the registry still has the first password).
    let offset = registry.log_offset().unwrap();
    set_secret_key(&client, &source_ns, "src", "password", second.as_bytes()).await;
    wait_cluster(&client, &name, "re-verified after the change", verified("False", "Unauthorized")).await;
    let seen = regcred_testenv::wait_for("the second check's requests", TIMEOUT, || {
        let requests = handshake(registry.requests_since(offset).ok()?);
        (requests.len() >= 2).then_some(requests)
    })
    .unwrap();
    assert_eq!(seen, vec![("GET".to_string(), "/v2/".to_string(), 401), ("GET".into(), "/v2/".into(), 401)]);
}

/// `--verify-default` checks credentials without `spec.verify` too, with the system's roots:
/// here the test CA through `SSL_CERT_FILE`, which the native root store reads.
#[tokio::test]
async fn verify_default_checks_every_credential_with_the_system_roots() {
    let client = client().await;
    let ns = namespace(&client, "verify-default").await;
    let password = secret_value("puller", "default");
    let options = regcred_testenv::RegistryOptions { tls: true, ..Default::default() };
    let registry = Registry::start_with(&[("puller", &password)], options).unwrap();
    let ca_file = env().cp.dir().join(format!("ca-{}.pem", &unique()[..6]));
    std::fs::write(&ca_file, registry.ca_pem().expect("CA")).unwrap();
    let name = format!("verify-default-{}", &unique()[..6]);
    let _controller = spawn_labelled(&name, &["--verify-default"], &[("SSL_CERT_FILE", ca_file.display().to_string())]);
    create_secret(&client, &ns, "src", &[("password", password.as_bytes())]).await;
    let spec = json!({"registry": registry.host(), "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": "src"}}}});
    create_credential_for(&client, &ns, "plain", Some(&name), spec).await;
    let message = wait_verified(&client, &ns, "plain", "True", "Verified").await;
    assert!(message.contains("accepted the login"), "{message}");
}
