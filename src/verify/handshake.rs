//! The Distribution auth handshake, as docker and containerd perform it before a pull:
//! `GET /v2/`; on 401 the `WWW-Authenticate` challenge says how to log in: `Basic` (send the
//! login) or `Bearer` (get a token from the realm with the login, then present it). With a
//! repository, a manifest `HEAD` then proves pull access to it.

use std::time::Duration;

use reqwest::{Client, Response, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};

use super::challenge::{self, Challenge};
use crate::http::{BodyError, MAX_ANSWER_BYTES, read_capped, size};

/// What a check found, and the condition reason that tells the user what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The registry accepted the login (and the repository's manifest, if asked).
    Verified,
    /// Wrong or revoked credential.
    Unauthorized,
    /// Authenticated, but no pull on that repository.
    Forbidden,
    /// DNS, connect or timeout.
    Unreachable,
    /// The certificate could not be verified (or another TLS failure).
    TlsError,
    /// Anything a registry should not answer.
    UnexpectedResponse,
    /// The token endpoint answered with more than [`MAX_ANSWER_BYTES`]: cut off unread.
    ResponseTooLarge,
    /// The registry or its token realm is outside what checks may reach (nothing was sent).
    NotAllowed,
    /// `spec.verify.caBundle` could not be read (nothing was asked of the registry).
    CaBundleUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Verified => "Verified",
            Reason::Unauthorized => "Unauthorized",
            Reason::Forbidden => "Forbidden",
            Reason::Unreachable => "Unreachable",
            Reason::TlsError => "TLSError",
            Reason::UnexpectedResponse => "UnexpectedResponse",
            Reason::ResponseTooLarge => "ResponseTooLarge",
            Reason::CaBundleUnavailable => "CABundleUnavailable",
            Reason::NotAllowed => "NotAllowed",
        }
    }
}

/// One registry's result: the reason, and a message naming what was asked and answered (never
/// a credential or token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub reason: Reason,
    pub message: String,
}

impl Finding {
    fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// What to check at one registry.
pub struct Target<'a> {
    /// `host[:port]`.
    pub host: &'a str,
    pub username: &'a str,
    pub password: &'a SecretString,
    /// `team/app`: also prove pull access to its `reference` manifest.
    pub repository: Option<&'a str>,
    pub reference: &'a str,
    /// Plain HTTP (`spec.verify.insecure`).
    pub plain_http: bool,
    /// Where the check may connect (the registry and its token realm).
    pub reach: &'a super::reach::Reach,
}

/// The manifest media types a pull accepts (what containerd sends).
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Per request; a registry that takes longer is as good as unreachable for a pull.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How the login is presented once the challenge is answered.
enum Authorization {
    /// The registry let anyone in: nothing to present.
    Anonymous,
    Basic,
    Bearer(SecretString),
}

pub async fn check(client: &Client, target: &Target<'_>) -> Finding {
    match run(client, target).await {
        Ok(finding) | Err(finding) => finding,
    }
}

async fn run(client: &Client, target: &Target<'_>) -> Result<Finding, Finding> {
    let scheme = if target.plain_http { "http" } else { "https" };
    if let Some(refusal) = target.reach.refusal(scheme, target.host) {
        return Err(Finding::new(Reason::NotAllowed, refusal));
    }
    let base = format!("{scheme}://{}", target.host);
    let ping = format!("{base}/v2/");
    let first = send(client.get(&ping)).await?;
    let authorization = match first.status() {
        StatusCode::OK => Authorization::Anonymous,
        StatusCode::UNAUTHORIZED => {
            let challenges = challenges(&first);
            login(client, target, &ping, &challenges).await?
        }
        status => return Err(unexpected("GET /v2/", status)),
    };
    let Some(repository) = target.repository else {
        return Ok(match authorization {
            Authorization::Anonymous => {
                Finding::new(Reason::Verified, "the registry lets anyone in (GET /v2/ 200): the login was not needed")
            }
            _ => Finding::new(Reason::Verified, "the registry accepted the login (GET /v2/ 200)"),
        });
    };
    let what = format!("HEAD /v2/{repository}/manifests/{}", target.reference);
    let manifest = format!("{base}/v2/{repository}/manifests/{}", target.reference);
    let request = authorize(client.head(&manifest).header(header::ACCEPT, MANIFEST_TYPES), target, &authorization);
    let response = send(request).await?;
    match response.status() {
        status if status.is_success() => Ok(Finding::new(Reason::Verified, format!("{what}: {status}"))),
        status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            Err(Finding::new(Reason::Forbidden, format!("the login has no pull on {repository}: {what}: {status}")))
        }
        status @ StatusCode::NOT_FOUND => Err(Finding::new(
            Reason::UnexpectedResponse,
            format!("{repository}:{} does not exist: {what}: {status}", target.reference),
        )),
        status => Err(unexpected(&what, status)),
    }
}

