//! Microsoft Entra ID, the instance metadata service and ACR's token exchange as regcred
//! calls them: the token endpoint (`client_credentials` with a client secret or a client
//! assertion), IMDS (a managed identity's token), and `POST https://<registry>/oauth2/exchange`
//! (an Entra token for an ACR refresh token). Answers are read through
//! [`crate::http::read_capped`] and by pure functions; errors keep the service's code and
//! message (scrubbed of anything token-like), never a token.

use k8s_openapi::jiff::Timestamp;
use reqwest::Client;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{
    http::{BodyError, MAX_ANSWER_BYTES, read_capped, scrub, size},
    source::token_cache::{Cloud, Failure, MIN_VALIDITY},
};

/// The `client_assertion_type` of a signed JWT (RFC 7523), here a ServiceAccount token.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A token and when it stops working.
#[derive(Debug)]
pub struct Issued {
    pub token: SecretString,
    pub expires_at: Timestamp,
}

/// How the application proves itself at the token endpoint.
pub enum ClientCredential<'a> {
    /// A service principal's client secret.
    Secret(&'a SecretString),
    /// A federated credential: a ServiceAccount token for `api://AzureADTokenExchange`.
    Assertion(&'a SecretString),
}

/// The token endpoint's `client_credentials` grant.
pub async fn entra_token(
    client: &Client,
    token_url: &str,
    client_id: &str,
    scope: &str,
    credential: ClientCredential<'_>,
) -> Result<Issued, Failure> {
    const OPERATION: &str = "entra:token";
    let mut form = vec![("grant_type", "client_credentials"), ("client_id", client_id), ("scope", scope)];
    match credential {
        ClientCredential::Secret(secret) => form.push(("client_secret", secret.expose_secret())),
        ClientCredential::Assertion(assertion) => {
            form.push(("client_assertion_type", JWT_BEARER_ASSERTION));
            form.push(("client_assertion", assertion.expose_secret()));
        }
    }
    let sent = client.post(token_url).form(&form);
    access_answer(OPERATION, send(sent, OPERATION).await?, Timestamp::now())
}

/// Which managed identity IMDS is asked for.
#[derive(Debug, Clone, Copy)]
pub enum ManagedIdentity<'a> {
    /// The system-assigned one, or the only user-assigned one.
    Default,
    ClientId(&'a str),
    ResourceId(&'a str),
}

/// The instance metadata service's token for a managed identity and `resource`.
pub async fn imds_token(
    client: &Client,
    imds_endpoint: &str,
    resource: &str,
    identity: ManagedIdentity<'_>,
) -> Result<Issued, Failure> {
    const OPERATION: &str = "imds:token";
    let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
    match identity {
        ManagedIdentity::Default => {}
        ManagedIdentity::ClientId(id) => query.push(("client_id", id)),
        ManagedIdentity::ResourceId(id) => query.push(("msi_res_id", id)),
    }
    let base = format!("{}/metadata/identity/oauth2/token", imds_endpoint.trim_end_matches('/'));
    let url = reqwest::Url::parse_with_params(&base, &query)
        .map_err(|e| invalid(OPERATION, &format!("the IMDS endpoint {base:?} is not a URL: {e}")))?;
    let sent = client.get(url).header("Metadata", "true");
    access_answer(OPERATION, send(sent, OPERATION).await?, Timestamp::now())
}

/// ACR's exchange of an Entra token for a refresh token of `registry`, dated by its own
/// `exp` (never assumed).
pub async fn acr_exchange(
    client: &Client,
    registry: &str,
    tenant: Option<&str>,
    access_token: &SecretString,
) -> Result<Issued, Failure> {
    const OPERATION: &str = "acr:exchange";
    let mut form = vec![("grant_type", "access_token"), ("service", registry)];
    if let Some(tenant) = tenant {
        form.push(("tenant", tenant));
    }
    form.push(("access_token", access_token.expose_secret()));
    let sent = client.post(format!("https://{registry}/oauth2/exchange")).form(&form);
    refresh_answer(OPERATION, send(sent, OPERATION).await?, Timestamp::now())
}

/// The claims of a JWT, unverified (regcred only reads its own tokens' dates and tenant from
/// them; the services that issued them verify them). `None` if it is not a JWT with a JSON
/// object as payload.
pub fn unverified_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        serde_json::Value::Object(claims) => Some(claims),
        _ => None,
    }
}

