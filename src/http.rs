//! The HTTPS client regcred talks to registries and Google with: rustls with ring (as kube),
//! the system's CA certificates plus an optional bundle, proxies from the environment, and no
//! redirects, so that a login or token is only ever sent where it was meant to go. Answers
//! whose body regcred reads go through [`read_capped`], which stops at [`MAX_ANSWER_BYTES`]:
//! a token realm is whatever URL a registry's challenge names, so a tenant's server can answer.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures::{Stream, StreamExt};
use reqwest::{Client, Response};

/// The system's CA certificates, loaded once.
fn native_roots() -> &'static [rustls::pki_types::CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// A client trusting the system roots plus `ca_bundle` (PEM; `bundle_name` names it in the
/// error when it holds no certificate).
pub fn client(ca_bundle: Option<&[u8]>, bundle_name: &str) -> Result<Client, String> {
    client_resolving(ca_bundle, bundle_name, None)
}

/// [`client`], resolving names with `resolver` when one is given (the system's otherwise).
pub fn client_resolving(
    ca_bundle: Option<&[u8]>,
    bundle_name: &str,
    resolver: Option<Arc<dyn reqwest::dns::Resolve>>,
) -> Result<Client, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(native_roots().iter().cloned());
    if let Some(pem) = ca_bundle {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{bundle_name} holds no usable PEM certificate"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = match resolver {
        Some(resolver) => Client::builder().dns_resolver(resolver),
        None => Client::builder(),
    };
    builder
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("regcred/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client setup: {e}"))
}

/// The most regcred reads of one answer from a registry's token endpoint or from Google: 64
/// KiB. Those answers are a token in a little JSON, or a short error: a few KB at most (Docker
/// Hub's carries its JWT twice; a Google access token is at most 2 KB), so the cap leaves
/// room for ten times that. Anything larger is not such an answer, and an endless one, read
/// whole, grows the controller until it is OOM-killed (3 GiB within the 10 s a check may take).
pub const MAX_ANSWER_BYTES: usize = 64 << 10;

/// Why an answer's body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// It announced (Content-Length) or sent more than `limit` bytes; what was read is dropped.
    #[error("the answer is larger than {}", size(*.limit))]
    TooLarge { limit: usize },
    /// The transport failed while it was read.
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// A size for a message: `64 KiB`, or `100 bytes` when not a whole number of KiB.
pub fn size(bytes: usize) -> String {
    match bytes % 1024 {
        0 => format!("{} KiB", bytes / 1024),
        _ => format!("{bytes} bytes"),
    }
}

