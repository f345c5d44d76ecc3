//! The AWS emulator as seen by the real AWS SDK for Rust: ECR tokens that
//! expire and rotate like real ones, counts, injected faults, STS web
//! identity, the IMDS and Pod Identity stubs, the default credentials chain
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
use regcred_testenv::AwsEmulator;

const GET_TOKEN: &str = "ecr:GetAuthorizationToken";
const STATIC_KEY: &str = "AKIASTATICTEST000001";

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

fn static_credentials() -> Credentials {
    Credentials::new(STATIC_KEY, "static-secret", None, None, "test")
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
    let client = ecr(&aws, static_credentials());

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
    let out = ecr(&aws, static_credentials()).get_authorization_token().send().await.unwrap();
    let expires = out.authorization_data()[0].expires_at().unwrap().secs();
    assert!((expires - (now() + 120)).abs() < 30, "expiresAt {expires} is not 2 min from now");
}

#[tokio::test]
async fn injected_faults_reach_the_sdk() {
    let aws = AwsEmulator::start().unwrap();
    let client = ecr(&aws, static_credentials());

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
    let retrying = aws_sdk_ecr::Client::from_conf(ecr_config(&aws, static_credentials()).retry_config(retry).build());
    let err = retrying.get_authorization_token().send().await.unwrap_err();
    assert_eq!(err.code(), Some("ServerException"), "{err:?}");
    assert_eq!(count(&aws, GET_TOKEN), 4);

    // STS speaks XML; its errors must parse too.
    aws.fail("sts:AssumeRoleWithWebIdentity", Some("InvalidIdentityToken")).unwrap();
    let err = sts(&aws)
        .assume_role_with_web_identity()
        .role_arn("arn:aws:iam::210987654321:role/regcred")
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
    let jwt = std::fs::read_to_string(aws.web_identity_token_file()).unwrap();
    let out = sts(&aws)
        .assume_role_with_web_identity()
        .role_arn("arn:aws:iam::210987654321:role/regcred")
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
    let env =
        [("AWS_ACCESS_KEY_ID", s(STATIC_KEY)), ("AWS_SECRET_ACCESS_KEY", s("x")), region.clone(), endpoint.clone()];
    assert_child_uses(&aws, &env, STATIC_KEY);

    // IRSA: web identity token file + role, via STS at AWS_ENDPOINT_URL.
    let token_file = aws.web_identity_token_file().display().to_string();
    let env = [
        ("AWS_ROLE_ARN", s("arn:aws:iam::210987654321:role/regcred")),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file),
        region.clone(),
        endpoint.clone(),
    ];
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
        ecr_config(&aws, static_credentials()).retry_config(RetryConfig::disabled()).build(),
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

#[tokio::test]
async fn the_registry_realm_takes_exactly_the_live_tokens_it_issued() {
    use regcred_testenv::{Registry, docker_config_json, http_get_basic_auth, wait_for};
    let aws = AwsEmulator::start_with_lifetime(6).unwrap();
    let registry = Registry::start_with_token_realm(&aws.token_realm()).unwrap();
    let host = registry.host();
    let client = ecr(&aws, static_credentials());
    let out = client.get_authorization_token().send().await.unwrap();
    let live = password(out.authorization_data()[0].authorization_token().unwrap());
    let image = registry.push_test_image("team/app", "v1", "AWS", &live).unwrap();
    registry.pull_with_auth_file(&image, &docker_config_json(&host, "AWS", &live)).unwrap();

    for (user, pass) in [("AWS", "123456789012-made-up"), ("someone", live.as_str())] {
        let err = registry.pull_with_auth_file(&image, &docker_config_json(&host, user, pass)).unwrap_err();
        assert!(format!("{err:#}").contains("UNAUTHORIZED"), "{user}: {err:#}");
    }
    let realm = aws.token_realm();
    let port: u16 = aws.endpoint().rsplit(':').next().unwrap().parse().unwrap();
    let path = format!("/registry/token?service={}&scope=repository:team/app:pull", realm.service);
    wait_for("the token to expire", Duration::from_secs(20), || {
        (http_get_basic_auth(port, &path, "AWS", &live).unwrap().0 == 401).then_some(())
    })
    .unwrap();
    let err = registry.pull_with_auth_file(&image, &docker_config_json(&host, "AWS", &live)).unwrap_err();
    assert!(format!("{err:#}").contains("UNAUTHORIZED"), "expired: {err:#}");

    let calls: Vec<_> = aws.calls().unwrap().into_iter().filter(|c| c["action"] == "registry:Token").collect();
    let expires = out.authorization_data()[0].expires_at().unwrap().secs() as f64;
    // The SDK gives whole seconds.
    let granted = |c: &serde_json::Value| c["expiresAt"].as_f64().is_some_and(|e| (e - expires).abs() < 1.0);
    assert!(calls.iter().any(|c| c["status"] == 200 && granted(c)), "{calls:?}");
    assert!(calls.iter().any(|c| c["status"] == 401 && c["error"] == "expired token"), "{calls:?}");
    assert!(calls.iter().any(|c| c["status"] == 401 && c["error"] == "unknown token"), "{calls:?}");
}
