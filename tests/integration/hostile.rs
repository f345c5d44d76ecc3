//! Hostile tenants: a ServiceAccount bound to the built-in `edit` role in its own namespace
//! attacks the controller through what it can write there. Nothing it writes may decide
//! anything for another namespace.

use std::collections::BTreeSet;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use regcred_testenv::AwsEmulator;
use serde_json::{Value, json};

use crate::support::*;

const REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
const FORGED: &str = "forged-by-a-tenant";

/// The passwords the emulator handed out to GetAuthorizationToken calls signed by `key_id`.
fn issued_passwords(aws: &AwsEmulator, key_id: &str) -> BTreeSet<String> {
    aws.calls()
        .unwrap()
        .into_iter()
        .filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200)
        .filter(|c| c["access_key_id"].as_str() == Some(key_id))
        .map(|c| {
            let token = c["authorizationData"][0]["authorizationToken"].as_str().expect("token").to_string();
            let decoded = base64::engine::general_purpose::STANDARD.decode(token).expect("base64");
            let password = String::from_utf8(decoded).expect("utf-8").strip_prefix("AWS:").expect("AWS:").to_string();
            record_secret(&password);
            password
        })
        .collect()
}

/// The one password of a Secret's single login.
fn password(secret: &Secret) -> String {
    logins(secret).remove(0).2
}

/// A `.dockerconfigjson` with the tenant's own password for the ECR registry.
fn forged_config() -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{FORGED}"));
    serde_json::to_vec(&json!({"auths": {REGISTRY: {"username": "AWS", "password": FORGED, "auth": auth}}})).unwrap()
}

/// A ClusterRegistryCredential with ECR access keys from `platform`, fanned out to the
/// namespaces labelled `forge=<name>`.
fn fan_out_spec(name: &str, platform: &str) -> Value {
    json!({
        "source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws-keys", "namespace": platform}}}},
        "namespaces": {"selector": {"matchLabels": {"forge": name}}},
    })
}

/// Item 1 of issue 20. The tenant edits the fan-out's Secret in its namespace while the
/// controller is down. After the restart the controller must not take the tenant's bytes as
/// the token it wrote: a namespace that joins the fan-out gets a token AWS issued, and the
/// tenant's Secret is repaired.
#[tokio::test]
async fn a_token_forged_during_a_restart_reaches_no_other_namespace() {
    let admin = client().await;
    let aws = AwsEmulator::start().unwrap();
    let name = format!("forge-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let mut first = spawn_controller(env().cp, &name, &selector, &aws.endpoint(), &[], &[]);
    let platform = namespace(&admin, "forge-platform").await;
    let key_id = create_aws_keys(&admin, &platform, "aws-keys", "secretkey").await;
    let tenant_ns = labelled_namespace(&admin, "forge-tenant", &[("forge", &name)]).await;
    let tenant = tenant(&admin, &tenant_ns).await;
    create_cluster_credential_for(&admin, &name, Some(&name), fan_out_spec(&name, &platform)).await;
    let genuine = password(&wait_secret(&admin, &tenant_ns, &name, "written", |_| true).await);
    assert_eq!(issued_passwords(&aws, &key_id), BTreeSet::from([genuine.clone()]));
    wait_cluster(&admin, &name, "the digest of what it wrote recorded", |s| s.credential.token_digest.is_some()).await;
    first.terminate();
    drop(first);

    // The tenant writes its own token into the Secret regcred wrote in its namespace.
    let patch =
        json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(forged_config())}});
    Api::<Secret>::namespaced(tenant.clone(), &tenant_ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("an editor may patch Secrets in its namespace");

    let _second = spawn_controller(env().cp, &format!("{name}-2"), &selector, &aws.endpoint(), &[], &[]);
    let joined = labelled_namespace(&admin, "forge-joined", &[("forge", &name)]).await;
    let written = wait_secret(&admin, &joined, &name, "written", |_| true).await;
    assert_ne!(password(&written), FORGED, "the tenant's token was written into another namespace");
    let repaired = wait_secret(&admin, &tenant_ns, &name, "repaired", |s| password(s) != FORGED).await;
    let issued = issued_passwords(&aws, &key_id);
    for (ns, secret) in [(&joined, &written), (&tenant_ns, &repaired)] {
        assert!(issued.contains(&password(secret)), "{ns} holds a token AWS did not issue");
    }
    assert_no_leaks(&admin).await;
}

/// With a genuine Secret beside the forged one, the restarted controller seeds its token
/// cache from the genuine one: no call to AWS, the other tenant's Secret is not rewritten, and
/// the forged one is repaired with the token regcred wrote.
#[tokio::test]
async fn a_forged_secret_is_repaired_from_the_genuine_token_without_a_provider_call() {
    let admin = client().await;
    let aws = AwsEmulator::start().unwrap();
    let name = format!("forge2-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let mut first = spawn_controller(env().cp, &name, &selector, &aws.endpoint(), &[], &[]);
    let platform = namespace(&admin, "forge-platform").await;
    let key_id = create_aws_keys(&admin, &platform, "aws-keys", "secretkey").await;
    let tenant_ns = labelled_namespace(&admin, "forge-tenant", &[("forge", &name)]).await;
    let victim = labelled_namespace(&admin, "forge-victim", &[("forge", &name)]).await;
    let tenant = tenant(&admin, &tenant_ns).await;
    create_cluster_credential_for(&admin, &name, Some(&name), fan_out_spec(&name, &platform)).await;
    wait_secret(&admin, &tenant_ns, &name, "written", |_| true).await;
    wait_secret(&admin, &victim, &name, "written", |_| true).await;
    wait_cluster(&admin, &name, "the digest of what it wrote recorded", |s| s.credential.token_digest.is_some()).await;
    first.terminate();
    drop(first);
    let before = Api::<Secret>::namespaced(admin.clone(), &victim).get(&name).await.unwrap();
    let genuine = password(&before);

    let patch =
        json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(forged_config())}});
    Api::<Secret>::namespaced(tenant.clone(), &tenant_ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("an editor may patch Secrets in its namespace");

    let _second = spawn_controller(env().cp, &format!("{name}-2"), &selector, &aws.endpoint(), &[], &[]);
    let repaired = wait_secret(&admin, &tenant_ns, &name, "repaired", |s| password(s) != FORGED).await;
    assert_eq!(password(&repaired), genuine, "repaired with the token regcred wrote");
    let after = Api::<Secret>::namespaced(admin.clone(), &victim).get(&name).await.unwrap();
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version, "the victim's Secret was rewritten");
    assert_eq!(issued_passwords(&aws, &key_id).len(), 1, "the restart asked AWS again");
    assert_no_leaks(&admin).await;
}
