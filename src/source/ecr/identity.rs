//! The AWS identity an ECR source asks with: access keys from a Secret, IRSA for a tenant's
//! ServiceAccount, or the controller's own (ambient) identity, optionally through an assumed role.

use std::time::SystemTime;

use aws_credential_types::{Credentials, provider::SharedCredentialsProvider};
use aws_sdk_sts::config::Region;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use secrecy::ExposeSecret;

use super::{EcrProvider, FetchError, aws_failure};
use crate::{
    Error,
    crd::{AssumeRole, EcrAuth, EcrSource, SecretKeyRef},
    source::{SecretReader, SourceContext, read_password, service_account_token, token_cache},
};

/// The annotation EKS puts the IRSA role on.
pub const ROLE_ARN_ANNOTATION: &str = "eks.amazonaws.com/role-arn";
/// Audience of the ServiceAccount tokens STS accepts.
pub const STS_AUDIENCE: &str = "sts.amazonaws.com";

/// An identity resolved far enough to name it (for the cache), without calling AWS.
pub enum Identity {
    Keys(Credentials),
    WebIdentity { namespace: String, service_account: String, role_arn: String },
    Ambient,
}

impl Identity {
    /// Resolves the source's identity. Reads Kubernetes only: the access-key Secret or the
    /// ServiceAccount (for its role annotation). What it changed in the keys goes to `notes`.
    pub async fn resolve<R: SecretReader>(
        source: &EcrSource,
        ctx: &SourceContext<'_, R>,
        provider: &EcrProvider,
        notes: &mut Vec<String>,
    ) -> Result<(Identity, String), Error> {
        match &source.auth {
            EcrAuth::SecretRef(keys) => {
                let key = |k: &Option<String>, default: &str| SecretKeyRef {
                    name: keys.name.clone(),
                    namespace: keys.namespace.clone(),
                    key: Some(k.clone().unwrap_or_else(|| default.into())),
                };
                let id = read_password(ctx, &key(&keys.access_key_id_key, "accessKeyId"), "", notes).await?;
                let secret =
                    read_password(ctx, &key(&keys.secret_access_key_key, "secretAccessKey"), "", notes).await?;
                let token = match read_password(ctx, &key(&keys.session_token_key, "sessionToken"), "", notes).await {
                    Ok(token) => Some(token),
                    Err(Error::SourceKeyMissing { .. }) => None,
                    Err(other) => return Err(other),
                };
                // The cache key proves possession: only the same key material finds the token.
                let parts: Vec<&str> = [Some(&id), Some(&secret), token.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|p| p.expose_secret())
                    .collect();
                let cache_key = format!("keys:{}", token_cache::digest(&parts));
                let credentials = Credentials::new(
                    id.expose_secret(),
                    secret.expose_secret(),
                    token.map(|t| t.expose_secret().to_string()),
                    None,
                    "regcred-secret",
                );
                Ok((Identity::Keys(credentials), cache_key))
            }
            EcrAuth::ServiceAccountRef(sa) => {
                if !provider.settings.irsa {
                    return Err(Error::IrsaDisabled);
                }
                let namespace = ctx.resolve_namespace(sa.namespace.as_deref())?;
                let account = Api::<ServiceAccount>::namespaced(provider.client.clone(), &namespace)
                    .get_opt(&sa.name)
                    .await?
                    .ok_or_else(|| Error::ServiceAccountNotFound {
                        namespace: namespace.clone(),
                        name: sa.name.clone(),
                    })?;
                let annotated = account.metadata.annotations.as_ref().and_then(|a| a.get(ROLE_ARN_ANNOTATION));
                let role_arn = sa
                    .role_arn
                    .clone()
                    .or_else(|| annotated.cloned())
                    .ok_or_else(|| Error::NoRoleArn { namespace: namespace.clone(), name: sa.name.clone() })?;
                // The uid keeps a deleted-and-recreated ServiceAccount from inheriting a token.
                let uid = account.metadata.uid.unwrap_or_default();
                let cache_key = format!("irsa:{namespace}/{}/{uid}/{role_arn}", sa.name);
                Ok((Identity::WebIdentity { namespace, service_account: sa.name.clone(), role_arn }, cache_key))
            }
            EcrAuth::Ambient(_) => {
                if !ctx.cluster_scoped && !provider.settings.allow_ambient_for_namespaced {
                    return Err(Error::AmbientIdentityNotAllowed);
                }
                Ok((Identity::Ambient, "ambient".into()))
            }
        }
    }

    /// AWS credentials for this identity, after the optional assumed role. Calls STS for web
    /// identities and assumed roles.
    pub async fn credentials(
        &self,
        provider: &EcrProvider,
        region: &str,
        assume_role: Option<&AssumeRole>,
    ) -> Result<SharedCredentialsProvider, FetchError> {
        let sdk = provider.sdk_config().await;
        let sts_with = |credentials: Option<SharedCredentialsProvider>| {
            let mut config = aws_sdk_sts::config::Builder::from(sdk).region(Region::new(region.to_string()));
            if let Some(credentials) = credentials {
                config = config.credentials_provider(credentials);
            }
            aws_sdk_sts::Client::from_conf(config.build())
        };
        let base = match self {
            Identity::Keys(credentials) => SharedCredentialsProvider::new(credentials.clone()),
            Identity::Ambient => sdk.credentials_provider().ok_or(Error::AmbientIdentityMissing)?,
            Identity::WebIdentity { namespace, service_account, role_arn } => {
                let token = service_account_token(&provider.client, namespace, service_account, STS_AUDIENCE).await?;
                let out = sts_with(None)
                    .assume_role_with_web_identity()
                    .role_arn(role_arn)
                    .role_session_name(session_name(&format!("regcred-{namespace}-{service_account}")))
                    .web_identity_token(token.expose_secret())
                    .send()
                    .await
                    .map_err(|e| aws_failure("sts:AssumeRoleWithWebIdentity", &e));
                provider.record("sts:AssumeRoleWithWebIdentity", &out);
                let out = out.map_err(FetchError::Provider)?;
                SharedCredentialsProvider::new(sts_credentials(out.credentials(), "sts:AssumeRoleWithWebIdentity")?)
            }
        };
        let Some(role) = assume_role else {
            return Ok(base);
        };
        let out = sts_with(Some(base))
            .assume_role()
            .role_arn(&role.role_arn)
            .role_session_name(role.session_name.clone().unwrap_or_else(|| "regcred".into()))
            .set_external_id(role.external_id.clone())
            .send()
            .await
            .map_err(|e| aws_failure("sts:AssumeRole", &e));
        provider.record("sts:AssumeRole", &out);
        let out = out.map_err(FetchError::Provider)?;
        Ok(SharedCredentialsProvider::new(sts_credentials(out.credentials(), "sts:AssumeRole")?))
    }
}

