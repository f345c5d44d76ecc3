//! The webhook's HTTPS server: a certificate resolver that can be swapped while serving, and
//! [`serve`], HTTP/1.1 over rustls (ring) for an axum `Router`.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send a request's headers, counted from when the previous
/// response was written on a kept-alive one: idle connections close after this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// After shutdown, how long connections in flight have to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a certificate cannot be loaded. Names the part, never its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate is not PEM")]
    CertificatePem,
    #[error("the certificate chain is empty")]
    NoCertificate,
    #[error("the key is not a PEM private key")]
    KeyPem,
    #[error("the key cannot be used with the certificate: {0}")]
    Key(#[from] rustls::Error),
}

/// The serving certificate, swapped whenever the Secret changes; handshakes take the one current
/// when they start.
pub struct Resolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver").field("has_certificate", &self.has_certificate()).finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Resolver {
    pub fn new() -> Arc<Self> {
        Arc::new(Resolver { current: RwLock::new(None) })
    }

    /// Whether a certificate has been loaded (until then every handshake fails).
    pub fn has_certificate(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// The current certificate chain (leaf first), if any.
    pub fn certificate(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).as_ref().map(|k| k.cert.clone())
    }

    /// Loads `tls.crt` (leaf first, then any intermediates) and `tls.key` (PKCS#8, PKCS#1 or
    /// SEC1 PEM); the key must match the leaf. Returns whether the certificate changed. On an
    /// error the current one stays.
    pub fn load_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<bool, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| TlsError::CertificatePem)?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        if self.certificate().is_some_and(|current| current == chain) {
            return Ok(false);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::KeyPem)?;
        let key = CertifiedKey::from_der(chain, key, &provider())?;
        self.set(Arc::new(key));
        Ok(true)
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The rustls server configuration: TLS 1.2 and 1.3 with ring, no client certificates,
/// HTTP/1.1 by ALPN, no session resumption, the certificate from `resolver`.
pub fn server_config(resolver: Arc<Resolver>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No session resumption: a resumed session skips the certificate, so a client could go on
    // with one authenticated before a rotation; every connection sees the current certificate.
    // (The apiserver keeps its connections alive, full handshakes are rare.)
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Completes once `serve` is shutting down.
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await.map(|_| ());
}

/// Serves `app` over HTTPS (HTTP/1.1) on `listener` with the resolver's current certificate until
/// `shutdown` completes; one task per connection, the handshake bounded by [`HANDSHAKE_TIMEOUT`],
/// at most [`MAX_CONNECTIONS`] at once, headers (and idle keep-alive) bounded by
/// [`HEADER_READ_TIMEOUT`]. After `shutdown`, connections in flight finish their request (at most
/// [`DRAIN_TIMEOUT`]) and close.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<Resolver>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let config = match server_config(resolver) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "webhook TLS configuration refused");
            return;
        }
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: wait a little instead of spinning.
                    tracing::warn!(%error, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => handshake,
                // Shutting down: a connection without a request yet is dropped.
                () = stopping(&mut stopped) => return,
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "webhook TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook TLS handshake timed out");
                    return;
                }
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping(&mut stopped) => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(DRAIN_TIMEOUT, connection.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => return,
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    // Every connection holds a permit: all of them back means all connections are done.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT + DRAIN_TIMEOUT, slots.acquire_many(all)).await;
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use rustls::RootCertStore;
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::TlsConnector;

    use super::*;
    use crate::webhook::certs::{self, CertFiles, CertMode, CertSettings};

    fn generate() -> CertFiles {
        let settings = CertSettings {
            mode: CertMode::SelfManaged,
            namespace: "regcred-system".into(),
            secret: "regcred-webhook-tls".into(),
            configuration: "regcred-webhook".into(),
            hosts: vec!["127.0.0.1".into()],
            leaf_validity: Duration::from_secs(3600),
            ca_validity: Duration::from_secs(7200),
        };
        let now = SystemTime::now();
        certs::execute(now, None, &certs::plan(now, None, &settings), &settings).expect("generated")
    }

    fn load(resolver: &Resolver, files: &CertFiles) {
        use secrecy::ExposeSecret;
        let changed =
            resolver.load_pem(files.tls_crt.as_bytes(), files.tls_key.expose_secret().as_bytes()).expect("loaded");
        assert!(changed);
    }

    fn connector(bundles: &[&CertFiles]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for files in bundles {
            for ca in CertificateDer::pem_slice_iter(files.ca_crt.as_bytes()) {
                roots.add(ca.expect("PEM")).expect("CA");
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    /// One HTTPS request; the leaf the server showed and the response.
    async fn get(connector: &TlsConnector, port: u16) -> std::io::Result<(CertificateDer<'static>, String)> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let mut tls = connector.connect(name, tcp).await?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("a certificate").clone();
        tls.write_all(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
        let mut response = String::new();
        tls.read_to_string(&mut response).await?;
        Ok((leaf, response))
    }

    fn leaf_der(files: &CertFiles) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(files.tls_crt.as_bytes()).expect("leaf")
    }

    #[tokio::test]
    async fn serves_https_and_swaps_the_certificate_for_the_next_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let resolver = Resolver::new();
        assert!(!resolver.has_certificate());
        let first = generate();
        let second = generate();
        let client = connector(&[&first, &second]);
        let app = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, resolver.clone(), app, async move {
            let _ = stopped.await;
        }));

        // No certificate yet: the handshake fails, the server goes on.
        assert!(get(&client, port).await.is_err());

        load(&resolver, &first);
        assert!(resolver.has_certificate());
        // A connection that never speaks does not hold up the others.
        let _silent = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
        let (leaf, response) = get(&client, port).await.expect("request");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("hello"), "{response}");
        assert_eq!(leaf, leaf_der(&first));

        // The same certificate again is no change.
        use secrecy::ExposeSecret;
        assert!(
            !resolver.load_pem(first.tls_crt.as_bytes(), first.tls_key.expose_secret().as_bytes()).expect("loaded")
        );
        // A key that does not match is refused and the current certificate stays.
        assert!(resolver.load_pem(second.tls_crt.as_bytes(), first.tls_key.expose_secret().as_bytes()).is_err());
        assert!(resolver.load_pem(b"garbage", b"garbage").is_err());
        assert_eq!(get(&client, port).await.expect("request").0, leaf_der(&first));

        load(&resolver, &second);
        let (leaf, response) = get(&client, port).await.expect("request");
        assert_eq!(leaf, leaf_der(&second));
        assert!(response.ends_with("hello"), "{response}");
        // A client trusting only the first CA now fails.
        assert!(get(&connector(&[&first]), port).await.is_err());

        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(20), server).await.expect("serve returns").expect("no panic");
        assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err(), "the listener is closed");
    }
}
