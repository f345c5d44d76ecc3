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
/// message.
pub async fn wait_verified(client: &Client, ns: &str, name: &str, status: &str, reason: &str) -> String {
    let api = Api::<RegistryCredential>::namespaced(client.clone(), ns);
    regcred_testenv::eventually(&format!("{ns}/{name} Verified={status} {reason}"), TIMEOUT, || async {
        let cr = api.get(name).await.ok()?;
        let verified = cr.status.as_ref()?.condition("Verified")?.clone();
        (verified.status == status && verified.reason == reason).then_some(verified.message)
    })
    .await
}

fn basic(host: &str, secret: &str, verify: Value) -> Value {
    json!({"registry": host, "verify": verify,
           "source": {"basic": {"username": "puller", "passwordSecretRef": {"name": secret}}}})
}

#[tokio::test]
async fn a_right_password_is_verified_and_a_wrong_one_is_unauthorized() {
    env();
    let client = client().await;
    let ns = namespace(&client, "verify").await;
    let password = secret_value("puller", "verify");
    let registry = Registry::start(&[("puller", &password)]).unwrap();
    create_secret(&client, &ns, "good-src", &[("password", password.as_bytes())]).await;
    let wrong = secret_value("puller", "wrong");
    create_secret(&client, &ns, "bad-src", &[("password", wrong.as_bytes())]).await;
    create_credential(&client, &ns, "good", basic(&registry.host(), "good-src", json!({"insecure": true}))).await;
    create_credential(&client, &ns, "bad", basic(&registry.host(), "bad-src", json!({"insecure": true}))).await;

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
        let controller =
            spawn_controller(env().cp, &name, &format!("{CONTROLLER_LABEL}={name}"), &env().aws.endpoint(), &[], &vars);
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
