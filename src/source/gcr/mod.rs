//! Google Container Registry and Artifact Registry. The Secret holds `oauth2accesstoken` and
//! an access token of about an hour, obtained with a service-account key (JWT bearer grant),
//! Workload Identity Federation for a Kubernetes ServiceAccount (TokenRequest, then STS), or
//! the controller's own identity (the metadata server), optionally impersonating another
//! service account. Tokens are shared per identity through [`super::token_cache`], as ECR's
//! are. `login: JsonKey` writes the key itself as `_json_key`, as `docker login` would.

mod google;
mod key;

use std::sync::Arc;

use k8s_openapi::{api::core::v1::ServiceAccount, jiff::Timestamp};
use kube::Api;
use secrecy::SecretString;

use super::{
    CredentialProvider, Credentials, SecretReader, SourceContext, read_key, service_account_token, single_login,
    token_cache::{self, Cloud, Expiring, Failure, refresh_time},
};
use crate::{
    Error,
    crd::{GcrSource, KeyLogin},
    dockerconfig::RegistryAuth,
    metrics::Metrics,
};
use key::ServiceAccountKey;

/// Default registry for a gcr source.
pub const GCR_HOST: &str = "gcr.io";
/// The username Google's registries expect with a JSON key.
pub const JSON_KEY_USERNAME: &str = "_json_key";
/// The username Google's registries expect with an access token.
pub const ACCESS_TOKEN_USERNAME: &str = "oauth2accesstoken";
/// Default key of the key file in its Secret.
const KEY_FILE: &str = "key.json";

/// How gcr sources behave, from the controller's flags.
#[derive(Clone, Debug)]
pub struct GcpSettings {
    /// Whether namespaced credentials may use the controller's own Google identity.
    pub allow_ambient_for_namespaced: bool,
    /// Refresh a token when this share of its lifetime is left.
    pub refresh_share_left: f64,
    /// Whether the controller may request ServiceAccount tokens (`--disable-irsa` turns
    /// Workload Identity Federation off too).
    pub service_account_tokens: bool,
    /// Google STS's token exchange.
    pub sts_url: String,
    /// IAM Credentials, for impersonation.
    pub iam_credentials_url: String,
    /// The metadata server, `host[:port]` (`GCE_METADATA_HOST`).
    pub metadata_host: String,
    /// Token endpoints a key's `token_uri` may name besides Google's own.
    pub extra_token_uris: Vec<String>,
}

impl Default for GcpSettings {
    fn default() -> Self {
        Self {
            allow_ambient_for_namespaced: false,
            refresh_share_left: 0.25,
            service_account_tokens: true,
            sts_url: "https://sts.googleapis.com/v1/token".into(),
            iam_credentials_url: "https://iamcredentials.googleapis.com".into(),
            metadata_host: "metadata.google.internal".into(),
            extra_token_uris: Vec::new(),
        }
    }
}

/// Google access tokens by identity.
pub type TokenCache = token_cache::TokenCache<CacheKey, Token, Failure>;
type FetchError = token_cache::FetchError<Failure>;

/// What every gcr source shares: settings, the HTTP client, the token cache, and a
/// Kubernetes client for TokenRequest.
pub struct GcpProvider {
    settings: GcpSettings,
    client: kube::Client,
    metrics: Arc<Metrics>,
    /// Built on first use: a cluster without token sources never loads the system roots for it.
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
    pub tokens: TokenCache,
}

impl GcpProvider {
    pub fn new(client: kube::Client, settings: GcpSettings, metrics: Arc<Metrics>) -> Self {
        Self { settings, client, metrics, http: std::sync::OnceLock::new(), tokens: TokenCache::default() }
    }

    fn http(&self) -> Result<&reqwest::Client, Failure> {
        self.http.get_or_init(|| crate::http::client(None, "")).as_ref().map_err(|e| Failure {
            cloud: Cloud::Google,
            operation: "http",
            code: Some("ClientSetup".into()),
            message: e.clone(),
        })
    }

    /// Counts a Google call, and its failure code if it failed.
    fn record<T>(&self, result: Result<T, Failure>, operation: &str) -> Result<T, Failure> {
        self.metrics.provider_call(operation, result.as_ref().err().map(|f| f.code.as_deref()));
        result
    }

    fn token_uri_allowed(&self, uri: &str) -> bool {
        uri == key::GOOGLE_TOKEN_URI
            || key::LEGACY_TOKEN_URIS.contains(&uri)
            || self.settings.extra_token_uris.iter().any(|allowed| allowed == uri)
    }
}

/// What makes two credentials share a token: the same identity (never raw key material, only
/// a digest of it) and the same impersonated account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    identity: String,
    impersonate: Option<String>,
}

