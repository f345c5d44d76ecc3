//! The Pod admission webhook (`--webhook-addr`): every replica, leader or standby, answers
//! Pod CREATE reviews from its own caches ([`cache`]), adding to each Pod the Secrets of the
//! credentials that target its namespace and attach to Pods ([`admit`], pure), served over
//! TLS ([`tls`]) with a certificate the controller issues and rotates itself or cert-manager
//! provides ([`certs`], [`rotation`]).

pub mod admit;
pub mod cache;
pub mod certs;
pub mod rotation;
pub mod tls;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Client,
    core::{
        DynamicObject,
        admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation},
    },
};
use tracing::{debug, warn};

use crate::{
    controller::Namespaces,
    crd::Attach,
    metrics::{AdmissionLabels, Metrics},
};

/// The path the MutatingWebhookConfiguration calls.
pub const PATH: &str = "/mutate-pods";
/// The largest AdmissionReview read: a Pod is at most 1.5 MiB in etcd, and a review carries
/// one object on CREATE.
const BODY_LIMIT: usize = 3 * 1024 * 1024;
/// How long an admission waits for the caches' first list after a start (the apiserver gives
/// up after the configuration's timeout, 2 s by default, and admits the Pod unchanged).
const SYNC_WAIT: Duration = Duration::from_secs(1);

/// How the webhook runs.
pub struct WebhookConfig {
    pub certs: certs::CertSettings,
    /// The namespaces the controller serves (`--namespaces`); all when `None`.
    pub served: Namespaces,
    /// Only credentials matching this label selector (`--selector`); all when `None`.
    pub selector: Option<String>,
    /// How credentials that do not say attach their Secrets (`--attach`).
    pub attach: Attach,
    /// Namespaces whose Pods are never changed (kube-system and the controller's own), whatever
    /// the configuration's namespaceSelector says.
    pub excluded: Vec<String>,
}

#[derive(Clone)]
struct Webhook {
    caches: Arc<cache::Caches>,
    metrics: Arc<Metrics>,
    excluded: Arc<[String]>,
}

/// Serves the webhook on `listener` until `shutdown`, with its caches and certificate upkeep.
pub async fn run(
    client: Client,
    listener: tokio::net::TcpListener,
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let (caches, fill) = cache::Caches::start(&client, config.served, config.selector.as_deref(), config.attach);
    let resolver = tls::Resolver::new();
    let upkeep = rotation::maintain(client, config.certs, resolver.clone(), shutdown.clone());
    let webhook = Webhook { caches, metrics, excluded: config.excluded.into() };
    let app = router(webhook);
    tokio::select! {
        () = fill => {}
        () = upkeep => {}
        () = tls::serve(listener, resolver, app, shutdown.clone()) => {}
    }
}

fn router(webhook: Webhook) -> Router {
    Router::new().route(PATH, post(review)).layer(DefaultBodyLimit::max(BODY_LIMIT)).with_state(webhook)
}

async fn review(State(webhook): State<Webhook>, body: Bytes) -> Response {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(error) => return (StatusCode::BAD_REQUEST, format!("not an AdmissionReview: {error}")).into_response(),
    };
    let request: AdmissionRequest<Pod> = match review.try_into() {
        Ok(request) => request,
        Err(_) => return (StatusCode::BAD_REQUEST, "an AdmissionReview without a request").into_response(),
    };
    let (response, result) = webhook.answer(&request).await;
    webhook.metrics.admissions.get_or_create(&AdmissionLabels { result: result.into() }).inc();
    let review: AdmissionReview<DynamicObject> = response.into_review();
    match serde_json::to_vec(&review) {
        Ok(body) => ([("content-type", "application/json")], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

impl Webhook {
    /// The answer to one review, and its result for the metrics. Always an admission: a
    /// webhook that cannot help leaves the Pod as it is.
    async fn answer(&self, request: &AdmissionRequest<Pod>) -> (AdmissionResponse, &'static str) {
        let allowed = AdmissionResponse::from(request);
        let (Operation::Create, Some(pod), Some(namespace)) =
            (&request.operation, request.object.as_ref(), request.namespace.as_deref())
        else {
            return (allowed, "invalid");
        };
        if self.excluded.iter().any(|excluded| excluded == namespace) {
            return (allowed, "unchanged");
        }
        self.wait_for_caches().await;
        let view = admit::PodView::of(pod);
        let add = admit::secrets_to_add(&view, &self.caches.offers(namespace).await);
        if add.is_empty() {
            return (allowed, "unchanged");
        }
        debug!(namespace, secrets = ?add, "adding pull Secrets to a Pod");
        match allowed.clone().with_patch(admit::patch(&view, &add)) {
            Ok(patched) => (patched, "patched"),
            Err(error) => {
                warn!(%error, "could not encode the patch; admitting the Pod unchanged");
                (allowed, "unchanged")
            }
        }
    }

    async fn wait_for_caches(&self) {
        let deadline = tokio::time::Instant::now() + SYNC_WAIT;
        while !self.caches.synced() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
