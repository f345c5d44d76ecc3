//! The leak scan at the most verbose level: a controller at `RUST_LOG=trace` (regcred and every
//! dependency: kube, hyper, rustls, the AWS SDK, reqwest) through every source kind, an ECR
//! rotation, IRSA, Google access tokens from a key and through Workload Identity Federation,
//! ACR refresh tokens from a service principal and through Azure workload identity, a
//! registry check and a failure, then its whole log searched for every secret value, its base64 forms
//! (as a Secret's JSON carries them), any JWT (ServiceAccount tokens, the controller's own
//! included) and any raw AWS response body.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use regcred_testenv::{
    AttributeCondition, AwsEmulator, AzureEmulator, GcpEmulator, ISSUER, Registry, WorkloadIdentityProvider,
};
use serde_json::json;

use crate::support::*;

const REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
const ACR: &str = "regcredtrace.azurecr.io";

/// Records `value` and the base64 form a Secret's `data` carries it in.
fn record_with_base64(value: &str) {
    record_secret(value);
    record_secret(&STANDARD.encode(value));
}

#[tokio::test]
async fn nothing_secret_is_logged_at_trace() {
    let client = client().await;
    // 30-second ECR tokens: one rotation about 22 s in.
    let aws = AwsEmulator::start_with_lifetime(30).expect("AWS emulator");
    let gcp = GcpEmulator::start().expect("Google emulator");
    let azure = AzureEmulator::start().expect("Azure emulator");
    let name = format!("trace-{}", &unique()[..6]);
    let (sts, token_uri, google) = (gcp.sts_url(), gcp.token_uri(), gcp.url());
    let (authority, imds) = (azure.authority(), azure.imds_endpoint());
    let _controller = spawn_controller(
        env().cp,
        &name,
        &format!("{CONTROLLER_LABEL}={name}"),
        &aws.endpoint(),
        &[
            "--log-format",
            "json",
            "--gcp-sts-url",
            &sts,
            "--gcp-iam-credentials-url",
            &google,
            "--gcp-token-uri",
            &token_uri,
            "--azure-authority-host",
            &authority,
            "--azure-imds-endpoint",
            &imds,
        ],
        &[
            ("RUST_LOG", "trace".into()),
            // The ACR host through the emulator's proxy, its CA trusted.
            ("HTTPS_PROXY", azure.proxy_url()),
            ("NO_PROXY", "127.0.0.1,localhost".into()),
            ("SSL_CERT_FILE", azure.ca_file().display().to_string()),
        ],
    );
    let ns = namespace(&client, "trace").await;

    let password = format!("pä:ss-{}", secret_value("u", "trace"));
    record_with_base64(&password);
    record_secret(&STANDARD.encode(format!("u:{password}")));
    let token = secret_value("octocat", "ghp");
    record_with_base64(&token);
    let private_key = secret_value("_json_key", "MIIEv");
    let key = format!(
        "{{\"type\": \"service_account\", \"project_id\": \"p\", \"client_email\": \"puller@p.iam.gserviceaccount.com\", \"private_key\": \"-----BEGIN PRIVATE KEY-----\\n{private_key}\\n-----END PRIVATE KEY-----\\n\"}}"
    );
    record_with_base64(&key);
    create_secret(&client, &ns, "pass", &[("password", password.as_bytes())]).await;
    create_secret(&client, &ns, "pat", &[("token", token.as_bytes())]).await;
    create_secret(&client, &ns, "gcp", &[("key.json", key.as_bytes())]).await;
    create_aws_keys(&client, &aws, &ns, "aws", "trace").await;
    irsa_account(&client, &aws, &ns, "puller").await;
    // Google: a real key (its assertion is a JWT) and Workload Identity Federation with
    // impersonation (a ServiceAccount token, a federated token, an access token).
    let google_key = gcp.create_service_account_key("trace@regcred-test.iam.gserviceaccount.com").unwrap();
    for line in google_key.private_key.lines().filter(|l| !l.starts_with("-----")) {
        record_secret(line);
    }
    create_secret(&client, &ns, "google-key", &[("key.json", google_key.json.as_bytes())]).await;
    let jwks = env().cp.service_account_jwks().unwrap();
    let mut provider =
        WorkloadIdentityProvider::new("123456789012", "trace-pool", &format!("t-{}", &unique()[..8]), ISSUER, jwks);
    provider.condition = AttributeCondition::SubjectPrefix(format!("system:serviceaccount:{ns}:"));
    gcp.add_provider(&provider).unwrap();
    let target = "trace-target@regcred-test.iam.gserviceaccount.com";
    gcp.create_service_account_key(target).unwrap();
    let principal = provider.principal(&format!("system:serviceaccount:{ns}:puller"));
    gcp.bind(target, "roles/iam.workloadIdentityUser", &principal).unwrap();

    // Azure: a service principal's client secret, and workload identity (a ServiceAccount
    // token as the client assertion); Entra tokens and ACR refresh tokens are JWTs.
    let acr_upstream = Registry::start(&[("u", &password)]).expect("registry");
    azure.add_registry(ACR, &acr_upstream, "u", &password).unwrap();
    azure.add_issuer(ISSUER, &env().cp.service_account_jwks().unwrap()).unwrap();
    let (tenant, sp_id, wi_id) = (
        "7a1e2b3c-0000-4000-8000-00000000a2e1",
        "5e5e5e5e-0000-4000-8000-000000000001",
        "5e5e5e5e-0000-4000-8000-000000000002",
    );
    let client_secret = format!("cs~{}", secret_value("sp", "trace-client-secret"));
    record_with_base64(&client_secret);
    azure.add_app(tenant, sp_id, Some(&client_secret)).unwrap();
    azure.add_app(tenant, wi_id, None).unwrap();
    azure.add_federated_credential(tenant, wi_id, ISSUER, &format!("system:serviceaccount:{ns}:puller")).unwrap();
    for id in [sp_id, wi_id] {
        azure.assign_role(id, ACR, "AcrPull").unwrap();
    }
    create_secret(&client, &ns, "sp", &[("clientSecret", client_secret.as_bytes())]).await;

    let credentials = [
        (
            "basic",
            json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "pass"}}}}),
        ),
        ("ghcr", json!({"source": {"ghcr": {"username": "octocat", "tokenSecretRef": {"name": "pat"}}}})),
        (
            "gcr",
            json!({"registry": "europe-docker.pkg.dev", "source": {"gcr": {"jsonKeySecretRef": {"name": "gcp"}, "login": "JsonKey"}}}),
        ),
        ("keys", json!({"source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws"}}}}})),
        ("irsa", json!({"source": {"ecr": {"registry": REGISTRY, "auth": {"serviceAccountRef": {"name": "puller"}}}}})),
        (
            "gar-key",
            json!({"registry": "europe-docker.pkg.dev", "source": {"gcr": {"jsonKeySecretRef": {"name": "google-key"}}}}),
        ),
        (
            "gar-wif",
            json!({"registry": "europe-docker.pkg.dev", "source": {"gcr": {
                "workloadIdentity": {"serviceAccountRef": {"name": "puller"}, "audience": provider.audience()},
                "impersonate": {"serviceAccount": target}}}}),
        ),
        (
            "acr-sp",
            json!({"source": {"acr": {"registry": ACR, "authorityHost": authority,
                "servicePrincipal": {"tenantId": tenant, "clientId": sp_id, "clientSecretRef": {"name": "sp"}}}}}),
        ),
        (
            "acr-wi",
            json!({"source": {"acr": {"registry": ACR, "authorityHost": authority,
                "workloadIdentity": {"serviceAccountRef": {"name": "puller"}, "clientId": wi_id, "tenantId": tenant}}}}),
        ),
    ];
    for (credential, spec) in credentials {
        create_credential_for(&client, &ns, credential, Some(&name), spec).await;
    }
    // A registry check (Basic) against a real registry: the login goes out in a header.
    let registry = Registry::start(&[("u", &password)]).expect("registry");
    let checked = json!({"registry": registry.host(), "verify": {"insecure": true},
                         "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "pass"}}}});
    create_credential_for(&client, &ns, "verified", Some(&name), checked).await;
    // And one through a token server: its token (a JWT) must not be logged either.
    let options = regcred_testenv::RegistryOptions { token_auth: true, ..Default::default() };
    let token_registry = Registry::start_with(&[("u", &password)], options).expect("token registry");
    let tokened = json!({"registry": token_registry.host(), "verify": {"insecure": true},
                         "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "pass"}}}});
    create_credential_for(&client, &ns, "tokened", Some(&name), tokened).await;
    let broken = json!({"registry": "r.example.com", "source": {"basic": {"username": "u", "passwordSecretRef": {"name": "missing"}}}});
    create_credential_for(&client, &ns, "broken", Some(&name), broken).await;
    for credential in ["basic", "ghcr", "gcr", "keys", "irsa", "gar-key", "gar-wif", "acr-sp", "acr-wi"] {
        wait_ready(&client, &ns, credential, "True", Some("Synced")).await;
    }
    // Every token Google issued (access and federated).
    for token in gcp.tokens().expect("Google tokens").keys() {
        record_secret(token);
    }
    // Every token Azure issued (Entra tokens and refresh tokens).
    let azure_tokens = azure.tokens().expect("Azure tokens");
    assert!(azure_tokens.values().filter(|t| t["kind"] == "refresh").count() >= 2, "{azure_tokens:?}");
    for token in azure_tokens.keys() {
        record_secret(token);
    }
    wait_ready(&client, &ns, "broken", "False", Some("SourceSecretNotFound")).await;
    crate::verify::wait_verified(&client, &ns, "verified", "True", "Verified").await;
    crate::verify::wait_verified(&client, &ns, "tokened", "True", "Verified").await;

    // A rotation: the Secret holds a second token from the emulator.
    let issued = |aws: &AwsEmulator| -> Vec<String> {
        let calls = aws.calls().expect("emulator calls");
        calls
            .iter()
            .filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200)
            .filter_map(|c| c["authorizationData"][0]["authorizationToken"].as_str().map(String::from))
            .collect()
    };
    let rotated = regcred_testenv::wait_for("a rotated ECR token", Duration::from_secs(60), || {
        let tokens = issued(&aws);
        (tokens.len() >= 3).then_some(tokens)
    })
    .expect("the ECR tokens were not rotated");
    for token in &rotated {
        record_secret(token);
        let decoded = String::from_utf8(STANDARD.decode(token).expect("base64")).expect("UTF-8");
        record_secret(decoded.strip_prefix("AWS:").expect("AWS:password"));
    }
    // Everything in flight has been logged once the controller made its last write.
    wait_ready(&client, &ns, "keys", "True", Some("Synced")).await;

    let log = std::fs::read_to_string(controller_log_path(env().cp, &name)).expect("the controller's log");
    // Trace was on for regcred and its dependencies: their TRACE lines are there.
    let traced: std::collections::BTreeSet<String> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["level"] == "TRACE")
        .filter_map(|line| line["target"].as_str().and_then(|t| t.split("::").next()).map(String::from))
        .collect();
    for target in ["hyper_util", "kube_client", "kube_runtime", "tower", "rustls", "aws_runtime", "reqwest"] {
        assert!(traced.contains(target), "no TRACE line of {target}: {traced:?}");
    }
    let used = used_secrets().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let leaked: Vec<_> = used.iter().filter(|v| log.contains(v.as_str())).map(|v| &v[..6.min(v.len())]).collect();
    assert!(leaked.is_empty(), "{} secret values in the trace log (first characters: {leaked:?})", leaked.len());
    // A JWT (base64url JSON header, then payload): a ServiceAccount token, the controller's
    // own or one minted for IRSA, or a registry's bearer token.
    assert!(!has_jwt(&log), "a JWT in the trace log");
    for field in
        ["authorizationToken", "SecretAccessKey>", "SessionToken>", "WebIdentityToken=", "x-amz-security-token:"]
    {
        assert!(!log.contains(field), "an AWS message body with {field} in the trace log");
    }
    for field in ["access_token", "accessToken", "assertion=", "subject_token=", "ya29."] {
        assert!(!log.contains(field), "a Google message body with {field} in the trace log");
    }
    for field in ["refresh_token", "client_secret=", "client_assertion=", "access_token="] {
        assert!(!log.contains(field), "an Entra or ACR message body with {field} in the trace log");
    }
}

/// Whether `text` holds something shaped like a JWT: `eyJ…` (a base64url JSON object), a dot,
/// and another `eyJ…`.
fn has_jwt(text: &str) -> bool {
    let segment = |s: &str| {
        s.len() >= 10 && s.starts_with("eyJ") && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    text.match_indices("eyJ").any(|(at, _)| {
        let rest = &text[at..];
        let mut parts = rest.splitn(3, '.');
        let header = parts.next().unwrap_or_default();
        let payload: String = parts
            .next()
            .unwrap_or_default()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        segment(header) && segment(&payload)
    })
}

#[test]
fn jwt_shapes_are_recognised() {
    assert!(has_jwt(r#"token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ0b2tlbiJ9.c2ln"}"#));
    assert!(!has_jwt("eyJ alone, eyJhbGciOiJIUzI1NiJ9 without a payload"));
}
