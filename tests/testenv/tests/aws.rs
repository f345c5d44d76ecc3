//! The AWS emulator as seen by the real AWS SDK for Rust: ECR tokens that
//! expire and rotate like real ones, counts, injected faults, SigV4 checked like AWS, STS
//! AssumeRole and web identity (real ServiceAccount tokens of the test apiserver) with trust
//! policies, the IMDS and Pod Identity stubs, the default credentials chain
//! configured only by environment variables (in child processes, so that
//! no test mutates this process's environment), and stop/restart.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_config::ecs::EcsCredentialsProvider;
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_ecr::config::retry::RetryConfig;
use aws_sdk_ecr::config::{Credentials, Region};
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use base64::Engine;
use regcred_testenv::{AwsEmulator, ControlPlane, ISSUER, RoleTrust, STS_AUDIENCE};

const GET_TOKEN: &str = "ecr:GetAuthorizationToken";
const STATIC_KEY: &str = "AKIASTATICTEST000001";
const STATIC_SECRET: &str = "static-secret";
const ROLE: &str = "arn:aws:iam::210987654321:role/regcred";
/// The namespace of the ServiceAccounts whose tokens these tests present to STS.
const NS: &str = "testenv-aws";

/// The controller's HTTP client: rustls with ring.
fn http() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .build_https()
}

fn ecr_config(aws: &AwsEmulator, credentials: impl ProvideCredentials + 'static) -> aws_sdk_ecr::config::Builder {
    aws_sdk_ecr::Config::builder()
        .http_client(http())
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .endpoint_url(aws.endpoint())
        .credentials_provider(credentials)
}

fn ecr(aws: &AwsEmulator, credentials: impl ProvideCredentials + 'static) -> aws_sdk_ecr::Client {
    aws_sdk_ecr::Client::from_conf(ecr_config(aws, credentials).build())
}

/// The static key, registered with the emulator as IAM user `static`.
fn static_credentials(aws: &AwsEmulator) -> Credentials {
    aws.add_access_key("static", STATIC_KEY, STATIC_SECRET).unwrap();
    Credentials::new(STATIC_KEY, STATIC_SECRET, None, None, "test")
}

