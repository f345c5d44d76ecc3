//! The Google emulator is strict where Google is: key JWTs, Kubernetes ServiceAccount
//! tokens from the real test apiserver, IAM bindings, the metadata server's header, and a
//! real distribution registry that crane pulls from only with live access tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use regcred_testenv::{
    AttributeCondition, ControlPlane, GcpEmulator, ISSUER, Registry, ServiceAccountKey, WorkloadIdentityProvider,
    docker_config_json, http_get_basic_auth, http_request, wait_for,
};
use serde_json::{Value, json};

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const WORKLOAD_IDENTITY_USER: &str = "roles/iam.workloadIdentityUser";
const TOKEN_CREATOR: &str = "roles/iam.serviceAccountTokenCreator";
const PUSHER: &str = "pusher@regcred-test.iam.gserviceaccount.com";
const PULLER: &str = "puller@regcred-test.iam.gserviceaccount.com";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `application/x-www-form-urlencoded`, every byte but the unreserved ones escaped.
fn form(fields: &[(&str, &str)]) -> String {
    let escape = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    fields.iter().map(|(k, v)| format!("{}={}", escape(k), escape(v))).collect::<Vec<_>>().join("&")
}

fn post(port: u16, path: &str, headers: &str, body: &str) -> (u16, Value) {
    let (status, body) = http_request(port, "POST", path, headers, body.as_bytes()).unwrap();
    (status, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}")))
}

fn post_form(gcp: &GcpEmulator, path: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    post(gcp.port(), path, "Content-Type: application/x-www-form-urlencoded\r\n", &form(fields))
}

