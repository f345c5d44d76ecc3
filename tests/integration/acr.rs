//! Azure Container Registry against the Azure emulator (tests/azure): workload identity for a
//! tenant's own ServiceAccount, a service principal's secret, the managed identity (IMDS);
//! one Entra call and one exchange per identity and registry, outages that keep a still-valid
//! Secret, restarts that ask Azure for nothing, and registries outside the allowlist refused.
//! Pulls go through the emulated registry (`regcredtest.azurecr.io`, reached through a
//! CONNECT proxy over HTTPS), whose realm takes only live refresh tokens the emulator issued.

use std::{
    collections::BTreeSet,
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{ACR_USER, AzureEmulator, ISSUER, Registry, eventually};
use serde_json::{Value, json};

use crate::support::*;

/// The label value of the controller that serves these tests' credentials.
const AZURE: &str = "azure";
const REGISTRY: &str = "regcredtest.azurecr.io";
const TENANT: &str = "7a1e2b3c-0000-4000-8000-00000000a2e1";
const UPSTREAM_USER: &str = "acr-upstream";
/// The managed identity attached to the machine the controller runs on.
const NODE_IDENTITY: &str = "0d0e0f00-0000-4000-8000-0000000000aa";

/// An Azure emulator serving REGISTRY in front of a registry with one image, and a controller
/// that talks to that Azure.
struct Azure {
    azure: AzureEmulator,
    _upstream: Registry,
    image: String,
    _controller: TestController,
}

fn azure() -> &'static Azure {
    static AZURE_ENV: OnceLock<Azure> = OnceLock::new();
    AZURE_ENV.get_or_init(|| {
        let azure = AzureEmulator::start().expect("starting the Azure emulator");
        let upstream_password = format!("upstream-{}", unique());
        record_secret(&upstream_password);
        let upstream = Registry::start(&[(UPSTREAM_USER, &upstream_password)]).expect("starting the registry");
        upstream.push_test_image("team/app", "v1", UPSTREAM_USER, &upstream_password).unwrap();
        azure.add_registry(REGISTRY, &upstream, UPSTREAM_USER, &upstream_password).unwrap();
        azure.add_issuer(ISSUER, &env().cp.service_account_jwks().unwrap()).unwrap();
        azure.add_managed_identity(TENANT, NODE_IDENTITY, None, true).unwrap();
        azure.assign_role(NODE_IDENTITY, REGISTRY, "AcrPull").unwrap();
        let controller = spawn_azure_controller(&azure, AZURE, AZURE, &[], &[]);
        Azure { azure, _upstream: upstream, image: format!("{REGISTRY}/team/app:v1"), _controller: controller }
    })
}

/// A controller for the credentials labelled `name`, as process `process`, with Azure's
/// endpoints at `azure`: the emulator's authority allowed, its IMDS, and the registry hosts
/// through its proxy with its CA trusted.
pub(crate) fn spawn_azure_controller(
    azure: &AzureEmulator,
    process: &str,
    name: &str,
    args: &[&str],
    envs: &[(&str, String)],
) -> TestController {
    let (authority, imds) = (azure.authority(), azure.imds_endpoint());
    let mut all = vec!["--azure-authority-host", &authority, "--azure-imds-endpoint", &imds];
    all.extend_from_slice(args);
    let mut envs = envs.to_vec();
    envs.push(("HTTPS_PROXY", azure.proxy_url()));
    envs.push(("NO_PROXY", "127.0.0.1,localhost".into()));
    envs.push(("SSL_CERT_FILE", azure.ca_file().display().to_string()));
    spawn_controller(env().cp, process, &format!("{CONTROLLER_LABEL}={name}"), &env().aws.endpoint(), &all, &envs)
}

/// A fresh application (client) id.
fn client_id() -> String {
    let u = unique();
    format!("{}-{}-4{}-8{}-{}000000", &u[..8], &u[8..12], &u[12..15], &u[15..18], &u[18..24])
}

/// What the emulator knows about a token it issued; records every token it issued so far for
/// the leak checks (Entra tokens, refresh tokens, the registry's access tokens).
fn issued(azure: &AzureEmulator, token: &str) -> Value {
    let tokens = azure.tokens().unwrap();
    for known in tokens.keys() {
        record_secret(known);
    }
    record_secret(token);
    tokens.get(token).cloned().unwrap_or_else(|| panic!("the Secret holds a token Azure never issued"))
}

/// Calls to `endpoint` the emulator answered with 200 for `identity`.
pub(crate) fn successful_calls(azure: &AzureEmulator, endpoint: &str, identity: &str) -> usize {
    azure
        .calls()
        .unwrap()
        .iter()
        .filter(|c| c["endpoint"] == endpoint && c["identity"] == identity && c["status"] == 200)
        .count()
}

