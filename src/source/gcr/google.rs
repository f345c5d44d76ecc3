//! Google's token endpoints as regcred calls them: the OAuth token endpoint (a key's JWT
//! bearer grant), STS (Workload Identity Federation's token exchange), IAM Credentials
//! (impersonation) and the metadata server. Answers are read by pure functions; errors keep
//! Google's code and message, never a token.

use k8s_openapi::jiff::Timestamp;
use reqwest::Client;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::{
    http::{BodyError, MAX_ANSWER_BYTES, read_capped, scrub, size},
    source::token_cache::{Cloud, Failure},
};

/// The scope every token is asked for; Artifact Registry accepts it for pulls.
pub const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
// A token must stay valid at least `MIN_VALIDITY` to be written.
use crate::source::token_cache::MIN_VALIDITY;

/// An access token and when it stops working.
#[derive(Debug)]
pub struct Issued {
    pub token: SecretString,
    pub expires_at: Timestamp,
}

/// The JWT bearer grant: a key's signed assertion for an access token.
pub async fn exchange_assertion(client: &Client, token_uri: &str, assertion: &SecretString) -> Result<Issued, Failure> {
    let form = [("grant_type", JWT_BEARER), ("assertion", assertion.expose_secret())];
    let sent = client.post(token_uri).form(&form);
    oauth_answer("oauth:token", send(sent, "oauth:token").await?)
}

/// RFC 8693 token exchange at Google STS: a Kubernetes ServiceAccount token for a federated
/// access token of the pool's principal.
pub async fn sts_exchange(
    client: &Client,
    sts_url: &str,
    audience: &str,
    subject_token: &SecretString,
) -> Result<Issued, Failure> {
    let form = [
        ("grant_type", TOKEN_EXCHANGE),
        ("audience", audience),
        ("scope", CLOUD_PLATFORM),
        ("requested_token_type", ACCESS_TOKEN_TYPE),
        ("subject_token_type", JWT_TOKEN_TYPE),
        ("subject_token", subject_token.expose_secret()),
    ];
    let sent = client.post(sts_url).form(&form);
    oauth_answer("sts:token", send(sent, "sts:token").await?)
}

/// IAM Credentials `generateAccessToken`: a token of `email`, for a caller allowed to
/// impersonate it.
pub async fn generate_access_token(
    client: &Client,
    iam_credentials_url: &str,
    email: &str,
    caller: &SecretString,
) -> Result<Issued, Failure> {
    const OPERATION: &str = "iamcredentials:generateAccessToken";
    let url = format!(
        "{}/v1/projects/-/serviceAccounts/{email}:generateAccessToken",
        iam_credentials_url.trim_end_matches('/')
    );
    let body = serde_json::json!({ "scope": [CLOUD_PLATFORM], "lifetime": "3600s" });
    let sent = client.post(url).bearer_auth(caller.expose_secret()).json(&body);
    let (status, body) = send(sent, OPERATION).await?;
    if !status.is_success() {
        return Err(error_answer(OPERATION, status, &body));
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer {
        access_token: Option<SecretString>,
        expire_time: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|_| invalid(OPERATION, "the answer is not JSON"))?;
    let expires_at = answer
        .expire_time
        .and_then(|t| t.parse::<Timestamp>().ok())
        .ok_or_else(|| invalid(OPERATION, "the answer has no expireTime"))?;
    issued(OPERATION, answer.access_token, expires_at, Timestamp::now())
}

/// The metadata server's token for the instance's (with GKE Workload Identity: the pod's)
/// service account.
pub async fn metadata_token(client: &Client, metadata_host: &str) -> Result<Issued, Failure> {
    let url = format!("http://{metadata_host}/computeMetadata/v1/instance/service-accounts/default/token");
    let sent = client.get(url).header("Metadata-Flavor", "Google");
    oauth_answer("metadata:token", send(sent, "metadata:token").await?)
}

async fn send(
    request: reqwest::RequestBuilder,
    operation: &'static str,
) -> Result<(reqwest::StatusCode, Vec<u8>), Failure> {
    let unreachable = |e: reqwest::Error| Failure {
        cloud: Cloud::Google,
        operation,
        code: Some("Unreachable".into()),
        // Without the URL's query (there is none) and without any body: the transport's own words.
        message: format!(
            "no answer: {}",
            if e.is_timeout() { "timed out".to_string() } else { e.without_url().to_string() }
        ),
    };
    let response = request.send().await.map_err(unreachable)?;
    let status = response.status();
    let body = read_capped(response, MAX_ANSWER_BYTES).await.map_err(|e| match e {
        BodyError::TooLarge { limit } => Failure {
            cloud: Cloud::Google,
            operation,
            code: Some("ResponseTooLarge".into()),
            message: format!(
                "the answer ({status}) is larger than {}, the most regcred reads of a Google answer",
                size(limit)
            ),
        },
        BodyError::Transport(e) => unreachable(e),
    })?;
    Ok((status, body))
}

/// Reads an OAuth-style answer: `access_token` and `expires_in`.
fn oauth_answer(operation: &'static str, (status, body): (reqwest::StatusCode, Vec<u8>)) -> Result<Issued, Failure> {
    if !status.is_success() {
        return Err(error_answer(operation, status, &body));
    }
    #[derive(Deserialize)]
    struct Answer {
        access_token: Option<SecretString>,
        expires_in: Option<i64>,
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|_| invalid(operation, "the answer is not JSON"))?;
    let now = Timestamp::now();
    let lifetime = answer.expires_in.ok_or_else(|| invalid(operation, "the answer has no expires_in"))?;
    let expires_at = now
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(lifetime))
        .map_err(|_| invalid(operation, "expires_in is out of range"))?;
    issued(operation, answer.access_token, expires_at, now)
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
    Failure { cloud: Cloud::Google, operation, code: None, message: problem.into() }
}