/// The tenant (`tid`) an Entra token was issued in, if it says.
pub fn tenant_of(token: &SecretString) -> Option<String> {
    let tid = unverified_claims(token.expose_secret())?.get("tid")?.as_str()?.to_string();
    super::host::is_tenant(&tid).then_some(tid)
}

async fn send(
    request: reqwest::RequestBuilder,
    operation: &'static str,
) -> Result<(reqwest::StatusCode, Vec<u8>), Failure> {
    let unreachable = |e: reqwest::Error| Failure {
        cloud: Cloud::Azure,
        operation,
        code: Some("Unreachable".into()),
        message: format!(
            "no answer: {}",
            if e.is_timeout() { "timed out".to_string() } else { e.without_url().to_string() }
        ),
    };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status();
    let body = read_capped(response, MAX_ANSWER_BYTES).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => Failure {
            cloud: Cloud::Azure,
            operation,
            code: Some("ResponseTooLarge".into()),
            message: format!(
                "the answer ({status}) is larger than {}, the most regcred reads of an Azure answer",
                size(limit)
            ),
        },
        BodyError::Transport(e) => unreachable(e),
    })?;
    Ok((status, body))
}

/// An access token answer (Entra's, or IMDS's, whose numbers are strings): `access_token` and
/// `expires_in`.
fn access_answer(
    operation: &'static str,
    (status, body): (reqwest::StatusCode, Vec<u8>),
    now: Timestamp,
) -> Result<Issued, Failure> {
    if !status.is_success() {
        return Err(error_answer(operation, status, &body));
    }
    #[derive(Deserialize)]
    struct Answer {
        access_token: Option<SecretString>,
        expires_in: Option<serde_json::Value>,
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|_| invalid(operation, "the answer is not JSON"))?;
    let lifetime = match answer.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .ok_or_else(|| invalid(operation, "the answer has no expires_in"))?;
    let expires_at = now
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(lifetime))
        .map_err(|_| invalid(operation, "expires_in is out of range"))?;
    issued(operation, answer.access_token, expires_at, now)
}

/// ACR's exchange answer: `refresh_token`, a JWT whose `exp` is its expiry.
fn refresh_answer(
    operation: &'static str,
    (status, body): (reqwest::StatusCode, Vec<u8>),
    now: Timestamp,
) -> Result<Issued, Failure> {
    if !status.is_success() {
        return Err(error_answer(operation, status, &body));
    }
    #[derive(Deserialize)]
    struct Answer {
        refresh_token: Option<SecretString>,
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|_| invalid(operation, "the answer is not JSON"))?;
    let token = answer
        .refresh_token
        .filter(|t| !t.expose_secret().is_empty())
        .ok_or_else(|| invalid(operation, "no refresh_token"))?;
    let exp = unverified_claims(token.expose_secret())
        .ok_or_else(|| invalid(operation, "the refresh token is not a JWT, so its expiry is unknown"))?
        .get("exp")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| invalid(operation, "the refresh token carries no exp, so its expiry is unknown"))?;
    let expires_at =
        Timestamp::from_second(exp).map_err(|_| invalid(operation, "the refresh token's exp is out of range"))?;
    issued(operation, Some(token), expires_at, now)
}

