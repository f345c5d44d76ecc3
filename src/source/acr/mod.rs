//! Azure Container Registry. The Secret holds the user `00000000-0000-0000-0000-000000000000`
//! and an ACR refresh token (about 3 hours, dated by its own `exp`), which the registry's
//! `/oauth2/exchange` gives for a Microsoft Entra token of one of three identities: Azure
//! workload identity for a Kubernetes ServiceAccount (TokenRequest for
//! `api://AzureADTokenExchange`, sent as the client assertion), a service principal's client
//! secret, or the controller's managed identity (IMDS). Refresh tokens are shared per identity
//! and registry through [`super::token_cache`], as ECR's and Google's tokens are; Azure tokens
//! go only to registries under `--acr-registry-suffixes` and to the clouds' Entra authorities
//! (others only by `--azure-authority-host`).

mod entra;
pub mod host;

use std::sync::Arc;

use k8s_openapi::{api::core::v1::ServiceAccount, jiff::Timestamp};
use kube::Api;
use secrecy::{ExposeSecret, SecretString};

use super::{
    CredentialProvider, Credentials, SecretReader, SourceContext, read_password, service_account_token,
    token_cache::{self, Cached, Cloud, Expiring, Failure, refresh_time},
};
use crate::{
    Error,
    crd::{AcrSource, AcrTokenScope},
    dockerconfig::RegistryAuth,
    metrics::Metrics,
};
use entra::{ClientCredential, ManagedIdentity};

/// The user name that tells ACR the password is a refresh token.
pub const ACR_USERNAME: &str = "00000000-0000-0000-0000-000000000000";
/// The audience of the ServiceAccount tokens Entra takes as client assertions.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The ServiceAccount annotations the Azure workload identity webhook reads.
pub const CLIENT_ID_ANNOTATION: &str = "azure.workload.identity/client-id";
pub const TENANT_ID_ANNOTATION: &str = "azure.workload.identity/tenant-id";
/// Default key of a service principal's client secret in its Secret.
const CLIENT_SECRET_KEY: &str = "clientSecret";

/// How acr sources behave, from the controller's flags.
#[derive(Clone, Debug)]
pub struct AzureSettings {
    /// Whether namespaced credentials may use the controller's own managed identity.
    pub allow_ambient_for_namespaced: bool,
    /// Refresh a refresh token when this share of its lifetime is left.
    pub refresh_share_left: f64,
    /// Whether the controller may request ServiceAccount tokens (`--disable-irsa` turns
    /// workload identity off too).
    pub service_account_tokens: bool,
    /// The registry host suffixes Azure tokens may be sent to.
    pub registry_suffixes: Vec<String>,
    /// Authorities (`scheme://host[:port]`) a source may name besides the clouds' own.
    pub extra_authorities: Vec<String>,
    /// The instance metadata service, `http://169.254.169.254`.
    pub imds_endpoint: String,
}

impl Default for AzureSettings {
    fn default() -> Self {
        Self {
            allow_ambient_for_namespaced: false,
            refresh_share_left: 0.25,
            service_account_tokens: true,
            registry_suffixes: host::DEFAULT_REGISTRY_SUFFIXES.iter().map(|s| s.to_string()).collect(),
            extra_authorities: Vec::new(),
            imds_endpoint: "http://169.254.169.254".into(),
        }
    }
}

/// ACR refresh tokens by identity and registry.
pub type TokenCache = token_cache::TokenCache<CacheKey, Token, Failure>;
type FetchError = token_cache::FetchError<Failure>;

/// What every acr source shares: settings, the HTTP client, the token cache, and a Kubernetes
/// client for TokenRequest.
pub struct AzureProvider {
    settings: AzureSettings,
    client: kube::Client,
    metrics: Arc<Metrics>,
    /// Built on first use: a cluster without acr sources never loads the system roots for it.
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
    pub tokens: TokenCache,
}

impl AzureProvider {
    pub fn new(client: kube::Client, settings: AzureSettings, metrics: Arc<Metrics>) -> Self {
        Self { settings, client, metrics, http: std::sync::OnceLock::new(), tokens: TokenCache::default() }
    }

