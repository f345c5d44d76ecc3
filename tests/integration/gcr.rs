//! Artifact Registry against the Google emulator (tests/gcp): a key's access token, Workload
//! Identity Federation with and without impersonation, the metadata server; one token per
//! identity, rotation ahead of expiry, outages that keep a still-valid Secret, restarts that
//! ask Google for nothing. Pulls go through a real registry whose token realm is the emulator,
//! so only tokens Google issued and that are live open it.

use std::{
    collections::BTreeSet,
    sync::OnceLock,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use regcred::crd::RegistryCredential;
use regcred_testenv::{AttributeCondition, GcpEmulator, ISSUER, Registry, WorkloadIdentityProvider, eventually};
use serde_json::{Value, json};

use crate::support::*;

/// The label value of the controller that serves these tests' credentials.
const GOOGLE: &str = "google";
const PROJECT: &str = "regcred-test";
const WORKLOAD_IDENTITY_USER: &str = "roles/iam.workloadIdentityUser";
/// The metadata server's identity (GKE Workload Identity or the node's account).
const NODE_ACCOUNT: &str = "node@regcred-test.iam.gserviceaccount.com";

/// A Google emulator, a registry whose token realm it is (with one image pushed), and a
/// controller that talks to that Google.
struct Google {
    gcp: GcpEmulator,
    registry: Registry,
    image: String,
    /// Kept running for the tests' credentials labelled GOOGLE (dropping it stops it).
    _controller: TestController,
}

fn google() -> &'static Google {
    static GOOGLE_ENV: OnceLock<Google> = OnceLock::new();
    GOOGLE_ENV.get_or_init(|| {
        let gcp = GcpEmulator::start().expect("starting the Google emulator");
        let registry = Registry::start_with_token_realm(&gcp.token_realm()).expect("starting the registry");
        let pusher = "pusher@regcred-test.iam.gserviceaccount.com";
        let key = gcp.create_service_account_key(pusher).unwrap();
        gcp.grant(pusher, &format!("{PROJECT}/team"), &["pull", "push"]).unwrap();
        let token = access_token(&gcp, &key);
        let image =
            registry.push_test_image(&format!("{PROJECT}/team/app"), "v1", "oauth2accesstoken", &token).unwrap();
        gcp.create_service_account_key(NODE_ACCOUNT).unwrap();
        gcp.set_metadata_identity(NODE_ACCOUNT).unwrap();
        let controller = spawn_google_controller(&gcp, GOOGLE, &[]);
        Google { gcp, registry, image, _controller: controller }
    })
}

/// A controller for the credentials labelled `name`, with Google's endpoints at `gcp`.
pub fn spawn_google_controller(gcp: &GcpEmulator, name: &str, args: &[&str]) -> TestController {
    spawn_google_controller_with(gcp, name, name, args, &[])
}

/// As [`spawn_google_controller`], as process `process` (its log's name) for label `name`.
fn spawn_google_controller_with(
    gcp: &GcpEmulator,
    process: &str,
    name: &str,
    args: &[&str],
    envs: &[(&str, String)],
) -> TestController {
    let (sts, token_uri, url) = (gcp.sts_url(), gcp.token_uri(), gcp.url());
    let mut all = vec!["--gcp-sts-url", &sts, "--gcp-iam-credentials-url", &url, "--gcp-token-uri", &token_uri];
    all.extend_from_slice(args);
    let mut envs = envs.to_vec();
    envs.push(("GCE_METADATA_HOST", gcp.metadata_host()));
    spawn_controller(env().cp, process, &format!("{CONTROLLER_LABEL}={name}"), &env().aws.endpoint(), &all, &envs)
}

/// An access token for a key, straight from the emulator (to push the test image).
fn access_token(gcp: &GcpEmulator, key: &regcred_testenv::ServiceAccountKey) -> String {
    let assertion = key.sign(&key.assertion_claims()).unwrap();
    let body = format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}");
    let (status, answer) = regcred_testenv::http_request(
        gcp.port(),
        "POST",
        "/token",
        "Content-Type: application/x-www-form-urlencoded\r\n",
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    answer["access_token"].as_str().unwrap().to_owned()
}

/// A service account of the test project, unique to the caller, with a fresh key.
fn new_key(gcp: &GcpEmulator, prefix: &str) -> regcred_testenv::ServiceAccountKey {
    let email = format!("{prefix}-{}@{PROJECT}.iam.gserviceaccount.com", &unique()[..8]);
    let key = gcp.create_service_account_key(&email).unwrap();
    // The PEM's body lines: none of them may show anywhere but the source Secret.
    for line in key.private_key.lines().filter(|l| !l.starts_with("-----")).take(3) {
        record_secret(line);
    }
    key
}

