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