fn dockerconfigjson(secret: &Secret) -> Vec<u8> {
    secret.data.as_ref().unwrap()[".dockerconfigjson"].0.clone()
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The acr source with `identity` (`{"servicePrincipal": …}` and so on), for REGISTRY.
fn acr_spec(azure: &AzureEmulator, identity: Value) -> Value {
    let mut acr = json!({"registry": REGISTRY, "authorityHost": azure.authority()});
    for (key, value) in identity.as_object().unwrap() {
        acr[key] = value.clone();
    }
    json!({"source": {"acr": acr}})
}

/// A service principal with AcrPull on REGISTRY and its secret in Secret `sp` of `ns`.
async fn service_principal(client: &Client, azure: &AzureEmulator, ns: &str) -> (String, Value) {
    service_principal_on(client, azure, ns, REGISTRY).await
}

/// A service principal with AcrPull on `registry` and its secret in Secret `sp` of `ns`: its
/// client id, and the source's `servicePrincipal`.
pub(crate) async fn service_principal_on(
    client: &Client,
    azure: &AzureEmulator,
    ns: &str,
    registry: &str,
) -> (String, Value) {
    let id = client_id();
    let secret = secret_value(&id, "client-secret");
    azure.add_app(TENANT, &id, Some(&secret)).unwrap();
    azure.assign_role(&id, registry, "AcrPull").unwrap();
    create_secret(client, ns, "sp", &[("clientSecret", secret.as_bytes())]).await;
    let identity = json!({"servicePrincipal": {"tenantId": TENANT, "clientId": id, "clientSecretRef": {"name": "sp"}}});
    (id, identity)
}

async fn service_account(client: &Client, ns: &str, name: &str, annotations: &[(&str, &str)]) {
    let annotations = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let sa = ServiceAccount {
        metadata: ObjectMeta { name: Some(name.into()), annotations: Some(annotations), ..Default::default() },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &sa).await.unwrap();
}

/// Waits for the credential's Secret and checks it: one login for REGISTRY, the ACR user, a
/// refresh token the emulator issued for `identity` on REGISTRY; crane pulls with it.
async fn pulls_with_refresh_token_of(a: &Azure, client: &Client, ns: &str, name: &str, identity: &str) -> Secret {
    wait_ready(client, ns, name, "True", Some("Synced")).await;
    let secret = wait_secret(client, ns, name, "written", |_| true).await;
    let login = logins(&secret);
    assert_eq!(login.len(), 1, "{name}: one login");
    assert_eq!((login[0].0.as_str(), login[0].1.as_str()), (REGISTRY, ACR_USER), "{name}");
    let token = issued(&a.azure, &login[0].2);
    assert_eq!(
        (token["kind"].as_str(), token["identity"].as_str(), token["registry"].as_str()),
        (Some("refresh"), Some(identity), Some(REGISTRY)),
        "{name}"
    );
    a.azure.pull(&a.image, &dockerconfigjson(&secret)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    secret
}

#[tokio::test]
async fn a_service_principal_is_exchanged_for_a_refresh_token_dated_by_its_exp() {
    let a = azure();
    let label = format!("acr-sp-{}", &unique()[..6]);
    let controller = spawn_azure_controller(&a.azure, &label, &label, &[], &[]);
    let client = client().await;
    let ns = namespace(&client, "acr-sp").await;
    let (id, identity) = service_principal(&client, &a.azure, &ns).await;
    create_credential_for(&client, &ns, "acr", Some(&label), acr_spec(&a.azure, identity)).await;

    let secret = pulls_with_refresh_token_of(a, &client, &ns, "acr", &id).await;
    let token = issued(&a.azure, &logins(&secret)[0].2);
    assert_eq!(
        (successful_calls(&a.azure, "entra:token", &id), successful_calls(&a.azure, "acr:exchange", &id)),
        (1, 1)
    );

    // Status as for ECR and Google: the expiry the refresh token's exp says, a refresh with a
    // quarter of its 3 h left.
    let cr = Api::<RegistryCredential>::namespaced(client.clone(), &ns).get("acr").await.unwrap();
    let status = cr.status.unwrap();
    assert_eq!(status.source.as_deref(), Some("acr"));
    assert_eq!(status.registries, vec![REGISTRY.to_string()]);
    let degraded = status.condition("Degraded").expect("Degraded condition");
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("False", "Refreshed"));
    let expires = status.expires_at.expect("expiresAt").0.as_second();
    assert_eq!(expires, token["expires"].as_f64().unwrap() as i64, "expiresAt is the token's exp");
    let refresh_left = expires - status.next_refresh_at.expect("nextRefreshAt").0.as_second();
    // A quarter of 10,800 s left, plus up to 5 % of jitter.
    assert!((2695..=3245).contains(&refresh_left), "refresh {refresh_left} s before expiry");

    // Azure calls are counted; no token in the metrics.
    let metrics = controller.metrics();
    for (provider, operation) in [("entra", "token"), ("acr", "exchange")] {
        let calls = sample(
            &metrics,
            &format!("regcred_provider_calls_total{{provider=\"{provider}\",operation=\"{operation}\"}}"),
        );
        assert_eq!(calls, Some(1.0), "{provider}:{operation}\n{metrics}");
    }
    assert!(!metrics.contains(&logins(&secret)[0].2));

    // A wrong secret is Entra's refusal, named in the status.
    let wrong = secret_value(&id, "wrong-secret");
    create_secret(&client, &ns, "wrong", &[("clientSecret", wrong.as_bytes())]).await;
    let spec = acr_spec(
        &a.azure,
        json!({"servicePrincipal": {"tenantId": TENANT, "clientId": id, "clientSecretRef": {"name": "wrong"}}}),
    );
    create_credential_for(&client, &ns, "wrong", Some(&label), spec).await;
    let cr = wait_ready(&client, &ns, "wrong", "False", Some("AzureRequestFailed")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("entra:token failed: invalid_client: AADSTS7000215"), "{message}");

    // A revoked refresh token is refused by the registry's realm.
    a.azure.revoke(&logins(&secret)[0].2).unwrap();
    let err = a.azure.pull(&a.image, &dockerconfigjson(&secret)).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{err:#}");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn workload_identity_exchanges_the_tenants_own_service_account_token() {
    let a = azure();
    let client = client().await;
    let ns = namespace(&client, "acr-wi").await;
    // One application, federated with this namespace's `puller`, named by the ServiceAccount's
    // annotations as the Azure workload identity webhook reads them; a second one named in
    // the spec, for `builder`.
    let (annotated, named) = (client_id(), client_id());
    for (id, account) in [(&annotated, "puller"), (&named, "builder")] {
        a.azure.add_app(TENANT, id, None).unwrap();
        let subject = format!("system:serviceaccount:{ns}:{account}");
        a.azure.add_federated_credential(TENANT, id, ISSUER, &subject).unwrap();
        a.azure.assign_role(id, REGISTRY, "AcrPull").unwrap();
    }
    let annotations =
        [("azure.workload.identity/client-id", annotated.as_str()), ("azure.workload.identity/tenant-id", TENANT)];
    service_account(&client, &ns, "puller", &annotations).await;
    service_account(&client, &ns, "builder", &[]).await;
    let wi = |account: &str| json!({"workloadIdentity": {"serviceAccountRef": {"name": account}}});
    create_credential_for(&client, &ns, "annotated", Some(AZURE), acr_spec(&a.azure, wi("puller"))).await;
    let named_spec =
        json!({"workloadIdentity": {"serviceAccountRef": {"name": "builder"}, "clientId": named, "tenantId": TENANT}});
    create_credential_for(&client, &ns, "named", Some(AZURE), acr_spec(&a.azure, named_spec)).await;
    pulls_with_refresh_token_of(a, &client, &ns, "annotated", &annotated).await;
    pulls_with_refresh_token_of(a, &client, &ns, "named", &named).await;
    // Entra verified the apiserver's token for real (signature, issuer, audience, subject).
    assert_eq!(successful_calls(&a.azure, "entra:token", &annotated), 1);
    assert_eq!(successful_calls(&a.azure, "entra:token", &named), 1);

    // Another namespace's ServiceAccount: refused at admission...
    let other = namespace(&client, "acr-wi-other").await;
    let cross = json!({"workloadIdentity": {"serviceAccountRef": {"name": "puller", "namespace": ns}}});
    let refused = create_raw(&client, Some(&other), "RegistryCredential", "cross", acr_spec(&a.azure, cross)).await;
    let message = format!("{:?}", refused.expect_err("admission let a cross-namespace reference in"));
    assert!(message.contains("reads its own namespace"), "{message}");
    // ...and a ServiceAccount of the same name there, claiming the same application, by Entra:
    // its token's subject is not the federated credential's.
    service_account(&client, &other, "puller", &annotations).await;
    create_credential_for(&client, &other, "outsider", Some(AZURE), acr_spec(&a.azure, wi("puller"))).await;
    let cr = wait_ready(&client, &other, "outsider", "False", Some("AzureRequestFailed")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("entra:token failed: invalid_client: AADSTS70021"), "{message}");
    wait_event(&client, &other, "RegistryCredential", "outsider", "Warning", "AzureRequestFailed").await;

    // A ServiceAccount that names no application says so.
    service_account(&client, &ns, "bare", &[]).await;
    create_credential_for(&client, &ns, "bare", Some(AZURE), acr_spec(&a.azure, wi("bare"))).await;
    let cr = wait_ready(&client, &ns, "bare", "False", Some("AzureIdentityIncomplete")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("azure.workload.identity/client-id"), "{message}");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn the_managed_identity_serves_cluster_credentials_and_namespaced_ones_only_by_flag() {
    let a = azure();
    let client = client().await;
    let ns = namespace(&client, "acr-mi").await;
    let name = format!("acr-mi-{}", &unique()[..6]);
    let spec = json!({"namespaces": {"names": [ns]}, "secret": {"name": "acr-pull"},
                      "source": {"acr": {"registry": REGISTRY, "ambient": {}}}});
    create_cluster_credential_for(&client, &name, Some(AZURE), spec).await;
    let secret = wait_secret(&client, &ns, "acr-pull", "written", |_| true).await;
    let login = logins(&secret).remove(0);
    assert_eq!(issued(&a.azure, &login.2)["identity"], NODE_IDENTITY);
    a.azure.pull(&a.image, &dockerconfigjson(&secret)).unwrap();
    assert!(successful_calls(&a.azure, "imds:token", NODE_IDENTITY) >= 1);

    // A tenant may not borrow the controller's identity by default.
    let ambient = json!({"source": {"acr": {"registry": REGISTRY, "ambient": {}}}});
    create_credential_for(&client, &ns, "borrow", Some(AZURE), ambient.clone()).await;
    let cr = wait_ready(&client, &ns, "borrow", "False", Some("AmbientIdentityNotAllowed")).await;
    assert!(cr.status.unwrap().conditions[0].message.contains("--allow-ambient-azure-identity"));
    // A controller started with the flag lets it.
    let allowed = format!("acr-allow-{}", &unique()[..6]);
    let _controller = spawn_azure_controller(&a.azure, &allowed, &allowed, &["--allow-ambient-azure-identity"], &[]);
    create_credential_for(&client, &ns, "allowed", Some(&allowed), ambient).await;
    wait_ready(&client, &ns, "allowed", "True", Some("Synced")).await;
    assert_no_leaks(&client).await;
}

/// Azure tokens go to the allowed registry suffixes only: another host is refused before any
/// call, with a reason that says why; the controller's flag can name other suffixes.
#[tokio::test]
async fn a_registry_outside_the_allowlist_is_refused_with_a_reason() {
    let a = azure();
    let client = client().await;
    let ns = namespace(&client, "acr-allow").await;
    let (id, identity) = service_principal(&client, &a.azure, &ns).await;
    let mut spec = acr_spec(&a.azure, identity);
    spec["source"]["acr"]["registry"] = json!("registry.evil.example");
    create_credential_for(&client, &ns, "evil", Some(AZURE), spec.clone()).await;
    let cr = wait_ready(&client, &ns, "evil", "False", Some("RegistryHostNotAllowed")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("\"registry.evil.example\"") && message.contains(".azurecr.io"), "{message}");
    wait_event(&client, &ns, "RegistryCredential", "evil", "Warning", "RegistryHostNotAllowed").await;
    assert_eq!(successful_calls(&a.azure, "entra:token", &id), 0, "Entra was asked for an outside host");
    let calls = a.azure.calls().unwrap();
    assert!(calls.iter().all(|c| c["identity"] != id.as_str()), "{calls:?}");
    // An authority the controller does not know is refused too.
    let mut spec = acr_spec(
        &a.azure,
        json!({"servicePrincipal": {"tenantId": TENANT, "clientId": id, "clientSecretRef": {"name": "sp"}}}),
    );
    spec["source"]["acr"]["authorityHost"] = json!("https://login.evil.example");
    create_credential_for(&client, &ns, "authority", Some(AZURE), spec).await;
    wait_ready(&client, &ns, "authority", "False", Some("AuthorityHostNotAllowed")).await;
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn fifty_credentials_on_one_identity_make_one_entra_call_and_one_exchange() {
    let a = azure();
    let client = client().await;
    let ns = namespace(&client, "acr-share").await;
    let (id, identity) = service_principal(&client, &a.azure, &ns).await;
    for i in 0..50 {
        create_credential_for(&client, &ns, &format!("c{i}"), Some(AZURE), acr_spec(&a.azure, identity.clone())).await;
    }
    let mut tokens = BTreeSet::new();
    for i in 0..50 {
        wait_ready(&client, &ns, &format!("c{i}"), "True", Some("Synced")).await;
        let secret = wait_secret(&client, &ns, &format!("c{i}"), "written", |_| true).await;
        tokens.insert(logins(&secret).remove(0).2);
    }
    assert_eq!(successful_calls(&a.azure, "entra:token", &id), 1, "50 credentials, one identity: one Entra call");
    assert_eq!(successful_calls(&a.azure, "acr:exchange", &id), 1, "and one exchange");
    assert_eq!(tokens.len(), 1, "every Secret holds the one refresh token");
    issued(&a.azure, tokens.first().unwrap());
}

/// A test's own Azure (refresh tokens of `lifetime` seconds) and controller, and a service
/// principal credential `acr`.
struct Dedicated {
    azure: AzureEmulator,
    _upstream: Registry,
    ns: String,
    id: String,
    controller: TestController,
}

async fn dedicated(client: &Client, prefix: &str, lifetime: u64) -> Dedicated {
    let azure = AzureEmulator::start().unwrap();
    azure.set_token_lifetimes(3600, lifetime).unwrap();
    let password = format!("upstream-{}", unique());
    record_secret(&password);
    let upstream = Registry::start(&[(UPSTREAM_USER, &password)]).unwrap();
    azure.add_registry(REGISTRY, &upstream, UPSTREAM_USER, &password).unwrap();
    let name = format!("acr-{prefix}-{}", &unique()[..6]);
    let controller = spawn_azure_controller(&azure, &name, &name, &[], &[]);
    let ns = namespace(client, &format!("acr-{prefix}")).await;
    let (id, identity) = service_principal(client, &azure, &ns).await;
    create_credential_for(client, &ns, "acr", Some(&name), acr_spec(&azure, identity)).await;
    Dedicated { azure, _upstream: upstream, ns, id, controller }
}

#[tokio::test]
async fn refresh_tokens_rotate_before_they_expire() {
    let client = client().await;
    // 40-second refresh tokens: refreshed 28 to 30 s after issue.
    let Dedicated { azure, ns, id, controller: _controller, .. } = dedicated(&client, "rotate", 40).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let mut seen: Vec<(String, f64)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "only {} tokens seen in 120 s", seen.len());
        if let Some(secret) = secrets.get_opt("acr").await.unwrap() {
            let token = logins(&secret).remove(0).2;
            if seen.last().is_none_or(|(t, _)| *t != token) {
                seen.push((token, now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, (token, first_seen)) in seen.iter().enumerate() {
        let expires = issued(&azure, token)["expires"].as_f64().unwrap();
        assert!(*first_seen < expires, "token {i} was written after it expired");
        if let Some((_, next_seen)) = seen.get(i + 1) {
            assert!(*next_seen < expires, "token {i} was replaced only after it expired");
        }
    }
    assert_eq!(successful_calls(&azure, "acr:exchange", &id), 3, "one exchange per token");
    assert_eq!(successful_calls(&azure, "entra:token", &id), 3, "one Entra call per token");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn an_outage_keeps_the_valid_secret_as_degraded_and_recovery_needs_no_restart() {
    let client = client().await;
    let Dedicated { azure, ns, id, controller: _controller, .. } = dedicated(&client, "outage", 60).await;
    wait_ready(&client, &ns, "acr", "True", Some("Synced")).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let before = secrets.get("acr").await.unwrap();
    let old = logins(&before).remove(0).2;
    issued(&azure, &old);

    azure.fail("acr:exchange", Some(503)).unwrap();
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let long = Duration::from_secs(90);
    let cr = eventually("Degraded while the token is valid", long, || async {
        let cr = api.get("acr").await.ok()?;
        let st = cr.status.clone()?;
        (st.condition("Degraded")?.status == "True" && st.condition("Ready")?.status == "True").then_some(cr)
    })
    .await;
    let status = cr.status.unwrap();
    let message = &status.condition("Degraded").unwrap().message;
    assert!(
        message.contains("acr:exchange failed: SERVICE_UNAVAILABLE") && message.contains("keeps the current token"),
        "{message}"
    );
    wait_event(&client, &ns, "RegistryCredential", "acr", "Warning", "AzureRequestFailed").await;
    let unchanged = secrets.get("acr").await.unwrap();
    assert_eq!(unchanged.metadata.resource_version, before.metadata.resource_version, "the Secret was rewritten");

    azure.fail("acr:exchange", None).unwrap();
    let after = eventually("a fresh token after recovery", long, || async {
        let cr = api.get("acr").await.ok()?;
        let st = cr.status.as_ref()?;
        let current = st.condition("Ready")?.status == "True" && st.condition("Degraded")?.status == "False";
        let secret = secrets.get("acr").await.ok()?;
        (current && secret.metadata.resource_version != before.metadata.resource_version).then_some(secret)
    })
    .await;
    let new = logins(&after).remove(0).2;
    assert_ne!(new, old);
    assert_eq!(issued(&azure, &new)["identity"], id.as_str());
    assert_no_leaks(&client).await;
}

/// A restarted controller reuses the refresh token its Secret holds: no call to Azure, no write.
#[tokio::test]
async fn a_restart_asks_azure_for_nothing_and_rewrites_nothing() {
    let cp = env().cp;
    let client = client().await;
    let a = azure();
    let name = format!("acr-restart-{}", &unique()[..6]);
    let (kubeconfig, user) = own_identity(&name, None);
    let env_kubeconfig = [("KUBECONFIG", kubeconfig.display().to_string())];
    let mut first = spawn_azure_controller(&a.azure, &name, &name, &[], &env_kubeconfig);
    let ns = namespace(&client, "acr-restart").await;
    let (id, identity) = service_principal(&client, &a.azure, &ns).await;
    create_credential_for(&client, &ns, "acr", Some(&name), acr_spec(&a.azure, identity)).await;
    wait_ready(&client, &ns, "acr", "True", Some("Synced")).await;
    let secret = wait_secret(&client, &ns, "acr", "written", |_| true).await;
    issued(&a.azure, &logins(&secret).remove(0).2);
    first.terminate();
    drop(first);

    let offset = cp.audit_log_len().unwrap();
    let second = spawn_azure_controller(&a.azure, &format!("{name}-2"), &name, &[], &env_kubeconfig);
    eventually("the restarted controller reconciled the credential", TIMEOUT, || async {
        sample(&second.metrics(), "regcred_reconciles_total").filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(successful_calls(&a.azure, "entra:token", &id), 1, "the restart asked Entra again");
    assert_eq!(successful_calls(&a.azure, "acr:exchange", &id), 1, "the restart exchanged again");
    let writes: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(verb, resource, _, _)| {
            is_write(verb) && ["secrets", "registrycredentials"].contains(&resource.as_str())
        })
        .collect();
    assert!(writes.is_empty(), "the restarted controller wrote: {writes:?}");
    assert_no_leaks(&client).await;
}

/// The figures for the closing note: Entra calls and exchanges per rotation for 1, 10 and 100
/// credentials on one identity (`cargo test --test integration -- --ignored acr::calls_per`).
#[tokio::test]
#[ignore = "a measurement: about 3 minutes"]
async fn calls_per_rotation_for_1_10_and_100_credentials() {
    let client = client().await;
    for n in [1usize, 10, 100] {
        // 40-second refresh tokens: every credential's Secret is rotated once within a minute.
        let Dedicated { azure, ns, id, controller, .. } = dedicated(&client, &format!("per-rotation-{n}"), 40).await;
        let label = Api::<RegistryCredential>::namespaced(client.clone(), &ns)
            .get("acr")
            .await
            .unwrap()
            .metadata
            .labels
            .unwrap()[CONTROLLER_LABEL]
            .clone();
        let identity =
            json!({"servicePrincipal": {"tenantId": TENANT, "clientId": id, "clientSecretRef": {"name": "sp"}}});
        for i in 1..n {
            create_credential_for(&client, &ns, &format!("acr-{i}"), Some(&label), acr_spec(&azure, identity.clone()))
                .await;
        }
        let names: Vec<String> = std::iter::once("acr".to_string()).chain((1..n).map(|i| format!("acr-{i}"))).collect();
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        let tokens = |secrets: Api<Secret>, names: Vec<String>| async move {
            let mut held = BTreeSet::new();
            for name in &names {
                held.insert(logins(&secrets.get_opt(name).await.ok()??).remove(0).2);
            }
            Some(held)
        };
        let first = eventually("every Secret written", Duration::from_secs(60), || {
            let (secrets, names) = (secrets.clone(), names.clone());
            async move { tokens(secrets, names).await.filter(|t| t.len() == 1) }
        })
        .await;
        let calls = |azure: &AzureEmulator| {
            (successful_calls(azure, "entra:token", &id), successful_calls(azure, "acr:exchange", &id))
        };
        let initial = calls(&azure);
        let rotated = eventually("every Secret rotated", Duration::from_secs(90), || {
            let (secrets, names, first) = (secrets.clone(), names.clone(), first.clone());
            async move { tokens(secrets, names).await.filter(|t| t.len() == 1 && t.is_disjoint(&first)) }
        })
        .await;
        let after = calls(&azure);
        for token in first.iter().chain(&rotated) {
            issued(&azure, token);
        }
        println!(
            "azure calls: {n} credentials on one identity: first sync {initial:?} (Entra, exchange), one rotation ({}, {})",
            after.0 - initial.0,
            after.1 - initial.1
        );
        assert_eq!((initial, (after.0 - initial.0, after.1 - initial.1)), ((1, 1), (1, 1)), "{n} credentials");
        drop(controller);
    }
}

/// The registry check of an ACR credential takes ACR's flow over HTTPS through the proxy:
/// `GET /v2/`, ACR's Bearer challenge, the refresh token at the realm, then the repository's
/// manifest; an identity without a role on the repository's registry is refused at the
/// exchange, so such a credential never gets that far.
#[tokio::test]
async fn acr_credentials_are_verified_through_acrs_bearer_challenge() {
    let a = azure();
    let client = client().await;
    let ns = namespace(&client, "acr-verify").await;
    let (id, identity) = service_principal(&client, &a.azure, &ns).await;
    let mut spec = acr_spec(&a.azure, identity);
    spec["verify"] = json!({"repository": "team/app", "reference": "v1"});
    create_credential_for(&client, &ns, "checked", Some(AZURE), spec.clone()).await;
    let verified = crate::verify::wait_verified(&client, &ns, "checked", "True", "Verified").await;
    assert_eq!(verified, format!("{REGISTRY}: HEAD /v2/team/app/manifests/v1: 200 OK"));
    // The realm saw the refresh token of this identity, and the registry its access token.
    assert!(successful_calls(&a.azure, "acr:token", &id) >= 1);
    assert!(successful_calls(&a.azure, "registry:v2", &id) >= 1);
    let secret = wait_secret(&client, &ns, "checked", "written", |_| true).await;
    issued(&a.azure, &logins(&secret)[0].2);
    assert_no_leaks(&client).await;
}

/// IMDS's user-assigned identities, by client id and by resource id (cluster credentials), and
/// the Azure Resource Manager scope (`scope: ResourceManager`, as msi-acrpull asks), which the
/// exchange takes as it takes ACR's own.
#[tokio::test]
async fn user_assigned_identities_and_the_resource_manager_scope() {
    let a = azure();
    let client = client().await;
    let ns = namespace(&client, "acr-uai").await;
    let (by_client, by_resource) = (client_id(), client_id());
    let resource_id = format!(
        "/subscriptions/{}/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/puller-{}",
        client_id(),
        &unique()[..6]
    );
    a.azure.add_managed_identity(TENANT, &by_client, None, false).unwrap();
    a.azure.add_managed_identity(TENANT, &by_resource, Some(&resource_id), false).unwrap();
    for id in [&by_client, &by_resource] {
        a.azure.assign_role(id, REGISTRY, "AcrPull").unwrap();
    }
    for (secret, ambient, identity) in [
        ("by-client", json!({"clientId": by_client}), &by_client),
        ("by-resource", json!({"resourceId": resource_id}), &by_resource),
    ] {
        let name = format!("acr-uai-{secret}-{}", &unique()[..6]);
        let spec = json!({"namespaces": {"names": [ns]}, "secret": {"name": secret},
                          "source": {"acr": {"registry": REGISTRY, "ambient": ambient}}});
        create_cluster_credential_for(&client, &name, Some(AZURE), spec).await;
        let written = wait_secret(&client, &ns, secret, "written", |_| true).await;
        let token = issued(&a.azure, &logins(&written)[0].2);
        assert_eq!(token["identity"].as_str(), Some(identity.as_str()), "{secret}");
        a.azure.pull(&a.image, &dockerconfigjson(&written)).unwrap();
        assert_eq!(successful_calls(&a.azure, "imds:token", identity), 1, "{secret}");
    }

    let (id, identity) = service_principal(&client, &a.azure, &ns).await;
    let mut spec = acr_spec(&a.azure, identity);
    spec["source"]["acr"]["scope"] = json!("ResourceManager");
    create_credential_for(&client, &ns, "arm", Some(AZURE), spec).await;
    pulls_with_refresh_token_of(a, &client, &ns, "arm", &id).await;
    let resources: BTreeSet<String> = a
        .azure
        .tokens()
        .unwrap()
        .values()
        .filter(|t| t["kind"] == "entra" && t["identity"] == id.as_str())
        .filter_map(|t| t["resource"].as_str().map(String::from))
        .collect();
    assert_eq!(resources, BTreeSet::from(["https://management.azure.com".to_string()]));
    assert_no_leaks(&client).await;
}

/// The emulator is strict where Azure is, asked directly: Entra refuses unknown tenants and
/// applications, a request without a credential, a scope of no resource, a ServiceAccount token
/// for another audience, of another subject or with a tampered signature; IMDS refuses a
/// request without `Metadata: true` or through a proxy; the exchange refuses made-up tokens,
/// identities without a role on the registry, another tenant and another service; the realm
/// refuses another user and revoked refresh tokens; the registry challenges as ACR does.
#[tokio::test]
async fn the_emulator_is_strict_where_azure_is() {
    let a = azure();
    let admin = client().await;
    let ns = namespace(&admin, "acr-strict").await;
    service_account(&admin, &ns, "app", &[]).await;
    service_account(&admin, &ns, "other", &[]).await;
    let (app, unassigned) = (client_id(), client_id());
    a.azure.add_app(TENANT, &app, None).unwrap();
    a.azure.add_federated_credential(TENANT, &app, ISSUER, &format!("system:serviceaccount:{ns}:app")).unwrap();
    a.azure.assign_role(&app, REGISTRY, "AcrPull").unwrap();
    let secret = secret_value(&unassigned, "strict-secret");
    a.azure.add_app(TENANT, &unassigned, Some(&secret)).unwrap();

    let http = regcred::http::client(Some(a.azure.ca_pem().unwrap().as_bytes()), "the emulator's CA").unwrap();
    let scope = "https://containerregistry.azure.net/.default";
    let token_url = |tenant: &str| format!("{}/{tenant}/oauth2/v2.0/token", a.azure.authority());
    let entra = |tenant: String, fields: Vec<(&'static str, String)>| {
        let http = http.clone();
        async move {
            let answer = http.post(token_url(&tenant)).form(&fields).send().await.unwrap();
            let status = answer.status().as_u16();
            (status, serde_json::from_str::<Value>(&answer.text().await.unwrap()).unwrap())
        }
    };
    let assertion = |token: String| {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", app.clone()),
            ("scope", scope.to_string()),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string()),
            ("client_assertion", token),
        ]
    };
    let refused = |(status, body): (u16, Value), code: &str| {
        assert!(status >= 400, "{status}: {body}");
        let description = body["error_description"].as_str().unwrap_or_default().to_string();
        assert!(description.starts_with(&format!("AADSTS{code}:")), "expected AADSTS{code}: {status}: {body}");
    };
    let good = request_token(&admin, &ns, "app", &["api://AzureADTokenExchange"], 600).await.unwrap();
    record_secret(&good);
    let (status, body) = entra(TENANT.into(), assertion(good.clone())).await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap().to_string();
    record_secret(&access);

    refused(entra("00000000-1111-4222-8333-444444444444".into(), assertion(good.clone())).await, "90002");
    let mut unknown = assertion(good.clone());
    unknown[1].1 = client_id();
    refused(entra(TENANT.into(), unknown).await, "700016");
    refused(entra(TENANT.into(), assertion(good.clone())[..3].to_vec()).await, "7000216");
    let mut no_resource = assertion(good.clone());
    no_resource[2].1 = "https://example.com/.default".into();
    refused(entra(TENANT.into(), no_resource).await, "1002012");
    let other_audience = request_token(&admin, &ns, "app", &["https://example.com"], 600).await.unwrap();
    record_secret(&other_audience);
    refused(entra(TENANT.into(), assertion(other_audience)).await, "70021");
    let other_subject = request_token(&admin, &ns, "other", &["api://AzureADTokenExchange"], 600).await.unwrap();
    record_secret(&other_subject);
    refused(entra(TENANT.into(), assertion(other_subject)).await, "70021");
    // The apiserver's token with a payload of our own: its signature no longer holds.
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&base64::Engine::decode(&b64, parts[1]).unwrap()).unwrap();
    claims["exp"] = json!(claims["exp"].as_i64().unwrap() + 86400);
    let tampered = format!("{}.{}.{}", parts[0], base64::Engine::encode(&b64, claims.to_string()), parts[2]);
    refused(entra(TENANT.into(), assertion(tampered)).await, "5002727");

    // IMDS: only with Metadata: true, and not through a proxy.
    let imds = format!(
        "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://containerregistry.azure.net/",
        a.azure.imds_endpoint()
    );
    assert_eq!(http.get(&imds).send().await.unwrap().status().as_u16(), 400);
    let proxied = http.get(&imds).header("Metadata", "true").header("X-Forwarded-For", "10.0.0.1").send().await;
    assert_eq!(proxied.unwrap().status().as_u16(), 400);
    assert_eq!(http.get(&imds).header("Metadata", "true").send().await.unwrap().status().as_u16(), 200);

    // The registry's endpoints, by its name (the Host header) at the emulator's address.
    let acr = |path: &str| http.post(format!("{}{path}", a.azure.registry_url())).header("Host", REGISTRY);
    let exchange = |access: &str, tenant: &str, service: &str| {
        acr("/oauth2/exchange").form(&[
            ("grant_type", "access_token"),
            ("service", service),
            ("tenant", tenant),
            ("access_token", access),
        ])
    };
    assert_eq!(exchange("eyJmadeup.eyJmadeup.sig", TENANT, REGISTRY).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(exchange(&access, "contoso.onmicrosoft.com", REGISTRY).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(exchange(&access, TENANT, "other.azurecr.io").send().await.unwrap().status().as_u16(), 400);
    let (code, body) = entra(
        TENANT.into(),
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", unassigned.clone()),
            ("scope", scope.to_string()),
            ("client_secret", secret.clone()),
        ],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let no_role = body["access_token"].as_str().unwrap().to_string();
    record_secret(&no_role);
    let answer = exchange(&no_role, TENANT, REGISTRY).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 401);
    assert!(answer.text().await.unwrap().contains("has no role assignment"));
    let answer = exchange(&access, TENANT, REGISTRY).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let refresh = serde_json::from_str::<Value>(&answer.text().await.unwrap()).unwrap()["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    record_secret(&refresh);

    // The realm: the ACR user and a live refresh token of this registry.
    let realm = |user: &str, password: &str| {
        http.get(format!("{}/oauth2/token?service={REGISTRY}&scope=repository:team/app:pull", a.azure.registry_url()))
            .header("Host", REGISTRY)
            .basic_auth(user, Some(password))
    };
    assert_eq!(realm("someone", &refresh).send().await.unwrap().status().as_u16(), 401);
    assert_eq!(realm(ACR_USER, &refresh).send().await.unwrap().status().as_u16(), 200);
    a.azure.revoke(&refresh).unwrap();
    assert_eq!(realm(ACR_USER, &refresh).send().await.unwrap().status().as_u16(), 401);

    // The registry's challenge, word for word.
    let ping = http.get(format!("{}/v2/", a.azure.registry_url())).header("Host", REGISTRY).send().await.unwrap();
    assert_eq!(ping.status().as_u16(), 401);
    assert_eq!(
        ping.headers()["www-authenticate"],
        format!(r#"Bearer realm="https://{REGISTRY}/oauth2/token",service="{REGISTRY}""#).as_str()
    );
    assert_no_leaks(&admin).await;
}
