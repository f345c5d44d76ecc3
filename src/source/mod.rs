//! Credential sources: one file per provider, all behind [`CredentialProvider`].

pub mod acr;
mod basic;
pub mod ecr;
pub mod gcr;
mod ghcr;
pub mod token_cache;

use std::future::Future;

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::Api;
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::{Error, crd::CredentialSource, crd::SecretKeyRef, dockerconfig::RegistryAuth};

/// The logins a source produced.
#[derive(Debug)]
pub struct Credentials {
    pub auths: Vec<RegistryAuth>,
    /// When the logins stop working (tokens); `None` for static passwords.
    pub expires_at: Option<Timestamp>,
    /// When to fetch new logins; `None` for static passwords.
    pub refresh_at: Option<Timestamp>,
    /// A fingerprint of the identity a token was issued to (never key material), recorded in
    /// the credential's status (`tokenIdentity`) so that a restarted controller can reuse the
    /// token its Secrets hold.
    pub identity: Option<String>,
    /// What regcred changed in what it read, for the user to know (e.g. the `Ready`
    /// condition's message). Names Secrets and keys, never values.
    pub notes: Vec<String>,
    /// Why these logins are not fresh ones: the refresh of their token failed, and they hold
    /// the token it was to replace, still valid (see `token_cache::Cached`).
    pub refresh_failed: Option<Error>,
}

/// A Secret a source refers to, as read: only its data, each value in a type whose `Debug`
/// shows no content, so that no log line or panic message can carry key material.
#[derive(Debug, Clone, Default)]
pub struct SourceSecret {
    data: BTreeMap<String, SecretSlice<u8>>,
}

impl SourceSecret {
    fn get(&self, key: &str) -> Option<&SecretSlice<u8>> {
        self.data.get(key)
    }
}

impl From<Secret> for SourceSecret {
    /// Takes the data out of a Secret as soon as it is read; `stringData` (only ever in
    /// manifests) is folded in and wins, as the apiserver does.
    fn from(secret: Secret) -> Self {
        let mut data: BTreeMap<String, SecretSlice<u8>> =
            secret.data.unwrap_or_default().into_iter().map(|(key, value)| (key, value.0.into())).collect();
        for (key, value) in secret.string_data.unwrap_or_default() {
            data.insert(key, value.into_bytes().into());
        }
        Self { data }
    }
}

/// Reads the Secrets a source refers to: from the apiserver when running, from local
/// manifests for `regcred render`.
pub trait SecretReader: Sync {
    fn read(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<SourceSecret>, kube::Error>> + Send;
}

/// Reads Secrets straight from the apiserver (no cache: only referenced Secrets are read,
/// so memory does not grow with the Secrets in the cluster).
pub struct ApiSecretReader(pub kube::Client);

impl SecretReader for ApiSecretReader {
    async fn read(&self, namespace: &str, name: &str) -> Result<Option<SourceSecret>, kube::Error> {
        Ok(Api::<Secret>::namespaced(self.0.clone(), namespace).get_opt(name).await?.map(SourceSecret::from))
    }
}

/// Reads each Secret at most once: one reconcile's sources read several keys of the same
/// Secret (AWS keys: three), and each read would otherwise be a request.
pub struct ReadOnce<R> {
    inner: R,
    read: std::sync::Mutex<BTreeMap<(String, String), Option<SourceSecret>>>,
}

impl<R> ReadOnce<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, read: Default::default() }
    }
}

impl<R: SecretReader + Send> SecretReader for ReadOnce<R> {
    async fn read(&self, namespace: &str, name: &str) -> Result<Option<SourceSecret>, kube::Error> {
        let key = (namespace.to_string(), name.to_string());
        if let Some(known) = self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
            return Ok(known.clone());
        }
        let secret = self.inner.read(namespace, name).await?;
        self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, secret.clone());
        Ok(secret)
    }
}

