//! ECR against the AWS emulator: every identity mode, one token per identity, rotation ahead
//! of expiry, and failures that keep a still-valid Secret.

use std::{collections::BTreeSet, time::Duration};

use base64::Engine;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use regcred_testenv::{AwsEmulator, ISSUER, RoleTrust, eventually};
use serde_json::{Value, json};

use crate::support::*;

const REGISTRY: &str = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";

/// GetAuthorizationToken calls signed by access keys starting with `prefix`, oldest first.
fn token_calls(aws: &AwsEmulator, prefix: &str) -> Vec<Value> {
    aws.calls()
        .unwrap()
        .into_iter()
        .filter(|c| c["action"] == "ecr:GetAuthorizationToken" && c["status"] == 200)
        .filter(|c| c["access_key_id"].as_str().is_some_and(|k| k.starts_with(prefix)))
        .collect()
}

/// The password a GetAuthorizationToken call handed out (recorded for the leak check).
fn issued_password(call: &Value) -> String {
    let token = call["authorizationData"][0]["authorizationToken"].as_str().expect("token");
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(token).unwrap()).unwrap();
    let password = decoded.strip_prefix("AWS:").expect("AWS:password").to_string();
    record_secret(&password);
    password
}

/// Access keys in a Secret, registered with `aws`; the key id is unique so calls can be
/// attributed to this test.
async fn aws_keys(client: &Client, aws: &AwsEmulator, ns: &str, name: &str) -> String {
    create_aws_keys(client, aws, ns, name, "secretkey").await
}

/// The calls of `action` that STS or ECR answered for role `role_arn` (AssumeRole*: by the
/// role asked for; others: signed by that role's sessions), oldest first.
fn role_calls(aws: &AwsEmulator, action: &str, role_arn: &str) -> Vec<Value> {
    let role = role_arn.rsplit('/').next().unwrap_or_default();
    let session_prefix = format!("arn:aws:sts::{}:assumed-role/{role}/", regcred_testenv::AWS_ACCOUNT);
    aws.calls()
        .unwrap()
        .into_iter()
        .filter(|c| c["action"] == action)
        .filter(|c| c["role_arn"] == role_arn || c["caller"].as_str().is_some_and(|a| a.starts_with(&session_prefix)))
        .collect()
}

/// The reason and message of a credential's Ready condition once it is False.
async fn refused(client: &Client, ns: &str, name: &str, reason: &str) -> String {
    let cr = wait_ready(client, ns, name, "False", Some(reason)).await;
    cr.status.unwrap().conditions[0].message.clone()
}

fn ecr_spec(auth: Value) -> Value {
    json!({"source": {"ecr": {"registry": REGISTRY, "auth": auth}}})
}

/// A test's own emulator (tokens of `lifetime` seconds) and controller, a namespace with access
/// keys, and a key-mode credential `credential` there. Returns what the test drives.
struct Dedicated {
    aws: AwsEmulator,
    name: String,
    ns: String,
    key_id: String,
    _controller: TestController,
}

async fn dedicated(client: &Client, prefix: &str, lifetime: u64, credential: &str) -> Dedicated {
    let aws = AwsEmulator::start_with_lifetime(lifetime).unwrap();
    let name = format!("{prefix}-{}", &unique()[..6]);
    let controller =
        spawn_controller(env().cp, &name, &format!("{CONTROLLER_LABEL}={name}"), &aws.endpoint(), &[], &[]);
    let ns = namespace(client, &format!("ecr-{prefix}")).await;
    let key_id = aws_keys(client, &aws, &ns, "aws-keys").await;
    create_credential_for(client, &ns, credential, Some(&name), ecr_spec(json!({"secretRef": {"name": "aws-keys"}})))
        .await;
    Dedicated { aws, name, ns, key_id, _controller: controller }
}

#[tokio::test]
async fn key_mode_writes_the_token_for_the_registry_and_reports_expiry() {
    let aws = &env().aws;
    let client = client().await;
    let ns = namespace(&client, "ecr-keys").await;
    let key_id = aws_keys(&client, aws, &ns, "aws-keys").await;
    create_credential(&client, &ns, "ecr", ecr_spec(json!({"secretRef": {"name": "aws-keys"}}))).await;

    let secret = wait_secret(&client, &ns, "ecr", "written", |_| true).await;
    let calls = token_calls(aws, &key_id);
    assert_eq!(calls.len(), 1, "one GetAuthorizationToken for one credential");
    assert_eq!(logins(&secret), vec![(REGISTRY.into(), "AWS".into(), issued_password(&calls[0]))]);

    let cr = wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await;
    let status = cr.status.unwrap();
    assert_eq!(status.source.as_deref(), Some("ecr"));
    let degraded = status.condition("Degraded").expect("Degraded condition");
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("False", "Refreshed"));
    let expires = status.expires_at.expect("expiresAt").0;
    assert_eq!(expires.as_second(), calls[0]["expiresAt"].as_f64().unwrap() as i64);
    let issued = expires.as_second() - 12 * 3600;
    let refresh_after = status.next_refresh_at.expect("nextRefreshAt").0.as_second() - issued;
    // A quarter of 12 h left, minus up to 5 % jitter: between 8.4 h and 9 h after issue.
    assert!((30_240..=32_400).contains(&refresh_after), "refresh {refresh_after} s after issue");
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn several_registries_share_one_token_in_one_secret() {
    let aws = &env().aws;
    let client = client().await;
    let ns = namespace(&client, "ecr-multi").await;
    let key_id = aws_keys(&client, aws, &ns, "aws-keys").await;
    let spec = json!({"source": {"ecr": {"region": "eu-west-1", "registryIds": ["222222222222", "111111111111"],
                                          "auth": {"secretRef": {"name": "aws-keys"}}}}});
    create_credential(&client, &ns, "multi", spec).await;
    let secret = wait_secret(&client, &ns, "multi", "written", |_| true).await;
    let calls = token_calls(aws, &key_id);
    assert_eq!(calls.len(), 1);
    let password = issued_password(&calls[0]);
    assert_eq!(
        logins(&secret),
        vec![
            ("111111111111.dkr.ecr.eu-west-1.amazonaws.com".into(), "AWS".into(), password.clone()),
            ("222222222222.dkr.ecr.eu-west-1.amazonaws.com".into(), "AWS".into(), password),
        ]
    );
}

