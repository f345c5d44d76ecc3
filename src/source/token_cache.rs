//! One token per identity, shared by every credential that resolves to it, with
//! single-flight fetching: concurrent reconciles of the same identity wait for one call to the
//! provider. Providers with expiring tokens (ECR, Google, Azure) keep theirs here. When a refresh
//! fails, the token it was to replace is still handed out while it stays valid for at least
//! [`MIN_VALIDITY`], together with the failure (see [`Cached`]).

use std::{
    collections::HashMap,
    future::Future,
    hash::{BuildHasher, Hash},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::jiff::Timestamp;

use crate::Error;

/// A token's lifetime as the cache needs it.
pub trait Expiring {
    /// When it stops working.
    fn expires_at(&self) -> Timestamp;
    /// When to fetch the next one.
    fn refresh_at(&self) -> Timestamp;
}

struct Slot<T, E> {
    token: Option<Arc<T>>,
    failure: Option<(Instant, E)>,
}

impl<T, E> Default for Slot<T, E> {
    fn default() -> Self {
        Self { token: None, failure: None }
    }
}

/// The least validity a token must have left to be written: a fetched token with less is an
/// invalid answer, and a token whose refresh failed is no longer handed out.
pub const MIN_VALIDITY: Duration = Duration::from_secs(10);

/// What the cache hands out: a token, and why it is not a fresh one when its refresh failed.
#[derive(Debug)]
pub struct Cached<T> {
    pub token: Arc<T>,
    /// The refresh of `token` was due and failed; `token` is the one it was to replace, still
    /// valid for at least [`MIN_VALIDITY`].
    pub refresh_failed: Option<Error>,
}

/// How long a provider's failure answers for every credential of the identity before the
/// provider is asked again.
const FAILURE_TTL: Duration = Duration::from_secs(2);

/// One identity's slot, locked while its token is fetched.
type SharedSlot<T, E> = Arc<tokio::sync::Mutex<Slot<T, E>>>;

/// Tokens by identity `K`: `T` is a provider's token, `E` its failure (shared with the
/// callers waiting behind a fetch, and remembered for [`FAILURE_TTL`]).
pub struct TokenCache<K, T, E> {
    slots: Mutex<HashMap<K, SharedSlot<T, E>>>,
}

impl<K, T, E> Default for TokenCache<K, T, E> {
    fn default() -> Self {
        Self { slots: Mutex::default() }
    }
}

impl<K, T, E> TokenCache<K, T, E>
where
    K: Hash + Eq,
    T: Expiring,
    E: Clone + Into<Error>,
{
    /// The cached token while it is not due for refresh; otherwise `fetch`es one, once, however
    /// many callers ask at the same time. When that fails (or failed within [`FAILURE_TTL`])
    /// and the cached token is still valid for [`MIN_VALIDITY`], the cached token comes with
    /// the failure; an expired one never comes back.
    pub async fn get_or_fetch<F, Fut>(&self, key: K, fetch: F) -> Result<Cached<T>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, FetchError<E>>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            forget_expired(&mut slots);
            slots.entry(key).or_default().clone()
        };
        let mut slot = slot.lock().await;
        let now = Timestamp::now();
        if let Some(token) = slot.token.as_ref().filter(|t| now < t.refresh_at()) {
            return Ok(Cached { token: token.clone(), refresh_failed: None });
        }
        let failed = |slot: &Slot<T, E>, error: Error| match slot.token.as_ref().filter(|t| still_valid(t.as_ref())) {
            Some(token) => Ok(Cached { token: token.clone(), refresh_failed: Some(error) }),
            None => Err(error),
        };
        if let Some((at, failure)) = &slot.failure
            && at.elapsed() < FAILURE_TTL
        {
            return failed(&slot, failure.clone().into());
        }
        match fetch().await {
            Ok(token) => {
                let token = Arc::new(token);
                *slot = Slot { token: Some(token.clone()), failure: None };
                Ok(Cached { token, refresh_failed: None })
            }
            Err(FetchError::Provider(failure)) => {
                slot.failure = Some((Instant::now(), failure.clone()));
                failed(&slot, failure.into())
            }
            Err(FetchError::Other(error)) => failed(&slot, error),
        }
    }

    /// Puts a token found in a live Secret into an empty slot, so that a restarted controller
    /// does not ask the provider (and rewrite every Secret) while that token is not due, and
    /// still has it to hand out when it is due and the refresh fails. A slot that holds a token
    /// already keeps it; a token valid for less than [`MIN_VALIDITY`] is not taken.
    pub fn seed(&self, key: K, token: T) -> bool {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.entry(key).or_default().clone()
        };
        let Ok(mut slot) = slot.try_lock() else {
            return false;
        };
        if slot.token.is_some() || !still_valid(&token) {
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

/// Whether a token can still be written: valid for at least [`MIN_VALIDITY`] from now.
fn still_valid<T: Expiring>(token: &T) -> bool {
    Timestamp::now() + MIN_VALIDITY < token.expires_at()
}

/// SHA-256 of `parts`, each followed by a NUL (so `["ab", "c"]` and `["a", "bc"]` differ), in
/// hex: what identifies key material in a cache key without holding it.
pub fn digest(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for part in parts {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    format!("{:x}", digest.finalize())
}

/// The first 16 bytes of [`digest`]: the identity fingerprint recorded in a credential's status
/// (`tokenIdentity`), by which a restarted controller finds its token again.
pub fn fingerprint(parts: &[&str]) -> String {
    digest(parts)[..32].to_string()
}

/// The cloud whose call failed: it decides the failure's reason in status and Events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Google,
    Azure,
}

/// A failed provider call, remembered briefly so that the credentials waiting behind it, and
/// the reconciles its own status write triggers, get the same answer instead of calling the
/// provider again.
#[derive(Debug, Clone)]
pub struct Failure {
    pub cloud: Cloud,
    /// `service:Operation`, e.g. `ecr:GetAuthorizationToken`, `sts:token`.
    pub operation: &'static str,
    /// The provider's error code; `None` when it answered but the answer was unusable.
    pub code: Option<String>,
    pub message: String,
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Self {
        let Failure { cloud, operation, code, message } = f;
        match (cloud, code) {
            (Cloud::Aws, Some(code)) => Error::Aws { operation, code, message },
            (Cloud::Aws, None) => Error::InvalidAwsAnswer { operation, problem: message },
            (Cloud::Google, Some(code)) => Error::Gcp { operation, code, message },
            (Cloud::Google, None) => Error::InvalidGcpAnswer { operation, problem: message },
            (Cloud::Azure, Some(code)) => Error::Azure { operation, code, message },
            (Cloud::Azure, None) => Error::InvalidAzureAnswer { operation, problem: message },
        }
    }
}

/// Why a fetch failed: the provider's answer (shared with waiting callers) or anything else.
pub enum FetchError<E> {
    Provider(E),
    Other(Error),
}

impl<E> From<Error> for FetchError<E> {
    fn from(e: Error) -> Self {
        FetchError::Other(e)
    }
}

/// Drops identities whose token has expired and that nobody is fetching, so the cache does
/// not grow with credentials that were deleted.
fn forget_expired<K, T: Expiring, E>(slots: &mut HashMap<K, SharedSlot<T, E>>) {
    let now = Timestamp::now();
    slots.retain(|_, slot| {
        // Held elsewhere: a caller is about to use or fill it.
        if Arc::strong_count(slot) > 1 {
            return true;
        }
        slot.try_lock().map_or(true, |slot| {
            slot.token.as_ref().is_some_and(|t| t.expires_at() > now)
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

    #[derive(Debug)]
    struct TestToken {
        refresh_at: Timestamp,
        expires_at: Timestamp,
    }

    impl Expiring for TestToken {
        fn expires_at(&self) -> Timestamp {
            self.expires_at
        }
        fn refresh_at(&self) -> Timestamp {
            self.refresh_at
        }
    }

    #[derive(Clone)]
    struct Throttled;

    impl From<Throttled> for Error {
        fn from(_: Throttled) -> Self {
            Error::InvalidAwsAnswer { operation: "op", problem: "slow down".into() }
        }
    }

    type Cache = TokenCache<&'static str, TestToken, Throttled>;

    fn token(refresh_in: i64) -> TestToken {
        expiring(refresh_in, 3600)
    }

    fn expiring(refresh_in: i64, expires_in: i64) -> TestToken {
        let now = Timestamp::now();
        let at = |secs| now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs)).unwrap();
        TestToken { expires_at: at(expires_in), refresh_at: at(refresh_in) }
    }

    /// Issue 20, item 8: a refresh that fails leaves the token it was to replace in use while
    /// that token is valid, with the failure beside it, for a provider's answer (also while
    /// it is remembered) and for any other failure alike.
    #[tokio::test]
    async fn a_failed_refresh_hands_out_the_still_valid_token_with_its_failure() {
        let cache = Cache::default();
        let first = cache.get_or_fetch("a", || async { Ok(expiring(-1, 3600)) }).await.unwrap();
        assert!(first.refresh_failed.is_none());
        let due = cache.get_or_fetch("a", || async { Err(FetchError::Provider(Throttled)) }).await.unwrap();
        assert!(Arc::ptr_eq(&due.token, &first.token), "not the cached token");
        assert_eq!(due.refresh_failed.map(|e| e.reason()), Some("InvalidAwsAnswer"));
        let remembered = cache.get_or_fetch("a", || async { panic!("asked within the failure TTL") }).await.unwrap();
        assert!(Arc::ptr_eq(&remembered.token, &first.token) && remembered.refresh_failed.is_some());

        let other = Cache::default();
        other.get_or_fetch("b", || async { Ok(expiring(-1, 3600)) }).await.unwrap();
        let failed = other.get_or_fetch("b", || async { Err(FetchError::Other(Error::EcrUnavailable)) }).await;
        assert_eq!(failed.unwrap().refresh_failed.map(|e| e.reason()), Some("EcrUnavailable"));
    }

    /// Issue 20, item 8, after a restart: a live Secret's token that is due but valid is
    /// seeded; it is fetched again at once, and kept only while that fails.
    #[tokio::test]
    async fn a_seeded_due_token_is_refreshed_and_kept_only_when_that_fails() {
        let cache = Cache::default();
        assert!(cache.seed("a", expiring(-5, 3600)));
        let kept = cache.get_or_fetch("a", || async { Err(FetchError::Provider(Throttled)) }).await.unwrap();
        assert!(kept.refresh_failed.is_some(), "the failure comes with the seeded token");

        let healthy = Cache::default();
        assert!(healthy.seed("a", expiring(-5, 3600)));
        let fresh = healthy.get_or_fetch("a", || async { Ok(token(600)) }).await.unwrap();
        assert!(fresh.refresh_failed.is_none() && fresh.token.refresh_at > Timestamp::now(), "not refreshed");
    }

    /// A token that expires within `MIN_VALIDITY` (or has expired) is never handed out after a
    /// failed refresh: the failure is the answer.
    #[tokio::test]
    async fn an_expiring_token_is_not_handed_out_after_a_failed_refresh() {
        let cache = Cache::default();
        cache.get_or_fetch("a", || async { Ok(expiring(-5, 5)) }).await.unwrap();
        let err = cache.get_or_fetch("a", || async { Err(FetchError::Provider(Throttled)) }).await.unwrap_err();
        assert_eq!(err.reason(), "InvalidAwsAnswer");
        let err = cache.get_or_fetch("a", || async { panic!("asked within the failure TTL") }).await.unwrap_err();
        assert_eq!(err.reason(), "InvalidAwsAnswer");
    }

    /// A token found in a live Secret fills an empty slot only, and only while it is valid;
    /// the next caller gets it without a fetch.
    #[tokio::test]
    async fn a_seeded_token_is_used_without_a_fetch() {
        let cache = Cache::default();
        assert!(!cache.seed("a", expiring(-5, 5)), "a token about to expire is not seeded");
        assert!(cache.seed("a", token(600)));
        assert!(!cache.seed("a", token(900)), "a slot with a token keeps it");
        let got = cache.get_or_fetch("a", || async { Err(FetchError::Other(Error::EcrUnavailable)) }).await;
        assert!(got.is_ok(), "the seeded token was not used");
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(Cache::default());
        let calls = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch("a", || async move {
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
        let cache = Cache::default();
        let calls = AtomicU32::new(0);
        let fetch = |refresh_in| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(token(refresh_in)) }
        };
        cache.get_or_fetch("a", || fetch(-1)).await.unwrap();
        cache.get_or_fetch("a", || fetch(600)).await.unwrap();
        cache.get_or_fetch("a", || fetch(600)).await.unwrap();
        cache.get_or_fetch("b", || fetch(600)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failure_answers_the_waiting_callers_too() {
        let cache = Cache::default();
        let err = cache.get_or_fetch("a", || async { Err(FetchError::Provider(Throttled)) }).await.unwrap_err();
        assert_eq!(err.reason(), "InvalidAwsAnswer");
        let err = cache.get_or_fetch("a", || async { panic!("must not be called within the failure TTL") }).await;
        assert!(err.is_err());
    }

    /// A failure's reason in status names the cloud that failed, and whether it refused or
    /// answered unusably.
    /// Fingerprints recorded on Secrets by earlier releases must still match: the algorithm is
    /// pinned (SHA-256 over NUL-terminated parts; a fingerprint is its first 16 bytes).
    #[test]
    fn digests_are_pinned_and_separate_their_parts() {
        // `printf 'a\0b\0' | sha256sum`
        assert_eq!(digest(&["a", "b"]), "8fb20ef63ced4145fc2e983ffe597d1dcff39154c3bf21f0fa9dde6a0c50fdc9");
        assert_eq!(fingerprint(&["a", "b"]), "8fb20ef63ced4145fc2e983ffe597d1d");
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
    }

    #[test]
    fn failures_map_to_their_clouds_reasons() {
        let failure = |cloud, code: Option<&str>| {
            Error::from(Failure { cloud, operation: "x:y", code: code.map(String::from), message: "m".into() })
        };
        assert_eq!(failure(Cloud::Aws, Some("AccessDenied")).reason(), "AwsRequestFailed");
        assert_eq!(failure(Cloud::Aws, None).reason(), "InvalidAwsAnswer");
        assert_eq!(failure(Cloud::Google, Some("invalid_grant")).reason(), "GcpRequestFailed");
        assert_eq!(failure(Cloud::Google, None).reason(), "InvalidGcpAnswer");
        assert_eq!(failure(Cloud::Azure, Some("invalid_client")).reason(), "AzureRequestFailed");
        assert_eq!(failure(Cloud::Azure, None).reason(), "InvalidAzureAnswer");
        assert_eq!(failure(Cloud::Google, Some("invalid_grant")).to_string(), "x:y failed: invalid_grant: m");
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