/// The JWT bearer grant at the token endpoint.
fn exchange_assertion(gcp: &GcpEmulator, assertion: &str) -> (u16, Value) {
    post_form(gcp, "/token", &[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", assertion)])
}

/// An access token for `key`, through the JWT bearer grant.
fn access_token(gcp: &GcpEmulator, key: &ServiceAccountKey) -> String {
    let (status, body) = exchange_assertion(gcp, &key.sign(&key.assertion_claims()).unwrap());
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn sts_exchange(gcp: &GcpEmulator, audience: &str, subject_token: &str) -> (u16, Value) {
    post_form(
        gcp,
        "/v1/token",
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("audience", audience),
            ("scope", CLOUD_PLATFORM),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("subject_token", subject_token),
        ],
    )
}

fn generate_access_token(gcp: &GcpEmulator, email: &str, bearer: &str) -> (u16, Value) {
    let path = format!("/v1/projects/-/serviceAccounts/{email}:generateAccessToken");
    let headers = format!("Authorization: Bearer {bearer}\r\nContent-Type: application/json\r\n");
    post(gcp.port(), &path, &headers, &json!({ "scope": [CLOUD_PLATFORM], "lifetime": "3600s" }).to_string())
}

fn error_of(body: &Value) -> (&str, &str) {
    (body["error"].as_str().unwrap_or("?"), body["error_description"].as_str().unwrap_or("?"))
}

fn assert_refused(what: &str, (status, body): (u16, Value), error: &str, description: &str) {
    assert_eq!(status, 400, "{what}: {body}");
    let (e, d) = error_of(&body);
    assert_eq!(e, error, "{what}: {body}");
    assert!(d.contains(description), "{what}: {body}");
}

#[test]
fn key_jwt_bearer_grant_checks_signature_audience_time_and_scope() {
    let gcp = GcpEmulator::start().unwrap();
    let key = gcp.create_service_account_key(PULLER).unwrap();
    let other = gcp.create_service_account_key("other@regcred-test.iam.gserviceaccount.com").unwrap();
    assert!(key.json.contains("\"type\":\"service_account\""), "{}", key.json);
    assert_eq!(key.token_uri, gcp.token_uri());

    let (status, body) = exchange_assertion(&gcp, &key.sign(&key.assertion_claims()).unwrap());
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().unwrap().starts_with("ya29."), "{body}");
    assert_eq!((body["expires_in"].as_u64(), body["token_type"].as_str()), (Some(3600), Some("Bearer")));

    // Signed by another account's key under this key's id and email.
    let forged = ServiceAccountKey { private_key: other.private_key.clone(), ..key.clone() };
    assert_refused(
        "wrong signature",
        exchange_assertion(&gcp, &forged.sign(&key.assertion_claims()).unwrap()),
        "invalid_grant",
        "Invalid JWT Signature",
    );
    let with = |changes: Value| {
        let mut claims = key.assertion_claims();
        claims.as_object_mut().unwrap().extend(changes.as_object().unwrap().clone());
        exchange_assertion(&gcp, &key.sign(&claims).unwrap())
    };
    let audience = "https://oauth2.googleapis.com/token";
    assert_refused("wrong aud", with(json!({ "aud": audience })), "invalid_grant", "audience");
    let t = now();
    let expired = json!({ "iat": t - 7200, "exp": t - 3600 });
    assert_refused("expired", with(expired), "invalid_grant", "short-lived");
    assert_refused("too long", with(json!({ "exp": t + 7200 })), "invalid_grant", "short-lived");
    assert_refused("from the future", with(json!({ "iat": t + 600, "exp": t + 1200 })), "invalid_grant", "short-lived");
    let no_scope = with(json!({ "scope": "https://www.googleapis.com/auth/devstorage.read_only" }));
    assert_refused("missing scope", no_scope, "invalid_scope", "scope");
    let grant_type = post_form(&gcp, "/token", &[("grant_type", "client_credentials")]);
    assert_refused("grant type", grant_type, "unsupported_grant_type", "grant_type");

    gcp.delete_service_account_key(&key).unwrap();
    let deleted = exchange_assertion(&gcp, &key.sign(&key.assertion_claims()).unwrap());
    assert_refused("deleted key", deleted, "invalid_grant", "account not found");

    let statuses: Vec<_> = gcp.calls().unwrap().iter().map(|c| c["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [200, 400, 400, 400, 400, 400, 400, 400, 400]);
    assert_eq!(gcp.counts().unwrap()["oauth:token"], 9);
}

/// A namespace with a ServiceAccount `app`; returns its subject.
async fn service_account(client: &kube::Client, namespace: &str) -> String {
    let meta = |name: &str| ObjectMeta { name: Some(name.into()), ..Default::default() };
    let ns = Namespace { metadata: meta(namespace), ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
    let sa = ServiceAccount { metadata: meta("app"), ..Default::default() };
    Api::<ServiceAccount>::namespaced(client.clone(), namespace).create(&PostParams::default(), &sa).await.unwrap();
    format!("system:serviceaccount:{namespace}:app")
}

/// A token for `namespace`'s ServiceAccount `app` from the apiserver's TokenRequest.
async fn token_request(client: &kube::Client, namespace: &str, audience: &str) -> String {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let resp = api.create_token_request("app", &PostParams::default(), &req).await.unwrap();
    resp.status.unwrap().token
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos())[6..])
}

fn provider(cp: &ControlPlane, id: &str, tenant: &str) -> WorkloadIdentityProvider {
    let mut p =
        WorkloadIdentityProvider::new("123456789012", "regcred", id, ISSUER, cp.service_account_jwks().unwrap());
    p.condition = AttributeCondition::SubjectPrefix(format!("system:serviceaccount:{tenant}:"));
    p
}

#[tokio::test]
async fn sts_verifies_kubernetes_service_account_tokens() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let (tenant, stranger) = (unique("gcp-tenant"), unique("gcp-stranger"));
    let subject = service_account(&client, &tenant).await;
    service_account(&client, &stranger).await;
    let gcp = GcpEmulator::start().unwrap();
    let wif = provider(cp, "kubernetes", &tenant);
    gcp.add_provider(&wif).unwrap();

    let token = token_request(&client, &tenant, &wif.audience()).await;
    let (status, body) = sts_exchange(&gcp, &wif.audience(), &token);
    assert_eq!(status, 200, "{body}");
    assert!(body["access_token"].as_str().unwrap().starts_with("ya29.d."), "{body}");
    assert_eq!(body["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((500..=600).contains(&expires_in), "capped by the Kubernetes token's 600 s: {body}");
    let call = gcp.calls().unwrap().pop().unwrap();
    assert_eq!(call["identity"], wif.principal(&subject), "{call}");

    // The https:// form of the provider's name is a default audience too.
    let https = wif.audience().replace("//iam.googleapis.com/", "https://iam.googleapis.com/");
    let token = token_request(&client, &tenant, &https).await;
    assert_eq!(sts_exchange(&gcp, &wif.audience(), &token).0, 200);

    let wrong_audience = token_request(&client, &tenant, "https://example.com").await;
    let refused = sts_exchange(&gcp, &wif.audience(), &wrong_audience);
    assert_refused("wrong audience", refused, "invalid_grant", "audience");

    // The same, valid token at a provider that trusts another issuer.
    let mut elsewhere = provider(cp, "elsewhere", &tenant);
    elsewhere.issuer = "https://issuer.example.com".into();
    gcp.add_provider(&elsewhere).unwrap();
    let token = token_request(&client, &tenant, &elsewhere.audience()).await;
    assert_refused("another issuer", sts_exchange(&gcp, &elsewhere.audience(), &token), "invalid_grant", "issuer");

    // The apiserver's token with a payload of our own: its signature no longer holds.
    let token = token_request(&client, &tenant, &wif.audience()).await;
    let parts: Vec<&str> = token.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["exp"] = json!(now() + 86400);
    let tampered = format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2]);
    assert_refused("tampered", sts_exchange(&gcp, &wif.audience(), &tampered), "invalid_grant", "signature");
    // Right claims and kid, signed by a key that is not the apiserver's (an RSA key, where its own is EC).
    let kid: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    let mut forger = gcp.create_service_account_key("forger@regcred-test.iam.gserviceaccount.com").unwrap();
    forger.private_key_id = kid["kid"].as_str().unwrap().into();
    let forged = forger.sign(&claims).unwrap();
    assert_refused("forged", sts_exchange(&gcp, &wif.audience(), &forged), "invalid_grant", "signature");

    // Verified, but another namespace's ServiceAccount: the attribute condition says no.
    let token = token_request(&client, &stranger, &wif.audience()).await;
    let refused = sts_exchange(&gcp, &wif.audience(), &token);
    assert_eq!(refused.0, 400, "{}", refused.1);
    assert_eq!(
        error_of(&refused.1),
        ("unauthorized_client", "The given credential is rejected by the attribute condition.")
    );

    let unknown = wif.audience().replace("/providers/kubernetes", "/providers/nope");
    let token = token_request(&client, &tenant, &unknown).await;
    assert_refused("unknown provider", sts_exchange(&gcp, &unknown, &token), "invalid_target", "audience");
}

#[tokio::test]
async fn generate_access_token_needs_an_iam_binding() {
    let cp = ControlPlane::shared();
    let client = cp.client().await;
    let (tenant, other) = (unique("gcp-impersonate"), unique("gcp-impersonate-other"));
    let subject = service_account(&client, &tenant).await;
    service_account(&client, &other).await;
    let gcp = GcpEmulator::start().unwrap();
    let mut wif = provider(cp, "kubernetes", &tenant);
    wif.condition = AttributeCondition::Any;
    gcp.add_provider(&wif).unwrap();
    gcp.create_service_account_key(PULLER).unwrap();
    let federated = |namespace: String| {
        let (client, gcp, audience) = (&client, &gcp, wif.audience());
        async move {
            let (status, body) = sts_exchange(gcp, &audience, &token_request(client, &namespace, &audience).await);
            assert_eq!(status, 200, "{body}");
            body["access_token"].as_str().unwrap().to_owned()
        }
    };
    let token = federated(tenant.clone()).await;

    let (status, body) = generate_access_token(&gcp, PULLER, &token);
    assert_eq!(status, 403, "no binding yet: {body}");
    assert_eq!(body["error"]["status"], "PERMISSION_DENIED");
    // The wrong role is no binding either.
    gcp.bind(PULLER, TOKEN_CREATOR, &wif.principal(&subject)).unwrap();
    assert_eq!(generate_access_token(&gcp, PULLER, &token).0, 403);

    gcp.bind(PULLER, WORKLOAD_IDENTITY_USER, &wif.principal(&subject)).unwrap();
    let (status, body) = generate_access_token(&gcp, PULLER, &token);
    assert_eq!(status, 200, "{body}");
    let access = body["accessToken"].as_str().unwrap();
    assert!(access.starts_with("ya29.c."), "{body}");
    assert!(body["expireTime"].as_str().unwrap().ends_with('Z'), "{body}");
    assert_eq!(gcp.calls().unwrap().pop().unwrap()["identity"], wif.principal(&subject));

    // Bound to one subject: another ServiceAccount of the pool is refused, until the whole pool is bound.
    let other_token = federated(other).await;
    assert_eq!(generate_access_token(&gcp, PULLER, &other_token).0, 403);
    gcp.bind(PULLER, WORKLOAD_IDENTITY_USER, &wif.principal_set()).unwrap();
    assert_eq!(generate_access_token(&gcp, PULLER, &other_token).0, 200);

    // A service account impersonating another needs Token Creator on it.
    let pusher = gcp.create_service_account_key(PUSHER).unwrap();
    assert_eq!(generate_access_token(&gcp, PULLER, &access_token(&gcp, &pusher)).0, 403);
    gcp.bind(PULLER, TOKEN_CREATOR, &format!("serviceAccount:{PUSHER}")).unwrap();
    assert_eq!(generate_access_token(&gcp, PULLER, &access_token(&gcp, &pusher)).0, 200);

    // Only live tokens this emulator issued.
    gcp.revoke(&token).unwrap();
    let (status, body) = generate_access_token(&gcp, PULLER, &token);
    assert_eq!((status, body["error"]["status"].as_str()), (401, Some("UNAUTHENTICATED")), "{body}");
    assert_eq!(generate_access_token(&gcp, PULLER, "ya29.made-up").0, 401);
    let missing = "missing@regcred-test.iam.gserviceaccount.com";
    assert_eq!(generate_access_token(&gcp, missing, &other_token).0, 403);
}

#[test]
fn metadata_server_needs_the_metadata_flavor_header() {
    let gcp = GcpEmulator::start().unwrap();
    gcp.set_metadata_identity(PULLER).unwrap();
    let port = gcp.metadata_port();
    let token_path = "/computeMetadata/v1/instance/service-accounts/default/token";

    let (status, body) = http_request(port, "GET", token_path, "", b"").unwrap();
    assert_eq!(status, 403, "{body}");
    let proxied = "Metadata-Flavor: Google\r\nX-Forwarded-For: 10.0.0.1\r\n";
    assert_eq!(http_request(port, "GET", token_path, proxied, b"").unwrap().0, 403);

    let flavor = "Metadata-Flavor: Google\r\n";
    let (status, body) = http_request(port, "GET", token_path, flavor, b"").unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["access_token"].as_str().unwrap().starts_with("ya29.c."), "{body}");
    assert_eq!((body["token_type"].as_str(), body["expires_in"].as_u64().is_some()), (Some("Bearer"), true));
    let email = "/computeMetadata/v1/instance/service-accounts/default/email";
    assert_eq!(http_request(port, "GET", email, flavor, b"").unwrap(), (200, PULLER.to_owned()));

    let counts = gcp.counts().unwrap();
    assert_eq!((counts["metadata:token"], counts["metadata:email"]), (3, 1));
}