#[tokio::test]
async fn fifty_credentials_with_one_identity_make_one_call() {
    let aws = &env().aws;
    let client = client().await;
    let ns = namespace(&client, "ecr-share").await;
    let key_id = aws_keys(&client, aws, &ns, "aws-keys").await;
    for i in 0..50 {
        create_credential(&client, &ns, &format!("c{i}"), ecr_spec(json!({"secretRef": {"name": "aws-keys"}}))).await;
    }
    for i in 0..50 {
        wait_ready(&client, &ns, &format!("c{i}"), "True", Some("Synced")).await;
    }
    let calls = token_calls(aws, &key_id);
    assert_eq!(calls.len(), 1, "50 credentials, one identity: one GetAuthorizationToken");
    let password = issued_password(&calls[0]);
    let secret = wait_secret(&client, &ns, "c49", "written", |_| true).await;
    assert_eq!(logins(&secret)[0].2, password);
}

/// The role is assumed with the Secret's keys (the caller STS sees is their user), with the
/// externalId and session name of the spec, and ECR is asked by that role's session. Calls are
/// picked by this test's own role, so another test's AssumeRole cannot satisfy it. An
/// externalId other than the one the role's trust policy requires, or none, is AWS's
/// `AccessDenied`, reported on the credential.
#[tokio::test]
async fn assume_role_is_applied_on_top_of_the_keys() {
    let aws = &env().aws;
    let client = client().await;
    let ns = namespace(&client, "ecr-assume").await;
    let key_id = aws_keys(&client, aws, &ns, "aws-keys").await;
    let role = format!("arn:aws:iam::{}:role/{ns}.cross-account-puller", regcred_testenv::AWS_ACCOUNT);
    aws.add_role(&role, &RoleTrust::principal(&aws_user(&key_id), Some("xid-1"))).unwrap();
    let spec = |external_id: Option<&str>| {
        let mut assume = json!({"roleArn": role, "sessionName": "regcred-test"});
        if let Some(id) = external_id {
            assume["externalId"] = id.into();
        }
        json!({"source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws-keys"}}, "assumeRole": assume}}})
    };
    create_credential(&client, &ns, "ecr", spec(Some("xid-1"))).await;
    wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await;
    let assumed = role_calls(aws, "sts:AssumeRole", &role);
    let [assume] = &assumed[..] else { panic!("one AssumeRole of {role}: {assumed:?}") };
    assert_eq!(
        (
            &assume["status"],
            &assume["caller"],
            &assume["access_key_id"],
            &assume["external_id"],
            &assume["session_name"]
        ),
        (&json!(200), &json!(aws_user(&key_id)), &json!(key_id), &json!("xid-1"), &json!("regcred-test")),
        "{assume}"
    );
    let token_calls_of_role = role_calls(aws, "ecr:GetAuthorizationToken", &role);
    let [token_call] = &token_calls_of_role[..] else { panic!("one token call by the role: {token_calls_of_role:?}") };
    let session = role.replace(":iam::", ":sts::").replace(":role/", ":assumed-role/") + "/regcred-test";
    assert_eq!(token_call["caller"], session.as_str(), "GetAuthorizationToken must use the assumed role's credentials");
    assert!(token_call["access_key_id"].as_str().is_some_and(|k| k.starts_with("ASIA")));
    assert!(token_calls(aws, &key_id).is_empty());
    let secret = wait_secret(&client, &ns, "ecr", "written", |_| true).await;
    assert_eq!(logins(&secret)[0].2, issued_password(token_call));

    // The wrong externalId, and none: the role's trust policy refuses both.
    create_credential(&client, &ns, "wrong-xid", spec(Some("xid-2"))).await;
    create_credential(&client, &ns, "no-xid", spec(None)).await;
    for name in ["wrong-xid", "no-xid"] {
        let message = refused(&client, &ns, name, "AwsRequestFailed").await;
        let denied =
            format!("User: {} is not authorized to perform: sts:AssumeRole on resource: {role}", aws_user(&key_id));
        assert!(message.contains("AccessDenied") && message.contains(&denied), "{name}: {message}");
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
        assert!(secrets.get_opt(name).await.unwrap().is_none(), "{name}: a Secret was written");
    }
    let refusals: BTreeSet<_> = role_calls(aws, "sts:AssumeRole", &role)
        .iter()
        .filter(|c| c["status"] == 403 && c["error"] == "AccessDenied")
        .map(|c| c["external_id"].as_str().unwrap_or("none").to_string())
        .collect();
    assert_eq!(refusals, BTreeSet::from(["xid-2".to_string(), "none".to_string()]));
    assert_eq!(role_calls(aws, "ecr:GetAuthorizationToken", &role).len(), 1, "no token without the role");
}