/// A real token of ServiceAccount `NS/name` for STS, the cluster's issuer registered with the
/// emulator as an OIDC provider, and [`ROLE`] trusting that ServiceAccount.
fn web_identity(aws: &AwsEmulator, name: &str) -> String {
    let cp = ControlPlane::shared();
    aws.add_oidc_provider(ISSUER, &cp.service_account_jwks().unwrap()).unwrap();
    aws.add_role(ROLE, &RoleTrust::service_account(ISSUER, NS, name)).unwrap();
    cp.service_account_token(NS, name, &[STS_AUDIENCE], 600).unwrap()
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The password in an ECR authorization token, which is base64("AWS:" + password).
fn password(token: &str) -> String {
    let decoded = base64::engine::general_purpose::STANDARD.decode(token).unwrap();
    String::from_utf8(decoded).unwrap().strip_prefix("AWS:").expect("token is not AWS:<password>").to_owned()
}

fn count(aws: &AwsEmulator, action: &str) -> u64 {
    aws.counts().unwrap().get(action).copied().unwrap_or(0)
}

fn token_calls(aws: &AwsEmulator) -> Vec<serde_json::Value> {
    aws.calls().unwrap().into_iter().filter(|c| c["action"] == GET_TOKEN).collect()
}

#[tokio::test]
async fn ecr_tokens_expire_like_real_ones_and_rotate() {
    let t = Instant::now();
    let aws = AwsEmulator::start().unwrap();
    eprintln!("AwsEmulator::start: {:?}", t.elapsed());
    let client = ecr(&aws, static_credentials(&aws));

    let out = client.get_authorization_token().send().await.unwrap();
    let [data] = out.authorization_data() else { panic!("expected one entry: {out:?}") };
    let expires = data.expires_at().unwrap().secs();
    assert!((expires - (now() + 12 * 3600)).abs() < 60, "expiresAt {expires} is not 12 h from now");
    assert_eq!(data.proxy_endpoint(), Some("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"));
    let first = password(data.authorization_token().unwrap());
    assert_eq!(count(&aws, GET_TOKEN), 1);

    let out = client.get_authorization_token().send().await.unwrap();
    let second = password(out.authorization_data()[0].authorization_token().unwrap());
    assert_ne!(first, second, "the password must change on every call");
    assert_eq!(count(&aws, GET_TOKEN), 2);

    // The record of calls: who signed, and exactly what was handed out.
    let calls = token_calls(&aws);
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in &calls {
        assert_eq!(call["access_key_id"], STATIC_KEY);
        assert_eq!(call["status"], 200);
    }
    assert_eq!(
        calls[1]["authorizationData"][0]["authorizationToken"],
        out.authorization_data()[0].authorization_token().unwrap()
    );
    let recorded = calls[1]["expiresAt"].as_f64().unwrap();
    assert!((recorded - out.authorization_data()[0].expires_at().unwrap().as_secs_f64()).abs() < 0.01);

    // Several registries: one entry each, with its own endpoint and password.
    // (registryIds is deprecated, since one token now serves every registry
    // the caller may access, but ECR still honours it.)
    #[allow(deprecated)]
    let out = client
        .get_authorization_token()
        .registry_ids("111111111111")
        .registry_ids("222222222222")
        .send()
        .await
        .unwrap();
    let endpoints: Vec<_> = out.authorization_data().iter().map(|d| d.proxy_endpoint().unwrap()).collect();
    assert_eq!(
        endpoints,
        [
            "https://111111111111.dkr.ecr.eu-west-1.amazonaws.com",
            "https://222222222222.dkr.ecr.eu-west-1.amazonaws.com"
        ]
    );
    let passwords: Vec<_> =
        out.authorization_data().iter().map(|d| password(d.authorization_token().unwrap())).collect();
    assert_ne!(passwords[0], passwords[1]);
    assert_eq!(count(&aws, GET_TOKEN), 3);

    aws.set_token_lifetime(900).unwrap();
    let out = client.get_authorization_token().send().await.unwrap();
    let expires = out.authorization_data()[0].expires_at().unwrap().secs();
    assert!((expires - (now() + 900)).abs() < 60, "expiresAt {expires} is not 15 min from now");

    aws.reset().unwrap();
    assert_eq!(aws.counts().unwrap(), BTreeMap::new());
    assert!(aws.calls().unwrap().is_empty());
}

#[tokio::test]
async fn token_lifetime_is_set_at_start() {
    let aws = AwsEmulator::start_with_lifetime(120).unwrap();
    let out = ecr(&aws, static_credentials(&aws)).get_authorization_token().send().await.unwrap();
    let expires = out.authorization_data()[0].expires_at().unwrap().secs();
    assert!((expires - (now() + 120)).abs() < 30, "expiresAt {expires} is not 2 min from now");
}

#[tokio::test]
async fn injected_faults_reach_the_sdk() {
    let aws = AwsEmulator::start().unwrap();
    let client = ecr(&aws, static_credentials(&aws));

    aws.fail(GET_TOKEN, Some("AccessDeniedException")).unwrap();
    let err = client.get_authorization_token().send().await.unwrap_err();
    assert!(matches!(err, SdkError::ServiceError(_)), "{err:?}");
    assert_eq!(err.code(), Some("AccessDeniedException"), "{err:?}");
    assert_eq!(count(&aws, GET_TOKEN), 1, "not retried");
    let calls = token_calls(&aws);
    assert_eq!((&calls[0]["status"], &calls[0]["error"]), (&400.into(), &"AccessDeniedException".into()));

    aws.fail(GET_TOKEN, None).unwrap();
    client.get_authorization_token().send().await.unwrap();
    assert_eq!(count(&aws, GET_TOKEN), 2);

    // A server error is retried by the SDK: each attempt counts.
    aws.fail_with_status(GET_TOKEN, Some("ServerException"), 500).unwrap();
    let retry = RetryConfig::standard().with_max_attempts(2).with_initial_backoff(Duration::from_millis(1));
    let retrying =
        aws_sdk_ecr::Client::from_conf(ecr_config(&aws, static_credentials(&aws)).retry_config(retry).build());
    let err = retrying.get_authorization_token().send().await.unwrap_err();
    assert_eq!(err.code(), Some("ServerException"), "{err:?}");
    assert_eq!(count(&aws, GET_TOKEN), 4);

    // STS speaks XML; its errors must parse too.
    aws.fail("sts:AssumeRoleWithWebIdentity", Some("InvalidIdentityToken")).unwrap();
    let err = sts(&aws)
        .assume_role_with_web_identity()
        .role_arn(ROLE)
        .role_session_name("regcred")
        .web_identity_token("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("InvalidIdentityToken"), "{err:?}");
}

fn sts(aws: &AwsEmulator) -> aws_sdk_sts::Client {
    // No credentials: AssumeRoleWithWebIdentity is unsigned.
    aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::Config::builder()
            .http_client(http())
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("eu-west-1"))
            .endpoint_url(aws.endpoint())
            .build(),
    )
}

