//! The admin endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the controller's caches have synced.
    pub ready: Arc<AtomicBool>,
}

/// Serves the admin endpoint on a bound listener until the process ends (binding first lets
/// the caller fail fast on a taken port).
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    tracing::info!(addr = %listener.local_addr()?, "admin endpoint listening");
    axum::serve(listener, app).await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}