/// The key file in a Secret `gcp-key` of `ns`.
async fn key_secret(client: &Client, ns: &str, key: &regcred_testenv::ServiceAccountKey) {
    create_secret(client, ns, "gcp-key", &[("key.json", key.json.as_bytes())]).await;
}

fn key_spec(registry: &str) -> Value {
    json!({"registry": registry, "source": {"gcr": {"jsonKeySecretRef": {"name": "gcp-key"}}}})
}

/// What the emulator knows about a token it issued: kind, identity, expiry.
fn issued(gcp: &GcpEmulator, token: &str) -> Value {
    record_secret(token);
    gcp.tokens().unwrap().remove(token).unwrap_or_else(|| panic!("the Secret holds a token Google never issued"))
}

/// Calls to `endpoint` the emulator answered with 200 for `identity`.
fn successful_calls(gcp: &GcpEmulator, endpoint: &str, identity: &str) -> usize {
    gcp.calls()
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

#[tokio::test]
async fn a_key_is_exchanged_for_an_access_token_and_never_leaves_its_secret() {
    let g = google();
    // A controller of its own: its call counter counts this test's token requests only.
    let label = format!("gcr-key-{}", &unique()[..6]);
    let controller = spawn_google_controller(&g.gcp, &label, &[]);
    let client = client().await;
    let ns = namespace(&client, "gcr-key").await;
    let key = new_key(&g.gcp, "key");
    key_secret(&client, &ns, &key).await;
    let host = g.registry.host();
    create_credential_for(&client, &ns, "gar", Some(&label), key_spec(&host)).await;

    let cr = wait_ready(&client, &ns, "gar", "True", Some("Synced")).await;
    let secret = wait_secret(&client, &ns, "gar", "written", |_| true).await;
    let first = logins(&secret);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!((first[0].0.as_str(), first[0].1.as_str()), (host.as_str(), "oauth2accesstoken"));
    let token = issued(&g.gcp, &first[0].2);
    assert_eq!((token["kind"].as_str(), token["identity"].as_str()), (Some("access"), Some(key.client_email.as_str())));
    assert_eq!(successful_calls(&g.gcp, "oauth:token", &key.client_email), 1);
    let config = String::from_utf8(dockerconfigjson(&secret)).unwrap();
    assert!(!config.contains("PRIVATE KEY") && !config.contains(&key.private_key_id), "the key left its Secret");

    // Status as for ECR: the expiry Google gave, a refresh with a quarter of the hour left.
    let status = cr.status.unwrap();
    assert_eq!(status.source.as_deref(), Some("gcr"));
    let degraded = status.condition("Degraded").expect("Degraded condition");
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("False", "Refreshed"));
    let expires = status.expires_at.expect("expiresAt").0.as_second();
    assert!((expires - token["expires"].as_f64().unwrap() as i64).abs() <= 2, "expiresAt {expires} vs {token}");
    let refresh_left = expires - status.next_refresh_at.expect("nextRefreshAt").0.as_second();
    // A quarter of 3600 s left, plus up to 5 % of jitter.
    assert!((895..=1085).contains(&refresh_left), "refresh {refresh_left} s before expiry");

    // Google calls are counted as ECR's are; the token is nowhere in the metrics.
    let metrics = controller.metrics();
    let calls = sample(&metrics, "regcred_provider_calls_total{provider=\"oauth\",operation=\"token\"}");
    assert_eq!(calls, Some(1.0), "the one token request Google answered:\n{metrics}");
    assert!(!metrics.contains(&first[0].2));

    // The registry takes the token: crane pulls with the Secret as it is.
    g.registry.pull_with_auth_file(&g.image, &dockerconfigjson(&secret)).unwrap();

    // login: JsonKey is the explicit exception: the key itself, as _json_key, with no expiry.
    let spec =
        json!({"registry": host, "source": {"gcr": {"jsonKeySecretRef": {"name": "gcp-key"}, "login": "JsonKey"}}});
    create_credential_for(&client, &ns, "json-key", Some(&label), spec).await;
    let cr = wait_ready(&client, &ns, "json-key", "True", Some("Synced")).await;
    let secret = wait_secret(&client, &ns, "json-key", "written", |_| true).await;
    assert_eq!(logins(&secret), vec![(host.clone(), "_json_key".into(), key.json.clone())]);
    let status = cr.status.unwrap();
    assert!(status.expires_at.is_none() && status.condition("Degraded").is_none(), "{status:?}");
    g.registry.pull_with_auth_file(&g.image, &dockerconfigjson(&secret)).unwrap();

    // A revoked token is refused by the registry (the realm checks with Google).
    g.gcp.revoke(&first[0].2).unwrap();
    let secret = Api::<Secret>::namespaced(client.clone(), &ns).get("gar").await.unwrap();
    let err = g.registry.pull_with_auth_file(&g.image, &dockerconfigjson(&secret)).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{err:#}");
    assert_no_leaks(&client).await;
}

/// A provider trusting the test apiserver's ServiceAccount tokens from `ns` only.
fn provider_for(ns: &str) -> WorkloadIdentityProvider {
    let jwks = env().cp.service_account_jwks().unwrap();
    let id = format!("k8s-{}", &unique()[..8]);
    let mut provider = WorkloadIdentityProvider::new("123456789012", "regcred-pool", &id, ISSUER, jwks);
    provider.condition = AttributeCondition::SubjectPrefix(format!("system:serviceaccount:{ns}:"));
    provider
}

async fn service_account(client: &Client, ns: &str, name: &str) {
    let sa =
        ServiceAccount { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<ServiceAccount>::namespaced(client.clone(), ns).create(&PostParams::default(), &sa).await.unwrap();
}

fn wif_spec(registry: &str, account: &str, audience: &str, impersonate: Option<&str>) -> Value {
    let mut gcr = json!({"workloadIdentity": {"serviceAccountRef": {"name": account}, "audience": audience}});
    if let Some(email) = impersonate {
        gcr["impersonate"] = json!({"serviceAccount": email});
    }
    json!({"registry": registry, "source": {"gcr": gcr}})
}

#[tokio::test]
async fn workload_identity_federation_exchanges_the_tenants_own_service_account_token() {
    let g = google();
    let client = client().await;
    let ns = namespace(&client, "gcr-wif").await;
    service_account(&client, &ns, "puller").await;
    let provider = provider_for(&ns);
    g.gcp.add_provider(&provider).unwrap();
    let principal = provider.principal(&format!("system:serviceaccount:{ns}:puller"));
    let audience = provider.audience();
    let host = g.registry.host();

    // Direct resource access: the pool's principal itself may pull.
    g.gcp.grant(&principal, &format!("{PROJECT}/team"), &["pull"]).unwrap();
    create_credential_for(&client, &ns, "direct", Some(GOOGLE), wif_spec(&host, "puller", &audience, None)).await;
    // Impersonation: the principal may act as a service account of the project.
    let target = new_key(&g.gcp, "wif-target").client_email;
    g.gcp.bind(&target, WORKLOAD_IDENTITY_USER, &principal).unwrap();
    let spec = wif_spec(&host, "puller", &audience, Some(&target));
    create_credential_for(&client, &ns, "impersonated", Some(GOOGLE), spec).await;

    for (name, kind, identity) in [("direct", "federated", principal.as_str()), ("impersonated", "access", &target)] {
        wait_ready(&client, &ns, name, "True", Some("Synced")).await;
        let secret = wait_secret(&client, &ns, name, "written", |_| true).await;
        let login = logins(&secret).remove(0);
        assert_eq!(login.1, "oauth2accesstoken");
        let token = issued(&g.gcp, &login.2);
        assert_eq!((token["kind"].as_str(), token["identity"].as_str()), (Some(kind), Some(identity)), "{name}");
        g.registry.pull_with_auth_file(&g.image, &dockerconfigjson(&secret)).unwrap();
    }
    // STS verified the apiserver's token for real (signature, issuer, audience, subject): one
    // exchange per identity, and one impersonation.
    assert_eq!(successful_calls(&g.gcp, "sts:token", &principal), 2);
    assert_eq!(successful_calls(&g.gcp, "iamcredentials:generateAccessToken", &principal), 1);

    // The provider's condition admits this namespace's accounts only; and impersonation needs
    // the binding. Both refusals are Google's, named in the status.
    let other = namespace(&client, "gcr-wif-other").await;
    service_account(&client, &other, "puller").await;
    create_credential_for(&client, &other, "outsider", Some(GOOGLE), wif_spec(&host, "puller", &audience, None)).await;
    let cr = wait_ready(&client, &other, "outsider", "False", Some("GcpRequestFailed")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(
        message.contains("sts:token failed: unauthorized_client") && message.contains("attribute condition"),
        "{message}"
    );
    let unbound = new_key(&g.gcp, "unbound").client_email;
    create_credential_for(&client, &ns, "unbound", Some(GOOGLE), wif_spec(&host, "puller", &audience, Some(&unbound)))
        .await;
    let cr = wait_ready(&client, &ns, "unbound", "False", Some("GcpRequestFailed")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("iamcredentials:generateAccessToken failed: PERMISSION_DENIED"), "{message}");
    wait_event(&client, &ns, "RegistryCredential", "unbound", "Warning", "GcpRequestFailed").await;

    // A missing ServiceAccount is named, and picked up once it exists: by the ServiceAccount
    // watch, not a retry (a controller of its own with a long backoff, five failures in).
    let late = format!("gcr-late-{}", &unique()[..6]);
    let late_controller = spawn_google_controller(&g.gcp, &late, LONG_BACKOFF);
    create_credential_for(&client, &ns, "later", Some(&late), wif_spec(&host, "late", &audience, None)).await;
    wait_ready(&client, &ns, "later", "False", Some("ServiceAccountNotFound")).await;
    wait_failures(&late_controller, "RegistryCredential", "ServiceAccountNotFound", 5.0).await;
    g.gcp
        .grant(&provider.principal(&format!("system:serviceaccount:{ns}:late")), &format!("{PROJECT}/team"), &["pull"])
        .unwrap();
    let created = Instant::now();
    service_account(&client, &ns, "late").await;
    wait_ready_within(EVENT_WAIT, &client, &ns, "later", "True", Some("Synced")).await;
    eprintln!("the ServiceAccount picked up {:?} after it was created", created.elapsed());
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn the_metadata_identity_serves_cluster_credentials_and_namespaced_ones_only_by_flag() {
    let g = google();
    let client = client().await;
    let ns = namespace(&client, "gcr-ambient").await;
    let host = g.registry.host();
    let name = format!("gcr-ambient-{}", &unique()[..6]);
    let spec = json!({"registry": host, "namespaces": {"names": [ns]}, "secret": {"name": "gar-pull"},
                      "source": {"gcr": {"ambient": {}}}});
    create_cluster_credential_for(&client, &name, Some(GOOGLE), spec).await;
    let secret = wait_secret(&client, &ns, "gar-pull", "written", |_| true).await;
    let login = logins(&secret).remove(0);
    let token = issued(&g.gcp, &login.2);
    assert_eq!(token["identity"], NODE_ACCOUNT);
    g.registry.pull_with_auth_file(&g.image, &dockerconfigjson(&secret)).unwrap();

    // A tenant may not borrow the controller's identity by default.
    create_credential_for(
        &client,
        &ns,
        "borrow",
        Some(GOOGLE),
        json!({"registry": host, "source": {"gcr": {"ambient": {}}}}),
    )
    .await;
    let cr = wait_ready(&client, &ns, "borrow", "False", Some("AmbientIdentityNotAllowed")).await;
    assert!(cr.status.unwrap().conditions[0].message.contains("--allow-ambient-gcp-identity"));
    // A controller started with the flag lets it.
    let allowed = format!("gcr-allow-{}", &unique()[..6]);
    let _controller = spawn_google_controller(&g.gcp, &allowed, &["--allow-ambient-gcp-identity"]);
    create_credential_for(
        &client,
        &ns,
        "allowed",
        Some(&allowed),
        json!({"registry": host, "source": {"gcr": {"ambient": {}}}}),
    )
    .await;
    wait_ready(&client, &ns, "allowed", "True", Some("Synced")).await;
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn fifty_credentials_on_one_key_make_one_token_request() {
    let g = google();
    let client = client().await;
    let ns = namespace(&client, "gcr-share").await;
    let key = new_key(&g.gcp, "shared");
    key_secret(&client, &ns, &key).await;
    for i in 0..50 {
        create_credential_for(&client, &ns, &format!("c{i}"), Some(GOOGLE), key_spec(&g.registry.host())).await;
    }
    let mut tokens = BTreeSet::new();
    for i in 0..50 {
        wait_ready(&client, &ns, &format!("c{i}"), "True", Some("Synced")).await;
        let secret = wait_secret(&client, &ns, &format!("c{i}"), "written", |_| true).await;
        tokens.insert(logins(&secret).remove(0).2);
    }
    assert_eq!(successful_calls(&g.gcp, "oauth:token", &key.client_email), 1, "50 credentials, one key: one request");
    assert_eq!(tokens.len(), 1, "every Secret holds the one token");
    issued(&g.gcp, tokens.first().unwrap());
}

/// A test's own Google (tokens of `lifetime` seconds) and controller, and a key credential.
struct Dedicated {
    gcp: GcpEmulator,
    ns: String,
    email: String,
    controller: TestController,
}

async fn dedicated(client: &Client, prefix: &str, lifetime: u64) -> Dedicated {
    let gcp = GcpEmulator::start().unwrap();
    gcp.set_token_lifetime(lifetime).unwrap();
    let name = format!("gcr-{prefix}-{}", &unique()[..6]);
    let controller = spawn_google_controller(&gcp, &name, &[]);
    let ns = namespace(client, &format!("gcr-{prefix}")).await;
    let key = new_key(&gcp, prefix);
    key_secret(client, &ns, &key).await;
    create_credential_for(client, &ns, "gar", Some(&name), key_spec("europe-docker.pkg.dev")).await;
    Dedicated { gcp, ns, email: key.client_email, controller }
}

#[tokio::test]
async fn tokens_rotate_before_they_expire() {
    let client = client().await;
    // 40-second tokens: refreshed 28 to 30 s after issue.
    let Dedicated { gcp, ns, email, controller: _controller } = dedicated(&client, "rotate", 40).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let mut seen: Vec<(String, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < 3 {
        assert!(Instant::now() < deadline, "only {} tokens seen in 120 s", seen.len());
        if let Some(secret) = secrets.get_opt("gar").await.unwrap() {
            let token = logins(&secret).remove(0).2;
            if seen.last().is_none_or(|(t, _)| *t != token) {
                seen.push((token, now()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, (token, first_seen)) in seen.iter().enumerate() {
        let expires = issued(&gcp, token)["expires"].as_f64().unwrap();
        assert!(*first_seen < expires, "token {i} was written after it expired");
        if let Some((_, next_seen)) = seen.get(i + 1) {
            assert!(*next_seen < expires, "token {i} was replaced only after it expired");
        }
    }
    assert_eq!(seen.iter().map(|(t, _)| t).collect::<BTreeSet<_>>().len(), 3);
    assert_eq!(successful_calls(&gcp, "oauth:token", &email), 3, "one request per token");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn an_outage_keeps_the_valid_secret_as_degraded_and_recovery_needs_no_restart() {
    let client = client().await;
    let Dedicated { gcp, ns, email, controller: _controller } = dedicated(&client, "outage", 60).await;
    wait_ready(&client, &ns, "gar", "True", Some("Synced")).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let before = secrets.get("gar").await.unwrap();
    let old = logins(&before).remove(0).2;
    issued(&gcp, &old);

    gcp.fail("oauth:token", Some(503)).unwrap();
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let long = Duration::from_secs(90);
    let cr = eventually("Degraded while the token is valid", long, || async {
        let cr = api.get("gar").await.ok()?;
        let st = cr.status.clone()?;
        (st.condition("Degraded")?.status == "True" && st.condition("Ready")?.status == "True").then_some(cr)
    })
    .await;
    let status = cr.status.unwrap();
    let message = &status.condition("Degraded").unwrap().message;
    assert!(
        message.contains("oauth:token failed: UNAVAILABLE") && message.contains("keeps the current token"),
        "{message}"
    );
    wait_event(&client, &ns, "RegistryCredential", "gar", "Warning", "GcpRequestFailed").await;
    let unchanged = secrets.get("gar").await.unwrap();
    assert_eq!(unchanged.metadata.resource_version, before.metadata.resource_version, "the Secret was rewritten");

    gcp.fail("oauth:token", None).unwrap();
    let after = eventually("a fresh token after recovery", long, || async {
        let cr = api.get("gar").await.ok()?;
        let st = cr.status.as_ref()?;
        let current = st.condition("Ready")?.status == "True" && st.condition("Degraded")?.status == "False";
        let secret = secrets.get("gar").await.ok()?;
        (current && secret.metadata.resource_version != before.metadata.resource_version).then_some(secret)
    })
    .await;
    let new = logins(&after).remove(0).2;
    assert_ne!(new, old);
    assert_eq!(issued(&gcp, &new)["identity"], email.as_str());
    assert_no_leaks(&client).await;
}

/// A restarted controller reuses the token its Secret holds: no request to Google, no write.
#[tokio::test]
async fn a_restart_asks_google_for_nothing_and_rewrites_nothing() {
    let cp = env().cp;
    let client = client().await;
    let gcp = GcpEmulator::start().unwrap();
    let name = format!("gcr-restart-{}", &unique()[..6]);
    let (kubeconfig, user) = own_identity(&name, None);
    let env_kubeconfig = [("KUBECONFIG", kubeconfig.display().to_string())];
    let mut first = spawn_google_controller_with(&gcp, &name, &name, &[], &env_kubeconfig);
    let ns = namespace(&client, "gcr-restart").await;
    let key = new_key(&gcp, "restart");
    key_secret(&client, &ns, &key).await;
    let created_at = cp.audit_log_len().unwrap();
    create_credential_for(&client, &ns, "gar", Some(&name), key_spec("europe-docker.pkg.dev")).await;
    wait_ready(&client, &ns, "gar", "True", Some("Synced")).await;
    let secret = wait_secret(&client, &ns, "gar", "written", |_| true).await;
    issued(&gcp, &logins(&secret).remove(0).2);
    first.terminate();
    drop(first);
    // The Secret was created with one write: no apply after the create (the token's identity
    // is in the status, not on the Secret).
    let secret_writes: Vec<_> = requests_of_since(&user, created_at)
        .into_iter()
        .filter(|(verb, resource, namespace, _)| is_write(verb) && resource == "secrets" && *namespace == ns)
        .map(|(verb, ..)| verb)
        .collect();
    assert_eq!(secret_writes, ["create"], "the first controller's Secret writes");

    let offset = cp.audit_log_len().unwrap();
    let second = spawn_google_controller_with(&gcp, &format!("{name}-2"), &name, &[], &env_kubeconfig);
    eventually("the restarted controller reconciled the credential", TIMEOUT, || async {
        sample(&second.metrics(), "regcred_reconciles_total").filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(successful_calls(&gcp, "oauth:token", &key.client_email), 1, "the restart asked Google again");
    let writes: Vec<_> = requests_of_since(&user, offset)
        .into_iter()
        .filter(|(verb, resource, _, _)| {
            is_write(verb) && ["secrets", "registrycredentials"].contains(&resource.as_str())
        })
        .collect();
    assert!(writes.is_empty(), "the restarted controller wrote: {writes:?}");
    assert_no_leaks(&client).await;
}

/// The figures for the closing note: token requests per rotation for 1, 10 and 100
/// credentials on one key (`cargo test --test integration -- --ignored gcr::token_requests`).
#[tokio::test]
#[ignore = "a measurement: about 3 minutes"]
async fn token_requests_per_rotation_for_1_10_and_100_credentials() {
    let client = client().await;
    for n in [1usize, 10, 100] {
        // 40-second tokens: every credential's Secret is rotated once within a minute.
        let Dedicated { gcp, ns, email, controller } = dedicated(&client, &format!("per-rotation-{n}"), 40).await;
        let name = controller_label_of(&client, &ns).await;
        for i in 1..n {
            create_credential_for(&client, &ns, &format!("gar-{i}"), Some(&name), key_spec("europe-docker.pkg.dev"))
                .await;
        }
        let names: Vec<String> = std::iter::once("gar".to_string()).chain((1..n).map(|i| format!("gar-{i}"))).collect();
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
        let initial = successful_calls(&gcp, "oauth:token", &email);
        let rotated = eventually("every Secret rotated", Duration::from_secs(90), || {
            let (secrets, names, first) = (secrets.clone(), names.clone(), first.clone());
            async move { tokens(secrets, names).await.filter(|t| t.len() == 1 && t.is_disjoint(&first)) }
        })
        .await;
        let after = successful_calls(&gcp, "oauth:token", &email);
        for token in first.iter().chain(&rotated) {
            issued(&gcp, token);
        }
        println!("token requests: {n} credentials on one key: first sync {initial}, one rotation {}", after - initial);
        assert_eq!((initial, after - initial), (1, 1), "{n} credentials");
        drop(controller);
    }
}

/// The controller label of the credentials in `ns` (set by [`dedicated`]).
async fn controller_label_of(client: &Client, ns: &str) -> String {
    let cr = Api::<RegistryCredential>::namespaced(client.clone(), ns).get("gar").await.unwrap();
    cr.metadata.labels.unwrap()[CONTROLLER_LABEL].clone()
}
