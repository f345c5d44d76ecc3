//! AWS ECR: GetAuthorizationToken with one of three identities, a token shared by every
//! credential of the same identity, refreshed when a share of its lifetime is left.

mod cache;
mod clock;
pub mod host;
mod identity;

use aws_sdk_ecr::{config::Region, error::ProvideErrorMetadata};
use aws_smithy_http_client::tls;
use base64::{Engine, engine::general_purpose::STANDARD};
use clock::Exchange;
use k8s_openapi::jiff::Timestamp;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

pub use crate::source::token_cache::refresh_time;
pub use cache::{CacheKey, Failure, FetchError, Token, TokenCache};

pub use host::{EcrHost, ecr_host_pattern, parse_ecr_host};
pub use identity::{Identity, ROLE_ARN_ANNOTATION, STS_AUDIENCE};

use super::{
    CredentialProvider, Credentials, SecretReader, SourceContext,
    token_cache::{Cached, Cloud},
};
use crate::{Error, crd::EcrSource, dockerconfig::RegistryAuth, metrics::Metrics};

// A token must stay valid at least `MIN_VALIDITY` after it is written (real tokens live 12 h;
// this only rejects answers that are already stale).
use crate::source::token_cache::MIN_VALIDITY;

/// How ECR sources behave, from the controller's flags.
#[derive(Clone, Debug)]
pub struct EcrSettings {
    /// Whether namespaced credentials may use the controller's own AWS identity.
    pub allow_ambient_for_namespaced: bool,
    /// Refresh when this share of the token's lifetime is left (0.25: about 9 h into 12 h).
    pub refresh_share_left: f64,
    /// AWS endpoint override (ECR and STS), e.g. for an emulator. `AWS_ENDPOINT_URL*`
    /// environment variables work too.
    pub endpoint_url: Option<String>,
    /// Whether IRSA may request ServiceAccount tokens; off where the install grants no
    /// `serviceaccounts/token` (chart value `irsa.enabled=false`).
    pub irsa: bool,
}

impl Default for EcrSettings {
    fn default() -> Self {
        Self { allow_ambient_for_namespaced: false, refresh_share_left: 0.25, endpoint_url: None, irsa: true }
    }
}

/// What every ECR source shares: settings, the AWS base configuration, the token cache,
/// and a Kubernetes client for TokenRequest.
pub struct EcrProvider {
    settings: EcrSettings,
    client: kube::Client,
    metrics: Arc<Metrics>,
    sdk: OnceCell<aws_config::SdkConfig>,
    pub tokens: TokenCache,
}

impl EcrProvider {
    pub fn new(client: kube::Client, settings: EcrSettings, metrics: Arc<Metrics>) -> Self {
        Self { settings, client, metrics, sdk: OnceCell::new(), tokens: TokenCache::default() }
    }

    /// Counts an AWS call, and its failure code if it failed.
    fn record<T>(&self, operation: &str, result: &Result<T, Failure>) {
        self.metrics.provider_call(operation, result.as_ref().err().map(|f| f.code.as_deref()));
    }

    /// The AWS base configuration, loaded on first use (so a cluster without ECR sources never
    /// probes for AWS credentials).
    async fn sdk_config(&self) -> &aws_config::SdkConfig {
        self.sdk
            .get_or_init(|| async {
                let http = aws_smithy_http_client::Builder::new()
                    .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
                    .build_https();
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
                if let Some(url) = &self.settings.endpoint_url {
                    loader = loader.endpoint_url(url);
                }
                loader.load().await
            })
            .await
    }
}

/// The registries an ECR source writes, and where to ask for their token.
struct Target {
    region: String,
    fips: bool,
    /// Hosts to write the token under; empty means the identity's own registry.
    hosts: Vec<String>,
}