impl CacheKey {
    /// A stable fingerprint, safe to record on a Secret.
    fn fingerprint(&self) -> String {
        token_cache::fingerprint(&["gcp", self.identity.as_str(), self.impersonate.as_deref().unwrap_or_default()])
    }
}

/// An access token and when to replace it.
#[derive(Debug)]
pub struct Token {
    access_token: SecretString,
    expires_at: Timestamp,
    refresh_at: Timestamp,
}

impl Expiring for Token {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
    fn refresh_at(&self) -> Timestamp {
        self.refresh_at
    }
}

/// A Google identity resolved far enough to name it (for the cache), without calling Google.
enum Identity {
    /// A key, and where it was read (for errors about it).
    Key {
        key: ServiceAccountKey,
        namespace: String,
        name: String,
        secret_key: String,
    },
    Federated {
        namespace: String,
        service_account: String,
        audience: String,
    },
    Ambient,
}

impl Identity {
    /// Resolves the source's identity; reads Kubernetes only (the key's Secret, or the
    /// ServiceAccount).
    async fn resolve<R: SecretReader>(
        source: &GcrSource,
        ctx: &SourceContext<'_, R>,
        provider: &GcpProvider,
    ) -> Result<(Identity, String), Error> {
        if let Some(key_ref) = &source.json_key_secret_ref {
            let (key, namespace, _) = read_service_account_key(ctx, key_ref).await?;
            if !provider.token_uri_allowed(&key.token_uri) {
                return Err(Error::TokenUriNotAllowed {
                    namespace,
                    name: key_ref.name.clone(),
                    uri: key.token_uri.chars().take(200).collect(),
                });
            }
            let identity = key.cache_identity();
            let (name, secret_key) = (key_ref.name.clone(), key_ref.key_or(KEY_FILE).to_string());
            return Ok((Identity::Key { key, namespace, name, secret_key }, identity));
        }
        if let Some(wi) = &source.workload_identity {
            if !provider.settings.service_account_tokens {
                return Err(Error::IrsaDisabled);
            }
            let namespace = ctx.resolve_namespace(wi.service_account_ref.namespace.as_deref())?;
            let name = wi.service_account_ref.name.clone();
            let account = Api::<ServiceAccount>::namespaced(provider.client.clone(), &namespace)
                .get_opt(&name)
                .await?
                .ok_or_else(|| Error::ServiceAccountNotFound { namespace: namespace.clone(), name: name.clone() })?;
            // The uid keeps a deleted-and-recreated ServiceAccount from inheriting a token.
            let uid = account.metadata.uid.unwrap_or_default();
            let identity = format!("wif:{namespace}/{name}/{uid}/{}", wi.audience);
            return Ok((
                Identity::Federated { namespace, service_account: name, audience: wi.audience.clone() },
                identity,
            ));
        }
        if source.ambient.is_some() {
            if !ctx.cluster_scoped && !provider.settings.allow_ambient_for_namespaced {
                return Err(Error::AmbientGcpIdentityNotAllowed);
            }
            return Ok((Identity::Ambient, "ambient".into()));
        }
        Err(Error::MissingObjectField("spec.source.gcr.jsonKeySecretRef, workloadIdentity or ambient"))
    }

    /// The identity's own access token.
    async fn token(&self, provider: &GcpProvider) -> Result<google::Issued, FetchError> {
        let http = provider.http().map_err(FetchError::Provider)?;
        let result = match self {
            Identity::Key { key, namespace, name, secret_key } => {
                let now = Timestamp::now().as_second();
                let assertion = key.assertion(now).map_err(|problem| Error::InvalidGcrKey {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    key: secret_key.clone(),
                    problem,
                })?;
                let result = google::exchange_assertion(http, &key.token_uri, &assertion).await;
                provider.record(result, "oauth:token")
            }
            Identity::Federated { namespace, service_account, audience } => {
                let subject = service_account_token(&provider.client, namespace, service_account, audience).await?;
                let result = google::sts_exchange(http, &provider.settings.sts_url, audience, &subject).await;
                provider.record(result, "sts:token")
            }
            Identity::Ambient => {
                let result = google::metadata_token(http, &provider.settings.metadata_host).await;
                provider.record(result, "metadata:token")
            }
        };
        result.map_err(FetchError::Provider)
    }
}