#[test]
fn faults_make_an_endpoint_unavailable_until_cleared() {
    let gcp = GcpEmulator::start().unwrap();
    let key = gcp.create_service_account_key(PULLER).unwrap();
    gcp.fail("oauth:token", Some(503)).unwrap();
    let (status, body) = exchange_assertion(&gcp, &key.sign(&key.assertion_claims()).unwrap());
    assert_eq!((status, body["error"]["status"].as_str()), (503, Some("UNAVAILABLE")), "{body}");
    gcp.fail("oauth:token", None).unwrap();
    access_token(&gcp, &key);
    let calls = gcp.calls().unwrap();
    let statuses: Vec<_> =
        calls.iter().map(|c| (c["endpoint"].as_str().unwrap(), c["status"].as_u64().unwrap())).collect();
    assert_eq!(statuses, [("oauth:token", 503), ("oauth:token", 200)]);
    assert_eq!(calls[1]["identity"], PULLER);
    gcp.reset().unwrap();
    assert!(gcp.calls().unwrap().is_empty());
}

/// The realm's answer to `oauth2accesstoken:<token>` for pulling `repository`.
fn realm_status(gcp: &GcpEmulator, repository: &str, token: &str) -> u16 {
    let realm = gcp.token_realm();
    let path = format!("/v2/token?service={}&scope=repository:{repository}:pull", realm.service);
    http_get_basic_auth(gcp.port(), &path, "oauth2accesstoken", token).unwrap().0
}

