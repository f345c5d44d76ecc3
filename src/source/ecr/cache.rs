//! One ECR token per identity, shared by every credential that resolves to it, with
//! single-flight fetching: concurrent reconciles of the same identity wait for one call.

use std::{
    collections::HashMap,
    future::Future,
    hash::{BuildHasher, Hash},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::jiff::Timestamp;

use secrecy::SecretString;

use crate::{Error, crd::AssumeRole};

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
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        let role = self.assume_role.as_ref();
        for part in [
            self.identity.as_str(),
            self.region.as_str(),
            if self.fips { "fips" } else { "" },
            role.map_or("", |r| r.role_arn.as_str()),
            role.and_then(|r| r.external_id.as_deref()).unwrap_or_default(),
            role.and_then(|r| r.session_name.as_deref()).unwrap_or_default(),
        ] {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        digest.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

/// A failed fetch, remembered briefly so that the credentials waiting behind it, and the
/// reconciles its own status write triggers, get the same answer instead of calling AWS again.
#[derive(Debug, Clone)]
pub struct Failure {
    pub operation: &'static str,
    /// The AWS error code; `None` when AWS answered but the answer was unusable.
    pub code: Option<String>,
    pub message: String,
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        match f.code {
            Some(code) => Error::Aws { operation: f.operation, code, message: f.message },
            None => Error::InvalidAwsAnswer { operation: f.operation, problem: f.message },
        }
    }
}

#[derive(Default)]
struct Slot {
    token: Option<Arc<Token>>,
    failure: Option<(Instant, Failure)>,
}

/// How long a failure answers for every credential of the identity before AWS is asked again.
const FAILURE_TTL: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct TokenCache {
    slots: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl TokenCache {
    /// The cached token while it is not due for refresh; otherwise `fetch`es one, once, however
    /// many callers ask at the same time.
    pub async fn get_or_fetch<F, Fut>(&self, key: CacheKey, fetch: F) -> Result<Arc<Token>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, FetchError>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            forget_expired(&mut slots);
            slots.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().await;
        let now = Timestamp::now();
        if let Some(token) = slot.token.as_ref().filter(|t| now < t.refresh_at) {
            return Ok(token.clone());
        }
        if let Some((at, failure)) = &slot.failure
            && at.elapsed() < FAILURE_TTL
        {
            return Err(failure.clone().into());
        }
        match fetch().await {
            Ok(token) => {
                let token = Arc::new(token);
                *slot = Slot { token: Some(token.clone()), failure: None };
                Ok(token)
            }
            Err(FetchError::Aws(failure)) => {
                slot.failure = Some((Instant::now(), failure.clone()));
                Err(failure.into())
            }
            Err(FetchError::Other(error)) => Err(error),
        }
    }

    /// Puts a token found in a live Secret into an empty slot, so that a restarted controller
    /// does not ask AWS (and rewrite every Secret) while that token is not due. A slot that
    /// holds a token already keeps it.
    pub fn seed(&self, key: CacheKey, token: Token) -> bool {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.entry(key).or_default().clone()
        };
        let Ok(mut slot) = slot.try_lock() else {
            return false;
        };
        if slot.token.is_some() || token.refresh_at <= Timestamp::now() {
            return false;
        }
        slot.token = Some(Arc::new(token));
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Why a fetch failed: an AWS answer (shared with waiting callers) or anything else.
pub enum FetchError {
    Aws(Failure),
    Other(Error),
}

impl From<Error> for FetchError {
    fn from(e: Error) -> Self {
        FetchError::Other(e)
    }
}

/// Drops identities whose token has expired and that nobody is fetching, so the cache does
/// not grow with credentials that were deleted.
fn forget_expired(slots: &mut HashMap<CacheKey, Arc<tokio::sync::Mutex<Slot>>>) {
    let now = Timestamp::now();
    slots.retain(|_, slot| {
        // Held elsewhere: a caller is about to use or fill it.
        if Arc::strong_count(slot) > 1 {
            return true;
        }
        slot.try_lock().map_or(true, |slot| {
            slot.token.as_ref().is_some_and(|t| t.expires_at > now)
                || slot.failure.as_ref().is_some_and(|(at, _)| at.elapsed() < FAILURE_TTL)
        })
    });
}

/// When to refresh a token issued now that expires at `expires_at`: when `share_left` of its
/// lifetime is left, minus up to 5 % of the lifetime of random jitter so credentials issued
/// together do not all refresh in the same second.
pub fn refresh_time(now: Timestamp, expires_at: Timestamp, share_left: f64) -> Timestamp {
    let lifetime = expires_at.duration_since(now).as_secs_f64().max(0.0);
    let jitter = random_unit() * 0.05 * lifetime;
    let after = (lifetime * (1.0 - share_left) - jitter).max(0.0);
    now + Duration::from_secs_f64(after)
}

/// A number in [0, 1) from the standard library's per-process random hasher keys.
pub(crate) fn random_unit() -> f64 {
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn key(identity: &str) -> CacheKey {
        CacheKey { identity: identity.into(), region: "eu-west-1".into(), fips: false, assume_role: None }
    }

    fn token(refresh_in: i64) -> Token {
        let now = Timestamp::now();
        Token {
            username: "AWS".into(),
            password: "x".into(),
            proxy_host: "h".into(),
            expires_at: now + Duration::from_secs(3600),
            refresh_at: now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(refresh_in)).unwrap(),
        }
    }

    /// Item 6: a token found in a live Secret fills an empty slot only, and only while it is
    /// not due; the next caller gets it without a fetch.
    #[tokio::test]
    async fn a_seeded_token_is_used_without_a_fetch() {
        let cache = TokenCache::default();
        assert!(!cache.seed(key("a"), token(-5)), "a token due for refresh is not seeded");
        assert!(cache.seed(key("a"), token(600)));
        assert!(!cache.seed(key("a"), token(900)), "a slot with a token keeps it");
        let got = cache.get_or_fetch(key("a"), || async { Err(FetchError::Other(Error::EcrUnavailable)) }).await;
        assert!(got.is_ok(), "the seeded token was not used");
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
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key("a"), || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok(token(600))
                        })
                        .await
                        .map(drop)
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.len(), 1);
    }

    #[tokio::test]
    async fn a_token_due_for_refresh_is_fetched_again_and_identities_are_separate() {
        let cache = TokenCache::default();
        let calls = AtomicU32::new(0);
        let fetch = |refresh_in| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(token(refresh_in)) }
        };
        cache.get_or_fetch(key("a"), || fetch(-1)).await.unwrap();
        cache.get_or_fetch(key("a"), || fetch(600)).await.unwrap();
        cache.get_or_fetch(key("a"), || fetch(600)).await.unwrap();
        cache.get_or_fetch(key("b"), || fetch(600)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failure_answers_the_waiting_callers_too() {
        let cache = TokenCache::default();
        let failure = Failure {
            operation: "ecr:GetAuthorizationToken",
            code: Some("ThrottlingException".into()),
            message: "slow down".into(),
        };
        let err = cache.get_or_fetch(key("a"), || async { Err(FetchError::Aws(failure.clone())) }).await.unwrap_err();
        assert!(matches!(err, Error::Aws { ref code, .. } if code == "ThrottlingException"));
        let err = cache.get_or_fetch(key("a"), || async { panic!("must not be called within the failure TTL") }).await;
        assert!(err.is_err());
    }

    #[test]
    fn refresh_comes_when_the_share_is_left_minus_jitter() {
        let now = Timestamp::now();
        let twelve_hours = Duration::from_secs(12 * 3600);
        for _ in 0..100 {
            let at = refresh_time(now, now + twelve_hours, 0.25);
            let after = at.duration_since(now).as_secs_f64() / 3600.0;
            assert!((8.4..=9.0).contains(&after), "{after} h");
        }
    }
}