/// What a provider needs to know about the credential it serves.
pub struct SourceContext<'a, R> {
    /// Namespace the source's references resolve in (empty for a cluster-scoped credential,
    /// whose references name their own).
    pub namespace: &'a str,
    /// `spec.registry`, if given.
    pub registry: Option<&'a str>,
    pub secrets: &'a R,
    /// ECR machinery; `None` offline (`regcred render`), where ECR sources fail.
    pub ecr: Option<&'a ecr::EcrProvider>,
    /// Google machinery; `None` offline, where gcr sources with access tokens fail.
    pub gcp: Option<&'a gcr::GcpProvider>,
    /// Azure machinery; `None` offline, where acr sources fail.
    pub azure: Option<&'a acr::AzureProvider>,
    /// Whether the credential is cluster-scoped (a platform object, which may use the
    /// controller's own AWS identity).
    pub cluster_scoped: bool,
    /// The token a live Secret of this credential already holds, if it is still current by
    /// the last status: reused after a restart or leader change instead of a new fetch (or,
    /// past its refresh time, when the fetch fails).
    pub previous: Option<&'a PreviousToken>,
    /// The namespaces the controller serves (`--namespaces`); references elsewhere fail with
    /// a reason of their own instead of a 403. `None`: every namespace.
    pub served: Option<&'a std::collections::BTreeSet<String>>,
}

/// A token found in a live Secret of the credential, with what the status said about it.
pub struct PreviousToken {
    /// The identity fingerprint the status recorded (`tokenIdentity`).
    pub identity: String,
    pub auths: Vec<RegistryAuth>,
    pub expires_at: Timestamp,
    pub refresh_at: Timestamp,
}

impl PreviousToken {
    /// The login of a live Secret that can be reused: one login, the same for every server,
    /// for exactly `servers` (any single one when `servers` is empty: the identity's own
    /// registry), and valid for at least `token_cache::MIN_VALIDITY`. One due for refresh
    /// counts: it is asked for again at once, and kept only if that fails.
    pub fn reusable(&self, servers: &[String]) -> Option<&RegistryAuth> {
        let first = self.auths.first()?;
        let same = self
            .auths
            .iter()
            .all(|a| a.username == first.username && a.password.expose_secret() == first.password.expose_secret());
        let serves = match servers {
            [] => self.auths.len() == 1,
            servers => servers.iter().map(String::as_str).eq(self.auths.iter().map(|a| a.server.as_str())),
        };
        let valid = Timestamp::now() + token_cache::MIN_VALIDITY < self.expires_at;
        (same && serves && valid && self.expires_at > self.refresh_at).then_some(first)
    }
}

impl<R> SourceContext<'_, R> {
    /// The namespace a reference resolves in: see [`resolve_reference`].
    pub fn resolve_namespace(&self, explicit: Option<&str>) -> Result<String, Error> {
        resolve_reference((!self.cluster_scoped).then_some(self.namespace), explicit, self.served)
    }
}

/// The namespace a credential's reference (a source Secret, a ServiceAccount, a CA bundle)
/// resolves in. A namespaced credential (`own`) only ever reads its own namespace (tenant
/// isolation); a cluster-scoped one (`own` is `None`) must say where. With `--namespaces`
/// (`served`), a namespace outside them fails with its own reason instead of a 403.
pub fn resolve_reference(
    own: Option<&str>,
    explicit: Option<&str>,
    served: Option<&std::collections::BTreeSet<String>>,
) -> Result<String, Error> {
    let namespace = match (own, explicit) {
        (None, Some(namespace)) => namespace.to_string(),
        (None, None) => return Err(Error::SourceNamespaceRequired),
        (Some(own), Some(namespace)) if namespace != own => {
            return Err(Error::CrossNamespaceReference { namespace: namespace.to_string() });
        }
        (Some(own), _) => own.to_string(),
    };
    match served {
        Some(served) if !served.contains(&namespace) => Err(Error::NamespaceOutOfScope { namespace }),
        _ => Ok(namespace),
    }
}

impl<'a, R> SourceContext<'a, R> {
    /// A context for a namespaced credential without ECR (static sources, offline).
    pub fn offline(namespace: &'a str, registry: Option<&'a str>, secrets: &'a R) -> Self {
        Self {
            namespace,
            registry,
            secrets,
            ecr: None,
            gcp: None,
            azure: None,
            cluster_scoped: false,
            previous: None,
            served: None,
        }
    }
}

/// A way of obtaining registry logins.
pub trait CredentialProvider {
    fn fetch<R: SecretReader>(
        &self,
        ctx: &SourceContext<'_, R>,
    ) -> impl Future<Output = Result<Credentials, Error>> + Send;
}