#[tokio::test]
async fn web_identity_credentials_sign_ecr_calls() {
    let aws = AwsEmulator::start().unwrap();
    let jwt = web_identity(&aws, "signer");
    let out = sts(&aws)
        .assume_role_with_web_identity()
        .role_arn(ROLE)
        .role_session_name("regcred")
        .web_identity_token(jwt)
        .send()
        .await
        .unwrap();
    let c = out.credentials().unwrap();
    assert!(c.access_key_id().starts_with("ASIA"), "{c:?}");
    let creds = Credentials::new(c.access_key_id(), c.secret_access_key(), Some(c.session_token().into()), None, "sts");

    let out = ecr(&aws, creds).get_authorization_token().send().await.unwrap();
    // moto ties the assumed role's keys to the role's account.
    assert_eq!(
        out.authorization_data()[0].proxy_endpoint(),
        Some("https://210987654321.dkr.ecr.eu-west-1.amazonaws.com")
    );
    assert_eq!(token_calls(&aws)[0]["access_key_id"], c.access_key_id());
    let calls = aws.calls().unwrap();
    assert_eq!(calls[0]["action"], "sts:AssumeRoleWithWebIdentity");
    assert_eq!(calls[0]["access_key_id"], serde_json::Value::Null, "unsigned");
    assert_eq!(calls[0]["sub"], format!("system:serviceaccount:{NS}:signer"));
    assert_eq!(calls[0]["role_arn"], ROLE);
    assert_eq!(token_calls(&aws)[0]["caller"], "arn:aws:sts::210987654321:assumed-role/regcred/regcred");
}

#[tokio::test]
async fn imds_stub_serves_aws_config() {
    let aws = AwsEmulator::start().unwrap();
    let config = aws_config::provider_config::ProviderConfig::without_region().with_http_client(http());
    let imds = aws_config::imds::Client::builder().configure(&config).endpoint(aws.imds_endpoint()).unwrap().build();
    let provider = ImdsCredentialsProvider::builder().configure(&config).imds_client(imds).build();
    let creds = provider.provide_credentials().await.unwrap();
    assert!(creds.access_key_id().starts_with("AKIAIMDS"), "{creds:?}");
    assert!(creds.session_token().is_some());
    let ttl = creds.expiry().unwrap().duration_since(SystemTime::now()).unwrap();
    assert!(ttl > Duration::from_secs(3000), "expires in {ttl:?}");
    let counts = aws.counts().unwrap();
    assert_eq!((counts["imds:Token"], counts["imds:RoleName"], counts["imds:Credentials"]), (1, 1, 1));

    ecr(&aws, provider).get_authorization_token().send().await.unwrap();
    let signer = token_calls(&aws)[0]["access_key_id"].as_str().unwrap().to_owned();
    assert!(signer.starts_with("AKIAIMDS"), "{signer}");

    // IMDSv2 only: no session token, no metadata.
    let port: u16 = aws.imds_endpoint().rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(raw_status(port, "GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n"), 401);
    assert_eq!(raw_status(port, "PUT /latest/api/token HTTP/1.0\r\n\r\n"), 400, "TTL header is required");
}