/// Answers the challenge of `GET /v2/` and checks that `/v2/` then accepts the login.
async fn login(
    client: &Client,
    target: &Target<'_>,
    ping: &str,
    challenges: &[Challenge],
) -> Result<Authorization, Finding> {
    let authorization = if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
        Authorization::Bearer(token(client, target, bearer).await?)
    } else if challenges.iter().any(|c| c.scheme == "basic") {
        Authorization::Basic
    } else {
        let schemes: Vec<&str> = challenges.iter().map(|c| c.scheme.as_str()).collect();
        return Err(Finding::new(
            Reason::UnexpectedResponse,
            format!("GET /v2/: 401 without a Basic or Bearer challenge (schemes: {schemes:?})"),
        ));
    };
    let response = send(authorize(client.get(ping), target, &authorization)).await?;
    match response.status() {
        StatusCode::OK => Ok(authorization),
        StatusCode::UNAUTHORIZED => {
            Err(Finding::new(Reason::Unauthorized, "the registry refused the login: GET /v2/: 401 Unauthorized"))
        }
        StatusCode::FORBIDDEN => {
            Err(Finding::new(Reason::Forbidden, "the registry refused the login: GET /v2/: 403 Forbidden"))
        }
        status => Err(unexpected("GET /v2/ with the login", status)),
    }
}

/// A token from the realm of a Bearer challenge, for the login (and the repository's pull
/// scope, when one is checked).
async fn token(client: &Client, target: &Target<'_>, challenge: &Challenge) -> Result<SecretString, Finding> {
    let realm = challenge
        .param("realm")
        .ok_or_else(|| Finding::new(Reason::UnexpectedResponse, "a Bearer challenge without a realm"))?;
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(service) = challenge.param("service") {
        query.push(("service", service.to_string()));
    }
    if let Some(repository) = target.repository {
        query.push(("scope", format!("repository:{repository}:pull")));
    }
    // Like `docker login`: the account is the username (some realms insist on it).
    query.push(("account", target.username.to_string()));
    let realm_url = reqwest::Url::parse_with_params(realm, &query).map_err(|e| {
        Finding::new(Reason::UnexpectedResponse, format!("the Bearer realm {realm:?} is not a URL: {e}"))
    })?;
    let realm_host = match (realm_url.host_str(), realm_url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        (None, _) => String::new(),
    };
    // The realm is the registry's to name, so the tenant's: it is held to the same limits.
    if let Some(refusal) = target.reach.refusal(realm_url.scheme(), &realm_host) {
        return Err(Finding::new(Reason::NotAllowed, format!("the token endpoint {realm}: {refusal}")));
    }
    let request = client.get(realm_url).basic_auth(target.username, Some(target.password.expose_secret()));
    let response = send(request).await?;
    let what = format!("the token endpoint {realm}");
    match response.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => {
            return Err(Finding::new(Reason::Unauthorized, format!("{what} refused the login: 401 Unauthorized")));
        }
        StatusCode::FORBIDDEN => {
            return Err(Finding::new(Reason::Forbidden, format!("{what} refused the login: 403 Forbidden")));
        }
        status => return Err(unexpected(&what, status)),
    }
    let body = read_capped(response, MAX_ANSWER_BYTES).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => Finding::new(
            Reason::ResponseTooLarge,
            format!("{what} answered with more than {}, the most regcred reads of a token answer", size(limit)),
        ),
        BodyError::Transport(e) => transport(&what, &e),
    })?;
    // The token is never parsed into anything printable: only the field that holds it.
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<SecretString>,
        access_token: Option<SecretString>,
    }
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|_| Finding::new(Reason::UnexpectedResponse, format!("{what} answered 200 without a JSON token")))?;
    parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.expose_secret().is_empty())
        .ok_or_else(|| Finding::new(Reason::UnexpectedResponse, format!("{what} answered 200 without a token")))
}

