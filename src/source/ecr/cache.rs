//! ECR's entries in the shared token cache ([`crate::source::token_cache`]): one token per AWS
//! identity, region and assumed role.

use k8s_openapi::jiff::Timestamp;
use secrecy::SecretString;

use crate::{
    crd::AssumeRole,
    source::token_cache::{self, Expiring},
};

pub use crate::source::token_cache::Failure;

/// ECR tokens by identity.
pub type TokenCache = token_cache::TokenCache<CacheKey, Token, Failure>;
/// Why fetching an ECR token failed.
pub type FetchError = token_cache::FetchError<Failure>;

/// A fetched token and when to replace it. One token opens every registry the identity may
/// pull from in its region, so it is shared whatever registries a credential lists.
#[derive(Debug)]
pub struct Token {
    pub username: String,
    pub password: SecretString,
    /// Host of the identity's own registry, from the answer's proxyEndpoint.
    pub proxy_host: String,
    pub expires_at: Timestamp,
    pub refresh_at: Timestamp,
    /// What the status says while this token is in use when the controller's clock is off
    /// AWS's (see `clock`).
    pub clock_note: Option<String>,
}

/// What makes two credentials share a token: the same identity (never a raw secret: key
/// material enters only hashed), region and assumed role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub identity: String,
    pub region: String,
    pub fips: bool,
    pub assume_role: Option<AssumeRole>,
}

impl CacheKey {
    /// A stable fingerprint of the key, safe to record on a Secret (the identity part holds
    /// no key material, only a digest of it).
    pub fn fingerprint(&self) -> String {
        let role = self.assume_role.as_ref();
        token_cache::fingerprint(&[
            self.identity.as_str(),
            self.region.as_str(),
            if self.fips { "fips" } else { "" },
            role.map_or("", |r| r.role_arn.as_str()),
            role.and_then(|r| r.external_id.as_deref()).unwrap_or_default(),
            role.and_then(|r| r.session_name.as_deref()).unwrap_or_default(),
        ])
    }
}

impl Expiring for Token {
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
    fn refresh_at(&self) -> Timestamp {
        self.refresh_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(identity: &str) -> CacheKey {
        CacheKey { identity: identity.into(), region: "eu-west-1".into(), fips: false, assume_role: None }
    }

    #[test]
    fn fingerprints_differ_with_every_part_of_the_key() {
        let base = key("a");
        let mut fips = key("a");
        fips.fips = true;
        let mut role = key("a");
        role.assume_role =
            Some(AssumeRole { role_arn: "arn:aws:iam::1:role/r".into(), external_id: None, session_name: None });
        let prints: std::collections::BTreeSet<String> =
            [&base, &key("b"), &fips, &role].iter().map(|k| k.fingerprint()).collect();
        assert_eq!(prints.len(), 4);
        assert_eq!(base.fingerprint(), key("a").fingerprint(), "stable");
        assert_eq!(base.fingerprint().len(), 32);
    }

    #[tokio::test]
    async fn an_aws_failure_is_the_credentials_error() {
        let cache = TokenCache::default();
        let failure = Failure {
            cloud: crate::source::token_cache::Cloud::Aws,
            operation: "ecr:GetAuthorizationToken",
            code: Some("ThrottlingException".into()),
            message: "slow down".into(),
        };
        let err =
            cache.get_or_fetch(key("a"), || async { Err(FetchError::Provider(failure.clone())) }).await.unwrap_err();
        assert!(matches!(err, crate::Error::Aws { ref code, .. } if code == "ThrottlingException"));
    }
}