/// Reads and checks a key file: the key, the namespace it was read in, and the file's text.
/// The error names the Secret and key, never the content.
async fn read_service_account_key<R: SecretReader>(
    ctx: &SourceContext<'_, R>,
    key_ref: &crate::crd::SecretKeyRef,
) -> Result<(ServiceAccountKey, String, SecretString), Error> {
    let text = read_key(ctx, key_ref, KEY_FILE).await?;
    let namespace = ctx.resolve_namespace(key_ref.namespace.as_deref())?;
    let key = ServiceAccountKey::parse(&text).map_err(|problem| Error::InvalidGcrKey {
        namespace: namespace.clone(),
        name: key_ref.name.clone(),
        key: key_ref.key_or(KEY_FILE).to_string(),
        problem,
    })?;
    Ok((key, namespace, text))
}

/// A token for the identity, after the optional impersonation.
async fn fetch_token(
    provider: &GcpProvider,
    identity: &Identity,
    impersonate: Option<&str>,
) -> Result<Token, FetchError> {
    let mut issued = identity.token(provider).await?;
    if let Some(email) = impersonate {
        let http = provider.http().map_err(FetchError::Provider)?;
        let url = &provider.settings.iam_credentials_url;
        let result = google::generate_access_token(http, url, email, &issued.token).await;
        issued = provider.record(result, "iamcredentials:generateAccessToken").map_err(FetchError::Provider)?;
    }
    let now = Timestamp::now();
    Ok(Token {
        refresh_at: refresh_time(now, issued.expires_at, provider.settings.refresh_share_left),
        access_token: issued.token,
        expires_at: issued.expires_at,
    })
}