fn authorize(
    request: reqwest::RequestBuilder,
    target: &Target<'_>,
    authorization: &Authorization,
) -> reqwest::RequestBuilder {
    match authorization {
        Authorization::Anonymous => request,
        Authorization::Basic => request.basic_auth(target.username, Some(target.password.expose_secret())),
        Authorization::Bearer(token) => request.bearer_auth(token.expose_secret()),
    }
}

fn challenges(response: &Response) -> Vec<Challenge> {
    response
        .headers()
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(challenge::parse)
        .collect()
}

async fn send(request: reqwest::RequestBuilder) -> Result<Response, Finding> {
    request.timeout(REQUEST_TIMEOUT).send().await.map_err(|e| transport("the registry", &e))
}

fn unexpected(what: &str, status: StatusCode) -> Finding {
    Finding::new(Reason::UnexpectedResponse, format!("{what}: {status}"))
}

/// A transport failure: a TLS problem (with rustls's account of it) or unreachable.
fn transport(what: &str, error: &reqwest::Error) -> Finding {
    if let Some(tls) = tls_error(error) {
        return Finding::new(Reason::TlsError, format!("TLS with {what} failed: {tls}"));
    }
    let how = if error.is_timeout() {
        "timed out".to_string()
    } else {
        // The innermost cause names it (connection refused, DNS failure), without the URL.
        let mut cause: &dyn std::error::Error = error;
        while let Some(next) = cause.source() {
            cause = next;
        }
        cause.to_string()
    };
    Finding::new(Reason::Unreachable, format!("{what} could not be reached: {how}"))
}

/// The rustls error somewhere in the chain. tokio-rustls wraps it in an `io::Error`, which
/// hyper-util wraps in another: `io::Error::source` skips the wrapped error itself, so
/// wrappers are opened with `get_ref`.
fn tls_error(error: &reqwest::Error) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        cause = match current.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::http::test_server::{self, Answer};

    /// A check of the registry at `host`, whose Bearer realm is the hostile server itself.
    async fn check_at(host: &str) -> (Finding, Duration) {
        let client = crate::http::client(None, "").unwrap();
        let password = SecretString::from("p");
        let target = Target {
            host,
            username: "u",
            password: &password,
            repository: None,
            reference: "latest",
            plain_http: true,
            reach: &Default::default(),
        };
        let started = Instant::now();
        let finding = check(&client, &target).await;
        (finding, started.elapsed())
    }

    /// A realm that streams without end: the check stops at the cap and says so, naming the
    /// endpoint and the cap, never the body.
    #[tokio::test]
    async fn an_endless_token_answer_is_response_too_large() {
        let server = test_server::start(Answer::Streamed { bytes: 64 << 20 }).await;
        let (finding, took) = check_at(&server.host).await;
        assert_eq!(finding.reason, Reason::ResponseTooLarge, "{}", finding.message);
        let realm = format!("http://{}/token", server.host);
        assert_eq!(
            finding.message,
            format!(
                "the token endpoint {realm} answered with more than 64 KiB, the most regcred reads of a token answer"
            )
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(server.sent() < 16 << 20, "the realm got {} bytes out", server.sent());
    }

    /// A realm that announces a 1 TiB answer is refused from its Content-Length at once.
    #[tokio::test]
    async fn an_announced_token_answer_over_the_cap_is_response_too_large() {
        let server = test_server::start(Answer::Announced).await;
        let (finding, took) = check_at(&server.host).await;
        assert_eq!(finding.reason, Reason::ResponseTooLarge, "{}", finding.message);
        assert!(finding.message.contains("64 KiB"), "{}", finding.message);
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}