/// A token that is there and valid for a while; an expired one is an error, never a login.
fn issued(
    operation: &'static str,
    token: Option<SecretString>,
    expires_at: Timestamp,
    now: Timestamp,
) -> Result<Issued, Failure> {
    let token = token.filter(|t| !t.expose_secret().is_empty()).ok_or_else(|| invalid(operation, "no access token"))?;
    if expires_at < now + MIN_VALIDITY {
        return Err(invalid(operation, &format!("the token expires at {expires_at}, which is not in the future")));
    }
    Ok(Issued { token, expires_at })
}

fn invalid(operation: &'static str, problem: &str) -> Failure {
    Failure { cloud: Cloud::Azure, operation, code: None, message: problem.into() }
}

/// An error answer as code and message: Entra's and IMDS's OAuth shape
/// `{"error", "error_description"}`, ACR's `{"errors": [{"code", "message"}]}`, or the HTTP
/// status and the text.
fn error_answer(operation: &'static str, status: reqwest::StatusCode, body: &[u8]) -> Failure {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Shape {
        OAuth { error: String, error_description: Option<String> },
        Registry { errors: Vec<RegistryError> },
    }
    #[derive(Deserialize)]
    struct RegistryError {
        code: Option<String>,
        message: Option<String>,
    }
    let http = || format!("HTTP {}", status.as_u16());
    let (code, message) = match serde_json::from_slice::<Shape>(body) {
        Ok(Shape::OAuth { error, error_description }) => (error, error_description.unwrap_or_default()),
        Ok(Shape::Registry { errors }) => match errors.into_iter().next() {
            Some(e) => (e.code.unwrap_or_else(http), e.message.unwrap_or_default()),
            None => (http(), String::new()),
        },
        Err(_) => (http(), String::from_utf8_lossy(body).trim().to_string()),
    };
    Failure { cloud: Cloud::Azure, operation, code: Some(scrub(&code)), message: scrub(&message) }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use reqwest::StatusCode;

    /// An unsigned JWT with these claims (regcred never checks signatures of its own tokens).
    pub(crate) fn jwt(claims: serde_json::Value) -> String {
        use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
        let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.c2lnbmF0dXJl", part(serde_json::json!({"alg": "RS256", "typ": "JWT"})), part(claims))
    }

    fn ok(json: serde_json::Value) -> (StatusCode, Vec<u8>) {
        (StatusCode::OK, serde_json::to_vec(&json).unwrap())
    }

    #[test]
    fn entra_and_imds_answers_give_the_token_and_its_expiry() {
        let now = Timestamp::now();
        for expires_in in [serde_json::json!(3599), serde_json::json!("3599")] {
            let body =
                serde_json::json!({"token_type": "Bearer", "access_token": "eyJ.hunter2", "expires_in": expires_in});
            let issued = access_answer("imds:token", ok(body), now).unwrap();
            assert_eq!(issued.token.expose_secret(), "eyJ.hunter2");
            assert_eq!(issued.expires_at.duration_since(now).as_secs(), 3599);
            crate::test_support::assert_hidden(&format!("{issued:?}"), "eyJ.hunter2");
        }
    }

    /// The refresh token's lifetime is what its `exp` says: never assumed, never missing.
    #[test]
    fn a_refresh_token_is_dated_by_its_exp_and_nothing_else() {
        let now = Timestamp::now();
        let exp = now.as_second() + 3 * 3600;
        let token = jwt(serde_json::json!({"exp": exp, "grant_type": "refresh_token", "tenant": "t"}));
        let issued = refresh_answer("acr:exchange", ok(serde_json::json!({"refresh_token": token})), now).unwrap();
        assert_eq!(issued.expires_at.as_second(), exp);
        assert_eq!(issued.token.expose_secret(), token);
        for (body, problem) in [
            (serde_json::json!({"refresh_token": "opaque-token"}), "not a JWT"),
            (serde_json::json!({"refresh_token": jwt(serde_json::json!({"iat": 1}))}), "carries no exp"),
            (
                serde_json::json!({"refresh_token": jwt(serde_json::json!({"exp": now.as_second() - 5}))}),
                "not in the future",
            ),
            (serde_json::json!({"refresh_token": jwt(serde_json::json!({"exp": "soon"}))}), "carries no exp"),
            (serde_json::json!({"access_token": "x"}), "no refresh_token"),
            (serde_json::json!({"refresh_token": ""}), "no refresh_token"),
        ] {
            let failure = refresh_answer("acr:exchange", ok(body), now).unwrap_err();
            assert_eq!(failure.code, None);
            assert!(failure.message.contains(problem), "{}", failure.message);
        }
    }

    #[test]
    fn unusable_access_answers_are_errors() {
        let now = Timestamp::now();
        for (body, problem) in [
            (serde_json::json!({"access_token": "t", "expires_in": 5}), "not in the future"),
            (serde_json::json!({"access_token": "t", "expires_in": "soon"}), "no expires_in"),
            (serde_json::json!({"access_token": "t"}), "no expires_in"),
            (serde_json::json!({"expires_in": 3600}), "no access token"),
        ] {
            let failure = access_answer("entra:token", ok(body), now).unwrap_err();
            assert!(failure.message.contains(problem), "{}", failure.message);
        }
        let failure = access_answer("entra:token", (StatusCode::OK, b"<html>".to_vec()), now).unwrap_err();
        assert!(failure.message.contains("not JSON"));
    }

    #[test]
    fn entra_and_acr_errors_keep_code_and_message_without_tokens() {
        let entra = error_answer(
            "entra:token",
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_client","error_description":"AADSTS70021: No matching federated identity record found for presented assertion eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl.","error_codes":[70021]}"#,
        );
        assert_eq!(entra.code.as_deref(), Some("invalid_client"));
        assert_eq!(entra.message, "AADSTS70021: No matching federated identity record found for presented assertion …",);
        let acr = error_answer(
            "acr:exchange",
            StatusCode::UNAUTHORIZED,
            br#"{"errors":[{"code":"UNAUTHORIZED","message":"the identity has no role on this registry"}]}"#,
        );
        assert_eq!(
            (acr.code.as_deref(), acr.message.as_str()),
            (Some("UNAUTHORIZED"), "the identity has no role on this registry")
        );
        let plain = error_answer("imds:token", StatusCode::SERVICE_UNAVAILABLE, b"busy\n");
        assert_eq!((plain.code.as_deref(), plain.message.as_str()), (Some("HTTP 503"), "busy"));
        assert_eq!(Error::from(acr).reason(), "AzureRequestFailed");
    }

    use crate::Error;

    #[test]
    fn the_tenant_comes_from_the_tid_claim_when_it_is_one() {
        let token = SecretString::from(jwt(serde_json::json!({"tid": "72f988bf-86f1-41af-91ab-2d7cd011db47"})));
        assert_eq!(tenant_of(&token).as_deref(), Some("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert_eq!(tenant_of(&SecretString::from(jwt(serde_json::json!({"tid": "../x"})))), None);
        assert_eq!(tenant_of(&SecretString::from("opaque".to_string())), None);
    }

    /// An endless answer (here IMDS's) is cut off at the cap.
    #[tokio::test]
    async fn an_endless_answer_is_response_too_large() {
        use crate::http::test_server::{self, Answer};
        let server = test_server::start(Answer::Streamed { bytes: 64 << 20 }).await;
        let client = crate::http::client(None, "").unwrap();
        let endpoint = format!("http://{}", server.host);
        let failure = imds_token(&client, &endpoint, "https://containerregistry.azure.net/", ManagedIdentity::Default)
            .await
            .unwrap_err();
        assert_eq!((failure.operation, failure.code.as_deref()), ("imds:token", Some("ResponseTooLarge")));
        assert!(server.sent() < 16 << 20, "the server got {} bytes out", server.sent());
    }
}