fn sts_credentials(
    credentials: Option<&aws_sdk_sts::types::Credentials>,
    operation: &'static str,
) -> Result<Credentials, Error> {
    let c = credentials.ok_or(Error::InvalidAwsAnswer { operation, problem: "no credentials".into() })?;
    let expiry = SystemTime::try_from(*c.expiration()).ok();
    Ok(Credentials::new(
        c.access_key_id(),
        c.secret_access_key(),
        Some(c.session_token().to_string()),
        expiry,
        "regcred-sts",
    ))
}

/// A role session name within STS's rules: `[\w+=,.@-]`, at most 64 characters.
fn session_name(wanted: &str) -> String {
    wanted.chars().map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' }).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn access_keys_lose_one_trailing_line_ending() {
        use crate::source::{LocalSecrets, ecr::EcrSettings};
        let secrets = LocalSecrets::default().with(
            "team",
            "aws",
            &[
                ("accessKeyId", b"AKIAEXAMPLE\n"),
                ("secretAccessKey", b"wJalrSECRET\r\n"),
                ("sessionToken", b"FwoSESSION"),
            ],
        );
        let ctx = SourceContext::offline("team", None, &secrets);
        let source: EcrSource = serde_json::from_value(serde_json::json!({
            "registry": "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            "auth": {"secretRef": {"name": "aws"}},
        }))
        .unwrap();
        // Never called: keys from a Secret need no Kubernetes or AWS request.
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let provider = EcrProvider::new(client, EcrSettings::default(), Default::default());
        let mut notes = Vec::new();
        let (identity, _) = Identity::resolve(&source, &ctx, &provider, &mut notes).await.unwrap();
        let Identity::Keys(keys) = identity else { panic!("keys expected") };
        assert_eq!(keys.access_key_id(), "AKIAEXAMPLE");
        assert_eq!(keys.secret_access_key(), "wJalrSECRET");
        assert_eq!(keys.session_token(), Some("FwoSESSION"));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("key \"accessKeyId\" of Secret team/aws ended in "), "{notes:?}");
        assert!(notes[1].starts_with("key \"secretAccessKey\" of Secret team/aws ended in "), "{notes:?}");
        assert!(!notes.iter().any(|n| n.contains("AKIA") || n.contains("SECRET")), "{notes:?}");
        for secret in ["wJalrSECRET", "FwoSESSION"] {
            crate::test_support::assert_hidden(&format!("{keys:?}"), secret);
        }
    }

    /// The IRSA token is a secret from the TokenRequest answer on.
    #[tokio::test]
    async fn a_service_account_token_shows_no_value() {
        let service = tower::service_fn(|request: http::Request<kube::client::Body>| async move {
            assert_eq!(request.uri().path(), "/api/v1/namespaces/team/serviceaccounts/puller/token");
            let answer = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [STS_AUDIENCE]},
                "status": {"token": "hunter2-jwt", "expirationTimestamp": "2030-01-01T00:00:00Z"}});
            let body = kube::client::Body::from(serde_json::to_vec(&answer).unwrap());
            let response = http::Response::builder().status(201).header("content-type", "application/json").body(body);
            Ok::<_, std::convert::Infallible>(response.unwrap())
        });
        let client = kube::Client::new(service, "default");
        let token = service_account_token(&client, "team", "puller", STS_AUDIENCE).await.unwrap();
        assert_eq!(token.expose_secret(), "hunter2-jwt");
        crate::test_support::assert_hidden(&format!("{token:?}"), "hunter2-jwt");
    }

    /// Credentials from STS go into the SDK's own type, whose `Debug` redacts them as well.
    #[test]
    fn assumed_role_credentials_show_no_secret() {
        let answer = aws_sdk_sts::types::Credentials::builder()
            .access_key_id("ASIAEXAMPLE")
            .secret_access_key("hunter2-secret-key")
            .session_token("hunter2-session")
            .expiration(aws_sdk_sts::primitives::DateTime::from_secs(2_000_000_000))
            .build()
            .unwrap();
        let credentials = sts_credentials(Some(&answer), "sts:AssumeRole").unwrap();
        assert_eq!(credentials.secret_access_key(), "hunter2-secret-key");
        for shown in [format!("{answer:?}"), format!("{credentials:?}")] {
            crate::test_support::assert_hidden(&shown, "hunter2-secret-key");
            crate::test_support::assert_hidden(&shown, "hunter2-session");
        }
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(session_name("regcred-team-a-puller"), "regcred-team-a-puller");
        assert_eq!(session_name("a b/c"), "a-b-c");
        assert_eq!(session_name(&"x".repeat(100)).len(), 64);
    }
}
