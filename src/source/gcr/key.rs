//! Google service-account keys: checked without ever quoting them, and turned into the signed
//! JWT (RFC 7523) that a key's `token_uri` exchanges for an access token.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, de::IgnoredAny};

use super::google::CLOUD_PLATFORM;

/// Google's token endpoint, the `token_uri` of every key it issues.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Token endpoints of older key files, which Google still serves.
pub const LEGACY_TOKEN_URIS: [&str; 2] =
    ["https://accounts.google.com/o/oauth2/token", "https://www.googleapis.com/oauth2/v4/token"];
/// How long a signed assertion is valid: Google refuses more than an hour.
const ASSERTION_SECONDS: i64 = 3600;

/// A top-level field of a key file: text is kept as a secret (one field is the private key),
/// anything else only as being there.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Field {
    Text(SecretString),
    Other(IgnoredAny),
}

/// The parts of a key file regcred uses. `Debug` shows no key material.
#[derive(Debug)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub token_uri: String,
    private_key: SecretString,
}

/// The claims of a key's assertion: the account asks its token endpoint for a token with the
/// cloud-platform scope.
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

impl ServiceAccountKey {
    /// Reads a key file. The problem it returns never quotes the key (serde_json's own
    /// messages can echo input, so only positions are kept); its fields are read into
    /// secrets, not into a `serde_json::Value`, which would print the private key.
    pub fn parse(key: &SecretString) -> Result<ServiceAccountKey, String> {
        serde_json::from_str::<IgnoredAny>(key.expose_secret())
            .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?;
        let fields: BTreeMap<String, Field> =
            serde_json::from_str(key.expose_secret()).map_err(|_| "not a JSON object".to_string())?;
        let text = |name: &str| match fields.get(name) {
            Some(Field::Text(text)) if !text.expose_secret().is_empty() => Some(text.expose_secret()),
            _ => None,
        };
        if fields.contains_key("type") && text("type") != Some("service_account") {
            return Err("field \"type\" is not \"service_account\"".into());
        }
        let required = |name: &str| text(name).ok_or_else(|| format!("field {name:?} is missing or empty"));
        let client_email = required("client_email")?.to_string();
        let private_key = SecretString::from(required("private_key")?);
        Ok(ServiceAccountKey {
            client_email,
            private_key_id: text("private_key_id").map(String::from),
            token_uri: text("token_uri").unwrap_or(GOOGLE_TOKEN_URI).to_string(),
            private_key,
        })
    }

    /// The RS256 JWT bearer assertion for the key's token endpoint, valid from `now` (Unix
    /// seconds) for an hour. Signed by `jsonwebtoken` (ring).
    pub fn assertion(&self, now: i64) -> Result<SecretString, String> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(self.private_key.expose_secret().as_bytes())
            .map_err(|_| "field \"private_key\" is not an RSA private key in PEM".to_string())?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = self.private_key_id.clone();
        let claims = Claims {
            iss: &self.client_email,
            scope: CLOUD_PLATFORM,
            aud: &self.token_uri,
            iat: now,
            exp: now + ASSERTION_SECONDS,
        };
        jsonwebtoken::encode(&header, &claims, &key)
            .map(SecretString::from)
            .map_err(|_| "field \"private_key\" cannot sign (is it an RSA key?)".to_string())
    }

    /// What identifies the key in the token cache: a digest that only the same key material
    /// (and endpoint) reproduces, so holding the key is what finds its token.
    pub fn cache_identity(&self) -> String {
        let digest = crate::source::token_cache::digest(&[
            self.client_email.as_str(),
            self.private_key_id.as_deref().unwrap_or_default(),
            self.private_key.expose_secret(),
            self.token_uri.as_str(),
        ]);
        format!("key:{digest}")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A 2048-bit RSA key made for these tests only (`openssl genpkey -algorithm RSA`).
    pub const TEST_PRIVATE_KEY: &str = include_str!("testdata/test-key.pem");
    pub const TEST_PUBLIC_KEY: &str = include_str!("testdata/test-key.pub.pem");

    pub fn key_file(token_uri: Option<&str>) -> String {
        let mut key = serde_json::json!({
            "type": "service_account",
            "project_id": "p",
            "private_key_id": "kid-1",
            "private_key": TEST_PRIVATE_KEY,
            "client_email": "puller@p.iam.gserviceaccount.com",
        });
        if let Some(uri) = token_uri {
            key["token_uri"] = uri.into();
        }
        serde_json::to_string_pretty(&key).unwrap() + "\n"
    }

    /// The assertion is what Google's token endpoint checks: RS256 under the key's id, issued
    /// by the account, for the token URI, cloud-platform scope, an hour at most.
    #[test]
    fn the_assertion_is_a_signed_jwt_bearer_grant() {
        let key = ServiceAccountKey::parse(&key_file(Some("https://oauth2.example/token")).into()).unwrap();
        let jwt = key.assertion(1_800_000_000).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_rsa_pem(TEST_PUBLIC_KEY.as_bytes()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_audience(&["https://oauth2.example/token"]);
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["iss", "aud", "exp"]);
        let decoded = jsonwebtoken::decode::<serde_json::Value>(jwt.expose_secret(), &decoding, &validation).unwrap();
        assert_eq!(decoded.header.kid.as_deref(), Some("kid-1"));
        assert_eq!(decoded.claims["iss"], "puller@p.iam.gserviceaccount.com");
        assert_eq!(decoded.claims["scope"], CLOUD_PLATFORM);
        assert_eq!(decoded.claims["iat"], 1_800_000_000);
        assert_eq!(decoded.claims["exp"], 1_800_000_000 + 3600);
        assert!(decoded.claims.get("sub").is_none(), "no sub: a sub asks for domain-wide delegation");
        crate::test_support::assert_hidden(&format!("{key:?} {jwt:?}"), "MII");
    }

    #[test]
    fn the_token_uri_defaults_to_googles() {
        let key = ServiceAccountKey::parse(&key_file(None).into()).unwrap();
        assert_eq!(key.token_uri, GOOGLE_TOKEN_URI);
    }

    /// Only the same key material finds a token; the digest shows none of it.
    #[test]
    fn the_cache_identity_proves_possession() {
        let a = ServiceAccountKey::parse(&key_file(None).into()).unwrap();
        let b = ServiceAccountKey::parse(&key_file(Some("https://elsewhere/token")).into()).unwrap();
        assert_eq!(a.cache_identity(), ServiceAccountKey::parse(&key_file(None).into()).unwrap().cache_identity());
        assert_ne!(a.cache_identity(), b.cache_identity());
        assert!(!a.cache_identity().contains("puller"));
    }

    #[test]
    fn a_key_that_is_not_rsa_cannot_sign_and_is_not_quoted() {
        let text = key_file(None).replace("MII", "XXsecretXX");
        let key = ServiceAccountKey::parse(&text.into()).unwrap();
        let problem = key.assertion(0).unwrap_err();
        assert!(problem.contains("not an RSA private key"), "{problem}");
        assert!(!problem.contains("XXsecretXX"));
    }
}
