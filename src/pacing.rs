//! Client-side pacing of the controller's writes to the apiserver (`--write-qps`,
//! `--write-burst`): a token bucket in front of every POST, PUT, PATCH and DELETE the
//! controller sends, so a rotation that rewrites 100,000 Secrets at once spreads them out
//! instead of taking the apiserver from other clients. Reads and watches are not paced. The
//! apiserver's own API Priority and Fairness still applies on top.

use std::{
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{Method, Request};
use tokio::time::Instant;
use tower::{Layer, Service};

/// Leader election's writes, never paced.
const LEASES: &str = "/apis/coordination.k8s.io/";

/// At most `per_second` writes a second on average, `burst` at once after a quiet spell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    pub per_second: f64,
    pub burst: u32,
}

/// The bucket's state: tokens left (negative: writes already promised a later slot).
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Reserves the next slot at `now`: how long the write must wait for it. Reservations
    /// are served in the order they were made.
    fn reserve(&mut self, pacing: Pacing, now: Instant) -> Duration {
        let burst = f64::from(pacing.burst.max(1));
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() * pacing.per_second;
        self.tokens = (self.tokens + refilled).min(burst) - 1.0;
        self.at = now;
        match self.tokens >= 0.0 {
            true => Duration::ZERO,
            false => Duration::from_secs_f64(-self.tokens / pacing.per_second),
        }
    }
}

/// The layer that paces a client's writes.
#[derive(Clone, Debug)]
pub struct PaceLayer {
    pacing: Pacing,
    bucket: Arc<Mutex<Bucket>>,
}

impl PaceLayer {
    pub fn new(pacing: Pacing) -> Self {
        let bucket = Bucket { tokens: f64::from(pacing.burst.max(1)), at: Instant::now() };
        PaceLayer { pacing, bucket: Arc::new(Mutex::new(bucket)) }
    }

    fn wait_for<B>(&self, request: &Request<B>) -> Duration {
        let read = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        // A Lease renewal behind a queue of writes could lose the leadership.
        if read || request.uri().path().starts_with(LEASES) {
            return Duration::ZERO;
        }
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner).reserve(self.pacing, Instant::now())
    }
}

impl<S> Layer<S> for PaceLayer {
    type Service = Paced<S>;

    fn layer(&self, inner: S) -> Paced<S> {
        Paced { inner, layer: self.clone() }
    }
}

/// A service whose writes wait for their slot (the inner service must be `Clone`, e.g. a
/// `tower::buffer::Buffer`).
#[derive(Clone, Debug)]
pub struct Paced<S> {
    inner: S,
    layer: PaceLayer,
}

impl<S, B> Service<Request<B>> for Paced<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let wait = self.layer.wait_for(&request);
        // The instance polled ready serves this request; a clone takes its place.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            ready.call(request).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_A_SECOND: Pacing = Pacing { per_second: 10.0, burst: 3 };

    #[test]
    fn a_burst_goes_at_once_and_the_rest_one_slot_apart() {
        let start = Instant::now();
        let mut bucket = Bucket { tokens: 3.0, at: start };
        let waits: Vec<u128> = (0..6).map(|_| bucket.reserve(TEN_A_SECOND, start).as_millis()).collect();
        assert_eq!(waits, [0, 0, 0, 100, 200, 300]);
    }

    #[test]
    fn a_quiet_spell_refills_up_to_the_burst_only() {
        let start = Instant::now();
        let mut bucket = Bucket { tokens: 3.0, at: start };
        for _ in 0..3 {
            bucket.reserve(TEN_A_SECOND, start);
        }
        // 10 s later: 100 tokens' worth of time, but at most the burst of 3.
        let later = start + Duration::from_secs(10);
        let waits: Vec<u128> = (0..4).map(|_| bucket.reserve(TEN_A_SECOND, later).as_millis()).collect();
        assert_eq!(waits, [0, 0, 0, 100]);
        // Half a slot later, the next waits the other half.
        assert_eq!(bucket.reserve(TEN_A_SECOND, later + Duration::from_millis(50)).as_millis(), 150);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_wait_for_their_slot_and_reads_do_not() {
        let layer = PaceLayer::new(Pacing { per_second: 2.0, burst: 1 });
        let service = tower::service_fn(|_: Request<()>| async { Ok::<_, std::convert::Infallible>(Instant::now()) });
        let mut paced = layer.layer(service);
        let start = Instant::now();
        let request = |method: Method, path: &str| Request::builder().method(method).uri(path).body(()).unwrap();
        let secret = "/api/v1/namespaces/a/secrets/pull";
        let lease = "/apis/coordination.k8s.io/v1/namespaces/regcred-system/leases/regcred";
        let mut served = Vec::new();
        for (method, path) in [
            (Method::PATCH, secret),
            (Method::GET, secret),
            (Method::POST, secret),
            (Method::PUT, lease),
            (Method::DELETE, secret),
        ] {
            let at = paced.call(request(method, path)).await.unwrap();
            served.push(at.duration_since(start).as_millis());
        }
        assert_eq!(served, [0, 0, 500, 500, 1000], "reads and Lease renewals wait for no slot");
    }
}