#[test]
fn crane_pulls_through_the_realm_with_live_access_tokens_only() {
    let gcp = GcpEmulator::start().unwrap();
    let reg = Registry::start_with_token_realm(&gcp.token_realm()).unwrap();
    // The realm is HTTPS, and so is the registry: crane trusts both CAs and nothing else.
    assert!(gcp.token_realm().realm.starts_with("https://localhost:"), "{}", gcp.token_realm().realm);
    assert!(reg.url().starts_with("https://"), "{}", reg.url());
    let host = reg.host();
    let pusher = gcp.create_service_account_key(PUSHER).unwrap();
    gcp.grant(PUSHER, "regcred-test/team", &["pull", "push"]).unwrap();
    let image =
        reg.push_test_image("regcred-test/team/app", "v1", "oauth2accesstoken", &access_token(&gcp, &pusher)).unwrap();

    // The puller has the default: pull in its own project.
    let puller = gcp.create_service_account_key(PULLER).unwrap();
    let token = access_token(&gcp, &puller);
    reg.pull_with_auth_file(&image, &docker_config_json(&host, "oauth2accesstoken", &token)).unwrap();
    reg.pull_with_auth_file(&image, &docker_config_json(&host, "_json_key", &puller.json)).unwrap();
    assert!(reg.push_test_image("regcred-test/team/app", "v2", "oauth2accesstoken", &token).is_err(), "pull only");
    let stranger = gcp.create_service_account_key("app@elsewhere.iam.gserviceaccount.com").unwrap();
    let config = docker_config_json(&host, "oauth2accesstoken", &access_token(&gcp, &stranger));
    reg.pull_with_auth_file(&image, &config).unwrap_err();
    let made_up = docker_config_json(&host, "oauth2accesstoken", "ya29.c.made-up");
    let err = reg.pull_with_auth_file(&image, &made_up).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{err:#}");
    let mut forged: Value = serde_json::from_str(&puller.json).unwrap();
    forged["private_key"] = stranger.private_key.clone().into();
    reg.pull_with_auth_file(&image, &docker_config_json(&host, "_json_key", &forged.to_string())).unwrap_err();

    gcp.revoke(&token).unwrap();
    let err = reg.pull_with_auth_file(&image, &docker_config_json(&host, "oauth2accesstoken", &token)).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "revoked: {err:#}");

    gcp.set_token_lifetime(5).unwrap();
    let short = access_token(&gcp, &puller);
    let config = docker_config_json(&host, "oauth2accesstoken", &short);
    reg.pull_with_auth_file(&image, &config).unwrap();
    wait_for("the token to expire", Duration::from_secs(20), || {
        (realm_status(&gcp, "regcred-test/team/app", &short) == 401).then_some(())
    })
    .unwrap();
    let err = reg.pull_with_auth_file(&image, &config).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "expired: {err:#}");
}