impl CredentialProvider for CredentialSource {
    async fn fetch<R: SecretReader>(&self, ctx: &SourceContext<'_, R>) -> Result<Credentials, Error> {
        match self {
            CredentialSource::Basic(s) => s.fetch(ctx).await,
            CredentialSource::Ghcr(s) => s.fetch(ctx).await,
            CredentialSource::Gcr(s) => s.fetch(ctx).await,
            CredentialSource::Ecr(s) => s.fetch(ctx).await,
            CredentialSource::Acr(s) => s.fetch(ctx).await,
        }
    }
}

/// A short-lived token for a tenant's ServiceAccount with the given audience, from the
/// TokenRequest API: what IRSA, Workload Identity Federation and Azure workload identity
/// exchange for cloud credentials. Used once, right away, so it asks for the shortest lifetime the apiserver
/// grants.
pub(crate) async fn service_account_token(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    audience: &str,
) -> Result<SecretString, Error> {
    use k8s_openapi::api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    };
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let response = api.create_token_request(name, &kube::api::PostParams::default(), &request).await?;
    response
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .map(SecretString::from)
        .ok_or(Error::MissingObjectField("TokenRequest status.token"))
}

/// Reads one key of a referenced Secret as text, with an error that names what is wrong
/// (never the value).
async fn read_key<R: SecretReader>(
    ctx: &SourceContext<'_, R>,
    secret_ref: &SecretKeyRef,
    default_key: &str,
) -> Result<SecretString, Error> {
    let namespace = ctx.resolve_namespace(secret_ref.namespace.as_deref())?;
    let name = secret_ref.name.clone();
    let key = secret_ref.key_or(default_key).to_string();
    let secret = ctx
        .secrets
        .read(&namespace, &name)
        .await?
        .ok_or_else(|| Error::SourceSecretNotFound { namespace: namespace.clone(), name: name.clone() })?;
    let Some(bytes) = secret.get(&key) else {
        return Err(Error::SourceKeyMissing { namespace, name, key });
    };
    if bytes.expose_secret().is_empty() {
        return Err(Error::SourceValueEmpty { namespace, name, key });
    }
    match std::str::from_utf8(bytes.expose_secret()) {
        Ok(text) => Ok(text.into()),
        Err(_) => Err(Error::SourceValueNotUtf8 { namespace, name, key }),
    }
}

/// Reads a password, token or access key: as [`read_key`], but without one terminal line
/// ending, which `kubectl create secret --from-file` and editors leave and which a registry
/// would take as part of the password (an opaque 401). Tells `notes` when it removed one,
/// naming the Secret and key, never the value.
async fn read_password<R: SecretReader>(
    ctx: &SourceContext<'_, R>,
    secret_ref: &SecretKeyRef,
    default_key: &str,
    notes: &mut Vec<String>,
) -> Result<SecretString, Error> {
    let value = read_key(ctx, secret_ref, default_key).await?;
    let Some((kept, ending)) = strip_line_ending(value.expose_secret()) else {
        return Ok(value);
    };
    let namespace = ctx.resolve_namespace(secret_ref.namespace.as_deref())?;
    let (name, key) = (secret_ref.name.clone(), secret_ref.key_or(default_key).to_string());
    if kept.is_empty() {
        return Err(Error::SourceValueEmpty { namespace, name, key });
    }
    notes.push(format!(
        "key {key:?} of Secret {namespace}/{name} ended in a line break ({ending}); regcred removed it, as \
         docker login --password-stdin does"
    ));
    Ok(SecretString::from(kept.to_string()))
}

/// Removes one terminal line ending, CRLF, LF or CR, as `docker login --password-stdin` does
/// with what it reads (docker/cli, cli/command/registry/login.go); other whitespace stays.
/// Returns the rest and the ending removed, escaped for a message.
fn strip_line_ending(text: &str) -> Option<(&str, &'static str)> {
    [("\r\n", "\\r\\n"), ("\n", "\\n"), ("\r", "\\r")]
        .into_iter()
        .find_map(|(ending, shown)| text.strip_suffix(ending).map(|kept| (kept, shown)))
}

/// Builds the login of a static source, after checking the registry and username: one entry
/// per server key of the registry (Docker Hub has two, see [`crate::registry::server_keys`]).
fn single_login(
    registry: &str,
    username: &str,
    password: SecretString,
    notes: Vec<String>,
) -> Result<Credentials, Error> {
    if username.is_empty() || username.contains(':') || username.chars().any(char::is_control) {
        // The auth field is base64("user:password"), split at the first colon.
        return Err(Error::InvalidUsername("must be non-empty, without ':' or control characters".into()));
    }
    Ok(Credentials {
        auths: crate::registry::server_keys(registry)?
            .into_iter()
            .map(|server| RegistryAuth { server, username: username.to_string(), password: password.clone() })
            .collect(),
        expires_at: None,
        refresh_at: None,
        identity: None,
        notes,
        refresh_failed: None,
    })
}