/// A wrong secret key is refused by AWS's signature check, and the credential reports AWS's
/// error: ECR's `InvalidSignatureException`, STS's `SignatureDoesNotMatch` (with assumeRole).
#[tokio::test]
async fn a_wrong_secret_key_is_refused_with_the_reason_aws_gives() {
    let aws = &env().aws;
    let client = client().await;
    let ns = namespace(&client, "ecr-wrong-secret").await;
    let key_id = format!("AKIA{}", &unique()[..16].to_uppercase());
    aws.add_access_key(&key_id, &key_id, &secret_value("aws", "registered")).unwrap();
    let wrong = secret_value("aws", "wrong");
    create_secret(
        &client,
        &ns,
        "aws-keys",
        &[("accessKeyId", key_id.as_bytes()), ("secretAccessKey", wrong.as_bytes())],
    )
    .await;
    create_credential(&client, &ns, "ecr", ecr_spec(json!({"secretRef": {"name": "aws-keys"}}))).await;
    let assume = json!({"roleArn": format!("arn:aws:iam::{}:role/{ns}.any", regcred_testenv::AWS_ACCOUNT)});
    let spec = json!({"source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws-keys"}}, "assumeRole": assume}}});
    create_credential(&client, &ns, "assume", spec).await;

    let mismatch = "The request signature we calculated does not match the signature you provided";
    let message = refused(&client, &ns, "ecr", "AwsRequestFailed").await;
    assert!(message.contains("InvalidSignatureException") && message.contains(mismatch), "{message}");
    let message = refused(&client, &ns, "assume", "AwsRequestFailed").await;
    assert!(message.contains("SignatureDoesNotMatch") && message.contains(mismatch), "{message}");
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    assert!(secrets.get_opt("ecr").await.unwrap().is_none() && secrets.get_opt("assume").await.unwrap().is_none());
    let ours: Vec<_> = aws.calls().unwrap().into_iter().filter(|c| c["access_key_id"] == key_id.as_str()).collect();
    assert!(!ours.is_empty());
    for call in &ours {
        assert_eq!(call["status"], 403, "{call}");
        assert!(call["caller"].is_null(), "a refused signature has no caller: {call}");
    }
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn irsa_uses_the_tenants_own_service_account() {
    let aws = &env().aws;
    let client = client().await;
    let ns = namespace(&client, "ecr-irsa").await;
    let role = irsa_account(&client, aws, &ns, "puller").await;
    let offset = audit_offset();
    create_credential(&client, &ns, "irsa", ecr_spec(json!({"serviceAccountRef": {"name": "puller"}}))).await;
    let secret = wait_secret(&client, &ns, "irsa", "written", |_| true).await;

    let requests = controller_requests_since(offset);
    assert!(
        requests
            .iter()
            .any(|(verb, res, n, name)| verb == "create" && res == "serviceaccounts" && *n == ns && name == "puller"),
        "a TokenRequest for {ns}/puller: {requests:?}"
    );
    // STS got this ServiceAccount's own token (verified against the cluster's keys) for its role.
    let exchanges = role_calls(aws, "sts:AssumeRoleWithWebIdentity", &role);
    let [exchange] = &exchanges[..] else { panic!("one AssumeRoleWithWebIdentity for {role}: {exchanges:?}") };
    let sub = format!("system:serviceaccount:{ns}:puller");
    assert_eq!((&exchange["status"], &exchange["sub"]), (&json!(200), &json!(sub)), "{exchange}");
    assert_eq!(exchange["session_name"], format!("regcred-{ns}-puller").as_str());
    let token_calls_of_role = role_calls(aws, "ecr:GetAuthorizationToken", &role);
    let [token_call] = &token_calls_of_role[..] else { panic!("one token call by the role: {token_calls_of_role:?}") };
    assert_eq!(logins(&secret)[0].2, issued_password(token_call));

    // No role annotation, or no such ServiceAccount: reported, nothing borrowed.
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: ObjectMeta { name: Some("plain".into()), ..Default::default() },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    create_credential(&client, &ns, "no-role", ecr_spec(json!({"serviceAccountRef": {"name": "plain"}}))).await;
    create_credential(&client, &ns, "no-sa", ecr_spec(json!({"serviceAccountRef": {"name": "ghost"}}))).await;
    wait_ready(&client, &ns, "no-role", "False", Some("NoRoleArn")).await;
    wait_ready(&client, &ns, "no-sa", "False", Some("ServiceAccountNotFound")).await;
}