fn raw_status(port: u16, request: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const CHILD: &str = "REGCRED_AWS_TEST_CHILD";

/// Not a test on its own: the body that [`run_child`] runs in a child
/// process with a given environment. Loads config the way the controller
/// does (`aws_config::defaults`) and gets an ECR token; if Pod Identity is
/// configured, also prints the key the ECS provider on its own yields.
#[tokio::test]
async fn child_process_entry() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let conf = aws_config::defaults(BehaviorVersion::latest()).http_client(http()).load().await;
    if std::env::var_os("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some() {
        let config = aws_config::provider_config::ProviderConfig::without_region().with_http_client(http());
        let creds = EcsCredentialsProvider::builder().configure(&config).build().provide_credentials().await.unwrap();
        println!("ecs-provider={}", creds.access_key_id());
    }
    aws_sdk_ecr::Client::new(&conf).get_authorization_token().send().await.unwrap();
}

/// Runs [`child_process_entry`] with exactly `env` (plus an empty HOME, so no
/// ~/.aws leaks in); returns whether it succeeded and its output.
fn run_child(env: &[(&str, String)]) -> (bool, String) {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["child_process_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env("HOME", home.path())
        .env(CHILD, "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The value printed by the child as `key=value` (libtest may have put
/// `test child_process_entry ... ` in front of it).
fn printed<'a>(output: &'a str, key: &str) -> &'a str {
    let pat = format!("{key}=");
    let value = output.split_whitespace().find_map(|w| w.strip_prefix(pat.as_str()));
    value.unwrap_or_else(|| panic!("no {key} in:\n{output}"))
}

/// Runs the child with `env`; asserts that it got one ECR token, signed
/// with a key starting with `prefix`. Returns the child's output.
fn assert_child_uses(aws: &AwsEmulator, env: &[(&str, String)], prefix: &str) -> String {
    aws.reset().unwrap();
    let (ok, output) = run_child(env);
    assert!(ok, "child failed:\n{output}");
    let calls = token_calls(aws);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let key = calls[0]["access_key_id"].as_str().unwrap();
    assert!(key.starts_with(prefix), "{key} does not start with {prefix}");
    output
}

#[test]
fn default_chain_picks_each_ambient_source_from_env() {
    let aws = AwsEmulator::start().unwrap();
    let s = |v: &str| v.to_owned();
    let endpoint = ("AWS_ENDPOINT_URL", aws.endpoint());
    let region = ("AWS_REGION", s("eu-west-1"));

    // Static keys from the environment.
    static_credentials(&aws);
    let env = [
        ("AWS_ACCESS_KEY_ID", s(STATIC_KEY)),
        ("AWS_SECRET_ACCESS_KEY", s(STATIC_SECRET)),
        region.clone(),
        endpoint.clone(),
    ];
    assert_child_uses(&aws, &env, STATIC_KEY);

    // IRSA: web identity token file + role, via STS at AWS_ENDPOINT_URL.
    let token_file = aws.web_identity_token_file(&web_identity(&aws, "chain")).unwrap().display().to_string();
    let env =
        [("AWS_ROLE_ARN", s(ROLE)), ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file), region.clone(), endpoint.clone()];
    assert_child_uses(&aws, &env, "ASIA");
    assert_eq!(count(&aws, "sts:AssumeRoleWithWebIdentity"), 1);

    // EC2 instance role via IMDSv2; the region comes from IMDS too.
    let env = [("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.imds_endpoint()), endpoint.clone()];
    assert_child_uses(&aws, &env, "AKIAIMDS");
    assert!(count(&aws, "imds:Region") >= 1);

    // EKS Pod Identity, with the token in a file (as EKS does) or inline.
    let uri = ("AWS_CONTAINER_CREDENTIALS_FULL_URI", aws.pod_identity_uri());
    let token_file = ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", aws.pod_identity_token_file().display().to_string());
    let output = assert_child_uses(&aws, &[uri.clone(), token_file, region.clone(), endpoint.clone()], "AKIAPODID");
    assert!(printed(&output, "ecs-provider").starts_with("AKIAPODID"), "{output}");
    let token = ("AWS_CONTAINER_AUTHORIZATION_TOKEN", aws.pod_identity_token());
    assert_child_uses(&aws, &[uri.clone(), token, region.clone(), endpoint.clone()], "AKIAPODID");

    // A wrong token is refused, and the chain does not fall through.
    aws.reset().unwrap();
    let token = ("AWS_CONTAINER_AUTHORIZATION_TOKEN", s("wrong"));
    let (ok, output) = run_child(&[uri, token, region, endpoint]);
    assert!(!ok, "{output}");
    assert_eq!(count(&aws, "pod-identity:Credentials"), 1);
    assert_eq!(count(&aws, GET_TOKEN), 0);
}

#[tokio::test]
async fn stop_refuses_connections_and_restart_serves_again() {
    let aws = AwsEmulator::start().unwrap();
    aws.set_token_lifetime(300).unwrap();
    let client = aws_sdk_ecr::Client::from_conf(
        ecr_config(&aws, static_credentials(&aws)).retry_config(RetryConfig::disabled()).build(),
    );
    client.get_authorization_token().send().await.unwrap();

    aws.stop();
    for endpoint in [aws.endpoint(), aws.imds_endpoint(), aws.pod_identity_uri()] {
        let port = endpoint.trim_start_matches("http://127.0.0.1:").split('/').next().unwrap();
        let err = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{endpoint}");
    }
    let err = client.get_authorization_token().send().await.unwrap_err();
    assert!(matches!(&err, SdkError::DispatchFailure(e) if e.is_io()), "{err:?}");
    aws.stop(); // idempotent

    let t = Instant::now();
    aws.restart().unwrap();
    eprintln!("AwsEmulator::restart: {:?}", t.elapsed());
    let out = client.get_authorization_token().send().await.unwrap();
    let expires = out.authorization_data()[0].expires_at().unwrap().secs();
    assert!((expires - (now() + 300)).abs() < 30, "the lifetime survives a restart");
    assert_eq!(aws.counts().unwrap(), BTreeMap::from([(GET_TOKEN.to_owned(), 1)]), "a restart starts afresh");
}

/// The registries that stand in for ECR challenge and answer as ECR does, over HTTPS: only a
/// live password GetAuthorizationToken issued, of a principal the registry lets in, reaches
/// the registry behind the front; nothing refused does.
#[tokio::test]
async fn an_ecr_registry_takes_exactly_the_live_passwords_of_the_principals_it_lets_in() {
    use regcred_testenv::{Registry, docker_config_json, wait_for};
    let aws = AwsEmulator::start_with_lifetime(6).unwrap();
    // The static key's user is of account 123456789012: its own registry, and another
    // account's that lets no other account in.
    let registry = Registry::start_ecr(&aws, "123456789012.dkr.ecr.eu-west-1.amazonaws.com", &[]).unwrap();
    let foreign = Registry::start_ecr(&aws, "210987654321.dkr.ecr.eu-west-1.amazonaws.com", &[]).unwrap();
    assert!(registry.url().starts_with("https://"), "{}", registry.url());
    let host = registry.host();
    let client = ecr(&aws, static_credentials(&aws));
    let out = client.get_authorization_token().send().await.unwrap();
    let live = password(out.authorization_data()[0].authorization_token().unwrap());
    let expires = out.authorization_data()[0].expires_at().unwrap().secs();
    let image = registry.push_test_image("team/app", "v1", "AWS", &live).unwrap();
    registry.pull_with_auth_file(&image, &docker_config_json(&host, "AWS", &live)).unwrap();

    let before = registry.log_offset().unwrap();
    // A password the emulator never issued, or the live one under another user name: ECR's
    // challenge again (crane shows the status and ECR's body).
    for (user, pass) in [("AWS", "123456789012-made-up"), ("someone", live.as_str())] {
        let err = registry.pull_with_auth_file(&image, &docker_config_json(&host, user, pass)).unwrap_err();
        assert!(format!("{err:#}").contains("401 Unauthorized"), "{user}: {err:#}");
    }
    // The live password at a registry that does not let its account in: denied, in ECR's words.
    let elsewhere = format!("{}/team/app:v1", foreign.host());
    let err = foreign.pull_with_auth_file(&elsewhere, &docker_config_json(&foreign.host(), "AWS", &live)).unwrap_err();
    assert!(format!("{err:#}").contains("is not authorized to perform: ecr:"), "foreign: {err:#}");
    assert!(format!("{err:#}").contains("because no resource-based policy allows"), "foreign: {err:#}");
    // Expired: denied, in ECR's words.
    wait_for("the password to expire", Duration::from_secs(20), || (now() > expires).then_some(())).unwrap();
    let err = registry.pull_with_auth_file(&image, &docker_config_json(&host, "AWS", &live)).unwrap_err();
    assert!(format!("{err:#}").contains("Your authorization token has expired"), "expired: {err:#}");
    // None of these reached the registry behind the front; at the foreign registry only the
    // `GET /v2/` that the password authenticates (its account has no access to repositories).
    assert_eq!(registry.requests_since(before).unwrap(), [], "refused requests reached the registry");
    let reached = foreign.requests_since(0).unwrap();
    assert!(reached.iter().all(|r| r.path == "/v2/"), "refused requests reached the foreign registry: {reached:?}");

    let calls: Vec<_> = aws.calls().unwrap().into_iter().filter(|c| c["action"] == "registry:Login").collect();
    // The SDK gives whole seconds.
    let of_live = |c: &serde_json::Value| c["expiresAt"].as_f64().is_some_and(|e| (e - expires as f64).abs() < 1.0);
    let seen = |status: u16, error: &str| {
        calls
            .iter()
            .any(|c| c["status"] == status && (c["error"] == error || (error.is_empty() && c["error"].is_null())))
    };
    assert!(calls.iter().any(|c| c["status"] == 200 && of_live(c)), "{calls:?}");
    assert!(calls.iter().any(|c| c["status"] == 403 && c["error"] == "expired token" && of_live(c)), "{calls:?}");
    for (status, error) in [
        (401, "no Basic credentials"),
        (401, "unknown token"),
        (401, "user name is not AWS"),
        (403, "account not allowed"),
    ] {
        assert!(seen(status, error), "no {status} {error}: {calls:?}");
    }
}

/// A clock `offset` away from this machine's, for signing requests as a skewed client would.
#[derive(Debug)]
struct SkewedClock(i64);

impl aws_smithy_async::time::TimeSource for SkewedClock {
    fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        let by = Duration::from_secs(self.0.unsigned_abs());
        if self.0 < 0 { now - by } else { now + by }
    }
}

/// The AWS error code and message of a failed call.
fn refusal<T: std::fmt::Debug, E: ProvideErrorMetadata + std::fmt::Debug, R: std::fmt::Debug>(
    result: Result<T, SdkError<E, R>>,
) -> (String, String) {
    let err = result.expect_err("AWS accepted the request");
    let code = err.code().unwrap_or_else(|| panic!("no AWS error code: {err:?}")).to_owned();
    (code, err.message().unwrap_or_default().to_owned())
}

/// Issue 21 §1: requests are signed with the secret key of their access key id, scoped to the
/// service, dated within 5 minutes, and temporary keys carry their session token; anything
/// else gets the error AWS sends, in each protocol.
#[tokio::test]
async fn signatures_are_checked_like_aws() {
    let aws = AwsEmulator::start().unwrap();
    let no_retry = RetryConfig::disabled();
    let ecr_with = |creds: Credentials| {
        aws_sdk_ecr::Client::from_conf(ecr_config(&aws, creds).retry_config(no_retry.clone()).build())
    };
    ecr_with(static_credentials(&aws)).get_authorization_token().send().await.unwrap();

    let wrong = Credentials::new(STATIC_KEY, "not-the-secret", None, None, "test");
    let (code, message) = refusal(ecr_with(wrong.clone()).get_authorization_token().send().await);
    assert_eq!(code, "InvalidSignatureException", "{message}");
    assert!(message.starts_with("The request signature we calculated does not match"), "{message}");
    let (code, _) = refusal(sts_signed(&aws, wrong).get_caller_identity().send().await);
    assert_eq!(code, "SignatureDoesNotMatch");

    let unknown = Credentials::new("AKIAUNKNOWN000000001", STATIC_SECRET, None, None, "test");
    let (code, _) = refusal(ecr_with(unknown.clone()).get_authorization_token().send().await);
    assert_eq!(code, "UnrecognizedClientException");
    let (code, _) = refusal(sts_signed(&aws, unknown).get_caller_identity().send().await);
    assert_eq!(code, "InvalidClientTokenId");

    // Scoped to a region that is none.
    let scoped = aws_sdk_ecr::Client::from_conf(
        ecr_config(&aws, static_credentials(&aws)).retry_config(no_retry.clone()).build(),
    );
    let (code, message) = refusal(
        scoped
            .get_authorization_token()
            .customize()
            .config_override(aws_sdk_ecr::config::Config::builder().region(Region::new("mars")))
            .send()
            .await,
    );
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("InvalidSignatureException", "Credential should be scoped to a valid region. ")
    );

    // A clock 10 minutes off either way.
    for offset in [-600, 600] {
        let skewed = aws_sdk_ecr::Client::from_conf(
            ecr_config(&aws, static_credentials(&aws))
                .retry_config(no_retry.clone())
                .time_source(SkewedClock(offset))
                .build(),
        );
        let (code, message) = refusal(skewed.get_authorization_token().send().await);
        assert_eq!(code, "InvalidSignatureException", "{offset}: {message}");
        assert!(
            message.starts_with(if offset < 0 { "Signature expired" } else { "Signature not yet current" }),
            "{message}"
        );
    }

    // Temporary credentials: without their session token, or with another one, they are unknown.
    let trust = RoleTrust::principal("arn:aws:iam::123456789012:user/static", None);
    aws.add_role(ROLE, &trust).unwrap();
    let out = sts_signed(&aws, static_credentials(&aws))
        .assume_role()
        .role_arn(ROLE)
        .role_session_name("session")
        .send()
        .await
        .unwrap();
    let c = out.credentials().unwrap();
    for token in [None, Some("another-token".to_string())] {
        let creds = Credentials::new(c.access_key_id(), c.secret_access_key(), token, None, "sts");
        let (code, _) = refusal(ecr_with(creds).get_authorization_token().send().await);
        assert_eq!(code, "UnrecognizedClientException");
    }
    let calls = token_calls(&aws);
    assert!(
        calls.iter().all(|c| c["status"] == 200 || c["caller"].is_null()),
        "a refused call has a caller: {calls:?}"
    );
}