impl Target {
    fn of(source: &EcrSource) -> Result<Target, Error> {
        match (&source.registry, &source.region) {
            (Some(registry), _) => {
                let host = parse_ecr_host(registry)
                    .map_err(|problem| Error::InvalidRegistry { host: registry.clone(), problem })?;
                Ok(Target { region: host.region, fips: host.fips, hosts: vec![registry.to_ascii_lowercase()] })
            }
            (None, Some(region)) => {
                let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
                let mut hosts: Vec<String> =
                    source.registry_ids.iter().map(|id| format!("{id}.dkr.ecr.{region}.{suffix}")).collect();
                hosts.sort();
                hosts.dedup();
                Ok(Target { region: region.clone(), fips: false, hosts })
            }
            (None, None) => Err(Error::MissingObjectField("spec.source.ecr.registry or region")),
        }
    }
}

impl CredentialProvider for EcrSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let provider = ctx.ecr.ok_or(Error::EcrUnavailable)?;
        let target = Target::of(self)?;
        let mut notes = Vec::new();
        let (identity, identity_key) = Identity::resolve(self, ctx, provider, &mut notes).await?;
        let key = CacheKey {
            identity: identity_key,
            region: target.region.clone(),
            fips: target.fips,
            assume_role: self.assume_role.clone(),
        };
        let fingerprint = key.fingerprint();
        if let Some(previous) = ctx.previous.filter(|p| p.identity == fingerprint)
            && let Some(token) = reusable(previous, &target.hosts)
        {
            provider.tokens.seed(key.clone(), token);
        }
        // After a failed refresh, the token it was to replace while that is still valid.
        let Cached { token, refresh_failed } =
            provider.tokens.get_or_fetch(key, || get_authorization_token(provider, &identity, &target, self)).await?;
        let hosts = if target.hosts.is_empty() { vec![token.proxy_host.clone()] } else { target.hosts };
        Ok(Credentials {
            auths: hosts
                .into_iter()
                .map(|server| RegistryAuth {
                    server,
                    username: token.username.clone(),
                    password: token.password.clone(),
                })
                .collect(),
            expires_at: Some(token.expires_at),
            refresh_at: Some(token.refresh_at),
            identity: Some(fingerprint),
            notes: notes.into_iter().chain(token.clock_note.clone()).collect(),
            refresh_failed,
        })
    }
}

/// The token a live Secret holds, if it serves exactly the registries wanted and is not due.
fn reusable(previous: &super::PreviousToken, hosts: &[String]) -> Option<Token> {
    previous.reusable(hosts).map(|login| Token {
        username: login.username.clone(),
        password: login.password.clone(),
        proxy_host: login.server.clone(),
        expires_at: previous.expires_at,
        refresh_at: previous.refresh_at,
        clock_note: None,
    })
}

async fn get_authorization_token(
    provider: &EcrProvider,
    identity: &Identity,
    target: &Target,
    source: &EcrSource,
) -> Result<Token, FetchError> {
    let credentials = identity.credentials(provider, &target.region, source.assume_role.as_ref()).await?;
    let sdk = provider.sdk_config().await;
    let config = aws_sdk_ecr::config::Builder::from(sdk)
        .region(Region::new(target.region.clone()))
        .use_fips(target.fips)
        .credentials_provider(credentials)
        .build();
    let server_date = clock::ServerDate::default();
    let sent_at = Timestamp::now();
    let result = aws_sdk_ecr::Client::from_conf(config)
        .get_authorization_token()
        .customize()
        .interceptor(server_date.clone())
        .send()
        .await
        .map_err(|e| aws_failure("ecr:GetAuthorizationToken", &e))
        .and_then(|out| {
            let call = Exchange { sent_at, received_at: Timestamp::now(), server_date: server_date.get() };
            token_from(out.authorization_data(), &call, provider.settings.refresh_share_left).map_err(|e| Failure {
                cloud: Cloud::Aws,
                operation: "ecr:GetAuthorizationToken",
                code: None,
                message: match e {
                    Error::InvalidAwsAnswer { problem, .. } => problem,
                    other => other.to_string(),
                },
            })
        });
    provider.record("ecr:GetAuthorizationToken", &result);
    result.map_err(FetchError::Provider)
}