    fn http(&self) -> Result<&reqwest::Client, Failure> {
        self.http.get_or_init(|| crate::http::client(None, "")).as_ref().map_err(|e| Failure {
            cloud: Cloud::Azure,
            operation: "http",
            code: Some("ClientSetup".into()),
            message: e.clone(),
        })
    }

    /// Counts an Azure call, and its failure code if it failed.
    fn record<T>(&self, result: Result<T, Failure>, operation: &str) -> Result<T, Failure> {
        self.metrics.provider_call(operation, result.as_ref().err().map(|f| f.code.as_deref()));
        result
    }

    /// The registry, if Azure tokens may be sent to it.
    fn check_registry(&self, registry: &str) -> Result<(), Error> {
        match host::registry_allowed(registry, &self.settings.registry_suffixes) {
            true => Ok(()),
            false => Err(Error::RegistryHostNotAllowed {
                host: registry.chars().take(253).collect(),
                allowed: self.settings.registry_suffixes.join(", "),
            }),
        }
    }

    /// The source's authority (or its registry's cloud's), normalized, if regcred may send
    /// client secrets and assertions there.
    fn authority(&self, source: &AcrSource) -> Result<String, Error> {
        let authority = host::normalize_authority(
            source.authority_host.as_deref().unwrap_or_else(|| host::default_authority(&source.registry)),
        );
        match host::authority_allowed(&authority, &self.settings.extra_authorities) {
            true => Ok(authority),
            false => Err(Error::AuthorityHostNotAllowed { authority: authority.chars().take(253).collect() }),
        }
    }
}

/// What makes two credentials share a refresh token: the same identity (a digest for a client
/// secret, never the secret), registry, authority and scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    identity: String,
    registry: String,
    authority: String,
    resource: String,
}

impl CacheKey {
    /// A stable fingerprint, safe to record beside the token (`Credentials::identity`).
    fn fingerprint(&self) -> String {
        token_cache::fingerprint(&[
            "azure",
            self.identity.as_str(),
            self.registry.as_str(),
            self.authority.as_str(),
            self.resource.as_str(),
        ])
    }
}