/// Google's error answer as code and message: OAuth's `{"error", "error_description"}`, the
/// APIs' `{"error": {"status", "message"}}`, or the HTTP status.
fn error_answer(operation: &'static str, status: reqwest::StatusCode, body: &[u8]) -> Failure {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Shape {
        Api { error: ApiError },
        OAuth { error: String, error_description: Option<String> },
    }
    #[derive(Deserialize)]
    struct ApiError {
        status: Option<String>,
        message: Option<String>,
    }
    let (code, message) = match serde_json::from_slice::<Shape>(body) {
        Ok(Shape::OAuth { error, error_description }) => (error, error_description.unwrap_or_default()),
        Ok(Shape::Api { error }) => {
            (error.status.unwrap_or_else(|| format!("HTTP {}", status.as_u16())), error.message.unwrap_or_default())
        }
        Err(_) => (format!("HTTP {}", status.as_u16()), String::from_utf8_lossy(body).trim().to_string()),
    };
    Failure { cloud: Cloud::Google, operation, code: Some(code), message: scrub(&message) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    fn answer(json: serde_json::Value) -> (StatusCode, Vec<u8>) {
        (StatusCode::OK, serde_json::to_vec(&json).unwrap())
    }

    #[test]
    fn an_oauth_answer_gives_the_token_and_its_expiry() {
        let issued = oauth_answer(
            "oauth:token",
            answer(serde_json::json!({
                "access_token": "ya29.hunter2", "expires_in": 3599, "token_type": "Bearer"
            })),
        )
        .unwrap();
        assert_eq!(issued.token.expose_secret(), "ya29.hunter2");
        let left = issued.expires_at.duration_since(Timestamp::now()).as_secs();
        assert!((3590..=3599).contains(&left), "{left}");
        crate::test_support::assert_hidden(&format!("{issued:?}"), "ya29.hunter2");
    }

    /// An expired, undated or missing token is an error: writing it would break pulls.
    #[test]
    fn unusable_answers_are_errors() {
        for (body, problem) in [
            (serde_json::json!({"access_token": "t", "expires_in": 5}), "not in the future"),
            (serde_json::json!({"access_token": "t", "expires_in": -100}), "not in the future"),
            (serde_json::json!({"access_token": "t"}), "no expires_in"),
            (serde_json::json!({"expires_in": 3600}), "no access token"),
            (serde_json::json!({"access_token": "", "expires_in": 3600}), "no access token"),
        ] {
            let failure = oauth_answer("sts:token", answer(body)).unwrap_err();
            assert_eq!(failure.code, None);
            assert!(failure.message.contains(problem), "{}", failure.message);
        }
        let failure = oauth_answer("sts:token", (StatusCode::OK, b"<html>".to_vec())).unwrap_err();
        assert!(failure.message.contains("not JSON"));
    }

    #[test]
    fn google_errors_keep_code_and_message() {
        let oauth = error_answer(
            "oauth:token",
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
        );
        assert_eq!((oauth.code.as_deref(), oauth.message.as_str()), (Some("invalid_grant"), "Invalid JWT Signature."));
        let api = error_answer(
            "iamcredentials:generateAccessToken",
            StatusCode::FORBIDDEN,
            br#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getAccessToken' denied","status":"PERMISSION_DENIED"}}"#,
        );
        assert_eq!(api.code.as_deref(), Some("PERMISSION_DENIED"));
        assert!(api.message.starts_with("Permission 'iam.serviceAccounts.getAccessToken' denied"));
        let plain = error_answer("metadata:token", StatusCode::SERVICE_UNAVAILABLE, b"busy\n");
        assert_eq!((plain.code.as_deref(), plain.message.as_str()), (Some("HTTP 503"), "busy"));
    }

    /// A server that echoes a token or assertion does not get it into status.
    #[test]
    fn echoed_tokens_are_cut_out_of_messages() {
        let echoed = "bad assertion eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl for puller@p.iam.gserviceaccount.com";
        let shown = scrub(echoed);
        assert_eq!(shown, "bad assertion … for puller@p.iam.gserviceaccount.com");
        assert_eq!(scrub("ya29.c.abcdefghijklmnopqrstuvwxyz0123456789"), "…");
        assert_eq!(scrub(&"é".repeat(400)).chars().count(), 300);
    }

    #[test]
    fn an_impersonated_token_is_dated_by_its_expire_time() {
        let now = Timestamp::now();
        let at = now + std::time::Duration::from_secs(3600);
        let issued = issued("iamcredentials:generateAccessToken", Some("t".into()), at, now).unwrap();
        assert_eq!(issued.expires_at, at);
    }

    /// An endless answer (here the metadata server's) is cut off at the cap: a failure with
    /// code `ResponseTooLarge`, not a controller that reads until it runs out of memory.
    #[tokio::test]
    async fn an_endless_answer_is_response_too_large() {
        use crate::http::test_server::{self, Answer};
        let server = test_server::start(Answer::Streamed { bytes: 64 << 20 }).await;
        let client = crate::http::client(None, "").unwrap();
        let failure = metadata_token(&client, &server.host).await.unwrap_err();
        assert_eq!((failure.operation, failure.code.as_deref()), ("metadata:token", Some("ResponseTooLarge")));
        assert_eq!(
            failure.message,
            "the answer (200 OK) is larger than 64 KiB, the most regcred reads of a Google answer"
        );
        assert!(server.sent() < 16 << 20, "the server got {} bytes out", server.sent());
    }
}