/// The body of `response` if it is at most `limit` bytes. One that announces more is refused
/// before any of it is read; one without a length (chunked, or until the connection closes) is
/// read chunk by chunk and refused as soon as it exceeds `limit`. At most `limit` bytes plus the
/// chunk in hand are held; the response (and with it the connection) is dropped on refusal.
pub async fn read_capped(response: Response, limit: usize) -> Result<Vec<u8>, BodyError> {
    let announced = response.content_length();
    if announced.is_some_and(|length| length > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let chunks = futures::stream::unfold(response, |mut response| async move {
        response.chunk().await.transpose().map(|chunk| (chunk, response))
    });
    collect_capped(chunks, limit, announced).await
}

/// The chunks of a body, appended while they fit in `limit`; `announced` (at most `limit`)
/// sizes the buffer when known.
async fn collect_capped<C: AsRef<[u8]>>(
    chunks: impl Stream<Item = Result<C, reqwest::Error>>,
    limit: usize,
    announced: Option<u64>,
) -> Result<Vec<u8>, BodyError> {
    let mut chunks = std::pin::pin!(chunks);
    let mut body = Vec::with_capacity(announced.map_or(limit, |length| length as usize).min(limit));
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let chunk = chunk.as_ref();
        if chunk.len() > limit - body.len() {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(chunk);
    }
    Ok(body)
}

/// A message fit for status and Events: at most 300 characters, and any long token-like run
/// (a JWT or access token a server might echo: Google, Entra and ACR error answers go through it) cut out.
pub fn scrub(message: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= 40 {
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in message.chars() {
        if c.is_ascii_alphanumeric() || "._-+=~".contains(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.chars().take(300).collect()
}

/// A fake HTTP server on 127.0.0.1 with the answers a hostile endpoint gives, for the unit
/// tests of everything that reads answers through [`read_capped`].
#[cfg(test)]
pub(crate) mod test_server {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// How the server answers every request but `GET /v2/`.
    #[derive(Clone, Copy, Debug)]
    pub enum Answer {
        /// 200, chunked: `{"token":"` and then `a`s, until `bytes` of them are out (or the
        /// client hangs up), then the end of the body.
        Streamed { bytes: usize },
        /// 200 announcing a 1 TiB Content-Length, then nothing until the client hangs up.
        Announced,
    }

    /// A running server: `host:port`, and how many body bytes it got out.
    pub struct Server {
        pub host: String,
        sent: Arc<AtomicUsize>,
    }

    impl Server {
        pub fn sent(&self) -> usize {
            self.sent.load(Ordering::SeqCst)
        }
    }

    /// The server: `GET /v2/` is a Bearer challenge naming its own `/token` as the realm;
    /// every other request gets `answer`.
    pub async fn start(answer: Answer) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(AtomicUsize::new(0));
        let (realm, counter) = (format!("http://{host}/token"), sent.clone());
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                tokio::spawn(serve(socket, answer, realm.clone(), counter.clone()));
            }
        });
        Server { host, sent }
    }

    async fn serve(mut socket: tokio::net::TcpStream, answer: Answer, realm: String, sent: Arc<AtomicUsize>) {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        if request.starts_with(b"GET /v2/ ") {
            let challenge = format!(
                "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"{realm}\",service=\"test\"\r\n\
                 content-length: 0\r\n\r\n"
            );
            let _ = socket.write_all(challenge.as_bytes()).await;
            return;
        }
        match answer {
            Answer::Streamed { bytes } => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = |data: &[u8]| [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat();
                if socket.write_all(&chunk(br#"{"token":""#)).await.is_err() {
                    return;
                }
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(16 << 10);
                    if socket.write_all(&chunk(&vec![b'a'; n])).await.is_err() {
                        return; // the client hung up
                    }
                    sent.fetch_add(n, Ordering::SeqCst);
                    left -= n;
                }
                let _ = socket.write_all(b"0\r\n\r\n").await;
            }
            Answer::Announced => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1099511627776\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                // Until the client hangs up (or long past any client's timeout).
                let _ = tokio::time::timeout(Duration::from_secs(60), socket.read(&mut buf)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{test_server::Answer, *};

    async fn get(host: &str) -> Response {
        let client = client(None, "").unwrap();
        client.get(format!("http://{host}/token")).timeout(Duration::from_secs(10)).send().await.unwrap()
    }

    #[tokio::test]
    async fn an_answer_within_the_cap_is_read_whole() {
        let server = test_server::start(Answer::Streamed { bytes: 1000 }).await;
        let body = read_capped(get(&server.host).await, MAX_ANSWER_BYTES).await.unwrap();
        assert_eq!(body.len(), 1010);
        assert!(body.starts_with(br#"{"token":"aaa"#));
    }

    /// An endless body is refused as soon as it passes the cap, and the connection dropped:
    /// the server gets out no more than what the sockets' buffers take in.
    #[tokio::test]
    async fn an_endless_answer_is_refused_once_past_the_cap() {
        let server = test_server::start(Answer::Streamed { bytes: 64 << 20 }).await;
        let started = Instant::now();
        let result = read_capped(get(&server.host).await, MAX_ANSWER_BYTES).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(BodyError::TooLarge { limit: MAX_ANSWER_BYTES })),
            "{:?}",
            result.map(|b| b.len())
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(server.sent() < 16 << 20, "the server got {} bytes out", server.sent());
    }

    /// A Content-Length over the cap is refused from the header, without waiting for a byte of
    /// the body.
    #[tokio::test]
    async fn an_announced_length_over_the_cap_is_refused_before_the_body() {
        let server = test_server::start(Answer::Announced).await;
        let started = Instant::now();
        let result = read_capped(get(&server.host).await, MAX_ANSWER_BYTES).await;
        assert!(matches!(result, Err(BodyError::TooLarge { .. })), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(result.unwrap_err().to_string(), "the answer is larger than 64 KiB");
    }

    /// The reader pulls at most the cap plus one chunk from the body, whatever follows.
    #[tokio::test]
    async fn at_most_the_cap_and_one_chunk_are_pulled() {
        let pulled = std::sync::atomic::AtomicUsize::new(0);
        let chunks = futures::stream::iter(0..1000).map(|_| {
            pulled.fetch_add(1024, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, reqwest::Error>([b'a'; 1024])
        });
        let result = collect_capped(chunks, 10 * 1024 + 1, None).await;
        assert!(matches!(result, Err(BodyError::TooLarge { .. })), "{:?}", result.map(|b| b.len()));
        assert_eq!(pulled.into_inner(), 11 * 1024, "pulled past the chunk that crossed the cap");
        let exact = futures::stream::iter(0..10).map(|_| Ok::<_, reqwest::Error>([b'a'; 1024]));
        assert_eq!(collect_capped(exact, 10 * 1024, None).await.unwrap().len(), 10 * 1024, "exactly the cap is fine");
    }

    #[test]
    fn sizes_read_as_kib_when_whole() {
        assert_eq!(size(MAX_ANSWER_BYTES), "64 KiB");
        assert_eq!(size(100), "100 bytes");
    }
}