/// Secrets held in memory: the manifests given to `regcred render`, and unit tests. Of two
/// with one namespace and name, the one added first is read.
#[derive(Debug, Default)]
pub struct LocalSecrets(Vec<(String, String, SourceSecret)>);

impl LocalSecrets {
    /// Adds a Secret manifest, keeping its namespace, name and data only.
    pub fn add(&mut self, secret: Secret) {
        let namespace = secret.metadata.namespace.clone().unwrap_or_default();
        let name = secret.metadata.name.clone().unwrap_or_default();
        self.0.push((namespace, name, secret.into()));
    }

    /// Adds a Secret with the given data.
    pub fn with(mut self, namespace: &str, name: &str, data: &[(&str, &[u8])]) -> Self {
        let data = data.iter().map(|(k, v)| (k.to_string(), v.to_vec().into())).collect();
        self.0.push((namespace.into(), name.into(), SourceSecret { data }));
        self
    }
}

impl SecretReader for LocalSecrets {
    async fn read(&self, namespace: &str, name: &str) -> Result<Option<SourceSecret>, kube::Error> {
        Ok(self.0.iter().find(|(ns, n, _)| ns == namespace && n == name).map(|(_, _, secret)| secret.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tenant isolation holds in the controller too, not only at admission.
    #[test]
    fn namespaced_credentials_resolve_only_their_own_namespace() {
        let secrets = LocalSecrets::default();
        let tenant = SourceContext::offline("team-a", None, &secrets);
        assert_eq!(tenant.resolve_namespace(None).unwrap(), "team-a");
        assert_eq!(tenant.resolve_namespace(Some("team-a")).unwrap(), "team-a");
        let err = tenant.resolve_namespace(Some("kube-system")).unwrap_err();
        assert_eq!(err.reason(), "CrossNamespaceReference");

        let cluster = SourceContext { cluster_scoped: true, ..SourceContext::offline("", None, &secrets) };
        assert_eq!(cluster.resolve_namespace(Some("platform")).unwrap(), "platform");
        assert_eq!(cluster.resolve_namespace(None).unwrap_err().reason(), "SourceNamespaceRequired");
    }

    /// With `--namespaces`, a reference outside them fails with its own reason (not a 403).
    #[test]
    fn references_outside_the_served_namespaces_are_refused() {
        let secrets = LocalSecrets::default();
        let served: std::collections::BTreeSet<String> = ["platform".to_string(), "team-a".into()].into();
        let cluster =
            SourceContext { cluster_scoped: true, served: Some(&served), ..SourceContext::offline("", None, &secrets) };
        assert_eq!(cluster.resolve_namespace(Some("platform")).unwrap(), "platform");
        let err = cluster.resolve_namespace(Some("kube-system")).unwrap_err();
        assert_eq!(err.reason(), "NamespaceOutOfScope");
        assert!(err.to_string().contains("\"kube-system\""), "{err}");
        let tenant = SourceContext { served: Some(&served), ..SourceContext::offline("team-b", None, &secrets) };
        assert_eq!(tenant.resolve_namespace(None).unwrap_err().reason(), "NamespaceOutOfScope");
    }

    /// The servers of a static login are what the Secret holds (its keys, in the document's
    /// order) and what `status.registries` reports.
    #[test]
    fn a_static_login_has_one_entry_per_server_key() {
        use secrecy::ExposeSecret;
        for (registry, keys) in [
            ("docker.io", &["https://index.docker.io/v1/", "registry-1.docker.io"][..]),
            ("index.docker.io", &["https://index.docker.io/v1/", "registry-1.docker.io"][..]),
            ("registry-1.docker.io", &["https://index.docker.io/v1/", "registry-1.docker.io"][..]),
            ("ghcr.io", &["ghcr.io"][..]),
            ("registry.example.com:5000", &["registry.example.com:5000"][..]),
        ] {
            let creds = single_login(registry, "me", "pw".into(), Vec::new()).unwrap();
            let servers: Vec<_> = creds.auths.iter().map(|a| a.server.as_str()).collect();
            assert_eq!(servers, keys, "{registry}");
            let document =
                crate::dockerconfig::parse(crate::dockerconfig::render(&creds.auths).expose_secret()).unwrap();
            let written: Vec<_> = document.iter().map(|a| a.server.as_str()).collect();
            assert_eq!(written, servers, "{registry}: the status lists exactly the keys written");
            assert!(document.iter().all(|a| a.username == "me" && a.password.expose_secret() == "pw"));
        }
    }

    #[test]
    fn credentials_show_no_password() {
        let creds = single_login("r.io", "me", "hunter2-pw".into(), Vec::new()).unwrap();
        crate::test_support::assert_hidden(&format!("{creds:?}"), "hunter2-pw");
    }

    #[test]
    fn docker_hub_renders_both_keys_byte_for_byte() {
        let creds = single_login("registry-1.docker.io", "bob", "s3cret".into(), Vec::new()).unwrap();
        assert_eq!(
            std::str::from_utf8(crate::dockerconfig::render(&creds.auths).expose_secret()).unwrap(),
            concat!(
                r#"{"auths":{"https://index.docker.io/v1/":{"username":"bob","password":"s3cret","auth":"Ym9iOnMzY3JldA=="},"#,
                r#""registry-1.docker.io":{"username":"bob","password":"s3cret","auth":"Ym9iOnMzY3JldA=="}}}"#
            )
        );
    }

    /// Item 20: one reconcile reads each referenced Secret once, however many keys it takes.
    #[tokio::test]
    async fn each_secret_is_read_once_per_reconcile() {
        struct Counting(LocalSecrets, std::sync::atomic::AtomicUsize);
        impl SecretReader for Counting {
            async fn read(&self, namespace: &str, name: &str) -> Result<Option<SourceSecret>, kube::Error> {
                self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.0.read(namespace, name).await
            }
        }
        let secrets = LocalSecrets::default().with("ns", "keys", &[("a", b"1"), ("b", b"2")]);
        let once = ReadOnce::new(Counting(secrets, Default::default()));
        let ctx = SourceContext::offline("ns", None, &once);
        for key in ["a", "b", "a", "missing"] {
            let reference = SecretKeyRef { name: "keys".into(), namespace: None, key: Some(key.into()) };
            let _ = read_key(&ctx, &reference, key).await;
        }
        assert_eq!(once.inner.1.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// The data of a read Secret, `stringData` included, is there to use and not to show.
    #[tokio::test]
    async fn a_read_secret_does_not_show_its_data() {
        use k8s_openapi::ByteString;
        let secret = Secret {
            data: Some(BTreeMap::from([("password".into(), ByteString(b"hunter2-data".to_vec()))])),
            string_data: Some(BTreeMap::from([("token".into(), "hunter2-string-data".into())])),
            ..Default::default()
        };
        let read = SourceSecret::from(secret);
        assert_eq!(read.get("password").map(|v| v.expose_secret()), Some(&b"hunter2-data"[..]));
        assert_eq!(read.get("token").map(|v| v.expose_secret()), Some(&b"hunter2-string-data"[..]));
        let local = LocalSecrets::default().with("ns", "s", &[("password", b"hunter2-local")]);
        let cached = ReadOnce::new(LocalSecrets::default().with("ns", "s", &[("password", b"hunter2-cached")]));
        let ctx = SourceContext::offline("ns", None, &cached);
        let reference = SecretKeyRef { name: "s".into(), namespace: None, key: None };
        assert!(read_key(&ctx, &reference, "password").await.is_ok(), "the cache is filled");
        for (shown, secret) in [
            (format!("{read:?}"), "hunter2-data"),
            (format!("{read:?}"), "hunter2-string-data"),
            (format!("{local:?}"), "hunter2-local"),
            (format!("{:?}", cached.read), "hunter2-cached"),
        ] {
            crate::test_support::assert_hidden(&shown, secret);
        }
    }

    #[tokio::test]
    async fn a_tenant_cannot_read_another_namespaces_secret() {
        let secrets = LocalSecrets::default().with("kube-system", "admin", &[("password", b"root")]);
        let tenant = SourceContext::offline("team-a", Some("r.io"), &secrets);
        let reference = SecretKeyRef { name: "admin".into(), key: None, namespace: Some("kube-system".into()) };
        let err = read_key(&tenant, &reference, "password").await.unwrap_err();
        assert_eq!(err.reason(), "CrossNamespaceReference");
    }
}