/// A role whose trust policy names one namespace's ServiceAccount cannot be assumed with
/// another namespace's, even one of the same name annotated with that role: STS verifies the
/// token's `sub` against the trust policy, and the credential reports AWS's `AccessDenied`.
#[tokio::test]
async fn another_namespaces_service_account_cannot_assume_a_role_trusted_for_this_one() {
    let aws = &env().aws;
    let client = client().await;
    let ours = namespace(&client, "ecr-irsa-ours").await;
    let theirs = namespace(&client, "ecr-irsa-theirs").await;
    let role = irsa_account(&client, aws, &ours, "puller").await;
    annotated_account(&client, &theirs, "puller", &role).await;
    create_credential(&client, &theirs, "irsa", ecr_spec(json!({"serviceAccountRef": {"name": "puller"}}))).await;
    let message = refused(&client, &theirs, "irsa", "AwsRequestFailed").await;
    assert!(
        message.contains("sts:AssumeRoleWithWebIdentity")
            && message.contains("AccessDenied")
            && message.contains("Not authorized to perform sts:AssumeRoleWithWebIdentity"),
        "{message}"
    );
    let secrets = Api::<Secret>::namespaced(client.clone(), &theirs);
    assert!(secrets.get_opt("irsa").await.unwrap().is_none(), "a Secret was written");
    let exchanges = role_calls(aws, "sts:AssumeRoleWithWebIdentity", &role);
    let theirs_sub = format!("system:serviceaccount:{theirs}:puller");
    assert!(
        !exchanges.is_empty() && exchanges.iter().all(|c| c["status"] == 403 && c["sub"] == theirs_sub.as_str()),
        "{exchanges:?}"
    );
    assert!(role_calls(aws, "ecr:GetAuthorizationToken", &role).is_empty());

    // The namespace the role trusts gets its token with the same role.
    create_credential(&client, &ours, "irsa", ecr_spec(json!({"serviceAccountRef": {"name": "puller"}}))).await;
    wait_ready(&client, &ours, "irsa", "True", Some("Synced")).await;
    let granted: Vec<_> = role_calls(aws, "sts:AssumeRoleWithWebIdentity", &role)
        .into_iter()
        .filter(|c| c["status"] == 200)
        .map(|c| c["sub"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(granted, [format!("system:serviceaccount:{ours}:puller")]);
}

#[tokio::test]
async fn namespaced_credentials_may_not_borrow_the_controller_identity_by_default() {
    env();
    let client = client().await;
    let ns = namespace(&client, "ecr-noambient").await;
    create_credential(&client, &ns, "ambient", ecr_spec(json!({"ambient": {}}))).await;
    let cr = wait_ready(&client, &ns, "ambient", "False", Some("AmbientIdentityNotAllowed")).await;
    assert!(cr.status.unwrap().conditions[0].message.contains("--allow-ambient-aws-identity"));
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    assert!(secrets.get_opt("ambient").await.unwrap().is_none());
}

#[tokio::test]
async fn ambient_identity_from_env_web_identity_imds_and_pod_identity() {
    let cp = env().cp;
    let client = client().await;
    let aws = AwsEmulator::start().unwrap();
    let env_key = format!("AKIAENV{}", &unique()[..13].to_uppercase());
    let env_secret = secret_value("env", "ambient");
    aws.add_access_key("controller", &env_key, &env_secret).unwrap();
    // IRSA for the controller itself: its ServiceAccount's token, a role trusting it.
    trust_cluster_issuer(&aws);
    let controller_role = format!("arn:aws:iam::{}:role/controller", regcred_testenv::AWS_ACCOUNT);
    let (controller_ns, controller_sa) =
        CONTROLLER_USER.rsplit_once(':').map(|(rest, sa)| (rest.rsplit(':').next().unwrap(), sa)).unwrap();
    aws.add_role(&controller_role, &RoleTrust::service_account(ISSUER, controller_ns, controller_sa)).unwrap();
    let token = cp.service_account_token(controller_ns, controller_sa, &[regcred_testenv::STS_AUDIENCE], 3600).unwrap();
    record_secret(&token);
    let token_file = aws.web_identity_token_file(&token).unwrap();
    let region = ("AWS_REGION", "eu-west-1".to_string());
    // (mode, the controller's environment, prefix of the access key it must sign with)
    type Mode<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let modes: Vec<Mode> = vec![
        (
            "env",
            vec![region.clone(), ("AWS_ACCESS_KEY_ID", env_key.clone()), ("AWS_SECRET_ACCESS_KEY", env_secret)],
            "AKIAENV",
        ),
        (
            "webidentity",
            vec![
                region.clone(),
                ("AWS_ROLE_ARN", controller_role.clone()),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.display().to_string()),
            ],
            "ASIA",
        ),
        (
            "imds",
            vec![
                ("AWS_EC2_METADATA_DISABLED", "false".into()),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", aws.imds_endpoint()),
            ],
            "AKIAIMDS",
        ),
        (
            "podidentity",
            vec![
                region.clone(),
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", aws.pod_identity_uri()),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", aws.pod_identity_token_file().display().to_string()),
            ],
            "AKIAPODID",
        ),
    ];
    let mut controllers = Vec::new();
    for (mode, envs, _) in &modes {
        let name = format!("ambient-{mode}-{}", &unique()[..6]);
        controllers.push(spawn_controller(
            cp,
            &name,
            &format!("{CONTROLLER_LABEL}={name}"),
            &aws.endpoint(),
            &["--allow-ambient-aws-identity"],
            envs,
        ));
        let ns = namespace(&client, &format!("ecr-{mode}")).await;
        create_credential_for(&client, &ns, "ambient", Some(&name), ecr_spec(json!({"ambient": {}}))).await;
        let secret = wait_secret(&client, &ns, "ambient", "written", |_| true).await;
        record_secret(&logins(&secret)[0].2);
        assert_eq!(logins(&secret)[0].0, REGISTRY, "{mode}");
    }
    for (mode, _, prefix) in &modes {
        assert_eq!(token_calls(&aws, prefix).len(), 1, "{mode}: one GetAuthorizationToken signed by a {prefix}… key");
    }
    let exchanges = role_calls(&aws, "sts:AssumeRoleWithWebIdentity", &controller_role);
    assert!(exchanges.iter().any(|c| c["status"] == 200 && c["sub"] == CONTROLLER_USER), "{exchanges:?}");
    drop(controllers);
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn tokens_rotate_before_they_expire_and_no_stale_token_is_written() {
    let client = client().await;
    // 30-second tokens: refreshed about 22 s after issue.
    let Dedicated { aws, ns, key_id, _controller, .. } = dedicated(&client, "rotate", 30, "ecr").await;

    // Watch the Secret until three different tokens have been in it, noting when each was first seen.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let mut seen: Vec<(String, f64)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while seen.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "only {} tokens seen in 90 s", seen.len());
        if let Some(secret) = secrets.get_opt("ecr").await.unwrap() {
            let password = logins(&secret)[0].2.clone();
            if seen.last().is_none_or(|(p, _)| *p != password) {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
                seen.push((password, now));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let calls = token_calls(&aws, &key_id);
    for (i, (password, first_seen)) in seen.iter().enumerate() {
        let call = calls.iter().find(|c| issued_password(c) == *password);
        let call = call.unwrap_or_else(|| panic!("token {i} did not come from AWS: seen {seen:?}, calls {calls:?}"));
        let expires = call["expiresAt"].as_f64().unwrap();
        assert!(*first_seen < expires, "token {i} was written after it expired");
        if let Some((_, next_seen)) = seen.get(i + 1) {
            assert!(*next_seen < expires, "token {i} was replaced only after it expired");
        }
    }
    let distinct: BTreeSet<_> = seen.iter().map(|(p, _)| p).collect();
    assert_eq!(distinct.len(), seen.len());
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn an_outage_keeps_the_valid_secret_then_reports_expiry_and_recovers() {
    let client = client().await;
    let Dedicated { aws, ns, _controller, .. } = dedicated(&client, "outage", 45, "ecr").await;
    wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let before = secrets.get("ecr").await.unwrap();
    record_secret(&logins(&before)[0].2);

    aws.stop();
    let long = Duration::from_secs(90);
    let api = Api::<regcred::crd::RegistryCredential>::namespaced(client.clone(), &ns);
    // At the refresh time the call fails: Degraded, while Ready stays True on the valid token.
    let cr = eventually("Degraded while the token is valid", long, || async {
        let cr = api.get("ecr").await.ok()?;
        let st = cr.status.clone()?;
        let degraded = st.condition("Degraded")?;
        (degraded.status == "True" && st.condition("Ready")?.status == "True").then_some(cr)
    })
    .await;
    let status = cr.status.unwrap();
    let message = &status.condition("Degraded").unwrap().message;
    assert!(message.contains("ecr:GetAuthorizationToken") && message.contains("keeps the current token"), "{message}");
    wait_event(&client, &ns, "RegistryCredential", "ecr", "Warning", "AwsRequestFailed").await;
    assert_eq!(secrets.get("ecr").await.unwrap().metadata.resource_version, before.metadata.resource_version);

    // Once the token has expired, Ready turns False; the Secret is still not rewritten.
    let cr = eventually("Ready=False after expiry", long, || async {
        let cr = api.get("ecr").await.ok()?;
        (cr.status.as_ref()?.condition("Ready")?.status == "False").then_some(cr)
    })
    .await;
    assert!(cr.status.unwrap().conditions[0].message.contains("expired at"));
    assert_eq!(secrets.get("ecr").await.unwrap().metadata.resource_version, before.metadata.resource_version);

    // AWS answers again: the controller recovers by itself.
    aws.restart().unwrap();
    let after = eventually("a fresh token after recovery", long, || async {
        let cr = api.get("ecr").await.ok()?;
        let ready = cr.status.as_ref()?.condition("Ready")?.status == "True";
        let secret = secrets.get("ecr").await.ok()?;
        (ready && secret.metadata.resource_version != before.metadata.resource_version).then_some(secret)
    })
    .await;
    let password = logins(&after)[0].2.clone();
    record_secret(&password);
    assert_ne!(password, logins(&before)[0].2);
    assert_no_leaks(&client).await;
}

#[tokio::test]
async fn stale_tokens_and_denials_are_errors_with_backoff_not_tokens() {
    let client = client().await;
    // Tokens that expire 5 s after issue: already too close to expiry to write.
    let Dedicated { aws, name, ns, key_id, _controller } = dedicated(&client, "stale", 5, "stale").await;
    let cr = wait_ready(&client, &ns, "stale", "False", Some("InvalidAwsAnswer")).await;
    assert!(cr.status.unwrap().conditions[0].message.contains("not in the future"));
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    assert!(secrets.get_opt("stale").await.unwrap().is_none(), "a stale token was written");

    // Retries back off instead of looping: the gaps between calls grow.
    let calls = eventually("four attempts", Duration::from_secs(60), || async {
        let calls = token_calls(&aws, &key_id);
        (calls.len() >= 4).then_some(calls)
    })
    .await;
    let times: Vec<f64> = calls.iter().map(|c| c["time"].as_f64().unwrap()).collect();
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "gaps between attempts do not grow: {gaps:?}");
    for call in &calls {
        issued_password(call);
    }

    // A denial is reported with the AWS error code.
    aws.fail("ecr:GetAuthorizationToken", Some("AccessDeniedException")).unwrap();
    create_credential_for(&client, &ns, "denied", Some(&name), ecr_spec(json!({"secretRef": {"name": "aws-keys"}})))
        .await;
    let cr = wait_ready(&client, &ns, "denied", "False", Some("AwsRequestFailed")).await;
    let message = &cr.status.unwrap().conditions[0].message;
    assert!(message.contains("AccessDeniedException"), "{message}");
    wait_event(&client, &ns, "RegistryCredential", "denied", "Warning", "AwsRequestFailed").await;
    assert_no_leaks(&client).await;
}

/// Item 13 of the one-core issue: the IRSA ServiceAccount is watched. Created after the
/// credential, it is used at once, not at the next retry of the (by then long) backoff.
#[tokio::test]
async fn an_irsa_service_account_created_later_is_picked_up_at_once() {
    let client = client().await;
    let name = format!("irsa-late-{}", &unique()[..6]);
    // A long backoff: only an event can bring the retry forward.
    let controller = spawn_labelled(&name, &["--max-backoff", "10m"], &[]);
    let ns = namespace(&client, "ecr-irsa-late").await;
    create_credential_for(&client, &ns, "irsa", Some(&name), ecr_spec(json!({"serviceAccountRef": {"name": "late"}})))
        .await;
    wait_ready(&client, &ns, "irsa", "False", Some("ServiceAccountNotFound")).await;
    // Five failures in: the next retry is at least 16 s away.
    let failures = "regcred_reconcile_failures_total{kind=\"RegistryCredential\",reason=\"ServiceAccountNotFound\"}";
    regcred_testenv::wait_for("five failed attempts", Duration::from_secs(60), || {
        sample(&controller.metrics(), failures).filter(|n| *n >= 5.0)
    })
    .expect("the credential kept failing");
    let role = format!("arn:aws:iam::{}:role/{ns}.late", regcred_testenv::AWS_ACCOUNT);
    trust_cluster_issuer(&env().aws);
    env().aws.add_role(&role, &RoleTrust::service_account(ISSUER, &ns, "late")).unwrap();
    let created = std::time::Instant::now();
    annotated_account(&client, &ns, "late", &role).await;
    wait_secret(&client, &ns, "irsa", "written", |_| true).await;
    let after = created.elapsed();
    eprintln!("IRSA ServiceAccount picked up after {after:?}");
    assert!(after < Duration::from_secs(10), "picked up after {after:?}: by the backoff, not by the event");
}

/// Issue 20, item 8. A ClusterRegistryCredential's token refresh fails (GetAuthorizationToken
/// answers 503) while the token it wrote is still valid for a while. A namespace that joins
/// the fan-out then gets that still-valid token at once (by the Namespace watch, not by a
/// retry: the controller's backoff is by then longer than the wait), the counts include it,
/// `Degraded=True` says why no new token came, and `Ready` stays True. A controller restarted
/// during the outage takes the still-valid token from a live Secret (the one whose digest the
/// status recorded) and gives it to the next joining namespace. When AWS answers again, the
/// next retry writes a new token everywhere.
#[tokio::test]
async fn a_failing_refresh_still_gives_a_new_namespace_the_valid_token() {
    let admin = client().await;
    // 120-second tokens, refreshed when 90 % of their life is left (6-12 s after issue): a
    // refresh fails long before the token expires.
    let aws = AwsEmulator::start_with_lifetime(120).unwrap();
    let name = format!("outage-fan-{}", &unique()[..6]);
    let args = ["--max-backoff", "300s", "--ecr-refresh-share", "0.9"];
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let mut controller = spawn_controller(env().cp, &name, &selector, &aws.endpoint(), &args, &[]);
    let platform = namespace(&admin, "outage-platform").await;
    let key_id = create_aws_keys(&admin, &aws, &platform, "aws-keys", "secretkey").await;
    let first = labelled_namespace(&admin, "outage-first", &[("outage", &name)]).await;
    let spec = json!({
        "source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws-keys", "namespace": platform}}}},
        "namespaces": {"selector": {"matchLabels": {"outage": name}}},
    });
    create_cluster_credential_for(&admin, &name, Some(&name), spec).await;
    wait_cluster(&admin, &name, "the first namespace synced", |s| s.synced_namespaces == Some(1)).await;

    // AWS fails every GetAuthorizationToken from now on.
    aws.fail_with_status("ecr:GetAuthorizationToken", Some("ServiceUnavailableException"), 503).unwrap();
    let degraded = |s: &regcred::crd::ClusterCredentialStatus| {
        s.credential.condition("Degraded").is_some_and(|c| c.status == "True" && c.reason == "AwsRequestFailed")
    };
    wait_cluster(&admin, &name, "Degraded after the failed refresh", degraded).await;
    // Five failed attempts in: the next retry is at least 16 s away.
    let failures = "regcred_reconcile_failures_total{kind=\"ClusterRegistryCredential\",reason=\"AwsRequestFailed\"}";
    regcred_testenv::wait_for("five failed refreshes", Duration::from_secs(90), || {
        sample(&controller.metrics(), failures).filter(|n| *n >= 5.0)
    })
    .expect("the refresh kept failing");
    let valid = password_of(&Api::<Secret>::namespaced(admin.clone(), &first).get(&name).await.unwrap());

    // A namespace joins the fan-out during the outage.
    let joined_at = std::time::Instant::now();
    let joined = labelled_namespace(&admin, "outage-joined", &[("outage", &name)]).await;
    let api = Api::<Secret>::namespaced(admin.clone(), &joined);
    let written = eventually("the joined namespace's Secret", Duration::from_secs(10), || async {
        api.get_opt(&name).await.ok().flatten()
    })
    .await;
    eprintln!("the joined namespace got its Secret after {:?}", joined_at.elapsed());
    assert_eq!(password_of(&written), valid, "the joined namespace got another token than the valid one");
    let crc = wait_cluster(&admin, &name, "both namespaces counted, Degraded, Ready", |s| {
        s.target_namespaces == Some(2)
            && s.synced_namespaces == Some(2)
            && s.failed_namespaces == Some(0)
            && degraded(s)
            && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    let status = crc.status.unwrap().credential;
    let message = &status.condition("Degraded").unwrap().message;
    assert!(
        message.contains("ServiceUnavailableException") && message.contains("keeps the current token"),
        "{message}"
    );
    let expires = status.expires_at.expect("expiresAt").0;
    assert!(expires > k8s_openapi::jiff::Timestamp::now(), "an expired token was reported as current");
    let issued: BTreeSet<String> = token_calls(&aws, &key_id).iter().map(issued_password).collect();
    assert!(issued.contains(&valid), "the token is not one AWS issued");

    // The controller restarts, still during the outage: its memory holds no token.
    controller.terminate();
    drop(controller);
    let restarted = spawn_controller(env().cp, &format!("{name}-2"), &selector, &aws.endpoint(), &args, &[]);
    let third = labelled_namespace(&admin, "outage-third", &[("outage", &name)]).await;
    let written = wait_secret(&admin, &third, &name, "written after the restart", |_| true).await;
    assert_eq!(password_of(&written), valid, "the third namespace got another token than the valid one");
    wait_cluster(&admin, &name, "three namespaces counted, Degraded, Ready", |s| {
        s.synced_namespaces == Some(3)
            && degraded(s)
            && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
    })
    .await;

    // AWS answers again: the next retry writes a new token into every namespace.
    aws.fail("ecr:GetAuthorizationToken", None).unwrap();
    let recovered = |s: &regcred::crd::ClusterCredentialStatus| {
        s.synced_namespaces == Some(3)
            && s.credential.condition("Degraded").is_some_and(|c| c.status == "False")
            && s.credential.condition("Ready").is_some_and(|c| c.status == "True")
    };
    let crcs = Api::<regcred::crd::ClusterRegistryCredential>::all(admin.clone());
    eventually("a new token after recovery", Duration::from_secs(120), || async {
        let status = crcs.get(&name).await.ok()?.status?;
        recovered(&status).then_some(())
    })
    .await;
    for ns in [&first, &joined, &third] {
        let secret = Api::<Secret>::namespaced(admin.clone(), ns).get(&name).await.unwrap();
        let password = password_of(&secret);
        assert_ne!(password, valid, "{ns} still holds the old token");
    }
    drop(restarted);
    assert_no_leaks(&admin).await;
}

/// The one password of a Secret's single login.
fn password_of(secret: &Secret) -> String {
    let logins = logins(secret);
    assert_eq!(logins.len(), 1, "one login");
    record_secret(&logins[0].2);
    logins[0].2.clone()
}

/// Issue 20, item 11: ECR gives a token's expiry on AWS's clock. With the controller's clock
/// 4 h behind AWS's, a 12 h token looked like a 16 h one, and its refresh (a quarter of the
/// lifetime before the end) fell after the token had expired. The lifetime is now measured on
/// AWS's clock (its `Date`), and Ready says the clocks differ.
#[tokio::test]
async fn a_clock_behind_aws_still_refreshes_before_the_token_expires() {
    let client = client().await;
    let aws = AwsEmulator::start().unwrap();
    aws.set_clock_offset(4 * 3600).unwrap();
    let name = format!("skew-{}", &unique()[..6]);
    let _controller =
        spawn_controller(env().cp, &name, &format!("{CONTROLLER_LABEL}={name}"), &aws.endpoint(), &[], &[]);
    let ns = namespace(&client, "ecr-skew").await;
    aws_keys(&client, &aws, &ns, "aws-keys").await;
    let before = k8s_openapi::jiff::Timestamp::now().as_second();
    create_credential_for(&client, &ns, "ecr", Some(&name), ecr_spec(json!({"secretRef": {"name": "aws-keys"}}))).await;
    let status = wait_ready(&client, &ns, "ecr", "True", Some("Synced")).await.status.unwrap();
    let after = k8s_openapi::jiff::Timestamp::now().as_second();
    let expires = status.expires_at.as_ref().expect("expiresAt").0.as_second();
    // 12 h on this machine's clock (not 16 h), never later than the real expiry.
    assert!((before + 12 * 3600 - 2..=after + 12 * 3600).contains(&expires), "expires {} s from now", expires - before);
    let refresh = status.next_refresh_at.as_ref().expect("nextRefreshAt").0.as_second();
    assert!(refresh < expires - 2 * 3600, "refresh {} s before the expiry", expires - refresh);
    let ready = status.condition("Ready").unwrap();
    assert!(ready.message.contains("clock is 4h00m behind AWS's"), "{}", ready.message);
}

/// The registry checks of ECR credentials take ECR's flow, over HTTPS through the
/// environment's proxy (the only way to an ECR host here): `GET /v2/`, ECR's Basic challenge,
/// the token as `AWS:<password>`, then the repository's manifest. A registry that does not let
/// the credential's account in denies the repository (`Forbidden`: 403), and a password ECR
/// never issued gets the challenge again (`Unauthorized`: 401).
#[tokio::test]
async fn ecr_credentials_are_verified_through_ecrs_basic_challenge() {
    use regcred_testenv::{ConnectProxy, Registry};
    let client = client().await;
    let aws = AwsEmulator::start().unwrap();
    // The keys' account's own registry, and another account's that does not let it in.
    let foreign_host = "210987654321.dkr.ecr.eu-west-1.amazonaws.com";
    let own = Registry::start_ecr(&aws, REGISTRY, &[]).unwrap();
    let foreign = Registry::start_ecr(&aws, foreign_host, &[]).unwrap();
    let proxy = ConnectProxy::start().unwrap();
    proxy.route(&format!("{REGISTRY}:443"), own.port());
    proxy.route(&format!("{foreign_host}:443"), foreign.port());
    // ECR's challenge, word for word, over HTTPS with the registry's CA.
    let http = regcred::http::client(Some(own.ca_pem().unwrap().as_bytes()), "the registry's CA").unwrap();
    let ping = http.get(format!("{}/v2/", own.url())).send().await.unwrap();
    assert_eq!(ping.status(), 401);
    let challenge = format!(r#"Basic realm="https://{REGISTRY}/",service="ecr.amazonaws.com""#);
    assert_eq!(ping.headers()["www-authenticate"], challenge.as_str());
    assert_eq!(ping.text().await.unwrap(), "Not Authorized\n");

    let name = format!("ecr-verify-{}", &unique()[..6]);
    // As README says a cluster behind a proxy runs it: HTTPS_PROXY, with the apiserver and the
    // AWS endpoint (on loopback here) in NO_PROXY. kube's client reads both too.
    let envs = [("HTTPS_PROXY", proxy.url()), ("NO_PROXY", "127.0.0.1,localhost".to_string())];
    let _controller =
        spawn_controller(env().cp, &name, &format!("{CONTROLLER_LABEL}={name}"), &aws.endpoint(), &[], &envs);
    let ns = namespace(&client, "ecr-verify").await;
    aws_keys(&client, &aws, &ns, "aws-keys").await;
    let bundle = format!("{}{}", own.ca_pem().unwrap(), foreign.ca_pem().unwrap());
    create_secret(&client, &ns, "ca", &[("ca.crt", bundle.as_bytes())]).await;

    // An image to check for, pushed with a token the controller got.
    create_credential_for(&client, &ns, "pusher", Some(&name), ecr_spec(json!({"secretRef": {"name": "aws-keys"}})))
        .await;
    let pusher = logins(&wait_secret(&client, &ns, "pusher", "written", |_| true).await)[0].2.clone();
    record_secret(&pusher);
    own.push_test_image("team/app", "v1", "AWS", &pusher).unwrap();
    let since = aws.calls().unwrap().len();

    let verify = json!({"repository": "team/app", "reference": "v1", "caBundle": {"secret": {"name": "ca"}}});
    let auth = json!({"secretRef": {"name": "aws-keys"}});
    for (credential, host) in [("own", REGISTRY), ("foreign", foreign_host)] {
        let spec = json!({"verify": verify, "source": {"ecr": {"registry": host, "auth": auth}}});
        create_credential_for(&client, &ns, credential, Some(&name), spec).await;
    }
    let made_up = secret_value("AWS", "made-up-ecr");
    create_secret(&client, &ns, "made-up", &[("password", made_up.as_bytes())]).await;
    let spec = json!({"registry": REGISTRY, "verify": verify,
                      "source": {"basic": {"username": "AWS", "passwordSecretRef": {"name": "made-up"}}}});
    create_credential_for(&client, &ns, "made-up", Some(&name), spec).await;

    let verified = crate::verify::wait_verified(&client, &ns, "own", "True", "Verified").await;
    assert_eq!(verified, format!("{REGISTRY}: HEAD /v2/team/app/manifests/v1: 200 OK"));
    let denied = crate::verify::wait_verified(&client, &ns, "foreign", "False", "Forbidden").await;
    assert_eq!(
        denied,
        format!("{foreign_host}: the login has no pull on team/app: HEAD /v2/team/app/manifests/v1: 403 Forbidden")
    );
    let refused = crate::verify::wait_verified(&client, &ns, "made-up", "False", "Unauthorized").await;
    assert_eq!(refused, format!("{REGISTRY}: the registry refused the login: GET /v2/: 401 Unauthorized"));

    // ECR's flow, as the registries decided it: the challenge, then the live token.
    let own_token = logins(&wait_secret(&client, &ns, "own", "written", |_| true).await)[0].2.clone();
    let own_expiry = token_calls(&aws, "")
        .into_iter()
        .find(|c| issued_password(c) == own_token)
        .expect("the emulator issued the Secret's token")["expiresAt"]
        .as_f64();
    let decisions: Vec<Value> =
        aws.calls().unwrap().split_off(since).into_iter().filter(|c| c["action"] == "registry:Login").collect();
    let seen = |registry: &str, method: &str, path: &str, status: u16, error: &str| {
        decisions.iter().any(|d| {
            d["registry"] == registry
                && d["method"] == method
                && d["path"] == path
                && d["status"] == status
                && d["error"] == error
        })
    };
    let manifest = "/v2/team/app/manifests/v1";
    assert!(seen("123456789012", "GET", "/v2/", 401, "no Basic credentials"), "no challenge: {decisions:?}");
    assert!(
        decisions.iter().any(|d| d["registry"] == "123456789012"
            && d["path"] == manifest
            && d["status"] == 200
            && d["expiresAt"].as_f64() == own_expiry),
        "{decisions:?}"
    );
    assert!(seen("123456789012", "GET", "/v2/", 401, "unknown token"), "{decisions:?}");
    assert!(seen("210987654321", "HEAD", manifest, 403, "account not allowed"), "{decisions:?}");
    let tunnels: BTreeSet<String> = proxy.tunnels().into_iter().collect();
    assert_eq!(tunnels, BTreeSet::from([format!("{REGISTRY}:443"), format!("{foreign_host}:443")]));
    assert_no_leaks(&client).await;
}

/// An ECR fan-out writes each Secret once: the reconciles after its sync (the one its own
/// status patch brings, and one after a touch of the credential) find every Secret current
/// and write none (the rotation bench saw 1,000 creates and then 1,000 patches of the same
/// token at 1,000 namespaces).
#[tokio::test]
async fn an_ecr_fan_out_writes_each_secret_once() {
    const TARGETS: usize = 12;
    let admin = client().await;
    let aws = &env().aws;
    let name = format!("ecr-once-{}", &unique()[..6]);
    let selector = format!("{CONTROLLER_LABEL}={name}");
    let controller = spawn_controller(env().cp, &name, &selector, &aws.endpoint(), &[], &[]);
    let platform = namespace(&admin, "ecr-once-platform").await;
    create_aws_keys(&admin, aws, &platform, "aws-keys", "secretkey").await;
    let mut targets = Vec::new();
    for _ in 0..TARGETS {
        targets.push(namespace(&admin, "ecr-once").await);
    }
    let offset = audit_offset();
    let spec = json!({
        "source": {"ecr": {"registry": REGISTRY, "auth": {"secretRef": {"name": "aws-keys", "namespace": platform}}}},
        "namespaces": {"names": targets},
    });
    create_cluster_credential_for(&admin, &name, Some(&name), spec).await;
    wait_cluster(&admin, &name, "every namespace synced", |s| s.synced_namespaces == Some(TARGETS as u32)).await;
    // A reconcile that starts after the sync: it sees every Secret the sync wrote.
    let reconciles = |metrics: &str| sample(metrics, "regcred_reconciles_total{kind=\"ClusterRegistryCredential\"");
    let before = reconciles(&controller.metrics()).unwrap_or_default();
    let touch = json!({"metadata": {"annotations": {"test.regcred.dev/touch": "1"}}});
    let api = Api::<regcred::crd::ClusterRegistryCredential>::all(admin.clone());
    api.patch(&name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&touch)).await.unwrap();
    regcred_testenv::wait_for("a reconcile after the touch", TIMEOUT, || {
        reconciles(&controller.metrics()).filter(|n| *n > before)
    })
    .expect("the touched credential was reconciled");
    let writes: Vec<(String, String)> = controller_requests_since(offset)
        .into_iter()
        .filter(|(verb, resource, namespace, _)| resource == "secrets" && targets.contains(namespace) && is_write(verb))
        .map(|(verb, _, namespace, _)| (verb, namespace))
        .collect();
    let creates = writes.iter().filter(|(verb, _)| verb == "create").count();
    assert_eq!((creates, writes.len()), (TARGETS, TARGETS), "one create per namespace and nothing else: {writes:?}");
}