/// An ACR refresh token and when to replace it.
#[derive(Debug)]
pub struct Token {
    refresh_token: SecretString,
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

/// An Azure identity resolved far enough to name it (for the cache), without calling Azure.
enum Identity {
    Federated { namespace: String, service_account: String, tenant: String, client_id: String },
    Principal { tenant: String, client_id: String, secret: SecretString },
    Ambient { client_id: Option<String>, resource_id: Option<String> },
}

impl Identity {
    /// Resolves the source's identity; reads Kubernetes only (the client secret's Secret, or
    /// the ServiceAccount). The second part names it for the cache.
    async fn resolve<R: SecretReader>(
        source: &AcrSource,
        ctx: &SourceContext<'_, R>,
        provider: &AzureProvider,
        notes: &mut Vec<String>,
    ) -> Result<(Identity, String), Error> {
        if let Some(wi) = &source.workload_identity {
            if !provider.settings.service_account_tokens {
                return Err(Error::IrsaDisabled);
            }
            // A namespaced credential resolves only its own namespace.
            let namespace = ctx.resolve_namespace(wi.service_account_ref.namespace.as_deref())?;
            let name = wi.service_account_ref.name.clone();
            let account = Api::<ServiceAccount>::namespaced(provider.client.clone(), &namespace)
                .get_opt(&name)
                .await?
                .ok_or_else(|| Error::ServiceAccountNotFound { namespace: namespace.clone(), name: name.clone() })?;
            let annotations = account.metadata.annotations.unwrap_or_default();
            let pick =
                |spec: Option<&String>, annotation: &'static str, what: &'static str, valid: fn(&str) -> bool| {
                    match spec {
                        Some(value) => Ok(value.clone()),
                        None => match annotations.get(annotation).map(|v| v.trim()) {
                            Some(value) if valid(value) => Ok(value.to_string()),
                            Some(_) => Err(Error::InvalidAzureAnnotation {
                                namespace: namespace.clone(),
                                name: name.clone(),
                                annotation,
                                what,
                            }),
                            None => Err(Error::AzureIdentityIncomplete {
                                namespace: namespace.clone(),
                                name: name.clone(),
                                what,
                                annotation,
                            }),
                        },
                    }
                };
            let client_id = pick(wi.client_id.as_ref(), CLIENT_ID_ANNOTATION, "client id", host::is_guid)?;
            let tenant = pick(wi.tenant_id.as_ref(), TENANT_ID_ANNOTATION, "tenant id", host::is_tenant)?;
            // The uid keeps a deleted-and-recreated ServiceAccount from inheriting a token.
            let uid = account.metadata.uid.unwrap_or_default();
            let identity = format!("wi:{namespace}/{name}/{uid}/{tenant}/{client_id}");
            return Ok((Identity::Federated { namespace, service_account: name, tenant, client_id }, identity));
        }
        if let Some(sp) = &source.service_principal {
            let secret = read_password(ctx, &sp.client_secret_ref, CLIENT_SECRET_KEY, notes).await?;
            // Possession of the secret, not the secret: a new secret is a new identity.
            let digest = token_cache::digest(&[sp.tenant_id.as_str(), sp.client_id.as_str(), secret.expose_secret()]);
            let identity = format!("sp:{}/{}/{digest}", sp.tenant_id, sp.client_id);
            return Ok((
                Identity::Principal { tenant: sp.tenant_id.clone(), client_id: sp.client_id.clone(), secret },
                identity,
            ));
        }
        if let Some(ambient) = &source.ambient {
            if !ctx.cluster_scoped && !provider.settings.allow_ambient_for_namespaced {
                return Err(Error::AmbientAzureIdentityNotAllowed);
            }
            let identity = match (&ambient.client_id, &ambient.resource_id) {
                (Some(id), _) => format!("mi:client:{id}"),
                (None, Some(id)) => format!("mi:resource:{id}"),
                (None, None) => "mi:default".into(),
            };
            return Ok((
                Identity::Ambient { client_id: ambient.client_id.clone(), resource_id: ambient.resource_id.clone() },
                identity,
            ));
        }
        Err(Error::MissingObjectField("spec.source.acr.workloadIdentity, servicePrincipal or ambient"))
    }

    /// The identity's Entra token for `resource`, and the tenant it was configured with.
    async fn entra_token(
        &self,
        provider: &AzureProvider,
        authority: &str,
        resource: &str,
    ) -> Result<(entra::Issued, Option<String>), FetchError> {
        let http = provider.http().map_err(FetchError::Provider)?;
        let scope = format!("{resource}.default");
        let token_url = |tenant: &str| format!("{authority}/{tenant}/oauth2/v2.0/token");
        let (result, tenant) = match self {
            Identity::Federated { namespace, service_account, tenant, client_id } => {
                let assertion =
                    service_account_token(&provider.client, namespace, service_account, TOKEN_EXCHANGE_AUDIENCE)
                        .await?;
                let credential = ClientCredential::Assertion(&assertion);
                let result = entra::entra_token(http, &token_url(tenant), client_id, &scope, credential).await;
                (provider.record(result, "entra:token"), Some(tenant.clone()))
            }
            Identity::Principal { tenant, client_id, secret } => {
                let credential = ClientCredential::Secret(secret);
                let result = entra::entra_token(http, &token_url(tenant), client_id, &scope, credential).await;
                (provider.record(result, "entra:token"), Some(tenant.clone()))
            }
            Identity::Ambient { client_id, resource_id } => {
                let which = match (client_id, resource_id) {
                    (Some(id), _) => ManagedIdentity::ClientId(id),
                    (None, Some(id)) => ManagedIdentity::ResourceId(id),
                    (None, None) => ManagedIdentity::Default,
                };
                let result = entra::imds_token(http, &provider.settings.imds_endpoint, resource, which).await;
                (provider.record(result, "imds:token"), None)
            }
        };
        Ok((result.map_err(FetchError::Provider)?, tenant))
    }
}

/// The refresh token for `registry`: an Entra token of the identity, exchanged at the
/// registry.
async fn fetch_token(
    provider: &AzureProvider,
    identity: &Identity,
    registry: &str,
    authority: &str,
    resource: &str,
) -> Result<Token, FetchError> {
    let (entra, configured) = identity.entra_token(provider, authority, resource).await?;
    // The tenant the token says it is of (a GUID), else the one configured (maybe a domain).
    let tenant = entra::tenant_of(&entra.token).or(configured);
    let http = provider.http().map_err(FetchError::Provider)?;
    let result = entra::acr_exchange(http, registry, tenant.as_deref(), &entra.token).await;
    let issued = provider.record(result, "acr:exchange").map_err(FetchError::Provider)?;
    Ok(Token {
        refresh_at: refresh_time(Timestamp::now(), issued.expires_at, provider.settings.refresh_share_left),
        refresh_token: issued.token,
        expires_at: issued.expires_at,
    })
}

/// The resource (audience) the Entra token is asked for; its scope is this + `.default`.
fn resource(scope: Option<AcrTokenScope>, authority: &str) -> &'static str {
    match scope.unwrap_or(AcrTokenScope::ContainerRegistry) {
        AcrTokenScope::ContainerRegistry => host::CONTAINER_REGISTRY_RESOURCE,
        AcrTokenScope::ResourceManager => host::resource_manager(authority),
    }
}

