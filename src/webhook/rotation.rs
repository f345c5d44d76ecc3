//! Stub until the certs branch lands.
pub async fn maintain(
    _: kube::Client,
    _: super::certs::CertSettings,
    _: std::sync::Arc<super::tls::Resolver>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    shutdown.await
}
