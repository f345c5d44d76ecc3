//! A TCP proxy a test can cut, to put a network partition between one client (a controller
//! replica) and the apiserver while everyone else still reaches it, or slow down.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Forwards connections on a loopback port to `upstream`, on a thread and runtime of its own
/// (so a test that blocks does not stall it). [`TcpProxy::cut`] closes every connection and
/// refuses new ones (accepted and closed at once) until [`TcpProxy::reconnect`]; nothing
/// sent before the cut is delivered after it. [`TcpProxy::set_delay`] holds each chunk
/// forwarded, in either direction, that long.
pub struct TcpProxy {
    port: u16,
    open: watch::Sender<bool>,
    delay_ms: Arc<AtomicU64>,
}

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> Result<TcpProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (open, open_rx) = watch::channel(true);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name(format!("proxy-{port}")).spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else { return };
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    if !*open_rx.borrow() {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(pipe(client, upstream, open_rx.clone(), delay.clone()));
                }
            })
        })?;
        Ok(TcpProxy { port, open, delay_ms })
    }

    /// The proxy's address, `127.0.0.1:PORT`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn reconnect(&self) {
        self.open.send_replace(true);
    }

    /// Holds every chunk forwarded from now on for `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn pipe(client: TcpStream, upstream: SocketAddr, mut open: watch::Receiver<bool>, delay: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = open.wait_for(|open| !*open) => {}
        _ = copy(client_read, server_write, &delay) => {}
        _ = copy(server_read, client_write, &delay) => {}
    }
}

async fn copy(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, delay: &AtomicU64) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let hold = delay.load(Ordering::Relaxed);
        if hold > 0 {
            tokio::time::sleep(Duration::from_millis(hold)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// An HTTP proxy that only tunnels (`CONNECT host:port`), to the loopback port it was given for
/// that `host:port` ([`ConnectProxy::route`]), as a client's `HTTPS_PROXY`: a process that
/// cannot resolve a name such as an ECR host reaches the registry standing in for it, with
/// TLS end to end (the proxy sees only the target). Any other request or target gets
/// `403 Forbidden` and nothing is connected. [`ConnectProxy::tunnels`] lists the targets
/// tunnelled so far. Stops when dropped.
pub struct ConnectProxy {
    port: u16,
    routes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u16>>>,
    tunnels: Arc<std::sync::Mutex<Vec<String>>>,
    open: watch::Sender<bool>,
}

impl ConnectProxy {
    pub fn start() -> Result<ConnectProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (open, mut open_rx) = watch::channel(true);
        let routes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u16>>> = Arc::default();
        let tunnels: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let (r, t) = (routes.clone(), tunnels.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name(format!("connect-proxy-{port}")).spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else { return };
                loop {
                    let accepted = tokio::select! {
                        _ = open_rx.wait_for(|open| !*open) => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((client, _)) = accepted else { continue };
                    tokio::spawn(tunnel(client, r.clone(), t.clone()));
                }
            })
        })?;
        Ok(ConnectProxy { port, routes, tunnels, open })
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Tunnels `CONNECT target` (`host:port`, e.g. `123456789012.dkr.ecr.eu-west-1.amazonaws.com:443`)
    /// to `127.0.0.1:port`.
    pub fn route(&self, target: &str, port: u16) {
        self.routes.lock().unwrap().insert(target.to_ascii_lowercase(), port);
    }

    /// The targets tunnelled so far, in order.
    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.open.send_replace(false);
    }
}

async fn tunnel(
    mut client: TcpStream,
    routes: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u16>>>,
    tunnels: Arc<std::sync::Mutex<Vec<String>>>,
) {
    // The request head, byte by byte: nothing after it may be consumed (it is the TLS
    // handshake's), and it is short.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        match client.read(&mut byte).await {
            Ok(1) if head.len() < 8192 => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default().to_ascii_lowercase());
    let port = routes.lock().unwrap().get(&target).copied();
    let server = match port {
        Some(port) if method == "CONNECT" => TcpStream::connect(("127.0.0.1", port)).await.ok(),
        _ => None,
    };
    let Some(server) = server else {
        let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        return;
    };
    if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
        return;
    }
    tunnels.lock().unwrap().push(target);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let none = AtomicU64::new(0);
    tokio::select! {
        _ = copy(client_read, server_write, &none) => {}
        _ = copy(server_read, client_write, &none) => {}
    }
}