impl CredentialProvider for GcrSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let registry = ctx.registry.unwrap_or(GCR_HOST);
        if self.login == Some(KeyLogin::JsonKey) {
            let key_ref = self
                .json_key_secret_ref
                .as_ref()
                .ok_or(Error::MissingObjectField("spec.source.gcr.jsonKeySecretRef"))?;
            let (_, _, text) = read_service_account_key(ctx, key_ref).await?;
            // Verbatim: JSON does not mind a trailing newline, and the key is sent as it is.
            return single_login(registry, JSON_KEY_USERNAME, text, Vec::new());
        }
        let provider = ctx.gcp.ok_or(Error::GcpUnavailable)?;
        let servers = crate::registry::server_keys(registry)?;
        let (identity, identity_key) = Identity::resolve(self, ctx, provider).await?;
        let impersonate = self.impersonate.as_ref().map(|i| i.service_account.clone());
        let key = CacheKey { identity: identity_key, impersonate: impersonate.clone() };
        let fingerprint = key.fingerprint();
        if let Some(previous) = ctx.previous.filter(|p| p.identity == fingerprint)
            && let Some(login) = previous.reusable(&servers).filter(|l| l.username == ACCESS_TOKEN_USERNAME)
        {
            let token = Token {
                access_token: login.password.clone(),
                expires_at: previous.expires_at,
                refresh_at: previous.refresh_at,
            };
            provider.tokens.seed(key.clone(), token);
        }
        // After a failed refresh, the token it was to replace while that is still valid.
        let crate::source::token_cache::Cached { token, refresh_failed } =
            provider.tokens.get_or_fetch(key, || fetch_token(provider, &identity, impersonate.as_deref())).await?;
        Ok(Credentials {
            auths: servers
                .into_iter()
                .map(|server| RegistryAuth {
                    server,
                    username: ACCESS_TOKEN_USERNAME.into(),
                    password: token.access_token.clone(),
                })
                .collect(),
            expires_at: Some(token.expires_at),
            refresh_at: Some(token.refresh_at),
            identity: Some(fingerprint),
            notes: Vec::new(),
            refresh_failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::{crd::SecretKeyRef, source::LocalSecrets};

    const KEY: &str = "{\n  \"type\": \"service_account\",\n  \"client_email\": \"puller@p.iam.gserviceaccount.com\",\n  \"private_key\": \"-----BEGIN PRIVATE KEY-----\\nMIIsecret\\n-----END PRIVATE KEY-----\\n\"\n}\n";

    fn json_key_source() -> GcrSource {
        GcrSource {
            json_key_secret_ref: Some(SecretKeyRef { name: "gcp".into(), key: None, namespace: None }),
            login: Some(KeyLogin::JsonKey),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_json_key_login_is_the_key_unchanged() {
        let secrets = LocalSecrets::default().with("ns", "gcp", &[("key.json", KEY.as_bytes())]);
        let ctx = SourceContext::offline("ns", Some("europe-docker.pkg.dev"), &secrets);
        let creds = json_key_source().fetch(&ctx).await.unwrap();
        assert_eq!(creds.auths[0].server, "europe-docker.pkg.dev");
        assert_eq!(creds.auths[0].username, "_json_key");
        assert_eq!(creds.auths[0].password.expose_secret(), KEY);
        assert!(KEY.ends_with('\n'), "the key keeps its trailing newline");
        assert!(creds.expires_at.is_none() && creds.notes.is_empty());
        crate::test_support::assert_hidden(&format!("{creds:?}"), "MIIsecret");
    }

    /// Offline (`regcred render`) an access-token login cannot be made, and says so.
    #[tokio::test]
    async fn an_access_token_login_needs_google() {
        let secrets = LocalSecrets::default().with("ns", "gcp", &[("key.json", KEY.as_bytes())]);
        let ctx = SourceContext::offline("ns", None, &secrets);
        let source = GcrSource { login: None, ..json_key_source() };
        assert_eq!(source.fetch(&ctx).await.unwrap_err().reason(), "GcpUnavailable");
    }

    #[tokio::test]
    async fn non_keys_are_refused_without_quoting_them() {
        for (bad, expect) in [
            ("MIIsecret not json", "not valid JSON"),
            ("[\"MIIsecret\"]", "not a JSON object"),
            ("{\"type\":\"authorized_user\",\"client_email\":\"a\",\"private_key\":\"MIIsecret\"}", "service_account"),
            ("{\"client_email\":\"a@b\"}", "private_key"),
            ("{\"private_key\":\"MIIsecret\"}", "client_email"),
        ] {
            let secrets = LocalSecrets::default().with("ns", "gcp", &[("key.json", bad.as_bytes())]);
            let ctx = SourceContext::offline("ns", None, &secrets);
            let err = json_key_source().fetch(&ctx).await.unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::InvalidGcrKey { .. }), "{msg}");
            assert!(msg.contains(expect), "{msg}");
            assert!(!msg.contains("MIIsecret"), "{msg}");
        }
    }

    /// Only Google's token endpoints (and those the controller's flag allows) are asked: a
    /// key file naming another `token_uri` would have the controller post to any address.
    #[tokio::test]
    async fn a_key_naming_another_token_endpoint_is_refused() {
        let file = key::tests::key_file(Some("http://10.0.0.1/internal"));
        let secrets = LocalSecrets::default().with("ns", "gcp", &[("key.json", file.as_bytes())]);
        let ctx = SourceContext::offline("ns", None, &secrets);
        let source = GcrSource { login: None, ..json_key_source() };
        let Err(error) = Identity::resolve(&source, &ctx, &provider(GcpSettings::default())).await else {
            panic!("accepted")
        };
        assert_eq!(error.reason(), "TokenUriNotAllowed");
        assert!(error.to_string().contains("http://10.0.0.1/internal"), "{error}");
        let allowed = GcpSettings { extra_token_uris: vec!["http://10.0.0.1/internal".into()], ..Default::default() };
        assert!(Identity::resolve(&source, &ctx, &provider(allowed)).await.is_ok());
    }

    /// A provider whose Kubernetes client is never called.
    fn provider(settings: GcpSettings) -> GcpProvider {
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        GcpProvider::new(client, settings, Default::default())
    }

    /// Tenants may not borrow the controller's Google identity unless the flag allows it.
    #[tokio::test]
    async fn namespaced_credentials_need_the_flag_for_the_ambient_identity() {
        let secrets = LocalSecrets::default();
        let provider = provider(GcpSettings::default());
        let source = GcrSource { ambient: Some(Default::default()), ..Default::default() };
        let tenant = SourceContext::offline("ns", None, &secrets);
        let Err(error) = Identity::resolve(&source, &tenant, &provider).await else { panic!("accepted") };
        assert_eq!(error.reason(), "AmbientIdentityNotAllowed");
        let cluster = SourceContext { cluster_scoped: true, ..tenant };
        assert!(Identity::resolve(&source, &cluster, &provider).await.is_ok());
    }

    #[test]
    fn fingerprints_differ_by_identity_and_impersonation() {
        let key = |identity: &str, impersonate: Option<&str>| CacheKey {
            identity: identity.into(),
            impersonate: impersonate.map(String::from),
        };
        let prints: std::collections::BTreeSet<String> =
            [key("a", None), key("b", None), key("a", Some("x@p.iam.gserviceaccount.com"))]
                .iter()
                .map(CacheKey::fingerprint)
                .collect();
        assert_eq!(prints.len(), 3);
        assert_eq!(key("a", None).fingerprint(), key("a", None).fingerprint());
    }

    proptest::proptest! {
        /// Any text as a key: no panic, and the problem never quotes it.
        #[test]
        fn key_checks_never_quote_the_key(marker in "[A-Za-z0-9]{12}", prefix in "\\PC{0,60}", suffix in "\\PC{0,60}") {
            let text = format!("{prefix}{marker}{suffix}");
            if let Err(problem) = ServiceAccountKey::parse(&SecretString::from(text)) {
                proptest::prop_assert!(!problem.contains(&marker), "{}", problem);
            }
        }
    }
}