impl CredentialProvider for AcrSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        let provider = ctx.azure.ok_or(Error::AzureUnavailable)?;
        let registry = self.registry.as_str();
        // Before anything is read or asked: no Azure token goes to another host.
        provider.check_registry(registry)?;
        let servers = crate::registry::server_keys(registry)?;
        let authority = provider.authority(self)?;
        let resource = resource(self.scope, &authority);
        let mut notes = Vec::new();
        let (identity, identity_key) = Identity::resolve(self, ctx, provider, &mut notes).await?;
        // IMDS has no authority: the managed identity's token is of the machine's cloud.
        let key_authority = match identity {
            Identity::Ambient { .. } => "imds".to_string(),
            _ => authority.clone(),
        };
        let key = CacheKey {
            identity: identity_key,
            registry: registry.to_string(),
            authority: key_authority,
            resource: resource.to_string(),
        };
        let fingerprint = key.fingerprint();
        if let Some(previous) = ctx.previous.filter(|p| p.identity == fingerprint)
            && let Some(login) = previous.reusable(&servers).filter(|l| l.username == ACR_USERNAME)
        {
            let token = Token {
                refresh_token: login.password.clone(),
                expires_at: previous.expires_at,
                refresh_at: previous.refresh_at,
            };
            provider.tokens.seed(key.clone(), token);
        }
        // After a failed refresh, the token it was to replace while that is still valid.
        let Cached { token, refresh_failed } = provider
            .tokens
            .get_or_fetch(key, || fetch_token(provider, &identity, registry, &authority, resource))
            .await?;
        Ok(Credentials {
            auths: servers
                .into_iter()
                .map(|server| RegistryAuth {
                    server,
                    username: ACR_USERNAME.into(),
                    password: token.refresh_token.clone(),
                })
                .collect(),
            expires_at: Some(token.expires_at),
            refresh_at: Some(token.refresh_at),
            identity: Some(fingerprint),
            notes,
            refresh_failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{AccountRef, AcrWorkloadIdentity, AzureAmbient, AzureServicePrincipal, SecretKeyRef},
        source::LocalSecrets,
    };

    /// A provider whose Kubernetes client is never called.
    fn provider(settings: AzureSettings) -> AzureProvider {
        let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        AzureProvider::new(client, settings, Default::default())
    }

    fn principal(registry: &str) -> AcrSource {
        AcrSource {
            registry: registry.into(),
            service_principal: Some(AzureServicePrincipal {
                tenant_id: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
                client_id: "11111111-2222-3333-4444-555555555555".into(),
                client_secret_ref: SecretKeyRef { name: "sp".into(), namespace: None, key: None },
            }),
            ..Default::default()
        }
    }

    fn secrets() -> LocalSecrets {
        LocalSecrets::default().with("ns", "sp", &[("clientSecret", b"hunter2-client-secret\n")])
    }

    /// A registry outside the suffixes is refused before anything is read or sent.
    #[tokio::test]
    async fn a_registry_outside_the_suffixes_is_refused_with_a_reason() {
        let secrets = LocalSecrets::default();
        let provider = provider(AzureSettings::default());
        let ctx = SourceContext { azure: Some(&provider), ..SourceContext::offline("ns", None, &secrets) };
        let error = principal("registry.evil.example").fetch(&ctx).await.unwrap_err();
        assert_eq!(error.reason(), "RegistryHostNotAllowed");
        assert_eq!(
            error.to_string(),
            "registry \"registry.evil.example\" is not under the registry suffixes Azure tokens may be sent to \
             (.azurecr.io, .azurecr.cn, .azurecr.us; the controller's --acr-registry-suffixes)"
        );
    }

    /// Client secrets and assertions go only to the clouds' authorities and those the flag names.
    #[tokio::test]
    async fn an_authority_the_controller_does_not_know_is_refused() {
        let secrets = secrets();
        let provider = provider(AzureSettings::default());
        let ctx = SourceContext { azure: Some(&provider), ..SourceContext::offline("ns", None, &secrets) };
        let source = AcrSource { authority_host: Some("http://10.0.0.1:8080".into()), ..principal("team.azurecr.io") };
        let error = source.fetch(&ctx).await.unwrap_err();
        assert_eq!(error.reason(), "AuthorityHostNotAllowed");
        let allowed = provider_with_authority("http://10.0.0.1:8080/");
        assert_eq!(allowed.authority(&source).unwrap(), "http://10.0.0.1:8080");
        assert_eq!(allowed.authority(&principal("team.azurecr.cn")).unwrap(), host::CHINA_AUTHORITY);
    }

    fn provider_with_authority(authority: &str) -> AzureProvider {
        provider(AzureSettings { extra_authorities: vec![authority.into()], ..Default::default() })
    }

    /// Offline (`regcred render`) an acr source cannot be made, and says so.
    #[tokio::test]
    async fn an_acr_login_needs_azure() {
        let secrets = secrets();
        let ctx = SourceContext::offline("ns", None, &secrets);
        assert_eq!(principal("team.azurecr.io").fetch(&ctx).await.unwrap_err().reason(), "AzureUnavailable");
    }

    /// Tenants may not borrow the controller's managed identity unless the flag allows it.
    #[tokio::test]
    async fn namespaced_credentials_need_the_flag_for_the_managed_identity() {
        let secrets = LocalSecrets::default();
        let source = AcrSource {
            registry: "team.azurecr.io".into(),
            ambient: Some(AzureAmbient::default()),
            ..Default::default()
        };
        let strict = provider(AzureSettings::default());
        let tenant = SourceContext::offline("ns", None, &secrets);
        let Err(error) = Identity::resolve(&source, &tenant, &strict, &mut Vec::new()).await else {
            panic!("accepted")
        };
        assert_eq!(error.reason(), "AmbientIdentityNotAllowed");
        assert!(error.to_string().contains("--allow-ambient-azure-identity"), "{error}");
        let cluster = SourceContext { cluster_scoped: true, ..SourceContext::offline("", None, &secrets) };
        assert!(Identity::resolve(&source, &cluster, &strict, &mut Vec::new()).await.is_ok());
        let lenient = provider(AzureSettings { allow_ambient_for_namespaced: true, ..Default::default() });
        assert!(Identity::resolve(&source, &tenant, &lenient, &mut Vec::new()).await.is_ok());
    }

    /// A namespaced credential's workload identity names a ServiceAccount of its own namespace
    /// only: refused before the apiserver is asked (the client here answers nothing).
    #[tokio::test]
    async fn another_namespaces_service_account_is_refused() {
        let secrets = LocalSecrets::default();
        let source = AcrSource {
            registry: "team.azurecr.io".into(),
            workload_identity: Some(AcrWorkloadIdentity {
                service_account_ref: AccountRef { name: "puller".into(), namespace: Some("kube-system".into()) },
                client_id: None,
                tenant_id: None,
            }),
            ..Default::default()
        };
        let provider = provider(AzureSettings::default());
        let tenant = SourceContext::offline("team-a", None, &secrets);
        let Err(error) = Identity::resolve(&source, &tenant, &provider, &mut Vec::new()).await else {
            panic!("accepted")
        };
        assert_eq!(error.reason(), "CrossNamespaceReference");
        let disabled = self::provider(AzureSettings { service_account_tokens: false, ..Default::default() });
        let Err(error) = Identity::resolve(&source, &tenant, &disabled, &mut Vec::new()).await else {
            panic!("accepted")
        };
        assert_eq!(error.reason(), "IrsaDisabled");
    }

    /// A service principal's identity proves possession of its secret without holding it, and
    /// a line break after the secret is dropped with a note.
    #[tokio::test]
    async fn a_service_principal_is_named_by_a_digest_of_its_secret() {
        let secrets = secrets();
        let provider = provider(AzureSettings::default());
        let ctx = SourceContext::offline("ns", None, &secrets);
        let mut notes = Vec::new();
        let (identity, key) =
            Identity::resolve(&principal("team.azurecr.io"), &ctx, &provider, &mut notes).await.unwrap();
        assert!(!key.contains("hunter2"), "{key}");
        assert!(
            matches!(identity, Identity::Principal { ref secret, .. } if secret.expose_secret() == "hunter2-client-secret")
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        let other = LocalSecrets::default().with("ns", "sp", &[("clientSecret", b"another-secret")]);
        let ctx = SourceContext::offline("ns", None, &other);
        let (_, other_key) =
            Identity::resolve(&principal("team.azurecr.io"), &ctx, &provider, &mut Vec::new()).await.unwrap();
        assert_ne!(key, other_key);
    }

    #[test]
    fn fingerprints_differ_by_identity_registry_authority_and_scope() {
        let key = |identity: &str, registry: &str, authority: &str, resource: &str| CacheKey {
            identity: identity.into(),
            registry: registry.into(),
            authority: authority.into(),
            resource: resource.into(),
        };
        let base = ("sp:a", "a.azurecr.io", host::PUBLIC_AUTHORITY, host::CONTAINER_REGISTRY_RESOURCE);
        let prints: std::collections::BTreeSet<String> = [
            key(base.0, base.1, base.2, base.3),
            key("sp:b", base.1, base.2, base.3),
            key(base.0, "b.azurecr.io", base.2, base.3),
            key(base.0, base.1, host::CHINA_AUTHORITY, base.3),
            key(base.0, base.1, base.2, "https://management.azure.com/"),
        ]
        .iter()
        .map(CacheKey::fingerprint)
        .collect();
        assert_eq!(prints.len(), 5);
    }

    #[test]
    fn the_scope_is_acrs_unless_resource_manager_is_asked_for() {
        assert_eq!(resource(None, host::PUBLIC_AUTHORITY), "https://containerregistry.azure.net/");
        assert_eq!(
            resource(Some(AcrTokenScope::ResourceManager), host::PUBLIC_AUTHORITY),
            "https://management.azure.com/"
        );
        assert_eq!(
            resource(Some(AcrTokenScope::ResourceManager), host::GOVERNMENT_AUTHORITY),
            "https://management.usgovcloudapi.net/"
        );
    }

    #[test]
    fn a_token_shows_no_refresh_token() {
        let token = Token {
            refresh_token: "hunter2-refresh".to_string().into(),
            expires_at: Timestamp::now(),
            refresh_at: Timestamp::now(),
        };
        crate::test_support::assert_hidden(&format!("{token:?}"), "hunter2-refresh");
    }
}