fn sts_signed(aws: &AwsEmulator, credentials: Credentials) -> aws_sdk_sts::Client {
    aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::Config::builder()
            .http_client(http())
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new("eu-west-1"))
            .endpoint_url(aws.endpoint())
            .credentials_provider(credentials)
            .retry_config(aws_sdk_sts::config::retry::RetryConfig::disabled())
            .build(),
    )
}

/// Issue 21 §1: AssumeRole only for principals the role trusts, with the ExternalId it
/// requires; the credentials it hands out expire and are refused after.
#[tokio::test]
async fn assume_role_checks_trust_and_external_id_and_its_credentials_expire() {
    let aws = AwsEmulator::start().unwrap();
    let caller = static_credentials(&aws);
    let other = aws.add_access_key("other", "AKIAOTHERUSER0000001", "other-secret").unwrap();
    aws.add_role(ROLE, &RoleTrust::principal(&other, Some("xid-1"))).unwrap();
    let assume = |external_id: Option<&str>| {
        sts_signed(&aws, caller.clone())
            .assume_role()
            .role_arn(ROLE)
            .role_session_name("regcred-test")
            .set_external_id(external_id.map(str::to_string))
            .send()
    };
    // Trusted: another user only.
    let (code, message) = refusal(assume(Some("xid-1")).await);
    assert_eq!(code, "AccessDenied");
    assert_eq!(
        message,
        format!(
            "User: arn:aws:iam::123456789012:user/static is not authorized to perform: sts:AssumeRole on resource: {ROLE}"
        )
    );
    aws.add_role(ROLE, &RoleTrust::principal("arn:aws:iam::123456789012:user/static", Some("xid-1"))).unwrap();
    for wrong in [None, Some("xid-2")] {
        let (code, _) = refusal(assume(wrong).await);
        assert_eq!(code, "AccessDenied", "{wrong:?}");
    }
    aws.set_sts_lifetime(3).unwrap();
    let out = assume(Some("xid-1")).await.unwrap();
    let c = out.credentials().unwrap();
    assert!(c.access_key_id().starts_with("ASIA"));
    let creds = Credentials::new(c.access_key_id(), c.secret_access_key(), Some(c.session_token().into()), None, "sts");
    let client = aws_sdk_ecr::Client::from_conf(ecr_config(&aws, creds).retry_config(RetryConfig::disabled()).build());
    let out = client.get_authorization_token().send().await.unwrap();
    assert_eq!(
        out.authorization_data()[0].proxy_endpoint(),
        Some("https://210987654321.dkr.ecr.eu-west-1.amazonaws.com")
    );
    let expiry = SystemTime::try_from(*c.expiration()).unwrap();
    tokio::time::sleep(expiry.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(1)).await;
    let (code, message) = refusal(client.get_authorization_token().send().await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("ExpiredTokenException", "The security token included in the request is expired")
    );

    let calls: Vec<_> = aws.calls().unwrap().into_iter().filter(|c| c["action"] == "sts:AssumeRole").collect();
    let seen: Vec<_> = calls.iter().map(|c| (c["status"].as_u64().unwrap(), c["external_id"].as_str())).collect();
    assert_eq!(seen, [(403, Some("xid-1")), (403, None), (403, Some("xid-2")), (200, Some("xid-1"))]);
    assert!(calls.iter().all(|c| c["caller"] == "arn:aws:iam::123456789012:user/static" && c["role_arn"] == ROLE));
    assert!(calls.iter().all(|c| c["session_name"] == "regcred-test"));
}