/// Decodes GetAuthorizationToken's answer to `call`: the expiry is laid on the local clock
/// ([`clock::local_expiry`]). A missing or already-past expiry is an error, not a token:
/// writing it would break pulls, and rotating it would loop.
fn token_from(
    data: &[aws_sdk_ecr::types::AuthorizationData],
    call: &Exchange,
    share_left: f64,
) -> Result<Token, Error> {
    let now = call.received_at;
    let invalid =
        |problem: &str| Error::InvalidAwsAnswer { operation: "ecr:GetAuthorizationToken", problem: problem.into() };
    let entry = data.first().ok_or_else(|| invalid("no authorization data"))?;
    let expires_at = entry
        .expires_at()
        .and_then(|t| std::time::SystemTime::try_from(*t).ok())
        .and_then(|t| Timestamp::try_from(t).ok())
        .ok_or_else(|| invalid("the token has no expiry"))?;
    let clock::LocalExpiry { expires_at, skew } = clock::local_expiry(expires_at, call);
    if expires_at < now + MIN_VALIDITY {
        return Err(invalid(&format!("the token expires at {expires_at}, which is not in the future")));
    }
    let decoded = entry
        .authorization_token()
        .and_then(|t| STANDARD.decode(t).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .map(SecretString::from)
        .ok_or_else(|| invalid("the token is not base64 text"))?;
    let (username, password) =
        decoded.expose_secret().split_once(':').ok_or_else(|| invalid("the token is not user:password"))?;
    let endpoint = entry.proxy_endpoint().ok_or_else(|| invalid("the answer has no proxy endpoint"))?;
    Ok(Token {
        username: username.into(),
        password: password.into(),
        proxy_host: endpoint.trim_start_matches("https://").trim_end_matches('/').to_string(),
        expires_at,
        refresh_at: refresh_time(now, expires_at, share_left),
        clock_note: skew.and_then(clock::skew_note),
    })
}

/// An AWS error as code and message (AWS messages name principals and actions, not keys).
fn aws_failure<E: ProvideErrorMetadata>(operation: &'static str, error: &E) -> Failure {
    let code = Some(error.code().unwrap_or("Unreachable").to_string());
    let message = error
        .message()
        .map(|m| m.chars().take(300).collect())
        .unwrap_or_else(|| "no answer from the AWS endpoint".into());
    Failure { cloud: Cloud::Aws, operation, code, message }
}

#[cfg(test)]
mod tests {
    use aws_sdk_ecr::{primitives::DateTime, types::AuthorizationData};
    use secrecy::ExposeSecret;

    use super::*;

    fn data(token: &str, expires_in: i64) -> AuthorizationData {
        AuthorizationData::builder()
            .authorization_token(STANDARD.encode(token))
            .proxy_endpoint("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com")
            .expires_at(DateTime::from_secs(Timestamp::now().as_second() + expires_in))
            .build()
    }

    fn previous(servers: &[&str], refresh_in: i64) -> crate::source::PreviousToken {
        previous_expiring(servers, refresh_in, 43200)
    }

    fn previous_expiring(servers: &[&str], refresh_in: i64, expires_in: i64) -> crate::source::PreviousToken {
        let now = Timestamp::now();
        crate::source::PreviousToken {
            identity: "f".into(),
            auths: servers
                .iter()
                .map(|s| RegistryAuth { server: s.to_string(), username: "AWS".into(), password: "pw".into() })
                .collect(),
            expires_at: now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(expires_in)).unwrap(),
            refresh_at: now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(refresh_in)).unwrap(),
        }
    }

    /// Item 6: only a token for exactly the wanted registries, still valid, is reused (one due
    /// for refresh too, since issue 20 item 8: it is asked for again at once, and kept only
    /// while that fails).
    #[test]
    fn a_live_token_is_reused_only_for_the_same_registries_while_valid() {
        let hosts = vec!["a.dkr.ecr.eu-west-1.amazonaws.com".to_string()];
        let token = reusable(&previous(&["a.dkr.ecr.eu-west-1.amazonaws.com"], 600), &hosts).unwrap();
        assert_eq!(token.password.expose_secret(), "pw");
        assert!(reusable(&previous(&["a.dkr.ecr.eu-west-1.amazonaws.com"], -1), &hosts).is_some(), "due, valid");
        let expiring = previous_expiring(&["a.dkr.ecr.eu-west-1.amazonaws.com"], -10, 5);
        assert!(reusable(&expiring, &hosts).is_none(), "valid for less than MIN_VALIDITY");
        assert!(reusable(&previous(&["b.dkr.ecr.eu-west-1.amazonaws.com"], 600), &hosts).is_none(), "other host");
        let two = ["a.dkr.ecr.eu-west-1.amazonaws.com", "b.dkr.ecr.eu-west-1.amazonaws.com"];
        assert!(reusable(&previous(&two, 600), &hosts).is_none(), "more hosts than wanted");
        assert!(reusable(&previous(&["own.dkr.ecr.eu-west-1.amazonaws.com"], 600), &[]).is_some(), "own registry");
    }

    #[test]
    fn decodes_user_password_and_the_proxy_host() {
        let token = token_from(&[data("AWS:pa:ss", 43200)], &Exchange::at(Timestamp::now()), 0.25).unwrap();
        assert_eq!(token.proxy_host, "123456789012.dkr.ecr.eu-west-1.amazonaws.com");
        assert_eq!(token.username, "AWS");
        assert_eq!(token.password.expose_secret(), "pa:ss");
        assert!(token.refresh_at < token.expires_at);
    }

    /// Neither the decoded token nor the token as it came (base64 of `AWS:password`) shows
    /// in `Debug`, be it of the token, of what the cache hands out or of the logins made of it.
    #[tokio::test]
    async fn a_token_shows_no_password() {
        let token = token_from(&[data("AWS:hunter2-ecr", 43200)], &Exchange::at(Timestamp::now()), 0.25).unwrap();
        let cache = TokenCache::default();
        let key = CacheKey { identity: "ambient".into(), region: "eu-west-1".into(), fips: false, assume_role: None };
        assert!(cache.seed(key.clone(), token));
        let cached =
            cache.get_or_fetch(key, || async { Err(FetchError::Other(Error::EcrUnavailable)) }).await.unwrap().token;
        let login = RegistryAuth { server: "h".into(), username: "AWS".into(), password: cached.password.clone() };
        for shown in [format!("{cached:?}"), format!("{login:?}")] {
            crate::test_support::assert_hidden(&shown, "hunter2-ecr");
            crate::test_support::assert_hidden(&shown, "AWS:hunter2-ecr");
        }
    }

    #[test]
    fn expired_or_undated_tokens_are_errors() {
        let now = Timestamp::now();
        for bad in [data("AWS:x", -10), data("AWS:x", 5)] {
            let err = token_from(&[bad], &Exchange::at(now), 0.25).unwrap_err();
            assert!(err.to_string().contains("not in the future"), "{err}");
        }
        let undated = AuthorizationData::builder()
            .authorization_token(STANDARD.encode("AWS:x"))
            .proxy_endpoint("https://h")
            .build();
        assert!(token_from(&[undated], &Exchange::at(now), 0.25).unwrap_err().to_string().contains("no expiry"));
        let garbage = AuthorizationData::builder()
            .authorization_token("%%%")
            .proxy_endpoint("https://h")
            .expires_at(DateTime::from_secs(now.as_second() + 3600))
            .build();
        let err = token_from(&[garbage], &Exchange::at(now), 0.25).unwrap_err().to_string();
        assert!(err.contains("not base64") && !err.contains("%%%"), "{err}");
        assert!(token_from(&[], &Exchange::at(now), 0.25).is_err());
    }

    proptest::proptest! {
        /// Any token text: decoded to user and password when it has a colon, an error (that
        /// does not quote it) otherwise; never a panic.
        #[test]
        fn token_decoding_never_panics_or_quotes(token in "\\PC{0,80}", expires_in in -100i64..100_000) {
            let now = Timestamp::now();
            match token_from(&[data(&token, expires_in)], &Exchange::at(now), 0.25) {
                Ok(decoded) => {
                    let (user, password) = token.split_once(':').unwrap();
                    proptest::prop_assert_eq!(decoded.username, user);
                    proptest::prop_assert_eq!(decoded.password.expose_secret(), password);
                    proptest::prop_assert!(decoded.refresh_at < decoded.expires_at);
                }
                Err(error) => {
                    let message = error.to_string();
                    proptest::prop_assert!(token.len() < 4 || !message.contains(&token), "{}", message);
                }
            }
        }
    }
}