/// Issue 21 §1: AssumeRoleWithWebIdentity takes only tokens the cluster's issuer signed, for
/// STS's audience, of a ServiceAccount the role trusts.
#[tokio::test]
async fn web_identity_tokens_are_verified_and_trusted_per_service_account() {
    let aws = AwsEmulator::start().unwrap();
    let trusted = web_identity(&aws, "trusted");
    let cp = ControlPlane::shared();
    let assume = |token: String| {
        sts(&aws)
            .assume_role_with_web_identity()
            .role_arn(ROLE)
            .role_session_name("regcred")
            .web_identity_token(token)
            .send()
    };
    assume(trusted.clone()).await.unwrap();

    // Another ServiceAccount (here of another namespace) of the same cluster.
    let other = cp.service_account_token("testenv-aws-other", "trusted", &[STS_AUDIENCE], 600).unwrap();
    let (code, message) = refusal(assume(other).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("AccessDenied", "Not authorized to perform sts:AssumeRoleWithWebIdentity")
    );
    // The apiserver's own audience.
    let apiserver = cp.service_account_token(NS, "trusted", &[], 600).unwrap();
    let (code, message) = refusal(assume(apiserver).await);
    assert_eq!((code.as_str(), message.as_str()), ("InvalidIdentityToken", "Incorrect token audience"));
    // The trusted token with its claims edited (so its signature no longer holds).
    let mut parts: Vec<String> = trusted.split('.').map(str::to_string).collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
    claims["exp"] = (now() + 86400).into();
    parts[1] = b64.encode(claims.to_string());
    let (code, _) = refusal(assume(parts.join(".")).await);
    assert_eq!(code, "InvalidIdentityToken");
    // Not a JWT at all.
    let (code, _) = refusal(assume("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into()).await);
    assert_eq!(code, "InvalidIdentityToken");

    let calls: Vec<_> =
        aws.calls().unwrap().into_iter().filter(|c| c["action"] == "sts:AssumeRoleWithWebIdentity").collect();
    let subs: Vec<_> = calls.iter().map(|c| (c["status"].as_u64().unwrap(), c["sub"].as_str())).collect();
    let (ours, theirs) =
        (format!("system:serviceaccount:{NS}:trusted"), "system:serviceaccount:testenv-aws-other:trusted");
    assert_eq!(subs, [(200, Some(ours.as_str())), (403, Some(theirs)), (400, None), (400, None), (400, None)]);
}
